//! Local storage (docs/design.md §3): the facade the replica uses, [`Store`], and the persisted
//! Paxos and log-position types. One sled tree with prefixed keys, a write-ahead log in
//! front of it, an in-memory lsn index.
//!
//! Applied records are staged in memory (visible to every read at once) and appended to the
//! write-ahead log as one batch by the next flush, with the log position they lead to; in
//! `--sync always` mode the caller flushes before acknowledging. Staging matters on the
//! primary, whose sequencer applies many small batches between two flushes. Paxos state is
//! always flushed before replying.
//!
//! A flush is an `fdatasync` of the log: sled's own flush does not survive a power failure.
//! The log is the store's atomicity and durability; sled is where reads find the data. A
//! thread of its own writes logged operations to sled thousands at a time (until then they
//! are read from memory), after the log holding them is durable, so sled never holds what
//! the log could lose. sled is made durable at checkpoints, when the log has grown by a
//! segment; opening the store replays what the log still holds.
//!
//! - [`keys`]: the key layout (`d/<item>` entries, `m/...` state) and its encoding.
//! - [`index`]: the in-memory lsn index.
//! - [`wal`]: the write-ahead log's segments and records.
//! - [`durable`]: the log in front of sled, the sled applier thread, checkpoints.
//! - [`gc`]: tombstone collection, its horizon and the transfers that pin it.
//! - [`compact`]: rewriting sled into a fresh directory once it is mostly garbage, and
//!   finishing or undoing a rewrite a crash interrupted.
//! - [`scan`]: ordered reads of a range of items across memory, the log and sled.
//! - [`snapshot`]: every user key as of one applied position while writes go on.

mod compact;
mod durable;
mod gc;
mod index;
mod keys;
mod scan;
mod snapshot;
#[cfg(test)]
mod testutil;
pub mod wal;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::SyncMode;
use crate::error::StorageError;
use crate::identity::Membership;
use crate::types::{Entry, Rank, Record, SyncEntry, View, ACCOUNT_ITEM_PREFIX};

use durable::Durable;
pub use gc::TransferPin;
use gc::{Gc, RECEIVER_HOLD};
use index::LsnIndex;
use keys::{
    data_key, decode_entry, encode_entry, json, unjson, ACCEPTED, CLUSTER, DATA, GC_HORIZON,
    POSITION, PROMISE, VIEW,
};
pub use scan::{within, ScanPage};
pub use snapshot::{SnapshotPage, SnapshotPin};
use wal::{Op, Wal};

/// The highest ballot this acceptor promised, to whom, and in which instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promise {
    pub ballot: u64,
    pub to: Rank,
    /// The epoch of the view the promised instance leaves (`None` in a promise stored before
    /// it was recorded). A re-run of an old instance may promise a ballot above a view that
    /// instance decided long ago; only a promise in that view's own instance or a later one
    /// ends loyalty to its primary (docs/design.md §5).
    #[serde(default)]
    pub from_epoch: Option<u64>,
}

impl Promise {
    pub fn new(ballot: u64, to: Rank, from_epoch: u64) -> Promise {
        Promise {
            ballot,
            to,
            from_epoch: Some(from_epoch),
        }
    }

    /// Whether this promise belongs to the instance that leaves view `epoch` or a later one:
    /// its proposer may decide a view that supersedes `epoch`. A promise without its instance
    /// counts when its ballot is above `epoch`.
    pub fn supersedes(&self, epoch: u64) -> bool {
        match self.from_epoch {
            Some(from) => from >= epoch,
            None => self.ballot > epoch,
        }
    }
}

/// A proposal this acceptor accepted for the transition out of view `from_epoch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub ballot: u64,
    pub from_epoch: u64,
    pub view: View,
}

/// Where this server's log stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub applied: u64,
    pub committed: u64,
    pub last_epoch: u64,
}

/// Everything persisted besides the data.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    pub view: Option<View>,
    pub promise: Promise,
    pub accepted: Option<Accepted>,
    pub position: Position,
    /// The cluster this data directory belongs to; `None` for a directory with no state.
    pub cluster: Option<Membership>,
}

/// Applied data not yet handed to sled: each item's latest entry (`None`: removed) and the
/// log position they lead to.
#[derive(Default)]
struct Staged {
    items: std::collections::HashMap<Bytes, Option<Entry>>,
    position: Option<Position>,
    /// A collection horizon taken from a full transfer's source, logged with the batch that
    /// removes what the source no longer has.
    gc_horizon: Option<u64>,
    /// Snapshots being read: each change to a user item preserves its entry for them first
    /// (see [`snapshot`]).
    preserving: Vec<Arc<snapshot::Preserved>>,
}

/// What the store keeps in memory, shared with the collector thread.
#[derive(Default)]
struct Items {
    /// `std::sync::Mutex`: short sections, never held across an await.
    staged: Mutex<Staged>,
    /// `std::sync::Mutex`: updated right after each applied batch and read in short pages,
    /// never held across an await.
    index: Mutex<LsnIndex>,
    /// Taken after the store's writer lock and before `staged` and `index`, never while
    /// holding either: a collection pass holds it, so a transfer's pin waits for the pass.
    gc: Mutex<Gc>,
    /// The horizon the replica asked for; the collector works up to it.
    gc_target: AtomicU64,
    /// Set when the store closes: the collector stops.
    closing: Mutex<bool>,
    wake: Condvar,
}

impl Items {
    fn staged(&self) -> MutexGuard<'_, Staged> {
        self.staged.lock().expect("staged data lock poisoned")
    }

    fn index(&self) -> MutexGuard<'_, LsnIndex> {
        self.index.lock().expect("lsn index lock poisoned")
    }

    fn gc(&self) -> MutexGuard<'_, Gc> {
        self.gc.lock().expect("collection lock poisoned")
    }
}

pub struct Store {
    /// sled and the log in front of it.
    durable: Arc<Durable>,
    /// The thread that writes logged operations to sled; stopped and joined on drop.
    applier: Option<std::thread::JoinHandle<()>>,
    /// Staged data, the lsn index and tombstone collection, shared with the collector.
    items: Arc<Items>,
    /// The thread that drops collected tombstones; stopped and joined on drop.
    collector: Option<std::thread::JoinHandle<()>>,
    sync: SyncMode,
    /// Fault-injection hook: the next flush fails.
    fail_next_flush: AtomicBool,
    /// Writes (records) applied and flushes done, for the group-commit figure in `status`.
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    /// Flush latency and group-commit histograms (docs/design.md §12 "Metrics").
    pub flush_metrics: crate::metrics::FlushMetrics,
    /// Raised by every change that may touch a user record (docs/design.md §13): the user
    /// table in memory is loaded again when it moved.
    accounts_version: AtomicU64,
}

impl Drop for Store {
    fn drop(&mut self) {
        self.durable.logged().closing = true;
        self.durable.logged_grew.notify_one();
        if let Some(applier) = self.applier.take() {
            // What it had not written to sled yet is in the log, and replayed at the next open.
            let _ = applier.join();
        }
        *self.items.closing.lock().expect("collector lock poisoned") = true;
        self.items.wake.notify_one();
        if let Some(collector) = self.collector.take() {
            let _ = collector.join();
        }
    }
}

/// Sets the log's segment size, for tests that need many segments (not a user setting).
pub const SEGMENT_BYTES_ENV: &str = "REPLIKV_WAL_SEGMENT_BYTES";

fn segment_bytes_from_env() -> Result<Option<u64>, StorageError> {
    let Some(raw) = std::env::var_os(SEGMENT_BYTES_ENV) else {
        return Ok(None);
    };
    raw.to_str()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&b| b > 0)
        .map(Some)
        .ok_or_else(|| {
            StorageError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{SEGMENT_BYTES_ENV} must be a positive number of bytes, not {raw:?}"),
            ))
        })
}

/// A full transfer being received: the items held before it that it has not sent yet.
pub struct Replacement {
    stale: std::collections::HashSet<Bytes>,
}

impl Replacement {
    /// Notes entries the transfer sent: they are the source's, whatever they hold.
    pub fn received(&mut self, entries: &[SyncEntry]) {
        if self.stale.is_empty() {
            return;
        }
        for e in entries {
            self.stale.remove(&e.key);
        }
    }
}

impl Store {
    pub fn open(dir: &Path, sync: SyncMode) -> Result<Store, StorageError> {
        // The log is checked before anything is opened for writing: damage stops the server
        // with the data directory as it found it (sled's open may already write).
        let mut found = Wal::recover(&dir.join("wal"))?;
        let segment_bytes = segment_bytes_from_env()?;
        std::fs::create_dir_all(dir)?;
        // A compaction a crash interrupted is finished or undone before sled opens.
        let sled_dir = compact::recover(dir)?;
        let db = compact::open_sled(&sled_dir)?;
        let unsaved = std::mem::take(&mut found.batches);
        let wal = Wal::start(found)?;
        if let Some(bytes) = segment_bytes {
            wal.set_segment_bytes(bytes);
        }
        let durable = Arc::new(Durable::new(db, dir.to_path_buf(), wal));
        // Batches the log holds may be missing from sled after a crash; applying them again
        // is harmless (each sets whole entries), and a checkpoint then retires the log.
        for op in unsaved.iter().flatten() {
            durable.set_in_sled(&op.key, op.value.as_deref())?;
        }
        if !unsaved.is_empty() {
            tracing::info!(
                batches = unsaved.len(),
                "applied the write-ahead log's batches"
            );
        }
        durable.checkpoint()?;
        let items = Arc::new(Items::default());
        {
            let mut index = items.index();
            let mut live = 0;
            for kv in durable.db().iter() {
                let (k, v) = kv?;
                live += (k.len() + v.len()) as u64;
                if !k.starts_with(DATA) {
                    continue;
                }
                let e = decode_entry(&v)?;
                let item = Bytes::copy_from_slice(&k[DATA.len()..]);
                index.set(&item, Some((e.lsn, e.value.is_none())));
            }
            durable.live_bytes.store(live, Ordering::Relaxed);
        }
        if let Some(raw) = durable.get(GC_HORIZON)? {
            items.gc().horizon = unjson(&raw, "collection horizon")?;
        }
        let applier = {
            let durable = durable.clone();
            std::thread::Builder::new()
                .name("sled-applier".into())
                .spawn(move || durable.run_applier(sync))?
        };
        let collector = {
            let (durable, items) = (durable.clone(), items.clone());
            std::thread::Builder::new()
                .name("collector".into())
                .spawn(move || items.run_collector(&durable))
        };
        let collector = match collector {
            Ok(c) => c,
            Err(e) => {
                durable.logged().closing = true;
                durable.logged_grew.notify_one();
                let _ = applier.join();
                return Err(e.into());
            }
        };
        Ok(Store {
            durable,
            applier: Some(applier),
            items,
            collector: Some(collector),
            sync,
            fail_next_flush: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            flush_metrics: Default::default(),
            accounts_version: AtomicU64::new(1),
        })
    }

    pub fn load_meta(&self) -> Result<Meta, StorageError> {
        let mut m = Meta::default();
        if let Some(v) = self.durable.get(VIEW)? {
            m.view = Some(unjson(&v, "view")?);
        }
        if let Some(v) = self.durable.get(PROMISE)? {
            m.promise = unjson(&v, "promise")?;
        }
        if let Some(v) = self.durable.get(ACCEPTED)? {
            m.accepted = unjson(&v, "accepted")?;
        }
        if let Some(v) = self.durable.get(POSITION)? {
            m.position = unjson(&v, "position")?;
        }
        if let Some(pos) = self.staged().position {
            m.position = pos;
        }
        if let Some(v) = self.durable.get(CLUSTER)? {
            m.cluster = Some(unjson(&v, "cluster")?);
        }
        Ok(m)
    }

    /// See [`Store::accounts_version`]'s field: starts at 1, raised after every change that
    /// may have touched a user record.
    pub fn accounts_version(&self) -> u64 {
        self.accounts_version.load(Ordering::SeqCst)
    }

    pub fn get(&self, item: &[u8]) -> Result<Option<Entry>, StorageError> {
        compact::release_on_this_thread();
        if let Some(staged) = self.staged().items.get(item) {
            return Ok(staged.clone());
        }
        self.durable
            .get(&data_key(item))?
            .map(|raw| decode_entry(&raw))
            .transpose()
    }

    /// Applies records (in lsn order) and the new log position: readable at once, appended to
    /// the log as one batch by the next flush.
    pub fn apply_records(&self, records: &[Record], pos: Position) -> Result<(), StorageError> {
        compact::release_on_this_thread();
        let mut staged = self.staged();
        if !staged.preserving.is_empty() {
            for item in records.iter().flat_map(|r| &r.items) {
                self.preserve(&staged, &item.key)?;
            }
        }
        let mut index = self.index();
        let mut accounts = false;
        for r in records {
            for item in &r.items {
                let e = Entry {
                    lsn: r.lsn,
                    value: item.value.clone(),
                };
                accounts |= item.key.starts_with(ACCOUNT_ITEM_PREFIX);
                staged.items.insert(item.key.clone(), Some(e));
                index.set(&item.key, Some((r.lsn, item.value.is_none())));
            }
        }
        staged.position = Some(pos);
        drop(index);
        drop(staged);
        if accounts {
            self.accounts_version.fetch_add(1, Ordering::SeqCst);
        }
        self.writes
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Sets entries unconditionally (state transfer, docs/design.md §7) and, with the final chunk,
    /// the log position. Written to sled at once (not durable before a flush), so a long
    /// transfer is not held in memory.
    pub fn set_entries(
        &self,
        entries: &[SyncEntry],
        pos: Option<Position>,
    ) -> Result<(), StorageError> {
        {
            let mut staged = self.staged();
            for se in entries {
                self.preserve(&staged, &se.key)?;
            }
            let mut index = self.index();
            let mut accounts = false;
            for se in entries {
                accounts |= se.key.starts_with(ACCOUNT_ITEM_PREFIX);
                staged.items.insert(se.key.clone(), se.entry.clone());
                index.set(
                    &se.key,
                    se.entry.as_ref().map(|e| (e.lsn, e.value.is_none())),
                );
            }
            if pos.is_some() {
                staged.position = pos;
            }
            if accounts {
                self.accounts_version.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.write_staged()
    }

    /// Hands everything staged to the log as one batch (not yet durable).
    pub(crate) fn write_staged(&self) -> Result<(), StorageError> {
        self.write_staged_with(Vec::new())
    }

    /// [`Store::write_staged`], with `extra` operations in the same log batch.
    fn write_staged_with(&self, extra: Vec<Op>) -> Result<(), StorageError> {
        let _writing = self
            .durable
            .writing
            .lock()
            .expect("store writer lock poisoned");
        let (items, position, gc_horizon) = {
            let mut staged = self.staged();
            if staged.items.is_empty()
                && staged.position.is_none()
                && staged.gc_horizon.is_none()
                && extra.is_empty()
            {
                return Ok(());
            }
            let items: Vec<(Bytes, Option<Entry>)> = staged
                .items
                .iter()
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect();
            (items, staged.position, staged.gc_horizon.take())
        };
        let mut ops: Vec<Op> = items
            .iter()
            .map(|(item, entry)| Op {
                key: data_key(item),
                value: entry.as_ref().map(encode_entry),
            })
            .collect();
        if let Some(pos) = &position {
            ops.push(Op {
                key: POSITION.to_vec(),
                value: Some(json(pos)),
            });
        }
        // Raised only as it is logged (the writer lock is held), so no collection pass can
        // log it before the removals it stands for.
        let mut gc = None;
        if let Some(h) = gc_horizon {
            let mut g = self.items.gc();
            g.horizon = g.horizon.max(h);
            ops.push(Op {
                key: GC_HORIZON.to_vec(),
                value: Some(json(&g.horizon)),
            });
            gc = Some(g);
        }
        ops.extend(extra);
        self.durable.log_locked(ops)?;
        drop(gc);
        // Drop what the log now has, unless it was staged again meanwhile.
        let mut staged = self.staged();
        for (item, entry) in items {
            if staged.items.get(&item) == Some(&entry) {
                staged.items.remove(&item);
            }
        }
        if staged.position == position {
            staged.position = None;
        }
        if staged.items.is_empty() && staged.items.capacity() > 64 * 1024 {
            // A large transfer or batch staged many items once: give the memory back.
            staged.items.shrink_to_fit();
        }
        drop(staged);
        self.durable.checkpoint_if_full();
        Ok(())
    }

    fn staged(&self) -> MutexGuard<'_, Staged> {
        self.items.staged()
    }

    fn index(&self) -> MutexGuard<'_, LsnIndex> {
        self.items.index()
    }

    /// Persists Paxos state durably (whatever the sync mode: promises must survive crashes).
    pub async fn save_paxos(
        &self,
        view: Option<&View>,
        promise: Option<Promise>,
        accepted: Option<Option<&Accepted>>,
    ) -> Result<(), StorageError> {
        let set = |key: &[u8], value: Option<Vec<u8>>| Op {
            key: key.to_vec(),
            value,
        };
        let mut ops = Vec::new();
        if let Some(v) = view {
            ops.push(set(VIEW, Some(json(v))));
        }
        if let Some(p) = promise {
            ops.push(set(PROMISE, Some(json(&p))));
        }
        if let Some(a) = accepted {
            ops.push(set(ACCEPTED, a.map(json)));
        }
        self.durable.log(ops)?;
        self.flush_always().await
    }

    /// Persists the cluster membership, and with it `view` when given, durably (whatever
    /// the sync mode) and atomically: one log batch, which also holds whatever data is
    /// staged (a forming cluster's first record, docs/design.md §13).
    pub async fn save_membership(
        &self,
        m: &Membership,
        view: Option<&View>,
    ) -> Result<(), StorageError> {
        let mut ops = vec![Op {
            key: CLUSTER.to_vec(),
            value: Some(json(m)),
        }];
        if let Some(v) = view {
            ops.push(Op {
                key: VIEW.to_vec(),
                value: Some(json(v)),
            });
        }
        if self.fail_next_flush.swap(false, Ordering::SeqCst) {
            return Err(StorageError::Injected);
        }
        self.write_staged_with(ops)?;
        self.durable.wal.sync().await?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes applied data to sled and makes it durable as the sync mode requires before it
    /// is acknowledged.
    pub async fn flush_data(&self) -> Result<(), StorageError> {
        match self.sync {
            SyncMode::Always => self.flush_always().await,
            SyncMode::None => self.write_staged(),
        }
    }

    async fn flush_always(&self) -> Result<(), StorageError> {
        if self.fail_next_flush.swap(false, Ordering::SeqCst) {
            return Err(StorageError::Injected);
        }
        self.write_staged()?;
        let started = std::time::Instant::now();
        self.durable.wal.sync().await?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.flush_metrics
            .flushed(started.elapsed(), self.writes.load(Ordering::Relaxed));
        Ok(())
    }

    pub fn inject_flush_failure(&self) {
        self.fail_next_flush.store(true, Ordering::SeqCst);
    }

    /// Every item whose latest lsn is above `since`, with its current entry, in lsn order.
    /// Not a snapshot: concurrent writes may or may not be seen, which state transfer allows
    /// for (anything written after the transfer started has an lsn above its reported end).
    pub fn changed_since(
        &self,
        since: u64,
    ) -> impl Iterator<Item = Result<SyncEntry, StorageError>> + '_ {
        // Pages of the index, so the index lock is never held while reading entries.
        let mut cursor = (since.saturating_add(1), Bytes::new());
        let mut page: std::vec::IntoIter<Bytes> = Vec::new().into_iter();
        std::iter::from_fn(move || loop {
            if let Some(item) = page.next() {
                return Some(self.get(&item).map(|entry| SyncEntry { key: item, entry }));
            }
            let next: Vec<(u64, Bytes)> = self
                .index()
                .by_lsn
                .range(cursor.clone()..)
                .take(1024)
                .cloned()
                .collect();
            let (lsn, item) = next.last()?.clone();
            // Resume just after the last position read.
            let mut after = item.to_vec();
            after.push(0);
            cursor = (lsn, after.into());
            page = next
                .into_iter()
                .map(|(_, i)| i)
                .collect::<Vec<_>>()
                .into_iter();
        })
    }

    /// Lets the collector drop tombstones with an lsn up to `horizon`: the replica passes the
    /// horizon its primary handed out (at most its own commit point), or computed as primary.
    pub fn collect_up_to(&self, horizon: u64) {
        compact::release_on_this_thread();
        self.items.gc_target.fetch_max(horizon, Ordering::AcqRel);
    }

    /// Drops the tombstones the horizon allows now, rather than at the collector's next look.
    pub fn collect_now(&self) -> Result<usize, StorageError> {
        self.items.collect(&self.durable)
    }

    /// The highest lsn of a tombstone this store may lack: a transfer from here whose `since`
    /// is below it must be full.
    pub fn gc_horizon(&self) -> u64 {
        self.items.gc().horizon
    }

    /// Starts serving a state transfer of everything changed after `since` (docs/design.md §7). If
    /// a tombstone above `since` may have been dropped, the transfer must be full: every
    /// entry, and the receiver removes what it is not sent. Otherwise no tombstone above
    /// `since` is dropped while the returned pin lives.
    ///
    /// `receiver` is told `committed` as its commit point at the end; nothing above that is
    /// dropped for `RECEIVER_HOLD`, so its next transfer (from there) need not be full.
    pub fn pin_transfer(&self, since: u64, receiver: u32, committed: u64) -> TransferPin {
        let mut gc = self.items.gc();
        let until = std::time::Instant::now() + RECEIVER_HOLD;
        gc.receivers.insert(receiver, (committed, until));
        if since < gc.horizon {
            return TransferPin {
                items: self.items.clone(),
                since: None,
            };
        }
        *gc.pins.entry(since).or_default() += 1;
        TransferPin {
            items: self.items.clone(),
            since: Some(since),
        }
    }

    /// Ends the hold `pin_transfer` put on collection for `receiver`: it is a member now,
    /// and what it has acknowledged bounds the horizon the primary hands out.
    pub fn release_transfer_hold(&self, receiver: u32) {
        self.items.gc().receivers.remove(&receiver);
    }

    /// Starts receiving a full transfer, which replaces everything this store holds: every
    /// item held now is removed at the end unless the transfer sends it. The caller holds
    /// off every other change to the data meanwhile.
    pub fn begin_replacement(&self) -> Replacement {
        Replacement {
            stale: self.index().by_item.keys().cloned().collect(),
        }
    }

    /// Stages the removal of every item the full transfer did not send, and the source's
    /// collection horizon (the deletions it no longer has tombstones for are among those
    /// removals): the next write logs them in one batch with the transfer's last entries and
    /// position.
    pub fn finish_replacement(
        &self,
        replacement: Replacement,
        source_horizon: u64,
    ) -> Result<(), StorageError> {
        let removed = replacement.stale.len();
        let mut staged = self.staged();
        for item in &replacement.stale {
            self.preserve(&staged, item)?;
        }
        let mut index = self.index();
        for item in replacement.stale {
            staged.items.insert(item.clone(), None);
            index.set(&item, None);
        }
        staged.gc_horizon = Some(staged.gc_horizon.unwrap_or(0).max(source_horizon));
        drop(index);
        drop(staged);
        self.accounts_version.fetch_add(1, Ordering::SeqCst);
        tracing::info!(
            removed,
            horizon = source_horizon,
            "full transfer: removed the items the source did not send"
        );
        Ok(())
    }

    /// Items written after `committed`: the tail a state transfer must repair (docs/design.md §7).
    pub fn tail_items(&self, committed: u64) -> Result<Vec<Bytes>, StorageError> {
        let from = (committed.saturating_add(1), Bytes::new());
        Ok(self
            .index()
            .by_lsn
            .range(from..)
            .map(|(_, i)| i.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn index_keeps_only_the_latest_lsn_per_item() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), SyncMode::None).unwrap();
        s.apply_records(
            &[
                rec(1, "a", Some("1")),
                rec(2, "b", Some("2")),
                rec(3, "a", Some("3")),
            ],
            Position {
                applied: 3,
                committed: 0,
                last_epoch: 1,
            },
        )
        .unwrap();
        assert_eq!(
            keys(&s, 0),
            vec![("b".into(), Some(2)), ("a".into(), Some(3))]
        );
        assert_eq!(keys(&s, 2), vec![("a".into(), Some(3))]);
        s.apply_records(
            &[rec(4, "b", None)],
            Position {
                applied: 4,
                committed: 3,
                last_epoch: 1,
            },
        )
        .unwrap();
        assert_eq!(
            s.get(b"b").unwrap(),
            Some(Entry {
                lsn: 4,
                value: None
            })
        );
        assert_eq!(s.tail_items(3).unwrap(), vec![Bytes::from_static(b"b")]);
        assert_eq!(s.load_meta().unwrap().position.applied, 4);
    }

    #[test]
    fn set_entries_overwrites_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), SyncMode::None).unwrap();
        s.apply_records(
            &[rec(5, "a", Some("x")), rec(6, "b", Some("y"))],
            Position::default(),
        )
        .unwrap();
        s.set_entries(
            &[
                SyncEntry {
                    key: Bytes::from_static(b"a"),
                    entry: Some(Entry {
                        lsn: 3,
                        value: Some(Bytes::from_static(b"old")),
                    }),
                },
                SyncEntry {
                    key: Bytes::from_static(b"b"),
                    entry: None,
                },
            ],
            Some(Position {
                applied: 4,
                committed: 4,
                last_epoch: 2,
            }),
        )
        .unwrap();
        assert_eq!(
            s.get(b"a").unwrap().unwrap().value.unwrap(),
            Bytes::from_static(b"old")
        );
        assert_eq!(s.get(b"b").unwrap(), None);
        assert_eq!(keys(&s, 0), vec![("a".into(), Some(3))]);
        assert_eq!(s.load_meta().unwrap().position.last_epoch, 2);
    }

    #[tokio::test]
    async fn applied_records_are_readable_at_once_and_stored_with_their_position_by_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let pos = |applied| Position {
            applied,
            committed: applied,
            last_epoch: 1,
        };
        {
            let s = Store::open(dir.path(), SyncMode::Always).unwrap();
            s.apply_records(&[rec(1, "a", Some("1")), rec(2, "b", Some("2"))], pos(2))
                .unwrap();
            assert_eq!(s.get(b"a").unwrap().unwrap().value, Some(Bytes::from("1")));
            s.flush_data().await.unwrap();
            // Staged again after the flush: newer than what sled has, read from the stage.
            s.apply_records(&[rec(3, "a", Some("3"))], pos(3)).unwrap();
            assert_eq!(s.get(b"a").unwrap().unwrap().lsn, 3);
            s.flush_data().await.unwrap();
            // Never flushed: lost with the process, position and all.
            s.apply_records(&[rec(4, "b", None)], pos(4)).unwrap();
            assert_eq!(s.get(b"b").unwrap().unwrap().value, None);
        }
        let s = reopen(dir.path());
        assert_eq!(s.load_meta().unwrap().position, pos(3));
        assert_eq!(s.get(b"a").unwrap().unwrap().value, Some(Bytes::from("3")));
        assert_eq!(s.get(b"b").unwrap().unwrap().value, Some(Bytes::from("2")));
        assert_eq!(
            keys(&s, 0),
            vec![("b".into(), Some(2)), ("a".into(), Some(3))]
        );
    }

    #[tokio::test]
    async fn a_flushed_write_is_recovered_from_the_log_alone() {
        let (old, new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let pos = Position {
            applied: 2,
            committed: 1,
            last_epoch: 1,
        };
        let s = Store::open(old.path(), SyncMode::Always).unwrap();
        s.save_paxos(None, Some(Promise::new(7, 1, 0)), None)
            .await
            .unwrap();
        s.apply_records(&[rec(1, "a", Some("1")), rec(2, "a", None)], pos)
            .unwrap();
        s.flush_data().await.unwrap();
        // A server whose sled lost everything since its last checkpoint: only the log is left.
        std::fs::create_dir_all(new.path().join("wal")).unwrap();
        for seg in std::fs::read_dir(old.path().join("wal")).unwrap() {
            let seg = seg.unwrap();
            std::fs::copy(seg.path(), new.path().join("wal").join(seg.file_name())).unwrap();
        }
        let r = Store::open(new.path(), SyncMode::Always).unwrap();
        let meta = r.load_meta().unwrap();
        assert_eq!(meta.position, pos);
        assert_eq!(meta.promise, Promise::new(7, 1, 0));
        assert_eq!(
            r.get(b"a").unwrap().unwrap(),
            Entry {
                lsn: 2,
                value: None
            }
        );
        assert_eq!(keys(&r, 0), vec![("a".into(), Some(2))]);
    }

    #[test]
    fn lsn_index_is_rebuilt_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), SyncMode::None).unwrap();
            s.apply_records(
                &[
                    rec(1, "a", Some("1")),
                    rec(2, "b", Some("2")),
                    rec(3, "a", None),
                ],
                Position::default(),
            )
            .unwrap();
            s.write_staged().unwrap();
            s.durable.apply_logged().unwrap();
            s.durable.db().flush().unwrap();
        }
        let s = reopen(dir.path());
        assert_eq!(
            keys(&s, 0),
            vec![("b".into(), Some(2)), ("a".into(), Some(3))]
        );
        assert_eq!(s.tail_items(2).unwrap(), vec![Bytes::from_static(b"a")]);
    }

    #[test]
    fn changed_since_pages_through_many_items() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), SyncMode::None).unwrap();
        let recs: Vec<Record> = (1..=3000)
            .map(|i| rec(i, &format!("k{i}"), Some("v")))
            .collect();
        s.apply_records(&recs, Position::default()).unwrap();
        let got = keys(&s, 1000);
        assert_eq!(got.len(), 2000);
        assert_eq!(got[0].1, Some(1001));
        assert_eq!(got[1999].1, Some(3000));
    }

    /// A step of a server's life for the Paxos ordering test.
    #[allow(clippy::large_enum_variant)] // a test's script of steps, built once
    enum Step {
        /// `save_paxos(view, promise, accepted)`.
        Save(Option<View>, Option<Promise>, Option<Option<Accepted>>),
        /// Data applied and flushed between two Paxos changes.
        Data,
        /// The applier's work done: sled holds what was logged.
        Apply,
        Checkpoint,
        Compact,
    }

    /// Paxos state is persisted in the order it changed (docs/design.md §10): whatever point a
    /// server stops at, it comes back with the latest promise, accepted proposal and view it
    /// saved, never an older one after a newer one, wherever the newer one was (only in the
    /// log, in sled, in sled after a checkpoint or a compaction).
    #[tokio::test]
    async fn paxos_state_reopens_as_last_saved_whatever_the_step_it_stopped_at() {
        let promise = |ballot, to| Some(Promise::new(ballot, to, 0));
        let accepted = |ballot, epoch, primary| {
            Some(Some(Accepted {
                ballot,
                from_epoch: epoch - 1,
                view: View::new(epoch, primary, [0, 1, 2]),
            }))
        };
        let steps = [
            Step::Save(Some(View::new(1, 0, [0, 1, 2])), promise(1, 0), None),
            Step::Data,
            Step::Save(None, promise(2, 1), None),
            Step::Apply,
            Step::Save(None, None, accepted(2, 2, 1)),
            Step::Checkpoint,
            Step::Save(None, promise(3, 2), None),
            Step::Data,
            Step::Apply,
            Step::Save(Some(View::new(2, 1, [0, 1, 2])), None, Some(None)),
            Step::Compact,
            Step::Save(None, promise(4, 0), accepted(4, 3, 0)),
            Step::Apply,
            Step::Save(None, promise(5, 2), None),
        ];
        for stop in 1..=steps.len() {
            let dir = tempfile::tempdir().unwrap();
            let mut want = Meta::default();
            let mut lsn = 0;
            {
                let s = Store::open(dir.path(), SyncMode::None).unwrap();
                s.durable.auto_compact.store(false, Ordering::Relaxed);
                for step in &steps[..stop] {
                    match step {
                        Step::Save(v, p, a) => {
                            s.save_paxos(v.as_ref(), *p, a.as_ref().map(Option::as_ref))
                                .await
                                .unwrap();
                            want.view = v.clone().or(want.view.take());
                            want.promise = p.unwrap_or(want.promise);
                            if let Some(a) = a {
                                want.accepted = a.clone();
                            }
                        }
                        Step::Data => {
                            for _ in 0..50 {
                                lsn += 1;
                                s.apply_records(
                                    &[rec(lsn, &format!("k{lsn}"), Some("v"))],
                                    pos(lsn),
                                )
                                .unwrap();
                            }
                            s.flush_data().await.unwrap();
                        }
                        Step::Apply => s.durable.apply_logged().unwrap(),
                        Step::Checkpoint => s.durable.checkpoint().unwrap(),
                        Step::Compact => {
                            let size = s.durable.db().size_on_disk().unwrap();
                            assert!(s.durable.compact(size, None).unwrap());
                        }
                    }
                }
            }
            let s = reopen(dir.path());
            let got = s.load_meta().unwrap();
            let after = format!("stopped after step {stop}");
            assert_eq!(got.view, want.view, "{after}");
            assert_eq!(got.promise, want.promise, "{after}");
            assert_eq!(got.accepted, want.accepted, "{after}");
            assert_eq!(got.position.applied, lsn, "{after}");
        }
    }

    #[tokio::test]
    async fn paxos_state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), SyncMode::None).unwrap();
            let v = View::new(4, 1, [1, 2]);
            let a = Accepted {
                ballot: 5,
                from_epoch: 4,
                view: View::new(5, 2, [2]),
            };
            s.save_paxos(Some(&v), Some(Promise::new(5, 2, 0)), Some(Some(&a)))
                .await
                .unwrap();
        }
        let s = reopen(dir.path());
        let m = s.load_meta().unwrap();
        assert_eq!(m.view, Some(View::new(4, 1, [1, 2])));
        assert_eq!(m.promise, Promise::new(5, 2, 0));
        assert_eq!(m.accepted.unwrap().ballot, 5);
    }

    #[tokio::test]
    async fn injected_flush_failure_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), SyncMode::Always).unwrap();
        s.inject_flush_failure();
        assert!(s.flush_data().await.is_err());
        assert!(s.flush_data().await.is_ok());
    }
}
