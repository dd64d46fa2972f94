//! The daemon: arguments → config → listeners → serve until SIGINT/SIGTERM, reloading the
//! config on SIGHUP.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use openai_stream_proxy::runtime::{self, Workers, WORKER_THREADS_VAR};
use openai_stream_proxy::server::{Control, DEFAULT_DRAIN};
use openai_stream_proxy::{admin, ClientOptions, Config, Server, UpstreamClient};
use tokio::sync::{mpsc, oneshot};

/// Converts non-streaming OpenAI Chat Completions and Responses calls into upstream
/// streams and answers with one JSON body; passes everything else through unchanged.
#[derive(Debug, Parser)]
#[command(version, about, after_help = ENVIRONMENT)]
struct Args {
    /// The configuration file.
    #[arg(
        short = 'c',
        long = "config-file",
        value_name = "PATH",
        default_value = "config.json"
    )]
    config_file: PathBuf,

    /// Validate the configuration, print the resolved rules and exit (0 when valid, 1 with
    /// every problem listed); no port is bound.
    #[arg(long)]
    check: bool,

    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// The environment the daemon reads, listed under `--help`: none of it is in the config file.
const ENVIRONMENT: &str = "\
Environment:
  RUST_LOG              log level or filter (default info; LOG_LEVEL when unset)
  TOKIO_WORKER_THREADS  worker threads (default: the CPUs available; 1 runs the
                        current-thread scheduler)
  HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY
                        http:// proxy for upstream requests (never for loopback
                        upstreams; NO_PROXY=* for none)
  SSL_CERT_FILE, SSL_CERT_DIR
                        trust store for HTTPS upstreams (default: the system's)

Signals: SIGTERM/SIGINT drain in-flight requests (up to 30 s) and exit 0; SIGHUP re-reads
the config file.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);

    let config = match Config::load(&args.config_file) {
        Ok(config) => config,
        Err(e) => {
            for line in e.to_string().lines() {
                fail(line);
            }
            return ExitCode::FAILURE;
        }
    };
    warn_about(&config);
    // Before `--check`, so that a check that passes means the daemon starts.
    let workers = match Workers::from_env() {
        Ok(workers) => workers,
        Err(e) => {
            fail(e);
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = openai_stream_proxy::upstream::check_proxy_env() {
        fail(e);
        return ExitCode::FAILURE;
    }
    if args.check {
        print_resolved(&config);
        return ExitCode::SUCCESS;
    }

    let runtime = match workers.build() {
        Ok(runtime) => runtime,
        Err(e) => {
            fail(format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        threads = workers.threads,
        scheduler = runtime::scheduler(&runtime),
        source = if workers.from_env {
            WORKER_THREADS_VAR
        } else {
            "available CPUs"
        },
        "async runtime"
    );
    let code = runtime.block_on(run(config, args.config_file));
    // Dropping the runtime waits for its blocking threads without a limit; one stuck in a
    // read on a hung file system or a DNS lookup must not hold the exit after the drain.
    runtime.shutdown_timeout(BLOCKING_GRACE);
    code
}

/// Shutdown signals this soon after the first one repeat it rather than insist.
const SAME_SHUTDOWN_REQUEST: Duration = Duration::from_secs(1);

/// How long the exit waits for blocking work still running (a config read, a DNS lookup).
const BLOCKING_GRACE: Duration = Duration::from_secs(1);

async fn run(config: Config, path: PathBuf) -> ExitCode {
    let client = match ClientOptions::from_env().and_then(UpstreamClient::new) {
        Ok(client) => client,
        Err(e) => {
            fail(e);
            return ExitCode::FAILURE;
        }
    };
    let signals = match Signals::install() {
        Ok(signals) => signals,
        Err(e) => {
            fail(format!("cannot install signal handlers: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::bind(&config, &client).await {
        Ok(server) => server,
        Err(e) => {
            fail(format!("{}: {e}", config.source.display()));
            return ExitCode::FAILURE;
        }
    };
    // Admin endpoints keep answering while the proxy drains (healthz says 503 then), and
    // stop with the process.
    let admin = match config.admin_listen {
        None => None,
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                tracing::info!(listen = %addr, "admin endpoints /metrics, /healthz and /livez");
                let health = server.health();
                Some(tokio::spawn(admin::serve(
                    listener,
                    health,
                    std::future::pending(),
                )))
            }
            Err(e) => {
                fail(format!(
                    "{}: cannot listen on adminListen {addr}: {e}",
                    config.source.display()
                ));
                return ExitCode::FAILURE;
            }
        },
    };
    tracing::info!(
        "loaded {} rule(s) from {}",
        config.rules.len(),
        config.source.display()
    );
    for (rule, addr) in config.rules.iter().zip(server.local_addrs()) {
        tracing::info!(listen = %addr, upstream = %rule.upstream, convert = rule.options.convert, "proxy rule");
    }

    let (control, control_rx) = mpsc::channel(4);
    let Signals {
        shutdown,
        mut reload,
    } = signals;
    let admin_listen = config.admin_listen;
    let reloader = tokio::spawn(async move {
        while reload.next().await {
            // Read off the runtime's threads: with one worker, a slow file system would
            // otherwise stall every connection while the file is read.
            let file = path.clone();
            let loaded = match tokio::task::spawn_blocking(move || Config::load(&file)).await {
                Ok(loaded) => loaded,
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "config reload failed; the running config keeps serving");
                    continue;
                }
            };
            match loaded {
                Ok(config) => {
                    warn_about(&config);
                    if config.admin_listen != admin_listen {
                        tracing::warn!("adminListen changed; it takes effect at the next restart");
                    }
                    if control.send(Control::Reload(config)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let problems = e.problems.join("; ");
                    tracing::error!(file = %path.display(), %problems, "config reload rejected; the running config keeps serving");
                }
            }
        }
    });
    // The first SIGTERM/SIGINT drains; a second one (an impatient Ctrl-C) exits at once,
    // cutting what the drain still waits for. Signals within a second of the first are
    // the same request: a terminal's Ctrl-C reaches a whole process group, and process
    // managers forward their own signal besides.
    let (drain_tx, drain_rx) = oneshot::channel::<()>();
    let (force_tx, force_rx) = oneshot::channel::<()>();
    let signals = tokio::spawn(async move {
        let mut shutdown = shutdown;
        shutdown.received().await;
        let _ = drain_tx.send(());
        let first = tokio::time::Instant::now();
        loop {
            shutdown.received().await;
            if first.elapsed() >= SAME_SHUTDOWN_REQUEST {
                let _ = force_tx.send(());
                return;
            }
        }
    });
    let drained = server.run_with_control(
        async {
            let _ = drain_rx.await;
        },
        control_rx,
        DEFAULT_DRAIN,
    );
    let code = tokio::select! {
        () = drained => ExitCode::SUCCESS,
        Ok(()) = force_rx => {
            tracing::warn!("second shutdown signal; exiting without waiting for the drain");
            ExitCode::FAILURE
        }
    };
    signals.abort();
    reloader.abort();
    if let Some(admin) = admin {
        admin.abort();
    }
    code
}

/// Warnings about a valid config: keys we do not know, and credentials injected on a
/// port that other machines can reach.
fn warn_about(config: &Config) {
    for key in &config.unknown_keys {
        tracing::warn!(file = %config.source.display(), key = %key, "unknown config key ignored");
    }
    for rule in &config.rules {
        let injects_credentials = rule.options.headers.iter().any(|(name, _)| {
            let name = name.as_str();
            name == "authorization" || name.contains("api-key") || name.contains("token")
        });
        if injects_credentials && !rule.listen.ip().is_loopback() {
            tracing::warn!(
                listen = %rule.listen,
                "this rule adds credentials to upstream requests and listens on a non-loopback address: anyone who can reach it uses your key"
            );
        }
    }
}

/// `--check`: the resolved rules, one per line, never a header value.
fn print_resolved(config: &Config) {
    println!(
        "{}: valid, {} rule(s)",
        config.source.display(),
        config.rules.len()
    );
    if let Some(admin) = config.admin_listen {
        println!("  admin endpoints on {admin}");
    }
    println!(
        "  request heads must arrive within {} s",
        config.header_read_timeout.as_secs()
    );
    for rule in &config.rules {
        let o = &rule.options;
        let headers: Vec<&str> = o.headers.iter().map(|(name, _)| name.as_str()).collect();
        println!(
            "  {} -> {} (convert: {}, upstream HTTP/2: {}, timeout: {} s, keep-alive: {}, max request body: {} B, max response: {} B, max WebSocket message: {} B, injected headers: {})",
            rule.listen,
            rule.upstream,
            if o.convert { "on" } else { "off" },
            if o.upstream_http2 { "when offered" } else { "off" },
            o.timeout.as_secs(),
            o.keep_alive.map_or("off".to_owned(), |d| format!("{} s", d.as_secs())),
            o.max_request_body_bytes,
            o.max_response_bytes,
            o.max_websocket_message_bytes,
            if headers.is_empty() { "none".to_owned() } else { headers.join(", ") },
        );
    }
}

/// The `--log-format` in use, for the lines written outside the logger.
static LOG_FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// A fatal start-up error on stderr, never filtered by the log level: `error: …` in text
/// format, one JSON object like the logger's in JSON format (so every line parses).
fn fail(message: impl std::fmt::Display) {
    match LOG_FORMAT.get() {
        Some(LogFormat::Json) => {
            use tracing_subscriber::fmt::format::Writer;
            use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
            let mut timestamp = String::new();
            let _ = SystemTime.format_time(&mut Writer::new(&mut timestamp));
            let line = serde_json::json!({
                "timestamp": timestamp,
                "level": "ERROR",
                "message": message.to_string(),
                "target": "openai_stream_proxy",
            });
            eprintln!("{line}");
        }
        _ => eprintln!("error: {message}"),
    }
}

/// `RUST_LOG` wins; the reference's `LOG_LEVEL` is honoured when it is unset (D23).
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let _ = LOG_FORMAT.set(format);
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    // Said once the logger runs: a value that is not used must not pass silently.
    let mut ignored = None;
    let filter = match (set("RUST_LOG"), set("LOG_LEVEL")) {
        (Some(directives), _) => EnvFilter::try_new(&directives).unwrap_or_else(|e| {
            ignored = Some(format!(
                "RUST_LOG={directives:?} is not a valid filter ({e}); logging at info"
            ));
            EnvFilter::new("info")
        }),
        // Not a filter: a word EnvFilter does not know as a level would be taken for a
        // target name, and `WARNING` or `ALL` would silence every line.
        (None, Some(level)) => EnvFilter::new(log_level(&level).unwrap_or_else(|| {
            ignored = Some(format!(
                "LOG_LEVEL={level:?} is not a level (trace, debug, info, warn, error, off, all); logging at info"
            ));
            "info"
        })),
        (None, None) => EnvFilter::new("info"),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    if let Some(ignored) = ignored {
        tracing::warn!("{ignored}");
    }
}

/// The filter for a `LOG_LEVEL` value (D23): the reference's level names in any case,
/// `ALL` (everything) and `WARNING`, `FATAL` as the usual spellings; `None` for anything else.
fn log_level(value: &str) -> Option<&'static str> {
    Some(match value.trim().to_ascii_lowercase().as_str() {
        "trace" | "all" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warn" | "warning" => "warn",
        "error" | "fatal" => "error",
        "off" => "off",
        _ => return None,
    })
}

/// Signal handlers, registered before the proxy announces readiness: a signal that arrives
/// between "listening" and the first poll of a lazily created handler would otherwise get
/// the default action and kill the process mid-request.
struct Signals {
    shutdown: ShutdownSignals,
    reload: ReloadSignal,
}

struct ShutdownSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

/// SIGHUP; never fires where there is no such signal.
struct ReloadSignal {
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                shutdown: ShutdownSignals {
                    terminate: signal(SignalKind::terminate())?,
                    interrupt: signal(SignalKind::interrupt())?,
                },
                reload: ReloadSignal {
                    hangup: signal(SignalKind::hangup())?,
                },
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Signals {
                shutdown: ShutdownSignals {},
                reload: ReloadSignal {},
            })
        }
    }
}

impl ShutdownSignals {
    async fn received(&mut self) {
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

impl ReloadSignal {
    /// `true` for each SIGHUP.
    async fn next(&mut self) -> bool {
        #[cfg(unix)]
        {
            self.hangup.recv().await.is_some()
        }
        #[cfg(not(unix))]
        {
            std::future::pending::<bool>().await
        }
    }
}
