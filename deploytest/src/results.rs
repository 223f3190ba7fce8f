//! `results/deploy/unavailability.csv`: how long writes stalled through each container fault,
//! with the command and the machine that measured it. Each test replaces its own rows.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::docker::repo_dir;

/// The CSV's columns.
const HEADER: &str = "event,container,write_unavailability_ms,acked_writes,unknown_writes,\
failed_writes,ip_before,ip_after,command,machine,date";

/// One measured event.
#[derive(Clone, Debug)]
pub struct Row {
    /// `kill-start`, `network-disconnect`, `rolling-restart`, ...
    pub event: String,
    /// The compose service the fault hit.
    pub container: String,
    /// The longest stretch without an acknowledged write, from the fault until the
    /// cluster served with every server again.
    pub unavailability: Duration,
    pub acked: usize,
    pub unknown: usize,
    pub failed: usize,
    pub ip_before: String,
    pub ip_after: String,
}

/// The file the rows go to.
pub fn path() -> PathBuf {
    repo_dir().join("results/deploy/unavailability.csv")
}

/// Prints `rows` and writes them to [`path`], replacing the rows of the same events.
pub fn record(rows: &[Row]) {
    let command = "cargo test -p replikv-deploytest --test compose_faults";
    let (machine, date) = (machine(), date());
    for r in rows {
        println!(
            "{} {}: writes unavailable for {} ms ({} acked, {} unknown, {} failed; ip {} -> {})",
            r.event,
            r.container,
            r.unavailability.as_millis(),
            r.acked,
            r.unknown,
            r.failed,
            r.ip_before,
            r.ip_after
        );
    }
    let file = path();
    std::fs::create_dir_all(file.parent().expect("results/deploy")).expect("results/deploy");
    let events: Vec<&str> = rows.iter().map(|r| r.event.as_str()).collect();
    let mut lines: Vec<String> = std::fs::read_to_string(&file)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| !events.contains(&l.split(',').next().unwrap_or_default()))
        .map(str::to_owned)
        .collect();
    lines.extend(rows.iter().map(|r| {
        [
            r.event.clone(),
            r.container.clone(),
            r.unavailability.as_millis().to_string(),
            r.acked.to_string(),
            r.unknown.to_string(),
            r.failed.to_string(),
            r.ip_before.clone(),
            r.ip_after.clone(),
            command.to_owned(),
            machine.clone(),
            date.clone(),
        ]
        .map(|f| quote(&f))
        .join(",")
    }));
    lines.sort();
    let text = std::iter::once(HEADER.to_owned())
        .chain(lines)
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&file, text + "\n").expect("write the results CSV");
}

fn quote(field: &str) -> String {
    if field.contains([',', '"', '\n']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

/// CPU model, cores and memory of this machine, with the Docker version.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, m)| m.trim())
        })
        .unwrap_or("unknown cpu")
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb / 1024 / 1024);
    let docker =
        output(Command::new("docker").args(["version", "--format", "{{.Server.Version}}"]));
    format!("{model}; {cores} cores; {mem_gib} GiB; docker {docker}")
}

fn date() -> String {
    output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))
}

fn output(command: &mut Command) -> String {
    command
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
