//! `chaos measure`: how long writes stop after a fault, and how long a server
//! that missed many writes takes to catch up.
//!
//! Unavailability is what a steady writer sees: one session writing in a
//! closed loop; the longest gap between two successive acknowledged writes
//! around the fault. Catch-up: stop one backup, write many keys with many
//! sessions, restart it, and time until its applied lsn matches the
//! primary's.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use replikv_client::{Client, ClientConfig};
use replikv_testkit::fault::{cut, FaultClient};
use replikv_testkit::LocalCluster;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{base_dir, start_cluster, BoxError, ChaosArgs};

/// Steady writes before the fault.
const BEFORE: Duration = Duration::from_secs(1);
/// How long a trial keeps writing after writes resumed.
const RECOVERED_FOR: Duration = Duration::from_secs(2);
/// Longest a trial waits for writes to resume.
const TRIAL_LIMIT: Duration = Duration::from_secs(30);
/// How long a partition is held: over twice the expected failover
/// (L(1+eps), a stagger, then the new primary's lease wait).
const ISOLATION: Duration = Duration::from_secs(3);
const CONVERGE: Duration = Duration::from_secs(60);
const CATCH_UP_LIMIT: Duration = Duration::from_secs(120);
/// Longest the writes a stopped server misses may take.
const WRITE_LIMIT: Duration = Duration::from_secs(600);

/// What to measure.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// kill -9 the primary.
    PrimaryKill,
    /// kill -9 a backup.
    BackupKill,
    /// Cut the primary off from the other servers.
    IsolatePrimary,
    /// Time for a restarted server to catch up on writes it missed.
    CatchUp,
}

/// Options of `chaos measure`.
#[derive(clap::Args, Debug, Clone)]
pub struct MeasureArgs {
    /// Scenarios to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "primary-kill,backup-kill,isolate-primary,catch-up"
    )]
    pub scenarios: Vec<Scenario>,
    /// Trials per unavailability scenario.
    #[arg(long, default_value_t = 10)]
    pub trials: usize,
    /// Writes the stopped server misses in the catch-up scenario.
    #[arg(long, default_value_t = 100_000)]
    pub catch_up_writes: u64,
    /// Concurrent sessions writing them.
    #[arg(long, default_value_t = 64)]
    pub catch_up_clients: usize,
    /// Bytes per value of the catch-up writes.
    #[arg(long, default_value_t = 256)]
    pub catch_up_value_size: usize,
    /// Where the CSVs go.
    #[arg(long, default_value = "results/chaos")]
    pub out_dir: PathBuf,
}

#[derive(Debug, Serialize)]
struct TrialRow {
    scenario: String,
    trial: usize,
    victim: usize,
    /// Longest gap between two acknowledged writes around the fault.
    gap_ms: f64,
    /// From the fault to the first write acknowledged after the last gap.
    recovered_after_ms: f64,
    writes: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct SummaryRow {
    scenario: String,
    trials: usize,
    p50_ms: f64,
    max_ms: f64,
    mean_ms: f64,
}

#[derive(Debug, Serialize)]
struct CatchUpRow {
    servers: usize,
    sync: String,
    writes: u64,
    clients: usize,
    write_secs: f64,
    writes_per_sec: f64,
    primary_applied: u64,
    catch_up_ms: f64,
    /// Keys and values the restarted server had missed, in MB (10^6 bytes).
    missed_mb: f64,
    /// `missed_mb` over the whole catch-up (restart, transfer and rejoin).
    catch_up_mb_per_sec: f64,
}

pub async fn run(args: &ChaosArgs, m: &MeasureArgs) -> Result<bool, BoxError> {
    if m.trials == 0 || args.spawn < 3 {
        return Err("measure needs --trials >= 1 and --spawn >= 3".into());
    }
    std::fs::create_dir_all(&m.out_dir)?;
    let (base, made_base) = base_dir(args, "measure")?;
    let mut cluster = start_cluster(args, &base)?;
    cluster.wait_ready(CONVERGE).await?;
    let admin = FaultClient::new(&cluster)?;
    for &scenario in &m.scenarios {
        let name = scenario_name(scenario);
        if scenario == Scenario::CatchUp {
            let row = catch_up(&mut cluster, args, m).await?;
            println!(
                "catch-up: {} writes ({:.1} MB) in {:.1} s ({:.0}/s) by {} sessions; the restarted server caught up in {:.0} ms ({:.1} MB/s)",
                row.writes,
                row.missed_mb,
                row.write_secs,
                row.writes_per_sec,
                row.clients,
                row.catch_up_ms,
                row.catch_up_mb_per_sec
            );
            write_csv(&m.out_dir.join(format!("{name}.csv")), &[row])?;
            continue;
        }
        let mut trials = Vec::new();
        for trial in 0..m.trials {
            cluster.wait_converged(CONVERGE).await?;
            let row = unavailability(&mut cluster, &admin, scenario, trial).await?;
            info!(?scenario, trial, gap_ms = row.gap_ms, "trial done");
            trials.push(row);
        }
        let gaps: Vec<f64> = trials.iter().map(|t| t.gap_ms).collect();
        let summary = summarize(scenario, &gaps);
        println!(
            "{name}: write unavailability p50 {:.0} ms, max {:.0} ms over {} trials",
            summary.p50_ms, summary.max_ms, summary.trials
        );
        write_csv(
            &m.out_dir.join(format!("unavailability-{name}.csv")),
            &trials,
        )?;
        merge_summary(&m.out_dir.join("unavailability-summary.csv"), summary)?;
    }
    println!("results in {}", m.out_dir.display());
    drop(cluster);
    if made_base {
        let _ = std::fs::remove_dir_all(&base);
    }
    Ok(true)
}

/// Replaces `summary`'s scenario in the summary file (keeping the others),
/// so scenarios measured by separate runs share one table.
fn merge_summary(path: &std::path::Path, summary: SummaryRow) -> Result<(), BoxError> {
    let mut rows: Vec<SummaryRow> = match csv::Reader::from_path(path) {
        Ok(mut reader) => reader.deserialize().collect::<Result<_, _>>()?,
        Err(e) if matches!(e.kind(), csv::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::NotFound) => {
            Vec::new()
        }
        Err(e) => return Err(e.into()),
    };
    rows.retain(|r| r.scenario != summary.scenario);
    rows.push(summary);
    write_csv(path, &rows)
}

fn write_csv<T: Serialize>(path: &std::path::Path, rows: &[T]) -> Result<(), BoxError> {
    let mut w = csv::Writer::from_path(path)?;
    for row in rows {
        w.serialize(row)?;
    }
    w.flush()?;
    Ok(())
}

/// Milliseconds, to a tenth (finer than any fault's effect, easy to read).
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

fn scenario_name(s: Scenario) -> String {
    use clap::ValueEnum;
    s.to_possible_value()
        .map_or_else(|| format!("{s:?}"), |v| v.get_name().to_owned())
}

fn summarize(scenario: Scenario, gaps: &[f64]) -> SummaryRow {
    let mut sorted = gaps.to_vec();
    sorted.sort_by(f64::total_cmp);
    // Nearest-rank median.
    let p50 = sorted
        .get(sorted.len().div_ceil(2).saturating_sub(1))
        .copied()
        .unwrap_or(0.0);
    let mean = sorted.iter().sum::<f64>() / sorted.len().max(1) as f64;
    SummaryRow {
        scenario: scenario_name(scenario),
        trials: sorted.len(),
        p50_ms: p50,
        max_ms: sorted.last().copied().unwrap_or(0.0),
        mean_ms: (mean * 10.0).round() / 10.0,
    }
}

/// A closed-loop writer; returns when each acknowledged write completed,
/// and publishes the latest as it goes.
async fn steady_writer(
    client: Client,
    stop: watch::Receiver<bool>,
    last_ack: watch::Sender<Option<Instant>>,
) -> Vec<Instant> {
    let mut acked = Vec::new();
    let mut n = 0u64;
    while !*stop.borrow() {
        n += 1;
        if client
            .put(format!("steady-{}", n % 16), format!("w{n}"))
            .await
            .is_ok()
        {
            let now = Instant::now();
            acked.push(now);
            let _ = last_ack.send(Some(now));
        }
    }
    acked
}

/// Longest gap between successive acknowledged writes from `from` on, and
/// when (after `fault`) the write that ended it came.
fn longest_gap(acked: &[Instant], from: Instant, fault: Instant) -> (Duration, Duration) {
    let window: Vec<Instant> = acked.iter().copied().filter(|t| *t >= from).collect();
    window
        .windows(2)
        .map(|w| (w[1] - w[0], w[1].saturating_duration_since(fault)))
        .max_by_key(|(gap, _)| *gap)
        .unwrap_or_default()
}

async fn unavailability(
    cluster: &mut LocalCluster,
    admin: &FaultClient,
    scenario: Scenario,
    trial: usize,
) -> Result<TrialRow, BoxError> {
    let (primary, _) = cluster.wait_for_primary(CONVERGE).await?;
    let n = cluster.len();
    let client = Client::connect(
        ClientConfig::new(cluster.addrs())
            .with_request_timeout(Duration::from_secs(10))
            .with_attempt_timeout(Duration::from_secs(1)),
    )
    .await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ack_tx, last_ack) = watch::channel(None);
    let writer = tokio::spawn(steady_writer(client, stop_rx, ack_tx));
    tokio::time::sleep(BEFORE).await;
    let started = Instant::now() - BEFORE;

    let victim = match scenario {
        Scenario::BackupKill => (primary + 1 + trial % (n - 1)) % n,
        _ => primary,
    };
    let fault = Instant::now();
    match scenario {
        Scenario::PrimaryKill | Scenario::BackupKill => cluster.kill(victim)?,
        Scenario::IsolatePrimary => admin.apply(&cut(n, &[victim].into())).await?,
        Scenario::CatchUp => return Err("catch-up is not an unavailability scenario".into()),
    }
    let resumed_from = if scenario == Scenario::IsolatePrimary {
        tokio::time::sleep(ISOLATION).await;
        for e in admin.heal(0..n).await {
            warn!(error = %e, "heal failed");
        }
        Instant::now()
    } else {
        fault
    };
    // Once a write is acknowledged after `resumed_from`, keep writing a
    // while longer: a stall that starts a little late (a backup dropped only
    // after its ack timeout) still falls inside the trial.
    let deadline = fault + TRIAL_LIMIT;
    loop {
        if last_ack.borrow().is_some_and(|t| t > resumed_from) {
            tokio::time::sleep(RECOVERED_FOR).await;
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    let acked = tokio::time::timeout(TRIAL_LIMIT, writer).await??;
    if matches!(scenario, Scenario::PrimaryKill | Scenario::BackupKill) {
        cluster.restart(victim)?;
    }
    let after: Vec<&Instant> = acked.iter().filter(|t| **t > fault).collect();
    if after.is_empty() {
        return Err(
            format!("{scenario:?} trial {trial}: no write succeeded after the fault").into(),
        );
    }
    let (gap, recovered) = longest_gap(&acked, started, fault);
    Ok(TrialRow {
        scenario: scenario_name(scenario),
        trial,
        victim,
        gap_ms: millis(gap),
        recovered_after_ms: millis(recovered),
        writes: acked.len(),
    })
}

async fn catch_up(
    cluster: &mut LocalCluster,
    args: &ChaosArgs,
    m: &MeasureArgs,
) -> Result<CatchUpRow, BoxError> {
    cluster.wait_converged(CONVERGE).await?;
    let (primary, _) = cluster.wait_for_primary(CONVERGE).await?;
    let lagging = (primary + 1) % cluster.len();
    cluster.kill(lagging)?;
    info!(
        lagging,
        writes = m.catch_up_writes,
        "writing while a server is down"
    );

    let addrs = cluster.addrs();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let missed_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let written = Instant::now();
    let mut writers = Vec::new();
    for _ in 0..m.catch_up_clients.max(1) {
        let client = Client::connect(ClientConfig::new(addrs.clone())).await?;
        let next = next.clone();
        let missed_bytes = missed_bytes.clone();
        let total = m.catch_up_writes;
        let value_size = m.catch_up_value_size;
        writers.push(tokio::spawn(async move {
            let mut failures = 0u64;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return failures;
                }
                let key = format!("catch-up-{i}");
                let value = format!("v{i:0>width$}", width = value_size.saturating_sub(1));
                let bytes = (key.len() + value.len()) as u64;
                if client.put(key, value).await.is_err() {
                    failures += 1;
                } else {
                    missed_bytes.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    let mut failures = 0;
    let write_deadline = tokio::time::Instant::now() + WRITE_LIMIT;
    let aborts: Vec<_> = writers.iter().map(|w| w.abort_handle()).collect();
    for w in writers {
        match tokio::time::timeout_at(write_deadline, w).await {
            Ok(done) => failures += done?,
            Err(_) => {
                aborts.iter().for_each(|a| a.abort());
                return Err(format!("the catch-up writes took longer than {WRITE_LIMIT:?}").into());
            }
        }
    }
    let write_secs = written.elapsed().as_secs_f64();
    if failures > 0 {
        warn!(failures, "some catch-up writes failed");
    }
    let primary_applied = cluster
        .status(primary)
        .await
        .ok_or("the primary did not answer Status")?
        .applied;

    let restarted = Instant::now();
    cluster.restart(lagging)?;
    let deadline = restarted + CATCH_UP_LIMIT;
    loop {
        let (p, l) = futures::join!(cluster.status(primary), cluster.status(lagging));
        if let (Some(p), Some(l)) = (p, l) {
            if l.applied >= p.applied && l.serving {
                break;
            }
        }
        if Instant::now() > deadline {
            return Err(
                format!("server {lagging} did not catch up within {CATCH_UP_LIMIT:?}").into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let catch_up = restarted.elapsed();
    let missed_mb = missed_bytes.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6;
    Ok(CatchUpRow {
        missed_mb: (missed_mb * 10.0).round() / 10.0,
        catch_up_mb_per_sec: (missed_mb / catch_up.as_secs_f64() * 10.0).round() / 10.0,
        servers: cluster.len(),
        sync: args.sync.clone(),
        writes: m.catch_up_writes,
        clients: m.catch_up_clients,
        write_secs: (write_secs * 100.0).round() / 100.0,
        writes_per_sec: (m.catch_up_writes as f64 / write_secs).round(),
        primary_applied,
        catch_up_ms: millis(catch_up),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_gap_spans_the_fault() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let acked = [at(0), at(10), at(20), at(900), at(910)];
        let (gap, recovered) = longest_gap(&acked, at(0), at(50));
        assert_eq!(gap, Duration::from_millis(880));
        assert_eq!(recovered, Duration::from_millis(850));
    }

    #[test]
    fn summaries_of_separate_runs_merge_by_scenario() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("summary.csv");
        merge_summary(&path, summarize(Scenario::PrimaryKill, &[1.0])).unwrap();
        merge_summary(&path, summarize(Scenario::BackupKill, &[2.0])).unwrap();
        merge_summary(&path, summarize(Scenario::PrimaryKill, &[3.0])).unwrap();
        let rows: Vec<SummaryRow> = csv::Reader::from_path(&path)
            .unwrap()
            .deserialize()
            .collect::<Result<_, _>>()
            .unwrap();
        let got: Vec<(&str, f64)> = rows
            .iter()
            .map(|r| (r.scenario.as_str(), r.max_ms))
            .collect();
        assert_eq!(got, [("backup-kill", 2.0), ("primary-kill", 3.0)]);
    }

    #[test]
    fn summary_uses_nearest_rank_median() {
        let s = summarize(Scenario::PrimaryKill, &[5.0, 1.0, 3.0, 100.0]);
        assert_eq!((s.p50_ms, s.max_ms, s.trials), (3.0, 100.0, 4));
        assert_eq!(s.scenario, "primary-kill");
    }
}
