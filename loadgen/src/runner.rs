//! The workload engine: preloads the key set, then drives one task per client session
//! against a [`Target`] and returns latency histograms, counts and a per-second timeline.
//!
//! It does no printing and no file I/O, so tests and other modes (the nemesis) can run it;
//! [`Live`] exposes counters that a progress display may poll.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::SeedableRng;
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::target::{Target, TargetError, TargetStats};
use crate::workload::{
    client_seed, key_name, make_value, KeyChooser, OpKind, WorkloadError, WorkloadSpec,
};

/// Highest latency the histograms hold, in microseconds; anything slower is recorded as this.
/// Longer than any request deadline, so in practice nothing is clipped.
pub const MAX_LATENCY_US: u64 = 120_000_000;
/// Tries per key while preloading before the key is counted as a preload error.
const PRELOAD_TRIES: u32 = 3;
/// Pause after a failed operation. The client library has already retried and backed off
/// within its deadline, but a store that rejects at once would otherwise be hammered in a
/// tight loop that measures nothing but the error path.
const ERROR_PAUSE: Duration = Duration::from_millis(10);

/// When the measured part of a run ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// After this much measured time (warm-up not included).
    Duration(Duration),
    /// After this many measured operations, over all clients.
    Ops(u64),
}

/// Everything about a run except the target.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub workload: WorkloadSpec,
    /// Clients that run the workload: the first `clients` of the targets handed to [`run`].
    /// Any further targets only help the preload, which would otherwise take minutes for a
    /// large key set written by one client.
    pub clients: usize,
    /// Open loop: total operations per second over all clients. `None`: closed loop, each
    /// client sends its next request as soon as the previous one returns.
    pub rate: Option<f64>,
    pub stop: Stop,
    /// Operations run but not measured before measuring starts (caches, connections, JIT in
    /// the peers' runtimes).
    pub warmup: Duration,
    pub seed: u64,
    /// Write every key once before the run so that gets find values.
    pub preload: bool,
}

impl RunConfig {
    fn validate(&self, targets: usize) -> Result<KeyChooser, RunError> {
        if self.clients == 0 {
            return Err(RunError::Config("at least one client is needed".into()));
        }
        if self.clients > targets {
            return Err(RunError::Config(format!(
                "{} clients need as many sessions, got {targets}",
                self.clients
            )));
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(RunError::Config(format!(
                    "--rate must be positive, got {rate}"
                )));
            }
        }
        match self.stop {
            Stop::Duration(d) if d.is_zero() => {
                return Err(RunError::Config("--duration must be positive".into()))
            }
            Stop::Ops(0) => return Err(RunError::Config("--ops must be positive".into())),
            _ => {}
        }
        Ok(self.workload.chooser()?)
    }
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error("{0}")]
    Config(String),
    #[error("a client task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("preload: not a single key could be written: {0}")]
    Preload(#[source] TargetError),
}

/// What the run is doing now, for a progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Preload = 0,
    Warmup = 1,
    Measure = 2,
    Done = 3,
}

/// Counters shared with whoever watches the run; updated as operations complete.
#[derive(Debug)]
pub struct Live {
    phase: AtomicU8,
    /// Keys written by the preload so far.
    pub preloaded: AtomicU64,
    /// Measured operations that succeeded.
    pub ops: AtomicU64,
    /// Operations that failed (warm-up included, so a broken target shows at once).
    pub errors: AtomicU64,
    stop: watch::Sender<bool>,
    stopped: AtomicBool,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            phase: AtomicU8::new(Phase::Preload as u8),
            preloaded: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            stop: watch::Sender::new(false),
            stopped: AtomicBool::new(false),
        }
    }
}

impl Live {
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Preload,
            1 => Phase::Warmup,
            2 => Phase::Measure,
            _ => Phase::Done,
        }
    }

    fn set_phase(&self, phase: Phase) {
        // Only ever moves forward: clients race to announce Measure.
        self.phase.fetch_max(phase as u8, Ordering::Relaxed);
    }

    /// Ends the run early (Ctrl-C): clients abandon their in-flight operation and stop;
    /// what was measured so far is still reported.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.stop.send_replace(true);
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// Completes once [`Live::stop`] has been called.
    pub async fn stopped(&self) {
        let mut stop = self.stop.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = stop.wait_for(|stopped| *stopped).await;
    }
}

/// Results for one kind of operation.
#[derive(Clone, Debug)]
pub struct OpStats {
    /// Latency of successful operations, in microseconds.
    pub latency: Histogram<u64>,
    /// Operations that failed.
    pub errors: u64,
    /// Failed writes that may have taken effect anyway.
    pub unknown: u64,
    /// Gets that found no value.
    pub not_found: u64,
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats {
            latency: new_histogram(3),
            errors: 0,
            unknown: 0,
            not_found: 0,
        }
    }
}

impl OpStats {
    /// Successful operations.
    pub fn ok(&self) -> u64 {
        self.latency.len()
    }

    pub fn merge(&mut self, other: &OpStats) {
        // Both histograms share the same bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        self.errors += other.errors;
        self.unknown += other.unknown;
        self.not_found += other.not_found;
    }
}

/// One second of the measured run.
#[derive(Clone, Debug)]
pub struct Second {
    /// Seconds since measuring started (this row covers `[second, second + 1)`).
    pub second: u64,
    pub get_ok: u64,
    pub put_ok: u64,
    pub scan_ok: u64,
    pub errors: u64,
    /// Latency of every successful operation that completed in this second.
    pub latency: Histogram<u64>,
}

impl Second {
    fn new(second: u64) -> Self {
        Second {
            second,
            get_ok: 0,
            put_ok: 0,
            scan_ok: 0,
            errors: 0,
            // Two significant digits are plenty for a per-second view and keep a long run's
            // timeline small.
            latency: new_histogram(2),
        }
    }
}

/// Everything a run measured.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub get: OpStats,
    pub put: OpStats,
    /// Short scans (`--scan-ratio`); a scan that found no key counts in `not_found`.
    pub scan: OpStats,
    /// Measured time: from the end of warm-up until the last client stopped.
    pub elapsed: Duration,
    /// How long the preload took (zero without one).
    pub preload_time: Duration,
    /// Keys the preload could not write.
    pub preload_errors: u64,
    pub timeline: Vec<Second>,
    /// Requests and retries during the measured part, summed over clients.
    pub stats: TargetStats,
    /// The run was cut short by [`Live::stop`].
    pub interrupted: bool,
}

impl RunReport {
    /// Gets, puts and scans together.
    pub fn all(&self) -> OpStats {
        let mut all = self.get.clone();
        all.merge(&self.put);
        all.merge(&self.scan);
        all
    }

    /// Successful operations per measured second.
    pub fn throughput(&self, ops: &OpStats) -> f64 {
        per_second(ops.ok(), self.elapsed)
    }

    /// Fraction of the last timeline row that was measured (the run rarely ends on a whole
    /// second), so per-second rates of that row are not understated.
    pub fn interval_of(&self, row: &Second) -> f64 {
        let measured = self.elapsed.as_secs_f64() - row.second as f64;
        measured.clamp(f64::MIN_POSITIVE, 1.0)
    }
}

/// `count / elapsed`, 0 for an empty interval.
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

fn new_histogram(sigfig: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, sigfig)
        .expect("constant histogram bounds are valid")
}

/// What every client task shares.
struct Shared {
    config: RunConfig,
    chooser: KeyChooser,
    clients: usize,
    live: Arc<Live>,
    measure_start: Instant,
    /// Open loop: time between two requests of one client.
    interval: Option<Duration>,
    /// `--ops`: measured operations handed out so far.
    tickets: AtomicU64,
    /// One row per measured second. A std mutex: held for a few counter updates with no
    /// await inside, far shorter than any operation it records.
    timeline: Mutex<Vec<Second>>,
}

impl Shared {
    fn record_second(&self, at: Instant, op: Option<(OpKind, u64)>) {
        let second = at.saturating_duration_since(self.measure_start).as_secs();
        let mut timeline = self.timeline.lock().unwrap_or_else(|e| e.into_inner());
        while timeline.len() as u64 <= second {
            let next = timeline.len() as u64;
            timeline.push(Second::new(next));
        }
        let row = &mut timeline[second as usize];
        match op {
            Some((kind, us)) => {
                row.latency.saturating_record(us);
                match kind {
                    OpKind::Get => row.get_ok += 1,
                    OpKind::Put => row.put_ok += 1,
                    OpKind::Scan => row.scan_ok += 1,
                }
            }
            None => row.errors += 1,
        }
    }
}

/// What one client task hands back.
struct ClientResult {
    get: OpStats,
    put: OpStats,
    scan: OpStats,
    stats: TargetStats,
    finished: Instant,
}

/// Preloads with every target, then runs the workload with the first `config.clients`
/// of them, one client per target, and returns what it measured.
///
/// Bounded in time: with [`Stop::Duration`] clients stop issuing at the deadline and every
/// operation is bounded by the target's request timeout; [`Live::stop`] ends it at once.
pub async fn run(
    config: RunConfig,
    targets: Vec<Target>,
    live: Arc<Live>,
) -> Result<RunReport, RunError> {
    let chooser = config.validate(targets.len())?;
    let clients = config.clients;

    let preload_started = Instant::now();
    let (targets, preload_errors) = if config.preload {
        preload(targets, &config.workload, &live).await?
    } else {
        (targets, 0)
    };
    let preload_time = if config.preload {
        preload_started.elapsed()
    } else {
        Duration::ZERO
    };

    // The sessions beyond `clients` were only for the preload.
    let mut targets = targets;
    targets.truncate(clients);

    let start = Instant::now();
    live.set_phase(Phase::Warmup);
    let shared = Arc::new(Shared {
        interval: config
            .rate
            .map(|rate| Duration::from_secs_f64(clients as f64 / rate)),
        measure_start: start + config.warmup,
        config,
        chooser,
        clients,
        live: live.clone(),
        tickets: AtomicU64::new(0),
        timeline: Mutex::new(Vec::new()),
    });

    let mut tasks = JoinSet::new();
    for (index, target) in targets.into_iter().enumerate() {
        let shared = shared.clone();
        tasks.spawn(client_loop(index, target, start, shared));
    }
    let mut report = RunReport {
        get: OpStats::default(),
        put: OpStats::default(),
        scan: OpStats::default(),
        elapsed: Duration::ZERO,
        preload_time,
        preload_errors,
        timeline: Vec::new(),
        stats: TargetStats::default(),
        interrupted: false,
    };
    let mut last_finish = shared.measure_start;
    while let Some(result) = tasks.join_next().await {
        let result = result?;
        report.get.merge(&result.get);
        report.put.merge(&result.put);
        report.scan.merge(&result.scan);
        report.stats += result.stats;
        last_finish = last_finish.max(result.finished);
    }
    live.set_phase(Phase::Done);
    report.elapsed = last_finish.saturating_duration_since(shared.measure_start);
    report.interrupted = live.is_stopped();
    report.timeline =
        std::mem::take(&mut *shared.timeline.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(report)
}

/// Writes every key once, the key set split evenly over the sessions.
async fn preload(
    targets: Vec<Target>,
    workload: &WorkloadSpec,
    live: &Arc<Live>,
) -> Result<(Vec<Target>, u64), RunError> {
    let clients = targets.len() as u64;
    // Keys written by any session: while it is 0 a failure is taken as a target that is not
    // there at all, and the run stops after one request's deadline instead of waiting out
    // every retry of every key.
    let written = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for (index, mut target) in targets.into_iter().enumerate() {
        let keys = workload.keys;
        let value_size = workload.value_size;
        let live = live.clone();
        let written = written.clone();
        let mut stop = live.stop.subscribe();
        tasks.spawn(async move {
            let mut errors = 0;
            let mut key = index as u64;
            'keys: while key < keys {
                let value = make_value(value_size, index, 0);
                for attempt in 1..=PRELOAD_TRIES {
                    let put = target.put(key_name(key), value.clone());
                    let result = tokio::select! {
                        result = put => result,
                        _ = stop.wait_for(|stopped| *stopped) => break 'keys,
                    };
                    match result {
                        Ok(_) => {
                            written.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Err(error) if written.load(Ordering::Relaxed) == 0 => {
                            return Err(RunError::Preload(error));
                        }
                        Err(_) if attempt == PRELOAD_TRIES => errors += 1,
                        Err(_) => tokio::time::sleep(ERROR_PAUSE).await,
                    }
                }
                live.preloaded.fetch_add(1, Ordering::Relaxed);
                key += clients;
            }
            Ok((index, target, errors))
        });
    }
    let mut slots: Vec<Option<Target>> = std::iter::repeat_with(|| None)
        .take(clients as usize)
        .collect();
    let mut errors = 0;
    // An error returns at once; dropping the JoinSet aborts the other sessions' preloads.
    while let Some(result) = tasks.join_next().await {
        let (index, target, failed) = result??;
        slots[index] = Some(target);
        errors += failed;
    }
    // Every task returned its target, so every slot is filled; keep them in client order so
    // client i keeps session i.
    Ok((slots.into_iter().flatten().collect(), errors))
}

async fn client_loop(
    index: usize,
    mut target: Target,
    start: Instant,
    shared: Arc<Shared>,
) -> ClientResult {
    let mut rng = StdRng::seed_from_u64(client_seed(shared.config.seed, index));
    let mut stop = shared.live.stop.subscribe();
    let mut get = OpStats::default();
    let mut put = OpStats::default();
    let mut scan = OpStats::default();
    let mut measuring = false;
    let mut base_stats = target.stats();
    // Open loop: clients start spread over one interval, so they do not send in lockstep.
    let mut next_send = start
        + shared
            .interval
            .map(|i| i.mul_f64(index as f64 / shared.clients as f64))
            .unwrap_or_default();
    let mut seq = 0u64;

    loop {
        if *stop.borrow() {
            break;
        }
        // The latency of an open-loop request counts from when it was due, not from when a
        // late client got round to it, so a slow store cannot hide its queueing (coordinated
        // omission).
        let intended = match shared.interval {
            Some(interval) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(next_send) => {}
                    _ = stop.wait_for(|stopped| *stopped) => break,
                }
                let due = next_send;
                next_send += interval;
                due
            }
            None => Instant::now(),
        };
        if !measuring && intended >= shared.measure_start {
            measuring = true;
            base_stats = target.stats();
            shared.live.set_phase(Phase::Measure);
        }
        if measuring {
            let over = match shared.config.stop {
                Stop::Duration(d) => intended >= shared.measure_start + d,
                Stop::Ops(n) => shared.tickets.fetch_add(1, Ordering::Relaxed) >= n,
            };
            if over {
                break;
            }
        }

        let kind = shared.config.workload.next_op(&mut rng);
        let key = shared.chooser.next_key(&mut rng);
        let scan_length = match kind {
            OpKind::Scan => shared.config.workload.next_scan_length(&mut rng),
            _ => 0,
        };
        seq += 1;
        let op = async {
            match kind {
                OpKind::Get => target.get(key).await.map(|v| v.is_some()),
                OpKind::Put => {
                    let value: Bytes = make_value(shared.config.workload.value_size, index, seq);
                    target.put(key, value).await.map(|_| true)
                }
                OpKind::Scan => target.scan(key, scan_length).await.map(|n| n > 0),
            }
        };
        let result: Result<bool, TargetError> = tokio::select! {
            result = op => result,
            // Abandon the operation: it is neither a success nor a failure of the store.
            _ = stop.wait_for(|stopped| *stopped) => break,
        };
        let done = Instant::now();
        let stats = match kind {
            OpKind::Get => &mut get,
            OpKind::Put => &mut put,
            OpKind::Scan => &mut scan,
        };
        match result {
            Ok(found) => {
                if measuring {
                    let us = done.saturating_duration_since(intended).as_micros() as u64;
                    stats.latency.saturating_record(us.max(1));
                    if !found {
                        stats.not_found += 1;
                    }
                    shared.live.ops.fetch_add(1, Ordering::Relaxed);
                    shared.record_second(done, Some((kind, us.max(1))));
                }
            }
            Err(error) => {
                shared.live.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(client = index, op = kind.as_str(), %error, "operation failed");
                if measuring {
                    stats.errors += 1;
                    if kind == OpKind::Put && error.may_have_applied() {
                        stats.unknown += 1;
                    }
                    shared.record_second(done, None);
                }
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    ClientResult {
        get,
        put,
        scan,
        stats: if measuring {
            target.stats().since(base_stats)
        } else {
            TargetStats::default()
        },
        finished: Instant::now(),
    }
}
