//! The open-files limit of the test process (Linux: read from `/proc`, raised with `prlimit`
//! from util-linux, since the crate has no direct binding to `setrlimit`).
//!
//! Tests that need thousands of descriptors call [`require_open_files`]: it raises the soft
//! limit up to the hard limit when it is too low and fails the test, with the reason, when it
//! cannot. Setting [`ALLOW_LOW_LIMIT`] to `1` turns that failure into a skip, for machines
//! where the limit cannot be raised and a smaller run is knowingly accepted.

use std::process::Command;

/// Environment variable that lets a test skip (pass) instead of failing when the open-files
/// limit cannot be raised far enough.
pub const ALLOW_LOW_LIMIT: &str = "OPENAI_STREAM_PROXY_TEST_ALLOW_LOW_FD_LIMIT";

/// Soft and hard open-files limits of a process (`u64::MAX` for unlimited); `pid` is a
/// number or `self`.
pub fn open_files_limits(pid: &str) -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut words = line.split_whitespace().skip(3);
    let parse = |w: Option<&str>| match w? {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    };
    Some((parse(words.next())?, parse(words.next())?))
}

/// Whether `prlimit` (util-linux) can be run.
pub fn has_prlimit() -> bool {
    Command::new("prlimit")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Makes this process's soft open-files limit at least `needed`, raising it (never past the
/// hard limit) with `prlimit --pid` when it is lower. Processes started afterwards inherit
/// it. `Err` says why it cannot.
pub fn ensure_open_files(needed: u64) -> Result<(), String> {
    let (soft, hard) =
        open_files_limits("self").ok_or("cannot read the open-files limit of this process")?;
    if soft >= needed {
        return Ok(());
    }
    if hard < needed {
        return Err(format!(
            "the open-files hard limit is {hard}, this test needs {needed} (raise it with \
             `ulimit -Hn` as root or in the service manager)"
        ));
    }
    if !has_prlimit() {
        return Err(format!(
            "the open-files soft limit is {soft}, this test needs {needed}, and prlimit \
             (util-linux) is not installed to raise it"
        ));
    }
    let hard = if hard == u64::MAX {
        "unlimited".to_owned()
    } else {
        hard.to_string()
    };
    let status = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={needed}:{hard}"))
        .status()
        .map_err(|e| format!("cannot run prlimit: {e}"))?;
    match open_files_limits("self") {
        Some((soft, _)) if soft >= needed => Ok(()),
        _ => Err(format!(
            "prlimit could not raise the open-files soft limit to {needed} ({status})"
        )),
    }
}

/// [`ensure_open_files`], as a test gate: `true` when the limit is (now) high enough;
/// `false`, with a note, when it is not and [`ALLOW_LOW_LIMIT`] is `1`; otherwise panics with
/// the reason and how to opt out.
pub fn require_open_files(needed: u64, test: &str) -> bool {
    let Err(why) = ensure_open_files(needed) else {
        return true;
    };
    if std::env::var(ALLOW_LOW_LIMIT).is_ok_and(|v| v == "1") {
        eprintln!("skipped ({ALLOW_LOW_LIMIT}=1): {test}: {why}");
        return false;
    }
    panic!(
        "{test} needs {needed} open files and the limit cannot be raised: {why}. \
         Set {ALLOW_LOW_LIMIT}=1 to skip this test knowingly."
    );
}
