//! A `BlockingClient` used in a forked child against a real three-server cluster.
//!
//! The client's runtime threads do not exist in a child of `fork`, so a call that waited on
//! them would hang forever, and a session copied into the child would share its id with the
//! parent's. The promise (see the `BlockingClient` docs): in a child, the first call
//! notices the fork and transparently builds a client of the child's own, with a fresh
//! session id; the inherited one is abandoned, never dropped, and every call stays within
//! its deadline.
//!
//! A test binary is multi-threaded, and after `fork` a child may only do what every thread
//! it lost left safe. So the forking runs in a helper process: this same binary, run again
//! with [`HELPER_ENV`] set, whose only threads are the test harness's main thread (waiting
//! on a channel, holding nothing), the clients' runtime threads and one writer thread of
//! the test's own, which is exactly what a C host forking with a live kv739 session looks
//! like.

use std::cell::RefCell;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replikv_client::{BlockingClient, ClientConfig};
use replikv_testkit::{ClusterOptions, LocalCluster};

/// Set (to the cluster's comma-separated addresses) in the helper process.
const HELPER_ENV: &str = "REPLIKV_FORK_TEST_SERVERS";
/// Per-request deadline of the clients in the helper.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Scheduling slack on a loaded 2-core machine; a hang blows far past it.
const SLACK: Duration = Duration::from_secs(3);
/// Children forked by the helper (one of them forks a grandchild too).
const CHILDREN: usize = 4;
/// Bound for the helper process as a whole.
const HELPER_TIMEOUT: Duration = Duration::from_secs(150);
/// A child that hangs is killed by SIGALRM after this, so the helper sees it fail.
const CHILD_ALARM_S: u32 = 60;

#[test]
fn blocking_client_used_after_fork_works_on_a_session_of_its_own() {
    if let Ok(servers) = std::env::var(HELPER_ENV) {
        helper(&servers);
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cluster = LocalCluster::start(ClusterOptions {
        servers: 3,
        ..Default::default()
    })
    .expect("start the servers (is replikv-server built?)");
    rt.block_on(cluster.wait_ready(Duration::from_secs(30)))
        .expect("the cluster elects a primary");

    let mut helper = Command::new(std::env::current_exe().unwrap());
    helper
        .args([
            "--exact",
            "blocking_client_used_after_fork_works_on_a_session_of_its_own",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, cluster.addrs().join(","))
        .envs(cluster.client_env(cluster.admin_credentials().as_ref()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = run_bounded(helper, HELPER_TIMEOUT);
    let stdout = String::from_utf8_lossy(&output.0);
    let stderr = String::from_utf8_lossy(&output.1);
    assert!(
        output.2 && stdout.contains("fork helper: all checks passed"),
        "the fork helper failed:\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    for line in stdout
        .lines()
        .filter_map(|l| l.find("child ").map(|at| &l[at..]))
    {
        eprintln!("{line}");
    }

    // What the children wrote is in the store, written once each.
    let reader = BlockingClient::connect(cluster.client_config()).unwrap();
    for name in child_names() {
        for k in 0..KEYS {
            let got = reader.get(format!("{name}-key{k}")).unwrap();
            assert_eq!(
                got.as_deref(),
                Some(format!("{name} value {k}").as_bytes()),
                "{name} key {k}"
            );
        }
    }
    assert_eq!(
        reader.get("fork-parent-after").unwrap().as_deref(),
        Some(&b"parent still works"[..])
    );
}

/// Keys each child writes.
const KEYS: usize = 10;

fn child_names() -> Vec<String> {
    let mut names: Vec<String> = (0..CHILDREN).map(|c| format!("fork-child{c}")).collect();
    names.push("fork-grandchild".into());
    names
}

/// Runs `command` to completion within `timeout` (killing it past that): stdout, stderr,
/// and whether it exited 0.
fn run_bounded(mut command: Command, timeout: Duration) -> (Vec<u8>, Vec<u8>, bool) {
    let mut child = command.spawn().expect("spawn the fork helper");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the fork helper still ran after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (out.join().unwrap(), err.join().unwrap(), status.success())
}

/// The helper process: a live client with a call in flight on another thread, forked
/// [`CHILDREN`] times.
fn helper(servers: &str) {
    let config = ClientConfig::new(servers.split(',')).with_request_timeout(REQUEST_TIMEOUT);
    let client = Arc::new(BlockingClient::connect(config.clone()).unwrap());
    client.wait_for_any(Duration::from_secs(10)).unwrap();
    assert_eq!(client.put("fork-parent", "before the fork").unwrap(), None);
    let parent_id = client.client().unwrap().client_id();
    // Clients the children inherit and drop: one they use first, one they never use.
    let used = RefCell::new(Some(BlockingClient::connect(config.clone()).unwrap()));
    let idle = RefCell::new(Some(BlockingClient::connect(config).unwrap()));
    let spares = Spares { used, idle };

    // Keeps a call of the parent's in flight as often as it can while the parent forks.
    let stop = Arc::new(AtomicBool::new(false));
    let busy_puts = Arc::new(AtomicU64::new(0));
    let writer = {
        let (client, stop, busy_puts) = (client.clone(), stop.clone(), busy_puts.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = busy_puts.fetch_add(1, Ordering::Relaxed);
                client.put("fork-parent-busy", format!("busy {n}")).unwrap();
            }
        })
    };

    let mut children = Vec::new();
    for c in 0..CHILDREN {
        let before = busy_puts.load(Ordering::Relaxed);
        let started = Instant::now();
        while busy_puts.load(Ordering::Relaxed) == before
            && started.elapsed() < Duration::from_millis(200)
        {
            std::thread::yield_now();
        }
        let name = format!("fork-child{c}");
        children.push(fork_child(|| child(&client, &spares, &name, c == 0)));
    }
    // The parent's own session is untouched by the forks.
    assert_eq!(
        client
            .put("fork-parent-after", "parent still works")
            .unwrap(),
        None
    );
    assert_eq!(client.client().unwrap().client_id(), parent_id);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();

    let mut ids = vec![parent_id.to_string()];
    let mut failures = 0;
    for (c, (pid, report)) in children.into_iter().enumerate() {
        let (ok, report) = reap(pid, report);
        println!("child {c}: {report}");
        failures += usize::from(!ok);
        ids.extend(report_ids(&report));
    }
    let count = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        count,
        "every process had a session id of its own"
    );
    assert_eq!(count, 2 + CHILDREN, "parent, children and the grandchild");
    assert_eq!(failures, 0, "every child passed");
    println!("fork helper: all checks passed");
}

/// Clients the parent holds besides the busy one, each taken and dropped by a child.
struct Spares {
    used: RefCell<Option<BlockingClient>>,
    idle: RefCell<Option<BlockingClient>>,
}

/// The `id=` fields of a child's report.
fn report_ids(report: &str) -> Vec<String> {
    report
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("id=").map(str::to_string))
        .collect()
}

/// What one child does with the inherited clients; returns its report (`ok ...` when
/// every check held).
fn child(client: &BlockingClient, spares: &Spares, name: &str, fork_again: bool) -> String {
    let mut report = String::new();
    let mut failed = false;
    let mut note = |ok: bool, what: String| {
        failed |= !ok;
        report.push_str(&what);
        report.push(' ');
    };
    let bound = REQUEST_TIMEOUT + SLACK;
    for k in 0..KEYS {
        let started = Instant::now();
        let result = client.put(format!("{name}-key{k}"), format!("{name} value {k}"));
        let took = started.elapsed();
        if result != Ok(None) || took > bound {
            note(false, format!("put{k}={result:?}/{took:?}"));
        }
    }
    let started = Instant::now();
    let parent = client.get("fork-parent");
    note(
        is_parent_value(&parent) && started.elapsed() < bound,
        format!("parent-key-read-in={:?}", started.elapsed()),
    );
    let id = client.client().unwrap().client_id();
    note(id != 0, format!("id={id}"));

    if fork_again {
        let (pid, report) = fork_child(|| child(client, spares, "fork-grandchild", false));
        let (ok, grandchild) = reap(pid, report);
        note(ok, format!("grandchild=[{grandchild}]"));
    }

    // Dropping an inherited client must not wait for the parent's runtime threads.
    let used = spares.used.take().expect("the parent's spare client");
    let started = Instant::now();
    let result = used.get("fork-parent");
    note(
        is_parent_value(&result) && started.elapsed() < bound,
        format!("spare-read-in={:?}", started.elapsed()),
    );
    for (what, spare) in [("used", used), ("idle", spares.idle.take().expect("idle"))] {
        let started = Instant::now();
        drop(spare);
        note(
            started.elapsed() < SLACK,
            format!("{what}-drop-took={:?}", started.elapsed()),
        );
    }
    if failed {
        format!("FAILED {report}")
    } else {
        format!("ok {report}")
    }
}

/// Whether a read of `fork-parent` returned what the parent wrote before forking.
fn is_parent_value(read: &Result<Option<bytes::Bytes>, replikv_client::Error>) -> bool {
    matches!(read, Ok(Some(v)) if v.as_ref() == b"before the fork")
}

/// Forks; the child runs `body` under an alarm, writes its report into a pipe and exits
/// (0 when the report starts with `ok`). Returns the child's pid and the pipe's read end.
fn fork_child(body: impl FnOnce() -> String) -> (libc::pid_t, File) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fds[0] and fds[1] are fresh descriptors that nothing else owns.
    let (read, mut write) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: the child runs only `body` (what the test examines) and then `_exit`s, never
    // returning into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        drop(read);
        // SAFETY: alarm(2) only arms a timer of this process.
        unsafe { libc::alarm(CHILD_ALARM_S) };
        let report = body();
        let _ = write.write_all(report.as_bytes());
        drop(write);
        // SAFETY: ends the child without running the harness's exit handlers.
        unsafe { libc::_exit(if report.starts_with("ok") { 0 } else { 1 }) };
    }
    drop(write);
    (pid, read)
}

/// Reads a child's report (EOF comes at its exit, at the latest when its alarm kills it)
/// and reaps it: whether it exited 0, and the report.
fn reap(pid: libc::pid_t, mut report: File) -> (bool, String) {
    let mut text = String::new();
    let _ = report.read_to_string(&mut text);
    let mut status = 0;
    // SAFETY: waits for our own child.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    let ok = waited == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if text.is_empty() {
        text = format!("no report (wait status {status:#x})");
    }
    (ok, text)
}
