//! The daemon: arguments → config → listeners → serve until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use openai_stream_proxy::server::DEFAULT_DRAIN;
use openai_stream_proxy::{ClientOptions, Config, Server, UpstreamClient};

/// Converts non-streaming OpenAI Chat Completions and Responses calls into upstream
/// streams and answers with one JSON body; passes everything else through unchanged.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The configuration file.
    #[arg(
        short = 'c',
        long = "config-file",
        value_name = "PATH",
        default_value = "config.json"
    )]
    config_file: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();

    let config = match Config::load(&args.config_file) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    for key in &config.unknown_keys {
        tracing::warn!(file = %config.source.display(), key = %key, "unknown config key ignored");
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

async fn run(config: Config) -> ExitCode {
    let client = match ClientOptions::from_env().and_then(UpstreamClient::new) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let signals = match ShutdownSignals::install() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::bind(&config, &client).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("error: {}: {e}", config.source.display());
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        "loaded {} rule(s) from {}",
        config.rules.len(),
        config.source.display()
    );
    for (rule, addr) in config.rules.iter().zip(server.local_addrs()) {
        tracing::info!(listen = %addr, upstream = %rule.upstream, convert = rule.options.convert, "proxy rule");
    }
    server.run(signals.received(), DEFAULT_DRAIN).await;
    ExitCode::SUCCESS
}

/// `RUST_LOG` wins; the reference's `LOG_LEVEL` is honoured when it is unset (D23).
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| {
            std::env::var("LOG_LEVEL")
                .ok()
                .map(|v| v.to_ascii_lowercase())
        })
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// SIGINT/SIGTERM, registered before the proxy announces readiness: a signal that arrives
/// between "listening" and the first poll of a lazily created handler would otherwise get
/// the default action and kill the process mid-request.
struct ShutdownSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> std::io::Result<ShutdownSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(ShutdownSignals {
                terminate: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(ShutdownSignals {})
        }
    }

    async fn received(mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.terminate.recv() => {}
                _ = self.interrupt.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
