//! The forked workload: the kv739 C library in several processes through the faults.
//!
//! The nemesis' own clients are Rust sessions in its process. C and Python hosts use
//! replikv through `libkv739` instead, and they fork: a parent calls `kv739_init` and
//! `kv739_shutdown`, then forks workers that each start a session of their own. With
//! `--forked-workers K` a small C driver (`c/forked.c`, compiled with `cc` against the
//! committed header at the start of the run) does exactly that for the length of the run:
//! K forked workers put fresh keys of their own while the nemesis injects its faults,
//! recording each put that was acknowledged. After the run, once everything is healed, one
//! forked reader per server reads every recorded key back through kv739 on a session
//! bound to that server alone: each must hold exactly its value. Every call of every
//! process is timed against its deadline (`KV739_TIMEOUT_MS`, set to `--request-timeout`)
//! plus a scheduling slack; a call over it fails the run, and so does a process that
//! outlives its bound.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use replikv_testkit::process::ChildGuard;

use crate::BoxError;

/// The driver's source and the header it is compiled against.
const SOURCE: &str = include_str!("../c/forked.c");
const HEADER: &str = include_str!("../../client/ffi/include/lib739kv.h");
/// Longest a compilation of the driver may take.
const BUILD_LIMIT: Duration = Duration::from_secs(60);
/// Slack the driver allows each call beyond its deadline (`SLACK_MS` in the driver).
const CALL_SLACK: Duration = Duration::from_secs(3);
/// Bound on the run phase beyond the run length and one call: forking, the last calls,
/// shutting the sessions down.
const RUN_MARGIN: Duration = Duration::from_secs(30);
/// Bound on the read-back: this, plus 20 ms per acknowledged write.
const VERIFY_BASE: Duration = Duration::from_secs(60);
const VERIFY_PER_WRITE: Duration = Duration::from_millis(20);
/// How often a wait polls the driver.
const POLL: Duration = Duration::from_millis(100);
/// Lines of the driver's complaints quoted in a failed check.
const COMPLAINTS_SHOWN: usize = 10;

/// The verdict of one phase, for the run's checks.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub passed: bool,
    pub detail: String,
}

/// The compiled driver and where its workers record their acknowledged writes.
pub struct ForkedWorkload {
    driver: PathBuf,
    library: PathBuf,
    dir: PathBuf,
    workers: usize,
    call_timeout: Duration,
}

/// The run phase, under way; dropping it stops the driver and every worker.
pub struct Running {
    guard: ChildGuard,
    log: PathBuf,
    limit: Instant,
    workers: usize,
    call_timeout: Duration,
}

/// `libkv739.so` for the workers: `explicit`, else the one built next to this program
/// (its `deps/` directory first: cargo builds the library there and copies it up only on
/// a plain build of it, so the copy up may be stale).
pub fn locate_library(explicit: Option<&Path>) -> Result<PathBuf, BoxError> {
    if let Some(path) = explicit {
        if path.is_file() {
            return Ok(path.canonicalize()?);
        }
        return Err(format!("--kv739-lib {}: no such file", path.display()).into());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or("this program has no directory")?;
    [dir.join("deps/libkv739.so"), dir.join("libkv739.so")]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "libkv739.so is not in {} nor its deps/ directory: build it with \
                 `cargo build --release -p replikv-ffi` (or scripts/build-ffi.sh), or pass --kv739-lib",
                dir.display()
            )
            .into()
        })
}

impl ForkedWorkload {
    /// Compiles the driver into `dir` (created) with `$CC` or `cc`.
    pub fn build(
        dir: &Path,
        library: PathBuf,
        workers: usize,
        call_timeout: Duration,
    ) -> Result<Self, BoxError> {
        if !(1..=64).contains(&workers) {
            return Err("--forked-workers must be 1..64".into());
        }
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("forked.c"), SOURCE)?;
        std::fs::write(dir.join("lib739kv.h"), HEADER)?;
        let driver = dir.join("forked");
        let log = dir.join("build.log");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
        let mut command = Command::new(&cc);
        command
            .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-I"])
            .arg(dir)
            .arg(dir.join("forked.c"))
            .arg("-o")
            .arg(&driver)
            .arg("-ldl")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(&log)?);
        let spawned = command
            .spawn()
            .map_err(|e| format!("cannot run {cc} to build the forked workload: {e}"))?;
        let status = ChildGuard::new(spawned).wait_bounded(BUILD_LIMIT);
        if !status.is_some_and(|s| s.success()) {
            let errors = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(
                format!("building the forked workload failed ({status:?}):\n{errors}").into(),
            );
        }
        Ok(ForkedWorkload {
            driver,
            library,
            dir: dir.to_path_buf(),
            workers,
            call_timeout,
        })
    }

    /// The library the workers load.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// Starts the workers; they put keys for `run_for`.
    pub fn start(&self, run_for: Duration, addrs: &[String]) -> Result<Running, BoxError> {
        let log = self.dir.join("run.log");
        let seconds = run_for.as_secs().max(1);
        let mut command = self.command("run", &log)?;
        command.arg(seconds.to_string()).args(addrs);
        let guard = ChildGuard::spawn_group(&mut command)?;
        Ok(Running {
            guard,
            log,
            limit: Instant::now()
                + Duration::from_secs(seconds)
                + self.call_timeout
                + CALL_SLACK
                + RUN_MARGIN,
            workers: self.workers,
            call_timeout: self.call_timeout,
        })
    }

    /// Reads every acknowledged write back from every server in `addrs`.
    pub async fn verify(&self, addrs: &[String]) -> Outcome {
        let acknowledged = self.acknowledged();
        let log = self.dir.join("verify.log");
        let mut command = match self.command("verify", &log) {
            Ok(c) => c,
            Err(e) => return failed(e.to_string()),
        };
        command.args(addrs);
        let guard = match ChildGuard::spawn_group(&mut command) {
            Ok(g) => g,
            Err(e) => return failed(format!("cannot start the readers: {e}")),
        };
        let per_write =
            VERIFY_PER_WRITE.saturating_mul(u32::try_from(acknowledged).unwrap_or(u32::MAX));
        let limit = Instant::now() + VERIFY_BASE + per_write;
        let status = wait(guard, limit).await;
        let text = read(&log);
        let passed = verdict(status, &text);
        if passed && acknowledged > 0 {
            Outcome {
                passed,
                detail: format!(
                    "{acknowledged} writes acknowledged to {} forked workers read back from each of {} servers",
                    self.workers,
                    addrs.len()
                ),
            }
        } else if acknowledged == 0 {
            failed("no forked worker recorded an acknowledged write".into())
        } else {
            failed(complaints(status, &text, &log))
        }
    }

    /// Lines recorded in every worker's acknowledgement file.
    fn acknowledged(&self) -> usize {
        (0..self.workers)
            .map(|w| {
                read(&self.dir.join(format!("acks-{w}.txt")))
                    .lines()
                    .count()
            })
            .sum()
    }

    /// The driver in `mode`, its output to `log`.
    fn command(&self, mode: &str, log: &Path) -> Result<Command, BoxError> {
        let out = std::fs::File::create(log)?;
        let mut command = Command::new(&self.driver);
        command
            .arg(mode)
            .arg(&self.library)
            .arg(&self.dir)
            .arg(self.workers.to_string())
            .env(
                "KV739_TIMEOUT_MS",
                self.call_timeout.as_millis().to_string(),
            )
            .env(
                "KV739_INIT_TIMEOUT_MS",
                self.call_timeout.as_millis().to_string(),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        Ok(command)
    }
}

impl Running {
    /// Waits for the workers to finish (stopping them past their bound); whether every
    /// call kept its deadline, no fresh key had an old value, and every worker had some
    /// put acknowledged.
    pub async fn finish(self) -> Outcome {
        let log = self.log.clone();
        let status = wait(self.guard, self.limit).await;
        let text = read(&log);
        if !verdict(status, &text) {
            return failed(complaints(status, &text, &log));
        }
        let (mut acked, mut refused, mut slowest, mut workers) = (0, 0, 0, 0);
        for line in text.lines().filter(|l| l.starts_with("forked worker ")) {
            acked += field(line, "acknowledged");
            refused += field(line, "refused");
            slowest = slowest.max(field(line, "slowest_ms"));
            workers += 1;
        }
        if workers != self.workers {
            return failed(format!(
                "{workers} of {} workers reported (log {})",
                self.workers,
                log.display()
            ));
        }
        Outcome {
            passed: true,
            detail: format!(
                "{workers} workers: {acked} puts acknowledged, {refused} not; slowest call {slowest} ms (deadline {} ms)",
                self.call_timeout.as_millis()
            ),
        }
    }
}

/// The number after `name=` in a worker's report line (0 if absent).
fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Polls the driver until it exits or `limit` passes (then stops its process group).
async fn wait(mut guard: ChildGuard, limit: Instant) -> Option<ExitStatus> {
    loop {
        match guard.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= limit {
            guard.stop();
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

fn verdict(status: Option<ExitStatus>, text: &str) -> bool {
    status.is_some_and(|s| s.success()) && text.contains("forked: all checks passed")
}

/// What went wrong, from the driver's exit and its first complaints.
fn complaints(status: Option<ExitStatus>, text: &str, log: &Path) -> String {
    let ended = match status {
        Some(s) => format!("the driver ended with {s}"),
        None => "the driver did not finish within its bound and was stopped".to_string(),
    };
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("forked worker ") && !l.starts_with("forked reader "))
        .take(COMPLAINTS_SHOWN)
        .collect();
    format!("{ended} (log {}): {}", log.display(), lines.join("; "))
}

fn failed(detail: String) -> Outcome {
    Outcome {
        passed: false,
        detail,
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_report_adds_up_by_name() {
        let line = "forked worker 3: acknowledged=1840 refused=2 slowest_ms=2210";
        assert_eq!(field(line, "acknowledged"), 1840);
        assert_eq!(field(line, "refused"), 2);
        assert_eq!(field(line, "slowest_ms"), 2210);
        assert_eq!(field(line, "missing"), 0);
    }

    #[test]
    fn a_run_passes_only_on_exit_zero_and_the_drivers_verdict() {
        use std::os::unix::process::ExitStatusExt;
        let ok = Some(ExitStatus::from_raw(0));
        let failed = Some(ExitStatus::from_raw(1 << 8));
        assert!(verdict(ok, "forked: all checks passed\n"));
        assert!(!verdict(ok, "forked worker 0: acknowledged=1\n"));
        assert!(!verdict(failed, "forked: all checks passed\n"));
        assert!(!verdict(None, "forked: all checks passed\n"));
    }

    #[test]
    fn the_driver_compiles_against_the_committed_header() {
        let dir = tempfile::tempdir().unwrap();
        let built = ForkedWorkload::build(
            dir.path(),
            PathBuf::from("/nonexistent/libkv739.so"),
            2,
            Duration::from_secs(2),
        );
        assert!(built.is_ok(), "{:?}", built.err());
        assert!(dir.path().join("forked").is_file());
    }
}
