//! One benchmark run from the command line: bring up (or find) the target, connect one
//! session per client, run the workload with a progress bar, write the CSVs and plots.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Args, ValueEnum};
use replikv_client::config::TlsSettings;
use replikv_client::Route;
use replikv_server::SyncMode;
use replikv_testkit::{ClusterOptions, LocalCluster, ServerCommand};
use thiserror::Error;

use crate::output::{self, OutputError, RunParams};
use crate::plot::{self, PlotError};
use crate::progress;
use crate::runner::{self, Live, RunConfig, RunError, RunReport, Stop};
use crate::target::{Target, TargetError, TargetKind, TargetOptions};
use crate::workload::{Distribution, WorkloadSpec};

/// How long a spawned cluster may take to elect its first primary.
const SPAWN_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Sessions that write the key set before a run when there are fewer clients than this: a
/// one-client benchmark should not wait for one client to write 10 000 keys one by one.
const PRELOAD_SESSIONS: usize = 32;
/// Measured time when neither `--duration` nor `--ops` is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// Options of a benchmark run (the default command).
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// The system under test.
    #[arg(long, value_enum, default_value = "replikv")]
    pub target: TargetKind,
    /// Servers to load: host:port,host:port,... (for Redis the first is the primary).
    #[arg(long, value_delimiter = ',', conflicts_with = "spawn")]
    pub servers: Vec<String>,
    /// Start a replikv cluster of N servers on loopback for this run (temporary data
    /// directories, removed afterwards).
    #[arg(long, value_name = "N")]
    pub spawn: Option<usize>,
    /// Durability mode of a spawned cluster.
    #[arg(long, value_enum, default_value = "always")]
    pub sync: SyncMode,
    /// Start the spawned cluster with `--no-auth` (no users; clients send no token), to
    /// measure what authentication costs. TLS stays on.
    #[arg(long, requires = "spawn")]
    pub no_auth: bool,

    /// Key popularity.
    #[arg(long, value_enum, default_value = "uniform")]
    pub workload: Distribution,
    /// Hot-key workload: fraction of keys that are hot.
    #[arg(long, default_value_t = 0.1)]
    pub hot_keys: f64,
    /// Hot-key workload: fraction of operations that go to hot keys.
    #[arg(long, default_value_t = 0.9)]
    pub hot_ops: f64,
    /// Zipf workload: the exponent.
    #[arg(long, default_value_t = 0.99)]
    pub zipf: f64,
    /// Fraction of operations that are gets: 0 is put-only, 1 get-only (of the operations
    /// that are not scans).
    #[arg(long, default_value_t = 0.5)]
    pub read_ratio: f64,
    /// Fraction of operations that are short scans from a chosen key (replikv only). YCSB
    /// workload E: `--scan-ratio 0.95 --read-ratio 0` (the rest are puts).
    #[arg(long, default_value_t = 0.0)]
    pub scan_ratio: f64,
    /// Most keys one scan lists; each scan asks for 1 to this many, uniformly.
    #[arg(long, default_value_t = 100)]
    pub scan_length: u32,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Bytes per value written.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Concurrent clients, each its own session.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Connections (one to each server) that the clients share, client i using set
    /// i mod N; 0 gives every client its own. Redis clients always have their own.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub conns: usize,
    /// Open loop: total operations per second over all clients (default: closed loop).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Measured time, e.g. 10s or 1m (default 10s).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "ops")]
    pub duration: Option<Duration>,
    /// Stop after this many measured operations instead of after a time.
    #[arg(long)]
    pub ops: Option<u64>,
    /// Unmeasured time before measuring starts.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub warmup: Duration,
    /// Which server each request goes to first.
    #[arg(long, value_enum, default_value = "primary")]
    pub route: Route,
    /// Seed of every random choice (per-client streams derive from it).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Do not write every key before measuring (gets of unwritten keys find nothing).
    #[arg(long)]
    pub no_preload: bool,
    /// Budget for one operation, retries included.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub request_timeout: Duration,

    /// etcd: serializable (member-local) reads instead of linearizable ones.
    #[arg(long)]
    pub etcd_serializable: bool,
    /// Redis: follow every write with WAIT <N> so it is on N replicas before it counts.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub redis_wait: u32,

    /// Directory for the timeline CSV and plots.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Summary CSV to append this run's row to (default: OUT/summary.csv).
    #[arg(long)]
    pub summary: Option<PathBuf>,
    /// Name of this run in the summary and in file names.
    #[arg(long)]
    pub label: Option<String>,
    /// Also draw PNGs: throughput over time and latency CDF.
    #[arg(long)]
    pub plot: bool,
    /// No progress bar and no messages on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Error)]
pub enum BenchError {
    #[error("{0}")]
    Args(String),
    #[error("starting the cluster: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the spawned cluster did not elect a primary: {0}")]
    NoPrimary(String),
    #[error("interrupted before the run started")]
    Interrupted,
    #[error("connecting: {0}")]
    Connect(#[from] TargetError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Plot(#[from] PlotError),
}

/// A finished run and where its results went.
pub struct BenchOutcome {
    pub params: RunParams,
    pub report: RunReport,
    pub files: Vec<PathBuf>,
}

impl RunArgs {
    fn workload(&self) -> WorkloadSpec {
        WorkloadSpec {
            distribution: self.workload,
            keys: self.keys,
            read_ratio: self.read_ratio,
            value_size: self.value_size,
            scan_ratio: self.scan_ratio,
            scan_length: self.scan_length,
            hot_keys: self.hot_keys,
            hot_ops: self.hot_ops,
            zipf: self.zipf,
        }
    }

    fn stop(&self) -> Stop {
        match (self.duration, self.ops) {
            (_, Some(ops)) => Stop::Ops(ops),
            (Some(d), None) => Stop::Duration(d),
            (None, None) => Stop::Duration(DEFAULT_DURATION),
        }
    }

    fn check(&self) -> Result<(), BenchError> {
        match (self.spawn, self.servers.is_empty()) {
            (None, true) => {
                return Err(BenchError::Args(
                    "give --servers host:port,... or --spawn N".into(),
                ))
            }
            (Some(0), _) => return Err(BenchError::Args("--spawn needs at least 1".into())),
            (Some(_), _) if self.target != TargetKind::Replikv => {
                return Err(BenchError::Args(format!(
                    "--spawn starts replikv servers; for {} give --servers",
                    self.target.as_str()
                )))
            }
            _ => {}
        }
        if self.clients == 0 {
            return Err(BenchError::Args("--clients must be at least 1".into()));
        }
        if self.request_timeout.is_zero() {
            return Err(BenchError::Args(
                "--request-timeout must be positive".into(),
            ));
        }
        if let Some(label) = &self.label {
            if label.is_empty() || label.contains(['/', '\\']) || label.starts_with('.') {
                return Err(BenchError::Args(
                    "--label must be non-empty, not start with '.', and contain no path separator"
                        .into(),
                ));
            }
        }
        self.workload()
            .validate()
            .map_err(|e| BenchError::Args(e.to_string()))
    }
}

/// `2024-05-01T10:20:30.123Z` -> `20240501T102030.123Z`: sortable, and safe in file names.
fn compact_timestamp(now: SystemTime) -> String {
    humantime::format_rfc3339_millis(now)
        .to_string()
        .replace(['-', ':'], "")
}

/// Runs one benchmark. `server` is how to start a replikv server for `--spawn` (the
/// binary passes itself with its hidden `server` subcommand).
pub async fn run(args: RunArgs, server: ServerCommand) -> Result<BenchOutcome, BenchError> {
    args.check()?;

    // Signals are watched from the start, so that Ctrl-C or SIGTERM while the cluster is
    // still coming up also ends in the cluster being dropped (its servers stopped) rather
    // than in this process dying and leaving them behind.
    let live = Arc::new(Live::default());
    let signals = watch_signals(live.clone());
    let result = run_with(args, server, live).await;
    signals.abort();
    result
}

async fn run_with(
    args: RunArgs,
    server: ServerCommand,
    live: Arc<Live>,
) -> Result<BenchOutcome, BenchError> {
    let say = |message: String| {
        if !args.quiet {
            eprintln!("{message}");
        }
    };
    // Kept alive until the run is over; dropping it stops every server it started.
    let mut cluster = None;
    let mut access = None;
    let servers = match args.spawn {
        Some(n) => {
            say(format!(
                "starting {n} replikv servers on loopback (--sync {})",
                args.sync.as_str()
            ));
            let spawned = LocalCluster::start(ClusterOptions {
                servers: n,
                sync: args.sync.as_str().to_string(),
                fault_injection: false,
                extra_args: Vec::new(),
                command: Some(server),
                base_dir: None,
                auth: !args.no_auth,
                ..ClusterOptions::default()
            })
            .map_err(BenchError::Spawn)?;
            let (primary, _) = tokio::select! {
                ready = spawned.wait_ready(SPAWN_READY_TIMEOUT) => {
                    ready.map_err(BenchError::NoPrimary)?
                }
                _ = live.stopped() => return Err(BenchError::Interrupted),
            };
            say(format!(
                "cluster is up: {}, primary is rank {primary}",
                spawned.addrs().join(",")
            ));
            let addrs = spawned.addrs();
            // The spawned cluster is secure like any other: its clients speak TLS and
            // authenticate as its admin user.
            access = Some((
                spawned.client_ca().map(TlsSettings::new),
                spawned.admin_credentials(),
            ));
            cluster = Some(spawned);
            addrs
        }
        None => args.servers.clone(),
    };

    let mut target = TargetOptions::new(args.target, servers.clone());
    target.route = args.route;
    target.request_timeout = args.request_timeout;
    target.etcd_serializable = args.etcd_serializable;
    target.redis_wait = args.redis_wait;
    target.replikv_access = access;

    let started_at = SystemTime::now();
    let workload_name = args.workload.as_str();
    let run_id = match &args.label {
        Some(label) => format!("{label}-{}", compact_timestamp(started_at)),
        None => format!(
            "{}-s{}-{workload_name}-r{}-c{}-{}",
            args.target.as_str(),
            servers.len(),
            args.read_ratio,
            args.clients,
            compact_timestamp(started_at)
        ),
    };
    let params = RunParams {
        run_id: run_id.clone(),
        label: args.label.clone().unwrap_or_default(),
        started: humantime::format_rfc3339_seconds(started_at).to_string(),
        target: args.target.as_str().to_string(),
        servers: servers.len(),
        server_addrs: servers.clone(),
        spawned: cluster.is_some(),
        sync: if cluster.is_some() {
            args.sync.as_str().to_string()
        } else {
            String::new()
        },
        // The name as typed on the command line.
        route: args
            .route
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default(),
        workload: workload_name.to_string(),
        read_ratio: args.read_ratio,
        scan_ratio: args.scan_ratio,
        scan_length: args.scan_length,
        keys: args.keys,
        value_size: args.value_size,
        clients: args.clients,
        conns: args.conns,
        rate: args.rate,
        stop: args.stop(),
        warmup_s: args.warmup.as_secs_f64(),
        seed: args.seed,
        hot_keys: args.hot_keys,
        hot_ops: args.hot_ops,
        zipf: args.zipf,
        preload: !args.no_preload,
        request_timeout_s: args.request_timeout.as_secs_f64(),
        etcd_serializable: args.etcd_serializable,
        redis_wait: args.redis_wait,
    };

    say(format!(
        "connecting {} clients to {}",
        args.clients,
        args.target.as_str()
    ));
    let sessions = if args.no_preload {
        args.clients
    } else {
        args.clients.max(PRELOAD_SESSIONS)
    };
    let connect = Target::connect_many(&target, sessions, args.conns);
    let targets = tokio::select! {
        targets = connect => targets?,
        _ = live.stopped() => return Err(BenchError::Interrupted),
    };

    let bar = progress::spawn(
        live.clone(),
        params.stop,
        args.keys,
        progress::should_draw(args.quiet),
    );
    let config = RunConfig {
        workload: args.workload(),
        clients: args.clients,
        rate: args.rate,
        stop: params.stop,
        warmup: args.warmup,
        seed: args.seed,
        preload: !args.no_preload,
    };
    let result = runner::run(config, targets, live.clone()).await;
    // The bar task ends on its own once the run is done; on an early error, end it here.
    if result.is_err() {
        bar.abort();
    }
    let _ = bar.await;
    let report = result?;
    // The servers are no longer needed; stop them before the (slow) plotting.
    drop(cluster);

    std::fs::create_dir_all(&args.out).map_err(|source| OutputError::Io {
        path: args.out.clone(),
        source,
    })?;
    let summary = args
        .summary
        .clone()
        .unwrap_or_else(|| args.out.join("summary.csv"));
    let timeline = args.out.join(format!("{run_id}.timeline.csv"));
    output::write_timeline(&timeline, &run_id, &report)?;
    output::append_summary(&summary, &output::summary_columns(&params, &report))?;
    let mut files = vec![summary, timeline];
    if args.plot {
        let title = format!(
            "{} x{}, {workload_name} {:.0}% gets, {} clients",
            params.target,
            params.servers,
            params.read_ratio * 100.0,
            params.clients
        );
        let throughput = args.out.join(format!("{run_id}.throughput.png"));
        plot::plot_throughput(&throughput, &title, &report)?;
        let latency = args.out.join(format!("{run_id}.latency.png"));
        plot::plot_latency_cdf(&latency, &title, &report)?;
        files.extend([throughput, latency]);
    }
    Ok(BenchOutcome {
        params,
        report,
        files,
    })
}

/// Ctrl-C or SIGTERM ends the run early but cleanly: results so far are written and a
/// spawned cluster is stopped (a test harness stops a hung run with SIGTERM for this).
///
/// The handlers are installed before this returns, not when the task first runs, so there
/// is no window in which a signal still kills the process outright.
#[cfg(unix)]
fn watch_signals(live: Arc<Live>) -> tokio::task::JoinHandle<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    tokio::spawn(async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            // Without handlers the signals keep their default action: nothing to wait for.
            _ => std::future::pending::<()>().await,
        }
        live.stop();
    })
}

#[cfg(not(unix))]
fn watch_signals(live: Arc<Live>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            live.stop();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("loadgen").chain(args.iter().copied())).map(|c| c.run)
    }

    #[test]
    fn defaults_are_a_mixed_uniform_run_of_sixteen_clients() {
        let args = parse(&["--spawn", "3"]).unwrap();
        assert_eq!(args.workload, Distribution::Uniform);
        assert_eq!(args.read_ratio, 0.5);
        assert_eq!(args.clients, 16);
        assert_eq!(args.stop(), Stop::Duration(DEFAULT_DURATION));
        assert_eq!(args.out, PathBuf::from("results"));
        assert!(args.check().is_ok());
    }

    #[test]
    fn durations_and_lists_parse() {
        let args = parse(&["--servers", "a:1,b:2", "--duration", "2s", "--warmup", "0s"]).unwrap();
        assert_eq!(args.servers, vec!["a:1", "b:2"]);
        assert_eq!(args.stop(), Stop::Duration(Duration::from_secs(2)));
        assert_eq!(args.warmup, Duration::ZERO);
        assert_eq!(
            parse(&["--spawn", "1", "--ops", "5"]).unwrap().stop(),
            Stop::Ops(5)
        );
    }

    #[test]
    fn contradictions_are_rejected() {
        assert!(parse(&["--spawn", "3", "--servers", "a:1"]).is_err());
        assert!(parse(&["--spawn", "3", "--ops", "1", "--duration", "1s"]).is_err());
        assert!(parse(&[]).unwrap().check().is_err());
        assert!(parse(&["--spawn", "0"]).unwrap().check().is_err());
        assert!(parse(&["--spawn", "3", "--target", "etcd"])
            .unwrap()
            .check()
            .is_err());
        assert!(parse(&["--spawn", "3", "--clients", "0"])
            .unwrap()
            .check()
            .is_err());
        assert!(parse(&["--spawn", "3", "--read-ratio", "2"])
            .unwrap()
            .check()
            .is_err());
        assert!(parse(&["--spawn", "3", "--label", "../x"])
            .unwrap()
            .check()
            .is_err());
    }

    #[test]
    fn timestamps_are_file_name_safe() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(compact_timestamp(t), "20231114T221320.123Z");
    }
}
