//! The post-mortem path: `replikv-chaos --check-history` re-checks a saved history
//! and prints the window around a violation. No servers involved.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(30);

const HEADER: &str = "invoke_ns,complete_ns,kind,process,key,value,fate,found,result,detail";

/// Runs `replikv-chaos --check-history <path>`; returns whether it
/// passed and what it printed.
fn check_history(path: &Path) -> (bool, String) {
    let out_path = path.with_extension("out");
    let out = std::fs::File::create(&out_path).expect("output file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_replikv-chaos"))
        .arg("--check-history")
        .arg(path)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("output file"))
        .stderr(out)
        .spawn()
        .expect("start replikv-chaos");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the check did not finish within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    (status.success(), text)
}

fn write(dir: &Path, name: &str, rows: &[&str]) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut text = String::from(HEADER);
    for row in rows {
        text.push('\n');
        text.push_str(row);
    }
    text.push('\n');
    std::fs::write(&path, text).expect("write history");
    path
}

#[test]
fn a_linearizable_history_passes() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = write(
        dir.path(),
        "good.csv",
        &[
            "0,10,put,1,k,c1-1,ok,false,,",
            "5,8,nemesis,,,,,,,kill -9 server 0",
            "20,30,put,2,k,c2-1,unknown,,,timed out",
            "40,50,get,1,k,,ok,true,c2-1,",
            "60,70,put,1,k,c1-2,failed,,,unavailable",
            "80,90,get,2,k,,ok,true,c2-1,",
        ],
    );
    let (passed, text) = check_history(&path);
    assert!(passed, "{text}");
    assert!(
        text.contains("linearizable (4 ops: 3 ok, 1 unknown"),
        "{text}"
    );
}

#[test]
fn a_stale_read_fails_and_shows_its_window() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = write(
        dir.path(),
        "stale.csv",
        &[
            "0,10,put,1,k,c1-1,ok,false,,",
            "20,30,put,2,k,c2-1,ok,true,c1-1,",
            "40,50,get,3,k,,ok,true,c1-1,",
            "0,10,put,1,other,c1-9,ok,false,,",
        ],
    );
    let (passed, text) = check_history(&path);
    assert!(!passed, "{text}");
    assert!(text.contains("key \"k\": NOT linearizable"), "{text}");
    assert!(text.contains("> #2"), "the stale read is marked\n{text}");
    assert!(!text.contains("key \"other\": NOT"), "{text}");
}

#[test]
fn a_malformed_history_is_an_error_not_a_verdict() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = write(dir.path(), "bad.csv", &["0,10,frobnicate,1,k,,ok,false,,"]);
    let (passed, text) = check_history(&path);
    assert!(!passed);
    assert!(text.contains("line 2"), "{text}");
}
