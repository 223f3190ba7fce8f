//! replikv-chaos: the nemesis (docs/design.md §8): faults injected while clients
//! run, histories checked afterwards by `replikv-lincheck`.
//!
//! - [`history`]: the run clock, recorded operations and nemesis events, CSV.
//! - [`workload`]: the recording clients.
//! - [`nemesis`]: the faults, delivered through `LocalCluster` and the fault
//!   client of `replikv-testkit`.
//! - [`monitor`]: polls `Status` for epoch regressions and split primaries.
//! - [`measure`]: `replikv-chaos measure`: unavailability after faults,
//!   catch-up time.
//! - [`forked`]: `--forked-workers`: forked processes writing through the
//!   kv739 C library during the faults, their acknowledged writes read back.
//!
//! A run: spawn a cluster with fault injection, start the clients and the
//! monitor, inject faults in rounds (each healed, and the cluster whole
//! again, before the next) until the duration is over, heal and restart
//! everything, then check: replicas converge to the same contents, every
//! acknowledged write to a key of its own reads back from every server,
//! epochs only grew, one primary per epoch, a server whose disk was wiped
//! served only after it rejoined, no server panicked or died on its own, the
//! cluster takes writes again, and the history (final reads included) is
//! linearizable. With `--forked-workers`, also: every kv739 call of the forked
//! workers kept its deadline and every write they saw acknowledged reads back
//! from every server.

pub mod forked;
pub mod history;
pub mod measure;
pub mod monitor;
pub mod nemesis;
pub mod workload;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use replikv_client::{Client, ClientConfig, Route};
use replikv_lincheck::{self as checker, Call, CheckOptions, Verdict};
use replikv_testkit::{ClusterOptions, LocalCluster, ServerCommand};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use forked::ForkedWorkload;
use history::{Clock, Entry, Fate, History};
use nemesis::{Fault, Nemesis, Timing};
use workload::is_acknowledged_witness;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long the cluster may take to elect its first primary.
const FIRST_PRIMARY: Duration = Duration::from_secs(30);
/// How long the healed cluster may take to converge.
const CONVERGE: Duration = Duration::from_secs(60);
/// Budget for one final read or write after healing, retries included.
const FINAL_OP: Duration = Duration::from_secs(10);
/// Fault-free time at the end of the run, so the history shows recovery.
const TAIL: Duration = Duration::from_secs(3);
/// Fault-free time at the start, so the history starts from a working cluster.
const WARM_UP: Duration = Duration::from_secs(1);
/// Process ids of the final readers are this plus the server rank.
const FINAL_READER: u64 = 1_000_000;
/// Lines shown per server when its log shows a panic.
const PANIC_LINES: usize = 5;
/// Witness reads in flight per server after the run.
const WITNESS_READS_IN_FLIGHT: usize = 32;
/// Lost writes named in a failed check.
const LOST_SHOWN: usize = 10;

/// Options of `replikv-chaos`.
#[derive(clap::Args, Debug, Clone)]
pub struct ChaosArgs {
    #[command(subcommand)]
    pub command: Option<ChaosCommand>,
    /// Number of servers to spawn.
    #[arg(long, default_value_t = 5)]
    pub spawn: usize,
    /// How long the clients run (faults stop a little before the end).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Faults to inject, comma-separated, in rounds.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    pub faults: Vec<Fault>,
    /// Concurrent client sessions.
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Number of keys the clients share (few keys: more contention).
    #[arg(long, default_value_t = 8)]
    pub keys: usize,
    /// Budget of one client request, retries included.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Shortest time a fault is held.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub hold_min: Duration,
    /// Longest time a fault is held.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub hold_max: Duration,
    /// Quiet time after each heal.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Lease length passed to the servers; a pause lasts at least 3 leases.
    #[arg(long, default_value_t = 500)]
    pub lease_ms: u64,
    /// Server durability mode.
    #[arg(long, default_value = "always", value_parser = ["always", "none"])]
    pub sync: String,
    /// Server binary to run instead of this program's hidden `server` command.
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Extra flag for every server (repeatable), e.g. `--server-arg=--ack-timeout-ms=300`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// Write the history (operations and nemesis events) to this CSV file.
    /// Without it, a failed run writes it next to the server logs.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep server data and logs here (default: a temporary directory,
    /// removed after a run that passed).
    #[arg(long)]
    pub base_dir: Option<PathBuf>,
    /// Seed of the fault schedule and the clients' choices.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Let restart-all-wiped also wipe the server stopped second to last. It
    /// may be the primary of the final two-member view, whose other member
    /// alone is no quorum: the servers cannot serve again after that loss.
    #[arg(long)]
    pub wipe_late_stopped: bool,
    /// Linearizability search budget per key, in steps.
    #[arg(long, default_value_t = CheckOptions::default().max_steps_per_key)]
    pub max_search_steps: u64,
    /// Also fork this many worker processes that put keys of their own through
    /// libkv739 during the faults (a C driver, compiled with `cc` at the start),
    /// and check afterwards that every put they saw acknowledged reads back
    /// from every server and that no call exceeded its deadline.
    #[arg(long, default_value_t = 0)]
    pub forked_workers: usize,
    /// The libkv739.so the forked workers load (default: the one built next to
    /// this program).
    #[arg(long, value_name = "PATH")]
    pub kv739_lib: Option<PathBuf>,
    /// Only check a history written by an earlier run, then exit.
    #[arg(long, value_name = "HISTORY_CSV")]
    pub check_history: Option<PathBuf>,
}

/// Subcommands of `replikv-chaos`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum ChaosCommand {
    /// Measure write unavailability after faults and the catch-up time of a
    /// server that missed many writes; writes CSVs.
    Measure(measure::MeasureArgs),
    /// Run one replikv server in this process (how the nemesis starts its
    /// cluster, so that no separate server binary has to be built).
    #[command(hide = true)]
    Server(Box<replikv_server::Opt>),
}

/// Runs the nemesis (or `chaos measure`, or a re-check); `Ok(false)` when a
/// check failed.
pub async fn run(args: ChaosArgs) -> Result<bool, BoxError> {
    init_tracing();
    let work = async {
        if let Some(path) = &args.check_history {
            return recheck(path, args.max_search_steps);
        }
        match &args.command {
            Some(ChaosCommand::Measure(m)) => measure::run(&args, m).await,
            Some(ChaosCommand::Server(_)) => {
                Err("the server command runs a server, not the nemesis".into())
            }
            None => nemesis_run(&args).await,
        }
    };
    // On Ctrl-C or SIGTERM, dropping `work` drops the cluster, which kills
    // every server it started.
    tokio::select! {
        outcome = work => outcome,
        _ = replikv_server::shutdown_signal() => Err("interrupted".into()),
    }
}

fn init_tracing() {
    replikv_server::init_tracing_with_default("warn,replikv_chaos=info");
}

/// Checks a saved history again.
fn recheck(path: &Path, max_steps: u64) -> Result<bool, BoxError> {
    let history = History::read_csv(path)?;
    let report = checker::check(
        &history.operations(),
        &CheckOptions {
            max_steps_per_key: max_steps,
        },
    );
    print!("{report}");
    Ok(report.verdict() == Verdict::Linearizable)
}

/// Where the cluster keeps its files, and whether this run made the directory.
pub(crate) fn base_dir(args: &ChaosArgs, purpose: &str) -> Result<(PathBuf, bool), BoxError> {
    if let Some(dir) = &args.base_dir {
        return Ok((dir.clone(), false));
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let dir =
        std::env::temp_dir().join(format!("replikv-{purpose}-{}-{stamp}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok((dir, true))
}

/// Spawns the cluster described by `args`, with fault injection on.
pub(crate) fn start_cluster(args: &ChaosArgs, base: &Path) -> Result<LocalCluster, BoxError> {
    if args.spawn == 0 {
        return Err("--spawn must be at least 1".into());
    }
    let command = match &args.server_bin {
        Some(bin) => ServerCommand::new(bin, Vec::new()),
        None => ServerCommand::new(std::env::current_exe()?, vec!["server".into()]),
    };
    let mut extra_args = vec!["--lease-ms".to_owned(), args.lease_ms.to_string()];
    extra_args.extend(args.server_args.iter().cloned());
    let cluster = LocalCluster::start(ClusterOptions {
        servers: args.spawn,
        sync: args.sync.clone(),
        fault_injection: true,
        extra_args,
        command: Some(command),
        base_dir: Some(base.to_path_buf()),
        // The nemesis's clients and status probes reach servers by address alone: the
        // client port stays in the clear on loopback and serves every client as the admin
        // user (`--no-auth`); the peer plane keeps its mutual TLS.
        client_tls: false,
        auth: false,
        ..ClusterOptions::default()
    })?;
    Ok(cluster)
}

/// One post-run check.
struct Check {
    name: String,
    passed: bool,
    detail: String,
}

impl Check {
    fn new(name: impl Into<String>, passed: bool, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            passed,
            detail: detail.into(),
        }
    }
}

async fn nemesis_run(args: &ChaosArgs) -> Result<bool, BoxError> {
    let faults = faults_for(&args.faults, args.spawn)?;
    if args.clients == 0 || args.keys == 0 {
        return Err("--clients and --keys must be at least 1".into());
    }
    if args.hold_max < args.hold_min {
        return Err("--hold-max must not be below --hold-min".into());
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    let (base, made_base) = base_dir(args, "chaos")?;
    // Built before anything starts, so that a missing compiler or library fails
    // the run at once.
    let forked = match args.forked_workers {
        0 => None,
        workers => Some(ForkedWorkload::build(
            &base.join("forked"),
            forked::locate_library(args.kv739_lib.as_deref())?,
            workers,
            args.request_timeout,
        )?),
    };
    let mut cluster = start_cluster(args, &base)?;
    let (primary, _) = cluster.wait_ready(FIRST_PRIMARY).await?;
    let addrs = cluster.addrs();
    println!(
        "chaos: {} servers ({}), primary {primary}, {} clients on {} keys, {} run, faults {:?}, seed {seed}",
        args.spawn,
        base.display(),
        args.clients,
        args.keys,
        humantime::format_duration(args.duration),
        faults
    );
    let clock = Clock::start();
    let run_started = Instant::now();
    println!(
        "run clock: 0 s is {} (the server logs' time)",
        humantime::format_rfc3339_micros(clock.wall_origin())
    );

    // The monitor outlives the clients: restarts and convergence after the
    // run must not move epochs back either.
    let (stop_monitor, monitor_stop) = watch::channel(false);
    let (amnesia, wiped) = mpsc::unbounded_channel();
    let monitor = tokio::spawn(monitor::watch_cluster(
        addrs.clone(),
        clock,
        monitor_stop,
        wiped,
    ));
    let keys: Vec<String> = (0..args.keys).map(|k| format!("chaos-{k}")).collect();
    let (stop_clients, clients_stop) = watch::channel(false);
    let clients = spawn_clients(args, &addrs, &keys, clock, &mut rng, clients_stop).await?;
    let forked_run = match &forked {
        Some(f) => {
            println!(
                "forked workload: {} workers through {}",
                args.forked_workers,
                f.library().display()
            );
            Some(f.start(args.duration, &addrs)?)
        }
        None => None,
    };

    let timing = Timing {
        hold: (args.hold_min, args.hold_max),
        min_pause: Duration::from_millis(3 * args.lease_ms),
        settle: args.settle,
        view_change: Duration::from_millis(3 * args.lease_ms) + Duration::from_secs(1),
    };
    let mut nemesis = Nemesis::new(
        &mut cluster,
        StdRng::seed_from_u64(rng.random()),
        clock,
        timing.clone(),
    )?;
    nemesis.report_amnesia_to(amnesia);
    nemesis.wipe_late_stopped(args.wipe_late_stopped);
    run_schedule(&mut nemesis, &faults, args, &timing, run_started, &mut rng).await;
    let mut history = History {
        entries: Vec::new(),
        nemesis: nemesis.events().to_vec(),
    };
    let mut exits = nemesis.unexpected_exits().to_vec();
    let stalls = nemesis.stalls().to_vec();
    let failed_injections = nemesis.failed_injections().to_vec();
    drop(nemesis);
    tokio::time::sleep(
        args.duration
            .saturating_sub(run_started.elapsed())
            .max(TAIL),
    )
    .await;

    info!("stopping clients");
    let _ = stop_clients.send(true);
    let client_deadline = args.request_timeout + Duration::from_secs(10);
    for client in clients {
        match tokio::time::timeout(client_deadline, client).await {
            Ok(Ok(entries)) => history.entries.extend(entries),
            Ok(Err(e)) => return Err(format!("a client task failed: {e}").into()),
            Err(_) => {
                return Err(format!("a client did not stop within {client_deadline:?}").into())
            }
        }
    }

    let forked_calls = match forked_run {
        Some(run) => Some(run.finish().await),
        None => None,
    };

    // The nemesis restarted everything it stopped; a server down now
    // stopped by itself.
    for rank in 0..cluster.len() {
        if !cluster.is_running(rank) {
            exits.push(format!("server {rank} was found exited after the run"));
            cluster.restart(rank)?;
        }
    }
    let mut checks = vec![
        Check::new(
            "no server exited on its own",
            exits.is_empty(),
            exits.join("; "),
        ),
        Check::new(
            "every fault was injected",
            failed_injections.is_empty(),
            failed_injections.join("; "),
        ),
        Check::new(
            "every round ended with every server a serving member again",
            stalls.is_empty(),
            stalls.join("; "),
        ),
    ];
    checks.extend(after_healing(&cluster, &addrs, &keys, clock, &mut history).await);
    checks.push(no_acknowledged_write_lost(&cluster, &history.entries).await);
    if let (Some(forked), Some(calls)) = (&forked, forked_calls) {
        checks.push(Check::new(
            "forked kv739 workers: every call within its deadline, no write applied twice",
            calls.passed,
            calls.detail,
        ));
        let read_back = forked.verify(&addrs).await;
        checks.push(Check::new(
            "no write acknowledged to a forked kv739 worker lost",
            read_back.passed,
            read_back.detail,
        ));
    }
    let _ = stop_monitor.send(true);
    let observations = monitor.await?;
    checks.push(epoch_check(&observations));
    checks.push(amnesia_check(&observations));
    let panics = scan_logs(&cluster);
    checks.push(Check::new(
        "no server panicked",
        panics.is_empty(),
        panics.join("\n      "),
    ));

    let started = Instant::now();
    let report = checker::check(
        &history.operations(),
        &CheckOptions {
            max_steps_per_key: args.max_search_steps,
        },
    );
    let verdict = report.verdict();
    checks.push(Check::new(
        "history is linearizable",
        verdict == Verdict::Linearizable,
        format!(
            "{verdict}, checked in {:.1} s",
            started.elapsed().as_secs_f64()
        ),
    ));

    let passed = checks.iter().all(|c| c.passed);
    print!("{}", summary(&history, &checks, &report));
    let out = match &args.out {
        Some(path) => Some(path.clone()),
        None if !passed => Some(base.join("history.csv")),
        None => None,
    };
    if let Some(path) = out {
        history.write_csv(&path)?;
        println!("history written to {}", path.display());
    }
    drop(cluster);
    if passed && made_base {
        let _ = std::fs::remove_dir_all(&base);
    } else {
        println!("server data and logs kept in {}", base.display());
    }
    println!("chaos: {}", if passed { "PASS" } else { "FAIL" });
    Ok(passed)
}

/// Starts the recording sessions; each returns its operations once `stop`
/// turns true.
async fn spawn_clients(
    args: &ChaosArgs,
    addrs: &[String],
    keys: &[String],
    clock: Clock,
    rng: &mut StdRng,
    stop: watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<Vec<Entry>>>, BoxError> {
    let mut clients = Vec::new();
    let mut pinned = Vec::new();
    for process in 0..args.clients as u64 {
        // A third of the sessions talk to one server only, so that a bad
        // read of theirs names the server that served it. Of the others,
        // half send writes straight to the primary and half to a random
        // server that forwards them: both paths get exercised.
        let config = if process % 3 == 2 {
            let rank = pinned.len() % addrs.len();
            pinned.push(format!("c{process} -> server {rank}"));
            ClientConfig::new([addrs[rank].clone()])
        } else if process % 2 == 0 {
            ClientConfig::new(addrs.to_vec()).with_route(Route::Random)
        } else {
            ClientConfig::new(addrs.to_vec()).with_route(Route::Primary)
        };
        let client = Client::connect(
            config
                .with_request_timeout(args.request_timeout)
                .with_attempt_timeout(args.request_timeout.min(Duration::from_secs(1))),
        )
        .await?;
        clients.push(tokio::spawn(workload::run_client(
            process,
            client,
            keys.to_vec(),
            clock,
            args.request_timeout,
            rng.random(),
            stop.clone(),
        )));
    }
    if !pinned.is_empty() {
        println!("sessions pinned to one server: {}", pinned.join(", "));
    }
    Ok(clients)
}

/// The concrete faults the command line names, checked against the number
/// of servers: one named explicitly must fit; of `all`, the ones that need
/// more servers are left out, with a note.
fn faults_for(names: &[Fault], servers: usize) -> Result<Vec<Fault>, BoxError> {
    let faults = Fault::expand(names);
    if faults.is_empty() {
        return Err("--faults names no fault".into());
    }
    let (fit, too_big): (Vec<Fault>, Vec<Fault>) =
        faults.into_iter().partition(|f| f.min_servers() <= servers);
    if let Some(f) = too_big.first() {
        let explicit = Fault::expand(
            &names
                .iter()
                .copied()
                .filter(|n| *n != Fault::All)
                .collect::<Vec<_>>(),
        );
        if explicit.contains(f) || fit.is_empty() {
            return Err(format!(
                "--faults {} needs --spawn {} or more",
                f.name(),
                f.min_servers()
            )
            .into());
        }
        let names: Vec<String> = too_big.iter().map(|f| f.name()).collect();
        println!("left out on {servers} servers: {}", names.join(", "));
    }
    Ok(fit)
}

/// Every fault once in a random order, again and again, while a round of it
/// still fits before the fault-free tail; everything is healed at the end.
async fn run_schedule(
    nemesis: &mut Nemesis<'_>,
    faults: &[Fault],
    args: &ChaosArgs,
    timing: &Timing,
    run_started: Instant,
    rng: &mut StdRng,
) {
    tokio::time::sleep(WARM_UP).await;
    let mut order = faults.to_vec();
    loop {
        order.shuffle(rng);
        let mut injected = false;
        for &fault in &order {
            let round = fault.round_estimate(args.spawn, timing);
            if run_started.elapsed() + round + TAIL > args.duration {
                continue;
            }
            nemesis.round(fault).await;
            injected = true;
        }
        if !injected {
            break;
        }
    }
    nemesis.heal().await;
}

/// Convergence, identical contents (whose reads join the history) and a
/// write, once every fault is healed and every server runs.
async fn after_healing(
    cluster: &LocalCluster,
    addrs: &[String],
    keys: &[String],
    clock: Clock,
    history: &mut History,
) -> Vec<Check> {
    let name = "replicas converged after healing";
    let converged = match cluster.wait_for_primary(FIRST_PRIMARY).await {
        Ok(_) => cluster.wait_converged(CONVERGE).await,
        Err(e) => Err(e),
    };
    let convergence = match converged {
        Ok(()) => {
            let applied = cluster.status(0).await.map_or(0, |s| s.applied);
            Check::new(name, true, format!("applied {applied} on every server"))
        }
        Err(e) => Check::new(name, false, e),
    };
    let (contents, final_reads) = compare_contents(cluster, keys, clock).await;
    history.entries.extend(final_reads);
    let write = write_after_heal(addrs, keys, clock, history).await;
    vec![convergence, contents, write]
}

/// Reads every acknowledged witness write (a put to a key no other write
/// touches) back from every server, through a client pinned to it: each must
/// hold exactly the value written. The history's other keys are overwritten
/// all the time; for them, a lost write shows in the linearizability check
/// (each put returns the value it replaced) and the final reads.
async fn no_acknowledged_write_lost(cluster: &LocalCluster, entries: &[Entry]) -> Check {
    let name = "no acknowledged write lost";
    let witnesses: Vec<(&str, &str, u64)> = entries
        .iter()
        .filter(|e| is_acknowledged_witness(e))
        .filter_map(|e| match &e.call {
            Call::Put(v) => Some((e.key.as_str(), v.as_str(), e.complete)),
            _ => None,
        })
        .collect();
    if witnesses.is_empty() {
        return Check::new(name, false, "no witness write was acknowledged");
    }
    let started = Instant::now();
    let per_server = (0..cluster.len()).map(|rank| {
        let witnesses = &witnesses;
        async move {
            let config = ClientConfig::new([cluster.addr(rank)])
                .with_request_timeout(Duration::from_secs(2));
            let client = match Client::connect(config).await {
                Ok(c) => c,
                Err(e) => return Err(format!("server {rank}: {e}")),
            };
            let client = &client;
            let lost: Vec<String> = futures::stream::iter(witnesses.iter())
                .map(|&(key, value, acked)| async move {
                    let deadline = Instant::now() + FINAL_OP;
                    let read = loop {
                        match client.get(key.to_owned()).await {
                            Ok(v) => break Ok(v.as_ref().map(workload::text)),
                            Err(e) if Instant::now() < deadline => {
                                warn!(rank, key, error = %e, "witness read failed; retrying");
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            Err(e) => break Err(e.to_string()),
                        }
                    };
                    witness_missed(key, value, acked, rank, read)
                })
                .buffer_unordered(WITNESS_READS_IN_FLIGHT)
                .filter_map(|lost| async move { lost })
                .collect()
                .await;
            Ok(lost)
        }
    });
    let mut lost = Vec::new();
    for result in futures::future::join_all(per_server).await {
        match result {
            Ok(l) => lost.extend(l),
            Err(e) => lost.push(e),
        }
    }
    if lost.is_empty() {
        Check::new(
            name,
            true,
            format!(
                "{} acknowledged writes to keys of their own read back from each of {} servers in {:.1} s",
                witnesses.len(),
                cluster.len(),
                started.elapsed().as_secs_f64()
            ),
        )
    } else {
        lost.sort();
        let count = lost.len();
        lost.truncate(LOST_SHOWN);
        Check::new(
            name,
            false,
            format!("{count} reads missed a write: {}", lost.join("; ")),
        )
    }
}

/// What is wrong with server `rank`'s read of a witness key, if anything:
/// `key` was written once, with `value`, acknowledged at `acked`.
fn witness_missed(
    key: &str,
    value: &str,
    acked: u64,
    rank: usize,
    read: Result<Option<String>, String>,
) -> Option<String> {
    let found = match read {
        Ok(Some(v)) if v == value => return None,
        Ok(Some(v)) => format!("read {v:?}"),
        Ok(None) => "read absent".to_owned(),
        Err(e) => format!("did not answer: {e}"),
    };
    Some(format!(
        "{key} = {value:?} (acknowledged at {:.3} s): server {rank} {found}",
        acked as f64 / 1e9
    ))
}

/// A server whose data was wiped served only once it had rejoined.
fn amnesia_check(observations: &monitor::Observations) -> Check {
    let name = "a wiped server served only after it rejoined";
    if !observations.amnesia_violations.is_empty() {
        return Check::new(name, false, observations.amnesia_violations.join("; "));
    }
    let wipes: u64 = observations.servers.iter().map(|t| t.wipes).sum();
    Check::new(
        name,
        true,
        format!("{wipes} wipes, {} rejoins seen", observations.rejoins),
    )
}

/// Epochs never went back on any server, and one primary per epoch.
fn epoch_check(observations: &monitor::Observations) -> Check {
    let name = "epochs only grew; one primary per epoch";
    if !observations.violations.is_empty() {
        return Check::new(name, false, observations.violations.join("; "));
    }
    let epochs = observations
        .servers
        .iter()
        .enumerate()
        .map(|(rank, t)| {
            format!(
                "server {rank}: {} -> {} ({} samples)",
                t.first_epoch.unwrap_or(0),
                t.last_epoch,
                t.samples
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    Check::new(
        name,
        true,
        format!("{} epochs seen; {epochs}", observations.primaries.len()),
    )
}

/// Reads every key from every server through a client pinned to it; the
/// reads also join the history, so the final state must agree with it.
async fn compare_contents(
    cluster: &LocalCluster,
    keys: &[String],
    clock: Clock,
) -> (Check, Vec<Entry>) {
    let name = "every server holds the same contents";
    let mut entries = Vec::new();
    let mut by_server: Vec<Vec<Option<String>>> = Vec::new();
    for rank in 0..cluster.len() {
        let config =
            ClientConfig::new([cluster.addr(rank)]).with_request_timeout(Duration::from_secs(2));
        let client = match Client::connect(config).await {
            Ok(c) => c,
            Err(e) => {
                return (
                    Check::new(name, false, format!("server {rank}: {e}")),
                    entries,
                )
            }
        };
        let mut values = Vec::new();
        for key in keys {
            let deadline = Instant::now() + FINAL_OP;
            let value = loop {
                let invoke = clock.now();
                match client.get(key.clone()).await {
                    Ok(v) => {
                        let v = v.as_ref().map(workload::text);
                        entries.push(Entry {
                            process: FINAL_READER + rank as u64,
                            key: key.clone(),
                            call: Call::Get,
                            fate: Fate::Ok(v.clone()),
                            invoke,
                            complete: clock.now(),
                        });
                        break v;
                    }
                    Err(e) if Instant::now() < deadline => {
                        warn!(rank, key, error = %e, "final read failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => {
                        let detail = format!("server {rank} did not serve a read of {key}: {e}");
                        return (Check::new(name, false, detail), entries);
                    }
                }
            };
            values.push(value);
        }
        by_server.push(values);
    }
    let mut differences = Vec::new();
    for (k, key) in keys.iter().enumerate() {
        let mut seen: BTreeMap<Option<&str>, Vec<usize>> = BTreeMap::new();
        for (rank, values) in by_server.iter().enumerate() {
            seen.entry(values[k].as_deref()).or_default().push(rank);
        }
        if seen.len() > 1 {
            let views: Vec<String> = seen
                .iter()
                .map(|(v, ranks)| {
                    format!(
                        "{ranks:?} read {}",
                        v.map_or("absent".to_owned(), |v| format!("{v:?}"))
                    )
                })
                .collect();
            differences.push(format!("{key}: {}", views.join(", ")));
        }
    }
    let present = by_server
        .first()
        .map_or(0, |values| values.iter().filter(|v| v.is_some()).count());
    if differences.is_empty() {
        (
            Check::new(
                name,
                true,
                format!("{} keys, {present} present", keys.len()),
            ),
            entries,
        )
    } else {
        (Check::new(name, false, differences.join("; ")), entries)
    }
}

/// The healed cluster must take a write again (liveness); it joins the
/// history like any other.
async fn write_after_heal(
    addrs: &[String],
    keys: &[String],
    clock: Clock,
    history: &mut History,
) -> Check {
    let name = "the healed cluster takes writes";
    let client =
        match Client::connect(ClientConfig::new(addrs.to_vec()).with_request_timeout(FINAL_OP))
            .await
        {
            Ok(c) => c,
            Err(e) => return Check::new(name, false, e.to_string()),
        };
    let process = FINAL_READER + addrs.len() as u64;
    let value = "final-write".to_owned();
    let invoke = clock.now();
    let result = client.put(keys[0].clone(), value.clone()).await;
    let complete = clock.now();
    let (fate, check) = match result {
        Ok(old) => (
            Fate::Ok(old.as_ref().map(workload::text)),
            Check::new(
                name,
                true,
                format!("put took {:.0} ms", (complete - invoke) as f64 / 1e6),
            ),
        ),
        Err(e) if e.is_outcome_unknown() => (
            Fate::Unknown(e.to_string()),
            Check::new(name, false, e.to_string()),
        ),
        Err(e) => (
            Fate::Failed(e.to_string()),
            Check::new(name, false, e.to_string()),
        ),
    };
    history.entries.push(Entry {
        process,
        key: keys[0].clone(),
        call: Call::Put(value),
        fate,
        invoke,
        complete,
    });
    check
}

/// Lines of the server logs that report a panic, a few per server.
fn scan_logs(cluster: &LocalCluster) -> Vec<String> {
    let mut found = Vec::new();
    for rank in 0..cluster.len() {
        let path = cluster.log_path(rank);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                found.push(format!(
                    "server {rank}: cannot read {}: {e}",
                    path.display()
                ));
                continue;
            }
        };
        let lines = std::io::BufReader::new(file)
            .split(b'\n')
            .map_while(Result::ok)
            .map(|line| String::from_utf8_lossy(&line).into_owned())
            .filter(|line| line.contains("panicked"))
            .take(PANIC_LINES);
        found.extend(lines.map(|line| format!("server {rank}: {line}")));
    }
    found
}

/// The end-of-run text: nemesis actions, operation counts, checks, and the
/// checker's report.
fn summary(history: &History, checks: &[Check], report: &checker::Report) -> String {
    let mut out = String::new();
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for event in &history.nemesis {
        let kind = event.description.split(':').next().unwrap_or_default();
        *kinds.entry(kind).or_default() += 1;
    }
    let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(
        out,
        "nemesis: {} rounds ({})",
        history.nemesis.len(),
        kinds.join(", ")
    );
    for event in &history.nemesis {
        let _ = writeln!(out, "  {event}");
    }
    let mut counts: BTreeMap<&str, [usize; 3]> = BTreeMap::new();
    for e in &history.entries {
        let kind = match e.call {
            Call::Get => "get",
            Call::Put(_) => "put",
            Call::Delete => "delete",
            Call::Cas { .. } => "cas",
        };
        let slot = match e.fate {
            Fate::Ok(_) => 0,
            Fate::Unknown(_) => 1,
            Fate::Failed(_) => 2,
        };
        counts.entry(kind).or_default()[slot] += 1;
    }
    let _ = writeln!(out, "operations: {}", history.entries.len());
    for (kind, [ok, unknown, failed]) in counts {
        let _ = writeln!(
            out,
            "  {kind:<6} ok {ok:>7}  unknown {unknown:>5}  failed {failed:>5}"
        );
    }
    let _ = writeln!(out, "checks:");
    for c in checks {
        let mark = if c.passed { "ok  " } else { "FAIL" };
        if c.detail.is_empty() {
            let _ = writeln!(out, "  [{mark}] {}", c.name);
        } else {
            let _ = writeln!(out, "  [{mark}] {}: {}", c.name, c.detail);
        }
    }
    let _ = write!(out, "{report}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_witness_read_must_return_exactly_the_acknowledged_value() {
        let miss = |read| witness_missed("ack-c1-2", "c1-a2", 1_500_000_000, 3, read);
        assert_eq!(miss(Ok(Some("c1-a2".into()))), None);
        let absent = miss(Ok(None)).expect("a lost write");
        assert!(absent.contains("server 3 read absent"), "{absent}");
        assert!(absent.contains("acknowledged at 1.500 s"), "{absent}");
        let other = miss(Ok(Some("c1-a1".into()))).expect("another value");
        assert!(other.contains("read \"c1-a1\""), "{other}");
        assert!(
            miss(Err("unavailable".into())).is_some(),
            "no answer is no proof"
        );
    }

    #[test]
    fn explicitly_named_faults_must_fit_the_cluster_but_all_shrinks() {
        assert!(faults_for(&[Fault::Combined], 2).is_err());
        assert!(faults_for(&[Fault::All, Fault::Wipe], 1).is_err());
        let all_on_two = faults_for(&[Fault::All], 2).unwrap();
        assert!(all_on_two.contains(&Fault::Wipe));
        assert!(!all_on_two.contains(&Fault::KillTransfer));
        assert!(!all_on_two.contains(&Fault::RestartAllWiped));
        assert_eq!(faults_for(&[Fault::All], 3).unwrap().len(), 17);
    }
}
