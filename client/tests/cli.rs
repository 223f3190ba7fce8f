//! The `replikv` binary against fake servers: output and exit codes.

mod common;

use std::process::Output;
use std::time::Duration;

use common::{closed_addr, Call, FakeCluster, Reply};

/// Runs `replikv` with `args`, killing it if it runs past a generous bound.
async fn replikv(servers: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_replikv"));
    cmd.env("REPLIKV_SERVERS", servers)
        .env_remove("RUST_LOG")
        .args(["--timeout", "1s", "--attempt-timeout", "300ms"])
        .args(args)
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .expect("replikv did not exit in time")
        .expect("replikv runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn put_get_delete_print_values_and_old_values() {
    let fakes = FakeCluster::start(2, |_: &Call, _: &[String]| Reply::Serve).await;
    let servers = fakes.addrs().join(",");

    let out = replikv(&servers, &["put", "color", "blue"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "(none)\n");

    let out = replikv(&servers, &["put", "color", "green"]).await;
    assert_eq!(stdout(&out), "blue\n");

    let out = replikv(&servers, &["get", "color"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "green\n");

    let out = replikv(&servers, &["delete", "color"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "green\n");

    let out = replikv(&servers, &["get", "color"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out), "");
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
}

#[tokio::test]
async fn hex_mode_round_trips_arbitrary_bytes() {
    let fakes = FakeCluster::start(1, |_: &Call, _: &[String]| Reply::Serve).await;
    let servers = fakes.addrs().join(",");
    let out = replikv(&servers, &["--hex", "put", "00ff", "80fe0a"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = replikv(&servers, &["--hex", "get", "00ff"]).await;
    assert_eq!(stdout(&out), "80fe0a\n");
    assert_eq!(fakes.calls_of("get")[0].key.as_ref(), &[0x00, 0xff]);

    let out = replikv(&servers, &["--hex", "get", "xyz"]).await;
    assert_eq!(out.status.code(), Some(2), "bad hex is bad usage");
}

#[tokio::test]
async fn status_prints_one_row_per_server_with_down_ones_dashed() {
    let fakes = FakeCluster::start(2, |_: &Call, _: &[String]| Reply::Serve).await;
    let down = closed_addr();
    let mut addrs = fakes.addrs();
    addrs.push(down.clone());

    let out = replikv(&addrs.join(","), &["status"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 4, "{text}");
    assert_eq!(rows[0][..3], ["RANK", "ADDRESS", "STATE"]);
    assert_eq!(rows[1][..4], ["0", addrs[0].as_str(), "up", "primary"]);
    assert_eq!(rows[2][..4], ["1", addrs[1].as_str(), "up", "backup"]);
    assert_eq!(rows[3][..3], ["-", down.as_str(), "down"]);
    assert!(rows[3][3..].iter().all(|c| *c == "-"));
}

#[tokio::test]
async fn failures_exit_with_distinct_codes_and_one_line_errors() {
    let nobody = closed_addr();
    let out = replikv(&nobody, &["put", "k", "v"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.starts_with("replikv: unavailable"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    let out = replikv(&nobody, &["status"]).await;
    assert_eq!(out.status.code(), Some(3));

    let out = replikv("not-an-address", &["get", "k"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("not-an-address"));

    let out = replikv(&nobody, &["frobnicate"]).await;
    assert_eq!(out.status.code(), Some(2), "clap reports bad usage with 2");

    let out = replikv(&nobody, &["get", ""]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
