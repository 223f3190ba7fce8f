//! The kv739 C API as C and Python programs see it, against a live 3-server cluster.
//!
//! Each test compiles a program from `tests/c/` against `include/lib739kv.h` and the
//! `libkv739.so` built with this package, runs it with bounded time, and checks both what
//! the program reports and what the store holds afterwards.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use common::{
    assert_program_passed, compile_test_program, have_python3, lib_dir, line_channel, run_bounded,
    scratch, ChildGuard, Fixture,
};

/// Generous bound for a C test program: every call inside has its own 10 s deadline.
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn return_codes_old_values_and_rejected_arguments() {
    let fixture = Fixture::start(3);
    let dir = scratch();
    let exe = compile_test_program("api", dir.path());
    let client = fixture.client();
    let long = vec![b'x'; 3000];
    client
        .put(&b"foreign-long"[..], long)
        .expect("store a value too long for kv739");
    client
        .put(&b"foreign-binary"[..], &b"\x00\x01\xff"[..])
        .expect("store a value kv739 may not hold");

    let output = run_bounded(fixture.command(&exe).args(fixture.addrs()), PROGRAM_TIMEOUT);
    assert_program_passed("api", &output);

    // Puts that kv739 rejected must not have reached the store under any name; kv739 itself
    // cannot read these keys, so look with the Rust client.
    let long_key = "k".repeat(129);
    let rejected: [&[u8]; 10] = [
        b"before-init",
        b"api[open",
        b"api]close",
        long_key.as_bytes(),
        b"api\ttab",
        b"api\nnewline",
        b"api\x7fdel",
        b"api\xc3\xa9",
        b"api\x01",
        b"api-null",
    ];
    for key in rejected {
        let found = client
            .get(key.to_vec())
            .expect("read through the Rust client");
        assert!(
            found.is_none(),
            "rejected put of {:?} was stored",
            String::from_utf8_lossy(key)
        );
    }
    let value = client.get(&b"api-key"[..]).expect("read api-key");
    assert_eq!(value.as_deref(), Some(&b"fourth"[..]));
}

#[test]
fn eight_threads_read_back_their_own_keys_and_survive_shutdown() {
    let fixture = Fixture::start(3);
    let dir = scratch();
    let exe = compile_test_program("threads", dir.path());

    let output = run_bounded(
        fixture.command(&exe).arg("100").args(fixture.addrs()),
        PROGRAM_TIMEOUT,
    );
    assert_program_passed("threads", &output);

    // What the threads wrote is in the store for everyone, not just in their session.
    let client = fixture.client();
    for t in 0..8 {
        for k in [0, 57, 99] {
            let key = format!("thr{t}-key{k}");
            let want = format!("value of thread {t} key {k} round 2 {k:0200}");
            let got = client.get(key.clone()).expect("read back");
            assert_eq!(got.as_deref(), Some(want.as_bytes()), "{key}");
        }
    }
}

#[test]
fn every_server_down_fails_within_the_deadline() {
    const TIMEOUT_MS: u64 = 1500;
    const INIT_TIMEOUT_MS: u64 = 1000;
    // Scheduling slack on a loaded 2-core machine; a hang would blow far past it.
    const SLACK_MS: u64 = 1500;

    let mut fixture = Fixture::start(3);
    let dir = scratch();
    let exe = compile_test_program("deadline", dir.path());

    let mut child = ChildGuard::new(
        fixture
            .command(&exe)
            .args(fixture.addrs())
            .env("KV739_TIMEOUT_MS", TIMEOUT_MS.to_string())
            .env("KV739_INIT_TIMEOUT_MS", INIT_TIMEOUT_MS.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn deadline"),
    );
    let lines = line_channel(child.child().stdout.take().expect("stdout"));
    let ready = lines.recv_timeout(Duration::from_secs(30));
    assert_eq!(ready.as_deref(), Ok("ready"), "deadline did not get ready");

    fixture.cluster.kill_all();
    let started = Instant::now();
    let mut stdin = child.child().stdin.take().expect("stdin");
    writeln!(stdin, "go").expect("tell deadline to go");
    drop(stdin);

    let mut elapsed = Vec::new();
    let verdict = loop {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.starts_with("elapsed_ms ") => {
                let mut parts = line.split_whitespace().skip(1);
                let op = parts.next().expect("op").to_string();
                let ms: u64 = parts.next().expect("ms").parse().expect("ms is a number");
                elapsed.push((op, ms));
            }
            Ok(line) => break line,
            Err(RecvTimeoutError::Timeout) => panic!("deadline hung; so far: {elapsed:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("deadline died; so far: {elapsed:?}"),
        }
    };
    let status = child.wait(Duration::from_secs(10));
    let total = started.elapsed();
    assert!(
        status.success() && verdict == "deadline: all checks passed",
        "{verdict} ({status}); timings {elapsed:?}"
    );

    eprintln!("with every server down (ms): {elapsed:?}");
    let ops: Vec<&str> = elapsed.iter().map(|(op, _)| op.as_str()).collect();
    assert_eq!(ops, ["get", "put", "shutdown", "init"]);
    for (op, ms) in &elapsed {
        let bound = match op.as_str() {
            "get" | "put" => TIMEOUT_MS + SLACK_MS,
            "init" => INIT_TIMEOUT_MS + SLACK_MS,
            _ => SLACK_MS,
        };
        assert!(
            *ms <= bound,
            "{op} took {ms} ms with every server down (bound {bound} ms)"
        );
    }
    assert!(
        total <= Duration::from_millis(2 * TIMEOUT_MS + INIT_TIMEOUT_MS + 3 * SLACK_MS),
        "the whole sequence took {total:?}"
    );
}

#[test]
fn python_ctypes_loads_the_library() {
    if !have_python3() {
        eprintln!("SKIPPED python_ctypes_loads_the_library: python3 is not installed");
        return;
    }
    let fixture = Fixture::start(3);
    let script = common::crate_dir().join("tests/py/ctypes_api.py");
    let output = run_bounded(
        fixture
            .command("python3")
            .arg(script)
            .arg(lib_dir().join("libkv739.so"))
            .args(fixture.addrs()),
        PROGRAM_TIMEOUT,
    );
    assert_program_passed("ctypes", &output);
}

#[test]
fn a_wrong_token_or_no_user_reads_and_writes_nothing_within_the_deadline() {
    const TIMEOUT_MS: u64 = 3000;
    const INIT_TIMEOUT_MS: u64 = 2000;
    const SLACK_MS: u64 = 1500;
    let fixture = Fixture::start(3);
    let dir = scratch();
    let exe = compile_test_program("credentials", dir.path());
    let client = fixture.client();
    client
        .put(&b"credentials-key"[..], &b"the admin's"[..])
        .expect("store the admin's value");

    let wrong_token = |c: &mut std::process::Command| {
        c.env("REPLIKV_TOKEN", "0".repeat(64));
    };
    let no_user = |c: &mut std::process::Command| {
        c.env_remove("REPLIKV_USER")
            .env_remove("REPLIKV_TOKEN")
            .env_remove("REPLIKV_TOKEN_FILE");
    };
    for (case, strip) in [
        (
            "wrong token",
            &wrong_token as &dyn Fn(&mut std::process::Command),
        ),
        ("no user", &no_user),
    ] {
        let mut command = fixture.command(&exe);
        command
            .args(fixture.addrs())
            .env("KV739_TIMEOUT_MS", TIMEOUT_MS.to_string())
            .env("KV739_INIT_TIMEOUT_MS", INIT_TIMEOUT_MS.to_string());
        strip(&mut command);
        let output = run_bounded(&mut command, PROGRAM_TIMEOUT);
        assert_program_passed("credentials", &output);
        let stdout = String::from_utf8_lossy(&output.stdout);
        eprintln!("{case}: {}", stdout.trim().replace('\n', "; "));
        for line in stdout.lines().filter(|l| l.starts_with("elapsed_ms ")) {
            let mut parts = line.split_whitespace().skip(1);
            let op = parts.next().expect("op");
            let ms: u64 = parts.next().expect("ms").parse().expect("ms is a number");
            let bound = if op == "init" {
                INIT_TIMEOUT_MS + SLACK_MS
            } else {
                TIMEOUT_MS + SLACK_MS
            };
            assert!(ms <= bound, "{case}: {op} took {ms} ms (bound {bound} ms)");
        }
        let value = client.get(&b"credentials-key"[..]).expect("read it back");
        assert_eq!(
            value.as_deref(),
            Some(&b"the admin's"[..]),
            "{case}: the write without valid credentials changed the admin's key"
        );
    }
}
