//! The file-driven driver (`driver/kv739-driver.c`) on inputs from `scripts/gen_input.py`,
//! against a live cluster: every output line must be what a sequential store would answer,
//! and afterwards the store must hold the last value put to each key, also when the
//! primary is killed in the middle of the run.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    compile_c, crate_dir, have_python3, program, run_bounded, scratch, ChildGuard, Fixture,
};

/// Bound for one driver run; each call inside has its own 10 s deadline.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(300);

/// Writes a generated input file for `servers` and returns its path.
/// `extra` holds further gen_input.py arguments, separated by whitespace.
fn generate(dir: &Path, servers: &[String], extra: &str) -> PathBuf {
    let input = dir.join("input.txt");
    let script = crate_dir().join("../../scripts/gen_input.py");
    let output = run_bounded(
        program("python3")
            .arg(script)
            .arg("--servers")
            .arg(servers.join(","))
            .args(extra.split_whitespace())
            .arg("-o")
            .arg(&input),
        Duration::from_secs(60),
    );
    assert!(
        output.status.success(),
        "gen_input.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    input
}

fn compile_driver(dir: &Path) -> PathBuf {
    compile_c(
        "kv739-driver",
        &[crate_dir().join("driver/kv739-driver.c")],
        dir,
    )
}

/// What a run showed: the final value of every key that was put, and the latency of each
/// get and put in input order.
struct Run {
    last_put: HashMap<String, String>,
    latencies_us: Vec<u64>,
}

/// Checks the driver's output against its input line by line, replaying the operations on
/// a map: with one sequential client, a linearizable store must answer exactly as the map
/// does. Every get and put must succeed (rc 0 or 1, never -1).
fn check_output(input: &str, output: &str) -> Run {
    let ops: Vec<&str> = input
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let (summary, results): (Vec<&str>, Vec<&str>) =
        output.lines().partition(|l| l.starts_with('#'));
    assert_eq!(
        ops.len(),
        results.len(),
        "one output line per input line expected"
    );

    let mut model: HashMap<String, String> = HashMap::new();
    let mut latencies_us = Vec::new();
    for (n, (op, result)) in ops.iter().zip(&results).enumerate() {
        let line = n + 1;
        let fields: Vec<&str> = result.split(',').collect();
        let latency = fields.last().expect("latency field");
        let latency_us: u64 = latency
            .parse()
            .unwrap_or_else(|_| panic!("line {line}: latency {latency:?} in {result:?}"));
        let (rc, rest) = (fields[0], &fields[1..fields.len() - 1]);
        match op.split(',').collect::<Vec<_>>().as_slice() {
            ["init", ..] | ["shutdown"] => {
                assert_eq!((rc, rest.len()), ("0", 0), "line {line}: {op} -> {result}");
            }
            ["get", key] => {
                latencies_us.push(latency_us);
                match model.get(*key) {
                    Some(v) => assert_eq!(
                        (rc, rest),
                        ("0", &[*key, v.as_str()][..]),
                        "line {line}: {op}"
                    ),
                    None => assert_eq!((rc, rest), ("1", &[*key, ""][..]), "line {line}: {op}"),
                }
            }
            ["put", key, value] => {
                latencies_us.push(latency_us);
                let want = match model.get(*key) {
                    Some(old) => ("0", vec![*key, *value, old.as_str()]),
                    None => ("1", vec![*key, *value, ""]),
                };
                assert_eq!((rc, rest.to_vec()), want, "line {line}: {op}");
                model.insert(key.to_string(), value.to_string());
            }
            other => panic!("line {line}: unexpected input {other:?}"),
        }
    }

    let data_ops = latencies_us.len();
    assert_eq!(summary.len(), 1, "one summary line: {summary:?}");
    assert!(
        summary[0].starts_with(&format!("# ops={data_ops} errors=0 ")),
        "summary {:?} for {data_ops} successful operations",
        summary[0]
    );
    for field in ["wall_s=", "throughput_ops_s=", "p50_us=", "p99_us="] {
        assert!(summary[0].contains(field), "summary lacks {field}");
    }
    Run {
        last_put: model,
        latencies_us,
    }
}

/// The store, read through another client, holds the last value put to every key.
fn assert_store_holds(fixture: &Fixture, run: &Run) {
    let client = fixture.client();
    for (key, value) in &run.last_put {
        let got = client.get(key.clone()).expect("read back");
        assert_eq!(got.as_deref(), Some(value.as_bytes()), "key {key}");
    }
}

#[test]
fn driver_output_matches_the_store() {
    if !have_python3() {
        eprintln!("SKIPPED driver_output_matches_the_store: python3 is not installed");
        return;
    }
    let fixture = Fixture::start(3);
    let dir = scratch();
    let input = generate(
        dir.path(),
        &fixture.addrs(),
        "--ops 600 --keys 40 --dist hot --get-ratio 0.5 --value-len 300 --key-len 24 --seed 739",
    );
    let driver = compile_driver(dir.path());
    let out = dir.path().join("output.txt");

    let result = run_bounded(
        fixture.command(&driver).arg(&input).arg(&out),
        DRIVER_TIMEOUT,
    );
    assert!(
        result.status.success(),
        "driver failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let run = check_output(
        &std::fs::read_to_string(&input).expect("input"),
        &std::fs::read_to_string(&out).expect("output"),
    );
    assert_eq!(run.latencies_us.len(), 600);
    assert!(!run.last_put.is_empty());
    assert_store_holds(&fixture, &run);
    // The summary also goes to stdout, for people running the driver by hand.
    assert!(String::from_utf8_lossy(&result.stdout).starts_with("# ops=600 errors=0 "));

    // The base-port form of init: one server at localhost:<its port> sees the same data.
    let (key, value) = run.last_put.iter().next().expect("some key was put");
    let port = fixture
        .cluster
        .addr(1)
        .rsplit_once(':')
        .expect("host:port")
        .1
        .to_string();
    let input = dir.path().join("base-port.txt");
    std::fs::write(&input, format!("init,{port},1\nget,{key}\nshutdown\n")).expect("write");
    let result = run_bounded(
        fixture.command(&driver).arg(&input).arg(&out),
        DRIVER_TIMEOUT,
    );
    assert!(result.status.success());
    let output = std::fs::read_to_string(&out).expect("output");
    let lines: Vec<&str> = output.lines().collect();
    assert!(
        lines[0].starts_with("0,"),
        "init,{port},1 gave {}",
        lines[0]
    );
    assert!(
        lines[1].starts_with(&format!("0,{key},{value},")),
        "get through localhost:{port} gave {}",
        lines[1]
    );
    assert!(lines[2].starts_with("0,"), "shutdown gave {}", lines[2]);
}

#[test]
fn killing_the_primary_mid_run_costs_only_latency() {
    const OPS: usize = 3000;
    if !have_python3() {
        eprintln!(
            "SKIPPED killing_the_primary_mid_run_costs_only_latency: python3 is not installed"
        );
        return;
    }
    let mut fixture = Fixture::start(3);
    let primary = fixture.wait_for_primary();
    let dir = scratch();
    let input = generate(
        dir.path(),
        &fixture.addrs(),
        &format!("--ops {OPS} --keys 100 --get-ratio 0.5 --seed 42"),
    );
    let driver = compile_driver(dir.path());
    let out = dir.path().join("output.txt");
    let mut child = ChildGuard::new(
        fixture
            .command(&driver)
            .arg(&input)
            .arg(&out)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn the driver"),
    );

    // The driver writes its output line by line: kill the primary a third of the way in.
    let lines_done =
        || std::fs::read(&out).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count());
    let deadline = Instant::now() + DRIVER_TIMEOUT;
    while lines_done() < OPS / 3 {
        assert!(
            child.child().try_wait().expect("try_wait").is_none(),
            "driver ended before the kill"
        );
        assert!(
            Instant::now() < deadline,
            "driver too slow to reach the kill point"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    fixture.cluster.kill(primary).expect("kill the primary");
    let at_kill = lines_done();

    let status = child.wait(DRIVER_TIMEOUT);
    assert!(status.success(), "driver exited with {status}");
    let run = check_output(
        &std::fs::read_to_string(&input).expect("input"),
        &std::fs::read_to_string(&out).expect("output"),
    );
    assert_eq!(run.latencies_us.len(), OPS);
    // init + OPS operations + shutdown lines precede the summary.
    let after_kill = OPS + 2 - at_kill;
    assert!(
        after_kill >= OPS / 2,
        "only {after_kill} operations ran after the kill"
    );
    // Output line n (1-based) is operation n - 1 after the init line.
    let worst_after_kill = run.latencies_us[at_kill.saturating_sub(2)..]
        .iter()
        .max()
        .copied()
        .unwrap_or(0);
    eprintln!("kill after {at_kill} lines; worst latency after it: {worst_after_kill} us");
    // The survivors elected a new primary, and it holds every acknowledged write.
    let new_primary = fixture.wait_for_primary();
    assert_ne!(new_primary, primary);
    assert_store_holds(&fixture, &run);
}

/// Runs gen_input.py with `args` (whitespace-separated; no init or shutdown line) and returns
/// its lines.
fn generated_ops(args: &str) -> Vec<String> {
    let script = crate_dir().join("../../scripts/gen_input.py");
    let output = run_bounded(
        program("python3")
            .arg(script)
            .args(["--no-init", "--no-shutdown"])
            .args(args.split_whitespace()),
        Duration::from_secs(60),
    );
    assert!(
        output.status.success(),
        "gen_input.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("ASCII output")
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn gen_input_shapes_the_workload_it_is_asked_for() {
    if !have_python3() {
        eprintln!(
            "SKIPPED gen_input_shapes_the_workload_it_is_asked_for: python3 is not installed"
        );
        return;
    }
    let hot =
        "--ops 20000 --keys 100 --dist hot --get-ratio 0.8 --key-len 10 --value-len 50 --seed 5";
    let ops = generated_ops(hot);
    assert_eq!(ops.len(), 20000);
    assert_eq!(ops, generated_ops(hot), "same seed, same file");

    let key_index = |line: &str| -> usize {
        let key = line.split(',').nth(1).expect("key");
        assert_eq!(key.len(), 10, "{key}");
        key.trim_start_matches('k')
            .trim_end_matches('_')
            .parse()
            .expect("k<index>___ key")
    };
    let share = |lines: &[String], pred: &dyn Fn(&str) -> bool| {
        lines.iter().filter(|l| pred(l)).count() as f64 / lines.len() as f64
    };
    // 10 % of the keys (k0..k9) receive 90 % of the operations.
    let hot_share = share(&ops, &|l| key_index(l) < 10);
    assert!((0.88..=0.92).contains(&hot_share), "hot share {hot_share}");
    let gets = share(&ops, &|l| l.starts_with("get,"));
    assert!((0.78..=0.82).contains(&gets), "get share {gets}");
    for put in ops.iter().filter(|l| l.starts_with("put,")) {
        let value = put.splitn(3, ',').nth(2).expect("value");
        assert_eq!(value.len(), 50);
        assert!(value
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && !b"[],".contains(&b)));
    }

    let uniform = generated_ops("--ops 20000 --keys 100 --key-len 10 --seed 5");
    let low_share = share(&uniform, &|l| key_index(l) < 10);
    assert!(
        (0.08..=0.12).contains(&low_share),
        "uniform share {low_share}"
    );
    assert_ne!(uniform, ops);
}
