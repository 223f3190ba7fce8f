//! The snapshot file (docs/design.md §12): every key of a cluster at one committed lsn, with
//! that lsn, the epoch and the cluster id in its header, checksummed end to end. The server
//! writes it (the `Snapshot` call streams its bytes, a periodic backup writes them to disk);
//! `replikv snapshot save` checks it before keeping it; a restoring server checks it whole
//! before it applies any of it.
//!
//! Layout, integers big-endian:
//!
//! ```text
//! "RKVSNAP1" | version u32 | epoch u64 | lsn u64 | created_unix_ms u64 | rank u32
//!            | cluster_len u16 | cluster (UTF-8)
//! entries:   1u8 | key_len u32 | value_len u32 | lsn u64 | key | value     (key order)
//! end:       0u8 | entries u64 | crc32 u32 (CRC-32 of every byte before it)
//! ```
//!
//! Session records are not part of a snapshot: a restored cluster starts with none.

use std::io::{self, Read};

/// The first bytes of every snapshot file.
pub const MAGIC: &[u8; 8] = b"RKVSNAP1";
/// The layout version this code writes and reads.
pub const VERSION: u32 = 1;
/// Largest key a snapshot may hold (the server's own limit is lower).
pub const MAX_KEY_BYTES: usize = 64 * 1024;
/// Largest value a snapshot may hold (the server's own limit is lower).
pub const MAX_VALUE_BYTES: usize = crate::MAX_MESSAGE_BYTES;

const TAG_ENTRY: u8 = 1;
const TAG_END: u8 = 0;

/// What a snapshot says about where it comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The id of the cluster the snapshot was taken from.
    pub cluster: String,
    /// The view epoch the snapshot was taken in.
    pub epoch: u64,
    /// The commit point: the snapshot holds every write with an lsn up to this one, and
    /// none above it.
    pub lsn: u64,
    pub created_unix_ms: u64,
    /// The server that took it.
    pub rank: u32,
}

/// One key of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// The lsn of the write that set it (at most [`Header::lsn`]).
    pub lsn: u64,
}

/// Why a snapshot file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a replikv snapshot (bad magic bytes)")]
    BadMagic,
    #[error("snapshot format version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    #[error("snapshot is truncated: it ends before its end marker")]
    Truncated,
    #[error("snapshot is damaged: {0}")]
    Damaged(String),
    #[error(
        "snapshot is damaged: checksum mismatch (stored {stored:08x}, computed {computed:08x})"
    )]
    Checksum { stored: u32, computed: u32 },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Builds a snapshot's bytes into a caller's buffer, keeping the running checksum, so the
/// same code streams a snapshot over gRPC and writes it to a file.
pub struct Encoder {
    crc: crc32fast::Hasher,
    entries: u64,
}

impl Encoder {
    /// Appends the header to `buf`.
    pub fn new(header: &Header, buf: &mut Vec<u8>) -> Encoder {
        let start = buf.len();
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&VERSION.to_be_bytes());
        buf.extend_from_slice(&header.epoch.to_be_bytes());
        buf.extend_from_slice(&header.lsn.to_be_bytes());
        buf.extend_from_slice(&header.created_unix_ms.to_be_bytes());
        buf.extend_from_slice(&header.rank.to_be_bytes());
        let cluster = header.cluster.as_bytes();
        let len = cluster.len().min(u16::MAX as usize);
        buf.extend_from_slice(&(len as u16).to_be_bytes());
        buf.extend_from_slice(&cluster[..len]);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&buf[start..]);
        Encoder { crc, entries: 0 }
    }

    /// Appends one key (keys must come in order, each once).
    pub fn entry(&mut self, key: &[u8], lsn: u64, value: &[u8], buf: &mut Vec<u8>) {
        let start = buf.len();
        buf.push(TAG_ENTRY);
        buf.extend_from_slice(&(key.len() as u32).to_be_bytes());
        buf.extend_from_slice(&(value.len() as u32).to_be_bytes());
        buf.extend_from_slice(&lsn.to_be_bytes());
        buf.extend_from_slice(key);
        buf.extend_from_slice(value);
        self.crc.update(&buf[start..]);
        self.entries += 1;
    }

    /// Appends the end marker and the checksum; returns the number of keys written.
    pub fn finish(mut self, buf: &mut Vec<u8>) -> u64 {
        let start = buf.len();
        buf.push(TAG_END);
        buf.extend_from_slice(&self.entries.to_be_bytes());
        self.crc.update(&buf[start..]);
        buf.extend_from_slice(&self.crc.finalize().to_be_bytes());
        self.entries
    }
}

/// Reads a snapshot entry by entry, checking the layout as it goes and the checksum at the
/// end: an entry is only known good once [`Reader::next`] has returned `None`. Callers that
/// must not act on a damaged file read it through once first ([`verify`]).
pub struct Reader<R> {
    r: R,
    crc: crc32fast::Hasher,
    entries: u64,
    last_key: Option<Vec<u8>>,
    lsn: u64,
    done: bool,
}

impl<R: Read> Reader<R> {
    /// Reads and checks the header.
    pub fn open(r: R) -> Result<(Reader<R>, Header), SnapshotError> {
        let mut reader = Reader {
            r,
            crc: crc32fast::Hasher::new(),
            entries: 0,
            last_key: None,
            lsn: 0,
            done: false,
        };
        let magic = reader.bytes(MAGIC.len()).map_err(|e| match e {
            SnapshotError::Truncated => SnapshotError::BadMagic,
            e => e,
        })?;
        if magic != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let version = reader.u32()?;
        if version != VERSION {
            return Err(SnapshotError::Version(version));
        }
        let epoch = reader.u64()?;
        let lsn = reader.u64()?;
        let created_unix_ms = reader.u64()?;
        let rank = reader.u32()?;
        let len = reader.u16()? as usize;
        let cluster = String::from_utf8(reader.bytes(len)?)
            .map_err(|_| SnapshotError::Damaged("the cluster id is not UTF-8".into()))?;
        reader.lsn = lsn;
        Ok((
            reader,
            Header {
                cluster,
                epoch,
                lsn,
                created_unix_ms,
                rank,
            },
        ))
    }

    /// The next entry; `None` once the end marker and the checksum have been checked.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Entry>, SnapshotError> {
        if self.done {
            return Ok(None);
        }
        match self.u8()? {
            TAG_ENTRY => {}
            TAG_END => {
                let count = self.u64()?;
                let computed = self.crc.clone().finalize();
                let mut raw = [0u8; 4];
                self.read_exact(&mut raw)?;
                let stored = u32::from_be_bytes(raw);
                if stored != computed {
                    return Err(SnapshotError::Checksum { stored, computed });
                }
                if count != self.entries {
                    return Err(SnapshotError::Damaged(format!(
                        "the end marker counts {count} keys, the file holds {}",
                        self.entries
                    )));
                }
                let mut extra = [0u8; 1];
                if self.r.read(&mut extra)? != 0 {
                    return Err(SnapshotError::Damaged("bytes follow the end marker".into()));
                }
                self.done = true;
                return Ok(None);
            }
            tag => {
                return Err(SnapshotError::Damaged(format!(
                    "unknown record tag {tag} after {} keys",
                    self.entries
                )))
            }
        }
        let key_len = self.u32()? as usize;
        let value_len = self.u32()? as usize;
        let lsn = self.u64()?;
        if key_len == 0 || key_len > MAX_KEY_BYTES || value_len > MAX_VALUE_BYTES {
            return Err(SnapshotError::Damaged(format!(
                "key {} has impossible lengths (key {key_len} bytes, value {value_len} bytes)",
                self.entries
            )));
        }
        if lsn > self.lsn {
            return Err(SnapshotError::Damaged(format!(
                "key {} has lsn {lsn}, above the snapshot's commit point {}",
                self.entries, self.lsn
            )));
        }
        let key = self.bytes(key_len)?;
        let value = self.bytes(value_len)?;
        if self.last_key.as_ref().is_some_and(|last| *last >= key) {
            return Err(SnapshotError::Damaged(format!(
                "key {} is out of order",
                self.entries
            )));
        }
        self.last_key = Some(key.clone());
        self.entries += 1;
        Ok(Some(Entry { key, value, lsn }))
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), SnapshotError> {
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => SnapshotError::Truncated,
            _ => SnapshotError::Io(e),
        })
    }

    fn bytes(&mut self, n: usize) -> Result<Vec<u8>, SnapshotError> {
        let mut v = vec![0u8; n];
        self.read_exact(&mut v)?;
        self.crc.update(&v);
        Ok(v)
    }

    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, SnapshotError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, SnapshotError> {
        let b = self.bytes(8)?;
        Ok(u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }
}

/// Reads a whole snapshot file and checks it; returns its header and number of keys.
pub fn verify(path: &std::path::Path) -> Result<(Header, u64), SnapshotError> {
    let file = std::fs::File::open(path)?;
    let (mut reader, header) = Reader::open(io::BufReader::new(file))?;
    let mut keys = 0u64;
    while reader.next()?.is_some() {
        keys += 1;
    }
    Ok((header, keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let header = Header {
            cluster: "c0ffee".into(),
            epoch: 3,
            lsn: 10,
            created_unix_ms: 1,
            rank: 2,
        };
        let mut buf = Vec::new();
        let mut enc = Encoder::new(&header, &mut buf);
        enc.entry(b"a", 4, b"1", &mut buf);
        enc.entry(b"b", 10, b"", &mut buf);
        assert_eq!(enc.finish(&mut buf), 2);
        buf
    }

    fn read_all(bytes: &[u8]) -> Result<(Header, Vec<Entry>), SnapshotError> {
        let (mut r, h) = Reader::open(bytes)?;
        let mut out = Vec::new();
        while let Some(e) = r.next()? {
            out.push(e);
        }
        Ok((h, out))
    }

    #[test]
    fn a_written_snapshot_reads_back() {
        let (h, entries) = read_all(&sample()).unwrap();
        assert_eq!(
            (h.epoch, h.lsn, h.rank, h.cluster.as_str()),
            (3, 10, 2, "c0ffee")
        );
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].key, b"a");
        assert_eq!(entries[0].value, b"1");
        assert_eq!(entries[1].lsn, 10);
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_refused() {
        let good = sample();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(read_all(&bad).is_err(), "flipped byte {i} was accepted");
            assert!(
                read_all(&good[..i]).is_err(),
                "truncation at {i} was accepted"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(read_all(&longer).is_err());
    }
}
