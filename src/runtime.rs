//! The async runtime the daemon runs on, sized to the CPUs it may use.
//!
//! With one worker thread, tokio's multi-thread scheduler is pure overhead: there is no
//! other worker to steal from or to wake, yet every task poll still pays for the
//! work-stealing queues and the scheduler's poll-time statistics. Measured with callgrind on
//! the benchmark's one-core layout, the current-thread scheduler runs a 20-event streaming
//! passthrough request in 4 % fewer instructions (50.3 k → 48.3 k) and relays a paced SSE
//! frame in about 1 k fewer, a tenth of its cost (654 k → 591 k per 64-frame request). One
//! CPU is the common case for a container with a CPU limit of 1 or less, which
//! `available_parallelism` reports.
//!
//! The current-thread scheduler has no LIFO slot: a task woken by the running one waits its
//! turn behind the other ready tasks. The pooled plain-HTTP path does not hand frames between
//! tasks (the serving task polls its upstream connection itself); over an HTTPS upstream,
//! whose connection tasks do, CPU per request and paced event delay measured level.

use std::ffi::OsString;
use std::num::NonZeroUsize;

use tokio::runtime::{Builder, Runtime, RuntimeFlavor};

/// The environment variable tokio itself reads for its worker count; honoured here so that
/// the usual knob keeps working, and checked so that a bad value is refused by name instead
/// of panicking inside tokio.
pub const WORKER_THREADS_VAR: &str = "TOKIO_WORKER_THREADS";

/// How the runtime was chosen, for the start-up log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workers {
    /// Worker threads; one means the current-thread scheduler.
    pub threads: NonZeroUsize,
    /// Set when the count came from [`WORKER_THREADS_VAR`], not from the CPUs available.
    pub from_env: bool,
}

impl Workers {
    /// The worker count: [`WORKER_THREADS_VAR`] when set, else the CPUs this process may use
    /// (its affinity mask and cgroup CPU quota included).
    pub fn from_env() -> Result<Workers, String> {
        Workers::choose(std::env::var_os(WORKER_THREADS_VAR), || {
            std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
        })
    }

    fn choose(
        var: Option<OsString>,
        available: impl FnOnce() -> NonZeroUsize,
    ) -> Result<Workers, String> {
        let Some(value) = var else {
            return Ok(Workers {
                threads: available(),
                from_env: false,
            });
        };
        value
            .to_str()
            .and_then(|text| text.trim().parse::<NonZeroUsize>().ok())
            .map(|threads| Workers {
                threads,
                from_env: true,
            })
            .ok_or_else(|| {
                format!(
                    "{WORKER_THREADS_VAR} must be a whole number of threads, 1 or more; got {value:?}"
                )
            })
    }

    /// The runtime, with I/O and timers enabled.
    pub fn build(self) -> std::io::Result<Runtime> {
        let mut builder = if self.threads.get() == 1 {
            Builder::new_current_thread()
        } else {
            let mut builder = Builder::new_multi_thread();
            builder.worker_threads(self.threads.get());
            builder
        };
        builder.enable_all().build()
    }
}

/// `"current-thread"` or `"multi-thread"`: the scheduler `runtime` was built with, for the
/// start-up log, read from the runtime itself so that the log cannot disagree with it.
pub fn scheduler(runtime: &Runtime) -> &'static str {
    match runtime.handle().runtime_flavor() {
        RuntimeFlavor::CurrentThread => "current-thread",
        _ => "multi-thread",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(threads: usize) -> NonZeroUsize {
        NonZeroUsize::new(threads).unwrap()
    }

    #[test]
    fn without_the_variable_the_available_cpus_decide() {
        let workers = Workers::choose(None, || n(3)).unwrap();
        assert_eq!(
            workers,
            Workers {
                threads: n(3),
                from_env: false
            }
        );
        let one = Workers::choose(None, || n(1)).unwrap();
        assert_eq!(one.threads, n(1));
    }

    #[test]
    fn the_variable_wins_over_the_cpus() {
        let workers = Workers::choose(Some(" 1 ".into()), || n(8)).unwrap();
        assert_eq!(
            workers,
            Workers {
                threads: n(1),
                from_env: true
            }
        );
        assert_eq!(
            Workers::choose(Some("4".into()), || n(1)).unwrap().threads,
            n(4)
        );
    }

    #[test]
    fn a_bad_value_is_refused_by_name() {
        for bad in ["0", "-1", "two", "", "1.5"] {
            let e = Workers::choose(Some(bad.into()), || n(2)).unwrap_err();
            assert!(e.starts_with("TOKIO_WORKER_THREADS must be"), "{e}");
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn one_thread_builds_the_current_thread_scheduler_and_both_run_tasks_and_timers() {
        for (threads, flavor, name) in [
            (1, RuntimeFlavor::CurrentThread, "current-thread"),
            (2, RuntimeFlavor::MultiThread, "multi-thread"),
        ] {
            let workers = Workers {
                threads: n(threads),
                from_env: true,
            };
            let runtime = workers.build().unwrap();
            assert_eq!(runtime.handle().runtime_flavor(), flavor);
            assert_eq!(runtime.metrics().num_workers(), threads);
            assert_eq!(scheduler(&runtime), name);
            let sum = runtime.block_on(async {
                let task = tokio::spawn(async {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    20
                });
                task.await.unwrap() + 22
            });
            assert_eq!(sum, 42);
        }
    }
}
