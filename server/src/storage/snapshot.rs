//! Point-in-time reads of every user key (docs/design.md §12 "Snapshots").
//!
//! The store keeps only each item's latest entry, so a snapshot that must show every key as
//! of one applied position `A` while writes go on preserves what it would lose: while a
//! [`SnapshotPin`] is held, every change to a user item (an applied record, a transfer's
//! entry or removal) first copies the item's entry as it stood into the pin, once, under
//! the same staged-data lock the change itself takes. A page of the snapshot is a scan of
//! the current state in which every preserved item is replaced by its preserved entry:
//!
//! - an item the scan saw unchanged since `A` holds its entry as of `A`;
//! - an item changed since `A` was preserved by the change, atomically with it, before the
//!   scan could see the change, so it is in the pin when the page is assembled (after the
//!   scan); the pin only grows and never changes an item it holds.
//!
//! Writes after `A` are never seen and nothing as of `A` is missed, at the price of the
//! memory the changed items' old entries take while the snapshot is read.
//!
//! The caller pins while no write can enter the store (the replica's data lock), so that it
//! knows `A`; tombstone collection needs no hook: it removes only tombstones, which read as
//! absent either way.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::keys::{data_key, decode_entry};
use super::{Items, Staged, Store};
use crate::error::StorageError;
use crate::types::{key_of_user_item, Entry, ItemRange};

/// The entries of the user items changed since a snapshot was pinned, as they stood when it
/// was (`None`: absent). `std::sync::Mutex`: taken inside the staged lock by writers and
/// alone by the snapshot's reader, for short sections only.
#[derive(Default)]
pub(super) struct Preserved {
    items: Mutex<BTreeMap<Bytes, Option<Entry>>>,
}

impl Preserved {
    fn items(&self) -> std::sync::MutexGuard<'_, BTreeMap<Bytes, Option<Entry>>> {
        self.items.lock().expect("snapshot preserve lock poisoned")
    }
}

/// Holds the store's state as of one applied position for a snapshot reader; dropping it
/// stops the preserving and frees what was preserved.
pub struct SnapshotPin {
    items: Arc<Items>,
    preserved: Arc<Preserved>,
    /// The applied position the pin holds the state of.
    lsn: u64,
}

impl Drop for SnapshotPin {
    fn drop(&mut self) {
        self.items
            .staged()
            .preserving
            .retain(|p| !Arc::ptr_eq(p, &self.preserved));
    }
}

impl SnapshotPin {
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    /// How many items were changed since the pin (and are held in memory for it).
    pub fn preserved(&self) -> usize {
        self.preserved.items().len()
    }
}

/// A page of a snapshot: user keys in order, each with its entry as of the pin.
pub struct SnapshotPage {
    pub entries: Vec<(Bytes, Entry)>,
    /// Where the next page starts (after this key); `None` once every key was read.
    pub next: Option<Bytes>,
}

impl Store {
    /// Pins the store's state as of `applied`, which must be the last applied position:
    /// call it while no write can enter the store.
    pub fn pin_snapshot(&self, applied: u64) -> SnapshotPin {
        let preserved = Arc::new(Preserved::default());
        self.staged().preserving.push(preserved.clone());
        SnapshotPin {
            items: self.items.clone(),
            preserved,
            lsn: applied,
        }
    }

    /// The user keys after `after` (from the first when `None`), at most about `limit`
    /// with a value, as of the pin.
    pub fn snapshot_page(
        &self,
        pin: &SnapshotPin,
        after: Option<&Bytes>,
        limit: usize,
    ) -> Result<SnapshotPage, StorageError> {
        let all = ItemRange::keys(b"", None);
        let start = match after {
            Some(item) => Bound::Excluded(item.clone()),
            None => all.start.clone(),
        };
        let page = self.scan(start.clone(), all.end.clone(), limit)?;
        // What the scan covered: up to its last entry, or the whole rest of the range.
        let (end, next) = match (page.exhausted, page.entries.last()) {
            (false, Some((last, _))) => (Bound::Included(last.clone()), Some(last.clone())),
            _ => (all.end.clone(), None),
        };
        let mut merged: BTreeMap<Bytes, Option<Entry>> = page
            .entries
            .into_iter()
            .map(|(item, e)| (item, Some(e)))
            .collect();
        let preserved = pin.preserved.items();
        for (item, e) in &merged {
            let newer = e.as_ref().is_some_and(|e| e.lsn > pin.lsn);
            if newer && !preserved.contains_key(item) {
                return Err(StorageError::Corrupt(format!(
                    "snapshot at lsn {} read an entry with a higher lsn that was not preserved",
                    pin.lsn
                )));
            }
        }
        for (item, e) in preserved.range::<Bytes, _>((start, end)) {
            merged.insert(item.clone(), e.clone());
        }
        drop(preserved);
        let entries = merged
            .into_iter()
            .filter_map(|(item, e)| {
                let e = e.filter(|e| e.value.is_some())?;
                let key = key_of_user_item(&item)?;
                Some((item.slice_ref(key), e))
            })
            .collect();
        Ok(SnapshotPage { entries, next })
    }

    /// Copies `item`'s current entry into every pinned snapshot that has not preserved it
    /// yet: call before a change to `item`, holding the staged lock.
    pub(super) fn preserve(&self, staged: &Staged, item: &Bytes) -> Result<(), StorageError> {
        if staged.preserving.is_empty() || key_of_user_item(item).is_none() {
            return Ok(());
        }
        let mut current: Option<Option<Entry>> = None;
        for p in &staged.preserving {
            let mut items = p.items();
            if items.contains_key(item) {
                continue;
            }
            let e = match &current {
                Some(e) => e.clone(),
                None => {
                    let e = match staged.items.get(item) {
                        Some(e) => e.clone(),
                        None => self
                            .durable
                            .get(&data_key(item))?
                            .map(|raw| decode_entry(&raw))
                            .transpose()?,
                    };
                    current = Some(e.clone());
                    e
                }
            };
            items.insert(item.clone(), e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::config::SyncMode;

    /// Every key of a pinned snapshot, page by page (`limit` keys a page), as `key=value`.
    fn read_all(s: &Store, pin: &SnapshotPin, limit: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = s.snapshot_page(pin, after.as_ref(), limit).unwrap();
            for (k, e) in page.entries {
                let v = e.value.unwrap();
                out.push(format!(
                    "{}={}",
                    String::from_utf8_lossy(&k),
                    String::from_utf8_lossy(&v)
                ));
            }
            match page.next {
                Some(n) => after = Some(n),
                None => return out,
            }
        }
    }

    #[test]
    fn a_pinned_snapshot_reads_every_key_as_of_its_point_while_writes_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), SyncMode::None).unwrap();
        // "u" items are user keys; "sh..." a session item, never in a snapshot.
        s.apply_records(
            &[
                rec(1, "ua", Some("1")),
                rec(2, "ub", Some("2")),
                rec(3, "uc", Some("3")),
                rec(4, "ud", None),
                rec(5, "shx", Some("session")),
            ],
            pos(5),
        )
        .unwrap();
        s.write_staged().unwrap();
        s.durable.apply_logged().unwrap();
        s.apply_records(&[rec(6, "ue", Some("6"))], pos(6)).unwrap();
        let pin = s.pin_snapshot(6);
        let expected = vec!["a=1", "b=2", "c=3", "e=6"];
        // After the pin: an overwrite, a delete, a new key, a removal by a transfer, and a
        // second change of a key already preserved.
        s.apply_records(
            &[
                rec(7, "ua", Some("7")),
                rec(8, "ub", None),
                rec(9, "uaa", Some("9")),
                rec(10, "ua", Some("10")),
            ],
            pos(10),
        )
        .unwrap();
        s.set_entries(
            &[crate::types::SyncEntry {
                key: Bytes::from_static(b"uc"),
                entry: None,
            }],
            None,
        )
        .unwrap();
        for limit in [1, 2, 1000] {
            assert_eq!(read_all(&s, &pin, limit), expected, "limit {limit}");
        }
        assert_eq!(pin.preserved(), 4);
        drop(pin);
        // Unpinned: the store reads as it is, and preserves nothing more.
        let now = s.pin_snapshot(10);
        assert_eq!(read_all(&s, &now, 1000), vec!["a=10", "aa=9", "e=6"]);
        assert!(s.staged().preserving.len() == 1);
    }
}
