//! Child-process guards: every process a test or tool starts is bounded in time and
//! killed and reaped when its guard is dropped, a panic included, so a failing run leaves
//! no stray process behind.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How often a bounded wait polls the child.
const POLL: Duration = Duration::from_millis(20);
/// How long a process group is given to stop on SIGTERM before it is killed.
const GROUP_GRACE: Duration = Duration::from_secs(5);

/// A child process that is killed and reaped when dropped.
///
/// A child spawned by [`ChildGuard::spawn_group`] leads a process group of its own:
/// dropping the guard asks the whole group to stop (SIGTERM, so a program that owns
/// servers can stop them) and kills the group after a grace period, so the grandchildren
/// (servers, forked workers) go too.
pub struct ChildGuard {
    child: Option<Child>,
    group: bool,
}

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        ChildGuard {
            child: Some(child),
            group: false,
        }
    }

    /// Spawns `command` as the leader of a new process group.
    pub fn spawn_group(command: &mut Command) -> std::io::Result<Self> {
        let child = command.process_group(0).spawn()?;
        Ok(ChildGuard {
            child: Some(child),
            group: true,
        })
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child not yet reaped")
    }

    /// Its exit status if it has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        let status = self.child().try_wait()?;
        if status.is_some() {
            self.child = None;
        }
        Ok(status)
    }

    /// Waits at most `timeout` for the exit; on timeout kills the child and panics.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        self.wait_bounded(timeout)
            .unwrap_or_else(|| panic!("child process still running after {timeout:?}"))
    }

    /// Waits at most `timeout` for the exit; `None` (the child, or its group, killed and
    /// reaped) if it did not exit in time.
    pub fn wait_bounded(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                self.stop();
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Stops the child (and its group) now and reaps it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if self.group {
            if matches!(child.try_wait(), Ok(Some(_))) {
                // The leader exited; whatever it started it stopped on its way out.
                return;
            }
            signal_group(&child, libc::SIGTERM);
            let deadline = Instant::now() + GROUP_GRACE;
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(POLL);
            }
            signal_group(&child, libc::SIGKILL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends `signal` to the process group `child` leads. Its pid cannot have been reused:
/// the leader is not reaped yet, or was reaped just now by the caller.
fn signal_group(child: &Child, signal: libc::c_int) {
    if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: killpg has no memory-safety preconditions.
        unsafe {
            libc::killpg(pgid, signal);
        }
    }
}

/// Runs `command` to completion within `timeout`, capturing its output; panics (having
/// killed it) if it runs longer.
pub fn run_bounded(command: &mut Command, timeout: Duration) -> Output {
    let mut guard = ChildGuard::new(
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
    );
    // Drained on threads so a chatty child cannot block on a full pipe.
    let stdout = drain(guard.child().stdout.take().expect("stdout"));
    let stderr = drain(guard.child().stderr.take().expect("stderr"));
    let status = guard.wait(timeout);
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Lines of a child's stdout, delivered on a channel so the test can wait for each with a
/// bound.
pub fn line_channel(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `target/<profile>` of a test binary, which runs from `target/<profile>/deps`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}
