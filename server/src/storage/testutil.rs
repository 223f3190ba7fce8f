//! Helpers shared by the storage unit tests.

use std::path::Path;

use bytes::Bytes;

use super::{Position, Store};
use crate::config::SyncMode;
use crate::types::{Item, Record};

pub(super) fn rec(lsn: u64, key: &str, val: Option<&str>) -> Record {
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
pub(super) fn reopen(dir: &Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Store::open(dir, SyncMode::None) {
            Ok(s) => return s,
            Err(e) if std::time::Instant::now() > deadline => panic!("reopen: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

pub(super) fn keys(s: &Store, since: u64) -> Vec<(String, Option<u64>)> {
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

pub(super) fn pos(applied: u64) -> Position {
    Position {
        applied,
        committed: applied,
        last_epoch: 1,
    }
}

/// Items the index holds, with their lsn and whether they are tombstones.
pub(super) fn indexed(s: &Store) -> Vec<(String, u64, bool)> {
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
