//! Local storage: one sled tree with prefixed keys (DESIGN.md §3).
//!
//! - `d/<item>` -> `lsn (be64) | flag | value`: the current entry of a user or session item
//!   (flag 1 = value, 0 = tombstone).
//! - the lsn index (each item's latest lsn, ordered) lives in memory and is rebuilt from the
//!   entries when the store opens, so "everything changed after lsn X" is a range scan
//!   without costing the write path extra tree updates; a record's items share its lsn.
//! - `m/...`: view, promise, accepted proposal, applied / committed / last record epoch.
//!
//! Applied records are staged in memory (visible to every read at once) and appended to the
//! write-ahead log (`wal.rs`) as one batch by the next flush, with the log position they lead
//! to; in `--sync always` mode the caller flushes before acknowledging. Staging matters on the
//! primary, whose sequencer applies many small batches between two flushes. Paxos state is
//! always flushed before replying.
//!
//! A flush is an `fdatasync` of the log: sled's own flush does not survive a power failure.
//! The log is the store's atomicity and durability; sled is where reads find the data. A
//! thread of its own writes logged operations to sled thousands at a time (until then they
//! are read from memory), after the log holding them is durable, so sled never holds what
//! the log could lose. sled is made durable at checkpoints, when the log has grown by a
//! segment; opening the store replays what the log still holds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::SyncMode;
use crate::error::StorageError;
use crate::identity::Membership;
use crate::types::{Entry, Rank, Record, SyncEntry, View};
use crate::wal::{Op, Wal};

const DATA: &[u8] = b"d/";
const VIEW: &[u8] = b"m/view";
const PROMISE: &[u8] = b"m/promise";
const ACCEPTED: &[u8] = b"m/accepted";
const POSITION: &[u8] = b"m/position";
const CLUSTER: &[u8] = b"m/cluster";
const GC_HORIZON: &[u8] = b"m/gc";

/// The highest ballot this acceptor promised, and to whom.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promise {
    pub ballot: u64,
    pub to: Rank,
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

/// An item's latest lsn and whether its entry there is a tombstone, in one word (lsns stay
/// far below 2^63): the index holds one per item ever written and not yet collected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Latest(u64);

impl Latest {
    fn new(lsn: u64, tombstone: bool) -> Latest {
        Latest(lsn << 1 | u64::from(tombstone))
    }

    fn lsn(self) -> u64 {
        self.0 >> 1
    }

    fn tombstone(self) -> bool {
        self.0 & 1 == 1
    }
}

/// The lsn index (DESIGN.md §3's `l/` range, kept in memory and rebuilt from the entries at
/// start): each item's latest lsn, ordered by lsn, so "everything changed after X" and
/// "my uncommitted tail" are range scans. Keeping it out of sled saves two tree updates and
/// a read per written item. The tombstones among them, by lsn, are what collection drops.
#[derive(Default)]
struct LsnIndex {
    by_item: std::collections::HashMap<Bytes, Latest>,
    by_lsn: std::collections::BTreeSet<(u64, Bytes)>,
    tombstones: std::collections::BTreeSet<(u64, Bytes)>,
}

impl LsnIndex {
    /// Records `item`'s latest entry: its lsn and whether it is a tombstone, or `None` when
    /// the item is gone altogether.
    fn set(&mut self, item: &Bytes, latest: Option<(u64, bool)>) {
        let Some((l, tombstone)) = latest else {
            if let Some((key, old)) = self.by_item.remove_entry(item) {
                if old.tombstone() {
                    self.tombstones.remove(&(old.lsn(), key.clone()));
                }
                self.by_lsn.remove(&(old.lsn(), key));
            }
            return;
        };
        let key = match self.by_item.get_mut(item) {
            Some(o) => {
                let old = std::mem::replace(o, Latest::new(l, tombstone));
                let (_, key) = self
                    .by_lsn
                    .take(&(old.lsn(), item.clone()))
                    .expect("both maps hold every item");
                if old.tombstone() {
                    self.tombstones.remove(&(old.lsn(), key.clone()));
                }
                key
            }
            None => {
                // A copy of its own: `item` usually points into a whole received request
                // (prost decodes `bytes` fields as slices of it), which the index would
                // otherwise keep alive for as long as the key exists.
                let key = Bytes::copy_from_slice(item);
                self.by_item.insert(key.clone(), Latest::new(l, tombstone));
                key
            }
        };
        if tombstone {
            self.tombstones.insert((l, key.clone()));
        }
        self.by_lsn.insert((l, key));
    }

    /// Takes up to `most` tombstones with an lsn at or below `limit` out of the index, lowest
    /// lsn first.
    fn take_tombstones(&mut self, limit: u64, most: usize) -> Vec<(u64, Bytes)> {
        let mut taken = Vec::new();
        while taken.len() < most {
            match self.tombstones.first() {
                Some((lsn, _)) if *lsn <= limit => {}
                _ => break,
            }
            let (lsn, item) = self.tombstones.pop_first().expect("just seen");
            self.by_item.remove(&item);
            self.by_lsn.remove(&(lsn, item.clone()));
            taken.push((lsn, item));
        }
        if !taken.is_empty() {
            // A map keeps its largest size: give the memory back once it is mostly empty.
            if self.by_item.capacity() > 2 * self.by_item.len() + 1024 {
                self.by_item.shrink_to_fit();
            }
        }
        taken
    }
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
}

/// Tombstone collection (DESIGN.md §3, §7). A tombstone may be dropped once every member of
/// the view has it committed: the primary hands out that horizon on its appends
/// (`Store::collect_up_to`), and a collector thread drops tombstones up to it. A state
/// transfer whose `since` is below `horizon` might miss a deletion and must be full.
#[derive(Default)]
struct Gc {
    /// The highest lsn of a tombstone this store dropped (`m/gc`), or took from a full
    /// transfer's source: a transfer from here with `since` below it must be full.
    horizon: u64,
    /// Incremental transfers in progress, by `since`, with their count: no tombstone above
    /// the lowest is dropped until they end, or they could miss its deletion.
    pins: std::collections::BTreeMap<u64, usize>,
    /// Per receiver, the commit point its latest transfer handed it, and until when nothing
    /// above it is dropped: its next transfer starts there (a joiner catches up in several,
    /// the last one during the install), and must not have to be full again.
    receivers: std::collections::HashMap<u32, (u64, std::time::Instant)>,
}

impl Gc {
    /// The highest lsn collection may reach now, given the replica's target.
    fn limit(&mut self, target: u64) -> u64 {
        let now = std::time::Instant::now();
        self.receivers.retain(|_, (_, until)| *until > now);
        let pinned = self.pins.keys().next().copied();
        let held = self.receivers.values().map(|&(at, _)| at).min();
        [Some(target), pinned, held]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(target)
    }
}

/// How long a receiver's next transfer is spared a full one (a joiner's catch-up and join).
const RECEIVER_HOLD: std::time::Duration = std::time::Duration::from_secs(30);

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

/// Most tombstones one collection pass drops, so a pass holds the log's writer only briefly.
const GC_CHUNK: usize = 16 * 1024;
/// How often the collector looks for work.
const GC_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

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

    /// Drops every tombstone at or below the target horizon (and below every pin), a chunk
    /// at a time. Each chunk is one log record: the removals and the new `m/gc`, so the
    /// stored horizon always covers what was dropped. Returns how many were dropped.
    fn collect(&self, durable: &Arc<Durable>) -> Result<usize, StorageError> {
        let target = self.gc_target.load(Ordering::Acquire);
        let mut dropped = 0;
        loop {
            let writing = durable.writing.lock().expect("store writer lock poisoned");
            let mut gc = self.gc();
            let limit = gc.limit(target);
            let victims = self.index().take_tombstones(limit, GC_CHUNK);
            let Some(&(top, _)) = victims.last() else {
                break;
            };
            gc.horizon = gc.horizon.max(top);
            let mut ops: Vec<Op> = victims
                .iter()
                .map(|(_, item)| Op {
                    key: data_key(item),
                    value: None,
                })
                .collect();
            ops.push(Op {
                key: GC_HORIZON.to_vec(),
                value: Some(json(&gc.horizon)),
            });
            // Logged before the staged tombstones go: a read finds either the tombstone or
            // the removal, never an older value sled may still hold.
            durable.log_locked(ops)?;
            let mut staged = self.staged();
            for (lsn, item) in &victims {
                let tombstone = Some(Entry {
                    lsn: *lsn,
                    value: None,
                });
                if staged.items.get(item) == Some(&tombstone) {
                    staged.items.remove(item);
                }
            }
            drop(staged);
            dropped += victims.len();
            drop(gc);
            drop(writing);
            durable.checkpoint_if_full();
        }
        if dropped > 0 {
            tracing::info!(dropped, horizon = self.gc().horizon, "tombstones collected");
        }
        Ok(dropped)
    }

    /// The collector: drops tombstones as the horizon moves, until the store closes.
    fn run_collector(&self, durable: &Arc<Durable>) {
        let mut closing = self.closing.lock().expect("collector lock poisoned");
        loop {
            if *closing {
                return;
            }
            closing = self
                .wake
                .wait_timeout(closing, GC_EVERY)
                .expect("collector lock poisoned")
                .0;
            if *closing {
                return;
            }
            drop(closing);
            if let Err(e) = self.collect(durable) {
                tracing::error!(error = %e, "collecting tombstones failed; no more writes are taken");
                durable.logged().failed = Some(e.to_string());
                return;
            }
            closing = self.closing.lock().expect("collector lock poisoned");
        }
    }
}

/// Operations in the log that sled does not have yet, latest per sled key (`None`: removed).
/// sled gets them from a thread of its own, many at a time: each sled batch costs sled two
/// log-buffer writes and a wake-up of every one of its I/O threads, whatever its size, which
/// made sled the largest cost of a replicated write when every flush wrote one.
#[derive(Default)]
struct Logged {
    fresh: std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>,
    fresh_bytes: usize,
    /// What the applier is writing to sled right now, still read from here until sled has it.
    applying: Arc<std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>>,
    /// Set when the store closes: the applier stops.
    closing: bool,
    /// A failed apply: the store stops taking writes (fail-stop, DESIGN.md §3).
    failed: Option<String>,
}

impl Logged {
    fn lookup(&self, key: &[u8]) -> Option<Option<Vec<u8>>> {
        self.fresh
            .get(key)
            .or_else(|| self.applying.get(key))
            .cloned()
    }
}

/// The applier writes the logged operations to sled once this many keys have gathered ...
const APPLY_OPS: usize = 65536;
/// ... or they hold this many bytes ...
const APPLY_BYTES: usize = 8 << 20;
/// ... or this long after the last time; and the log's writer does it itself past this size,
/// so a writer faster than sled cannot grow the map without bound. A key written again
/// within the window costs sled nothing more, and is read from memory meanwhile.
const APPLY_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
const APPLY_INLINE_BYTES: usize = 64 << 20;
/// With `--sync none`, how long a logged write may wait for its `fdatasync`.
const SYNC_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// A log that has not grown for this long is checkpointed if it holds this much.
const IDLE_CHECKPOINT_AFTER: std::time::Duration = std::time::Duration::from_secs(10);
const IDLE_CHECKPOINT_BYTES: u64 = 1024 * 1024;

fn op_bytes(key: &[u8], value: &Option<Vec<u8>>) -> usize {
    key.len() + value.as_ref().map_or(0, Vec::len)
}

/// sled and the log in front of it, shared with the applier and checkpoint threads.
struct Durable {
    db: sled::Db,
    /// sled's directory: its data file `db` and the `blobs/` it writes large nodes and values
    /// to (without syncing them) are `fsync`ed at checkpoints.
    dir: PathBuf,
    /// The blobs already `fsync`ed: a blob file is written once and never changed.
    synced_blobs: Mutex<std::collections::HashSet<std::ffi::OsString>>,
    wal: Wal,
    /// One writer to the log at a time, so an older snapshot is never logged after a newer
    /// one.
    writing: Mutex<()>,
    checkpointing: AtomicBool,
    /// `IDLE_CHECKPOINT_AFTER` in milliseconds (shorter in tests).
    idle_checkpoint_ms: AtomicU64,
    /// `std::sync::Mutex`: short sections (lookups, merging one batch), never held across an
    /// await or while sled works.
    logged: Mutex<Logged>,
    /// Wakes the applier.
    logged_grew: Condvar,
    /// One apply at a time (the applier's, or a checkpoint's), so sled never gets an older
    /// value after a newer one.
    applying: Mutex<()>,
}

impl Durable {
    fn logged(&self) -> MutexGuard<'_, Logged> {
        self.logged.lock().expect("logged operations lock poisoned")
    }

    /// Appends a batch to the log (not yet durable); readable at once, in sled later.
    fn log(&self, ops: Vec<Op>) -> Result<(), StorageError> {
        let _writing = self.writing.lock().expect("store writer lock poisoned");
        self.log_locked(ops)
    }

    fn log_locked(&self, ops: Vec<Op>) -> Result<(), StorageError> {
        if let Some(e) = &self.logged().failed {
            return Err(StorageError::EarlierWriteFailed(e.clone()));
        }
        self.wal.append(&ops)?;
        let (wake, inline) = {
            let mut logged = self.logged();
            for Op { key, value } in ops {
                logged.fresh_bytes += op_bytes(&key, &value);
                logged.fresh.insert(key, value);
            }
            (
                logged.fresh.len() >= APPLY_OPS || logged.fresh_bytes >= APPLY_BYTES,
                logged.fresh_bytes >= APPLY_INLINE_BYTES,
            )
        };
        if inline {
            self.apply_logged()?;
        } else if wake {
            self.logged_grew.notify_one();
        }
        Ok(())
    }

    /// Sets (or with `None` removes) one key in sled.
    fn set_in_sled(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), StorageError> {
        match value {
            Some(v) => self.db.insert(key, v)?,
            None => self.db.remove(key)?,
        };
        Ok(())
    }

    /// The value of a sled key: logged or in sled.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(v) = self.logged().lookup(key) {
            return Ok(v);
        }
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }

    /// Writes everything logged so far to sled. The log is made durable first: sled persists
    /// on its own schedule, and must never hold what a power failure could take from the log
    /// (replaying an older log over it would mix old and new).
    fn apply_logged(&self) -> Result<(), StorageError> {
        let _applying = self.applying.lock().expect("apply lock poisoned");
        let batch = {
            let mut logged = self.logged();
            if logged.fresh.is_empty() {
                return Ok(());
            }
            logged.fresh_bytes = 0;
            let batch = Arc::new(std::mem::take(&mut logged.fresh));
            logged.applying = batch.clone();
            batch
        };
        let result = self.wal.sync_blocking().and_then(|()| {
            // In key order, so consecutive inserts land in the same sled leaf. One insert at
            // a time: a sled batch would also take sled's global lock, which every read then
            // waits on.
            let mut ops: Vec<_> = batch.iter().collect();
            ops.sort_unstable_by(|a, b| a.0.cmp(b.0));
            ops.into_iter()
                .try_for_each(|(key, value)| self.set_in_sled(key, value.as_deref()))
        });
        let mut logged = self.logged();
        match &result {
            Ok(()) => logged.applying = Default::default(),
            // Left readable in `applying`; no later write is taken.
            Err(e) => logged.failed = Some(e.to_string()),
        }
        result
    }

    /// The applier: writes logged operations to sled until the store closes. With `--sync
    /// none` it also syncs the log every `SYNC_EVERY` meanwhile, which nothing else does.
    ///
    /// It also checkpoints a log that has stopped growing for `IDLE_CHECKPOINT_AFTER`: the
    /// log would otherwise keep up to a segment of records (and the disk space under them)
    /// for as long as no writes come.
    fn run_applier(self: &Arc<Self>, sync: SyncMode) {
        let mut applied_at = std::time::Instant::now();
        let (mut log_len, mut log_grew_at) = (self.wal.active_len(), std::time::Instant::now());
        let mut logged = self.logged();
        loop {
            if logged.closing || logged.failed.is_some() {
                return;
            }
            let due = logged.fresh.len() >= APPLY_OPS
                || logged.fresh_bytes >= APPLY_BYTES
                || (!logged.fresh.is_empty() && applied_at.elapsed() >= APPLY_EVERY);
            if !due {
                let (guard, waited) = self
                    .logged_grew
                    .wait_timeout(logged, SYNC_EVERY)
                    .expect("logged operations lock poisoned");
                logged = guard;
                if waited.timed_out() && sync == SyncMode::None && !logged.fresh.is_empty() {
                    drop(logged);
                    if let Err(e) = self.wal.sync_blocking() {
                        tracing::error!(error = %e, "syncing the log failed; no more writes are taken");
                        self.logged().failed = Some(e.to_string());
                    }
                    logged = self.logged();
                }
                if waited.timed_out() {
                    let len = self.wal.active_len();
                    if len != log_len {
                        (log_len, log_grew_at) = (len, std::time::Instant::now());
                    } else if len >= IDLE_CHECKPOINT_BYTES
                        && log_grew_at.elapsed()
                            >= std::time::Duration::from_millis(
                                self.idle_checkpoint_ms.load(Ordering::Relaxed),
                            )
                    {
                        self.start_checkpoint();
                        log_grew_at = std::time::Instant::now();
                    }
                }
                continue;
            }
            drop(logged);
            if let Err(e) = self.apply_logged() {
                tracing::error!(error = %e, "writing the log to sled failed; no more writes are taken");
            }
            applied_at = std::time::Instant::now();
            logged = self.logged();
        }
    }

    /// Makes sled durable up to the start of a new log segment and deletes the older ones.
    fn checkpoint(&self) -> Result<(), StorageError> {
        {
            let _writing = self.writing.lock().expect("store writer lock poisoned");
            self.wal.rotate()?;
        }
        let older = self.wal.older()?;
        self.apply_logged()?;
        self.db.flush()?;
        std::fs::File::open(self.dir.join("db"))?.sync_all()?;
        self.sync_blobs()?;
        self.wal.remove(&older)
    }

    /// `fsync`s the blobs sled wrote since the last checkpoint, and their directory.
    fn sync_blobs(&self) -> Result<(), StorageError> {
        let blobs = self.dir.join("blobs");
        let mut synced = self.synced_blobs.lock().expect("blob list lock poisoned");
        let mut present = std::collections::HashSet::new();
        for entry in std::fs::read_dir(&blobs)? {
            let entry = entry?;
            let name = entry.file_name();
            if !synced.contains(&name) {
                match std::fs::File::open(entry.path()) {
                    Ok(f) => f.sync_all()?,
                    // Collected by sled meanwhile.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            present.insert(name);
        }
        std::fs::File::open(&blobs)?.sync_all()?;
        *synced = present;
        Ok(())
    }

    /// Starts a checkpoint on a thread of its own once the log has grown by a segment.
    fn checkpoint_if_full(self: &Arc<Self>) {
        if self.wal.full() {
            self.start_checkpoint();
        }
    }

    /// Starts a checkpoint on a thread of its own, unless one is running.
    fn start_checkpoint(self: &Arc<Self>) {
        if self.checkpointing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                if let Err(e) = this.checkpoint() {
                    tracing::warn!(error = %e, "checkpoint failed; the log keeps its segments");
                }
                this.checkpointing.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start a checkpoint");
            self.checkpointing.store(false, Ordering::Release);
        }
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

/// Held while an incremental state transfer is served (see [`Store::pin_transfer`]).
pub struct TransferPin {
    items: Arc<Items>,
    /// `None` for a full transfer, which needs no pin.
    since: Option<u64>,
}

impl TransferPin {
    /// Whether the transfer must be full.
    pub fn full(&self) -> bool {
        self.since.is_none()
    }
}

impl Drop for TransferPin {
    fn drop(&mut self) {
        let Some(since) = self.since else { return };
        let mut gc = self.items.gc();
        if let std::collections::btree_map::Entry::Occupied(mut o) = gc.pins.entry(since) {
            *o.get_mut() -= 1;
            if *o.get() == 0 {
                o.remove();
            }
        }
    }
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

fn data_key(item: &[u8]) -> Vec<u8> {
    [DATA, item].concat()
}

fn encode_entry(e: &Entry) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + e.value.as_ref().map_or(0, |v| v.len()));
    v.extend_from_slice(&e.lsn.to_be_bytes());
    match &e.value {
        Some(val) => {
            v.push(1);
            v.extend_from_slice(val);
        }
        None => v.push(0),
    }
    v
}

fn decode_entry(raw: &[u8]) -> Result<Entry, StorageError> {
    if raw.len() < 9 {
        return Err(StorageError::Corrupt("short entry".into()));
    }
    let lsn = u64::from_be_bytes(raw[..8].try_into().expect("8 bytes"));
    let value = match raw[8] {
        1 => Some(Bytes::copy_from_slice(&raw[9..])),
        0 => None,
        f => return Err(StorageError::Corrupt(format!("entry flag {f}"))),
    };
    Ok(Entry { lsn, value })
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("meta types always serialize")
}

fn unjson<T: for<'a> Deserialize<'a>>(raw: &[u8], what: &str) -> Result<T, StorageError> {
    serde_json::from_slice(raw).map_err(|e| StorageError::Corrupt(format!("{what}: {e}")))
}

impl Store {
    pub fn open(dir: &Path, sync: SyncMode) -> Result<Store, StorageError> {
        // The log is checked before anything is opened for writing: damage stops the server
        // with the data directory as it found it (sled's open may already write).
        let mut found = Wal::recover(&dir.join("wal"))?;
        let segment_bytes = segment_bytes_from_env()?;
        std::fs::create_dir_all(dir)?;
        let db = sled::Config::default()
            .path(dir)
            .cache_capacity(256 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(Some(500))
            .open()?;
        let unsaved = std::mem::take(&mut found.batches);
        let wal = Wal::start(found)?;
        if let Some(bytes) = segment_bytes {
            wal.set_segment_bytes(bytes);
        }
        let durable = Arc::new(Durable {
            db,
            dir: dir.to_path_buf(),
            synced_blobs: Default::default(),
            wal,
            writing: Mutex::new(()),
            checkpointing: AtomicBool::new(false),
            idle_checkpoint_ms: AtomicU64::new(IDLE_CHECKPOINT_AFTER.as_millis() as u64),
            logged: Default::default(),
            logged_grew: Condvar::new(),
            applying: Mutex::new(()),
        });
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
            for kv in durable.db.scan_prefix(DATA) {
                let (k, v) = kv?;
                let e = decode_entry(&v)?;
                let item = Bytes::copy_from_slice(&k[DATA.len()..]);
                index.set(&item, Some((e.lsn, e.value.is_none())));
            }
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

    pub fn get(&self, item: &[u8]) -> Result<Option<Entry>, StorageError> {
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
        let mut staged = self.staged();
        let mut index = self.index();
        for r in records {
            for item in &r.items {
                let e = Entry {
                    lsn: r.lsn,
                    value: item.value.clone(),
                };
                staged.items.insert(item.key.clone(), Some(e));
                index.set(&item.key, Some((r.lsn, item.value.is_none())));
            }
        }
        staged.position = Some(pos);
        drop(index);
        drop(staged);
        self.writes
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Sets entries unconditionally (state transfer, DESIGN.md §7) and, with the final chunk,
    /// the log position. Written to sled at once (not durable before a flush), so a long
    /// transfer is not held in memory.
    pub fn set_entries(
        &self,
        entries: &[SyncEntry],
        pos: Option<Position>,
    ) -> Result<(), StorageError> {
        {
            let mut staged = self.staged();
            let mut index = self.index();
            for se in entries {
                staged.items.insert(se.key.clone(), se.entry.clone());
                index.set(
                    &se.key,
                    se.entry.as_ref().map(|e| (e.lsn, e.value.is_none())),
                );
            }
            if pos.is_some() {
                staged.position = pos;
            }
        }
        self.write_staged()
    }

    /// Hands everything staged to the log as one batch (not yet durable).
    pub(crate) fn write_staged(&self) -> Result<(), StorageError> {
        let _writing = self
            .durable
            .writing
            .lock()
            .expect("store writer lock poisoned");
        let (items, position, gc_horizon) = {
            let mut staged = self.staged();
            if staged.items.is_empty() && staged.position.is_none() && staged.gc_horizon.is_none() {
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
    /// the sync mode) and atomically: one log batch.
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
        self.durable.log(ops)?;
        self.flush_always().await
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
        self.durable.wal.sync().await?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
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

    /// Starts serving a state transfer of everything changed after `since` (DESIGN.md §7). If
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
    pub fn finish_replacement(&self, replacement: Replacement, source_horizon: u64) {
        let removed = replacement.stale.len();
        let mut staged = self.staged();
        let mut index = self.index();
        for item in replacement.stale {
            staged.items.insert(item.clone(), None);
            index.set(&item, None);
        }
        staged.gc_horizon = Some(staged.gc_horizon.unwrap_or(0).max(source_horizon));
        drop(index);
        drop(staged);
        tracing::info!(
            removed,
            horizon = source_horizon,
            "full transfer: removed the items the source did not send"
        );
    }

    /// Items written after `committed`: the tail a state transfer must repair (DESIGN.md §7).
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
    use super::*;
    use crate::types::Item;

    fn rec(lsn: u64, key: &str, val: Option<&str>) -> Record {
        Record {
            lsn,
            epoch: 1,
            items: vec![Item {
                key: Bytes::copy_from_slice(key.as_bytes()),
                value: val.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            }],
        }
    }

    /// Reopens a store in the same process: sled's background flusher lets go of the file
    /// lock a moment after the previous handle is dropped.
    fn reopen(dir: &Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match Store::open(dir, SyncMode::None) {
                Ok(s) => return s,
                Err(e) if std::time::Instant::now() > deadline => panic!("reopen: {e}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    }

    fn keys(s: &Store, since: u64) -> Vec<(String, Option<u64>)> {
        s.changed_since(since)
            .map(|e| {
                let e = e.unwrap();
                (
                    String::from_utf8(e.key.to_vec()).unwrap(),
                    e.entry.map(|x| x.lsn),
                )
            })
            .collect()
    }

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
        s.save_paxos(None, Some(Promise { ballot: 7, to: 1 }), None)
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
        assert_eq!(meta.promise, Promise { ballot: 7, to: 1 });
        assert_eq!(
            r.get(b"a").unwrap().unwrap(),
            Entry {
                lsn: 2,
                value: None
            }
        );
        assert_eq!(keys(&r, 0), vec![("a".into(), Some(2))]);
    }

    #[tokio::test]
    async fn logged_writes_reach_sled_by_themselves_and_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), SyncMode::Always).unwrap();
        let pos = Position {
            applied: 2,
            committed: 2,
            last_epoch: 1,
        };
        s.apply_records(&[rec(1, "a", Some("1")), rec(2, "b", Some("2"))], pos)
            .unwrap();
        s.flush_data().await.unwrap();
        let in_sled = |item: &str| s.durable.db.get(data_key(item.as_bytes())).unwrap();
        let deadline = std::time::Instant::now() + APPLY_EVERY * 10;
        while in_sled("b").is_none() {
            assert_eq!(
                s.get(b"b").unwrap().unwrap().lsn,
                2,
                "readable while logged"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "the applier never wrote the log to sled"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(in_sled("a").is_some());
        assert_eq!(s.get(b"a").unwrap().unwrap().value.unwrap(), "1");
        assert_eq!(s.load_meta().unwrap().position, pos);
        assert!(s.durable.logged().fresh.is_empty());
    }

    #[tokio::test]
    async fn checkpoints_keep_the_log_short_and_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ids = |dir: &Path| crate::wal::segment_ids(&dir.join("wal")).unwrap();
        let segments = |dir: &Path| ids(dir).len();
        let newest = |dir: &Path| *ids(dir).last().unwrap();
        {
            let s = Store::open(dir.path(), SyncMode::Always).unwrap();
            s.durable.wal.set_segment_bytes(4096);
            for lsn in 1..=400u64 {
                let key = format!("k{}", lsn % 50);
                let pos = Position {
                    applied: lsn,
                    committed: lsn,
                    last_epoch: 1,
                };
                s.apply_records(&[rec(lsn, &key, Some(&"v".repeat(100)))], pos)
                    .unwrap();
                s.flush_data().await.unwrap();
            }
            // ~60 KB were logged: up to a dozen segments of 4 KiB, all but the last retired.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while s.durable.checkpointing.load(Ordering::Acquire) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "checkpoint never ended"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            // A segment that fills while a checkpoint runs waits for the next one, so how
            // many there were depends on the machine's speed: several, at least.
            assert!(
                newest(dir.path()) > 3,
                "only {} segments",
                newest(dir.path())
            );
            assert!(
                segments(dir.path()) <= 2,
                "{} segments",
                segments(dir.path())
            );
        }
        let s = reopen(dir.path());
        assert_eq!(s.load_meta().unwrap().position.applied, 400);
        for lsn in 351..=400u64 {
            let e = s.get(format!("k{}", lsn % 50).as_bytes()).unwrap().unwrap();
            assert_eq!(e.lsn, lsn);
        }
        assert_eq!(segments(dir.path()), 1, "opening retires the old log");
    }

    #[tokio::test]
    async fn a_checkpoint_syncs_the_blobs_sled_writes_large_values_to() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), SyncMode::Always).unwrap();
        let big = "b".repeat(300 * 1024);
        let pos = Position {
            applied: 1,
            committed: 1,
            last_epoch: 1,
        };
        s.apply_records(&[rec(1, "big", Some(&big))], pos).unwrap();
        s.flush_data().await.unwrap();
        s.durable.checkpoint().unwrap();
        let on_disk: std::collections::HashSet<_> = std::fs::read_dir(dir.path().join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            !on_disk.is_empty(),
            "sled wrote no blob for a 300 KiB value"
        );
        assert_eq!(*s.durable.synced_blobs.lock().unwrap(), on_disk);
        assert_eq!(
            s.get(b"big").unwrap().unwrap().value.unwrap().len(),
            big.len()
        );
    }

    #[test]
    fn the_index_keeps_no_received_request_alive() {
        // A key decoded from a request is a slice of the whole request's buffer.
        let request = Bytes::from(vec![b'k'; 4096]);
        let mut index = LsnIndex::default();
        index.set(&request.slice(0..8), Some((1, false)));
        index.set(&request.slice(0..8), Some((2, true)));
        assert!(
            request.is_unique(),
            "the index holds a slice of the request"
        );
        assert_eq!(
            index.by_item.get(&request[0..8]),
            Some(&Latest::new(2, true))
        );
        assert_eq!(index.by_lsn.len(), 1);
        index.set(&request.slice(0..8), None);
        assert!(index.by_item.is_empty() && index.by_lsn.is_empty());
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
            s.durable.db.flush().unwrap();
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
            s.save_paxos(Some(&v), Some(Promise { ballot: 5, to: 2 }), Some(Some(&a)))
                .await
                .unwrap();
        }
        let s = reopen(dir.path());
        let m = s.load_meta().unwrap();
        assert_eq!(m.view, Some(View::new(4, 1, [1, 2])));
        assert_eq!(m.promise, Promise { ballot: 5, to: 2 });
        assert_eq!(m.accepted.unwrap().ballot, 5);
    }

    fn pos(applied: u64) -> Position {
        Position {
            applied,
            committed: applied,
            last_epoch: 1,
        }
    }

    /// Items the index holds, with their lsn and whether they are tombstones.
    fn indexed(s: &Store) -> Vec<(String, u64, bool)> {
        let index = s.index();
        let mut v: Vec<_> = index
            .by_item
            .iter()
            .map(|(k, l)| {
                (
                    String::from_utf8(k.to_vec()).unwrap(),
                    l.lsn(),
                    l.tombstone(),
                )
            })
            .collect();
        v.sort();
        assert_eq!(index.by_lsn.len(), index.by_item.len());
        assert_eq!(
            index.tombstones.len(),
            v.iter().filter(|(_, _, t)| *t).count()
        );
        v
    }

    #[tokio::test]
    async fn tombstones_up_to_the_horizon_are_dropped_everywhere_and_the_horizon_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), SyncMode::Always).unwrap();
            s.apply_records(
                &[
                    rec(1, "a", Some("1")),
                    rec(2, "b", Some("2")),
                    rec(3, "c", Some("3")),
                    rec(4, "a", None),
                    rec(5, "b", None),
                    rec(6, "c", None),
                    rec(7, "c", Some("again")),
                    rec(8, "d", None),
                ],
                pos(8),
            )
            .unwrap();
            s.flush_data().await.unwrap();
            // Nothing is dropped before the replica allows it.
            assert_eq!(s.collect_now().unwrap(), 0);
            s.collect_up_to(5);
            // (The collector thread may be first: the outcome is checked, not the count.)
            s.collect_now().unwrap();
            // A lower horizon later changes nothing.
            s.collect_up_to(3);
            assert_eq!(s.collect_now().unwrap(), 0);
            assert_eq!(s.gc_horizon(), 5);
            assert_eq!(s.get(b"a").unwrap(), None);
            assert_eq!(s.get(b"b").unwrap(), None);
            assert_eq!(
                s.get(b"d").unwrap(),
                Some(Entry {
                    lsn: 8,
                    value: None
                }),
                "above the horizon"
            );
            assert_eq!(
                indexed(&s),
                vec![("c".into(), 7, false), ("d".into(), 8, true)]
            );
            s.flush_data().await.unwrap();
        }
        let s = reopen(dir.path());
        assert_eq!(s.gc_horizon(), 5, "the horizon is stored");
        assert_eq!(s.get(b"a").unwrap(), None);
        assert_eq!(s.get(b"b").unwrap(), None);
        assert_eq!(
            indexed(&s),
            vec![("c".into(), 7, false), ("d".into(), 8, true)]
        );
    }

    #[tokio::test]
    async fn a_tombstone_still_staged_is_dropped_without_uncovering_the_older_value() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), SyncMode::Always).unwrap();
        s.apply_records(&[rec(1, "a", Some("old"))], pos(1))
            .unwrap();
        s.flush_data().await.unwrap();
        s.durable.apply_logged().unwrap();
        // The tombstone is only staged: sled and the log still hold the value.
        s.apply_records(&[rec(2, "a", None)], pos(2)).unwrap();
        s.collect_up_to(2);
        s.collect_now().unwrap();
        assert!(indexed(&s).is_empty());
        assert_eq!(s.get(b"a").unwrap(), None);
        s.flush_data().await.unwrap();
        s.durable.apply_logged().unwrap();
        assert_eq!(s.get(b"a").unwrap(), None);
        assert!(s.durable.db.get(data_key(b"a")).unwrap().is_none());
    }

    #[tokio::test]
    async fn a_transfer_pins_the_tombstones_above_its_since_and_one_below_the_horizon_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), SyncMode::None).unwrap();
        s.apply_records(
            &[
                rec(1, "a", None),
                rec(2, "b", None),
                rec(3, "c", None),
                rec(4, "d", None),
            ],
            pos(4),
        )
        .unwrap();
        let pin = s.pin_transfer(2, 9, 4);
        assert!(!pin.full(), "nothing was dropped yet");
        s.collect_up_to(4);
        s.collect_now().unwrap();
        assert_eq!(
            indexed(&s),
            vec![("c".into(), 3, true), ("d".into(), 4, true)],
            "only up to the pin"
        );
        assert_eq!(
            keys(&s, 2),
            vec![("c".into(), Some(3)), ("d".into(), Some(4))],
            "the pinned transfer still finds every deletion after its since"
        );
        assert!(s.pin_transfer(1, 9, 4).full(), "since 1 < horizon 2");
        assert!(!s.pin_transfer(2, 9, 4).full());
        drop(pin);
        s.collect_now().unwrap();
        assert!(indexed(&s).is_empty());
        assert_eq!(s.gc_horizon(), 4);
        assert!(s.pin_transfer(3, 9, 4).full());
        assert!(!s.pin_transfer(4, 9, 4).full());
    }

    #[tokio::test]
    async fn a_receivers_next_transfer_starts_where_its_last_ended_and_is_not_full() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), SyncMode::None).unwrap();
        s.apply_records(&[rec(1, "a", None), rec(2, "b", None)], pos(2))
            .unwrap();
        // A joiner was handed commit point 1; the transfer itself is over.
        drop(s.pin_transfer(0, 7, 1));
        s.apply_records(&[rec(3, "c", None)], pos(3)).unwrap();
        s.collect_up_to(3);
        s.collect_now().unwrap();
        assert_eq!(
            indexed(&s),
            vec![("b".into(), 2, true), ("c".into(), 3, true)],
            "held above the joiner's commit point"
        );
        assert!(!s.pin_transfer(1, 7, 3).full(), "its next transfer, from 1");
        // The hold moved to 3 with that transfer; once it lapses, everything goes.
        s.items.gc().receivers.get_mut(&7).unwrap().1 = std::time::Instant::now();
        s.collect_now().unwrap();
        assert!(indexed(&s).is_empty());
        assert_eq!(s.gc_horizon(), 3);
        // A receiver that became a member holds nothing back.
        s.apply_records(&[rec(4, "d", None)], pos(4)).unwrap();
        drop(s.pin_transfer(3, 7, 3));
        s.release_transfer_hold(7);
        s.collect_up_to(4);
        s.collect_now().unwrap();
        assert!(indexed(&s).is_empty());
        assert_eq!(s.gc_horizon(), 4);
    }

    #[tokio::test]
    async fn a_full_transfer_leaves_exactly_the_sources_items_and_takes_its_horizon() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), SyncMode::Always).unwrap();
            s.apply_records(
                &[
                    rec(1, "kept", Some("1")),
                    rec(2, "gone", Some("2")),
                    rec(3, "tomb", None),
                    rec(4, "changed", Some("old")),
                ],
                pos(4),
            )
            .unwrap();
            s.flush_data().await.unwrap();
            let mut r = s.begin_replacement();
            let sent = |key: &'static str, lsn, value: Option<&'static str>| SyncEntry {
                key: Bytes::from_static(key.as_bytes()),
                entry: Some(Entry {
                    lsn,
                    value: value.map(|v| Bytes::from_static(v.as_bytes())),
                }),
            };
            let first = [sent("kept", 1, Some("1")), sent("new", 9, Some("n"))];
            r.received(&first);
            s.set_entries(&first, None).unwrap();
            let last = [sent("changed", 8, Some("new")), sent("late", 10, None)];
            r.received(&last);
            s.finish_replacement(r, 7);
            s.set_entries(&last, Some(pos(10))).unwrap();
            s.flush_data().await.unwrap();
            assert_eq!(s.gc_horizon(), 7);
        }
        let s = reopen(dir.path());
        assert_eq!(
            indexed(&s),
            vec![
                ("changed".into(), 8, false),
                ("kept".into(), 1, false),
                ("late".into(), 10, true),
                ("new".into(), 9, false),
            ]
        );
        assert_eq!(s.get(b"gone").unwrap(), None);
        assert_eq!(s.get(b"tomb").unwrap(), None);
        assert_eq!(s.gc_horizon(), 7, "taken from the source and stored");
        assert_eq!(s.load_meta().unwrap().position, pos(10));
    }

    #[test]
    fn the_index_gives_memory_back_once_its_tombstones_are_dropped() {
        let mut index = LsnIndex::default();
        let n = 100_000u64;
        for i in 1..=n {
            index.set(&Bytes::from(format!("k{i}")), Some((i, false)));
        }
        let full = index.by_item.capacity();
        for i in 1..=n {
            index.set(&Bytes::from(format!("k{i}")), Some((n + i, true)));
        }
        assert_eq!(index.tombstones.len(), n as usize);
        while !index.take_tombstones(2 * n, 10_000).is_empty() {}
        assert!(index.by_item.is_empty() && index.by_lsn.is_empty());
        assert!(
            index.by_item.capacity() < full / 10,
            "capacity {} of {full}",
            index.by_item.capacity()
        );
    }

    #[tokio::test]
    async fn a_log_that_stops_growing_is_checkpointed() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), SyncMode::Always).unwrap();
        s.durable.idle_checkpoint_ms.store(300, Ordering::Relaxed);
        let first = crate::wal::segment_ids(&dir.path().join("wal")).unwrap();
        let big = "v".repeat(64 * 1024);
        for lsn in 1..=20 {
            s.apply_records(&[rec(lsn, &format!("k{lsn}"), Some(&big))], pos(lsn))
                .unwrap();
            s.flush_data().await.unwrap();
        }
        assert!(s.durable.wal.active_len() >= IDLE_CHECKPOINT_BYTES);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while s.durable.wal.active_len() > 0 || s.durable.checkpointing.load(Ordering::Acquire) {
            assert!(
                std::time::Instant::now() < deadline,
                "an idle log of {} bytes was never checkpointed",
                s.durable.wal.active_len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let now = crate::wal::segment_ids(&dir.path().join("wal")).unwrap();
        assert_eq!(now.len(), 1, "older segments deleted: {now:?}");
        assert!(now[0] > *first.last().unwrap());
        assert_eq!(
            s.get(b"k20").unwrap().unwrap().value.unwrap().len(),
            big.len()
        );
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
