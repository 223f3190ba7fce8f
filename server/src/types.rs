//! Domain types of the replica and the pure rules over them (docs/design.md §2, §4, §5):
//! views and the quorum rule, records, entries, and the choice of the most advanced state. No I/O here.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A server's index in the cluster's configuration (docs/design.md §11); never reused.
pub type Rank = u32;

/// Highest epoch or ballot a server accepts (docs/design.md §10). A ballot grows by one per view
/// change attempt, so no real cluster comes near it; a forged one near `u64::MAX` is refused,
/// and arithmetic on epochs never overflows.
pub const MAX_EPOCH: u64 = 1 << 56;

/// `{epoch, primary, members}`: who is primary and who receives every write. `epoch` only
/// grows; a higher epoch always wins. The classic dead set is every rank not in `members`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    pub epoch: u64,
    pub primary: Rank,
    /// Sorted, without duplicates; always contains `primary`.
    pub members: Vec<Rank>,
    /// The servers of the cluster, decided with the view (docs/design.md §11): every member
    /// is one of them. `None` only in a view built without one (before a server has learned
    /// its configuration); the replica then uses the configuration of `--peers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Configuration>,
}

/// Where a server is reached: its client address and its peer address (`host:port` each).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerAddr {
    pub client: String,
    pub peer: String,
}

impl std::fmt::Display for ServerAddr {
    /// The `--peers` form, `host:client_port/peer_port`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let peer_port = self.peer.rsplit_once(':').map_or("", |(_, p)| p);
        let same_host = self.peer.rsplit_once(':').map(|(h, _)| h)
            == self.client.rsplit_once(':').map(|(h, _)| h);
        if same_host {
            write!(f, "{}/{peer_port}", self.client)
        } else {
            write!(f, "{}/{}", self.client, self.peer)
        }
    }
}

/// The ranked list of servers (docs/design.md §11): rank -> addresses. It changes only
/// through a view change, so it is as durable and as agreed as the view itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configuration {
    pub servers: BTreeMap<Rank, ServerAddr>,
    /// The rank the next added server gets: above every rank the cluster ever had.
    pub next_rank: Rank,
    /// A server added and not yet installed as a member: the change in progress.
    #[serde(default)]
    pub pending: Option<Rank>,
}

impl Configuration {
    /// Ranks 0.. for the given servers, in order (a `--peers` list).
    pub fn seed(servers: impl IntoIterator<Item = ServerAddr>) -> Configuration {
        let servers: BTreeMap<Rank, ServerAddr> = (0..).zip(servers).collect();
        Configuration {
            next_rank: servers.len() as Rank,
            servers,
            pending: None,
        }
    }

    pub fn contains(&self, rank: Rank) -> bool {
        self.servers.contains_key(&rank)
    }

    pub fn ranks(&self) -> impl Iterator<Item = Rank> + '_ {
        self.servers.keys().copied()
    }

    /// The rank whose client or peer address is `addr`.
    pub fn rank_of(&self, addr: &str) -> Option<Rank> {
        self.servers
            .iter()
            .find(|(_, s)| s.client == addr || s.peer == addr)
            .map(|(&r, _)| r)
    }
}

impl View {
    pub fn new(epoch: u64, primary: Rank, members: impl IntoIterator<Item = Rank>) -> View {
        let mut set: BTreeSet<Rank> = members.into_iter().collect();
        set.insert(primary);
        View {
            epoch,
            primary,
            members: set.into_iter().collect(),
            config: None,
        }
    }

    /// The same view with `config` as its configuration.
    pub fn with_config(self, config: Option<Configuration>) -> View {
        View { config, ..self }
    }

    /// Whether `rank` is a server of this view's configuration; with no configuration, every
    /// rank is (the `--peers` list decides).
    pub fn in_config(&self, rank: Rank) -> bool {
        self.config.as_ref().is_none_or(|c| c.contains(rank))
    }

    /// The view a new cluster is formed with (docs/design.md §10): epoch 1, rank 0 its only
    /// member. Every other server joins through a state transfer, like any server without
    /// state, so a cluster never depends on a half-distributed bootstrap.
    pub fn bootstrap() -> View {
        View::new(1, 0, [0])
    }

    pub fn is_member(&self, rank: Rank) -> bool {
        self.members.binary_search(&rank).is_ok()
    }

    /// Members other than the primary.
    pub fn backups(&self) -> impl Iterator<Item = Rank> + '_ {
        self.members.iter().copied().filter(|&r| r != self.primary)
    }

    /// Whether `voters` form a quorum of this view's members: more than half, or exactly
    /// half when the primary is among them. Any two quorums intersect (two disjoint halves
    /// cannot both contain the primary), and the primary can shrink a view down to itself
    /// one failure at a time.
    pub fn is_quorum(&self, voters: &BTreeSet<Rank>) -> bool {
        let present = self.members.iter().filter(|r| voters.contains(r)).count();
        let n = self.members.len();
        if !crate::engine::rule_on!(Quorum) {
            return present > 0;
        }
        2 * present > n || (2 * present == n && voters.contains(&self.primary))
    }
}

/// One key's stored state: the lsn of the write that produced it and its value, or `None`
/// for a tombstone (a delete keeps its lsn so state transfer can carry it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub lsn: u64,
    pub value: Option<Bytes>,
}

/// One item of a record: a storage key (user key or session key) and its new value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub key: Bytes,
    pub value: Option<Bytes>,
}

/// One sequenced write, applied atomically: the user key and the writer's session entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub lsn: u64,
    /// Epoch of the primary that sequenced it.
    pub epoch: u64,
    pub items: Vec<Item>,
}

/// One key of a state transfer: its current entry at the source, or `None` when the key does
/// not exist there at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncEntry {
    pub key: Bytes,
    pub entry: Option<Entry>,
}

/// What a member reports about its log in a promise; the new primary takes the most advanced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogState {
    pub rank: Rank,
    pub applied: u64,
    pub committed: u64,
    /// Epoch of the last record applied.
    pub last_epoch: u64,
}

impl LogState {
    /// Ordering by (last record epoch, applied): a later epoch's history wins over a longer
    /// history from a deposed primary (docs/design.md §5 step 4).
    fn key(&self) -> (u64, u64) {
        (self.last_epoch, self.applied)
    }
}

/// The most advanced of the given states (ties broken towards `prefer`, then the lowest rank).
pub fn most_advanced(states: &[LogState], prefer: Rank) -> Option<LogState> {
    states.iter().copied().max_by(|a, b| {
        a.key()
            .cmp(&b.key())
            .then_with(|| (a.rank == prefer).cmp(&(b.rank == prefer)))
            .then_with(|| b.rank.cmp(&a.rank))
    })
}

/// Storage key of a user key: user keys and session entries share one keyspace (so every
/// mechanism carries sessions with no special case) without being able to collide.
pub fn user_item(key: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(key.len() + 1);
    v.push(b'u');
    v.extend_from_slice(key);
    v.into()
}

/// Prefix of every user record's item (docs/design.md §13): the item of the key `\0a/<name>`,
/// which no namespaced client key (`<name>\0<key>`, names never empty) can be.
pub const ACCOUNT_ITEM_PREFIX: &[u8] = b"u\0a/";

/// The items of a range of user keys (docs/design.md §6 "Scans"), both bounds as given. Only
/// user items lie within it: session and other reserved items have other prefixes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemRange {
    pub start: Bound<Bytes>,
    pub end: Bound<Bytes>,
}

impl ItemRange {
    /// User keys from `from` to `to`, both inclusive; `to: None` runs to the last user key.
    pub fn keys(from: &[u8], to: Option<&[u8]>) -> ItemRange {
        ItemRange {
            start: Bound::Included(user_item(from)),
            end: match to {
                Some(to) => Bound::Included(user_item(to)),
                None => Bound::Excluded(Bytes::from_static(USER_ITEMS_END)),
            },
        }
    }

    /// Every user key that starts with `prefix`.
    pub fn prefix(prefix: &[u8]) -> ItemRange {
        let start = user_item(prefix);
        // The first item after every one starting with `start`: drop trailing 0xff bytes and
        // increment the last. `start` begins with `u`, so one is always left.
        let mut end = start.to_vec();
        while end.last() == Some(&0xff) {
            end.pop();
        }
        *end.last_mut().expect("a user item starts with `u`") += 1;
        ItemRange {
            start: Bound::Included(start),
            end: Bound::Excluded(end.into()),
        }
    }

    /// The same range, starting after user key `key`.
    pub fn after(self, key: &[u8]) -> ItemRange {
        ItemRange {
            start: Bound::Excluded(user_item(key)),
            ..self
        }
    }

    /// Whether user key `key` lies within the range.
    pub fn contains_key(&self, key: &[u8]) -> bool {
        crate::storage::within(&user_item(key), &self.start, &self.end)
    }
}

/// The first item after every user item.
const USER_ITEMS_END: &[u8] = b"v";

/// The user key of a user item; `None` for any other item.
pub fn key_of_user_item(item: &[u8]) -> Option<&[u8]> {
    item.strip_prefix(b"u")
}

/// Prefix of every session header item (docs/design.md §3, §6): `s` `h` `<hi be64>` `<lo be64>`.
pub const SESSION_HEADER_PREFIX: &[u8] = b"sh";

/// Storage key of a session's header item.
pub fn session_header_item(hi: u64, lo: u64) -> Bytes {
    let mut v = Vec::with_capacity(18);
    v.extend_from_slice(SESSION_HEADER_PREFIX);
    v.extend_from_slice(&hi.to_be_bytes());
    v.extend_from_slice(&lo.to_be_bytes());
    v.into()
}

/// The session `(hi, lo)` a header item belongs to; `None` for any other item.
pub fn session_of_header_item(item: &[u8]) -> Option<(u64, u64)> {
    let id = item.strip_prefix(SESSION_HEADER_PREFIX)?;
    if id.len() != 16 {
        return None;
    }
    let (hi, lo) = id.split_at(8);
    Some((
        u64::from_be_bytes(hi.try_into().ok()?),
        u64::from_be_bytes(lo.try_into().ok()?),
    ))
}

/// Storage key of one result slot of a session: `s` `r` `<hi be64>` `<lo be64>` `<slot be16>`.
pub fn session_result_item(hi: u64, lo: u64, slot: u16) -> Bytes {
    let mut v = Vec::with_capacity(20);
    v.extend_from_slice(b"sr");
    v.extend_from_slice(&hi.to_be_bytes());
    v.extend_from_slice(&lo.to_be_bytes());
    v.extend_from_slice(&slot.to_be_bytes());
    v.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(r: &[Rank]) -> BTreeSet<Rank> {
        r.iter().copied().collect()
    }

    #[test]
    fn quorum_is_a_majority_or_half_with_the_primary() {
        let v = View::new(3, 0, [0, 1, 2]);
        assert!(v.is_quorum(&set(&[1, 2])));
        assert!(!v.is_quorum(&set(&[2])));
        let v2 = View::new(3, 0, [0, 1]);
        assert!(v2.is_quorum(&set(&[0])), "the primary alone is half of two");
        assert!(
            !v2.is_quorum(&set(&[1])),
            "a backup alone may not take over"
        );
        let v4 = View::new(3, 1, [0, 1, 2, 3]);
        assert!(v4.is_quorum(&set(&[1, 3])));
        assert!(!v4.is_quorum(&set(&[0, 3])));
        assert!(v4.is_quorum(&set(&[0, 2, 3])));
        assert!(View::new(9, 4, [4]).is_quorum(&set(&[4])));
        assert!(!v.is_quorum(&set(&[5, 6, 7])), "non-members do not count");
    }

    #[test]
    fn any_two_quorums_intersect() {
        for n in 1..=6u32 {
            let members: Vec<Rank> = (0..n).collect();
            for primary in 0..n {
                let v = View::new(1, primary, members.clone());
                let subsets: Vec<BTreeSet<Rank>> = (0u32..(1 << n))
                    .map(|m| (0..n).filter(|i| m & (1 << i) != 0).collect())
                    .filter(|s| v.is_quorum(s))
                    .collect();
                for a in &subsets {
                    for b in &subsets {
                        assert!(a.intersection(b).next().is_some(), "{a:?} {b:?} in {v:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn most_advanced_prefers_later_epoch_over_longer_log() {
        let s = [
            LogState {
                rank: 0,
                applied: 90,
                committed: 50,
                last_epoch: 2,
            },
            LogState {
                rank: 1,
                applied: 60,
                committed: 50,
                last_epoch: 3,
            },
            LogState {
                rank: 2,
                applied: 55,
                committed: 50,
                last_epoch: 3,
            },
        ];
        assert_eq!(most_advanced(&s, 2).unwrap().rank, 1);
        let tie = [
            LogState {
                rank: 1,
                applied: 60,
                committed: 50,
                last_epoch: 3,
            },
            LogState {
                rank: 2,
                applied: 60,
                committed: 50,
                last_epoch: 3,
            },
        ];
        assert_eq!(most_advanced(&tie, 2).unwrap().rank, 2);
        assert_eq!(most_advanced(&tie, 7).unwrap().rank, 1);
    }

    #[test]
    fn key_ranges_hold_only_user_items() {
        let r = ItemRange::keys(b"b", Some(b"d"));
        assert!(r.contains_key(b"b") && r.contains_key(b"c\xff") && r.contains_key(b"d"));
        assert!(!r.contains_key(b"a") && !r.contains_key(b"d\0"));
        let all = ItemRange::keys(b"", None);
        assert!(all.contains_key(&[0xff; 8]));
        let s = session_header_item(1, 2);
        assert!(!crate::storage::within(&s, &all.start, &all.end));
        let p = ItemRange::prefix(b"ab\xff");
        assert!(p.contains_key(b"ab\xff") && p.contains_key(b"ab\xff\xff\x01"));
        assert!(!p.contains_key(b"ac") && !p.contains_key(b"ab\xfe"));
        let after = ItemRange::keys(b"a", Some(b"c")).after(b"b");
        assert!(!after.contains_key(b"b") && after.contains_key(b"b\0"));
        assert_eq!(key_of_user_item(&user_item(b"k")), Some(&b"k"[..]));
    }

    #[test]
    fn session_items_are_apart_from_user_items_and_parse_back() {
        let h = session_header_item(1, 2);
        assert_eq!(session_of_header_item(&h), Some((1, 2)));
        assert_eq!(session_of_header_item(&session_result_item(1, 2, 3)), None);
        assert_eq!(session_of_header_item(&user_item(&h)), None);
        assert_eq!(session_of_header_item(b"sh"), None);
        assert_ne!(session_header_item(1, 2), session_header_item(2, 1));
    }

    #[test]
    fn view_new_sorts_and_includes_primary() {
        let v = View::new(2, 3, [2, 1, 2]);
        assert_eq!(v.members, vec![1, 2, 3]);
        assert_eq!(v.backups().collect::<Vec<_>>(), vec![1, 2]);
    }
}
