//! One client write's journey (docs/design.md §4, §6): a backup forwards it to the primary;
//! the primary's sequencer admits it by its session (`engine::sequencer`), assigns its lsn,
//! applies the batch and hands it to the member streams; the flusher makes it durable; the
//! write waits until the commit point covers it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info};

use crate::engine::sequencer::{self as sequencing, Admission, Expect, Route};
use crate::error::{PrimaryHint, ServeError, SessionRefusal, StorageError};
use crate::message::{Forward, RequestId};
use crate::network::{NetError, StatusKind};
use crate::session::{self, Decision, Header, OpResult, SessionId, StoredResult, WriteResult};
use crate::storage::{within, Position};
use crate::types::{
    session_header_item, session_of_header_item, session_result_item, user_item, Item, ItemRange,
    Record,
};

use super::{Node, OrFailStop};

/// Most writes one sequencer batch takes.
const MAX_BATCH: usize = 1024;
/// Most session headers the sequencer keeps in memory.
const MAX_CACHED_SESSIONS: usize = 16 * 1024;
/// Most sessions collected in one sequencer batch.
const EXPIRE_BATCH: usize = 256;
/// How long a write waits for its commit before its outcome is reported unknown.
const COMMIT_WAIT: Duration = Duration::from_secs(5);
/// Deadline of a forwarded write.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(4);
/// Longest the primary's flusher waits for its last flush's writes to commit before it
/// flushes again (see `Node::flusher`).
const FLUSH_PACE: Duration = Duration::from_millis(2);

/// A write as the replica sees it: `value: None` deletes.
#[derive(Clone, Debug)]
pub struct WriteReq {
    pub key: Bytes,
    pub value: Option<Bytes>,
    pub id: Option<RequestId>,
}

/// A compare-and-swap (docs/design.md §6): writes `value` (`None` deletes) only if the key's
/// current value is what `expect` says.
#[derive(Clone, Debug)]
pub struct CasReq {
    pub key: Bytes,
    pub expect: Expect,
    pub value: Option<Bytes>,
    pub id: Option<RequestId>,
}

/// A range delete (docs/design.md §6): removes up to `limit` keys of `range` in one record.
#[derive(Clone, Debug)]
pub struct RangeDeleteReq {
    pub range: ItemRange,
    pub limit: usize,
    pub id: Option<RequestId>,
}

/// Anything the sequencer orders.
#[derive(Clone, Debug)]
pub(super) enum SeqOp {
    Write(WriteReq),
    Cas(CasReq),
    DeleteRange(RangeDeleteReq),
}

impl SeqOp {
    fn id(&self) -> Option<RequestId> {
        match self {
            SeqOp::Write(r) => r.id,
            SeqOp::Cas(r) => r.id,
            SeqOp::DeleteRange(r) => r.id,
        }
    }
}

pub(super) struct WriteOp {
    op: SeqOp,
    reply: oneshot::Sender<Result<(u64, OpResult, u64), ServeError>>,
}

/// A request id reused for an operation of another kind gets this, never another kind's
/// result.
fn kind_mismatch() -> ServeError {
    ServeError::InvalidArgument(
        "this request id was used before for another kind of operation".into(),
    )
}

impl Node {
    /// Entry point of a client write on any server: sequenced here if primary, else
    /// forwarded to the primary of this server's view. A forwarded write's result names the
    /// primary that sequenced it, so the client can send its next writes there directly.
    pub async fn write(
        self: &Arc<Self>,
        req: WriteReq,
    ) -> Result<(WriteResult, Option<PrimaryHint>), ServeError> {
        self.refuse_if_removed()?;
        let (route, hint) = {
            let st = self.st();
            let in_cluster = self.identity.get().is_some();
            (sequencing::route(&st, self.me, in_cluster), self.hint(&st))
        };
        let primary = match route {
            Route::Sequence => return Ok((self.write_local(req).await?, None)),
            Route::Forward(primary) => primary,
            Route::Recovering => {
                return Err(ServeError::unavailable("primary is recovering", hint));
            }
            Route::NoCluster => {
                return Err(ServeError::unavailable(
                    "this server has not joined its cluster yet",
                    None,
                ));
            }
        };
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
        match self.sequence(SeqOp::Write(req)).await? {
            OpResult::Write(r) => Ok(r),
            _ => Err(kind_mismatch()),
        }
    }

    /// A compare-and-swap: `(swapped, value before it)`. Only the primary decides one (its
    /// sequencer holds the order of writes); elsewhere the answer names the primary, and
    /// nothing was applied.
    pub async fn cas(self: &Arc<Self>, req: CasReq) -> Result<(bool, Option<Bytes>), ServeError> {
        self.only_on_primary("a compare-and-swap")?;
        match self.sequence(SeqOp::Cas(req)).await? {
            OpResult::Cas { swapped, current } => Ok((swapped, current)),
            _ => Err(kind_mismatch()),
        }
    }

    /// A range delete: `(keys removed, whether keys of the range remain)`. Primary only,
    /// as [`Node::cas`].
    pub async fn delete_range(
        self: &Arc<Self>,
        req: RangeDeleteReq,
    ) -> Result<(u64, bool), ServeError> {
        self.only_on_primary("a range delete")?;
        match self.sequence(SeqOp::DeleteRange(req)).await? {
            OpResult::DeleteRange { removed, more } => Ok((removed, more)),
            _ => Err(kind_mismatch()),
        }
    }

    /// Refuses, with no outcome and the primary's name, an operation that only the primary
    /// takes (the peer `Forward` carries plain writes only).
    fn only_on_primary(&self, what: &str) -> Result<(), ServeError> {
        let st = self.st();
        let in_cluster = self.identity.get().is_some();
        match sequencing::route(&st, self.me, in_cluster) {
            Route::Sequence => Ok(()),
            Route::Forward(primary) => Err(ServeError::unavailable(
                format!("{what} goes to the primary, rank {primary}"),
                self.hint(&st),
            )),
            Route::Recovering => Err(ServeError::unavailable(
                "primary is recovering",
                self.hint(&st),
            )),
            Route::NoCluster => Err(ServeError::unavailable(
                "this server has not joined its cluster yet",
                None,
            )),
        }
    }

    /// Sequences one operation on the primary, then waits for its commit.
    async fn sequence(self: &Arc<Self>, op: SeqOp) -> Result<OpResult, ServeError> {
        let hint = || self.hint(&self.st());
        let Ok(_permit) = self.write_permits.clone().try_acquire_owned() else {
            return Err(ServeError::Overloaded("too many writes in flight".into()));
        };
        let (tx, rx) = oneshot::channel();
        self.write_tx
            .try_send(WriteOp { op, reply: tx })
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
    pub(super) async fn sequencer(self: Arc<Self>, mut rx: mpsc::Receiver<WriteOp>) {
        // Headers of recently used sessions: what storage holds, as of the last applied
        // batch. Bounded; a miss reads the header item again.
        let mut sessions: HashMap<SessionId, Header> = HashMap::new();
        let mut sessions_epoch = 0;
        let (expire_tx, mut expire_rx) = mpsc::channel(4);
        self.tasks.spawn(self.clone().session_collector(expire_tx));
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
            for WriteOp { op, reply } in ops {
                let session = op.id().and_then(|id| {
                    SessionId::new(id.client_id_hi, id.client_id).map(|sid| (sid, id))
                });
                if let Some((sid, id)) = session {
                    if id.seq != 0 {
                        if let Err(e) = self.load_session(&mut sessions, sid) {
                            replies.push((reply, Err(e)));
                            continue;
                        }
                    }
                    let header = sessions.get(&sid);
                    match sequencing::admit(header, id.seq, id.first_unfinished) {
                        Err(e) => {
                            let e = ServeError::InvalidArgument(e.to_string());
                            replies.push((reply, Err(e)));
                            continue;
                        }
                        Ok(Admission::Apply) => {}
                        Ok(Admission::Duplicate { slot }) => {
                            let r = self
                                .recorded_result(&overlay, sid, id.seq, slot)
                                .map(|r| (r.lsn, r.result, term));
                            replies.push((reply, r));
                            continue;
                        }
                        Ok(Admission::Refuse(refused)) => {
                            let e = session_refusal(refused, sid, &id, header);
                            replies.push((reply, Err(e)));
                            continue;
                        }
                    }
                }
                // The user items this operation writes, and its result.
                let (mut items, result) = match op {
                    SeqOp::Write(req) => {
                        let item = user_item(&req.key);
                        let old = self.current(&overlay, &item);
                        (
                            vec![Item {
                                key: item,
                                value: req.value,
                            }],
                            OpResult::Write(WriteResult { old }),
                        )
                    }
                    SeqOp::Cas(req) => {
                        let item = user_item(&req.key);
                        let current = self.current(&overlay, &item);
                        let swapped = sequencing::cas_holds(&req.expect, current.as_ref());
                        let items = if swapped {
                            vec![Item {
                                key: item,
                                value: req.value,
                            }]
                        } else {
                            Vec::new()
                        };
                        (items, OpResult::Cas { swapped, current })
                    }
                    SeqOp::DeleteRange(req) => match self.range_victims(&overlay, &req) {
                        Ok((victims, more)) => {
                            let removed = victims.len() as u64;
                            let items = victims
                                .into_iter()
                                .map(|key| Item { key, value: None })
                                .collect();
                            (items, OpResult::DeleteRange { removed, more })
                        }
                        Err(e) => {
                            replies.push((reply, Err(e)));
                            continue;
                        }
                    },
                };
                if items.is_empty() && session.is_none() {
                    // Nothing to write and nothing to record (a CAS that did not match, a
                    // range delete of an empty range): the answer rests on what is applied
                    // so far, so it waits for that to commit, like a read of a pending key.
                    replies.push((reply, Ok((applied, result, term))));
                    continue;
                }
                for item in &items {
                    overlay.insert(item.key.clone(), item.value.clone());
                }
                applied += 1;
                let lsn = applied;
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
                    let key = session_result_item(sid.hi, sid.lo, slot);
                    let value = Some(stored.encode());
                    overlay.insert(key.clone(), value.clone());
                    items.push(Item { key, value });
                    items.push(Item {
                        key: session_header_item(sid.hi, sid.lo),
                        value: Some(header.encode()),
                    });
                }
                records.push(Record { lsn, epoch, items });
                replies.push((reply, Ok((lsn, result, term))));
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

    /// An item's value as of every write sequenced so far: this batch's, else the store's.
    fn current(&self, overlay: &HashMap<Bytes, Option<Bytes>>, item: &Bytes) -> Option<Bytes> {
        match overlay.get(item) {
            Some(v) => v.clone(),
            None => self
                .store
                .get(item)
                .or_fail_stop(self)
                .and_then(|e| e.value),
        }
    }

    /// The items a range delete removes, as of every write sequenced so far, and whether
    /// keys of the range remain after them.
    fn range_victims(
        &self,
        overlay: &HashMap<Bytes, Option<Bytes>>,
        req: &RangeDeleteReq,
    ) -> Result<(Vec<Bytes>, bool), ServeError> {
        let limit = req.limit.min(sequencing::MAX_RANGE_DELETE_KEYS);
        let page = self
            .store
            .scan(req.range.start.clone(), req.range.end.clone(), limit)
            .or_fail_stop(self);
        let mut live: BTreeMap<Bytes, bool> = page
            .entries
            .iter()
            .map(|(k, e)| (k.clone(), e.value.is_some()))
            .collect();
        // The page covers the range up to its last entry, or all of it.
        let covered_to = (!page.exhausted)
            .then(|| page.entries.last().map(|(k, _)| k.clone()))
            .flatten();
        for (item, value) in overlay {
            let covered = covered_to.as_ref().is_none_or(|c| item <= c);
            if covered && within(item, &req.range.start, &req.range.end) {
                live.insert(item.clone(), value.is_some());
            }
        }
        let live = live.into_iter().filter_map(|(k, v)| v.then_some(k));
        Ok(sequencing::range_delete_victims(
            live,
            limit,
            !page.exhausted,
        ))
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
    /// (docs/design.md §10 "Sessions"). A session is collected between one TTL and one TTL plus a
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
    pub(super) async fn flusher(self: Arc<Self>, mut dirty: watch::Receiver<(u64, u64)>) {
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
}

/// Milliseconds since the Unix epoch on this server's clock (0 if the clock is before it).
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The answer to a write its session refuses (docs/design.md §10 "Sessions"): the request applied
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
