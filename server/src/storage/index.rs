//! The in-memory lsn index (docs/design.md §3's `l/` range): each item's latest lsn, ordered by
//! lsn, and the tombstones among them, which collection drops. Rebuilt from the `d/` entries
//! when the store opens.

use bytes::Bytes;

/// An item's latest lsn and whether its entry there is a tombstone, in one word (lsns stay
/// far below 2^63): the index holds one per item ever written and not yet collected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Latest(u64);

impl Latest {
    pub(super) fn new(lsn: u64, tombstone: bool) -> Latest {
        Latest(lsn << 1 | u64::from(tombstone))
    }

    pub(super) fn lsn(self) -> u64 {
        self.0 >> 1
    }

    pub(super) fn tombstone(self) -> bool {
        self.0 & 1 == 1
    }
}

/// The lsn index (docs/design.md §3's `l/` range, kept in memory and rebuilt from the entries at
/// start): each item's latest lsn, ordered by lsn, so "everything changed after X" and
/// "my uncommitted tail" are range scans. Keeping it out of sled saves two tree updates and
/// a read per written item. The tombstones among them, by lsn, are what collection drops.
#[derive(Default)]
pub(super) struct LsnIndex {
    pub(super) by_item: std::collections::HashMap<Bytes, Latest>,
    pub(super) by_lsn: std::collections::BTreeSet<(u64, Bytes)>,
    pub(super) tombstones: std::collections::BTreeSet<(u64, Bytes)>,
}

impl LsnIndex {
    /// Records `item`'s latest entry: its lsn and whether it is a tombstone, or `None` when
    /// the item is gone altogether.
    pub(super) fn set(&mut self, item: &Bytes, latest: Option<(u64, bool)>) {
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
    pub(super) fn take_tombstones(&mut self, limit: u64, most: usize) -> Vec<(u64, Bytes)> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
