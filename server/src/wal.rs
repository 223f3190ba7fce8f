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
//! Segments are zero-filled ahead of the records, and a record of length zero, cut short or
//! failing its checksum ends the log: only a crash mid-append leaves a bad record, and
//! nothing after it was acknowledged.

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

/// The whole records at the front of `data`, and how many bytes they take.
fn decode_records(data: &[u8]) -> (Vec<Vec<Op>>, usize) {
    let mut batches = Vec::new();
    let mut rest = data;
    loop {
        let start = data.len() - rest.len();
        let whole = (|| {
            let len = take_u32(&mut rest).filter(|&len| len > 0)?;
            let crc = take_u32(&mut rest)? as u32;
            let payload = take(&mut rest, len)?;
            if crc32fast::hash(payload) != crc {
                return None;
            }
            decode_ops(payload)
        })();
        match whole {
            Some(ops) => batches.push(ops),
            None => return (batches, start),
        }
    }
}

impl Wal {
    /// Opens the log in `dir` and returns it with every batch it still holds, oldest first.
    /// New records go to a new segment; the old ones stay until a checkpoint retires them.
    pub fn open(dir: &Path) -> Result<(Wal, Vec<Vec<Op>>), StorageError> {
        std::fs::create_dir_all(dir)?;
        let ids = segment_ids(dir)?;
        let mut batches = Vec::new();
        for &id in &ids {
            let path = segment_path(dir, id);
            // Its records go to sled next, and sled must never hold what the log could
            // still lose: a crash may have left them written but not yet durable.
            File::open(&path)?.sync_data()?;
            let data = std::fs::read(&path)?;
            let (found, whole) = decode_records(&data);
            batches.extend(found);
            if data[whole..].iter().any(|&b| b != 0) {
                // Anything after a torn record was never acknowledged: stop here.
                tracing::warn!(
                    segment = %path.display(),
                    at = whole,
                    "the log ends in a torn record; ignoring the rest"
                );
                break;
            }
        }
        let id = ids.last().map_or(1, |&last| last + 1);
        let wal = Wal {
            dir: dir.to_path_buf(),
            active: Mutex::new(Self::create(dir, id)?),
            segment_bytes: AtomicU64::new(SEGMENT_BYTES),
        };
        Ok((wal, batches))
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

    /// Whether the active segment has grown enough for a checkpoint.
    pub fn full(&self) -> bool {
        self.active().len >= self.segment_bytes.load(Ordering::Relaxed)
    }

    #[cfg(test)]
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

    #[test]
    fn a_torn_record_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (op("a", Some("1")), op("b", Some("2")), op("c", Some("3")));
        {
            let (wal, _) = Wal::open(dir.path()).unwrap();
            wal.append(std::slice::from_ref(&a)).unwrap();
            wal.append(std::slice::from_ref(&b)).unwrap();
        }
        {
            // A segment after the damaged one: written later, so it must not be replayed.
            let (wal, _) = Wal::open(dir.path()).unwrap();
            wal.append(std::slice::from_ref(&c)).unwrap();
        }
        let first = encode(std::slice::from_ref(&a)).unwrap().len() as u64;
        let second = encode(std::slice::from_ref(&b)).unwrap().len() as u64;
        // The second record cut short: its last bytes never reached the disk.
        damage(dir.path(), 1, first + second - 3, &[0, 0, 0]);
        let (_, old) = Wal::open(dir.path()).unwrap();
        assert_eq!(old, vec![vec![a.clone()]]);
        // A flipped bit in the first record.
        damage(dir.path(), 1, 9, b"#");
        let (_, old) = Wal::open(dir.path()).unwrap();
        assert!(old.is_empty(), "{old:?}");
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
