//! State transfer (docs/design.md §7, §10): the Sync source and sink, and Join on the primary.
//! Who may serve and what a transfer may set are the engine's rules (`engine::install`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::info;

use super::{Node, OrFailStop, Reason};
use crate::engine::install as installing;
use crate::fault::CrashPoint;
use crate::message::{Join, JoinReply, Refused, SyncChunk, SyncError, SyncRequest};
use crate::storage::Position;
use crate::types::{Rank, SyncEntry};

/// Entries per transfer chunk, and a soft byte cap.
const CHUNK_ENTRIES: usize = 2048;
const CHUNK_BYTES: usize = 4 << 20;
/// Longest silence between two chunks of a transfer.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(10);

impl Node {
    /// Sink: replaces this server's state with `source`'s (§7). The caller holds `data`.
    /// The receiver takes the source's commit point too, never more: what the source has not
    /// committed (a primary waiting out a removed member's lease, say) must not become
    /// readable here early.
    /// `epoch` is the decided view's epoch when reconciling in a view change, 0 for a joiner.
    pub(crate) async fn sync_from(&self, source: Rank, epoch: u64) -> Result<u64, String> {
        let since = self.st().pos.committed;
        let tail = self.store.tail_items(since).map_err(|e| e.to_string())?;
        let tail_len = tail.len();
        let req = SyncRequest {
            since,
            tail_keys: tail,
            from: self.me,
            epoch,
        };
        let started = Instant::now();
        let mut stream = self
            .net
            .sync(source, req, CHUNK_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        let mut received = 0usize;
        // A full transfer replaces everything: what it does not send is removed (§7). Whether
        // it is full is known from its first chunk, before anything was set.
        let mut full = None;
        let mut replacing = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            if *full.get_or_insert(chunk.full) != chunk.full {
                return Err("the source changed the kind of transfer mid-way".into());
            }
            if chunk.full && replacing.is_none() {
                replacing = Some(self.store.begin_replacement());
            }
            let entries: Vec<SyncEntry> = chunk.entries;
            self.metrics
                .transfer_received_bytes
                .inc_by(entry_bytes(&entries));
            if let Some(r) = replacing.as_mut() {
                r.received(&entries);
            }
            received += entries.len();
            if chunk.done {
                // Never take a state that lacks what this server knows to be committed.
                let pos = match installing::transfer_end(since, chunk.pos) {
                    Ok(pos) => pos,
                    Err(_) => {
                        return Err(format!(
                            "rank {source} holds up to lsn {}, short of this server's committed {since}",
                            chunk.pos.applied
                        ))
                    }
                };
                if let Some(r) = replacing.take() {
                    self.store
                        .finish_replacement(r, chunk.gc_horizon)
                        .or_fail_stop(self);
                }
                self.store
                    .set_entries(&entries, Some(pos))
                    .or_fail_stop(self);
                self.store.flush_data().await.or_fail_stop(self);
                let mut st = self.st();
                st.pos = pos;
                self.publish_commit(&st);
                info!(
                    source,
                    since,
                    tail = tail_len,
                    full = chunk.full,
                    entries = received,
                    applied = pos.applied,
                    ms = started.elapsed().as_millis() as u64,
                    "state transfer done"
                );
                return Ok(pos.applied);
            }
            self.store.set_entries(&entries, None).or_fail_stop(self);
        }
        Err("transfer ended before its last chunk".into())
    }

    /// Source: streams every entry changed after `since` and the requested tail keys.
    pub fn on_sync(
        self: &Arc<Self>,
        req: SyncRequest,
    ) -> Result<mpsc::Receiver<Result<SyncChunk, SyncError>>, SyncError> {
        let pos = installing::transfer_source(&self.st(), self.me, req.epoch, req.since)?;
        // A catch-up transfer (epoch 0, §7) runs in the bounded pool: a few rejoining servers
        // cannot take the disk and the blocking threads the log's flushes need. A transfer
        // of a view change (reconcile, epoch > 0) is not held back: at most one per member
        // runs per view change, and writes wait for it anyway.
        let slot = match req.epoch {
            0 => Some(self.transfers.try_start().ok_or_else(|| {
                SyncError::Busy(format!(
                    "this server is serving its limit of {} catch-up transfers \
                     (--max-transfers); try again later",
                    self.transfers.max()
                ))
            })?),
            _ => None,
        };
        // Held until the last chunk is built: no tombstone the transfer should carry is
        // collected meanwhile.
        let pin = self
            .store
            .pin_transfer(req.since, req.from, pos.committed.min(pos.applied));
        let full = pin.full();
        let since = if full { 0 } else { req.since };
        let (tx, rx) = mpsc::channel(4);
        let node = self.clone();
        self.tasks.spawn_blocking(move || {
            let _pin = pin;
            let _slot = slot;
            let send = |c: SyncChunk| tx.blocking_send(Ok(c)).is_ok();
            let mut entries = Vec::new();
            let mut bytes = 0usize;
            let flush = |entries: &mut Vec<SyncEntry>, bytes: &mut usize| {
                *bytes = 0;
                node.metrics
                    .transfer_sent_bytes
                    .inc_by(entry_bytes(entries));
                send(SyncChunk {
                    entries: std::mem::take(entries),
                    done: false,
                    pos: Position::default(),
                    full,
                    gc_horizon: 0,
                })
            };
            for e in node.store.changed_since(since) {
                let e = match e {
                    Ok(e) => e,
                    Err(err) => {
                        let _ = tx.blocking_send(Err(SyncError::Storage(err.to_string())));
                        return;
                    }
                };
                bytes += e.key.len()
                    + e.entry
                        .as_ref()
                        .and_then(|x| x.value.as_ref())
                        .map_or(0, |v| v.len());
                entries.push(e);
                if (entries.len() >= CHUNK_ENTRIES || bytes >= CHUNK_BYTES)
                    && !flush(&mut entries, &mut bytes)
                {
                    return;
                }
            }
            for key in req.tail_keys {
                let entry = match node.store.get(&key) {
                    Ok(e) => e,
                    Err(err) => {
                        let _ = tx.blocking_send(Err(SyncError::Storage(err.to_string())));
                        return;
                    }
                };
                entries.push(SyncEntry { key, entry });
                if entries.len() >= CHUNK_ENTRIES && !flush(&mut entries, &mut bytes) {
                    return;
                }
            }
            node.faults.crash_point(CrashPoint::Transferring);
            node.metrics
                .transfer_sent_bytes
                .inc_by(entry_bytes(&entries));
            send(SyncChunk {
                entries,
                done: true,
                pos: Position {
                    committed: pos.committed.min(pos.applied),
                    ..pos
                },
                full,
                // Read after every entry was sent: it covers each tombstone the transfer
                // could not carry.
                gc_horizon: if full { node.store.gc_horizon() } else { 0 },
            });
        });
        Ok(rx)
    }

    /// On the primary: add a caught-up server to the view (§7).
    pub async fn on_join(self: &Arc<Self>, req: Join) -> JoinReply {
        let (verdict, applied, view) = {
            let st = self.st();
            let verdict = installing::check_join(
                &st,
                self.me,
                self.rank_bound_of(&st),
                req.rank,
                req.applied,
            );
            (verdict, st.pos.applied, st.view.clone())
        };
        let answer = |result: Result<(), String>, view: &crate::types::View| JoinReply {
            result: result.map_err(Refused),
            view: Some(view.clone()),
            primary_applied: applied,
        };
        if let Err(e) = verdict {
            return answer(Err(e.into()), &view);
        }
        match self.change_view(Reason::Add(req.rank)).await {
            Ok(v) if v.is_member(req.rank) => answer(Ok(()), &v),
            Ok(v) => answer(
                Err("the decided view does not include the joiner".into()),
                &v,
            ),
            Err(e) => answer(Err(e), &view),
        }
    }
}

/// Key and value bytes of transferred entries, for the transfer metrics.
fn entry_bytes(entries: &[SyncEntry]) -> u64 {
    entries
        .iter()
        .map(|e| {
            e.key.len()
                + e.entry
                    .as_ref()
                    .and_then(|x| x.value.as_ref())
                    .map_or(0, |v| v.len())
        })
        .sum::<usize>() as u64
}
