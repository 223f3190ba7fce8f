//! Both ends of the primary's ordered stream to a member (docs/design.md §4): the member's side
//! (`on_append`) and the primary's (`replicate_to`). The stream is open for the primary's
//! term: it batches records while a batch is in flight (one in flight per member, so many
//! writes share one message and one flush at the member), carries the commit point
//! promptly, heartbeats every H with the lease the member may borrow, and reports a member
//! whose acks time out so the primary drops it. Admission, leases, acks and drops are the
//! engine's rules (`engine::append`).

use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Node, OrFailStop, Reason, State};
use crate::engine::append::{self as appending, AppendHeader};
use crate::engine::{commit, paxos};
use crate::message::{Append, AppendReply};
use crate::storage::Position;
use crate::types::{Rank, Record};

/// Most records in one append message.
const MAX_RECORDS_PER_MESSAGE: usize = 4096;
/// Soft cap on one append message's payload.
const MAX_BYTES_PER_MESSAGE: usize = 16 << 20;
/// How long a new commit point waits for records to ride with before it goes alone. A
/// message of its own costs a round trip of CPU on both ends, and while it is in flight
/// the next records wait; a client that writes again right after its acknowledgement sends
/// them well within this. A backup read of a key written just before waits at most this
/// much longer for its commit notice.
const COMMIT_LINGER: std::time::Duration = std::time::Duration::from_micros(500);

/// Queues a batch from the sequencer's feed, or notes that the feed has ended.
fn take(
    batch: Option<Arc<[Record]>>,
    queue: &mut std::collections::VecDeque<Record>,
    closed: &mut bool,
) {
    match batch {
        Some(b) => queue.extend(b.iter().cloned()),
        None => *closed = true,
    }
}

impl Node {
    /// One batch (or heartbeat) of the primary's ordered stream to this member: the engine
    /// admits it ([`appending::admit`]), this applies and flushes its records, then the
    /// engine takes its commit point and lease ([`appending::accepted`]).
    pub async fn on_append(self: &Arc<Self>, req: Append) -> AppendReply {
        let node = self.clone();
        super::to_the_end(async move { node.handle_append(req).await }).await
    }

    /// [`Node::on_append`] itself, run to its end whatever happens to the request.
    async fn handle_append(self: &Arc<Self>, req: Append) -> AppendReply {
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

    /// Streams records to `to` for the primary term `epoch`, starting after `start` (the lsn
    /// and epoch of the last record the member is known to hold). Ends when the term ends or
    /// the member fails.
    pub(crate) async fn replicate_to(
        self: Arc<Self>,
        to: Rank,
        epoch: u64,
        mut feed: mpsc::UnboundedReceiver<Arc<[Record]>>,
        start: (u64, u64),
    ) {
        let (mut prev, mut prev_epoch) = start;
        let mut msg_seq = 0u64;
        let mut commits = self.commit_tx.subscribe();
        let mut queue: std::collections::VecDeque<Record> = Default::default();
        let mut sent_committed = 0u64;
        let heartbeat = self.cfg.timing.heartbeat;
        let mut closed = false;
        let mut link = match self.net.open_append(to) {
            Ok(l) => l,
            Err(e) => {
                warn!(peer = to, epoch, error = %e, "cannot open append stream");
                self.member_failed(to, epoch);
                return;
            }
        };
        loop {
            if queue.is_empty() && !closed {
                // Marks the commit point seen: a change already carried by the last message
                // must not wake the wait below and send an empty message behind it.
                let committed_now = commits.borrow_and_update().committed;
                if committed_now <= sent_committed {
                    tokio::select! {
                        b = feed.recv() => take(b, &mut queue, &mut closed),
                        _ = commits.changed() => {}
                        _ = tokio::time::sleep(heartbeat) => {}
                    }
                }
                if queue.is_empty() && !closed && commits.borrow().committed > sent_committed {
                    tokio::select! {
                        b = feed.recv() => take(b, &mut queue, &mut closed),
                        _ = tokio::time::sleep(COMMIT_LINGER) => {}
                    }
                }
            }
            while let Ok(b) = feed.try_recv() {
                queue.extend(b.iter().cloned());
            }
            let (committed, lease_ms, gc_horizon) = {
                let st = self.st();
                if !appending::stream_current(&st, to, epoch) {
                    return;
                }
                let lease = appending::lease_to_lend(&st, self.cfg.timing.lease, self.clock.now());
                (st.pos.committed, lease, self.gc_horizon(&st))
            };
            if closed && queue.is_empty() {
                return;
            }
            let mut records = Vec::new();
            let mut bytes = 0usize;
            while let Some(r) = queue.front() {
                let size: usize = r
                    .items
                    .iter()
                    .map(|i| i.key.len() + i.value.as_ref().map_or(0, |v| v.len()))
                    .sum();
                if !records.is_empty()
                    && (records.len() >= MAX_RECORDS_PER_MESSAGE
                        || bytes + size > MAX_BYTES_PER_MESSAGE)
                {
                    break;
                }
                bytes += size;
                records.push(queue.pop_front().expect("front exists"));
            }
            let (last, last_epoch) = records
                .last()
                .map_or((prev, prev_epoch), |r| (r.lsn, r.epoch));
            msg_seq += 1;
            let sent_boot = self.clock.boot_now();
            appending::sending(&mut self.st(), to, self.clock.steady_now());
            let req = Append {
                header: AppendHeader {
                    epoch,
                    primary: self.me,
                    msg_seq,
                    committed: committed.min(last),
                    lease_ms,
                    prev_lsn: prev,
                    prev_epoch,
                    gc_horizon,
                },
                records,
            };
            let commit_sent = req.header.committed;
            sent_committed = committed;
            let res = link.call(req, self.cfg.timing.ack_timeout).await;
            match res {
                Ok(AppendReply { result: Ok(()), .. }) => {
                    (prev, prev_epoch) = (last, last_epoch);
                    let mut st = self.st();
                    if !appending::acked(&mut st, to, epoch, last, commit_sent, sent_boot) {
                        return;
                    }
                    self.advance_commit(&mut st);
                }
                Ok(r) => {
                    let status = r.result.err();
                    if let Some(v) = r.view.filter(|v| v.epoch > epoch) {
                        self.learn_view(v).await;
                        return;
                    }
                    self.note_ballot(r.promised);
                    warn!(
                        peer = to,
                        epoch,
                        ?status,
                        member_applied = r.applied,
                        "member refused append"
                    );
                    self.member_failed(to, epoch);
                    return;
                }
                Err(e) => {
                    warn!(peer = to, epoch, error = %e, "append failed");
                    self.member_failed(to, epoch);
                    return;
                }
            }
        }
    }

    /// The tombstone-collection horizon of the primary (see [`commit::gc_horizon`]).
    pub(crate) fn gc_horizon(&self, st: &State) -> u64 {
        commit::gc_horizon(st)
    }

    /// A member stopped acknowledging: propose a view without it (§5), once.
    pub(crate) fn member_failed(self: &Arc<Self>, rank: Rank, epoch: u64) {
        if !appending::begin_drop(&mut self.st(), rank, epoch) {
            return;
        }
        let node = self.clone();
        self.tasks.spawn(async move {
            let r = node.change_view(Reason::Drop(rank, epoch)).await;
            debug!(peer = rank, result = ?r.as_ref().map(|v| v.epoch), "drop finished");
            appending::end_drop(&mut node.st(), rank);
        });
    }

    /// Remembers the highest ballot seen, so this server's next proposal beats it; an
    /// implausible ballot is a forgery and is ignored (see [`paxos::plausible_ballot`]).
    pub(crate) fn note_ballot(&self, ballot: u64) {
        if paxos::plausible_ballot(ballot) {
            self.max_ballot
                .fetch_max(ballot, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
