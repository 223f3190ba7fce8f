//! The forked kv739 workload through faults, briefly: `replikv-chaos --forked-workers`
//! compiles its C driver, which loads the `libkv739.so` built with these tests, calls
//! `kv739_init` and `kv739_shutdown` in its parent and forks workers that each start a
//! session of their own and put keys of their own while the nemesis kills, pauses and
//! isolates servers. The run must pass every check: in particular no kv739 call took
//! longer than its deadline (plus slack), and every write a worker saw acknowledged reads
//! back from every server once everything is healed. A lost write or a hung call fails
//! the run; a driver that outlives its bound is stopped and fails it too.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use replikv_testkit::process::ChildGuard;

/// Run length: a few fault rounds.
const DURATION: &str = "15s";
/// Bound on the whole run: start-up, the run, healing, the read-back and the checks.
const RUN_LIMIT: Duration = Duration::from_secs(75);
const WORKERS: &str = "4";

/// The `libkv739.so` built from this very source, as a dependency of these tests, next
/// to the test binary (`target/<profile>/deps`).
fn libkv739() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let lib = exe
        .parent()
        .expect("test binary has a directory")
        .join("libkv739.so");
    assert!(lib.is_file(), "{} not built", lib.display());
    lib
}

/// The number before `word` on the line that starts with `prefix` (indentation aside).
fn number_before(text: &str, prefix: &str, word: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(prefix))
        .unwrap_or_else(|| panic!("no line with {prefix:?}\n{text}"));
    let before = &line[..line
        .find(word)
        .unwrap_or_else(|| panic!("{word:?} in {line}"))];
    before
        .split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a number before {word:?} in {line}"))
}

fn run_chaos(dir: &Path) -> (bool, String) {
    let output_path = dir.join("output.txt");
    let output = std::fs::File::create(&output_path).expect("output file");
    // The nemesis leads a process group with its servers and the driver: dropping the
    // guard (a failed assertion, a timeout) stops the whole group.
    let mut run = ChildGuard::spawn_group(
        Command::new(env!("CARGO_BIN_EXE_replikv-chaos"))
            .args(["--spawn", "3", "--duration", DURATION, "--clients", "4"])
            .args(["--faults", "kill,pause,isolate-primary"])
            .args(["--hold-max", "2s", "--settle", "1s"])
            .args(["--forked-workers", WORKERS])
            .arg("--kv739-lib")
            .arg(libkv739())
            .arg("--base-dir")
            .arg(dir.join("cluster"))
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("output file"))
            .stderr(output),
    )
    .expect("start replikv-chaos");
    let status = run.wait_bounded(RUN_LIMIT);
    let text = std::fs::read_to_string(&output_path).unwrap_or_default();
    match status {
        Some(s) => (s.success(), text),
        None => (
            false,
            format!("did not finish within {RUN_LIMIT:?}\n{text}"),
        ),
    }
}

#[test]
fn forked_kv739_workers_keep_every_acknowledged_write_and_every_deadline_through_faults() {
    let dir = tempfile::Builder::new()
        .prefix("replikv-chaos-forked-")
        .tempdir()
        .expect("temporary directory");
    let (passed, text) = run_chaos(dir.path());
    if !passed {
        let kept = dir.keep();
        panic!(
            "the forked run failed; files kept in {}\n{text}",
            kept.display()
        );
    }
    assert!(text.contains("chaos: PASS"), "{text}");
    assert!(
        text.contains("[ok  ] forked kv739 workers: every call within its deadline"),
        "{text}"
    );
    assert!(
        text.contains("[ok  ] no write acknowledged to a forked kv739 worker lost"),
        "{text}"
    );
    // The checks ran on real work: faults were injected while the workers wrote, and
    // what they recorded was read back.
    let rounds = number_before(&text, "nemesis: ", "rounds");
    assert!(rounds >= 1, "no fault was injected\n{text}");
    let acknowledged = number_before(&text, "[ok  ] forked kv739 workers:", "puts acknowledged");
    let read_back = number_before(
        &text,
        "[ok  ] no write acknowledged to a forked kv739 worker lost",
        "writes acknowledged",
    );
    assert!(
        acknowledged >= 100,
        "only {acknowledged} puts acknowledged\n{text}"
    );
    assert_eq!(acknowledged, read_back, "{text}");
}
