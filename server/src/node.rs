//! The replica: its state, the write path on the primary (sequencer, group commit, commit
//! point), linearizable local reads, and the member side of replication (DESIGN.md §4).
//! View changes live in `viewchange`, the primary's per-member streams in `replicate`, state
//! transfer and revival in `transfer`.
//!
//! Locking: `state` is a `std::sync::Mutex` held only for short, await-free sections;
//! `data` (a tokio mutex) serialises every change to stored data and the log position (the
//! sequencer's batches, applied appends, state transfers), and may be held across awaits;
//! `data` is always taken before `state`, never the other way round.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::clock::Clocks;
use crate::config::Config;
use crate::engine::append as appending;
use crate::engine::commit;
use crate::engine::sequencer::{self as sequencing, Admission};
use crate::engine::Time;
use crate::error::{PrimaryHint, ServeError, SessionRefusal, StorageError};
use crate::fault::Faults;
use crate::identity::{ClusterId, Identity, Membership};
use crate::message::{Append, AppendReply, DiscoverReply, Forward, RequestId};
use crate::network::{NetError, PeerNetwork, StatusKind};
use crate::session::{self, Decision, Header, SessionId, StoredResult, WriteResult};
use crate::storage::{Position, Store};
use crate::types::{
    session_header_item, session_of_header_item, session_result_item, user_item, Item, Rank,
    Record, View,
};

/// The replica's protocol state: the engine's (DESIGN.md §4, §5); this module only executes
/// what the engine decides.
pub(crate) use crate::engine::State;

/// Most writes one sequencer batch takes.
const MAX_BATCH: usize = 1024;
/// Most writes in flight on a primary before new ones get RESOURCE_EXHAUSTED.
const MAX_WRITES_IN_FLIGHT: usize = 16 * 1024;
/// Most session headers the sequencer keeps in memory.
const MAX_CACHED_SESSIONS: usize = 16 * 1024;
/// Most sessions collected in one sequencer batch.
const EXPIRE_BATCH: usize = 256;
/// How long a write waits for its commit before its outcome is reported unknown.
const COMMIT_WAIT: Duration = Duration::from_secs(5);
/// How long a read waits for a pending key's commit notice.
const PENDING_READ_WAIT: Duration = Duration::from_secs(1);
/// Deadline of a forwarded write.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(4);
/// Longest the primary's flusher waits for its last flush's writes to commit before it
/// flushes again (see `Node::flusher`).
const FLUSH_PACE: Duration = Duration::from_millis(2);

/// The commit point as readers and write waiters see it. `term` changes whenever this server
/// stops being primary: writes it sequenced but had not committed then have unknown outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitPoint {
    pub committed: u64,
    pub term: u64,
}

/// Writes waiting on the primary for their commit.
#[derive(Default)]
struct CommitWaiters {
    committed: u64,
    term: u64,
    waiting: BTreeMap<u64, Vec<oneshot::Sender<bool>>>,
}

/// A write as the replica sees it: `value: None` deletes.
#[derive(Clone, Debug)]
pub struct WriteReq {
    pub key: Bytes,
    pub value: Option<Bytes>,
    pub id: Option<RequestId>,
}

pub(crate) struct WriteOp {
    req: WriteReq,
    reply: oneshot::Sender<Result<(u64, WriteResult, u64), ServeError>>,
}

pub struct Node {
    pub(crate) cfg: Config,
    pub(crate) me: Rank,
    pub(crate) n: usize,
    pub(crate) store: Store,
    pub(crate) net: Arc<dyn PeerNetwork>,
    pub(crate) faults: Arc<Faults>,
    /// This server's cluster id, once known (DESIGN.md §10); the network sends it on every call.
    pub(crate) identity: Arc<Identity>,
    /// Held while Paxos state is written, so that writes reach the disk in the order the
    /// state changed (each writes the latest view, promise and accepted proposal).
    paxos_io: tokio::sync::Mutex<()>,
    /// See the module doc: short sections only, never held across an await.
    pub(crate) state: Mutex<State>,
    pub(crate) data: tokio::sync::Mutex<()>,
    /// One view change at a time from this server.
    pub(crate) proposing: tokio::sync::Mutex<()>,
    pub(crate) commit_tx: watch::Sender<CommitPoint>,
    /// Writes waiting for their lsn to commit, woken one by one by `publish_commit`.
    /// `std::sync::Mutex`: short sections, taken after `state`, never across an await.
    write_waiters: Mutex<CommitWaiters>,
    /// (epoch, lsn) the primary applied last and the flusher has to make durable.
    dirty_tx: watch::Sender<(u64, u64)>,
    write_tx: mpsc::Sender<WriteOp>,
    write_rx: Mutex<Option<mpsc::Receiver<WriteOp>>>,
    write_permits: Arc<Semaphore>,
    /// The clocks handed to the engine.
    pub(crate) clock: Clocks,
    /// One ordered feed of record batches per backup while this server is primary; dropping
    /// them stops the replicators. `std::sync::Mutex`: taken only inside `state`, briefly.
    feeds: Mutex<Vec<mpsc::UnboundedSender<Arc<[Record]>>>>,
    /// Highest ballot seen anywhere, so a proposer's next ballot beats it.
    pub(crate) max_ballot: std::sync::atomic::AtomicU64,
    /// Set when the server shuts down: long-lived calls end so the shutdown need not wait.
    stopping: watch::Sender<bool>,
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
        let n = cfg.peers.len();
        let me = cfg.rank;
        // Every server restarts as a non-member and becomes one again only through an
        // install (§7); one without state first finds its cluster (`boot`).
        let (view, amnesiac_until) = match (meta.cluster, meta.view) {
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
        let clock = Clocks::new();
        let (write_tx, write_rx) = mpsc::channel(MAX_WRITES_IN_FLIGHT);
        let (commit_tx, _) = watch::channel(CommitPoint {
            committed: meta.position.committed,
            term: 0,
        });
        let max_ballot = meta.promise.ballot.max(view.epoch);
        let node = Node {
            me,
            n,
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
            feeds: Mutex::new(Vec::new()),
            data: tokio::sync::Mutex::new(()),
            proposing: tokio::sync::Mutex::new(()),
            commit_tx,
            write_waiters: Mutex::new(CommitWaiters {
                committed: meta.position.committed,
                ..Default::default()
            }),
            dirty_tx: watch::channel((0, 0)).0,
            write_tx,
            write_rx: Mutex::new(Some(write_rx)),
            write_permits: Arc::new(Semaphore::new(MAX_WRITES_IN_FLIGHT)),
            max_ballot: max_ballot.into(),
            identity,
            paxos_io: tokio::sync::Mutex::new(()),
            stopping: watch::channel(false).0,
            cfg,
        };
        Ok(Arc::new(node))
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
            tokio::spawn(self.clone().sequencer(rx));
            tokio::spawn(self.clone().flusher(self.dirty_tx.subscribe()));
        }
        tokio::spawn(self.clone().monitor());
    }

    /// A server without state (new, or its data directory lost) asks its peers until it can
    /// either join the cluster one of them belongs to, or (rank 0 with `--bootstrap` only)
    /// form a new cluster because every peer answered that it holds no state either
    /// (DESIGN.md §10). An empty data directory alone never means "new cluster": the peers
    /// that hold the data may simply not be up yet.
    async fn find_cluster(self: &Arc<Self>) {
        let started = Instant::now();
        let mut next_log = started + Duration::from_secs(5);
        loop {
            let replies = self.discover_all().await;
            let ids: std::collections::BTreeSet<ClusterId> =
                replies.iter().filter_map(|r| r.cluster_id).collect();
            if ids.len() > 1 {
                error!(ids = ?ids, "peers belong to different clusters; joining none of them");
            } else if let Some(&id) = ids.first() {
                self.adopt_cluster(id, &replies).await;
                return;
            } else if self.me == 0 && self.cfg.bootstrap && replies.len() + 1 == self.n {
                self.form_cluster().await;
                return;
            }
            if Instant::now() >= next_log {
                next_log = Instant::now() + Duration::from_secs(5);
                info!(
                    answered = replies.len(),
                    peers = self.n - 1,
                    waited_s = started.elapsed().as_secs(),
                    "no state here and no cluster found yet: waiting for a peer that holds \
                     the cluster's state{}",
                    if self.me == 0 && self.cfg.bootstrap {
                        ", or for every peer to answer to form a new cluster"
                    } else if self.me == 0 {
                        " (start with --bootstrap to form a new cluster)"
                    } else {
                        ""
                    }
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Bootstrap: a new cluster whose first view is rank 0 alone; the other servers join it
    /// through state transfers, as any server without state does. The id and the view are
    /// one log batch, so a crash leaves either both or neither.
    async fn form_cluster(self: &Arc<Self>) {
        let id = match ClusterId::generate() {
            Ok(id) => id,
            Err(e) => self.fail_stop(StorageError::Corrupt(format!(
                "no randomness for a cluster id: {e}"
            ))),
        };
        let view = View::bootstrap();
        let membership = Membership {
            cluster: id,
            amnesiac_until: None,
        };
        self.store
            .save_membership(&membership, Some(&view))
            .await
            .or_fail_stop(self);
        self.identity.set(id);
        info!(cluster = %id, "formed a new cluster: every peer answered that it holds no state");
        let now = self.clock.steady_now();
        // Nobody held a lease in a brand-new cluster: serve at once.
        self.become_primary(&view, now, now, &Default::default());
    }

    /// Joins the cluster `id` with no state: amnesiac until a state transfer and an install
    /// make this server a member of a view newer than anything it may have voted in.
    async fn adopt_cluster(self: &Arc<Self>, id: ClusterId, replies: &[DiscoverReply]) {
        let ours: Vec<&DiscoverReply> = replies
            .iter()
            .filter(|r| r.cluster_id == Some(id))
            .collect();
        let newest = ours
            .iter()
            .filter_map(|r| r.view.clone())
            .max_by_key(|v| v.epoch);
        let heard = ours
            .iter()
            .map(|r| r.promised.max(r.view.as_ref().map_or(0, |v| v.epoch)))
            .max()
            .unwrap_or(0);
        let membership = Membership {
            cluster: id,
            amnesiac_until: Some(heard),
        };
        let view = {
            let mut st = self.st();
            st.become_amnesiac(newest, heard);
            st.view.clone()
        };
        self.note_ballot(heard);
        self.store
            .save_membership(&membership, Some(&view))
            .await
            .or_fail_stop(self);
        self.identity.set(id);
        info!(cluster = %id, epoch = view.epoch, heard, "no state here: joining the existing cluster through a state transfer");
    }

    /// Persists the current view, promise and accepted proposal, in the order they changed:
    /// call after changing them and before any reply that depends on them (DESIGN.md §10).
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
        Some(PrimaryHint {
            rank: st.view.primary,
            addr: self.cfg.peers.get(st.view.primary as usize)?.clone(),
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
            tokio::spawn(self.clone().replicate_to(m, view.epoch, rx, start));
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
            tokio::spawn(async move {
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

    // ---------------------------------------------------------------- writes

    /// Entry point of a client write on any server: sequenced here if primary, else
    /// forwarded to the primary of this server's view. A forwarded write's result names the
    /// primary that sequenced it, so the client can send its next writes there directly.
    pub async fn write(
        self: &Arc<Self>,
        req: WriteReq,
    ) -> Result<(WriteResult, Option<PrimaryHint>), ServeError> {
        let (is_primary, primary, hint) = {
            let st = self.st();
            (st.primary.is_some(), st.view.primary, self.hint(&st))
        };
        if is_primary {
            return Ok((self.write_local(req).await?, None));
        }
        if primary == self.me {
            return Err(ServeError::unavailable("primary is recovering", hint));
        }
        if self.identity.get().is_none() {
            // Not part of a cluster yet: there is no primary to forward to (§10). Nothing
            // was sent anywhere, so the client may try another server.
            return Err(ServeError::unavailable(
                "this server has not joined its cluster yet",
                None,
            ));
        }
        let forward = Forward {
            key: req.key,
            value: req.value,
            id: req.id,
        };
        match self.net.forward(primary, forward, FORWARD_TIMEOUT).await {
            Ok(r) => Ok((r, hint)),
            Err(NetError::Refused(s)) => Err(match s.kind {
                StatusKind::InvalidArgument => ServeError::InvalidArgument(s.message),
                StatusKind::Overloaded => ServeError::Overloaded(s.message),
                // Only a session's refusal passes through as such; any other precondition
                // (e.g. a primary of another cluster) is this server's problem, and the
                // client should try another one.
                StatusKind::Session(refusal) => ServeError::Session {
                    refusal,
                    message: s.message,
                },
                _ => ServeError::Unavailable {
                    reason: format!("primary {primary}: {}", s.message),
                    primary: hint,
                    outcome: s.outcome,
                },
            }),
            Err(e) => Err(ServeError::unknown(
                format!("forwarding to primary {primary}: {e}"),
                hint,
            )),
        }
    }

    /// A write on the primary: sequence it, then wait for its commit.
    pub async fn write_local(self: &Arc<Self>, req: WriteReq) -> Result<WriteResult, ServeError> {
        let hint = || self.hint(&self.st());
        let Ok(_permit) = self.write_permits.clone().try_acquire_owned() else {
            return Err(ServeError::Overloaded("too many writes in flight".into()));
        };
        let (tx, rx) = oneshot::channel();
        self.write_tx
            .try_send(WriteOp { req, reply: tx })
            .map_err(|_| ServeError::Overloaded("write queue full".into()))?;
        let (lsn, result, term) = match rx.await {
            Ok(r) => r?,
            Err(_) => return Err(ServeError::unknown("primary shutting down", hint())),
        };
        // Woken exactly when this lsn commits (not on every commit, as a watch would).
        let rx = {
            let mut w = self.write_waiters.lock().expect("write waiters lock");
            if w.term != term {
                None
            } else if w.committed >= lsn {
                return Ok(result);
            } else {
                let (tx, rx) = oneshot::channel();
                w.waiting.entry(lsn).or_default().push(tx);
                Some(rx)
            }
        };
        let waited = match rx {
            Some(rx) => tokio::time::timeout(COMMIT_WAIT, rx).await,
            None => Ok(Ok(false)),
        };
        match waited {
            Ok(Ok(true)) => Ok(result),
            Ok(_) => Err(ServeError::unknown(
                "primary was deposed before the write committed",
                hint(),
            )),
            Err(_) => Err(ServeError::unknown("write did not commit in time", hint())),
        }
    }

    /// The primary's single sequencer: takes queued writes in batches, answers duplicates from
    /// the session table, assigns lsns, applies the batch atomically, feeds it to every
    /// backup's stream, and flushes once for the whole batch (group commit, §3-§4). It also
    /// collects expired sessions, which the session collector finds, through records of
    /// their own.
    async fn sequencer(self: Arc<Self>, mut rx: mpsc::Receiver<WriteOp>) {
        // Headers of recently used sessions: what storage holds, as of the last applied
        // batch. Bounded; a miss reads the header item again.
        let mut sessions: HashMap<SessionId, Header> = HashMap::new();
        let mut sessions_epoch = 0;
        let (expire_tx, mut expire_rx) = mpsc::channel(4);
        tokio::spawn(self.clone().session_collector(expire_tx));
        let ttl_ms = self.cfg.session_ttl.as_millis() as u64;
        loop {
            let mut ops = Vec::new();
            let mut expire: Vec<SessionId> = Vec::new();
            tokio::select! {
                op = rx.recv() => match op {
                    Some(op) => ops.push(op),
                    None => break,
                },
                Some(idle) = expire_rx.recv() => expire = idle,
            }
            while ops.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            let guard = self.data.lock().await;
            let (epoch, term, mut applied, committed) = {
                let st = self.st();
                match &st.primary {
                    Some(p) => (p.epoch, st.term, st.pos.applied, st.pos.committed),
                    None => {
                        let hint = self.hint(&st);
                        drop(st);
                        for op in ops {
                            let _ = op.reply.send(Err(ServeError::unavailable(
                                "not the primary",
                                hint.clone(),
                            )));
                        }
                        continue;
                    }
                }
            };
            // Sessions are reloaded from storage whenever the data may have changed under
            // the cache (a new primary term or a reconcile).
            if sessions_epoch != epoch {
                sessions.clear();
                sessions_epoch = epoch;
            }
            if sessions.len() > MAX_CACHED_SESSIONS {
                sessions.clear();
            }
            // Last-use times are the primary's wall clock: they must mean the same to the
            // next primary, which an `Instant` would not.
            let now_ms = wall_clock_ms();
            let mut overlay: HashMap<Bytes, Option<Bytes>> = HashMap::new();
            let mut records = Vec::with_capacity(ops.len() + expire.len());
            let mut replies = Vec::with_capacity(ops.len());
            for op in ops {
                let item = user_item(&op.req.key);
                let session = op.req.id.and_then(|id| {
                    SessionId::new(id.client_id_hi, id.client_id).map(|sid| (sid, id))
                });
                if let Some((sid, id)) = session {
                    if id.seq != 0 {
                        if let Err(e) = self.load_session(&mut sessions, sid) {
                            replies.push((op.reply, Err(e)));
                            continue;
                        }
                    }
                    let header = sessions.get(&sid);
                    match sequencing::admit(header, id.seq, id.first_unfinished) {
                        Err(e) => {
                            let e = ServeError::InvalidArgument(e.to_string());
                            replies.push((op.reply, Err(e)));
                            continue;
                        }
                        Ok(Admission::Apply) => {}
                        Ok(Admission::Duplicate { slot }) => {
                            let r = self
                                .recorded_result(&overlay, sid, id.seq, slot)
                                .map(|r| (r.lsn, r.result, term));
                            replies.push((op.reply, r));
                            continue;
                        }
                        Ok(Admission::Refuse(refused)) => {
                            let e = session_refusal(refused, sid, &id, header);
                            replies.push((op.reply, Err(e)));
                            continue;
                        }
                    }
                }
                let old = match overlay.get(&item) {
                    Some(v) => v.clone(),
                    None => self
                        .store
                        .get(&item)
                        .or_fail_stop(&self)
                        .and_then(|e| e.value),
                };
                applied += 1;
                let lsn = applied;
                let result = WriteResult { old };
                let mut items = vec![Item {
                    key: item.clone(),
                    value: op.req.value.clone(),
                }];
                if let Some((sid, id)) = session {
                    // The record carries this write's result and the session's small
                    // header. Results the client declared finished leave the header; their
                    // slots are simply written over when reused (a slot's result names its
                    // seq), which saves a delete, and a tombstone to collect, per write.
                    let header = sessions.entry(sid).or_default();
                    header.record(id.seq, id.first_unfinished, now_ms);
                    let slot = header.slot_of(id.seq).expect("just recorded");
                    let stored = StoredResult {
                        seq: id.seq,
                        lsn,
                        result: result.clone(),
                    };
                    let mut set = |key: Bytes, value: Option<Bytes>| {
                        overlay.insert(key.clone(), value.clone());
                        items.push(Item { key, value });
                    };
                    set(
                        session_result_item(sid.hi, sid.lo, slot),
                        Some(stored.encode()),
                    );
                    items.push(Item {
                        key: session_header_item(sid.hi, sid.lo),
                        value: Some(header.encode()),
                    });
                }
                overlay.insert(item, op.req.value);
                records.push(Record { lsn, epoch, items });
                replies.push((op.reply, Ok((lsn, result, term))));
            }
            for sid in expire {
                // Checked again here: the session may have been used since it was found idle.
                if self.load_session(&mut sessions, sid).is_err() {
                    continue;
                }
                let header = sessions.get(&sid);
                let Some(header) =
                    header.filter(|_| sequencing::still_idle(header, now_ms, ttl_ms))
                else {
                    continue;
                };
                let mut items = vec![Item {
                    key: session_header_item(sid.hi, sid.lo),
                    value: None,
                }];
                // Every slot the session may have written, recorded or not.
                items.extend(header.used_slots().map(|slot| Item {
                    key: session_result_item(sid.hi, sid.lo, slot),
                    value: None,
                }));
                let idle_ms = now_ms.saturating_sub(header.last_used_ms);
                info!(session = %sid, idle_ms, "session expired: collecting its items");
                sessions.remove(&sid);
                applied += 1;
                records.push(Record {
                    lsn: applied,
                    epoch,
                    items,
                });
            }
            if !records.is_empty() {
                let pos = Position {
                    applied,
                    committed,
                    last_epoch: epoch,
                };
                self.store.apply_records(&records, pos).or_fail_stop(&self);
                let batch: Arc<[Record]> = records.into();
                let mut st = self.st();
                st.pos.applied = applied;
                st.pos.last_epoch = epoch;
                if st.primary.is_some() {
                    for f in self.feeds.lock().expect("feeds lock").iter() {
                        let _ = f.send(batch.clone());
                    }
                }
            }
            drop(guard);
            for (reply, r) in replies {
                let _ = reply.send(r);
            }
            // The flusher makes it durable; the next batch need not wait for that.
            self.dirty_tx.send_replace((epoch, applied));
        }
    }

    /// Puts the stored header of `sid` into the sequencer's cache, if the session has one.
    fn load_session(
        &self,
        cache: &mut HashMap<SessionId, Header>,
        sid: SessionId,
    ) -> Result<(), ServeError> {
        if cache.contains_key(&sid) {
            return Ok(());
        }
        let stored = self
            .store
            .get(&session_header_item(sid.hi, sid.lo))
            .or_fail_stop(self)
            .and_then(|e| e.value);
        if let Some(raw) = stored {
            let header = Header::decode(raw).ok_or_else(|| {
                error!(session = %sid, "session header is corrupt");
                ServeError::Storage(StorageError::Corrupt(format!("header of session {sid}")))
            })?;
            cache.insert(sid, header);
        }
        Ok(())
    }

    /// The recorded result of a duplicate: from this batch if it was recorded in it, else
    /// from its result item.
    fn recorded_result(
        &self,
        overlay: &HashMap<Bytes, Option<Bytes>>,
        sid: SessionId,
        seq: u64,
        slot: Option<u16>,
    ) -> Result<StoredResult, ServeError> {
        let key = session_result_item(sid.hi, sid.lo, slot.unwrap_or(u16::MAX));
        let raw = match overlay.get(&key) {
            Some(v) => v.clone(),
            None => self
                .store
                .get(&key)
                .or_fail_stop(self)
                .and_then(|e| e.value),
        };
        match raw.and_then(StoredResult::decode) {
            Some(r) if r.seq == seq => Ok(r),
            _ => {
                // The header and its result items are written together; refuse rather
                // than guess.
                error!(session = %sid, seq, "a recorded result is missing");
                Err(ServeError::Session {
                    refusal: SessionRefusal::ResultUnknown,
                    message: format!("session {sid}: the result of seq {seq} is unreadable"),
                })
            }
        }
    }

    /// Finds sessions idle for longer than the session TTL while this server is primary, and
    /// hands them to the sequencer, which deletes their items through replicated records
    /// (DESIGN.md §10 "Sessions"). A session is collected between one TTL and one TTL plus a
    /// pass period (a quarter of the TTL, at most 5 minutes) after its last write.
    async fn session_collector(self: Arc<Self>, tx: mpsc::Sender<Vec<SessionId>>) {
        let ttl_ms = self.cfg.session_ttl.as_millis() as u64;
        let period = sequencing::collector_period(self.cfg.session_ttl);
        let stopped = self.stopped();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                () = &mut stopped => return,
            }
            if self.st().primary.is_none() {
                continue;
            }
            let now_ms = wall_clock_ms();
            // Every stored item's name, to find the headers: one pass over the item index
            // per period, off the sequencer.
            let items = self.store.tail_items(0).or_fail_stop(&self);
            let mut idle = Vec::new();
            for item in items {
                let Some((hi, lo)) = session_of_header_item(&item) else {
                    continue;
                };
                let header = self
                    .store
                    .get(&item)
                    .or_fail_stop(&self)
                    .and_then(|e| e.value)
                    .and_then(Header::decode);
                if sequencing::still_idle(header.as_ref(), now_ms, ttl_ms) {
                    idle.push(SessionId { hi, lo });
                }
                if idle.len() >= EXPIRE_BATCH && tx.send(std::mem::take(&mut idle)).await.is_err() {
                    return;
                }
            }
            if !idle.is_empty() && tx.send(idle).await.is_err() {
                return;
            }
        }
    }

    /// The primary's group commit: one flush covers every batch applied while the previous
    /// flush ran, and the sequencer never waits for a flush before taking the next batch.
    ///
    /// Flushes keep step with replication: after a flush, the next one waits until the
    /// flushed writes have committed (the backups' acks, which take longer than a local
    /// flush, are then in) or `FLUSH_PACE` has passed. A flush begun sooner would hold back
    /// nothing, since those writes are still on their way to the backups, and would only
    /// split the same writes over more flushes.
    async fn flusher(self: Arc<Self>, mut dirty: watch::Receiver<(u64, u64)>) {
        let mut commits = self.commit_tx.subscribe();
        while dirty.changed().await.is_ok() {
            // The sequencer woke this task together with the replication tasks; let those
            // send first. The backups' round trip takes longer than this flush, so it should
            // start first; on a runtime thread of its own this flush would otherwise run
            // before them and delay every append by its length.
            tokio::task::yield_now().await;
            let (epoch, applied) = *dirty.borrow_and_update();
            self.store.flush_data().await.or_fail_stop(&self);
            let term = {
                let mut st = self.st();
                if let Some(p) = st.primary.as_mut() {
                    if p.epoch == epoch {
                        p.durable = p.durable.max(applied);
                    }
                }
                self.advance_commit(&mut st);
                st.term
            };
            let _ = tokio::time::timeout(
                FLUSH_PACE,
                commits.wait_for(|c| c.committed >= applied || c.term != term),
            )
            .await;
        }
    }

    // ---------------------------------------------------------------- reads

    /// A linearizable local read (§4): only with a valid lease, and only once the key's
    /// latest write is committed.
    pub async fn read(self: &Arc<Self>, key: &[u8]) -> Result<Option<Bytes>, ServeError> {
        let item = user_item(key);
        let deadline = Instant::now() + PENDING_READ_WAIT;
        let mut commits = self.commit_tx.subscribe();
        loop {
            self.check_read()?;
            let entry = self.store.get(&item)?;
            let pending = entry
                .as_ref()
                .is_some_and(|e| commit::read_is_pending(&self.st(), e.lsn));
            match entry {
                Some(e) if pending => {
                    let lsn = e.lsn;
                    let waited =
                        tokio::time::timeout_at(deadline, commits.wait_for(|c| c.committed >= lsn))
                            .await;
                    if waited.is_err() {
                        let hint = self.hint(&self.st());
                        return Err(ServeError::unavailable(
                            "key has a write that is not committed yet",
                            hint,
                        ));
                    }
                }
                other => {
                    // The lease must still hold after the read, or the value may be stale.
                    self.check_read()?;
                    return Ok(other.and_then(|e| e.value));
                }
            }
        }
    }

    fn check_read(&self) -> Result<(), ServeError> {
        let st = self.st();
        match commit::read_refusal(&st, self.cfg.timing.lease, self.clock.now()) {
            None => Ok(()),
            Some(reason) => Err(ServeError::unavailable(reason, self.hint(&st))),
        }
    }

    // ---------------------------------------------------------------- member side

    /// One batch (or heartbeat) of the primary's ordered stream to this member: the engine
    /// admits it ([`appending::admit`]), this applies and flushes its records, then the
    /// engine takes its commit point and lease ([`appending::accepted`]).
    pub async fn on_append(self: &Arc<Self>, req: Append) -> AppendReply {
        let reject = |st: &State, why: appending::AppendReject| AppendReply {
            result: Err(why),
            applied: st.pos.applied,
            view: Some(st.view.clone()),
            promised: st.promise.ballot,
        };
        let msg = req.header;
        {
            let mut st = self.st();
            if let Err(why) = appending::check(&st, msg.epoch, msg.primary) {
                return reject(&st, why);
            }
            st.last_heard = self.clock.steady_now();
        }
        let fresh: Vec<Record> = req.records;
        let _guard = if fresh.is_empty() {
            None
        } else {
            Some(self.data.lock().await)
        };
        {
            let st = self.st();
            if let Err(why) = appending::admit(&st, &msg, &fresh) {
                if why == appending::AppendReject::Gap {
                    warn!(
                        applied = st.pos.applied,
                        last_epoch = st.pos.last_epoch,
                        prev_lsn = msg.prev_lsn,
                        prev_epoch = msg.prev_epoch,
                        "append does not continue this member's log"
                    );
                }
                return reject(&st, why);
            }
        }
        if let Some(last) = fresh.last() {
            let committed = appending::commit_point(&self.st(), msg.committed, last.lsn);
            let pos = Position {
                applied: last.lsn,
                committed,
                last_epoch: last.epoch,
            };
            self.store.apply_records(&fresh, pos).or_fail_stop(self);
            self.store.flush_data().await.or_fail_stop(self);
            let mut st = self.st();
            st.pos.applied = last.lsn;
            st.pos.last_epoch = last.epoch;
        }
        let mut st = self.st();
        if let Err(why) = appending::check(&st, msg.epoch, msg.primary) {
            return reject(&st, why);
        }
        let horizon = appending::accepted(&mut st, &msg, self.cfg.timing.lease, self.clock.now());
        self.store.collect_up_to(horizon);
        self.publish_commit(&st);
        AppendReply {
            result: Ok(()),
            applied: st.pos.applied,
            view: None,
            promised: st.promise.ballot,
        }
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
    pub fn status(&self) -> replikv_proto::kv::StatusResponse {
        let st = self.st();
        let role = st.role(self.me);
        let lease = if st.primary.is_some() {
            self.primary_lease(&st)
        } else {
            commit::backup_lease(&st, self.clock.boot_now())
        };
        let peers = self
            .cfg
            .peers
            .iter()
            .enumerate()
            .map(|(r, addr)| {
                let r = r as Rank;
                let acked = match &st.primary {
                    Some(p) if r == self.me => p.durable,
                    Some(p) => p.peers.get(&r).map_or(0, |x| x.acked),
                    None => 0,
                };
                replikv_proto::kv::PeerStatus {
                    rank: r,
                    address: addr.clone(),
                    member: st.view.is_member(r),
                    acked,
                }
            })
            .collect();
        replikv_proto::kv::StatusResponse {
            rank: self.me,
            address: self.cfg.peers[self.me as usize].clone(),
            view: Some((&st.view).into()),
            role: role.into(),
            applied: st.pos.applied,
            committed: st.pos.committed,
            lease_ms: lease.map_or(0, |d| d.as_millis() as u64),
            peers,
            writes: self.store.writes.load(std::sync::atomic::Ordering::Relaxed),
            flushes: self
                .store
                .flushes
                .load(std::sync::atomic::Ordering::Relaxed),
            promised: st.promise.ballot,
            sync_mode: self.cfg.sync.as_str().into(),
            serving: self.can_read(&st),
        }
    }
}

/// Milliseconds since the Unix epoch on this server's clock (0 if the clock is before it).
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The answer to a write its session refuses (DESIGN.md §10 "Sessions"): the request applied
/// nothing, and says why.
fn session_refusal(
    decision: Decision,
    sid: SessionId,
    id: &RequestId,
    header: Option<&Header>,
) -> ServeError {
    let seq = id.seq;
    let (refusal, message) = match decision {
        Decision::Expired => (
            SessionRefusal::Expired,
            format!(
                "session {sid} expired or is unknown (the client reports writes before seq \
                 {} finished, but the servers hold no state of it); this write was not \
                 applied: start a new session",
                id.first_unfinished
            ),
        ),
        Decision::Retired => (
            SessionRefusal::ResultUnknown,
            format!(
                "session {sid}: the result of seq {seq} is no longer known: the client \
                 declared it finished (first unfinished seq {}); not applied again",
                header.map_or(0, |h| h.first_unfinished)
            ),
        ),
        _ => (
            SessionRefusal::ResultUnknown,
            format!(
                "session {sid}: the result of seq {seq} is no longer known: the session keeps \
                 the results of at most {} unfinished writes; not applied again",
                session::MAX_RESULTS
            ),
        ),
    };
    ServeError::Session { refusal, message }
}
