//! Write-ahead log in front of sled.
//!
//! sled's `flush` on Linux ends in `sync_file_range`, which writes the data out but neither
//! flushes the disk's write cache nor the file's metadata: an acknowledged write could be
//! lost in a power failure. Every batch handed to sled is therefore first appended here, and
//! "durable" means this log was `fdatasync`ed. sled is made durable only at checkpoints
//! (its own flush, then an `fsync` of its file), after which older log segments are deleted.
//!
//! Layout: `wal/<id>.log` segments (ids ascending, one active). A record is
//! `len (u32 le) | crc32 of the payload (u32 le) | payload`, the payload a list of operations
//! `key len (u32 le) | key | flag (1 = set, 0 = remove) | [value len (u32 le) | value]`.
//! Segments are zero-filled ahead of the records; a record of length zero followed by nothing
//! but zeros ends a segment. A record cut short, failing its checksum or not decoding is
//! accepted only as the torn last record of the newest segment, which a crash mid-append
//! leaves and which was never acknowledged; anywhere else it is damage, and opening the log
//! fails with the segment and the offset, changing nothing (see [`Wal::recover`]).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::StorageError;

/// One operation of a batch: set `key` to the value, or remove it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// A segment grows to about this size before the next checkpoint starts a new one.
pub const SEGMENT_BYTES: u64 = 32 * 1024 * 1024;

struct Active {
    file: Arc<File>,
    id: u64,
    /// Where the next record goes.
    len: u64,
    /// The file's size: zeros past `len`, written ahead (`ZEROED_AHEAD` at a time) so that
    /// an `fdatasync` after a record seldom has to commit a new file size, which costs the
    /// file system a journal commit of its own.
    zeroed: u64,
}

const ZEROED_AHEAD: u64 = 1024 * 1024;

pub struct Wal {
    dir: PathBuf,
    /// `std::sync::Mutex`: held for one `write`, never across an await.
    active: Mutex<Active>,
    /// The size at which the active segment is full (`SEGMENT_BYTES`; smaller in tests).
    segment_bytes: AtomicU64,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.log"))
}

/// The ids of the segments in `dir`, ascending.
pub(crate) fn segment_ids(dir: &Path) -> Result<Vec<u64>, StorageError> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        ids.push(id);
    }
    ids.sort_unstable();
    Ok(ids)
}

fn encode(ops: &[Op]) -> Result<Vec<u8>, StorageError> {
    let size: usize = ops
        .iter()
        .map(|o| 9 + o.key.len() + o.value.as_ref().map_or(0, Vec::len))
        .sum();
    // Every length in a record is at most the payload's, so one check covers them all.
    if u32::try_from(size).is_err() {
        return Err(StorageError::BatchTooLarge(size));
    }
    let mut rec = Vec::with_capacity(8 + size);
    rec.extend_from_slice(&[0; 8]);
    for op in ops {
        rec.extend_from_slice(&(op.key.len() as u32).to_le_bytes());
        rec.extend_from_slice(&op.key);
        match &op.value {
            Some(v) => {
                rec.push(1);
                rec.extend_from_slice(&(v.len() as u32).to_le_bytes());
                rec.extend_from_slice(v);
            }
            None => rec.push(0),
        }
    }
    let len = (rec.len() - 8) as u32;
    let crc = crc32fast::hash(&rec[8..]);
    rec[..4].copy_from_slice(&len.to_le_bytes());
    rec[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(rec)
}

/// Splits `n` bytes off the front of `buf`.
fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if buf.len() < n {
        return None;
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Some(head)
}

fn take_u32(buf: &mut &[u8]) -> Option<usize> {
    take(buf, 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
}

fn decode_ops(mut payload: &[u8]) -> Option<Vec<Op>> {
    let mut ops = Vec::new();
    while !payload.is_empty() {
        let klen = take_u32(&mut payload)?;
        let key = take(&mut payload, klen)?.to_vec();
        let value = match take(&mut payload, 1)?[0] {
            1 => {
                let vlen = take_u32(&mut payload)?;
                Some(take(&mut payload, vlen)?.to_vec())
            }
            0 => None,
            _ => return None,
        };
        ops.push(Op { key, value });
    }
    Some(ops)
}

/// Why reading a segment stopped before its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// A record whose length runs past the end of the file.
    CutShort,
    /// A record whose payload does not match its checksum.
    Checksum,
    /// A record whose checksum matches but whose operations do not decode.
    Malformed,
    /// A zero length where a record should start, with data after it.
    ZeroLength,
}

impl Stop {
    fn describe(self) -> &'static str {
        match self {
            Stop::CutShort => "a record is cut short",
            Stop::Checksum => "a record fails its checksum",
            Stop::Malformed => "a record's operations do not decode",
            Stop::ZeroLength => "a record of length zero is followed by data",
        }
    }
}

/// Reads the record at the front of `rest`: `Ok(None)` at a clean end (nothing but zeros
/// left, the space written ahead of the records).
fn decode_record(rest: &mut &[u8]) -> Result<Option<Vec<Op>>, Stop> {
    let all = *rest;
    let Some(len) = take_u32(rest) else {
        return if all.iter().all(|&b| b == 0) {
            Ok(None)
        } else {
            Err(Stop::CutShort)
        };
    };
    if len == 0 {
        return if all.iter().all(|&b| b == 0) {
            Ok(None)
        } else {
            Err(Stop::ZeroLength)
        };
    }
    let crc = take_u32(rest).ok_or(Stop::CutShort)? as u32;
    let payload = take(rest, len).ok_or(Stop::CutShort)?;
    if crc32fast::hash(payload) != crc {
        return Err(Stop::Checksum);
    }
    decode_ops(payload).map(Some).ok_or(Stop::Malformed)
}

/// What one segment holds: its whole records, and where and why reading stopped early.
struct Segment {
    batches: Vec<Vec<Op>>,
    bad: Option<(u64, Stop)>,
}

fn decode_segment(data: &[u8]) -> Segment {
    let mut batches = Vec::new();
    let mut rest = data;
    loop {
        let at = (data.len() - rest.len()) as u64;
        match decode_record(&mut rest) {
            Ok(Some(ops)) => batches.push(ops),
            Ok(None) => return Segment { batches, bad: None },
            Err(stop) => {
                return Segment {
                    batches,
                    bad: Some((at, stop)),
                }
            }
        }
    }
}

/// Whether a bad record at `at` in the newest segment can be the one a crash tore while it
/// was being appended: only if no whole record follows it. Records are appended in order and
/// only the latest, not yet synced, can be torn; a whole record after a bad one means the bad
/// one was written in full once and was damaged since.
fn torn_tail(data: &[u8], at: usize) -> bool {
    let mut rest = &data[at..];
    let Some(len) = take_u32(&mut rest).filter(|&len| len > 0) else {
        return true;
    };
    let Some(after) = rest.get(4 + len..) else {
        return true;
    };
    let mut next = after;
    !matches!(decode_record(&mut next), Ok(Some(_)))
}

/// The log as found when the store opens, read without changing anything: its batches, and
/// the torn record (if any) that ends the newest segment.
pub struct Recovery {
    dir: PathBuf,
    ids: Vec<u64>,
    /// Every batch the log holds, oldest first.
    pub batches: Vec<Vec<Op>>,
    /// (segment, offset) of a torn last record, cut off when the log starts.
    torn: Option<(u64, u64)>,
}

impl Wal {
    /// Opens the log in `dir` and returns it with every batch it still holds, oldest first.
    /// New records go to a new segment; the old ones stay until a checkpoint retires them.
    pub fn open(dir: &Path) -> Result<(Wal, Vec<Vec<Op>>), StorageError> {
        let mut found = Self::recover(dir)?;
        let batches = std::mem::take(&mut found.batches);
        Ok((Self::start(found)?, batches))
    }

    /// Reads the log in `dir` and checks it, changing nothing. Only a crash mid-append makes a
    /// bad record, and then only as the last record of the newest segment (a torn tail,
    /// never acknowledged): older segments were synced whole before the next one was started.
    /// A bad record anywhere else is damage, and the records after it may have been
    /// acknowledged: this returns an error naming the segment and the offset rather than
    /// drop them silently.
    pub fn recover(dir: &Path) -> Result<Recovery, StorageError> {
        let ids = match dir.try_exists()? {
            true => segment_ids(dir)?,
            false => Vec::new(),
        };
        let mut batches = Vec::new();
        let mut torn = None;
        for (i, &id) in ids.iter().enumerate() {
            let path = segment_path(dir, id);
            let data = std::fs::read(&path)?;
            let segment = decode_segment(&data);
            batches.extend(segment.batches);
            let Some((at, stop)) = segment.bad else {
                continue;
            };
            let newest = i + 1 == ids.len();
            if newest && torn_tail(&data, at as usize) {
                tracing::warn!(
                    segment = %path.display(),
                    at,
                    reason = stop.describe(),
                    "the log ends in a torn record, which a crash mid-append leaves; ignoring it"
                );
                torn = Some((id, at));
                continue;
            }
            let why = if newest {
                "a whole record follows it"
            } else {
                "a later segment follows it"
            };
            return Err(StorageError::Corrupt(format!(
                "write-ahead log segment {} is damaged at byte offset {at}: {} and {why}, so \
                 records after it may have been acknowledged; nothing was changed. Wipe this \
                 server's data directory and restart it: it rejoins the cluster with a state \
                 transfer",
                path.display(),
                stop.describe(),
            )));
        }
        Ok(Recovery {
            dir: dir.to_path_buf(),
            ids,
            batches,
            torn,
        })
    }

    /// Starts the log found by [`Wal::recover`]: makes its segments durable, cuts off a torn
    /// tail, and opens a new segment for the records to come.
    pub fn start(found: Recovery) -> Result<Wal, StorageError> {
        let dir = &found.dir;
        std::fs::create_dir_all(dir)?;
        for &id in &found.ids {
            // Their records go to sled next, and sled must never hold what the log could
            // still lose: a crash may have left them written but not yet durable.
            File::open(segment_path(dir, id))?.sync_data()?;
        }
        if let Some((id, at)) = found.torn {
            // Cut off, so that once a newer segment exists this one reads as whole: a crash
            // before the checkpoint retires it must not make the next start see damage.
            let file = OpenOptions::new().write(true).open(segment_path(dir, id))?;
            file.set_len(at)?;
            file.sync_all()?;
        }
        let id = found.ids.last().map_or(1, |&last| last + 1);
        Ok(Wal {
            dir: dir.to_path_buf(),
            active: Mutex::new(Self::create(dir, id)?),
            segment_bytes: AtomicU64::new(SEGMENT_BYTES),
        })
    }

    fn create(dir: &Path, id: u64) -> Result<Active, StorageError> {
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(segment_path(dir, id))?;
        // The new name must survive a crash for the records written to it to be found.
        File::open(dir)?.sync_all()?;
        Ok(Active {
            file: Arc::new(file),
            id,
            len: 0,
            zeroed: 0,
        })
    }

    fn active(&self) -> MutexGuard<'_, Active> {
        self.active.lock().expect("wal lock poisoned")
    }

    /// Appends one batch (written, not yet durable).
    pub fn append(&self, ops: &[Op]) -> Result<(), StorageError> {
        if ops.is_empty() {
            // An empty record would read back as the zeros that end the log.
            return Ok(());
        }
        let rec = encode(ops)?;
        let mut active = self.active();
        let end = active.len + rec.len() as u64;
        if end > active.zeroed {
            let grow = (end - active.zeroed).max(ZEROED_AHEAD);
            let zeros = vec![0; grow as usize];
            active.file.write_all_at(&zeros, active.zeroed)?;
            active.zeroed += grow;
        }
        active.file.write_all_at(&rec, active.len)?;
        active.len = end;
        Ok(())
    }

    /// Makes everything appended so far durable.
    pub async fn sync(&self) -> Result<(), StorageError> {
        let file = self.active().file.clone();
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(std::io::Error::other)??;
        Ok(())
    }

    /// [`Wal::sync`] for a caller that may block.
    pub fn sync_blocking(&self) -> Result<(), StorageError> {
        let file = self.active().file.clone();
        file.sync_data()?;
        Ok(())
    }

    /// Bytes of records in the active segment.
    pub fn active_len(&self) -> u64 {
        self.active().len
    }

    /// Whether the active segment has grown enough for a checkpoint.
    pub fn full(&self) -> bool {
        self.active().len >= self.segment_bytes.load(Ordering::Relaxed)
    }

    /// Sets the size at which the active segment is full (tests use small segments).
    pub(crate) fn set_segment_bytes(&self, bytes: u64) {
        self.segment_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Starts a new segment. The caller holds off appends meanwhile, and has sled take every
    /// batch logged so far before it deletes the older segments.
    pub fn rotate(&self) -> Result<(), StorageError> {
        let mut active = self.active();
        // Records written to the old segment are durable before anyone syncs the new one.
        active.file.sync_data()?;
        let next = Self::create(&self.dir, active.id + 1)?;
        *active = next;
        Ok(())
    }

    /// The segments before the active one: deletable once sled has their batches durably.
    pub fn older(&self) -> Result<Vec<u64>, StorageError> {
        let current = self.active().id;
        Ok(segment_ids(&self.dir)?
            .into_iter()
            .filter(|&id| id < current)
            .collect())
    }

    pub fn remove(&self, ids: &[u64]) -> Result<(), StorageError> {
        for &id in ids {
            std::fs::remove_file(segment_path(&self.dir, id))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(k: &str, v: Option<&str>) -> Op {
        Op {
            key: k.as_bytes().to_vec(),
            value: v.map(|v| v.as_bytes().to_vec()),
        }
    }

    #[test]
    fn batches_come_back_in_order_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let batches = vec![
            vec![op("a", Some("1")), op("b", Some(""))],
            vec![op("a", None)],
            vec![op("c", Some("3"))],
        ];
        {
            let (wal, old) = Wal::open(dir.path()).unwrap();
            assert!(old.is_empty());
            for b in &batches {
                wal.append(b).unwrap();
            }
        }
        let (wal, old) = Wal::open(dir.path()).unwrap();
        assert_eq!(old, batches);
        // A reopened log appends to a new segment and keeps the old ones until removed.
        wal.append(&[op("d", Some("4"))]).unwrap();
        drop(wal);
        let (_, again) = Wal::open(dir.path()).unwrap();
        assert_eq!(again.len(), 4);
    }

    /// Overwrites `bytes` at `at` in segment `id`.
    fn damage(dir: &Path, id: u64, at: u64, bytes: &[u8]) {
        let f = OpenOptions::new()
            .write(true)
            .open(segment_path(dir, id))
            .unwrap();
        f.write_all_at(bytes, at).unwrap();
    }

    /// Every file under `dir` with its bytes: what "nothing was changed" compares.
    fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let data = std::fs::read(&p).unwrap();
                (p, data)
            })
            .collect()
    }

    /// Two segments: `a`, `b` in the first, `c` in the second. Returns the offset of `b`.
    fn two_segments(dir: &Path, a: &Op, b: &Op, c: &Op) -> u64 {
        {
            let (wal, _) = Wal::open(dir).unwrap();
            wal.append(std::slice::from_ref(a)).unwrap();
            wal.append(std::slice::from_ref(b)).unwrap();
        }
        {
            let (wal, _) = Wal::open(dir).unwrap();
            wal.append(std::slice::from_ref(c)).unwrap();
        }
        encode(std::slice::from_ref(a)).unwrap().len() as u64
    }

    #[test]
    fn damage_in_an_older_segment_stops_the_open_and_changes_nothing() {
        let (a, b, c) = (op("a", Some("1")), op("b", Some("2")), op("c", Some("3")));
        /// Where to write what, given the offset and length of `b`.
        type Damage = fn(u64, u64) -> (u64, Vec<u8>);
        let cases: [(&str, Damage); 3] = [
            // A flipped byte in the payload of `b`.
            ("checksum", |at, _| (at + 9, b"#".to_vec())),
            // Its last bytes zeroed, as if never written.
            ("checksum", |at, len| (at + len - 3, vec![0, 0, 0])),
            // Its length field zeroed: the rest of the segment is not zeros.
            ("length zero", |at, _| (at, vec![0, 0, 0, 0])),
        ];
        for (what, damage_at) in cases {
            let dir = tempfile::tempdir().unwrap();
            let at = two_segments(dir.path(), &a, &b, &c);
            let len = encode(std::slice::from_ref(&b)).unwrap().len() as u64;
            let (pos, bytes) = damage_at(at, len);
            damage(dir.path(), 1, pos, &bytes);
            let before = snapshot(dir.path());
            let err = match Wal::open(dir.path()) {
                Ok((_, found)) => panic!("{what}: opened a damaged log: {found:?}"),
                Err(e) => e.to_string(),
            };
            let file = segment_path(dir.path(), 1);
            assert!(err.contains(&file.display().to_string()), "{what}: {err}");
            assert!(err.contains(&format!("offset {at}")), "{what}: {err}");
            assert!(err.contains(what), "{what}: {err}");
            assert!(err.contains("data directory"), "says what to do: {err}");
            assert_eq!(snapshot(dir.path()), before, "{what}: the log was changed");
        }
    }

    #[test]
    fn a_torn_last_record_of_the_newest_segment_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (op("a", Some("1")), op("b", Some("2")), op("c", Some("3")));
        {
            let (wal, _) = Wal::open(dir.path()).unwrap();
            for o in [&a, &b, &c] {
                wal.append(std::slice::from_ref(o)).unwrap();
            }
        }
        let rec = |o: &Op| encode(std::slice::from_ref(o)).unwrap().len() as u64;
        let c_at = rec(&a) + rec(&b);
        // `c`, the last record, cut short: its last bytes never reached the disk.
        damage(dir.path(), 1, c_at + rec(&c) - 3, &[0, 0, 0]);
        let (wal, found) = Wal::open(dir.path()).unwrap();
        assert_eq!(found, vec![vec![a.clone()], vec![b.clone()]]);
        assert_eq!(
            std::fs::metadata(segment_path(dir.path(), 1))
                .unwrap()
                .len(),
            c_at,
            "the torn record is cut off"
        );
        // Now an older segment: it reads whole, so a crash before a checkpoint retires it
        // does not turn the torn tail into damage.
        wal.append(std::slice::from_ref(&c)).unwrap();
        drop(wal);
        let (_, found) = Wal::open(dir.path()).unwrap();
        assert_eq!(
            found,
            vec![vec![a.clone()], vec![b.clone()], vec![c.clone()]]
        );
    }

    #[test]
    fn a_bad_record_with_a_whole_one_after_it_is_damage_even_in_the_newest_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (op("a", Some("1")), op("b", Some("2")), op("c", Some("3")));
        {
            let (wal, _) = Wal::open(dir.path()).unwrap();
            for o in [&a, &b, &c] {
                wal.append(std::slice::from_ref(o)).unwrap();
            }
        }
        let b_at = encode(std::slice::from_ref(&a)).unwrap().len() as u64;
        damage(dir.path(), 1, b_at + 9, b"#");
        let before = snapshot(dir.path());
        let err = Wal::open(dir.path())
            .err()
            .expect("damage is not a torn tail");
        assert!(err.to_string().contains(&format!("offset {b_at}")), "{err}");
        assert_eq!(snapshot(dir.path()), before);
    }

    #[test]
    fn a_cut_short_segment_file_is_a_torn_tail_only_when_newest() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (op("a", Some("1")), op("b", Some("2")));
        {
            let (wal, _) = Wal::open(dir.path()).unwrap();
            wal.append(std::slice::from_ref(&a)).unwrap();
            wal.append(std::slice::from_ref(&b)).unwrap();
        }
        // The file ends inside `b` (its size grew, but the crash lost the rest).
        let a_len = encode(std::slice::from_ref(&a)).unwrap().len() as u64;
        let end = a_len + 5;
        let file = OpenOptions::new()
            .write(true)
            .open(segment_path(dir.path(), 1))
            .unwrap();
        file.set_len(end).unwrap();
        let (_, found) = Wal::open(dir.path()).unwrap();
        assert_eq!(found, vec![vec![a.clone()]]);
        assert_eq!(
            file.metadata().unwrap().len(),
            a_len,
            "the torn tail was cut off"
        );
        // Cut inside `a`, now with a newer segment after it: damage.
        file.set_len(a_len - 1).unwrap();
        let err = Wal::open(dir.path())
            .err()
            .expect("an older segment cut short");
        assert!(err.to_string().contains("cut short"), "{err}");
    }

    #[test]
    fn a_missing_log_directory_is_an_empty_log_and_recovery_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let wal_dir = dir.path().join("wal");
        let found = Wal::recover(&wal_dir).unwrap();
        assert!(found.batches.is_empty());
        assert!(!wal_dir.exists(), "recover only reads");
        let wal = Wal::start(found).unwrap();
        wal.append(&[op("a", None)]).unwrap();
        drop(wal);
        let (_, found) = Wal::open(&wal_dir).unwrap();
        assert_eq!(found, vec![vec![op("a", None)]]);
    }

    #[test]
    fn records_past_the_zeroed_space_grow_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let big = "x".repeat(ZEROED_AHEAD as usize + 10);
        let batches: Vec<Vec<Op>> = (0..3)
            .map(|i| vec![op(&format!("k{i}"), Some(&big))])
            .collect();
        {
            let (wal, _) = Wal::open(dir.path()).unwrap();
            for b in &batches {
                wal.append(b).unwrap();
            }
            wal.append(&[]).unwrap();
        }
        let (_, old) = Wal::open(dir.path()).unwrap();
        assert_eq!(old, batches);
    }

    #[test]
    fn older_segments_are_those_before_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path()).unwrap();
        wal.append(&[op("a", Some("1"))]).unwrap();
        wal.rotate().unwrap();
        let old = wal.older().unwrap();
        assert_eq!(old, vec![1]);
        wal.append(&[op("b", Some("2"))]).unwrap();
        wal.remove(&old).unwrap();
        drop(wal);
        let (_, left) = Wal::open(dir.path()).unwrap();
        assert_eq!(left, vec![vec![op("b", Some("2"))]]);
    }
}
