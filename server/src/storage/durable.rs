//! The durable side of the store: the write-ahead log in front of sled, the `sled-applier`
//! thread that hands logged operations to sled, and checkpoints, which make sled durable
//! and retire the log segments it no longer needs (docs/design.md §3).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use crate::config::SyncMode;
use crate::error::StorageError;

use super::wal::{Op, Wal};

/// Operations in the log that sled does not have yet, latest per sled key (`None`: removed).
/// sled gets them from a thread of its own, many at a time: each sled batch costs sled two
/// log-buffer writes and a wake-up of every one of its I/O threads, whatever its size, which
/// made sled the largest cost of a replicated write when every flush wrote one.
#[derive(Default)]
pub(super) struct Logged {
    pub(super) fresh: std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>,
    pub(super) fresh_bytes: usize,
    /// What the applier is writing to sled right now, still read from here until sled has it.
    pub(super) applying: Arc<std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>>,
    /// Set when the store closes: the applier stops.
    pub(super) closing: bool,
    /// A failed apply: the store stops taking writes (fail-stop, docs/design.md §3).
    pub(super) failed: Option<String>,
}

impl Logged {
    pub(super) fn lookup(&self, key: &[u8]) -> Option<Option<Vec<u8>>> {
        self.fresh
            .get(key)
            .or_else(|| self.applying.get(key))
            .cloned()
    }
}

/// The applier writes the logged operations to sled once this many keys have gathered ...
pub(super) const APPLY_OPS: usize = 65536;
/// ... or they hold this many bytes ...
pub(super) const APPLY_BYTES: usize = 8 << 20;
/// ... or this long after the last time; and the log's writer does it itself past this size,
/// so a writer faster than sled cannot grow the map without bound. A key written again
/// within the window costs sled nothing more, and is read from memory meanwhile.
pub(super) const APPLY_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
pub(super) const APPLY_INLINE_BYTES: usize = 64 << 20;
/// With `--sync none`, how long a logged write may wait for its `fdatasync`.
pub(super) const SYNC_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// A log that has not grown for this long is checkpointed if it holds this much.
pub(super) const IDLE_CHECKPOINT_AFTER: std::time::Duration = std::time::Duration::from_secs(10);
pub(super) const IDLE_CHECKPOINT_BYTES: u64 = 1024 * 1024;

pub(super) fn op_bytes(key: &[u8], value: &Option<Vec<u8>>) -> usize {
    key.len() + value.as_ref().map_or(0, Vec::len)
}

/// sled and the log in front of it, shared with the applier and checkpoint threads.
pub(super) struct Durable {
    /// `std::sync::RwLock`: read for one sled call at a time, never across an await; written
    /// only by a compaction, to put the rewritten database in place (see `compact.rs`).
    pub(super) db: RwLock<sled::Db>,
    /// The data directory. sled's files are in `sled/` under it: its data file `db` and the
    /// `blobs/` it writes large nodes and values to (without syncing them) are `fsync`ed at
    /// checkpoints.
    pub(super) dir: PathBuf,
    /// The blobs already `fsync`ed: a blob file is written once and never changed.
    pub(super) synced_blobs: Mutex<std::collections::HashSet<std::ffi::OsString>>,
    pub(super) wal: Wal,
    /// One writer to the log at a time, so an older snapshot is never logged after a newer
    /// one.
    pub(super) writing: Mutex<()>,
    pub(super) checkpointing: AtomicBool,
    /// `IDLE_CHECKPOINT_AFTER` in milliseconds (shorter in tests).
    pub(super) idle_checkpoint_ms: AtomicU64,
    /// `std::sync::Mutex`: short sections (lookups, merging one batch), never held across an
    /// await or while sled works.
    pub(super) logged: Mutex<Logged>,
    /// Wakes the applier.
    pub(super) logged_grew: Condvar,
    /// One apply at a time (the applier's, a checkpoint's or a compaction's; a compaction
    /// holds it throughout, which pauses the applier), so sled never gets an older
    /// value after a newer one.
    pub(super) applying: Mutex<()>,
    /// One checkpoint or compaction at a time: a checkpoint must not retire log segments on
    /// the strength of a database that a compaction is about to replace.
    pub(super) maintenance: Mutex<()>,
    /// Bytes of the keys and values sled holds, kept from what its inserts and removals
    /// return: what a compaction would copy.
    pub(super) live_bytes: AtomicU64,
    /// sled's size below which no compaction is tried again after one that found more live
    /// data than estimated (0: no such limit).
    pub(super) compact_retry_size: AtomicU64,
    /// The live bytes and sled's size after the last compaction.
    pub(super) last_compaction: Mutex<Option<(u64, u64)>>,
    /// Whether the collector compacts sled when it is worth it (tests compact by hand).
    pub(super) auto_compact: AtomicBool,
}

impl Durable {
    pub(super) fn new(db: sled::Db, dir: PathBuf, wal: Wal) -> Durable {
        Durable {
            db: RwLock::new(db),
            dir,
            synced_blobs: Default::default(),
            wal,
            writing: Mutex::new(()),
            checkpointing: AtomicBool::new(false),
            idle_checkpoint_ms: AtomicU64::new(IDLE_CHECKPOINT_AFTER.as_millis() as u64),
            logged: Default::default(),
            logged_grew: Condvar::new(),
            applying: Mutex::new(()),
            maintenance: Mutex::new(()),
            live_bytes: AtomicU64::new(0),
            compact_retry_size: AtomicU64::new(0),
            last_compaction: Mutex::new(None),
            auto_compact: AtomicBool::new(true),
        }
    }

    /// The sled database in use.
    pub(super) fn db(&self) -> RwLockReadGuard<'_, sled::Db> {
        self.db.read().expect("sled handle lock poisoned")
    }

    /// sled's directory.
    pub(super) fn sled_dir(&self) -> PathBuf {
        self.dir.join(super::compact::SLED)
    }

    pub(super) fn logged(&self) -> MutexGuard<'_, Logged> {
        self.logged.lock().expect("logged operations lock poisoned")
    }

    /// Appends a batch to the log (not yet durable); readable at once, in sled later.
    pub(super) fn log(&self, ops: Vec<Op>) -> Result<(), StorageError> {
        let _writing = self.writing.lock().expect("store writer lock poisoned");
        self.log_locked(ops)
    }

    pub(super) fn log_locked(&self, ops: Vec<Op>) -> Result<(), StorageError> {
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
    pub(super) fn set_in_sled(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), StorageError> {
        let db = self.db();
        let (old, new) = match value {
            Some(v) => (db.insert(key, v)?, key.len() + v.len()),
            None => (db.remove(key)?, 0),
        };
        let old = old.map_or(0, |o| key.len() + o.len());
        // One applier at a time changes sled, so the two steps never interleave with another.
        self.live_bytes.fetch_add(new as u64, Ordering::Relaxed);
        self.live_bytes.fetch_sub(old as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The value of a sled key: logged or in sled.
    pub(super) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(v) = self.logged().lookup(key) {
            return Ok(v);
        }
        Ok(self.db().get(key)?.map(|v| v.to_vec()))
    }

    /// Writes everything logged so far to sled. The log is made durable first: sled persists
    /// on its own schedule, and must never hold what a power failure could take from the log
    /// (replaying an older log over it would mix old and new).
    pub(super) fn apply_logged(&self) -> Result<(), StorageError> {
        let applying = self.applying.lock().expect("apply lock poisoned");
        self.apply_logged_locked(&applying)
    }

    /// [`Durable::apply_logged`] for a caller that holds the apply lock.
    pub(super) fn apply_logged_locked(
        &self,
        _applying: &MutexGuard<'_, ()>,
    ) -> Result<(), StorageError> {
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
    pub(super) fn run_applier(self: &Arc<Self>, sync: SyncMode) {
        let mut applied_at = std::time::Instant::now();
        let (mut log_len, mut log_grew_at) = (self.wal.active_len(), std::time::Instant::now());
        let mut logged = self.logged();
        loop {
            if logged.closing || logged.failed.is_some() {
                return;
            }
            // Most of a database a compaction retired was built by this thread's inserts.
            super::compact::release_on_this_thread();
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
    pub(super) fn checkpoint(&self) -> Result<(), StorageError> {
        let _maintenance = self.maintenance.lock().expect("maintenance lock poisoned");
        {
            let _writing = self.writing.lock().expect("store writer lock poisoned");
            self.wal.rotate()?;
        }
        let older = self.wal.older()?;
        self.apply_logged()?;
        self.db().flush()?;
        std::fs::File::open(self.sled_dir().join("db"))?.sync_all()?;
        self.sync_blobs()?;
        self.wal.remove(&older)
    }

    /// `fsync`s the blobs sled wrote since the last checkpoint, and their directory.
    pub(super) fn sync_blobs(&self) -> Result<(), StorageError> {
        let blobs = self.sled_dir().join("blobs");
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
    pub(super) fn checkpoint_if_full(self: &Arc<Self>) {
        if self.wal.full() {
            self.start_checkpoint();
        }
    }

    /// Starts a checkpoint on a thread of its own, unless one is running.
    pub(super) fn start_checkpoint(self: &Arc<Self>) {
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

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::storage::keys::data_key;
    use crate::storage::testutil::*;
    use crate::storage::{Position, Store};

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
        let in_sled = |item: &str| s.durable.db().get(data_key(item.as_bytes())).unwrap();
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
        let ids = |dir: &Path| crate::storage::wal::segment_ids(&dir.join("wal")).unwrap();
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
        let on_disk: std::collections::HashSet<_> =
            std::fs::read_dir(dir.path().join("sled/blobs"))
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

    #[tokio::test]
    async fn a_log_that_stops_growing_is_checkpointed() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), SyncMode::Always).unwrap();
        s.durable.idle_checkpoint_ms.store(300, Ordering::Relaxed);
        let first = crate::storage::wal::segment_ids(&dir.path().join("wal")).unwrap();
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
        let now = crate::storage::wal::segment_ids(&dir.path().join("wal")).unwrap();
        assert_eq!(now.len(), 1, "older segments deleted: {now:?}");
        assert!(now[0] > *first.last().unwrap());
        assert_eq!(
            s.get(b"k20").unwrap().unwrap().value.unwrap().len(),
            big.len()
        );
    }
}
