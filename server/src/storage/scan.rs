//! Ordered reads of a range of items across the three places an entry can be (docs/design.md §3):
//! staged in memory, logged but not yet in sled, and sled.
//!
//! A scan holds the staged lock from start to end. Every write enters the store through
//! that lock (`apply_records`, `set_entries`, a full transfer's removals), so the scan sees
//! the store as of one applied batch: never one write of a batch without an earlier one.
//! Entries only move onwards (staged -> logged -> sled, each still readable in the earlier
//! place until the later one has it), so reading the places in that order, each taking
//! precedence over the next, finds every entry exactly once and at its newest.
//!
//! The in-memory places are hash maps: a scan filters them whole (at most the applier's
//! window, 65536 keys, each), then walks sled in key order only as far as its limit needs.

use std::collections::btree_map::{BTreeMap, Entry as Slot};
use std::ops::Bound;

use bytes::Bytes;

use super::keys::{data_key, decode_entry, DATA};
use super::Store;
use crate::error::StorageError;
use crate::types::Entry;

/// The entries of a range of items, in item order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// Every entry with a value, and every tombstone, from the start of the range up to the
    /// point the scan covered.
    pub entries: Vec<(Bytes, Entry)>,
    /// Whether the page covers the whole range (nothing follows the last entry).
    pub exhausted: bool,
}

impl ScanPage {
    /// The entries with a value.
    pub fn live(&self) -> impl Iterator<Item = (&Bytes, &Bytes)> {
        self.entries
            .iter()
            .filter_map(|(k, e)| e.value.as_ref().map(|v| (k, v)))
    }
}

/// Whether `item` lies within `[start, end]` (each bound as given).
pub fn within(item: &[u8], start: &Bound<Bytes>, end: &Bound<Bytes>) -> bool {
    let above = match start {
        Bound::Included(s) => item >= s.as_ref(),
        Bound::Excluded(s) => item > s.as_ref(),
        Bound::Unbounded => true,
    };
    let below = match end {
        Bound::Included(e) => item <= e.as_ref(),
        Bound::Excluded(e) => item < e.as_ref(),
        Bound::Unbounded => true,
    };
    above && below
}

/// A bound on items as a bound on sled keys; an open end stays within the `d/` entries.
fn sled_bound(b: &Bound<Bytes>, open: Bound<Vec<u8>>) -> Bound<Vec<u8>> {
    match b {
        Bound::Included(k) => Bound::Included(data_key(k)),
        Bound::Excluded(k) => Bound::Excluded(data_key(k)),
        Bound::Unbounded => open,
    }
}

/// The first sled key after every `d/` entry.
const DATA_END: &[u8] = b"d0";

impl Store {
    /// The entries of the items in `[start, end]`, in item order, covering at least the
    /// first `limit + 1` items that hold a value (or the whole range if it has fewer): the
    /// caller can tell whether more follow its first `limit`. Tombstones within the covered
    /// part are included, with their lsns, so that a caller can wait for pending deletes.
    pub fn scan(
        &self,
        start: Bound<Bytes>,
        end: Bound<Bytes>,
        limit: usize,
    ) -> Result<ScanPage, StorageError> {
        super::compact::release_on_this_thread();
        // `None`: removed outright (a transfer's removal), hiding what later places hold.
        let mut merged: BTreeMap<Bytes, Option<Entry>> = BTreeMap::new();
        // Held to the end: no write enters the store meanwhile.
        let staged = self.staged();
        for (item, e) in &staged.items {
            if within(item, &start, &end) {
                merged.insert(item.clone(), e.clone());
            }
        }
        {
            let logged = self.durable.logged();
            // `fresh` is newer than `applying`; the first found wins.
            for layer in [&logged.fresh, &*logged.applying] {
                for (key, raw) in layer {
                    let Some(item) = key.strip_prefix(DATA) else {
                        continue;
                    };
                    if !within(item, &start, &end) {
                        continue;
                    }
                    if let Slot::Vacant(slot) = merged.entry(Bytes::copy_from_slice(item)) {
                        slot.insert(raw.as_deref().map(decode_entry).transpose()?);
                    }
                }
            }
        }
        let range = (
            sled_bound(&start, Bound::Included(DATA.to_vec())),
            sled_bound(&end, Bound::Excluded(DATA_END.to_vec())),
        );
        let mut exhausted = true;
        let mut cut: Option<Bytes> = None;
        {
            let db = self.durable.db();
            let mut live = 0usize;
            for kv in db.range::<Vec<u8>, _>(range) {
                let (key, raw) = kv?;
                let item = Bytes::copy_from_slice(&key[DATA.len()..]);
                let e = match merged.entry(item.clone()) {
                    Slot::Vacant(slot) => slot.insert(Some(decode_entry(&raw)?)),
                    Slot::Occupied(slot) => slot.into_mut(),
                };
                if e.as_ref().is_some_and(|e| e.value.is_some()) {
                    live += 1;
                }
                if live > limit {
                    exhausted = false;
                    cut = Some(item);
                    break;
                }
            }
        }
        drop(staged);
        if let Some(cut) = cut {
            // Past the cut, sled was not read: what memory holds there is not the whole story.
            let _ = merged.split_off(&Bytes::from([cut.as_ref(), &[0]].concat()));
        }
        let mut entries: Vec<(Bytes, Entry)> = merged
            .into_iter()
            .filter_map(|(k, e)| e.map(|e| (k, e)))
            .collect();
        if exhausted {
            // Memory alone may hold more than `limit + 1` values: keep the page as short as
            // the contract says, and say that more follow.
            let mut live = 0usize;
            if let Some(at) = entries.iter().position(|(_, e)| {
                live += usize::from(e.value.is_some());
                live > limit
            }) {
                entries.truncate(at + 1);
                exhausted = false;
            }
        }
        Ok(ScanPage { entries, exhausted })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::*;
    use super::*;

    fn live_keys(p: &ScanPage) -> Vec<String> {
        p.live()
            .map(|(k, _)| String::from_utf8(k.to_vec()).unwrap())
            .collect()
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn a_scan_merges_staged_logged_and_sled_entries_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), SyncMode::None).unwrap();
        let pos = Position::default();
        // In sled.
        s.apply_records(
            &[
                rec(1, "a", Some("1")),
                rec(2, "c", Some("2")),
                rec(3, "e", Some("3")),
            ],
            pos,
        )
        .unwrap();
        s.write_staged().unwrap();
        s.durable.apply_logged().unwrap();
        // Logged only: "c" deleted.
        s.apply_records(&[rec(4, "c", None), rec(5, "b", Some("5"))], pos)
            .unwrap();
        s.write_staged().unwrap();
        // Staged only: "e" rewritten, "d" new, "z" outside the range.
        s.apply_records(
            &[
                rec(6, "e", Some("6")),
                rec(7, "d", Some("7")),
                rec(8, "z", Some("8")),
            ],
            pos,
        )
        .unwrap();
        let all = s
            .scan(Bound::Included(b("a")), Bound::Included(b("e")), 100)
            .unwrap();
        assert!(all.exhausted);
        assert_eq!(live_keys(&all), ["a", "b", "d", "e"]);
        let e = all.live().find(|(k, _)| k.as_ref() == b"e").unwrap().1;
        assert_eq!(e.as_ref(), b"6", "the newest place wins");
        assert!(
            all.entries
                .iter()
                .any(|(k, e)| k.as_ref() == b"c" && e.lsn == 4 && e.value.is_none()),
            "the tombstone is reported with its lsn"
        );
        let page = s
            .scan(Bound::Excluded(b("a")), Bound::Unbounded, 2)
            .unwrap();
        assert!(!page.exhausted);
        assert_eq!(live_keys(&page), ["b", "d", "e"], "limit + 1 values");
        let none = s
            .scan(Bound::Included(b("f")), Bound::Excluded(b("y")), 10)
            .unwrap();
        assert_eq!(
            none,
            ScanPage {
                entries: vec![],
                exhausted: true
            }
        );
    }

    #[test]
    fn a_scan_stops_walking_sled_after_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), SyncMode::None).unwrap();
        let recs: Vec<Record> = (0..50)
            .map(|i| rec(i + 1, &format!("k{i:03}"), Some("v")))
            .collect();
        s.apply_records(&recs, Position::default()).unwrap();
        s.write_staged().unwrap();
        s.durable.apply_logged().unwrap();
        let page = s
            .scan(Bound::Included(b("k010")), Bound::Unbounded, 5)
            .unwrap();
        assert!(!page.exhausted);
        assert_eq!(
            live_keys(&page),
            ["k010", "k011", "k012", "k013", "k014", "k015"]
        );
    }
}
