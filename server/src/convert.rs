//! Conversions between generated protobuf types and the replica's domain types: the only
//! module that knows both.

use replikv_proto::{kv, peer};

use crate::types::{Entry, Item, LogState, Record, SyncEntry, View, MAX_EPOCH};

impl From<&View> for kv::View {
    fn from(v: &View) -> kv::View {
        kv::View {
            epoch: v.epoch,
            primary: v.primary,
            members: v.members.clone(),
        }
    }
}

/// A view from the wire; `None` when absent or malformed (no epoch or one past
/// [`MAX_EPOCH`], primary not a member, a rank outside the peer list of `n` servers).
pub fn view_from(v: Option<&kv::View>, n: usize) -> Option<View> {
    let v = v?;
    let valid = v.epoch > 0
        && v.epoch <= MAX_EPOCH
        && v.members.contains(&v.primary)
        && v.members.iter().all(|&m| (m as usize) < n);
    valid.then(|| View::new(v.epoch, v.primary, v.members.iter().copied()))
}

pub fn record_to_pb(r: &Record) -> peer::Record {
    peer::Record {
        lsn: r.lsn,
        epoch: r.epoch,
        entries: r
            .items
            .iter()
            .map(|i| peer::Entry {
                key: i.key.clone(),
                present: true,
                lsn: r.lsn,
                value: i.value.clone(),
            })
            .collect(),
    }
}

pub fn record_from_pb(r: peer::Record) -> Record {
    Record {
        lsn: r.lsn,
        epoch: r.epoch,
        items: r
            .entries
            .into_iter()
            .map(|e| Item {
                key: e.key,
                value: e.value,
            })
            .collect(),
    }
}

pub fn sync_entry_to_pb(e: SyncEntry) -> peer::Entry {
    match e.entry {
        Some(Entry { lsn, value }) => peer::Entry {
            key: e.key,
            present: true,
            lsn,
            value,
        },
        None => peer::Entry {
            key: e.key,
            present: false,
            lsn: 0,
            value: None,
        },
    }
}

pub fn sync_entry_from_pb(e: peer::Entry) -> SyncEntry {
    SyncEntry {
        key: e.key,
        entry: e.present.then_some(Entry {
            lsn: e.lsn,
            value: e.value,
        }),
    }
}

impl From<&LogState> for peer::MemberState {
    fn from(s: &LogState) -> peer::MemberState {
        peer::MemberState {
            rank: s.rank,
            applied: s.applied,
            committed: s.committed,
            last_epoch: s.last_epoch,
        }
    }
}

impl From<&peer::MemberState> for LogState {
    fn from(s: &peer::MemberState) -> LogState {
        LogState {
            rank: s.rank,
            applied: s.applied,
            committed: s.committed,
            last_epoch: s.last_epoch,
        }
    }
}

impl From<crate::engine::append::AppendReject> for replikv_proto::peer::AppendStatus {
    fn from(r: crate::engine::append::AppendReject) -> Self {
        use crate::engine::append::AppendReject;
        match r {
            AppendReject::Stale => Self::Stale,
            AppendReject::NotMember => Self::NotMember,
            AppendReject::Gap => Self::Gap,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn malformed_views_are_rejected() {
        let ok = kv::View {
            epoch: 2,
            primary: 1,
            members: vec![0, 1],
        };
        assert_eq!(view_from(Some(&ok), 3), Some(View::new(2, 1, [0, 1])));
        assert_eq!(
            view_from(
                Some(&kv::View {
                    epoch: 2,
                    primary: 2,
                    members: vec![0, 1]
                }),
                3
            ),
            None
        );
        assert_eq!(
            view_from(
                Some(&kv::View {
                    epoch: 2,
                    primary: 0,
                    members: vec![0, 5]
                }),
                3
            ),
            None
        );
        assert_eq!(
            view_from(
                Some(&kv::View {
                    epoch: 0,
                    primary: 0,
                    members: vec![0]
                }),
                3
            ),
            None
        );
        assert_eq!(view_from(None, 3), None);
    }

    #[test]
    fn records_and_entries_round_trip() {
        let r = Record {
            lsn: 7,
            epoch: 3,
            items: vec![
                Item {
                    key: Bytes::from_static(b"ua"),
                    value: Some(Bytes::from_static(b"v")),
                },
                Item {
                    key: Bytes::from_static(b"ub"),
                    value: None,
                },
            ],
        };
        assert_eq!(record_from_pb(record_to_pb(&r)), r);
        for e in [
            SyncEntry {
                key: Bytes::from_static(b"k"),
                entry: None,
            },
            SyncEntry {
                key: Bytes::from_static(b"k"),
                entry: Some(Entry {
                    lsn: 4,
                    value: None,
                }),
            },
            SyncEntry {
                key: Bytes::from_static(b"k"),
                entry: Some(Entry {
                    lsn: 4,
                    value: Some(Bytes::from_static(b"x")),
                }),
            },
        ] {
            assert_eq!(sync_entry_from_pb(sync_entry_to_pb(e.clone())), e);
        }
    }
}
