//! The primary sequencer's session rules (DESIGN.md §6, §10 "Sessions"; docs/protocol.md
//! "Sessions"): what a write of a session gets (applied once, answered from its recorded
//! result, or refused with no outcome), and when an idle session is collected. Reading and
//! writing the session items is the caller's.

use std::time::Duration;

use crate::session::{self, Decision, Header};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
