//! The primary sequencer's session rules (docs/design.md §6, §10 "Sessions"; docs/protocol.md
//! "Sessions"): what a write of a session gets (applied once, answered from its recorded
//! result, or refused with no outcome), and when an idle session is collected. Reading and
//! writing the session items is the caller's.

use std::time::Duration;

use bytes::Bytes;

use super::State;
use crate::session::{self, Decision, Header};
use crate::types::Rank;

/// Where a client write goes on the server it reached (§4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// This server is the primary: sequence it here.
    Sequence,
    /// Forward it to the primary of this server's view.
    Forward(Rank),
    /// This server is named primary by a view it has not (re)installed (a restart, or a view
    /// change in progress): the client tries elsewhere.
    Recovering,
    /// Not part of a cluster yet: there is no primary to forward to (§10). Nothing was sent
    /// anywhere, so the client may try another server.
    NoCluster,
}

/// Routes a client write on server `me`; `in_cluster` says whether it has found its cluster.
pub fn route(st: &State, me: Rank, in_cluster: bool) -> Route {
    if st.primary.is_some() {
        Route::Sequence
    } else if st.view.primary == me {
        Route::Recovering
    } else if !in_cluster {
        Route::NoCluster
    } else {
        Route::Forward(st.view.primary)
    }
}

/// What the sequencer does with one write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Apply it (and record its result, for a write of a session).
    Apply,
    /// Already applied: answer with the result recorded in this slot.
    Duplicate { slot: Option<u16> },
    /// Refused: this request applies nothing, and its earlier attempt's outcome is unknown
    /// (`Retired`, `Forgotten`) or its session is gone (`Expired`).
    Refuse(Decision),
}

/// Why a write of a session is malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a write with a session id needs a seq of at least 1")]
pub struct SeqZero;

/// Admits write `seq` of a session whose stored header is `header` (loaded by the caller),
/// from a client whose lowest unfinished seq is `first_unfinished` (see [`session::decide`]
/// for the rules). A write is never applied twice and never answered as a success it was not.
pub fn admit(
    header: Option<&Header>,
    seq: u64,
    first_unfinished: u64,
) -> Result<Admission, SeqZero> {
    if seq == 0 {
        return Err(SeqZero);
    }
    if !super::rule_on!(SessionDedup) {
        return Ok(Admission::Apply);
    }
    Ok(match session::decide(header, seq, first_unfinished) {
        Decision::New => Admission::Apply,
        Decision::Duplicate => Admission::Duplicate {
            slot: header.and_then(|h| h.slot_of(seq)),
        },
        refused => Admission::Refuse(refused),
    })
}

/// Whether a session found idle is still to be collected when its expiry record is built:
/// the sequencer checks the header again, so a session used since it was found stays.
pub fn still_idle(header: Option<&Header>, now_ms: u64, ttl_ms: u64) -> bool {
    header.is_some_and(|h| h.idle(now_ms, ttl_ms))
}

/// How often the collector looks for idle sessions: a quarter of the TTL, between 100 ms
/// and 5 minutes, so a session is collected within TTL plus one period of its last write.
pub fn collector_period(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(300))
}

/// What a compare-and-swap expects of its key's current value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key does not exist.
    Absent,
    /// The key holds exactly this value.
    Value(Bytes),
}

/// Whether a compare-and-swap applies, decided by the sequencer on the key's value as of
/// every write sequenced before it (docs/design.md §6 "Compare-and-swap"): the decision and
/// the write are one step, so no write can come between them.
pub fn cas_holds(expect: &Expect, current: Option<&Bytes>) -> bool {
    match (expect, current) {
        (Expect::Absent, None) => true,
        (Expect::Value(want), Some(have)) => want == have,
        _ => false,
    }
}

/// Most keys one range delete removes (docs/protocol.md "Range deletes").
pub const MAX_RANGE_DELETE_KEYS: usize = 10_000;
/// Most key bytes one range delete's record carries: with 1 KiB keys, 10 000 keys would
/// make a 10 MiB record, which every member must take in one append.
pub const MAX_RANGE_DELETE_BYTES: usize = 4 << 20;

/// The keys a range delete removes: the first of `live` (the range's keys that hold a value,
/// in key order) up to `limit` keys and [`MAX_RANGE_DELETE_BYTES`], and whether keys of the
/// range remain after them (`more_after` says whether `live` stops short of the range's end).
pub fn range_delete_victims(
    live: impl IntoIterator<Item = Bytes>,
    limit: usize,
    more_after: bool,
) -> (Vec<Bytes>, bool) {
    let limit = limit.min(MAX_RANGE_DELETE_KEYS);
    let mut victims = Vec::new();
    let mut bytes = 0usize;
    for item in live {
        if victims.len() == limit || bytes + item.len() > MAX_RANGE_DELETE_BYTES {
            return (victims, true);
        }
        bytes += item.len();
        victims.push(item);
    }
    (victims, more_after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::*;
    use crate::types::View;

    #[test]
    fn a_write_is_sequenced_by_the_primary_and_forwarded_by_anyone_else() {
        let v = View::new(3, 0, [0, 1, 2]);
        assert_eq!(
            route(&primary(v.clone(), 0, ms(0)), 0, true),
            Route::Sequence
        );
        assert_eq!(route(&member(v.clone(), 0), 1, true), Route::Forward(0));
        let mut joining = member(v.clone(), 0);
        joining.member = false;
        assert_eq!(
            route(&joining, 4, true),
            Route::Forward(0),
            "a non-member forwards too"
        );
        assert_eq!(route(&joining, 4, false), Route::NoCluster);
        assert_eq!(route(&member(v, 0), 0, true), Route::Recovering);
    }

    fn header_with(seqs: &[u64], first_unfinished: u64, now_ms: u64) -> Header {
        let mut h = Header::default();
        for &s in seqs {
            h.record(s, first_unfinished, now_ms);
        }
        h
    }

    #[test]
    fn a_write_is_applied_once_and_its_retry_answered_from_its_slot() {
        assert_eq!(admit(None, 1, 1), Ok(Admission::Apply));
        let h = header_with(&[1, 2], 1, 0);
        assert_eq!(
            admit(Some(&h), 2, 1),
            Ok(Admission::Duplicate { slot: h.slot_of(2) })
        );
        assert!(h.slot_of(2).is_some());
        assert_eq!(admit(Some(&h), 3, 1), Ok(Admission::Apply));
    }

    #[test]
    fn seq_zero_is_malformed() {
        assert_eq!(admit(None, 0, 0), Err(SeqZero));
    }

    #[test]
    fn new_writes_of_a_new_client_arrive_in_any_order() {
        assert_eq!(admit(None, 5, 1), Ok(Admission::Apply));
        assert_eq!(admit(None, 5, 0), Ok(Admission::Apply));
    }

    #[test]
    fn a_session_without_a_header_after_finished_writes_expired() {
        assert_eq!(admit(None, 7, 2), Ok(Admission::Refuse(Decision::Expired)));
    }

    #[test]
    fn a_finished_or_forgotten_seq_is_refused_as_result_unknown() {
        let h = header_with(&[5, 6], 5, 0);
        assert_eq!(
            admit(Some(&h), 4, 5),
            Ok(Admission::Refuse(Decision::Retired))
        );
        let mut f = h.clone();
        f.forgotten = 7;
        assert_eq!(
            admit(Some(&f), 7, 5),
            Ok(Admission::Refuse(Decision::Forgotten))
        );
    }

    #[test]
    fn a_session_used_since_it_was_found_idle_stays() {
        let ttl = 1000;
        let h = header_with(&[1], 1, 5000);
        assert!(still_idle(Some(&h), 6001, ttl));
        assert!(!still_idle(Some(&h), 5500, ttl));
        assert!(!still_idle(None, 99_999, ttl), "nothing left to collect");
    }

    #[test]
    fn the_collector_runs_four_times_per_ttl_within_bounds() {
        assert_eq!(
            collector_period(Duration::from_secs(3600)),
            Duration::from_secs(300)
        );
        assert_eq!(
            collector_period(Duration::from_secs(4)),
            Duration::from_secs(1)
        );
        assert_eq!(
            collector_period(Duration::from_millis(10)),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn a_cas_applies_only_on_the_value_it_expects() {
        let v = |s: &'static str| Bytes::from_static(s.as_bytes());
        assert!(cas_holds(&Expect::Absent, None));
        assert!(!cas_holds(&Expect::Absent, Some(&v("x"))));
        assert!(cas_holds(&Expect::Value(v("x")), Some(&v("x"))));
        assert!(!cas_holds(&Expect::Value(v("x")), Some(&v("y"))));
        assert!(!cas_holds(&Expect::Value(v("x")), None));
        assert!(
            !cas_holds(&Expect::Value(v("")), None),
            "an empty value is not an absent key"
        );
        assert!(cas_holds(&Expect::Value(v("")), Some(&v(""))));
    }

    #[test]
    fn a_range_delete_stops_at_its_limit_and_says_more_remain() {
        let keys = |n: usize| (0..n).map(|i| Bytes::from(format!("k{i:05}")));
        let (v, more) = range_delete_victims(keys(3), 10, false);
        assert_eq!((v.len(), more), (3, false));
        let (v, more) = range_delete_victims(keys(3), 10, true);
        assert_eq!(
            (v.len(), more),
            (3, true),
            "the scan stopped short of the end"
        );
        let (v, more) = range_delete_victims(keys(11), 10, false);
        assert_eq!((v.len(), more), (10, true));
        assert_eq!(v[9], Bytes::from("k00009"), "the first keys, in order");
        let (v, more) = range_delete_victims(keys(20_000), usize::MAX, false);
        assert_eq!((v.len(), more), (MAX_RANGE_DELETE_KEYS, true));
        let big = (0..10).map(|i| Bytes::from(vec![i as u8; MAX_RANGE_DELETE_BYTES / 4]));
        let (v, more) = range_delete_victims(big, 100, false);
        assert_eq!((v.len(), more), (4, true), "the record's size is bounded");
    }
}
