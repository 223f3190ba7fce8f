//! A simulated server's disk: an in-memory model of the store (items with their lsns, the
//! position, the Paxos state, the membership), split like the write-ahead log into what is
//! synced and what is not (docs/design.md §3). A crash keeps the synced image plus a prefix of the
//! unsynced writes (the last of which may be torn, and is then dropped at recovery); a wiped
//! disk keeps nothing; a failed sync stops the server (fail-stop).

use std::collections::BTreeMap;

use bytes::Bytes;
use replikv_server::storage::{Accepted, Position, Promise};
use replikv_server::types::{Entry, Record, SyncEntry, View};

/// Everything a server stores.
#[derive(Clone, Debug, Default)]
pub struct Image {
    pub items: BTreeMap<Bytes, Entry>,
    pub pos: Position,
    pub view: Option<View>,
    pub promise: Promise,
    pub accepted: Option<Accepted>,
    /// Whether this server found (or formed) its cluster (§10).
    pub in_cluster: bool,
    pub amnesiac_until: Option<u64>,
}

/// One logged write.
#[derive(Clone, Debug)]
pub enum Op {
    Records(Vec<Record>, Position),
    Entries(Vec<SyncEntry>, Option<Position>),
    Paxos {
        view: View,
        promise: Promise,
        accepted: Option<Accepted>,
    },
    Membership {
        view: Option<View>,
        amnesiac_until: Option<u64>,
    },
}

impl Image {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Records(records, pos) => {
                for r in records {
                    for i in &r.items {
                        self.items.insert(
                            i.key.clone(),
                            Entry {
                                lsn: r.lsn,
                                value: i.value.clone(),
                            },
                        );
                    }
                }
                self.pos = *pos;
            }
            Op::Entries(entries, pos) => {
                for e in entries {
                    match &e.entry {
                        Some(x) => {
                            self.items.insert(e.key.clone(), x.clone());
                        }
                        None => {
                            self.items.remove(&e.key);
                        }
                    }
                }
                if let Some(p) = pos {
                    self.pos = *p;
                }
            }
            Op::Paxos {
                view,
                promise,
                accepted,
            } => {
                self.view = Some(view.clone());
                self.promise = *promise;
                self.accepted = accepted.clone();
            }
            Op::Membership {
                view,
                amnesiac_until,
            } => {
                self.in_cluster = true;
                if let Some(v) = view {
                    self.view = Some(v.clone());
                }
                self.amnesiac_until = *amnesiac_until;
            }
        }
    }
}

/// The disk: the synced image, the unsynced writes, and the current image (both together).
#[derive(Clone, Debug, Default)]
pub struct Disk {
    synced: Image,
    unsynced: Vec<Op>,
    pub current: Image,
}

impl Disk {
    pub fn write(&mut self, op: Op) {
        self.current.apply(&op);
        self.unsynced.push(op);
    }

    /// An fsync: everything written so far survives a crash.
    pub fn sync(&mut self) {
        for op in self.unsynced.drain(..) {
            self.synced.apply(&op);
        }
    }

    pub fn unsynced_len(&self) -> usize {
        self.unsynced.len()
    }

    /// A crash: the synced image and the first `kept` unsynced writes survive (the one after
    /// them was torn and is dropped at recovery).
    pub fn crash(&mut self, kept: usize) {
        let kept = kept.min(self.unsynced.len());
        for op in self.unsynced.drain(..).take(kept) {
            self.synced.apply(&op);
        }
        self.current = self.synced.clone();
    }

    /// The disk is lost: nothing survives.
    pub fn wipe(&mut self) {
        *self = Disk::default();
    }

    pub fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.current.items.get(key)
    }

    /// Items written after `lsn` (the source side of a transfer, and a receiver's tail).
    pub fn changed_since(&self, lsn: u64) -> impl Iterator<Item = (&Bytes, &Entry)> {
        self.current.items.iter().filter(move |(_, e)| e.lsn > lsn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replikv_server::types::Item;

    fn rec(lsn: u64, key: &str) -> Op {
        Op::Records(
            vec![Record {
                lsn,
                epoch: 1,
                items: vec![Item {
                    key: Bytes::copy_from_slice(key.as_bytes()),
                    value: Some(Bytes::from_static(b"v")),
                }],
            }],
            Position {
                applied: lsn,
                committed: 0,
                last_epoch: 1,
            },
        )
    }

    #[test]
    fn a_crash_keeps_the_synced_image_and_a_prefix_of_the_rest() {
        let mut d = Disk::default();
        d.write(rec(1, "a"));
        d.sync();
        d.write(rec(2, "b"));
        d.write(rec(3, "c"));
        let mut torn = d.clone();
        torn.crash(1);
        assert_eq!(torn.current.pos.applied, 2);
        assert!(torn.get(b"c").is_none());
        d.crash(0);
        assert_eq!(d.current.pos.applied, 1);
        assert!(d.get(b"b").is_none() && d.get(b"a").is_some());
    }
}
