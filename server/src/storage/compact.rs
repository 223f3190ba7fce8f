//! Compaction of sled's files (docs/design.md §3, bounded growth): sled 0.34 never gives back the
//! space of data that was deleted, so once its files are far larger than what it holds, the
//! database is rewritten into a fresh directory and swapped in.
//!
//! sled's files live in `<data dir>/sled/`. A compaction pauses the applier (writes go on to
//! the log and are read from memory meanwhile), hands sled what the log holds, copies every
//! key into `sled.tmp/`, makes that copy durable and renames it `sled.new/`; then, with reads
//! held off, renames `sled/` to `sled.old/` and `sled.new/` to `sled/`, opens the copy and
//! removes `sled.old/`. Every rename is followed by an `fsync` of the data directory.
//!
//! Either database, old or new, holds everything up to the last checkpoint and more, and
//! the log still holds every operation since that checkpoint (no checkpoint runs during a
//! compaction), so whichever one a crash leaves in place is correct once the log is applied
//! to it. Opening the store ([`recover`]) therefore removes an unfinished `sled.tmp/`,
//! finishes a swap that got as far as `sled.new/`, and removes `sled.old/`.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::StorageError;

use super::durable::Durable;

/// sled's directory under the data directory.
pub(super) const SLED: &str = "sled";
/// A copy being written.
const TMP: &str = "sled.tmp";
/// A complete, durable copy waiting to be swapped in.
const NEW: &str = "sled.new";
/// The database a swap replaced, being removed.
const OLD: &str = "sled.old";
/// sled's files of a data directory from before `sled/`, being moved into it.
const MOVING: &str = "sled.moving";

/// A compaction is tried once sled's files exceed `COMPACT_FLOOR` plus `COMPACT_RATIO` times
/// the live data, so the copy costs at most an eighth of the space it gives back. A freshly
/// written sled takes 2-3 times the bytes it holds, so a healthy database never qualifies.
/// The floor is small: a server whose keys were all deleted must end near the size of an
/// empty one, and copying next to nothing is quick.
const COMPACT_FLOOR: u64 = 256 << 10;
const COMPACT_RATIO: u64 = 8;

/// sled's cache, for the live database and a copy alike.
const SLED_CACHE_BYTES: u64 = 256 * 1024 * 1024;

/// How long reopening a database waits for the handle before it to let go of its lock.
const REOPEN_WAIT: Duration = Duration::from_secs(5);

/// A step of a compaction, after which a test can make it stop as a crash would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// `sled.tmp/` holds a complete, durable copy.
    Copied,
    /// ... renamed `sled.new/`.
    Ready,
    /// `sled/` renamed `sled.old/`.
    OldAside,
    /// `sled.new/` renamed `sled/`.
    NewInPlace,
}

/// Opens sled in `path` as the store uses it.
pub(super) fn open_sled(path: &Path) -> Result<sled::Db, StorageError> {
    Ok(sled::Config::default()
        .path(path)
        .cache_capacity(SLED_CACHE_BYTES)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(Some(500))
        .open()?)
}

/// [`open_sled`], waiting up to `REOPEN_WAIT` for a handle just dropped to release the files.
fn reopen_sled(path: &Path) -> Result<sled::Db, StorageError> {
    let deadline = Instant::now() + REOPEN_WAIT;
    loop {
        match open_sled(path) {
            Ok(db) => return Ok(db),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

// The server binary's global allocator. Linked here so that `mi_collect` resolves in every
// build of the library; where mimalloc is not the global allocator it has nothing to do.
extern crate mimalloc;

extern "C" {
    fn mi_collect(force: bool);
}

/// Bumped by every compaction. A retired database's memory was allocated by many threads
/// (the applier's inserts, the reads that paged nodes in on the runtime's threads) and is
/// freed by the one that drops it; mimalloc hands a page back to the system only once the
/// thread that owns it collects, which an idle thread may never do. So each thread that
/// goes through the store after a compaction collects once (`release_on_this_thread`):
/// the runtime's threads do within a heartbeat or two.
static RELEASE_GENERATION: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The last generation this thread collected for.
    static RELEASED: Cell<u64> = const { Cell::new(0) };
}

/// Asks the allocator to return what this thread's pages hold freed, once per compaction.
pub(super) fn release_on_this_thread() {
    let generation = RELEASE_GENERATION.load(Ordering::Acquire);
    if generation == 0 {
        return;
    }
    RELEASED.with(|done| {
        if done.get() != generation {
            done.set(generation);
            // SAFETY: `mi_collect` takes no pointers and may be called from any thread at
            // any time.
            unsafe { mi_collect(true) }
        }
    });
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// `fsync`s every file under `dir`, and the directories.
fn sync_tree(dir: &Path) -> Result<(), StorageError> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree(&entry.path())?;
        } else {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

fn remove_dir_if_present(dir: &Path) -> Result<(), StorageError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// Brings the data directory `dir` to one sled directory, `sled/`, and returns it: moves the
/// files of a data directory from before it into it, and finishes or undoes a compaction a
/// crash interrupted (see the module doc).
pub(super) fn recover(dir: &Path) -> Result<PathBuf, StorageError> {
    let at = |name: &str| dir.join(name);
    let sled = at(SLED);
    // The older layout kept sled's files at the top of the data directory: they move into
    // `sled.moving/` one rename at a time, which is then renamed `sled/`.
    let legacy = ["conf", "db", "blobs"].iter().any(|name| at(name).exists());
    if !sled.exists() && (legacy || at(MOVING).exists()) {
        std::fs::create_dir_all(at(MOVING))?;
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name();
            let Some(n) = name.to_str() else { continue };
            if ["conf", "db", "blobs"].contains(&n) || n.starts_with("snap.") {
                std::fs::rename(at(n), at(MOVING).join(n))?;
            }
        }
        sync_dir(&at(MOVING))?;
        std::fs::rename(at(MOVING), &sled)?;
        sync_dir(dir)?;
        tracing::info!(dir = %sled.display(), "moved sled's files into their own directory");
    }
    // A copy that was not complete: the database in `sled/` is whole.
    remove_dir_if_present(&at(TMP))?;
    if at(NEW).exists() {
        // A complete copy: the swap is finished.
        if sled.exists() {
            remove_dir_if_present(&at(OLD))?;
            std::fs::rename(&sled, at(OLD))?;
            sync_dir(dir)?;
        }
        std::fs::rename(at(NEW), &sled)?;
        sync_dir(dir)?;
        tracing::info!("finished a compaction a crash interrupted");
    }
    if at(OLD).exists() {
        remove_dir_if_present(&at(OLD))?;
        sync_dir(dir)?;
    }
    Ok(sled)
}

impl Durable {
    /// Compacts sled if its files have grown far beyond the live data. Returns whether it
    /// did.
    ///
    /// After a compaction, the next one waits until the live data has halved or sled's files
    /// have doubled: a database that sled cannot make smaller than the bound (a nearly empty
    /// one) is not rewritten over and over.
    pub(super) fn compact_if_worth_it(&self) -> Result<bool, StorageError> {
        let size = self.db().size_on_disk()?;
        let live = self.live_bytes.load(Ordering::Relaxed);
        if size < COMPACT_FLOOR + COMPACT_RATIO * live
            || size < self.compact_retry_size.load(Ordering::Relaxed)
        {
            return Ok(false);
        }
        let last = *self
            .last_compaction
            .lock()
            .expect("compaction record lock poisoned");
        if let Some((live_then, after)) = last {
            if live > live_then / 2 && size < after.saturating_mul(2) {
                return Ok(false);
            }
        }
        let compacted = self.compact(size, None)?;
        if compacted {
            // The copy is durable: a checkpoint now retires the whole log, so the server ends
            // with an empty segment rather than one kept until the log next fills.
            if let Err(e) = self.checkpoint() {
                tracing::warn!(error = %e, "checkpoint after compaction failed; the log keeps its segments");
            }
        }
        Ok(compacted)
    }

    /// Rewrites sled into a fresh directory and swaps it in (see the module doc). `size` is
    /// sled's size now: a copy that grows past half of it is given up (the count of live
    /// bytes was off), and no compaction is tried again until sled has doubled.
    /// `crash_after` stops it after a step, leaving the disk as a crash would (tests).
    ///
    /// The applier is paused throughout: writes go on to the log and are read from memory,
    /// until 64 MiB of them have gathered, when a writer waits for the compaction to end. The
    /// copy takes time in proportion to the live data, which is small next to the size; reads
    /// wait only for the two renames and the opening of the copy.
    pub(super) fn compact(
        &self,
        size: u64,
        crash_after: Option<Step>,
    ) -> Result<bool, StorageError> {
        let _maintenance = self.maintenance.lock().expect("maintenance lock poisoned");
        let applying = self.applying.lock().expect("apply lock poisoned");
        let started = Instant::now();
        // Everything logged goes to sled first, so the copy leaves nothing for it to do.
        self.apply_logged_locked(&applying)?;
        let (tmp, new, old, sled) = (
            self.dir.join(TMP),
            self.dir.join(NEW),
            self.dir.join(OLD),
            self.sled_dir(),
        );
        // Left by a removal that failed earlier.
        remove_dir_if_present(&old)?;
        remove_dir_if_present(&tmp)?;
        let copied = match self.copy_into(&tmp, size / 2) {
            Ok(Some(copied)) => copied,
            Ok(None) => {
                remove_dir_if_present(&tmp)?;
                self.compact_retry_size
                    .store(size.saturating_mul(2), Ordering::Relaxed);
                tracing::info!(size, "sled holds more than estimated; not compacting it");
                return Ok(false);
            }
            Err(e) => {
                // The database in use is untouched: go on with it.
                tracing::warn!(error = %e, "copying sled failed; not compacting it");
                remove_dir_if_present(&tmp)?;
                return Ok(false);
            }
        };
        let stop = |step| crash_after == Some(step);
        if stop(Step::Copied) {
            return Err(StorageError::Injected);
        }
        std::fs::rename(&tmp, &new)?;
        sync_dir(&self.dir)?;
        if stop(Step::Ready) {
            return Err(StorageError::Injected);
        }
        let retired = {
            let mut db = self.db.write().expect("sled handle lock poisoned");
            std::fs::rename(&sled, &old)?;
            sync_dir(&self.dir)?;
            if stop(Step::OldAside) {
                return Err(StorageError::Injected);
            }
            std::fs::rename(&new, &sled)?;
            sync_dir(&self.dir)?;
            if stop(Step::NewInPlace) {
                return Err(StorageError::Injected);
            }
            std::mem::replace(&mut *db, reopen_sled(&sled)?)
        };
        // The copy's blobs were synced with it.
        *self.synced_blobs.lock().expect("blob list lock poisoned") =
            std::fs::read_dir(sled.join("blobs"))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()?;
        // What sled holds now, exactly: the applier is still paused.
        self.live_bytes.store(copied, Ordering::Relaxed);
        drop(applying);
        // sled flushes the old database as its last handle goes; its files are in `sled.old/`.
        drop(retired);
        if let Err(e) = remove_dir_if_present(&old).and_then(|()| sync_dir(&self.dir)) {
            tracing::warn!(error = %e, dir = %old.display(), "could not remove the old database; the next compaction or start does");
        }
        RELEASE_GENERATION.fetch_add(1, Ordering::AcqRel);
        release_on_this_thread();
        let after = self.db().size_on_disk()?;
        self.compact_retry_size.store(0, Ordering::Relaxed);
        *self
            .last_compaction
            .lock()
            .expect("compaction record lock poisoned") = Some((copied, after));
        tracing::info!(
            before = size,
            after,
            copied,
            took = ?started.elapsed(),
            "compacted sled"
        );
        Ok(true)
    }

    /// Copies every key of the database in use into a new database in `tmp` and makes it
    /// durable. Returns the bytes copied, or `None` once they pass `most`.
    fn copy_into(&self, tmp: &Path, most: u64) -> Result<Option<u64>, StorageError> {
        let copy = sled::Config::default()
            .path(tmp)
            .cache_capacity(SLED_CACHE_BYTES)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None)
            .open()?;
        let mut copied = 0u64;
        {
            let db = self.db();
            // In key order, as `iter` yields them: consecutive inserts share a leaf.
            for kv in db.iter() {
                let (k, v) = kv?;
                copied += (k.len() + v.len()) as u64;
                if copied > most {
                    return Ok(None);
                }
                copy.insert(k, v)?;
            }
        }
        copy.flush()?;
        drop(copy);
        sync_tree(tmp)?;
        Ok(Some(copied))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SyncMode;
    use crate::storage::testutil::*;
    use crate::storage::Store;

    /// The names in the data directory besides the log.
    fn layout(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "wal")
            .collect();
        names.sort();
        names
    }

    /// A store whose sled holds `kept-*` (overwritten once since the last checkpoint) and
    /// had `gone-*`, deleted and collected.
    async fn store_with_garbage(dir: &Path) -> Store {
        let s = Store::open(dir, SyncMode::Always).unwrap();
        s.durable.auto_compact.store(false, Ordering::Relaxed);
        let big = "v".repeat(1000);
        let mut lsn = 0;
        let mut next = || {
            lsn += 1;
            lsn
        };
        for i in 0..200 {
            let l = next();
            s.apply_records(&[rec(l, &format!("gone-{i}"), Some(&big))], pos(l))
                .unwrap();
            let l = next();
            s.apply_records(&[rec(l, &format!("kept-{i}"), Some("old"))], pos(l))
                .unwrap();
        }
        s.flush_data().await.unwrap();
        s.durable.checkpoint().unwrap();
        for i in 0..200 {
            let l = next();
            s.apply_records(&[rec(l, &format!("gone-{i}"), None)], pos(l))
                .unwrap();
            let l = next();
            s.apply_records(
                &[rec(l, &format!("kept-{i}"), Some(&format!("new-{i}")))],
                pos(l),
            )
            .unwrap();
        }
        s.flush_data().await.unwrap();
        s.collect_up_to(lsn);
        s.collect_now().unwrap();
        s.flush_data().await.unwrap();
        s
    }

    fn assert_holds_exactly_the_live_data(s: &Store, when: &str) {
        for i in 0..200 {
            let e = s.get(format!("kept-{i}").as_bytes()).unwrap();
            assert_eq!(
                e.and_then(|e| e.value),
                Some(bytes::Bytes::from(format!("new-{i}"))),
                "{when}: kept-{i}"
            );
            assert_eq!(
                s.get(format!("gone-{i}").as_bytes()).unwrap(),
                None,
                "{when}: gone-{i}"
            );
        }
        assert_eq!(
            s.get(b"late").unwrap().and_then(|e| e.value),
            Some(bytes::Bytes::from("late")),
            "{when}: late"
        );
        assert!(
            s.index().by_item.keys().all(|k| !k.starts_with(b"gone")),
            "{when}"
        );
        assert_eq!(s.index().by_item.len(), 201, "{when}");
    }

    #[tokio::test]
    async fn a_compaction_interrupted_at_any_step_loses_nothing_and_brings_nothing_back() {
        let steps = [
            None,
            Some(Step::Copied),
            Some(Step::Ready),
            Some(Step::OldAside),
            Some(Step::NewInPlace),
        ];
        for crash_after in steps {
            let dir = tempfile::tempdir().unwrap();
            let when = format!("crash after {crash_after:?}");
            {
                let s = store_with_garbage(dir.path()).await;
                let size = s.durable.db().size_on_disk().unwrap();
                let done = s.durable.compact(size, crash_after);
                match crash_after {
                    None => {
                        assert!(done.unwrap(), "compacted");
                        assert_eq!(layout(dir.path()), vec!["sled"]);
                        assert!(s.durable.db().size_on_disk().unwrap() < size);
                    }
                    Some(_) => assert!(matches!(done, Err(StorageError::Injected))),
                }
                // Acknowledged right up to the crash: only the log has it for sure.
                let last = s.load_meta().unwrap().position.applied;
                s.apply_records(&[rec(last + 1, "late", Some("late"))], pos(last + 1))
                    .unwrap();
                s.flush_data().await.unwrap();
                // Still readable from this process, from whichever database it has.
                if matches!(crash_after, None | Some(Step::Copied | Step::Ready)) {
                    assert_holds_exactly_the_live_data(&s, &when);
                }
            }
            let s = reopen(dir.path());
            assert_eq!(layout(dir.path()), vec!["sled"], "{when}");
            assert_holds_exactly_the_live_data(&s, &format!("reopened, {when}"));
            drop(s);
            let s = reopen(dir.path());
            assert_holds_exactly_the_live_data(&s, &format!("reopened twice, {when}"));
        }
    }

    #[tokio::test]
    async fn a_database_of_mostly_garbage_is_compacted_and_a_healthy_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), SyncMode::Always).unwrap();
        s.durable.auto_compact.store(false, Ordering::Relaxed);
        let value = "v".repeat(4000);
        let n = 4000u64;
        for lsn in 1..=n {
            s.apply_records(&[rec(lsn, &format!("k{lsn}"), Some(&value))], pos(lsn))
                .unwrap();
        }
        s.flush_data().await.unwrap();
        s.durable.checkpoint().unwrap();
        assert!(
            !s.durable.compact_if_worth_it().unwrap(),
            "all of it is live"
        );
        for lsn in n + 1..=2 * n {
            s.apply_records(&[rec(lsn, &format!("k{}", lsn - n), None)], pos(lsn))
                .unwrap();
        }
        s.apply_records(&[rec(2 * n + 1, "k1", Some("back"))], pos(2 * n + 1))
            .unwrap();
        s.flush_data().await.unwrap();
        s.collect_up_to(2 * n + 1);
        s.collect_now().unwrap();
        s.durable.checkpoint().unwrap();
        let before = s.durable.db().size_on_disk().unwrap();
        assert!(before > 8 << 20, "{before} bytes");
        assert!(s.durable.compact_if_worth_it().unwrap());
        let after = s.durable.db().size_on_disk().unwrap();
        assert!(after < before / 10, "{before} -> {after} bytes");
        assert!(!s.durable.compact_if_worth_it().unwrap(), "once is enough");
        eprintln!("compacted {before} -> {after} bytes");
        assert_eq!(s.get(b"k1").unwrap().unwrap().value.unwrap(), "back");
        assert_eq!(s.get(b"k2").unwrap(), None);
        drop(s);
        let s = reopen(dir.path());
        assert_eq!(s.get(b"k1").unwrap().unwrap().value.unwrap(), "back");
        assert_eq!(s.get(b"k2").unwrap(), None);
        assert_eq!(s.index().by_item.len(), 1);
    }

    #[test]
    fn a_data_directory_with_sled_at_its_top_is_moved_into_sled() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = open_sled(dir.path()).unwrap();
            db.insert(b"d/a", b"x".as_slice()).unwrap();
            db.flush().unwrap();
        }
        // A crash after the first move.
        std::fs::create_dir(dir.path().join(MOVING)).unwrap();
        std::fs::rename(
            dir.path().join("conf"),
            dir.path().join(MOVING).join("conf"),
        )
        .unwrap();
        let sled = recover(dir.path()).unwrap();
        assert_eq!(layout(dir.path()), vec!["sled"]);
        let db = reopen_sled(&sled).unwrap();
        assert_eq!(db.get(b"d/a").unwrap().unwrap(), b"x".as_slice());
    }
}
