//! The loadgen binary against real clusters: its servers run through the binary's own
//! hidden `server` subcommand, as `--spawn` starts them.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use replikv_testkit::{ClusterOptions, LocalCluster, ServerCommand};

const LOADGEN: &str = env!("CARGO_BIN_EXE_replikv-loadgen");
/// Whole-run budget: cluster start, preload, warm-up and a 2 s measurement, with room for a
/// debug build on a busy machine.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a stopped run may take to write its results and stop its servers.
const TERM_GRACE: Duration = Duration::from_secs(10);

/// The summary columns `loadgen/README.md` documents, in order.
const SUMMARY_COLUMNS: &[&str] = &[
    "run_id",
    "label",
    "started",
    "target",
    "servers",
    "server_addrs",
    "spawned",
    "sync",
    "route",
    "workload",
    "read_ratio",
    "scan_ratio",
    "scan_length",
    "keys",
    "value_size",
    "clients",
    "conns",
    "rate",
    "duration_s",
    "ops_limit",
    "warmup_s",
    "seed",
    "hot_keys",
    "hot_ops",
    "zipf",
    "preload",
    "request_timeout_s",
    "etcd_serializable",
    "redis_wait",
    "elapsed_s",
    "preload_s",
    "preload_errors",
    "interrupted",
    "ops",
    "ops_per_s",
    "errors",
    "unknown_outcomes",
    "requests",
    "retries",
    "get_not_found",
    "get_ops",
    "get_ops_per_s",
    "get_errors",
    "get_mean_us",
    "get_p50_us",
    "get_p90_us",
    "get_p99_us",
    "get_p999_us",
    "get_max_us",
    "put_ops",
    "put_ops_per_s",
    "put_errors",
    "put_mean_us",
    "put_p50_us",
    "put_p90_us",
    "put_p99_us",
    "put_p999_us",
    "put_max_us",
    "scan_ops",
    "scan_ops_per_s",
    "scan_errors",
    "scan_mean_us",
    "scan_p50_us",
    "scan_p90_us",
    "scan_p99_us",
    "scan_p999_us",
    "scan_max_us",
    "all_ops",
    "all_ops_per_s",
    "all_errors",
    "all_mean_us",
    "all_p50_us",
    "all_p90_us",
    "all_p99_us",
    "all_p999_us",
    "all_max_us",
];

const TIMELINE_COLUMNS: &[&str] = &[
    "run_id",
    "second",
    "interval_s",
    "ops",
    "ops_per_s",
    "get_ops",
    "put_ops",
    "scan_ops",
    "errors",
    "p50_us",
    "p90_us",
    "p99_us",
    "max_us",
];

/// A running loadgen process. Dropping it (a failed assertion included) sends SIGTERM, so
/// the loadgen stops the cluster it spawned, then SIGKILL if it does not exit in time.
struct Loadgen {
    child: Option<Child>,
}

impl Loadgen {
    fn start(args: &[&str]) -> Self {
        Self::start_with(args, Vec::new())
    }

    /// [`Loadgen::start`] with `env` set: how a run against servers it did not spawn gets
    /// their CA and credentials (`REPLIKV_CA`, `REPLIKV_USER`, `REPLIKV_TOKEN`).
    fn start_with(args: &[&str], env: Vec<(String, String)>) -> Self {
        let child = Command::new(LOADGEN)
            .args(args)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start replikv-loadgen");
        Loadgen { child: Some(child) }
    }

    /// Waits (bounded) for the run to end; returns its status and output.
    fn finish(mut self, timeout: Duration) -> (ExitStatus, String, String) {
        let mut child = self.child.take().expect("not finished yet");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("poll loadgen") {
                let output = child.wait_with_output().expect("collect output");
                return (
                    status,
                    String::from_utf8_lossy(&output.stdout).into_owned(),
                    String::from_utf8_lossy(&output.stderr).into_owned(),
                );
            }
            if Instant::now() >= deadline {
                stop(&mut child);
                let output = child.wait_with_output().expect("collect output");
                panic!(
                    "replikv-loadgen did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Loadgen {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child);
        }
    }
}

/// SIGTERM, a grace period, then SIGKILL; always reaps.
fn stop(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + TERM_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads a CSV into its header and rows of column -> value.
fn read_csv(path: &Path) -> (Vec<String>, Vec<HashMap<String, String>>) {
    let mut reader = csv::Reader::from_path(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    let rows = reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            header
                .iter()
                .cloned()
                .zip(r.iter().map(String::from))
                .collect()
        })
        .collect();
    (header, rows)
}

fn number(row: &HashMap<String, String>, column: &str) -> f64 {
    row[column]
        .parse()
        .unwrap_or_else(|_| panic!("{column} = {:?} is not a number", row[column]))
}

fn find_file(dir: &Path, suffix: &str) -> std::path::PathBuf {
    let found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one *{suffix} in {}: {found:?}",
        dir.display()
    );
    found.into_iter().next().unwrap()
}

#[test]
fn spawned_run_writes_the_documented_csvs_with_real_counts() {
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().to_str().unwrap();
    let run = Loadgen::start(&[
        "--spawn",
        "3",
        "--duration",
        "2s",
        "--warmup",
        "500ms",
        "--clients",
        "4",
        "--conns",
        "2",
        "--keys",
        "200",
        "--value-size",
        "64",
        "--out",
        out_dir,
        "--plot",
        "--quiet",
    ]);
    let (status, stdout, stderr) = run.finish(RUN_TIMEOUT);
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("replikv cluster of 3 servers"), "{stdout}");

    let (header, rows) = read_csv(&out.path().join("summary.csv"));
    assert_eq!(header, SUMMARY_COLUMNS);
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row["target"], "replikv");
    assert_eq!(row["servers"], "3");
    assert_eq!(row["spawned"], "true");
    assert_eq!(row["sync"], "always");
    assert_eq!(row["clients"], "4");
    assert_eq!(row["conns"], "2");
    assert_eq!(row["keys"], "200");
    assert_eq!(row["interrupted"], "false");
    assert_eq!(row["duration_s"], "2");
    assert!(number(row, "elapsed_s") >= 2.0);
    assert!(number(row, "get_ops") > 0.0, "{row:?}");
    assert!(number(row, "put_ops") > 0.0, "{row:?}");
    assert_eq!(
        number(row, "ops"),
        number(row, "get_ops") + number(row, "put_ops")
    );
    assert!(number(row, "ops_per_s") > 0.0);
    assert!(number(row, "all_p50_us") > 0.0);
    assert!(number(row, "all_p50_us") <= number(row, "all_p99_us"));
    assert!(number(row, "all_p99_us") <= number(row, "all_max_us"));
    assert!(number(row, "requests") >= number(row, "ops"));
    // Every key was written before measuring, so every get found a value.
    assert_eq!(number(row, "preload_errors"), 0.0);
    assert_eq!(number(row, "get_not_found"), 0.0);

    let timeline = find_file(out.path(), ".timeline.csv");
    let (header, seconds) = read_csv(&timeline);
    assert_eq!(header, TIMELINE_COLUMNS);
    assert!(seconds.len() >= 2, "{} rows", seconds.len());
    assert!(seconds.iter().all(|s| s["run_id"] == row["run_id"]));
    let timeline_ops: f64 = seconds.iter().map(|s| number(s, "ops")).sum();
    assert_eq!(
        timeline_ops,
        number(row, "ops"),
        "timeline adds up to the summary"
    );

    for suffix in [".throughput.png", ".latency.png"] {
        let png = std::fs::read(find_file(out.path(), suffix)).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
}

#[test]
fn a_short_scan_workload_counts_its_scans_in_the_csvs() {
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().to_str().unwrap();
    // YCSB workload E: 95 % short scans, the rest puts.
    let run = Loadgen::start(&[
        "--spawn",
        "3",
        "--duration",
        "2s",
        "--warmup",
        "500ms",
        "--clients",
        "4",
        "--keys",
        "500",
        "--value-size",
        "64",
        "--scan-ratio",
        "0.95",
        "--read-ratio",
        "0",
        "--scan-length",
        "20",
        "--out",
        out_dir,
        "--quiet",
    ]);
    let (status, stdout, stderr) = run.finish(RUN_TIMEOUT);
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let (header, rows) = read_csv(&out.path().join("summary.csv"));
    assert_eq!(header, SUMMARY_COLUMNS);
    let row = &rows[0];
    assert_eq!(row["scan_ratio"], "0.95");
    assert_eq!(row["scan_length"], "20");
    assert_eq!(number(row, "get_ops"), 0.0);
    assert_eq!(number(row, "errors"), 0.0, "{row:?}");
    let (scans, puts) = (number(row, "scan_ops"), number(row, "put_ops"));
    assert!(scans > 0.0 && puts > 0.0, "{row:?}");
    assert!(scans > 5.0 * puts, "{scans} scans, {puts} puts");
    assert_eq!(number(row, "ops"), scans + puts);
    assert!(number(row, "scan_p50_us") > 0.0);
    let (header, seconds) = read_csv(&find_file(out.path(), ".timeline.csv"));
    assert_eq!(header, TIMELINE_COLUMNS);
    let timeline_scans: f64 = seconds.iter().map(|s| number(s, "scan_ops")).sum();
    assert_eq!(timeline_scans, scans, "timeline adds up to the summary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_in_the_list_does_not_stop_the_run() {
    let mut cluster = LocalCluster::start(ClusterOptions {
        servers: 3,
        command: Some(ServerCommand::new(LOADGEN, vec!["server".into()])),
        ..ClusterOptions::default()
    })
    .expect("start cluster");
    let (primary, _) = cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("every server serves");
    let dead = (primary + 1) % 3;
    cluster.kill(dead).expect("kill a backup");
    let servers = cluster.addrs().join(",");

    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().to_str().unwrap().to_string();
    let args = [
        "--servers",
        &servers,
        "--duration",
        "2s",
        "--warmup",
        "1s",
        "--clients",
        "4",
        "--keys",
        "100",
        "--out",
        &out_dir,
        "--quiet",
    ];
    let env = cluster.client_env(cluster.admin_credentials().as_ref());
    let run = Loadgen::start_with(&args, env);
    let (status, stdout, stderr) = tokio::task::spawn_blocking(move || run.finish(RUN_TIMEOUT))
        .await
        .unwrap();
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );

    let (_, rows) = read_csv(&out.path().join("summary.csv"));
    let row = &rows[0];
    assert_eq!(row["servers"], "3");
    assert_eq!(row["spawned"], "false");
    assert!(number(row, "get_ops") > 0.0, "{row:?}");
    assert!(number(row, "put_ops") > 0.0, "{row:?}");
    assert_eq!(number(row, "preload_errors"), 0.0, "{row:?}");
    assert_eq!(number(row, "get_not_found"), 0.0, "{row:?}");
    drop(cluster);
}

#[test]
fn open_loop_run_issues_exactly_the_requested_operations_at_the_requested_rate() {
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().to_str().unwrap();
    let run = Loadgen::start(&[
        "--spawn",
        "1",
        "--rate",
        "200",
        "--ops",
        "100",
        "--warmup",
        "0s",
        "--clients",
        "2",
        "--keys",
        "50",
        "--workload",
        "zipf",
        "--out",
        out_dir,
        "--quiet",
    ]);
    let (status, stdout, stderr) = run.finish(RUN_TIMEOUT);
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let (_, rows) = read_csv(&out.path().join("summary.csv"));
    let row = &rows[0];
    assert_eq!(row["rate"], "200");
    assert_eq!(row["ops_limit"], "100");
    assert_eq!(row["duration_s"], "");
    assert_eq!(number(row, "ops") + number(row, "errors"), 100.0, "{row:?}");
    // 100 operations due at 200/s take half a second however fast the server answers
    // (less the two clients' half-interval head start).
    assert!(number(row, "elapsed_s") >= 0.45, "{row:?}");
}

#[test]
fn an_unreachable_cluster_fails_fast_with_a_clear_error() {
    // A port that was free a moment ago: nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = format!("127.0.0.1:{port}");
    let out = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let run = Loadgen::start(&[
        "--servers",
        &server,
        "--request-timeout",
        "1s",
        "--duration",
        "1s",
        "--out",
        out.path().to_str().unwrap(),
        "--quiet",
    ]);
    let (status, _, stderr) = run.finish(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not a single key could be written"),
        "{stderr}"
    );
    // One request deadline, not one per key.
    assert!(started.elapsed() < Duration::from_secs(15));
}
