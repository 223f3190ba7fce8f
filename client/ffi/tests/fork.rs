//! kv739 in forked processes, from C and from Python (ctypes, `os.fork`), against a live
//! 3-server cluster.
//!
//! - Workers forked after the parent's init and shutdown each start a session of their
//!   own: no put fails on a healthy cluster and every acknowledged put is stored. (When
//!   every worker drew the same session id from a random generator state copied by fork,
//!   the servers answered one worker's writes with another's recorded results.)
//! - A session open across fork neither hangs the child (whose copy of the library's
//!   runtime has no threads) nor shares the parent's session: the child's calls work on a
//!   fresh session, and kv739_shutdown and kv739_init work in the child.
//!
//! Every call inside the programs is timed against its deadline, and each program as a
//! whole is killed, failing the test, past [`PROGRAM_TIMEOUT`].

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{
    assert_program_passed, compile_test_program, have_python3, lib_dir, run_bounded, scratch,
    Fixture,
};

/// Per-call deadline inside the programs: short, so a call that waits out its deadline
/// instead of working stands out, long enough for a debug-build cluster on 2 cores.
const TIMEOUT_MS: &str = "4000";
/// Bound for one whole program: 10 processes each with a few hundred calls.
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(200);
const WORKERS: usize = 10;
const KEYS: usize = 200;
const CHILD_KEYS: usize = 20;

fn run(command: &mut Command) -> Output {
    run_bounded(
        command
            .env("KV739_TIMEOUT_MS", TIMEOUT_MS)
            .env("KV739_INIT_TIMEOUT_MS", TIMEOUT_MS),
        PROGRAM_TIMEOUT,
    )
}

fn c_program(dir: &Path, mode: &str, tag: &str, fixture: &Fixture) -> Output {
    let exe = compile_test_program("fork", dir);
    run(fixture
        .command(exe)
        .arg(mode)
        .arg(tag)
        .args(fixture.addrs()))
}

fn python_program(mode: &str, tag: &str, fixture: &Fixture) -> Output {
    let script = common::crate_dir().join("tests/py/fork.py");
    run(fixture
        .command("python3")
        .arg(script)
        .arg(mode)
        .arg(lib_dir().join("libkv739.so"))
        .arg(tag)
        .args(fixture.addrs()))
}

/// Reads through a plain Rust client what `who` number `n` stored: `keys` keys, each with
/// the value the programs write.
fn assert_stored(fixture: &Fixture, tag: &str, who: &str, n: usize, keys: usize) {
    let client = fixture.client();
    for k in 0..keys {
        let key = format!("{tag}-{who}{n}-key{k}");
        let (kind, who) = who
            .strip_prefix("py")
            .map_or(("", who), |rest| ("py ", rest));
        let want = format!("value of {kind}{who} {n} key {k} in {tag}");
        let got = client.get(key.clone()).expect("read back");
        assert_eq!(got.as_deref(), Some(want.as_bytes()), "{key}");
    }
}

/// How many workers reported every put acknowledged (counted as occurrences: the
/// workers' writes to the shared stdout pipe may interleave).
fn workers_all_acknowledged(output: &Output) -> usize {
    String::from_utf8_lossy(&output.stdout)
        .matches(&format!("{KEYS} puts acknowledged, 0 returned -1"))
        .count()
}

#[test]
fn c_workers_forked_after_shutdown_each_keep_every_write() {
    let fixture = Fixture::start(3);
    let dir = scratch();
    let output = c_program(dir.path(), "workers", "cw", &fixture);
    assert_program_passed("fork", &output);
    assert_eq!(
        workers_all_acknowledged(&output),
        WORKERS,
        "every worker reported success"
    );
    for w in 0..WORKERS {
        assert_stored(&fixture, "cw", "worker", w, KEYS);
    }
}

#[test]
fn c_session_open_across_fork_works_in_the_children() {
    let fixture = Fixture::start(3);
    let dir = scratch();
    let output = c_program(dir.path(), "inherit", "ci", &fixture);
    assert_program_passed("fork", &output);
    assert_stored(&fixture, "ci", "parent", 0, CHILD_KEYS);
    for c in 0..WORKERS {
        assert_stored(&fixture, "ci", "child", c, CHILD_KEYS);
    }
}

#[test]
fn python_workers_forked_after_shutdown_each_keep_every_write() {
    if !have_python3() {
        eprintln!("SKIPPED: python3 is not installed");
        return;
    }
    let fixture = Fixture::start(3);
    let output = python_program("workers", "pw", &fixture);
    assert_program_passed("pyfork", &output);
    assert_eq!(
        workers_all_acknowledged(&output),
        WORKERS,
        "every worker reported success"
    );
    for w in 0..WORKERS {
        assert_stored(&fixture, "pw", "pyworker", w, KEYS);
    }
}

#[test]
fn python_session_open_across_fork_works_in_the_children() {
    if !have_python3() {
        eprintln!("SKIPPED: python3 is not installed");
        return;
    }
    let fixture = Fixture::start(3);
    let output = python_program("inherit", "pi", &fixture);
    assert_program_passed("pyfork", &output);
    assert_stored(&fixture, "pi", "pyparent", 0, CHILD_KEYS);
    for c in 0..WORKERS {
        assert_stored(&fixture, "pi", "pychild", c, CHILD_KEYS);
    }
}
