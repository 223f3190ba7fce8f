//! The nemesis: the faults of DESIGN.md §8, injected one at a time and healed
//! in between.
//!
//! Process faults (kill, pause, restart) go through [`LocalCluster`]; network
//! faults go through each server's Admin RPC, whose rules act only on
//! server-to-server traffic, so clients can still reach every live server.
//! A rule on server S about peer P covers the traffic between S and P, which
//! is why cutting a link takes a rule on both of its ends.

use std::collections::BTreeSet;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use replikv_proto::peer::admin_client::AdminClient;
use replikv_proto::peer::{FaultDirection, FaultKind, FaultRequest, FaultRule};
use replikv_server::cluster::LocalCluster;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use super::history::{Clock, NemesisEvent};

/// Deadline of one Admin RPC, connection included.
const ADMIN_DEADLINE: Duration = Duration::from_secs(1);
/// Attempts to heal a server before giving up on it (it may be restarting).
const HEAL_ATTEMPTS: usize = 3;
/// How long to look for the primary before a fault that targets it.
const FIND_PRIMARY: Duration = Duration::from_secs(3);

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
                    ]);
                }
                f => {
                    out.insert(*f);
                }
            }
        }
        out.into_iter().collect()
    }
}

/// The Admin (fault-injection) service of every server.
pub struct Admin {
    clients: Vec<AdminClient<Channel>>,
}

impl Admin {
    /// Prepares one lazily connected channel per server; no I/O yet.
    pub fn new(addrs: &[String]) -> Result<Self, String> {
        let clients = addrs
            .iter()
            .map(|addr| {
                Endpoint::from_shared(format!("http://{addr}"))
                    .map(|e| AdminClient::new(e.connect_timeout(ADMIN_DEADLINE).connect_lazy()))
                    .map_err(|e| format!("bad server address {addr:?}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { clients })
    }

    /// Replaces the rules of server `rank`.
    pub async fn send(&self, rank: usize, request: FaultRequest) -> Result<(), String> {
        let mut client = self
            .clients
            .get(rank)
            .ok_or_else(|| format!("no server {rank}"))?
            .clone();
        match tokio::time::timeout(ADMIN_DEADLINE, client.fault(request)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(format!(
                "server {rank}: {}: {}",
                status.code(),
                status.message()
            )),
            Err(_) => Err(format!(
                "server {rank}: no answer within {ADMIN_DEADLINE:?}"
            )),
        }
    }

    /// Installs `rules` (per rank) on every server that has some.
    pub async fn apply(&self, rules: &[Vec<FaultRule>]) -> Result<(), String> {
        let sends = rules
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.is_empty())
            .map(|(rank, r)| {
                self.send(
                    rank,
                    FaultRequest {
                        rules: r.clone(),
                        ..Default::default()
                    },
                )
            });
        let errors: Vec<String> = futures::future::join_all(sends)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Removes every rule on every server in `ranks`, retrying a little:
    /// a server that was just restarted may not listen yet (and then has no
    /// rules anyway, which is why the last failure is only reported).
    pub async fn heal(&self, ranks: impl IntoIterator<Item = usize>) -> Vec<String> {
        let heal_one = |rank: usize| async move {
            let mut last = Ok(());
            for attempt in 0..HEAL_ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                last = self
                    .send(
                        rank,
                        FaultRequest {
                            heal: true,
                            ..Default::default()
                        },
                    )
                    .await;
                if last.is_ok() {
                    break;
                }
            }
            last
        };
        futures::future::join_all(ranks.into_iter().map(heal_one))
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect()
    }
}

fn rule(peer: usize, kind: FaultKind, direction: FaultDirection, delay_ms: u32) -> FaultRule {
    FaultRule {
        peer: peer as u32,
        kind: kind as i32,
        direction: direction as i32,
        delay_ms,
    }
}

/// Rules that cut every link between `side` and the other servers, in both
/// directions, on both ends.
pub fn cut(n: usize, side: &BTreeSet<usize>) -> Vec<Vec<FaultRule>> {
    (0..n)
        .map(|a| {
            (0..n)
                .filter(|b| side.contains(&a) != side.contains(b))
                .map(|b| rule(b, FaultKind::Drop, FaultDirection::Both, 0))
                .collect()
        })
        .collect()
}

/// Rules under which the requests `from` sends to `to` are lost, while `to`
/// still reaches `from` (and gets its replies).
pub fn one_way(n: usize, from: usize, to: usize) -> Vec<Vec<FaultRule>> {
    let mut rules = vec![Vec::new(); n];
    rules[from].push(rule(to, FaultKind::Drop, FaultDirection::Outgoing, 0));
    rules[to].push(rule(from, FaultKind::Drop, FaultDirection::Incoming, 0));
    rules
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
}

/// Injects faults into a cluster it borrows, and records what it did.
pub struct Nemesis<'a> {
    cluster: &'a mut LocalCluster,
    admin: Admin,
    rng: StdRng,
    clock: Clock,
    timing: Timing,
    /// Servers this nemesis killed (or broke) and has not restarted yet.
    down: BTreeSet<usize>,
    paused: BTreeSet<usize>,
    events: Vec<NemesisEvent>,
    /// Servers found not running although the nemesis did not stop them.
    unexpected_exits: Vec<String>,
}

impl<'a> Nemesis<'a> {
    pub fn new(
        cluster: &'a mut LocalCluster,
        rng: StdRng,
        clock: Clock,
        timing: Timing,
    ) -> Result<Self, String> {
        let admin = Admin::new(&cluster.addrs())?;
        Ok(Self {
            cluster,
            admin,
            rng,
            clock,
            timing,
            down: BTreeSet::new(),
            paused: BTreeSet::new(),
            events: Vec::new(),
            unexpected_exits: Vec::new(),
        })
    }

    /// What was done, in order.
    pub fn events(&self) -> &[NemesisEvent] {
        &self.events
    }

    /// Servers that exited without being told to.
    pub fn unexpected_exits(&self) -> &[String] {
        &self.unexpected_exits
    }

    fn n(&self) -> usize {
        self.cluster.len()
    }

    /// Injects one fault, holds it, heals everything, and waits for the
    /// settle time.
    pub async fn round(&mut self, fault: Fault) {
        let start = self.clock.now();
        let mut hold = self.random_hold();
        let description = match self.inject(fault, &mut hold).await {
            Ok(description) => description,
            Err(e) => format!("{fault:?} failed to inject: {e}"),
        };
        info!(fault = ?fault, hold_ms = hold.as_millis() as u64, "nemesis: {description}");
        tokio::time::sleep(hold).await;
        self.heal().await;
        let end = self.clock.now();
        self.events.push(NemesisEvent {
            start,
            end,
            description,
        });
        tokio::time::sleep(self.timing.settle).await;
    }

    fn random_hold(&mut self) -> Duration {
        let (lo, hi) = self.timing.hold;
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

    /// The primary half of the time (when there is one), else any server.
    async fn victim(&mut self) -> usize {
        let n = self.n();
        if self.rng.random_bool(0.5) {
            if let Some(p) = self.primary().await {
                return p;
            }
        }
        self.rng.random_range(0..n)
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

    async fn inject(&mut self, fault: Fault, hold: &mut Duration) -> Result<String, String> {
        let n = self.n();
        let io = |e: std::io::Error| e.to_string();
        match fault {
            Fault::Kill => {
                let rank = self.victim().await;
                self.cluster.kill(rank).map_err(io)?;
                self.down.insert(rank);
                Ok(format!("kill -9 server {rank}"))
            }
            Fault::Pause => {
                let rank = self.victim().await;
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
                    self.cluster.kill(rank).map_err(io)?;
                    self.down.insert(rank);
                }
                Ok("kill -9 every server".to_owned())
            }
            Fault::DiskError => {
                let rank = self.victim().await;
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
            Fault::Partition | Fault::All => Err("not a concrete fault".to_owned()),
        }
    }

    /// Undoes every fault: resumes paused servers, restarts the ones this
    /// nemesis stopped (in random order, as after a power cut), removes all
    /// network rules; notes any server that stopped on its own.
    pub async fn heal(&mut self) {
        for rank in std::mem::take(&mut self.paused) {
            if let Err(e) = self.cluster.resume(rank) {
                warn!(rank, error = %e, "nemesis: cannot resume");
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
        for rank in down {
            if let Err(e) = self.cluster.restart(rank) {
                warn!(rank, error = %e, "nemesis: cannot restart");
            }
        }
        for error in self.admin.heal(0..self.n()).await {
            warn!(%error, "nemesis: heal failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(rules: &[Vec<FaultRule>]) -> Vec<(usize, u32, i32)> {
        rules
            .iter()
            .enumerate()
            .flat_map(|(s, r)| r.iter().map(move |r| (s, r.peer, r.direction)))
            .collect()
    }

    #[test]
    fn isolating_one_server_cuts_both_ends_of_each_of_its_links() {
        let rules = cut(3, &BTreeSet::from([1]));
        let both = FaultDirection::Both as i32;
        assert_eq!(
            links(&rules),
            [(0, 1, both), (1, 0, both), (1, 2, both), (2, 1, both)]
        );
    }

    #[test]
    fn majority_split_cuts_only_links_across_it() {
        let rules = cut(5, &BTreeSet::from([0, 3]));
        assert_eq!(links(&rules).len(), 2 * 2 * 3);
        assert!(rules[0].iter().all(|r| ![0, 3].contains(&r.peer)));
        assert!(rules[1].iter().all(|r| [0, 3].contains(&r.peer)));
    }

    #[test]
    fn one_way_drops_one_direction_on_both_ends() {
        let rules = one_way(3, 2, 0);
        assert_eq!(
            links(&rules),
            [
                (0, 2, FaultDirection::Incoming as i32),
                (2, 0, FaultDirection::Outgoing as i32)
            ]
        );
    }

    #[test]
    fn names_expand_to_concrete_faults() {
        assert_eq!(
            Fault::expand(&[Fault::Partition, Fault::Kill, Fault::IsolatePrimary]),
            [Fault::Kill, Fault::IsolatePrimary, Fault::IsolateBackup]
        );
        let all = Fault::expand(&[Fault::All]);
        assert_eq!(all.len(), 10);
        assert!(!all.contains(&Fault::All) && !all.contains(&Fault::Partition));
    }
}
