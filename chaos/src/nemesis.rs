//! The nemesis: the faults of docs/design.md §8 and §10, injected in rounds, each
//! healed (and the cluster whole again) before the next.
//!
//! Process faults (kill, pause, restart, a lost disk) go through
//! [`LocalCluster`]; network faults and armed crashes go through each
//! server's Admin RPC, whose rules act only on server-to-server traffic, so
//! clients can still reach every live server. A rule on server S about peer P
//! covers the traffic between S and P, which is why cutting a link takes a
//! rule on both of its ends.
//!
//! Limits that keep every round within what the servers promise: at most one
//! disk is lost per round, and never the disk of the only server that may
//! hold an acknowledged write (the last one standing); at most a minority of
//! the servers is down or cut off at once, so that two faults "at once" on
//! three or four servers become a hand-off (the second fault starts the
//! instant the first is healed, while the cluster is still recovering from
//! it); and a round ends only once every server is a serving member of one
//! view again, so that the next disk lost is never a second copy gone.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use replikv_proto::kv::StatusResponse;
use replikv_proto::peer::{FaultDirection, FaultKind, FaultRequest};
use replikv_testkit::fault::{cut, one_way, rule, FaultClient};
use replikv_testkit::LocalCluster;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::history::{Clock, NemesisEvent};
use replikv_lincheck::Nanos;

/// How long to look for the primary before a fault that targets it.
const FIND_PRIMARY: Duration = Duration::from_secs(3);
/// How long a round may take to end with every server a serving member
/// again (a wiped server included, after its state transfer).
pub const ROUND_CONVERGE: Duration = Duration::from_secs(60);
/// Longest random delay before a wiped server is restarted.
const WIPE_RESTART_MAX: Duration = Duration::from_millis(1500);
/// Longest random gap between two stops, or two restarts, of a whole-cluster
/// restart.
const RESTART_GAP_MAX: Duration = Duration::from_secs(2);
/// How long the primary may take to drop a killed backup from its view.
const DROP_WAIT: Duration = Duration::from_secs(5);
/// How long an armed primary may take to reach the "transferring" step once
/// the wiped server is restarted; it is killed by hand after that.
const TRANSFER_WAIT: Duration = Duration::from_secs(5);
/// How often a wait polls the servers or a process.
const POLL: Duration = Duration::from_millis(50);

/// The steps of a view change or state transfer at which a server can be
/// made to crash (`FaultRequest.crash_at`).
pub const CRASH_STEPS: [&str; 7] = [
    "prepared",
    "promised",
    "accepted",
    "decided",
    "reconciled",
    "installed",
    "transferring",
];

/// The kinds of fault, as named on the command line.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// kill -9 a server (the primary half of the time), restart it later.
    Kill,
    /// SIGSTOP a server (the primary half of the time) for several leases.
    Pause,
    /// Cut the primary off from every other server.
    IsolatePrimary,
    /// Cut a backup off from every other server; clients still reach it.
    IsolateBackup,
    /// Both isolations, alternately.
    Partition,
    /// Drop the requests one server sends to another, not the reverse.
    OneWay,
    /// Deliver requests between the primary and a backup but lose the replies.
    DropResponse,
    /// Split the servers into a majority and a minority, a new split each time.
    Majority,
    /// Delay the traffic on random links.
    Delay,
    /// kill -9 every server, then restart them all.
    CrashAll,
    /// Make a server's next storage flush fail; it must stop serving.
    DiskError,
    /// kill -9 a server (the primary half of the time), replace its data
    /// directory by an empty one (a lost disk), restart it after a short delay.
    Wipe,
    /// Stop every server (kill -9 or SIGTERM) in a random order with random
    /// gaps, wipe one server's data, restart them in a random order with gaps.
    RestartAllWiped,
    /// Isolate one server and kill -9 another.
    PartitionKill,
    /// Pause one server and kill -9 and restart another.
    PauseRestart,
    /// Wipe and restart a backup, then crash the primary while it transfers
    /// the data to it.
    KillTransfer,
    /// kill -9 the primary and isolate a backup for a while, during the view
    /// change that follows.
    PartitionViewChange,
    /// The four two-fault combinations above.
    Combined,
    /// Arm a crash at a random step of a view change or transfer on a random
    /// server, kill -9 the primary, restart the dead later.
    CrashAt,
    /// Every fault above.
    All,
}

impl Fault {
    /// The concrete faults a command-line name stands for.
    pub fn expand(list: &[Fault]) -> Vec<Fault> {
        let mut out = BTreeSet::new();
        for fault in list {
            match fault {
                Fault::Partition => {
                    out.extend([Fault::IsolatePrimary, Fault::IsolateBackup]);
                }
                Fault::Combined => out.extend(Fault::COMBINED),
                Fault::All => {
                    out.extend([
                        Fault::Kill,
                        Fault::Pause,
                        Fault::IsolatePrimary,
                        Fault::IsolateBackup,
                        Fault::OneWay,
                        Fault::DropResponse,
                        Fault::Majority,
                        Fault::Delay,
                        Fault::CrashAll,
                        Fault::DiskError,
                        Fault::Wipe,
                        Fault::RestartAllWiped,
                        Fault::CrashAt,
                    ]);
                    out.extend(Fault::COMBINED);
                }
                f => {
                    out.insert(*f);
                }
            }
        }
        out.into_iter().collect()
    }

    const COMBINED: [Fault; 4] = [
        Fault::PartitionKill,
        Fault::PauseRestart,
        Fault::KillTransfer,
        Fault::PartitionViewChange,
    ];

    /// The name on the command line (and in the history).
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map_or_else(|| format!("{self:?}"), |v| v.get_name().to_owned())
    }

    /// Fewest servers this fault makes sense on: a lost disk needs another
    /// copy of the data, two faults need a third server, and a whole-cluster
    /// restart with a lost disk needs a server stopped before the last two.
    pub fn min_servers(self) -> usize {
        match self {
            Fault::Wipe | Fault::CrashAt => 2,
            Fault::RestartAllWiped
            | Fault::PartitionKill
            | Fault::PauseRestart
            | Fault::KillTransfer
            | Fault::PartitionViewChange => 3,
            _ => 1,
        }
    }

    /// Whether a round of this fault loses a server's data.
    pub fn loses_a_disk(self) -> bool {
        matches!(
            self,
            Fault::Wipe | Fault::RestartAllWiped | Fault::KillTransfer
        )
    }

    /// The expected length of one round on `n` servers, healing and the
    /// settle time included (not the wait for convergence, which is short
    /// when things go well), so that the schedule starts no round that would
    /// run far past the run's end.
    pub fn round_estimate(self, n: usize, timing: &Timing) -> Duration {
        let hold = (timing.hold.0 + timing.hold.1) / 2;
        let base = hold + timing.settle;
        let gaps = RESTART_GAP_MAX * n.saturating_sub(1) as u32;
        base + match self {
            Fault::Pause => timing.min_pause.saturating_sub(hold),
            Fault::Wipe => WIPE_RESTART_MAX / 2,
            Fault::RestartAllWiped => gaps,
            Fault::PartitionKill | Fault::PauseRestart => hold + WIPE_RESTART_MAX / 2,
            Fault::KillTransfer => Duration::from_secs(2),
            Fault::PartitionViewChange | Fault::CrashAt => timing.view_change,
            _ => Duration::ZERO,
        }
    }
}

/// A server whose data directory the nemesis replaced by an empty one, and
/// when (on the run clock; the server was already dead then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amnesia {
    pub rank: usize,
    pub at: Nanos,
}

/// Timing of the schedule.
#[derive(Debug, Clone)]
pub struct Timing {
    /// A fault is held for a random time in this range.
    pub hold: (Duration, Duration),
    /// Shortest pause (SIGSTOP): several leases, so that the paused server's
    /// lease runs out and the others act without it.
    pub min_pause: Duration,
    /// Quiet time after each heal.
    pub settle: Duration,
    /// Long enough for a failover: the survivors notice that the primary is
    /// silent (L(1+eps) and a stagger, docs/design.md §5), run the view change and
    /// wait out the old leases.
    pub view_change: Duration,
}

/// Injects faults into a cluster it borrows, and records what it did.
pub struct Nemesis<'a> {
    cluster: &'a mut LocalCluster,
    admin: FaultClient,
    rng: StdRng,
    clock: Clock,
    timing: Timing,
    /// Servers this nemesis killed (or broke) and has not restarted yet.
    down: BTreeSet<usize>,
    paused: BTreeSet<usize>,
    /// Servers armed to crash at a step (`FaultRequest.crash_at`), and the step.
    armed: BTreeMap<usize, &'static str>,
    /// Whether the next heal restarts the servers one by one with random gaps.
    restart_gaps: bool,
    /// Whether a whole-cluster restart may wipe the server stopped second
    /// to last (see [`Nemesis::wipe_late_stopped`]).
    wipe_late_stopped: bool,
    /// Told of every wiped server (the monitor starts its history anew).
    amnesia: Option<mpsc::UnboundedSender<Amnesia>>,
    events: Vec<NemesisEvent>,
    /// Servers found not running although the nemesis did not stop them.
    unexpected_exits: Vec<String>,
    /// Rounds after which the cluster did not become whole again in time.
    stalls: Vec<String>,
    /// Faults that could not be injected (or only in part), and why.
    failed: Vec<String>,
    /// Whether every server was a serving member of one view after the last
    /// round.
    whole: bool,
}

impl<'a> Nemesis<'a> {
    pub fn new(
        cluster: &'a mut LocalCluster,
        rng: StdRng,
        clock: Clock,
        timing: Timing,
    ) -> Result<Self, String> {
        let admin = FaultClient::new(cluster)?;
        Ok(Self {
            cluster,
            admin,
            rng,
            clock,
            timing,
            down: BTreeSet::new(),
            paused: BTreeSet::new(),
            armed: BTreeMap::new(),
            restart_gaps: false,
            wipe_late_stopped: false,
            amnesia: None,
            events: Vec::new(),
            unexpected_exits: Vec::new(),
            stalls: Vec::new(),
            failed: Vec::new(),
            whole: true,
        })
    }

    /// Lets a whole-cluster restart also wipe the server stopped second to
    /// last, which may be the primary of a final two-member view: the
    /// servers do not survive that loss (the other member alone is no
    /// quorum), so it is off unless asked for.
    pub fn wipe_late_stopped(&mut self, yes: bool) {
        self.wipe_late_stopped = yes;
    }

    /// Tells `to` of every server whose data this nemesis wipes.
    pub fn report_amnesia_to(&mut self, to: mpsc::UnboundedSender<Amnesia>) {
        self.amnesia = Some(to);
    }

    /// What was done, in order.
    pub fn events(&self) -> &[NemesisEvent] {
        &self.events
    }

    /// Servers that exited without being told to.
    pub fn unexpected_exits(&self) -> &[String] {
        &self.unexpected_exits
    }

    /// Rounds after which the cluster was not whole again within
    /// [`ROUND_CONVERGE`].
    pub fn stalls(&self) -> &[String] {
        &self.stalls
    }

    /// Faults that could not be injected (or only in part), and why.
    pub fn failed_injections(&self) -> &[String] {
        &self.failed
    }

    fn n(&self) -> usize {
        self.cluster.len()
    }

    /// Servers that may be down or cut off at once: a minority.
    fn budget(&self) -> usize {
        (self.n() - 1) / 2
    }

    /// Injects one fault, holds it, heals everything, waits until every
    /// server is a serving member again, then for the settle time.
    pub async fn round(&mut self, fault: Fault) {
        if fault.loses_a_disk() && !self.whole {
            // A server may still lack data since an earlier round: losing
            // another disk now could lose the only copy of a write, which
            // the servers do not promise to survive.
            if let Err(e) = self.wait_whole(ROUND_CONVERGE).await {
                let at = self.clock.now();
                self.events.push(NemesisEvent {
                    start: at,
                    end: at,
                    description: format!("{}: skipped, cluster not whole: {e}", fault.name()),
                });
                return;
            }
            self.whole = true;
        }
        let start = self.clock.now();
        let mut hold = self.random_hold();
        let injected = match self.inject(fault, &mut hold).await {
            Ok(description) => description,
            Err(e) => {
                self.failed.push(format!(
                    "{} at {:.3} s: {e}",
                    fault.name(),
                    start as f64 / 1e9
                ));
                format!("failed to inject: {e}")
            }
        };
        info!(
            fault = fault.name(),
            hold_ms = hold.as_millis() as u64,
            "nemesis: {injected}"
        );
        tokio::time::sleep(hold).await;
        let notes = self.heal().await;
        let end = self.clock.now();
        let mut description = format!("{}: {injected}", fault.name());
        for note in notes {
            description.push_str("; ");
            description.push_str(&note);
        }
        match self.wait_whole(ROUND_CONVERGE).await {
            Ok(took) => {
                self.whole = true;
                let _ = write!(
                    description,
                    "; whole again {:.1} s after healing",
                    took.as_secs_f64()
                );
            }
            Err(e) => {
                self.whole = false;
                warn!(fault = fault.name(), error = %e, "nemesis: the cluster is not whole again");
                self.stalls.push(format!(
                    "after {} at {:.3} s: {e}",
                    fault.name(),
                    end as f64 / 1e9
                ));
                description.push_str("; NOT whole again in time");
            }
        }
        self.events.push(NemesisEvent {
            start,
            end,
            description,
        });
        tokio::time::sleep(self.timing.settle).await;
    }

    fn random_hold(&mut self) -> Duration {
        let (lo, hi) = self.timing.hold;
        self.random_between(lo, hi)
    }

    fn random_between(&mut self, lo: Duration, hi: Duration) -> Duration {
        if hi <= lo {
            lo
        } else {
            self.rng.random_range(lo..=hi)
        }
    }

    async fn primary(&self) -> Option<usize> {
        self.cluster
            .wait_for_primary(FIND_PRIMARY)
            .await
            .ok()
            .map(|(rank, _)| rank)
    }

    /// The primary half of the time (when there is one), else any server;
    /// and whether it is the primary.
    async fn victim(&mut self) -> (usize, &'static str) {
        let n = self.n();
        let primary = self.primary().await;
        if let Some(p) = primary {
            if self.rng.random_bool(0.5) {
                return (p, "primary");
            }
        }
        let rank = self.rng.random_range(0..n);
        (
            rank,
            if Some(rank) == primary {
                "primary"
            } else {
                "backup"
            },
        )
    }

    /// Any server but `not`.
    fn other_than(&mut self, not: usize) -> usize {
        let choices: Vec<usize> = (0..self.n()).filter(|&r| r != not).collect();
        choices.choose(&mut self.rng).copied().unwrap_or(not)
    }

    /// The server most likely to reach `step` once `primary` dies. The
    /// survivors stagger their take-over by rank distance after the old
    /// primary (docs/design.md §5), so the next rank proposes, becomes primary and
    /// sources the reconcile's transfers; the other survivors promise,
    /// accept and install.
    fn reaches(&mut self, step: &str, primary: usize) -> usize {
        let n = self.n();
        let next = (primary + 1) % n;
        match step {
            "prepared" | "decided" | "reconciled" | "transferring" => next,
            _ => {
                let acceptors: Vec<usize> = (0..n).filter(|&r| r != primary && r != next).collect();
                acceptors.choose(&mut self.rng).copied().unwrap_or(next)
            }
        }
    }

    /// `(a, b)` or `(b, a)`, at random: which side of a link a one-way fault hits.
    fn either_way(&mut self, a: usize, b: usize) -> (usize, usize) {
        if self.rng.random_bool(0.5) {
            (a, b)
        } else {
            (b, a)
        }
    }

    /// A server other than the primary (any server when there is none).
    async fn backup(&mut self) -> (usize, Option<usize>) {
        let n = self.n();
        let primary = self.primary().await;
        let choices: Vec<usize> = (0..n).filter(|r| Some(*r) != primary).collect();
        let rank = choices.choose(&mut self.rng).copied().unwrap_or(0);
        (rank, primary)
    }

    /// kill -9, remembered for the heal to restart.
    fn kill(&mut self, rank: usize) -> Result<(), String> {
        self.cluster
            .kill(rank)
            .map_err(|e| format!("cannot kill server {rank}: {e}"))?;
        self.down.insert(rank);
        Ok(())
    }

    /// SIGTERM (SIGKILL after a grace time), remembered for the heal.
    fn terminate(&mut self, rank: usize) -> Result<(), String> {
        // The grace time is waited for on this thread: let the runtime move
        // the other tasks (the clients) elsewhere meanwhile.
        tokio::task::block_in_place(|| self.cluster.terminate(rank))
            .map_err(|e| format!("cannot stop server {rank}: {e}"))?;
        self.down.insert(rank);
        Ok(())
    }

    /// Starts a server this nemesis stopped, before the heal would.
    fn restart(&mut self, rank: usize) -> Result<(), String> {
        self.cluster
            .restart(rank)
            .map_err(|e| format!("cannot restart server {rank}: {e}"))?;
        self.down.remove(&rank);
        Ok(())
    }

    /// Replaces a stopped server's data directory by an empty one, and tells
    /// the monitor (the server is dead already, so its history ends here).
    fn wipe(&mut self, rank: usize) -> Result<(), String> {
        self.cluster
            .wipe(rank)
            .map_err(|e| format!("cannot wipe server {rank}: {e}"))?;
        if let Some(to) = &self.amnesia {
            let _ = to.send(Amnesia {
                rank,
                at: self.clock.now(),
            });
        }
        Ok(())
    }

    /// Arms `rank` to SIGKILL itself when it next reaches `step`.
    async fn arm(&mut self, rank: usize, step: &'static str) -> Result<(), String> {
        self.admin
            .send(
                rank,
                FaultRequest {
                    crash_at: step.to_owned(),
                    ..Default::default()
                },
            )
            .await?;
        self.armed.insert(rank, step);
        Ok(())
    }

    async fn heal_network(&self) {
        for error in self.admin.heal(0..self.n()).await {
            warn!(%error, "nemesis: heal failed");
        }
    }

    /// Waits until `rank` has exited (an armed crash); false after `timeout`.
    async fn wait_exit(&mut self, rank: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.cluster.is_running(rank) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        !self.cluster.is_running(rank)
    }

    /// Waits until `primary` runs a view without `gone`; false after `timeout`.
    async fn wait_dropped(&self, primary: usize, gone: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.cluster.status(primary).await {
                if status
                    .view
                    .as_ref()
                    .is_some_and(|v| !v.members.contains(&(gone as u32)))
                {
                    return true;
                }
            }
            tokio::time::sleep(POLL).await;
        }
        false
    }

    /// Waits until every server is a serving member of one view with every
    /// server in it; returns how long that took.
    pub async fn wait_whole(&self, timeout: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            let statuses: Vec<Option<StatusResponse>> =
                futures::future::join_all((0..self.n()).map(|r| self.cluster.status(r))).await;
            if is_whole(&statuses) {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= timeout {
                return Err(format!(
                    "not every server was a serving member of one view within {timeout:?}: {}",
                    describe(&statuses)
                ));
            }
            tokio::time::sleep(POLL * 2).await;
        }
    }

    async fn inject(&mut self, fault: Fault, hold: &mut Duration) -> Result<String, String> {
        let n = self.n();
        let io = |e: std::io::Error| e.to_string();
        // Two faults at once only where a minority can take both.
        let overlap = self.budget() >= 2;
        let hand_off = format!("a hand-off: {n} servers survive one fault at a time");
        match fault {
            Fault::Kill => {
                let (rank, _) = self.victim().await;
                self.kill(rank)?;
                Ok(format!("kill -9 server {rank}"))
            }
            Fault::Pause => {
                let (rank, _) = self.victim().await;
                *hold = (*hold).max(self.timing.min_pause);
                self.cluster.pause(rank).map_err(io)?;
                self.paused.insert(rank);
                Ok(format!("SIGSTOP server {rank}"))
            }
            Fault::IsolatePrimary => {
                let rank = match self.primary().await {
                    Some(p) => p,
                    None => self.rng.random_range(0..n),
                };
                self.admin.apply(&cut(n, &BTreeSet::from([rank]))).await?;
                Ok(format!("isolate server {rank} (primary)"))
            }
            Fault::IsolateBackup => {
                let (rank, primary) = self.backup().await;
                self.admin.apply(&cut(n, &BTreeSet::from([rank]))).await?;
                Ok(format!(
                    "isolate server {rank} (a backup; primary {primary:?})"
                ))
            }
            Fault::OneWay => {
                // Between the primary and a backup, in a random direction:
                // either the primary cannot reach it (and must drop it) or it
                // cannot reach the primary (and must not depose it alone).
                let (backup, primary) = self.backup().await;
                let other = primary.unwrap_or((backup + 1) % n);
                let (from, to) = self.either_way(other, backup);
                self.admin.apply(&one_way(n, from, to)).await?;
                Ok(format!(
                    "drop requests {from} -> {to} (primary {primary:?})"
                ))
            }
            Fault::DropResponse => {
                let (backup, primary) = self.backup().await;
                let other = primary.unwrap_or((backup + 1) % n);
                // Replies to the primary's appends lost (it must not count
                // them, nor apply anything twice), or replies to the
                // backup's forwarded writes lost (the client retries them:
                // exactly-once).
                let (from, to) = self.either_way(other, backup);
                let mut rules = vec![Vec::new(); n];
                rules[from].push(rule(
                    to,
                    FaultKind::DropResponse,
                    FaultDirection::Outgoing,
                    0,
                ));
                self.admin.apply(&rules).await?;
                Ok(format!(
                    "lose replies to requests {from} -> {to} (primary {primary:?})"
                ))
            }
            Fault::Majority => {
                let mut ranks: Vec<usize> = (0..n).collect();
                ranks.shuffle(&mut self.rng);
                let minority: BTreeSet<usize> = ranks[..n / 2].iter().copied().collect();
                let majority: BTreeSet<usize> = ranks[n / 2..].iter().copied().collect();
                let primary = self.primary().await;
                self.admin.apply(&cut(n, &minority)).await?;
                Ok(format!(
                    "partition {majority:?} | {minority:?} (primary {primary:?})"
                ))
            }
            Fault::Delay => {
                let mut rules = vec![Vec::new(); n];
                let mut links = Vec::new();
                for a in 0..n {
                    for b in a + 1..n {
                        if self.rng.random_bool(0.4) {
                            let ms = self.rng.random_range(20..300);
                            rules[a].push(rule(b, FaultKind::Delay, FaultDirection::Both, ms));
                            rules[b].push(rule(a, FaultKind::Delay, FaultDirection::Both, ms));
                            links.push(format!("{a}-{b} {ms} ms"));
                        }
                    }
                }
                self.admin.apply(&rules).await?;
                Ok(format!("delay links [{}]", links.join(", ")))
            }
            Fault::CrashAll => {
                for rank in 0..n {
                    self.kill(rank)?;
                }
                Ok("kill -9 every server".to_owned())
            }
            Fault::DiskError => {
                let (rank, _) = self.victim().await;
                self.admin
                    .send(
                        rank,
                        FaultRequest {
                            fail_storage: true,
                            ..Default::default()
                        },
                    )
                    .await?;
                // It is expected to stop serving, possibly by exiting.
                self.down.insert(rank);
                Ok(format!("fail the next storage flush of server {rank}"))
            }
            Fault::Wipe => {
                let (rank, role) = self.victim().await;
                self.kill(rank)?;
                self.wipe(rank)?;
                let delay = self.random_between(Duration::ZERO, WIPE_RESTART_MAX);
                tokio::time::sleep(delay).await;
                self.restart(rank)?;
                Ok(format!(
                    "kill -9 server {rank} ({role}), wipe its data, restart it {} ms later",
                    delay.as_millis()
                ))
            }
            Fault::RestartAllWiped => {
                let mut order: Vec<usize> = (0..n).collect();
                order.shuffle(&mut self.rng);
                let mut steps = Vec::new();
                for (i, &rank) in order.iter().enumerate() {
                    let gap = if i == 0 {
                        Duration::ZERO
                    } else {
                        self.random_between(Duration::ZERO, RESTART_GAP_MAX)
                    };
                    tokio::time::sleep(gap).await;
                    let how = if self.rng.random_bool(0.5) {
                        self.kill(rank)?;
                        "kill -9"
                    } else {
                        self.terminate(rank)?;
                        "SIGTERM"
                    };
                    steps.push(format!("+{} ms {how} {rank}", gap.as_millis()));
                }
                // Never the last one standing: it may have acknowledged
                // writes alone (a view shrinks down to its primary, docs/design.md
                // §5), and its disk would hold their only copy. Nor, unless
                // asked, the one stopped before it: it may be the primary of
                // the last view, with the last one as its only backup, and
                // without its vote the other member is no quorum (exactly
                // half, without the primary), so the cluster could never
                // serve again. Any server stopped earlier is either out of
                // the last view or one of at least three members of it.
                let candidates = if self.wipe_late_stopped { n - 1 } else { n - 2 };
                let wiped = *order[..candidates.min(n)]
                    .choose(&mut self.rng)
                    .ok_or("a whole-cluster restart with a wiped disk needs 3 servers")?;
                self.wipe(wiped)?;
                self.restart_gaps = true;
                Ok(format!(
                    "stop every server [{}], wipe server {wiped}",
                    steps.join(", ")
                ))
            }
            Fault::PartitionKill => {
                let (killed, role) = self.victim().await;
                let isolated = self.other_than(killed);
                self.admin
                    .apply(&cut(n, &BTreeSet::from([isolated])))
                    .await?;
                if overlap {
                    self.kill(killed)?;
                    return Ok(format!(
                        "isolate server {isolated} and kill -9 server {killed} ({role}) at once"
                    ));
                }
                let first = self.random_hold();
                tokio::time::sleep(first).await;
                self.heal_network().await;
                self.kill(killed)?;
                Ok(format!(
                    "isolate server {isolated} for {} ms, then heal it and kill -9 server {killed} ({role}) at once ({hand_off})",
                    first.as_millis()
                ))
            }
            Fault::PauseRestart => {
                let (killed, role) = self.victim().await;
                let paused = self.other_than(killed);
                self.cluster.pause(paused).map_err(io)?;
                self.paused.insert(paused);
                let how = if overlap {
                    *hold = (*hold).max(self.timing.min_pause);
                    format!("pause server {paused}; kill -9 server {killed} ({role})")
                } else {
                    let first = self.random_hold().max(self.timing.min_pause);
                    tokio::time::sleep(first).await;
                    self.cluster.resume(paused).map_err(io)?;
                    self.paused.remove(&paused);
                    format!(
                        "pause server {paused} for {} ms, then resume it and kill -9 server {killed} ({role}) at once",
                        first.as_millis()
                    )
                };
                self.kill(killed)?;
                let delay = self.random_between(Duration::ZERO, WIPE_RESTART_MAX);
                tokio::time::sleep(delay).await;
                self.restart(killed)?;
                let mut description =
                    format!("{how}, restart {killed} {} ms later", delay.as_millis());
                if !overlap {
                    let _ = write!(description, " ({hand_off})");
                }
                Ok(description)
            }
            Fault::KillTransfer => {
                let primary = self.primary().await.ok_or("no primary to crash")?;
                let wiped = self.other_than(primary);
                self.kill(wiped)?;
                self.wipe(wiped)?;
                // Dropping the member is a view change whose reconcile is a
                // (small) transfer from the primary too; the crash is meant
                // for the wiped server's catch-up.
                let dropped = self.wait_dropped(primary, wiped, DROP_WAIT).await;
                self.arm(primary, "transferring").await?;
                self.restart(wiped)?;
                let how = if self.wait_exit(primary, TRANSFER_WAIT).await {
                    "it crashed there"
                } else {
                    self.kill(primary)?;
                    "it did not get there in time: kill -9 it"
                };
                self.armed.remove(&primary);
                self.down.insert(primary);
                Ok(format!(
                    "kill -9 backup {wiped}, wipe its data, restart it{}; primary {primary} armed to crash at 'transferring': {how}",
                    if dropped { " once the primary dropped it" } else { "" }
                ))
            }
            Fault::PartitionViewChange => {
                let primary = self.primary().await.ok_or("no primary to kill")?;
                let isolated = self.other_than(primary);
                let window = self.timing.view_change;
                let iso = self.random_between(Duration::from_millis(300), window);
                let mut rules = cut(n, &BTreeSet::from([isolated]));
                let description = if overlap {
                    self.kill(primary)?;
                    // The dead primary takes no rules; the isolated server's
                    // own rules cut its side of their link, and the primary
                    // restarts only after the isolation is healed.
                    rules[primary].clear();
                    self.admin.apply(&rules).await?;
                    tokio::time::sleep(iso).await;
                    format!(
                        "kill -9 primary {primary} and isolate server {isolated} at once; heal the isolation {} ms later",
                        iso.as_millis()
                    )
                } else {
                    self.kill(primary)?;
                    let into = self.random_between(Duration::from_millis(300), window);
                    tokio::time::sleep(into).await;
                    // The old primary comes back (recovering, a voter of
                    // the old view) as the backup is cut off mid-way.
                    self.restart(primary)?;
                    self.admin.apply(&rules).await?;
                    tokio::time::sleep(iso).await;
                    format!(
                        "kill -9 primary {primary}; {} ms into the view change restart it and isolate server {isolated} at once; heal the isolation {} ms later ({hand_off})",
                        into.as_millis(),
                        iso.as_millis()
                    )
                };
                self.heal_network().await;
                *hold = (*hold).max(window);
                Ok(description)
            }
            Fault::CrashAt => {
                let primary = self.primary().await.ok_or("no primary to kill")?;
                let step = *CRASH_STEPS.choose(&mut self.rng).unwrap_or(&"promised");
                let armed = self.reaches(step, primary);
                self.arm(armed, step).await?;
                self.kill(primary)?;
                let window = self.timing.view_change;
                tokio::time::sleep(window).await;
                // Still armed: the old primary's return is a second view
                // change (a join) and a state transfer.
                self.restart(primary)?;
                Ok(format!(
                    "arm server {armed} to crash at '{step}', kill -9 primary {primary}, restart it {} ms later",
                    window.as_millis()
                ))
            }
            Fault::Partition | Fault::Combined | Fault::All => {
                Err("not a concrete fault".to_owned())
            }
        }
    }

    /// Undoes every fault: resumes paused servers, disarms armed crashes,
    /// restarts the servers that are down (in random order, as after a power
    /// cut; one by one with random gaps after a whole-cluster restart),
    /// removes all network rules; notes any server that stopped on its own.
    /// Returns notes for the round's description.
    pub async fn heal(&mut self) -> Vec<String> {
        let mut notes = Vec::new();
        for rank in std::mem::take(&mut self.paused) {
            if let Err(e) = self.cluster.resume(rank) {
                warn!(rank, error = %e, "nemesis: cannot resume");
            }
        }
        for (rank, step) in std::mem::take(&mut self.armed) {
            if self.cluster.is_running(rank) {
                // A heal request also disarms: from here on it cannot crash.
                for error in self.admin.heal([rank]).await {
                    warn!(%error, "nemesis: cannot disarm");
                }
            }
            if self.cluster.is_running(rank) {
                notes.push(format!("server {rank} did not reach '{step}'"));
            } else {
                notes.push(format!("server {rank} crashed at '{step}'"));
                self.down.insert(rank);
            }
        }
        for rank in 0..self.n() {
            if !self.down.contains(&rank) && !self.cluster.is_running(rank) {
                let at = self.clock.now() as f64 / 1e9;
                warn!(rank, "server exited on its own");
                self.unexpected_exits
                    .push(format!("server {rank} was found exited at {at:.3} s"));
                self.down.insert(rank);
            }
        }
        let mut down: Vec<usize> = std::mem::take(&mut self.down).into_iter().collect();
        down.shuffle(&mut self.rng);
        let gaps = std::mem::take(&mut self.restart_gaps);
        let mut steps = Vec::new();
        for (i, &rank) in down.iter().enumerate() {
            if gaps && i > 0 {
                let gap = self.random_between(Duration::ZERO, RESTART_GAP_MAX);
                tokio::time::sleep(gap).await;
                steps.push(format!("+{} ms {rank}", gap.as_millis()));
            } else {
                steps.push(rank.to_string());
            }
            if let Err(e) = self.cluster.restart(rank) {
                warn!(rank, error = %e, "nemesis: cannot restart");
            }
        }
        if gaps {
            notes.push(format!("restart [{}]", steps.join(", ")));
        }
        self.heal_network().await;
        notes
    }
}

/// Whether every server answered as a serving member of one view that has
/// every server in it, with one primary.
pub fn is_whole(statuses: &[Option<StatusResponse>]) -> bool {
    let n = statuses.len();
    let Some(answers) = statuses
        .iter()
        .map(Option::as_ref)
        .collect::<Option<Vec<&StatusResponse>>>()
    else {
        return false;
    };
    let Some(view) = answers.first().and_then(|s| s.view.as_ref()) else {
        return false;
    };
    let everyone = (0..n as u32).all(|r| view.members.contains(&r));
    let primaries = answers.iter().filter(|s| s.role == "primary").count();
    everyone
        && primaries == 1
        && answers.iter().all(|s| {
            s.serving
                && matches!(s.role.as_str(), "primary" | "backup")
                && s.view.as_ref().map(|v| v.epoch) == Some(view.epoch)
        })
}

/// What each server said, for an error message.
fn describe(statuses: &[Option<StatusResponse>]) -> String {
    statuses
        .iter()
        .enumerate()
        .map(|(rank, s)| match s {
            Some(s) => format!(
                "[{rank}: {} epoch {} serving {} applied {}]",
                s.role,
                s.view.as_ref().map_or(0, |v| v.epoch),
                s.serving,
                s.applied
            ),
            None => format!("[{rank}: no answer]"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_expand_to_concrete_faults() {
        assert_eq!(
            Fault::expand(&[Fault::Partition, Fault::Kill, Fault::IsolatePrimary]),
            [Fault::Kill, Fault::IsolatePrimary, Fault::IsolateBackup]
        );
        let all = Fault::expand(&[Fault::All]);
        assert_eq!(all.len(), 17);
        for group in [Fault::All, Fault::Partition, Fault::Combined] {
            assert!(!all.contains(&group), "{group:?} is not concrete");
        }
        for fault in [
            Fault::Wipe,
            Fault::RestartAllWiped,
            Fault::CrashAt,
            Fault::PartitionKill,
            Fault::PauseRestart,
            Fault::KillTransfer,
            Fault::PartitionViewChange,
        ] {
            assert!(all.contains(&fault), "{fault:?} is in all");
        }
        assert_eq!(
            Fault::expand(&[Fault::Combined, Fault::Wipe]),
            [
                Fault::Wipe,
                Fault::PartitionKill,
                Fault::PauseRestart,
                Fault::KillTransfer,
                Fault::PartitionViewChange
            ]
        );
    }

    #[test]
    fn command_line_names_are_kebab_case() {
        assert_eq!(Fault::RestartAllWiped.name(), "restart-all-wiped");
        assert_eq!(Fault::CrashAt.name(), "crash-at");
        let parsed = <Fault as clap::ValueEnum>::from_str("kill-transfer", false);
        assert_eq!(parsed, Ok(Fault::KillTransfer));
    }

    #[test]
    fn only_disk_faults_lose_a_disk_and_combined_ones_need_three_servers() {
        let disk: Vec<Fault> = Fault::expand(&[Fault::All])
            .into_iter()
            .filter(|f| f.loses_a_disk())
            .collect();
        assert_eq!(
            disk,
            [Fault::Wipe, Fault::RestartAllWiped, Fault::KillTransfer]
        );
        assert!(Fault::expand(&[Fault::Combined])
            .iter()
            .all(|f| f.min_servers() == 3));
        assert_eq!(Fault::RestartAllWiped.min_servers(), 3);
        assert_eq!(Fault::Kill.min_servers(), 1);
    }

    fn member(role: &str, epoch: u64, members: &[u32], serving: bool) -> Option<StatusResponse> {
        Some(StatusResponse {
            view: Some(replikv_proto::kv::View {
                epoch,
                primary: 0,
                members: members.to_vec(),
                config: None,
            }),
            role: role.into(),
            serving,
            ..Default::default()
        })
    }

    #[test]
    fn whole_means_every_server_serves_in_one_full_view() {
        let all = [0, 1, 2];
        let whole = vec![
            member("primary", 7, &all, true),
            member("backup", 7, &all, true),
            member("backup", 7, &all, true),
        ];
        assert!(is_whole(&whole));
        let mut rejoining = whole.clone();
        rejoining[2] = member("recovering", 7, &all, false);
        assert!(!is_whole(&rejoining), "a server still catching up");
        let mut dropped = whole.clone();
        for s in dropped.iter_mut().take(2) {
            *s = member(&s.as_ref().unwrap().role, 8, &[0, 1], true);
        }
        dropped[2] = member("backup", 7, &all, true);
        assert!(!is_whole(&dropped), "a member dropped, another epoch");
        let mut silent = whole.clone();
        silent[1] = None;
        assert!(!is_whole(&silent));
        let mut two = whole;
        two[1] = member("primary", 7, &all, true);
        assert!(!is_whole(&two));
    }
}
