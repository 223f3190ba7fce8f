//! Results on disk: the per-second timeline CSV of one run and the summary CSV that gets one
//! row per run. Every column is documented in `loadgen/README.md` (a test keeps the two in
//! step).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use thiserror::Error;

use crate::runner::{OpStats, RunReport, Stop};

#[derive(Debug, Error)]
pub enum OutputError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Csv {
        path: PathBuf,
        #[source]
        source: csv::Error,
    },
    #[error(
        "{path} has different columns than this version writes; \
         pass another --summary file or move the old one away"
    )]
    HeaderMismatch { path: PathBuf },
}

/// Every parameter of a run, as it goes into the summary row.
#[derive(Clone, Debug)]
pub struct RunParams {
    pub run_id: String,
    /// `--label`: a name for the run's row in comparisons; empty when not given.
    pub label: String,
    /// RFC 3339 time the run started.
    pub started: String,
    pub target: String,
    pub servers: usize,
    pub server_addrs: Vec<String>,
    /// The servers were started by this run (`--spawn`).
    pub spawned: bool,
    /// replikv `--sync` mode of a spawned cluster; empty when unknown (given servers, peers).
    pub sync: String,
    pub route: String,
    pub workload: String,
    pub read_ratio: f64,
    pub scan_ratio: f64,
    pub scan_length: u32,
    pub keys: u64,
    pub value_size: usize,
    pub clients: usize,
    /// `--conns`: connection sets the clients share (0: one per client).
    pub conns: usize,
    pub rate: Option<f64>,
    pub stop: Stop,
    pub warmup_s: f64,
    pub seed: u64,
    pub hot_keys: f64,
    pub hot_ops: f64,
    pub zipf: f64,
    pub preload: bool,
    pub request_timeout_s: f64,
    pub etcd_serializable: bool,
    pub redis_wait: u32,
}

fn opt<T: ToString>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

fn rate(value: f64) -> String {
    format!("{value:.1}")
}

/// The quantile in microseconds, or empty when nothing was recorded (0 would read as a
/// real, impossibly fast latency).
fn quantile(h: &Histogram<u64>, q: f64) -> String {
    if h.is_empty() {
        String::new()
    } else {
        h.value_at_quantile(q).to_string()
    }
}

fn max(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        String::new()
    } else {
        h.max().to_string()
    }
}

/// The summary row: `(column, value)` in column order.
pub fn summary_columns(params: &RunParams, report: &RunReport) -> Vec<(&'static str, String)> {
    let all = report.all();
    let (duration_s, ops_limit) = match params.stop {
        Stop::Duration(d) => (Some(d.as_secs_f64()), None),
        Stop::Ops(n) => (None, Some(n)),
    };
    let mut columns = vec![
        ("run_id", params.run_id.clone()),
        ("label", params.label.clone()),
        ("started", params.started.clone()),
        ("target", params.target.clone()),
        ("servers", params.servers.to_string()),
        ("server_addrs", params.server_addrs.join(" ")),
        ("spawned", params.spawned.to_string()),
        ("sync", params.sync.clone()),
        ("route", params.route.clone()),
        ("workload", params.workload.clone()),
        ("read_ratio", params.read_ratio.to_string()),
        ("scan_ratio", params.scan_ratio.to_string()),
        ("scan_length", params.scan_length.to_string()),
        ("keys", params.keys.to_string()),
        ("value_size", params.value_size.to_string()),
        ("clients", params.clients.to_string()),
        ("conns", params.conns.to_string()),
        ("rate", opt(params.rate)),
        ("duration_s", opt(duration_s)),
        ("ops_limit", opt(ops_limit)),
        ("warmup_s", params.warmup_s.to_string()),
        ("seed", params.seed.to_string()),
        ("hot_keys", params.hot_keys.to_string()),
        ("hot_ops", params.hot_ops.to_string()),
        ("zipf", params.zipf.to_string()),
        ("preload", params.preload.to_string()),
        ("request_timeout_s", params.request_timeout_s.to_string()),
        ("etcd_serializable", params.etcd_serializable.to_string()),
        ("redis_wait", params.redis_wait.to_string()),
        ("elapsed_s", format!("{:.3}", report.elapsed.as_secs_f64())),
        (
            "preload_s",
            format!("{:.3}", report.preload_time.as_secs_f64()),
        ),
        ("preload_errors", report.preload_errors.to_string()),
        ("interrupted", report.interrupted.to_string()),
        ("ops", all.ok().to_string()),
        ("ops_per_s", rate(report.throughput(&all))),
        ("errors", all.errors.to_string()),
        ("unknown_outcomes", all.unknown.to_string()),
        ("requests", report.stats.requests.to_string()),
        ("retries", report.stats.retries.to_string()),
        ("get_not_found", report.get.not_found.to_string()),
    ];
    let ops = [
        ("get", &report.get),
        ("put", &report.put),
        ("scan", &report.scan),
        ("all", &all),
    ];
    for (prefix, stats) in ops {
        columns.extend(op_columns(prefix, stats, report));
    }
    columns
}

fn op_columns(prefix: &str, stats: &OpStats, report: &RunReport) -> Vec<(&'static str, String)> {
    // Column names are 'static so the header is a constant list; the three prefixes are
    // spelled out once here.
    let names: [&'static str; 9] = match prefix {
        "get" => [
            "get_ops",
            "get_ops_per_s",
            "get_errors",
            "get_mean_us",
            "get_p50_us",
            "get_p90_us",
            "get_p99_us",
            "get_p999_us",
            "get_max_us",
        ],
        "put" => [
            "put_ops",
            "put_ops_per_s",
            "put_errors",
            "put_mean_us",
            "put_p50_us",
            "put_p90_us",
            "put_p99_us",
            "put_p999_us",
            "put_max_us",
        ],
        "scan" => [
            "scan_ops",
            "scan_ops_per_s",
            "scan_errors",
            "scan_mean_us",
            "scan_p50_us",
            "scan_p90_us",
            "scan_p99_us",
            "scan_p999_us",
            "scan_max_us",
        ],
        _ => [
            "all_ops",
            "all_ops_per_s",
            "all_errors",
            "all_mean_us",
            "all_p50_us",
            "all_p90_us",
            "all_p99_us",
            "all_p999_us",
            "all_max_us",
        ],
    };
    let h = &stats.latency;
    let mean = if h.is_empty() {
        String::new()
    } else {
        format!("{:.1}", h.mean())
    };
    let values = [
        stats.ok().to_string(),
        rate(report.throughput(stats)),
        stats.errors.to_string(),
        mean,
        quantile(h, 0.5),
        quantile(h, 0.9),
        quantile(h, 0.99),
        quantile(h, 0.999),
        max(h),
    ];
    names.into_iter().zip(values).collect()
}

/// Column names of the timeline CSV.
pub const TIMELINE_COLUMNS: [&str; 13] = [
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

/// Writes the per-second timeline of one run to `path` (replacing it).
pub fn write_timeline(path: &Path, run_id: &str, report: &RunReport) -> Result<(), OutputError> {
    let csv_err = |source| OutputError::Csv {
        path: path.to_owned(),
        source,
    };
    let mut writer = csv::Writer::from_path(path).map_err(csv_err)?;
    writer.write_record(TIMELINE_COLUMNS).map_err(csv_err)?;
    for row in &report.timeline {
        let interval = report.interval_of(row);
        let ops = row.get_ok + row.put_ok + row.scan_ok;
        writer
            .write_record([
                run_id.to_string(),
                row.second.to_string(),
                format!("{interval:.3}"),
                ops.to_string(),
                rate(ops as f64 / interval),
                row.get_ok.to_string(),
                row.put_ok.to_string(),
                row.scan_ok.to_string(),
                row.errors.to_string(),
                quantile(&row.latency, 0.5),
                quantile(&row.latency, 0.9),
                quantile(&row.latency, 0.99),
                max(&row.latency),
            ])
            .map_err(csv_err)?;
    }
    writer.flush().map_err(|source| OutputError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Appends one row to the summary CSV at `path`, writing the header first when the file is
/// new or empty. An existing file whose header differs is left alone: mixing column layouts
/// would make the file unreadable.
pub fn append_summary(path: &Path, columns: &[(&'static str, String)]) -> Result<(), OutputError> {
    let io_err = |source| OutputError::Io {
        path: path.to_owned(),
        source,
    };
    let csv_err = |source| OutputError::Csv {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io_err)?;
    }
    let header: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
    let existing = match File::open(path) {
        Ok(file) => {
            let mut first = String::new();
            BufReader::new(file).read_line(&mut first).map_err(io_err)?;
            Some(first)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(e)),
    };
    let new_file = match &existing {
        None => true,
        Some(first) if first.trim().is_empty() => true,
        Some(first) => {
            let expected = header.join(",");
            if first.trim_end() != expected {
                return Err(OutputError::HeaderMismatch {
                    path: path.to_owned(),
                });
            }
            false
        }
    };
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err)?;
    let mut writer = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(file);
    if new_file {
        writer.write_record(&header).map_err(csv_err)?;
    }
    writer
        .write_record(columns.iter().map(|(_, value)| value.as_str()))
        .map_err(csv_err)?;
    writer.flush().map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::Second;
    use crate::target::TargetStats;
    use std::time::Duration;

    fn params() -> RunParams {
        RunParams {
            run_id: "test-run".into(),
            label: String::new(),
            started: "2024-01-01T00:00:00Z".into(),
            target: "replikv".into(),
            servers: 3,
            server_addrs: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            spawned: true,
            sync: "always".into(),
            route: "random".into(),
            workload: "uniform".into(),
            read_ratio: 0.5,
            scan_ratio: 0.0,
            scan_length: 100,
            keys: 100,
            value_size: 8,
            clients: 2,
            conns: 0,
            rate: None,
            stop: Stop::Duration(Duration::from_secs(2)),
            warmup_s: 0.0,
            seed: 1,
            hot_keys: 0.1,
            hot_ops: 0.9,
            zipf: 0.99,
            preload: true,
            request_timeout_s: 10.0,
            etcd_serializable: false,
            redis_wait: 0,
        }
    }

    fn report() -> RunReport {
        let mut get = OpStats::default();
        for us in [100, 200, 300, 400] {
            get.latency.record(us).unwrap();
        }
        let mut second = Second {
            second: 0,
            get_ok: 4,
            put_ok: 0,
            scan_ok: 0,
            errors: 1,
            latency: Histogram::new_with_bounds(1, 1_000_000, 2).unwrap(),
        };
        second.latency.record(100).unwrap();
        RunReport {
            get,
            put: OpStats::default(),
            scan: OpStats::default(),
            elapsed: Duration::from_millis(500),
            preload_time: Duration::ZERO,
            preload_errors: 0,
            timeline: vec![second],
            stats: TargetStats {
                requests: 5,
                retries: 1,
            },
            interrupted: false,
        }
    }

    #[test]
    fn every_column_is_documented_in_the_readme() {
        let readme = include_str!("../README.md");
        let columns = summary_columns(&params(), &report());
        for name in columns.iter().map(|(n, _)| *n).chain(TIMELINE_COLUMNS) {
            assert!(
                readme.contains(&format!("`{name}`")),
                "column {name} is not documented in loadgen/README.md"
            );
        }
    }

    #[test]
    fn summary_values_come_from_the_report() {
        let columns = summary_columns(&params(), &report());
        let get = |name: &str| {
            columns
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(get("get_ops"), "4");
        assert_eq!(get("get_ops_per_s"), "8.0");
        assert_eq!(get("put_ops"), "0");
        assert_eq!(get("put_p50_us"), "", "no puts: no latency, not zero");
        assert_eq!(get("retries"), "1");
        assert_eq!(get("duration_s"), "2");
        assert_eq!(get("ops_limit"), "");
        assert_eq!(get("server_addrs"), "127.0.0.1:1 127.0.0.1:2");
        let names: Vec<_> = columns.iter().map(|(n, _)| *n).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(names.len(), unique.len(), "column names are unique");
    }

    #[test]
    fn summary_appends_with_one_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/summary.csv");
        let columns = summary_columns(&params(), &report());
        append_summary(&path, &columns).unwrap();
        append_summary(&path, &columns).unwrap();
        let mut reader = csv::Reader::from_path(&path).unwrap();
        assert_eq!(reader.headers().unwrap().len(), columns.len());
        assert_eq!(reader.records().count(), 2);
    }

    #[test]
    fn summary_refuses_a_file_with_other_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("summary.csv");
        fs::write(&path, "a,b\n1,2\n").unwrap();
        let columns = summary_columns(&params(), &report());
        assert!(matches!(
            append_summary(&path, &columns),
            Err(OutputError::HeaderMismatch { .. })
        ));
        assert_eq!(fs::read_to_string(&path).unwrap(), "a,b\n1,2\n");
    }

    #[test]
    fn timeline_rows_scale_the_partial_last_second() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        write_timeline(&path, "test-run", &report()).unwrap();
        let mut reader = csv::Reader::from_path(&path).unwrap();
        assert_eq!(reader.headers().unwrap(), TIMELINE_COLUMNS.as_slice());
        let row = reader.records().next().unwrap().unwrap();
        assert_eq!(&row[2], "0.500");
        assert_eq!(&row[3], "4");
        assert_eq!(&row[4], "8.0");
        assert_eq!(&row[7], "0", "scans");
        assert_eq!(&row[8], "1", "errors");
    }
}
