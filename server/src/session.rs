//! Exactly-once sessions (DESIGN.md §6): each write carries `(client_id, seq)` and the client's
//! lowest unfinished seq; the session entry keeps the result of every seq at or above it, so a
//! retried write is answered with its original result instead of being applied again.
//!
//! A session entry is an ordinary stored item (`types::session_item`), written in the same
//! record as the write it describes; replication, state transfer and repair carry it.

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The result of one write: the value it replaced, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteResult {
    pub old: Option<Bytes>,
}

/// A recorded result and the lsn of the write that produced it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub lsn: u64,
    pub result: WriteResult,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Session {
    /// Results for seqs below this were forgotten: the client promised not to retry them.
    pub first_unfinished: u64,
    pub results: BTreeMap<u64, Recorded>,
}

/// What to do with an incoming write.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Apply it.
    New,
    /// Already applied: answer with this (once its lsn is committed).
    Duplicate(Recorded),
    /// The client declared this seq finished; a request for it cannot be a genuine retry.
    Retired,
}

/// Most results one session keeps; a client with more writes in flight than this loses
/// exactly-once protection for the oldest of them rather than growing the entry without bound.
pub const MAX_RESULTS: usize = 1024;

impl Session {
    pub fn decide(&self, seq: u64) -> Decision {
        if let Some(r) = self.results.get(&seq) {
            Decision::Duplicate(r.clone())
        } else if seq < self.first_unfinished {
            Decision::Retired
        } else {
            Decision::New
        }
    }

    /// Records the result of `seq` and forgets results the client no longer needs.
    pub fn record(&mut self, seq: u64, first_unfinished: u64, recorded: Recorded) {
        self.first_unfinished = self.first_unfinished.max(first_unfinished.min(seq));
        let keep = self.first_unfinished;
        self.results.retain(|&s, _| s >= keep);
        self.results.insert(seq, recorded);
        while self.results.len() > MAX_RESULTS {
            self.results.pop_first();
        }
    }

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(16 + self.results.len() * 32);
        b.put_u64(self.first_unfinished);
        b.put_u32(self.results.len() as u32);
        for (seq, r) in &self.results {
            b.put_u64(*seq);
            b.put_u64(r.lsn);
            match &r.result.old {
                Some(v) => {
                    b.put_u8(1);
                    b.put_u32(v.len() as u32);
                    b.put_slice(v);
                }
                None => b.put_u8(0),
            }
        }
        b.freeze()
    }

    /// Decodes an entry; `None` if it is corrupt.
    pub fn decode(mut b: Bytes) -> Option<Session> {
        let mut s = Session::default();
        if b.remaining() < 12 {
            return None;
        }
        s.first_unfinished = b.get_u64();
        let n = b.get_u32();
        for _ in 0..n {
            if b.remaining() < 17 {
                return None;
            }
            let seq = b.get_u64();
            let lsn = b.get_u64();
            let old = match b.get_u8() {
                0 => None,
                1 => {
                    if b.remaining() < 4 {
                        return None;
                    }
                    let len = b.get_u32() as usize;
                    if b.remaining() < len {
                        return None;
                    }
                    Some(b.split_to(len))
                }
                _ => return None,
            };
            s.results.insert(
                seq,
                Recorded {
                    lsn,
                    result: WriteResult { old },
                },
            );
        }
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(lsn: u64, old: Option<&str>) -> Recorded {
        Recorded {
            lsn,
            result: WriteResult {
                old: old.map(|s| Bytes::copy_from_slice(s.as_bytes())),
            },
        }
    }

    #[test]
    fn retry_is_a_duplicate_with_the_original_result() {
        let mut s = Session::default();
        assert_eq!(s.decide(1), Decision::New);
        s.record(1, 1, rec(10, Some("old")));
        assert_eq!(s.decide(1), Decision::Duplicate(rec(10, Some("old"))));
        assert_eq!(s.decide(2), Decision::New);
    }

    #[test]
    fn finished_seqs_are_forgotten_and_retired() {
        let mut s = Session::default();
        s.record(1, 1, rec(10, None));
        s.record(2, 1, rec(11, None));
        s.record(3, 3, rec(12, None));
        assert_eq!(s.results.keys().copied().collect::<Vec<_>>(), vec![3]);
        assert_eq!(s.decide(1), Decision::Retired);
        assert_eq!(s.decide(3), Decision::Duplicate(rec(12, None)));
    }

    #[test]
    fn concurrent_seqs_are_all_kept() {
        let mut s = Session::default();
        // Client has 5..=8 in flight; they complete out of order.
        s.record(7, 5, rec(1, None));
        s.record(5, 5, rec(2, Some("a")));
        s.record(8, 6, rec(3, None));
        assert_eq!(s.decide(7), Decision::Duplicate(rec(1, None)));
        assert_eq!(s.decide(5), Decision::Retired);
        assert_eq!(s.decide(6), Decision::New);
    }

    #[test]
    fn first_unfinished_never_passes_the_recorded_seq() {
        let mut s = Session::default();
        // A bogus first_unfinished above seq must not erase the result being recorded.
        s.record(4, 100, rec(9, None));
        assert_eq!(s.decide(4), Decision::Duplicate(rec(9, None)));
    }

    #[test]
    fn encoding_round_trips_and_rejects_garbage() {
        let mut s = Session::default();
        s.record(3, 2, rec(5, Some("x")));
        s.record(4, 2, rec(6, None));
        assert_eq!(Session::decode(s.encode()), Some(s));
        assert_eq!(Session::decode(Bytes::from_static(b"short")), None);
        let mut bad = BytesMut::new();
        bad.put_u64(0);
        bad.put_u32(1);
        bad.put_u64(1);
        bad.put_u64(1);
        bad.put_u8(1);
        bad.put_u32(1000);
        assert_eq!(Session::decode(bad.freeze()), None);
    }
}
