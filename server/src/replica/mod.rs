//! The replica, grouped by protocol step (docs/design.md §4-§7). The decisions are the engine's
//! (`crate::engine`); the files here only execute them: read and write storage, talk to
//! peers, run the background tasks.
//!
//! - this file: the replica's state, opening, role changes (become primary, step down), the
//!   commit point as writers and readers see it, `Status`.
//! - [`write`]: one client write's journey: forward or sequence, apply, group commit, wait
//!   for the commit; the session collector.
//! - [`read`]: linearizable local reads.
//! - [`append`]: both ends of the primary's append stream.
//! - [`viewchange`]: Paxos view changes, install and reconcile.
//! - [`transfer`]: state transfer (source and sink) and joins.
//! - [`membership`]: membership changes asked for by an operator (docs/design.md §11).
//! - [`monitor`]: start-up discovery, the failure monitor, revival.
//! - [`tasks`]: the one owner of every background task, which stops them on shutdown.
//!
//! Locking: `state` is a `std::sync::Mutex` held only for short, await-free sections;
//! `data` (a tokio mutex) serialises every change to stored data and the log position (the
//! sequencer's batches, applied appends, state transfers), and may be held across awaits;
//! `data` is always taken before `state`, never the other way round.

mod append;
mod membership;
mod monitor;
mod read;
mod tasks;
mod transfer;
mod viewchange;
mod write;

use write::WriteOp;
pub use write::{CasReq, RangeDeleteReq, WriteReq};

pub use viewchange::Reason;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::{error, info, warn};

use crate::clock::Clocks;
use crate::config::Config;
use crate::engine::commit;
use crate::engine::Time;
use crate::error::{PrimaryHint, StorageError};
use crate::fault::Faults;
use crate::identity::{Identity, Membership};
use crate::limits::TransferPool;
use crate::network::PeerNetwork;
use crate::storage::Store;
use crate::types::{Configuration, Rank, Record, View};

/// The replica's protocol state: the engine's (docs/design.md §4, §5); this module only executes
/// what the engine decides.
pub(crate) use crate::engine::State;

/// Most writes in flight on a primary before new ones get RESOURCE_EXHAUSTED.
const MAX_WRITES_IN_FLIGHT: usize = 16 * 1024;

/// The commit point as readers and write waiters see it. `term` changes whenever this server
/// stops being primary: writes it sequenced but had not committed then have unknown outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitPoint {
    pub committed: u64,
    pub term: u64,
}

/// What `Status` shows of a replica (docs/design.md §9).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub rank: Rank,
    pub address: String,
    pub view: View,
    /// primary, backup, recovering, joining or amnesiac.
    pub role: &'static str,
    pub applied: u64,
    pub committed: u64,
    /// What is left of its read lease.
    pub lease: Option<Duration>,
    pub peers: Vec<PeerProgress>,
    pub writes: u64,
    pub flushes: u64,
    pub promised: u64,
    pub sync_mode: &'static str,
    /// Whether it answers reads now.
    pub serving: bool,
}

/// One server as its peer sees it in `Status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerProgress {
    pub rank: Rank,
    pub address: String,
    pub member: bool,
    /// On the primary: the highest lsn it acknowledged (its own: flushed).
    pub acked: u64,
}

/// Writes waiting on the primary for their commit.
#[derive(Default)]
struct CommitWaiters {
    committed: u64,
    term: u64,
    waiting: BTreeMap<u64, Vec<oneshot::Sender<bool>>>,
}

pub struct Node {
    pub(crate) cfg: Config,
    pub(crate) me: Rank,
    /// The configuration of `--peers` (or fetched by `--join`): what this server uses until
    /// its view holds one (docs/design.md §11).
    pub(crate) seed: Configuration,
    pub(crate) store: Store,
    pub(crate) net: Arc<dyn PeerNetwork>,
    pub(crate) faults: Arc<Faults>,
    /// This server's cluster id, once known (docs/design.md §10); the network sends it on
    /// every call.
    pub(crate) identity: Arc<Identity>,
    /// Held while Paxos state is written, so that writes reach the disk in the order the
    /// state changed (each writes the latest view, promise and accepted proposal).
    paxos_io: tokio::sync::Mutex<()>,
    /// See the module doc: short sections only, never held across an await.
    pub(crate) state: Mutex<State>,
    pub(crate) data: tokio::sync::Mutex<()>,
    /// One view change at a time from this server.
    pub(crate) proposing: tokio::sync::Mutex<()>,
    /// One membership change at a time (docs/design.md §11).
    changing_membership: tokio::sync::Mutex<()>,
    pub(crate) commit_tx: watch::Sender<CommitPoint>,
    /// Writes waiting for their lsn to commit, woken one by one by `publish_commit`.
    /// `std::sync::Mutex`: short sections, taken after `state`, never across an await.
    write_waiters: Mutex<CommitWaiters>,
    /// (epoch, lsn) the primary applied last and the flusher has to make durable.
    dirty_tx: watch::Sender<(u64, u64)>,
    write_tx: mpsc::Sender<WriteOp>,
    write_rx: Mutex<Option<mpsc::Receiver<WriteOp>>>,
    write_permits: Arc<Semaphore>,
    /// Catch-up transfers this server serves at once (`--max-transfers`).
    pub(crate) transfers: TransferPool,
    /// Every background task; stopped together on shutdown.
    tasks: tasks::Tasks,
    /// The clocks handed to the engine.
    pub(crate) clock: Clocks,
    /// One ordered feed of record batches per backup while this server is primary; dropping
    /// them stops the replicators. `std::sync::Mutex`: taken only inside `state`, briefly.
    feeds: Mutex<Vec<mpsc::UnboundedSender<Arc<[Record]>>>>,
    /// Highest ballot seen anywhere, so a proposer's next ballot beats it.
    pub(crate) max_ballot: std::sync::atomic::AtomicU64,
    /// Set when the server shuts down: long-lived calls end so the shutdown need not wait.
    stopping: watch::Sender<bool>,
    /// Prometheus metrics (docs/design.md §12).
    pub metrics: crate::metrics::Metrics,
}

impl Node {
    /// Opens the replica from its stored state. A server with no stored view boots into the
    /// initial view as a member only if no peer knows of anything newer (checked by the
    /// caller through [`Node::boot`]); one with a stored view restarts as non-member and
    /// rejoins (§7).
    pub fn open(
        cfg: Config,
        store: Store,
        net: Arc<dyn PeerNetwork>,
        faults: Arc<Faults>,
        identity: Arc<Identity>,
    ) -> Result<Arc<Node>, StorageError> {
        let meta = store.load_meta()?;
        let seed = cfg.seed.clone();
        let me = cfg.rank;
        // Every server restarts as a non-member and becomes one again only through an
        // install (§7); one without state first finds its cluster (`boot`).
        let (mut view, amnesiac_until) = match (meta.cluster, meta.view) {
            (Some(m), view) => {
                identity.set(m.cluster);
                (view.unwrap_or_else(View::bootstrap), m.amnesiac_until)
            }
            (None, None) => (View::bootstrap(), None),
            (None, Some(_)) => {
                return Err(StorageError::Corrupt(
                    "the data directory holds a view but no cluster id (m/cluster); \
                     wipe it and let the server rejoin"
                        .into(),
                ))
            }
        };
        if view.config.is_none() {
            // A view stored before configurations were part of it: the static list was its
            // configuration (docs/design.md §11).
            view.config = Some(seed.clone());
        }
        net.configure(view.config.as_ref().unwrap_or(&seed));
        let clock = Clocks::new();
        let (write_tx, write_rx) = mpsc::channel(MAX_WRITES_IN_FLIGHT);
        let (commit_tx, _) = watch::channel(CommitPoint {
            committed: meta.position.committed,
            term: 0,
        });
        let max_ballot = meta.promise.ballot.max(view.epoch);
        let metrics = crate::metrics::Metrics::new();
        for c in store.flush_metrics.collectors() {
            metrics.register(c);
        }
        let node = Node {
            metrics,
            me,
            seed,
            store,
            net,
            faults,
            state: Mutex::new(State::restarted(
                view,
                meta.promise,
                meta.accepted,
                meta.position,
                amnesiac_until,
                clock.steady_now(),
            )),
            clock,
            tasks: tasks::Tasks::new(),
            feeds: Mutex::new(Vec::new()),
            data: tokio::sync::Mutex::new(()),
            proposing: tokio::sync::Mutex::new(()),
            changing_membership: tokio::sync::Mutex::new(()),
            commit_tx,
            write_waiters: Mutex::new(CommitWaiters {
                committed: meta.position.committed,
                ..Default::default()
            }),
            dirty_tx: watch::channel((0, 0)).0,
            write_tx,
            write_rx: Mutex::new(Some(write_rx)),
            write_permits: Arc::new(Semaphore::new(MAX_WRITES_IN_FLIGHT)),
            transfers: TransferPool::new(cfg.capacity.max_transfers),
            max_ballot: max_ballot.into(),
            identity,
            paxos_io: tokio::sync::Mutex::new(()),
            stopping: watch::channel(false).0,
            cfg,
        };
        Ok(Arc::new(node))
    }

    /// Starts the replica in the background (see [`Node::boot`]).
    pub fn start(self: &Arc<Self>) {
        let node = self.clone();
        self.tasks.spawn(async move { node.boot().await });
    }

    /// Stops the replica: the streaming calls it answers end, and every background task
    /// stops (the one shutdown path).
    pub async fn stop(&self) {
        self.stop_streams();
        self.tasks.stop().await;
    }

    /// Ends the streaming calls this server answers (see [`Node::stopped`]).
    pub(crate) fn stop_streams(&self) {
        self.stopping.send_replace(true);
    }

    /// Completes once the server shuts down; a streaming call's answers end with it.
    pub(crate) fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stopping = self.stopping.subscribe();
        async move {
            let _ = stopping.wait_for(|s| *s).await;
        }
    }

    pub(crate) fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("replica state lock poisoned")
    }

    /// Starts the background tasks: the sequencer, the flusher and the monitor (silence
    /// detection, revival). A server without state first finds its cluster or forms one.
    pub async fn boot(self: &Arc<Self>) {
        if self.identity.get().is_none() {
            self.find_cluster().await;
        }
        let rx = self.write_rx.lock().expect("write rx lock").take();
        if let Some(rx) = rx {
            self.tasks.spawn(self.clone().sequencer(rx));
            self.tasks
                .spawn(self.clone().flusher(self.dirty_tx.subscribe()));
        }
        self.tasks.spawn(self.clone().monitor());
    }

    /// Persists the current view, promise and accepted proposal, in the order they changed:
    /// call after changing them and before any reply that depends on them (docs/design.md §10).
    pub(crate) async fn persist_paxos(&self) {
        let _io = self.paxos_io.lock().await;
        let (view, promise, accepted) = {
            let st = self.st();
            (st.view.clone(), st.promise, st.accepted.clone())
        };
        self.store
            .save_paxos(Some(&view), Some(promise), Some(accepted.as_ref()))
            .await
            .or_fail_stop(self);
        self.net.configure(&self.configuration());
    }

    /// The configuration of this server's view (docs/design.md §11), or the seed while it holds
    /// none.
    pub(crate) fn configuration(&self) -> Configuration {
        self.st()
            .view
            .config
            .clone()
            .unwrap_or_else(|| self.seed.clone())
    }

    /// Ranks run below this bound: the rank the next added server would get.
    pub(crate) fn rank_bound(&self) -> usize {
        self.rank_bound_of(&self.st())
    }

    /// [`Node::rank_bound`] under a lock the caller holds.
    pub(crate) fn rank_bound_of(&self, st: &State) -> usize {
        st.view.config.as_ref().unwrap_or(&self.seed).next_rank as usize
    }

    /// A server removed from the configuration serves no client (docs/design.md §11): the
    /// client goes to another server.
    pub(crate) fn refuse_if_removed(&self) -> Result<(), crate::error::ServeError> {
        if self.st().view.in_config(self.me) {
            return Ok(());
        }
        Err(crate::error::ServeError::Unavailable {
            reason: format!(
                "this server (rank {}) was removed from the cluster's configuration",
                self.me
            ),
            primary: None,
            outcome: crate::error::Outcome::None,
        })
    }

    /// An install made this server a synced member of `view`: an amnesiac server votes
    /// again once that view is newer than anything it heard of when it lost its state.
    pub(crate) async fn end_amnesia_if_past(&self, view: &View) {
        let ended = self.st().end_amnesia_if_past(view);
        if let (true, Some(id)) = (ended, self.identity.get()) {
            let m = Membership {
                cluster: id,
                amnesiac_until: None,
            };
            self.store
                .save_membership(&m, None)
                .await
                .or_fail_stop(self);
            info!(
                epoch = view.epoch,
                "rejoined through a state transfer: voting again"
            );
        }
    }

    /// Storage failed: stop serving rather than acknowledge what may not be durable (§3).
    pub(crate) fn fail_stop(&self, e: StorageError) -> ! {
        error!(error = %e, "storage failure: stopping (fail-stop)");
        std::process::exit(crate::FAIL_STOP_EXIT);
    }
}

/// Every storage call on the replica's paths either succeeds or stops the server (§3).
pub(crate) trait OrFailStop<T> {
    fn or_fail_stop(self, node: &Node) -> T;
}

impl<T> OrFailStop<T> for Result<T, StorageError> {
    fn or_fail_stop(self, node: &Node) -> T {
        self.unwrap_or_else(|e| node.fail_stop(e))
    }
}

impl Node {
    pub(crate) fn hint(&self, st: &State) -> Option<PrimaryHint> {
        let config = st.view.config.as_ref().unwrap_or(&self.seed);
        Some(PrimaryHint {
            rank: st.view.primary,
            addr: config.servers.get(&st.view.primary)?.client.clone(),
        })
    }

    pub(crate) fn publish_commit(&self, st: &State) {
        let mut w = self.write_waiters.lock().expect("write waiters lock");
        if w.term != st.term {
            // This server stopped being primary: every write it was waiting on is unknown.
            w.term = st.term;
            for (_, senders) in std::mem::take(&mut w.waiting) {
                for s in senders {
                    let _ = s.send(false);
                }
            }
        }
        w.committed = st.pos.committed;
        let later = w.waiting.split_off(&(st.pos.committed + 1));
        for (_, senders) in std::mem::replace(&mut w.waiting, later) {
            for s in senders {
                let _ = s.send(true);
            }
        }
        drop(w);
        self.commit_tx.send_if_modified(|c| {
            let next = CommitPoint {
                committed: st.pos.committed,
                term: st.term,
            };
            let changed = *c != next;
            *c = next;
            changed
        });
    }

    // ---------------------------------------------------------------- primary role

    /// Takes the primary role for `view` (see [`State::become_primary`]) and starts one
    /// ordered stream per backup.
    pub(crate) fn become_primary(
        self: &Arc<Self>,
        view: &View,
        serve_after: Time,
        commit_after: Time,
        synced: &std::collections::BTreeSet<Rank>,
    ) {
        self.metrics.view_changes.inc();
        let mut st = self.st();
        st.become_primary(
            view,
            serve_after,
            commit_after,
            synced,
            self.clock.boot_now(),
        );
        let start = (st.pos.applied, st.pos.last_epoch);
        let mut feeds = Vec::new();
        for m in view.backups() {
            // A member now: its acknowledgements bound collection from here on.
            self.store.release_transfer_hold(m);
            let (tx, rx) = mpsc::unbounded_channel();
            feeds.push(tx);
            self.tasks
                .spawn(self.clone().replicate_to(m, view.epoch, rx, start));
        }
        *self.feeds.lock().expect("feeds lock") = feeds;
        info!(epoch = view.epoch, members = ?view.members, applied = start.0, "serving as primary");
        self.advance_commit(&mut st);
        self.publish_commit(&st);
    }

    /// What giving up the primary role takes besides the state change (see
    /// [`State::step_down`]): the streams stop, and waiting writes learn the new term.
    pub(crate) fn stepped_down(&self, st: &State) {
        self.feeds_stop();
        warn!(epoch = st.view.epoch, "no longer primary");
        self.publish_commit(st);
    }

    /// Drops the primary's feeds, which ends its streams to the members.
    pub(crate) fn feeds_stop(&self) {
        self.feeds.lock().expect("feeds lock").clear();
    }

    /// Moves the commit point as far as the engine allows (see
    /// [`commit::advance_commit`]), and wakes itself when a lease gate opens.
    pub(crate) fn advance_commit(self: &Arc<Self>, st: &mut State) {
        let a = commit::advance_commit(st, self.clock.steady_now());
        if let Some(at) = a.wake_at {
            let node = self.clone();
            let at = self.clock.steady_instant(at);
            self.tasks.spawn(async move {
                tokio::time::sleep_until(at).await;
                let mut st = node.st();
                commit::gate_woke(&mut st);
                node.advance_commit(&mut st);
            });
        }
        if a.moved {
            self.publish_commit(st);
        }
        if let Some(h) = a.collect_up_to {
            self.store.collect_up_to(h);
        }
    }

    /// Remaining lease of the primary (see [`commit::primary_lease`]).
    pub(crate) fn primary_lease(&self, st: &State) -> Option<Duration> {
        commit::primary_lease(st, self.cfg.timing.lease, self.clock.now())
    }

    /// Whether this server may answer reads now.
    pub(crate) fn can_read(&self, st: &State) -> bool {
        commit::can_read(st, self.cfg.timing.lease, self.clock.now())
    }

    /// Adopts a newer view learned from a peer. This server is not a synced member of it
    /// (it never received its install), so it stops serving and rejoins (§7).
    pub(crate) async fn learn_view(self: &Arc<Self>, view: View) {
        let adopted = {
            let mut st = self.st();
            let (epoch, primary) = (view.epoch, view.primary);
            let learned = st.learn_view(view);
            if learned.adopted() {
                info!(epoch, primary, "learned of a newer view; rejoining");
            }
            if learned == crate::engine::state::LearnOutcome::SteppedDown {
                self.stepped_down(&st);
            }
            learned.adopted()
        };
        if adopted {
            self.persist_paxos().await;
        }
    }

    /// Replica state for `Status`.
    pub fn status(&self) -> ReplicaStatus {
        let st = self.st();
        let lease = if st.primary.is_some() {
            self.primary_lease(&st)
        } else {
            commit::backup_lease(&st, self.clock.boot_now())
        };
        let config = st.view.config.as_ref().unwrap_or(&self.seed);
        let peers = config
            .servers
            .iter()
            .map(|(&r, addr)| {
                let addr = &addr.client;
                let acked = match &st.primary {
                    Some(p) if r == self.me => p.durable,
                    Some(p) => p.peers.get(&r).map_or(0, |x| x.acked),
                    None => 0,
                };
                PeerProgress {
                    rank: r,
                    address: addr.clone(),
                    member: st.view.is_member(r),
                    acked,
                }
            })
            .collect();
        ReplicaStatus {
            rank: self.me,
            address: config
                .servers
                .get(&self.me)
                .or(self.seed.servers.get(&self.me))
                .map_or_else(|| self.cfg.listen.to_string(), |s| s.client.clone()),
            view: st.view.clone(),
            role: st.role(self.me),
            applied: st.pos.applied,
            committed: st.pos.committed,
            lease,
            peers,
            writes: self.store.writes.load(std::sync::atomic::Ordering::Relaxed),
            flushes: self
                .store
                .flushes
                .load(std::sync::atomic::Ordering::Relaxed),
            promised: st.promise.ballot,
            sync_mode: self.cfg.sync.as_str(),
            serving: self.can_read(&st),
        }
    }
}

/// Runs a peer request's handler on a task of its own, to its end, and returns its answer.
/// The server drops a request's future at whatever await it is at when the sender goes
/// away (its process died, its connection or stream broke). An append stopped between
/// applying its records and counting them in the position left records in the store beyond
/// the position, so a new primary answered a retried write from a result at an lsn it had
/// not reached, and reused that lsn for a new write. Run this way, an append once taken is
/// handled whole; only its answer may be lost, as any answer may.
///
/// Only for handlers whose every wait is bounded without their caller: an append waits
/// for the data lock and the disk. A handler that waits on a peer while it holds the data
/// lock (an install's transfer) is bounded by its caller's deadline, and must stay
/// cancellable.
pub(crate) async fn to_the_end<T: Send + 'static>(
    handler: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    match tokio::spawn(handler).await {
        Ok(answer) => answer,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // The runtime is shutting down: no one is left to answer.
            Err(_) => std::future::pending().await,
        },
    }
}
