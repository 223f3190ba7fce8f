//! Local storage: one sled tree with prefixed keys (DESIGN.md §3).
//!
//! - `d/<item>` -> `lsn (be64) | flag | value`: the current entry of a user or session item
//!   (flag 1 = value, 0 = tombstone).
//! - `l/<lsn be64><item>` -> empty: the lsn index. Only an item's latest lsn is indexed
//!   (rewriting an item removes its old index entry), so "everything changed after lsn X" is a
//!   range scan; a record's items share its lsn.
//! - `m/...`: view, promise, accepted proposal, applied / committed / last record epoch.
//!
//! Every applied batch of records is one atomic sled batch; in `--sync always` mode the caller
//! flushes once per batch before acknowledging. Paxos state is always flushed before replying.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::SyncMode;
use crate::error::StorageError;
use crate::types::{Entry, Rank, Record, SyncEntry, View};

const DATA: &[u8] = b"d/";
const INDEX: &[u8] = b"l/";
const VIEW: &[u8] = b"m/view";
const PROMISE: &[u8] = b"m/promise";
const ACCEPTED: &[u8] = b"m/accepted";
const POSITION: &[u8] = b"m/position";

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
}

pub struct Store {
    db: sled::Db,
    sync: SyncMode,
    /// Fault-injection hook: the next flush fails.
    fail_next_flush: AtomicBool,
    /// Writes (records) applied and flushes done, for the group-commit figure in `status`.
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
}

fn data_key(item: &[u8]) -> Vec<u8> {
    [DATA, item].concat()
}

fn index_key(lsn: u64, item: &[u8]) -> Vec<u8> {
    [INDEX, &lsn.to_be_bytes()[..], item].concat()
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
        std::fs::create_dir_all(dir)?;
        let db = sled::Config::default()
            .path(dir)
            .cache_capacity(256 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(Some(500))
            .open()?;
        Ok(Store {
            db,
            sync,
            fail_next_flush: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        })
    }

    pub fn load_meta(&self) -> Result<Meta, StorageError> {
        let mut m = Meta::default();
        if let Some(v) = self.db.get(VIEW)? {
            m.view = Some(unjson(&v, "view")?);
        }
        if let Some(v) = self.db.get(PROMISE)? {
            m.promise = unjson(&v, "promise")?;
        }
        if let Some(v) = self.db.get(ACCEPTED)? {
            m.accepted = unjson(&v, "accepted")?;
        }
        if let Some(v) = self.db.get(POSITION)? {
            m.position = unjson(&v, "position")?;
        }
        Ok(m)
    }

    /// The lsn of an item's current entry, without copying its value.
    fn lsn_of(&self, item: &[u8]) -> Result<Option<u64>, StorageError> {
        match self.db.get(data_key(item))? {
            Some(raw) if raw.len() >= 8 => Ok(Some(u64::from_be_bytes(
                raw[..8].try_into().expect("8 bytes"),
            ))),
            Some(_) => Err(StorageError::Corrupt("short entry".into())),
            None => Ok(None),
        }
    }

    pub fn get(&self, item: &[u8]) -> Result<Option<Entry>, StorageError> {
        self.db
            .get(data_key(item))?
            .map(|raw| decode_entry(&raw))
            .transpose()
    }

    /// Applies records (in lsn order) and the new log position as one atomic batch.
    pub fn apply_records(&self, records: &[Record], pos: Position) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        // Items written earlier in this batch: their index entry is not in the tree yet.
        let mut pending: std::collections::HashMap<&[u8], u64> = Default::default();
        for r in records {
            for item in &r.items {
                let old_lsn = match pending.get(&item.key[..]) {
                    Some(&l) => Some(l),
                    None => self.lsn_of(&item.key)?,
                };
                if let Some(l) = old_lsn {
                    batch.remove(index_key(l, &item.key));
                }
                let e = Entry {
                    lsn: r.lsn,
                    value: item.value.clone(),
                };
                batch.insert(data_key(&item.key), encode_entry(&e));
                batch.insert(index_key(r.lsn, &item.key), &[][..]);
                pending.insert(&item.key[..], r.lsn);
            }
        }
        batch.insert(POSITION, json(&pos));
        self.db.apply_batch(batch)?;
        self.writes
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Sets entries unconditionally (state transfer, DESIGN.md §7) and, with the final chunk,
    /// the log position, as one atomic batch.
    pub fn set_entries(
        &self,
        entries: &[SyncEntry],
        pos: Option<Position>,
    ) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        let mut pending: std::collections::HashMap<&[u8], Option<u64>> = Default::default();
        for se in entries {
            let old_lsn = match pending.get(&se.key[..]) {
                Some(&l) => l,
                None => self.lsn_of(&se.key)?,
            };
            if let Some(l) = old_lsn {
                batch.remove(index_key(l, &se.key));
            }
            match &se.entry {
                Some(e) => {
                    batch.insert(data_key(&se.key), encode_entry(e));
                    batch.insert(index_key(e.lsn, &se.key), &[][..]);
                }
                None => batch.remove(data_key(&se.key)),
            }
            pending.insert(&se.key[..], se.entry.as_ref().map(|e| e.lsn));
        }
        if let Some(pos) = pos {
            batch.insert(POSITION, json(&pos));
        }
        self.db.apply_batch(batch)?;
        Ok(())
    }

    pub fn save_position(&self, pos: Position) -> Result<(), StorageError> {
        self.db.insert(POSITION, json(&pos))?;
        Ok(())
    }

    /// Persists Paxos state durably (whatever the sync mode: promises must survive crashes).
    pub async fn save_paxos(
        &self,
        view: Option<&View>,
        promise: Option<Promise>,
        accepted: Option<Option<&Accepted>>,
    ) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        if let Some(v) = view {
            batch.insert(VIEW, json(v));
        }
        if let Some(p) = promise {
            batch.insert(PROMISE, json(&p));
        }
        match accepted {
            Some(Some(a)) => batch.insert(ACCEPTED, json(a)),
            Some(None) => batch.remove(ACCEPTED),
            None => {}
        }
        self.db.apply_batch(batch)?;
        self.flush_always().await
    }

    /// Makes applied data durable as the sync mode requires before it is acknowledged.
    pub async fn flush_data(&self) -> Result<(), StorageError> {
        match self.sync {
            SyncMode::Always => self.flush_always().await,
            SyncMode::None => Ok(()),
        }
    }

    async fn flush_always(&self) -> Result<(), StorageError> {
        if self.fail_next_flush.swap(false, Ordering::SeqCst) {
            return Err(StorageError::Injected);
        }
        self.db.flush_async().await?;
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
        let start = index_key(since.saturating_add(1), b"");
        self.db
            .range(start..)
            .take_while(|r| match r {
                Ok((k, _)) => k.starts_with(INDEX),
                Err(_) => true,
            })
            .filter_map(move |r| {
                let (k, _) = match r {
                    Ok(kv) => kv,
                    Err(e) => return Some(Err(e.into())),
                };
                if k.len() < INDEX.len() + 8 {
                    return Some(Err(StorageError::Corrupt("short index key".into())));
                }
                let lsn = u64::from_be_bytes(k[2..10].try_into().expect("8 bytes"));
                let item = Bytes::copy_from_slice(&k[10..]);
                match self.get(&item) {
                    // The item moved on to a later lsn meanwhile: that later index entry carries it.
                    Ok(Some(e)) if e.lsn != lsn => None,
                    Ok(entry) => Some(Ok(SyncEntry { key: item, entry })),
                    Err(e) => Some(Err(e)),
                }
            })
    }

    /// Items written after `committed`: the tail a state transfer must repair (DESIGN.md §7).
    pub fn tail_items(&self, committed: u64) -> Result<Vec<Bytes>, StorageError> {
        let start = index_key(committed.saturating_add(1), b"");
        let mut out = Vec::new();
        for r in self.db.range(start..) {
            let (k, _) = r?;
            if !k.starts_with(INDEX) {
                break;
            }
            out.push(Bytes::copy_from_slice(&k[10..]));
        }
        Ok(out)
    }

    /// Number of stored items (user keys, tombstones and sessions).
    pub fn item_count(&self) -> usize {
        self.db.scan_prefix(DATA).count()
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
        let s = Store::open(dir.path(), SyncMode::None).unwrap();
        let m = s.load_meta().unwrap();
        assert_eq!(m.view, Some(View::new(4, 1, [1, 2])));
        assert_eq!(m.promise, Promise { ballot: 5, to: 2 });
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
