//! Tombstone collection (docs/design.md §3, §7): the horizon, the transfers that pin it, the
//! collection pass that drops tombstones from the index, the log and sled, and the
//! collector thread that runs it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::StorageError;
use crate::types::Entry;

use super::durable::Durable;
use super::keys::{data_key, json, GC_HORIZON};
use super::wal::Op;
use super::Items;

/// Tombstone collection (docs/design.md §3, §7). A tombstone may be dropped once every member of
/// the view has it committed: the primary hands out that horizon on its appends
/// (`Store::collect_up_to`), and a collector thread drops tombstones up to it. A state
/// transfer whose `since` is below `horizon` might miss a deletion and must be full.
#[derive(Default)]
pub(super) struct Gc {
    /// The highest lsn of a tombstone this store dropped (`m/gc`), or took from a full
    /// transfer's source: a transfer from here with `since` below it must be full.
    pub(super) horizon: u64,
    /// Incremental transfers in progress, by `since`, with their count: no tombstone above
    /// the lowest is dropped until they end, or they could miss its deletion.
    pub(super) pins: std::collections::BTreeMap<u64, usize>,
    /// Per receiver, the commit point its latest transfer handed it, and until when nothing
    /// above it is dropped: its next transfer starts there (a joiner catches up in several,
    /// the last one during the install), and must not have to be full again.
    pub(super) receivers: std::collections::HashMap<u32, (u64, std::time::Instant)>,
}

impl Gc {
    /// The highest lsn collection may reach now, given the replica's target.
    pub(super) fn limit(&mut self, target: u64) -> u64 {
        let now = std::time::Instant::now();
        self.receivers.retain(|_, (_, until)| *until > now);
        let pinned = self.pins.keys().next().copied();
        let held = self.receivers.values().map(|&(at, _)| at).min();
        [Some(target), pinned, held]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(target)
    }
}

/// How long a receiver's next transfer is spared a full one (a joiner's catch-up and join).
pub(super) const RECEIVER_HOLD: std::time::Duration = std::time::Duration::from_secs(30);

/// Most tombstones one collection pass drops, so a pass holds the log's writer only briefly.
pub(super) const GC_CHUNK: usize = 16 * 1024;
/// How often the collector looks for work.
pub(super) const GC_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// How often the collector looks at sled's size: a `stat` and a directory listing. Not right
/// after each pass: the removals it logged reach sled within `APPLY_EVERY` (1 s).
const COMPACT_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Items {
    /// Drops every tombstone at or below the target horizon (and below every pin), a chunk
    /// at a time. Each chunk is one log record: the removals and the new `m/gc`, so the
    /// stored horizon always covers what was dropped. Returns how many were dropped.
    pub(super) fn collect(&self, durable: &Arc<Durable>) -> Result<usize, StorageError> {
        let target = self.gc_target.load(Ordering::Acquire);
        let mut dropped = 0;
        loop {
            let writing = durable.writing.lock().expect("store writer lock poisoned");
            let mut gc = self.gc();
            let limit = gc.limit(target);
            let victims = self.index().take_tombstones(limit, GC_CHUNK);
            let Some(&(top, _)) = victims.last() else {
                break;
            };
            gc.horizon = gc.horizon.max(top);
            let mut ops: Vec<Op> = victims
                .iter()
                .map(|(_, item)| Op {
                    key: data_key(item),
                    value: None,
                })
                .collect();
            ops.push(Op {
                key: GC_HORIZON.to_vec(),
                value: Some(json(&gc.horizon)),
            });
            // Logged before the staged tombstones go: a read finds either the tombstone or
            // the removal, never an older value sled may still hold.
            durable.log_locked(ops)?;
            let mut staged = self.staged();
            for (lsn, item) in &victims {
                let tombstone = Some(Entry {
                    lsn: *lsn,
                    value: None,
                });
                if staged.items.get(item) == Some(&tombstone) {
                    staged.items.remove(item);
                }
            }
            drop(staged);
            dropped += victims.len();
            drop(gc);
            drop(writing);
            durable.checkpoint_if_full();
        }
        if dropped > 0 {
            tracing::info!(dropped, horizon = self.gc().horizon, "tombstones collected");
        }
        Ok(dropped)
    }

    /// The collector: drops tombstones as the horizon moves, until the store closes.
    ///
    /// Every `COMPACT_CHECK_EVERY` it also compacts sled if its files have grown far beyond
    /// what it holds (`compact.rs`).
    pub(super) fn run_collector(&self, durable: &Arc<Durable>) {
        let mut checked_at = std::time::Instant::now();
        let mut closing = self.closing.lock().expect("collector lock poisoned");
        loop {
            if *closing {
                return;
            }
            closing = self
                .wake
                .wait_timeout(closing, GC_EVERY)
                .expect("collector lock poisoned")
                .0;
            if *closing {
                return;
            }
            drop(closing);
            if let Err(e) = self.collect(durable) {
                tracing::error!(error = %e, "collecting tombstones failed; no more writes are taken");
                durable.logged().failed = Some(e.to_string());
                return;
            }
            if durable.auto_compact.load(Ordering::Relaxed)
                && checked_at.elapsed() >= COMPACT_CHECK_EVERY
            {
                checked_at = std::time::Instant::now();
                if let Err(e) = durable.compact_if_worth_it() {
                    tracing::error!(error = %e, "compacting sled failed; no more writes are taken");
                    durable.logged().failed = Some(e.to_string());
                    return;
                }
            }
            closing = self.closing.lock().expect("collector lock poisoned");
        }
    }
}

/// Held while an incremental state transfer is served (see [`Store::pin_transfer`]).
pub struct TransferPin {
    pub(super) items: Arc<Items>,
    /// `None` for a full transfer, which needs no pin.
    pub(super) since: Option<u64>,
}

impl TransferPin {
    /// Whether the transfer must be full.
    pub fn full(&self) -> bool {
        self.since.is_none()
    }
}

impl Drop for TransferPin {
    fn drop(&mut self) {
        let Some(since) = self.since else { return };
        let mut gc = self.items.gc();
        if let std::collections::btree_map::Entry::Occupied(mut o) = gc.pins.entry(since) {
            *o.get_mut() -= 1;
            if *o.get() == 0 {
                o.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {

    use crate::config::SyncMode;
    use crate::storage::testutil::*;
    use crate::storage::*;
    use crate::types::{Entry, SyncEntry};

    #[tokio::test]
    async fn tombstones_up_to_the_horizon_are_dropped_everywhere_and_the_horizon_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), SyncMode::Always).unwrap();
            s.apply_records(
                &[
                    rec(1, "a", Some("1")),
                    rec(2, "b", Some("2")),
                    rec(3, "c", Some("3")),
                    rec(4, "a", None),
                    rec(5, "b", None),
                    rec(6, "c", None),
                    rec(7, "c", Some("again")),
                    rec(8, "d", None),
                ],
                pos(8),
            )
            .unwrap();
            s.flush_data().await.unwrap();
            // Nothing is dropped before the replica allows it.
            assert_eq!(s.collect_now().unwrap(), 0);
            s.collect_up_to(5);
            // (The collector thread may be first: the outcome is checked, not the count.)
            s.collect_now().unwrap();
            // A lower horizon later changes nothing.
            s.collect_up_to(3);
            assert_eq!(s.collect_now().unwrap(), 0);
            assert_eq!(s.gc_horizon(), 5);
            assert_eq!(s.get(b"a").unwrap(), None);
            assert_eq!(s.get(b"b").unwrap(), None);
            assert_eq!(
                s.get(b"d").unwrap(),
                Some(Entry {
                    lsn: 8,
                    value: None
                }),
                "above the horizon"
            );
            assert_eq!(
                indexed(&s),
                vec![("c".into(), 7, false), ("d".into(), 8, true)]
            );
            s.flush_data().await.unwrap();
        }
        let s = reopen(dir.path());
        assert_eq!(s.gc_horizon(), 5, "the horizon is stored");
        assert_eq!(s.get(b"a").unwrap(), None);
        assert_eq!(s.get(b"b").unwrap(), None);
        assert_eq!(
            indexed(&s),
            vec![("c".into(), 7, false), ("d".into(), 8, true)]
        );
    }

    #[tokio::test]
    async fn a_tombstone_still_staged_is_dropped_without_uncovering_the_older_value() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), SyncMode::Always).unwrap();
        s.apply_records(&[rec(1, "a", Some("old"))], pos(1))
            .unwrap();
        s.flush_data().await.unwrap();
        s.durable.apply_logged().unwrap();
        // The tombstone is only staged: sled and the log still hold the value.
        s.apply_records(&[rec(2, "a", None)], pos(2)).unwrap();
        s.collect_up_to(2);
        s.collect_now().unwrap();
        assert!(indexed(&s).is_empty());
        assert_eq!(s.get(b"a").unwrap(), None);
        s.flush_data().await.unwrap();
        s.durable.apply_logged().unwrap();
        assert_eq!(s.get(b"a").unwrap(), None);
        assert!(s.durable.db().get(data_key(b"a")).unwrap().is_none());
    }

    #[tokio::test]
    async fn a_transfer_pins_the_tombstones_above_its_since_and_one_below_the_horizon_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), SyncMode::None).unwrap();
        s.apply_records(
            &[
                rec(1, "a", None),
                rec(2, "b", None),
                rec(3, "c", None),
                rec(4, "d", None),
            ],
            pos(4),
        )
        .unwrap();
        let pin = s.pin_transfer(2, 9, 4);
        assert!(!pin.full(), "nothing was dropped yet");
        s.collect_up_to(4);
        s.collect_now().unwrap();
        assert_eq!(
            indexed(&s),
            vec![("c".into(), 3, true), ("d".into(), 4, true)],
            "only up to the pin"
        );
        assert_eq!(
            keys(&s, 2),
            vec![("c".into(), Some(3)), ("d".into(), Some(4))],
            "the pinned transfer still finds every deletion after its since"
        );
        assert!(s.pin_transfer(1, 9, 4).full(), "since 1 < horizon 2");
        assert!(!s.pin_transfer(2, 9, 4).full());
        drop(pin);
        s.collect_now().unwrap();
        assert!(indexed(&s).is_empty());
        assert_eq!(s.gc_horizon(), 4);
        assert!(s.pin_transfer(3, 9, 4).full());
        assert!(!s.pin_transfer(4, 9, 4).full());
    }

    #[tokio::test]
    async fn a_receivers_next_transfer_starts_where_its_last_ended_and_is_not_full() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), SyncMode::None).unwrap();
        s.apply_records(&[rec(1, "a", None), rec(2, "b", None)], pos(2))
            .unwrap();
        // A joiner was handed commit point 1; the transfer itself is over.
        drop(s.pin_transfer(0, 7, 1));
        s.apply_records(&[rec(3, "c", None)], pos(3)).unwrap();
        s.collect_up_to(3);
        s.collect_now().unwrap();
        assert_eq!(
            indexed(&s),
            vec![("b".into(), 2, true), ("c".into(), 3, true)],
            "held above the joiner's commit point"
        );
        assert!(!s.pin_transfer(1, 7, 3).full(), "its next transfer, from 1");
        // The hold moved to 3 with that transfer; once it lapses, everything goes.
        s.items.gc().receivers.get_mut(&7).unwrap().1 = std::time::Instant::now();
        s.collect_now().unwrap();
        assert!(indexed(&s).is_empty());
        assert_eq!(s.gc_horizon(), 3);
        // A receiver that became a member holds nothing back.
        s.apply_records(&[rec(4, "d", None)], pos(4)).unwrap();
        drop(s.pin_transfer(3, 7, 3));
        s.release_transfer_hold(7);
        s.collect_up_to(4);
        s.collect_now().unwrap();
        assert!(indexed(&s).is_empty());
        assert_eq!(s.gc_horizon(), 4);
    }

    #[tokio::test]
    async fn a_full_transfer_leaves_exactly_the_sources_items_and_takes_its_horizon() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), SyncMode::Always).unwrap();
            s.apply_records(
                &[
                    rec(1, "kept", Some("1")),
                    rec(2, "gone", Some("2")),
                    rec(3, "tomb", None),
                    rec(4, "changed", Some("old")),
                ],
                pos(4),
            )
            .unwrap();
            s.flush_data().await.unwrap();
            let mut r = s.begin_replacement();
            let sent = |key: &'static str, lsn, value: Option<&'static str>| SyncEntry {
                key: Bytes::from_static(key.as_bytes()),
                entry: Some(Entry {
                    lsn,
                    value: value.map(|v| Bytes::from_static(v.as_bytes())),
                }),
            };
            let first = [sent("kept", 1, Some("1")), sent("new", 9, Some("n"))];
            r.received(&first);
            s.set_entries(&first, None).unwrap();
            let last = [sent("changed", 8, Some("new")), sent("late", 10, None)];
            r.received(&last);
            s.finish_replacement(r, 7).unwrap();
            s.set_entries(&last, Some(pos(10))).unwrap();
            s.flush_data().await.unwrap();
            assert_eq!(s.gc_horizon(), 7);
        }
        let s = reopen(dir.path());
        assert_eq!(
            indexed(&s),
            vec![
                ("changed".into(), 8, false),
                ("kept".into(), 1, false),
                ("late".into(), 10, true),
                ("new".into(), 9, false),
            ]
        );
        assert_eq!(s.get(b"gone").unwrap(), None);
        assert_eq!(s.get(b"tomb").unwrap(), None);
        assert_eq!(s.gc_horizon(), 7, "taken from the source and stored");
        assert_eq!(s.load_meta().unwrap().position, pos(10));
    }
}
