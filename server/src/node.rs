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
use replikv_proto::kv::RequestId;
use replikv_proto::peer::{self, AppendRequest, AppendResponse, AppendStatus};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::convert::{record_from_pb, view_from};
use crate::error::{status_outcome, PrimaryHint, ServeError, StorageError};
use crate::fault::Faults;
use crate::network::{NetError, PeerNetwork};
use crate::session::{Decision, Recorded, Session, WriteResult};
use crate::storage::{Accepted, Position, Promise, Store};
use crate::types::{session_item, user_item, Item, Rank, Record, View};

/// Most writes one sequencer batch takes.
const MAX_BATCH: usize = 1024;
/// Most writes in flight on a primary before new ones get RESOURCE_EXHAUSTED.
const MAX_WRITES_IN_FLIGHT: usize = 16 * 1024;
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

/// A member's replication progress as its primary tracks it.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Progress {
    /// Highest lsn the member acknowledged.
    pub acked: u64,
    /// Send time of the latest message the member acknowledged (the primary's lease).
    pub ack_sent_at: Option<Instant>,
    /// Send time of the latest message sent to it (bounds the lease it may hold).
    pub last_send: Option<Instant>,
    /// Highest commit point the member acknowledged receiving (bounds the GC horizon).
    pub commit_acked: u64,
}

/// What only the primary has.
pub(crate) struct PrimaryState {
    pub epoch: u64,
    /// When this server took the role for this view.
    pub since: Instant,
    /// A new primary waits out every lease of the previous view before serving (§5 step 5).
    pub serve_after: Instant,
    /// A removed member's lease must run out before anything commits without it.
    pub commit_after: Instant,
    /// Highest lsn flushed locally.
    pub durable: u64,
    pub peers: BTreeMap<Rank, Progress>,
    /// One ordered feed of record batches per backup; dropping them stops the replicators.
    pub feeds: Vec<mpsc::UnboundedSender<Arc<[Record]>>>,
    pub gate_wake_scheduled: bool,
}

/// The position of the primary's stream to this member, for lease grants (§4): a message
/// grants a lease measured from when this member answered the message before it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamMark {
    pub epoch: u64,
    pub msg_seq: u64,
    pub answered_at: Instant,
}

pub(crate) struct State {
    /// The newest view this server knows of.
    pub view: View,
    /// Whether this server's data is a synced member state of `view`. False after a restart,
    /// after learning of a newer view, and while being installed, until a state transfer
    /// from the primary makes it one again.
    pub member: bool,
    pub promise: Promise,
    pub accepted: Option<Accepted>,
    pub pos: Position,
    pub lease_until: Option<Instant>,
    /// When this server last heard from its view's primary (appends, installs).
    pub last_heard: Instant,
    pub stream: Option<StreamMark>,
    pub primary: Option<PrimaryState>,
    pub term: u64,
    /// Ranks the primary is already trying to drop.
    pub dropping: Vec<Rank>,
}

pub struct Node {
    pub(crate) cfg: Config,
    pub(crate) me: Rank,
    pub(crate) n: usize,
    pub(crate) store: Store,
    pub(crate) net: Arc<dyn PeerNetwork>,
    pub(crate) faults: Arc<Faults>,
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
    ) -> Result<Arc<Node>, StorageError> {
        let meta = store.load_meta()?;
        let n = cfg.peers.len();
        let me = cfg.rank;
        let (view, member) = match meta.view {
            Some(v) => (v, false),
            None => (View::initial(n), true),
        };
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
            state: Mutex::new(State {
                view,
                member,
                promise: meta.promise,
                accepted: meta.accepted,
                pos: meta.position,
                lease_until: None,
                last_heard: Instant::now(),
                stream: None,
                primary: None,
                term: 0,
                dropping: Vec::new(),
            }),
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

    /// Starts the background tasks: the sequencer and the monitor (silence detection,
    /// revival). A fresh server first asks its peers whether the cluster already moved on.
    pub async fn boot(self: &Arc<Self>) {
        let fresh = self.st().member;
        if fresh && self.cluster_has_history().await {
            info!("fresh data directory but the cluster has history: joining as a new member");
            self.st().member = false;
        }
        let fresh_primary = {
            let st = self.st();
            st.member && st.view.primary == self.me
        };
        if fresh_primary {
            let view = self.st().view.clone();
            self.store
                .save_paxos(Some(&view), None, None)
                .await
                .or_fail_stop(self);
            // Nobody held a lease in a brand-new cluster: serve at once.
            self.become_primary(&view, Instant::now(), Instant::now(), true);
        } else if fresh {
            let view = self.st().view.clone();
            self.store
                .save_paxos(Some(&view), None, None)
                .await
                .or_fail_stop(self);
        }
        let rx = self.write_rx.lock().expect("write rx lock").take();
        if let Some(rx) = rx {
            tokio::spawn(self.clone().sequencer(rx));
            tokio::spawn(self.clone().flusher(self.dirty_tx.subscribe()));
        }
        tokio::spawn(self.clone().monitor());
    }

    /// Whether any reachable peer reports a view past the initial one or any data.
    async fn cluster_has_history(&self) -> bool {
        let replies = self.discover_all().await;
        replies
            .iter()
            .any(|r| r.view.as_ref().is_some_and(|v| v.epoch > 1) || r.applied > 0)
    }

    /// Storage failed: stop serving rather than acknowledge what may not be durable (§3).
    pub(crate) fn fail_stop(&self, e: StorageError) -> ! {
        error!(error = %e, "storage failure: stopping (fail-stop)");
        std::process::exit(70);
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

    /// Takes the primary role for `view` with everything up to `applied` on every member.
    pub(crate) fn become_primary(
        self: &Arc<Self>,
        view: &View,
        serve_after: Instant,
        commit_after: Instant,
        all_synced: bool,
    ) {
        let mut st = self.st();
        let applied = st.pos.applied;
        let mut peers = BTreeMap::new();
        let mut feeds = Vec::new();
        for m in view.backups() {
            peers.insert(
                m,
                Progress {
                    acked: if all_synced { applied } else { 0 },
                    ..Default::default()
                },
            );
            // A member now: its acknowledgements bound collection from here on.
            self.store.release_transfer_hold(m);
            let (tx, rx) = mpsc::unbounded_channel();
            feeds.push(tx);
            tokio::spawn(self.clone().replicate_to(m, view.epoch, rx, applied));
        }
        st.view = view.clone();
        st.member = true;
        st.lease_until = None;
        st.stream = None;
        st.dropping.clear();
        st.primary = Some(PrimaryState {
            epoch: view.epoch,
            since: Instant::now(),
            serve_after,
            commit_after,
            durable: applied,
            peers,
            feeds,
            gate_wake_scheduled: false,
        });
        info!(epoch = view.epoch, members = ?view.members, applied, "serving as primary");
        self.advance_commit(&mut st);
        self.publish_commit(&st);
    }

    /// Gives up the primary role: writes sequenced but not committed get an unknown outcome.
    pub(crate) fn step_down(&self, st: &mut State) {
        if st.primary.take().is_some() {
            st.term += 1;
            warn!(epoch = st.view.epoch, "no longer primary");
            self.publish_commit(st);
        }
    }

    /// Moves the commit point to the highest lsn every member has acknowledged and this
    /// server has flushed, once the lease gates allow.
    pub(crate) fn advance_commit(self: &Arc<Self>, st: &mut State) {
        let now = Instant::now();
        let backups: Vec<Rank> = st.view.backups().collect();
        let Some(p) = st.primary.as_mut() else { return };
        let gate = p.serve_after.max(p.commit_after);
        if now < gate {
            if !p.gate_wake_scheduled {
                p.gate_wake_scheduled = true;
                let node = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(gate).await;
                    let mut st = node.st();
                    if let Some(p) = st.primary.as_mut() {
                        p.gate_wake_scheduled = false;
                    }
                    node.advance_commit(&mut st);
                });
            }
            return;
        }
        let mut c = p.durable;
        for m in backups {
            c = c.min(p.peers.get(&m).map_or(0, |x| x.acked));
        }
        if c > st.pos.committed {
            st.pos.committed = c;
            self.publish_commit(st);
        }
        self.store.collect_up_to(self.gc_horizon(st));
    }

    /// Remaining lease of the primary: until `min over members (send time of the latest
    /// message it acked) + L`, and only once the new-primary wait is over (§4, §5).
    pub(crate) fn primary_lease(&self, st: &State, now: Instant) -> Option<Duration> {
        let p = st.primary.as_ref()?;
        if now < p.serve_after {
            return None;
        }
        let mut until: Option<Instant> = None;
        for m in st.view.backups() {
            let t = p.peers.get(&m)?.ack_sent_at? + self.cfg.timing.lease;
            until = Some(until.map_or(t, |u: Instant| u.min(t)));
        }
        match until {
            None => Some(self.cfg.timing.lease), // a single-member view needs no lease
            Some(u) if u > now => Some(u - now),
            Some(_) => None,
        }
    }

    /// Whether this server may answer reads now.
    pub(crate) fn can_read(&self, st: &State, now: Instant) -> bool {
        if st.primary.is_some() {
            self.primary_lease(st, now).is_some()
        } else {
            st.member && st.lease_until.is_some_and(|u| u > now)
        }
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
        let pb = peer::WriteRequest {
            key: req.key,
            value: req.value,
            id: req.id,
        };
        match self.net.forward(primary, pb, FORWARD_TIMEOUT).await {
            Ok(r) => Ok((
                WriteResult {
                    old: r.had_old.then_some(r.old_value),
                },
                hint,
            )),
            Err(NetError::Status(s)) => Err(match s.code() {
                tonic::Code::InvalidArgument => {
                    ServeError::InvalidArgument(s.message().to_string())
                }
                tonic::Code::ResourceExhausted => ServeError::Overloaded(s.message().to_string()),
                _ => ServeError::Unavailable {
                    reason: format!("primary {primary}: {}", s.message()),
                    primary: hint,
                    outcome: status_outcome(&s),
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
    /// backup's stream, and flushes once for the whole batch (group commit, §3-§4).
    async fn sequencer(self: Arc<Self>, mut rx: mpsc::Receiver<WriteOp>) {
        let mut sessions: HashMap<u64, Session> = HashMap::new();
        let mut sessions_epoch = 0;
        while let Some(first) = rx.recv().await {
            let mut ops = vec![first];
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
            if sessions.len() > 100_000 {
                sessions.clear();
            }
            let mut overlay: HashMap<Bytes, Option<Bytes>> = HashMap::new();
            let mut records = Vec::with_capacity(ops.len());
            let mut replies = Vec::with_capacity(ops.len());
            for op in ops {
                let item = user_item(&op.req.key);
                let mut session_update = None;
                if let Some(id) = op.req.id.filter(|id| id.client_id != 0) {
                    let sess = match sessions.entry(id.client_id) {
                        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                        std::collections::hash_map::Entry::Vacant(v) => {
                            let stored = self
                                .store
                                .get(&session_item(id.client_id))
                                .or_fail_stop(&self);
                            let s = stored
                                .and_then(|e| e.value)
                                .and_then(Session::decode)
                                .unwrap_or_default();
                            v.insert(s)
                        }
                    };
                    match sess.decide(id.seq) {
                        Decision::Duplicate(r) => {
                            replies.push((op.reply, Ok((r.lsn, r.result, term))));
                            continue;
                        }
                        Decision::Retired => {
                            replies.push((
                                op.reply,
                                Err(ServeError::InvalidArgument(format!(
                                    "request seq {} of client {} was already declared finished",
                                    id.seq, id.client_id
                                ))),
                            ));
                            continue;
                        }
                        Decision::New => {}
                    }
                    session_update = Some((id, sess));
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
                if let Some((id, sess)) = session_update {
                    sess.record(
                        id.seq,
                        id.first_unfinished,
                        Recorded {
                            lsn,
                            result: result.clone(),
                        },
                    );
                    items.push(Item {
                        key: session_item(id.client_id),
                        value: Some(sess.encode()),
                    });
                }
                overlay.insert(item, op.req.value);
                records.push(Record { lsn, epoch, items });
                replies.push((op.reply, Ok((lsn, result, term))));
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
                if let Some(p) = st.primary.as_mut() {
                    for f in &p.feeds {
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
            let committed = self.st().pos.committed;
            match entry {
                Some(e) if e.lsn > committed => {
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
        if self.can_read(&st, Instant::now()) {
            Ok(())
        } else {
            let reason = if !st.member {
                "this server is recovering"
            } else if st.primary.is_some() {
                "primary lease not (yet) valid"
            } else {
                "no read lease from the primary"
            };
            Err(ServeError::unavailable(reason, self.hint(&st)))
        }
    }

    // ---------------------------------------------------------------- member side

    /// One batch (or heartbeat) of the primary's ordered stream to this member.
    pub async fn on_append(self: &Arc<Self>, req: AppendRequest) -> AppendResponse {
        let reject = |st: &State, status: AppendStatus| AppendResponse {
            status: status as i32,
            applied: st.pos.applied,
            view: Some((&st.view).into()),
            promised: st.promise.ballot,
        };
        let check = |st: &State| -> Option<AppendStatus> {
            let promised_elsewhere = req.epoch < st.promise.ballot && st.promise.to != req.primary;
            if req.epoch < st.view.epoch || promised_elsewhere {
                Some(AppendStatus::Stale)
            } else if req.epoch > st.view.epoch
                || req.primary != st.view.primary
                || !st.member
                || st.primary.is_some()
            {
                Some(AppendStatus::NotMember)
            } else {
                None
            }
        };
        {
            let mut st = self.st();
            if let Some(s) = check(&st) {
                return reject(&st, s);
            }
            st.last_heard = Instant::now();
        }
        let records: Vec<Record> = req.records.into_iter().map(record_from_pb).collect();
        let _guard = if records.is_empty() {
            None
        } else {
            Some(self.data.lock().await)
        };
        let applied = {
            let st = self.st();
            if let Some(s) = check(&st) {
                return reject(&st, s);
            }
            st.pos.applied
        };
        let fresh: Vec<Record> = records.into_iter().filter(|r| r.lsn > applied).collect();
        let contiguous = match fresh.first() {
            Some(r) => r.lsn == applied + 1 && fresh.windows(2).all(|w| w[1].lsn == w[0].lsn + 1),
            None => applied >= req.prev_lsn,
        };
        if !contiguous {
            let st = self.st();
            warn!(
                applied,
                prev_lsn = req.prev_lsn,
                "append does not continue this member's log"
            );
            return reject(&st, AppendStatus::Gap);
        }
        if let Some(last) = fresh.last() {
            let (committed, last_epoch) = {
                let st = self.st();
                (
                    st.pos.committed.max(req.committed.min(last.lsn)),
                    last.epoch,
                )
            };
            let pos = Position {
                applied: last.lsn,
                committed,
                last_epoch,
            };
            self.store.apply_records(&fresh, pos).or_fail_stop(self);
            self.store.flush_data().await.or_fail_stop(self);
            let mut st = self.st();
            st.pos.applied = last.lsn;
            st.pos.last_epoch = last_epoch;
        }
        let mut st = self.st();
        if let Some(s) = check(&st) {
            return reject(&st, s);
        }
        let new_committed = st.pos.committed.max(req.committed.min(st.pos.applied));
        st.pos.committed = new_committed;
        self.store.collect_up_to(req.gc_horizon.min(new_committed));
        let now = Instant::now();
        if let Some(mark) = st.stream {
            if mark.epoch == req.epoch && req.msg_seq == mark.msg_seq + 1 && req.lease_ms > 0 {
                let grant = Duration::from_millis(req.lease_ms).min(self.cfg.timing.lease);
                st.lease_until = Some(mark.answered_at + grant);
            }
        }
        st.stream = Some(StreamMark {
            epoch: req.epoch,
            msg_seq: req.msg_seq,
            answered_at: now,
        });
        st.last_heard = now;
        self.publish_commit(&st);
        AppendResponse {
            status: AppendStatus::Ok as i32,
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
            if view.epoch <= st.view.epoch {
                false
            } else {
                info!(
                    epoch = view.epoch,
                    primary = view.primary,
                    "learned of a newer view; rejoining"
                );
                self.step_down(&mut st);
                st.view = view.clone();
                st.member = false;
                st.lease_until = None;
                st.stream = None;
                true
            }
        };
        if adopted {
            self.store
                .save_paxos(Some(&view), None, None)
                .await
                .or_fail_stop(self);
        }
    }

    /// Replica state for `Status`.
    pub fn status(&self) -> replikv_proto::kv::StatusResponse {
        let now = Instant::now();
        let st = self.st();
        let role = if st.primary.is_some() {
            "primary"
        } else if !st.member {
            if st.view.is_member(self.me) {
                "recovering"
            } else {
                "joining"
            }
        } else {
            "backup"
        };
        let lease = if st.primary.is_some() {
            self.primary_lease(&st, now)
        } else {
            st.lease_until
                .filter(|_| st.member)
                .and_then(|u| u.checked_duration_since(now))
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
            serving: self.can_read(&st, now),
        }
    }

    /// Decodes a peer's view, ignoring malformed ones.
    pub(crate) fn peer_view(&self, v: Option<&replikv_proto::kv::View>) -> Option<View> {
        view_from(v, self.n)
    }
}
