//! Exactly-once sessions (docs/design.md §6, §10 "Sessions"): each write carries a 128-bit
//! session id, its `seq` and the client's lowest unfinished seq; the primary records each write's
//! result, so a retried write is answered with its original result instead of being applied
//! again, and a retry whose result is no longer known is refused, never applied again.
//!
//! A session is stored as ordinary items (`types::session_header_item`,
//! `types::session_result_item`), written in the same record as the write they describe, so
//! replication, state transfer and repair carry them with no special case:
//! - a small **header**: the client's first unfinished seq, the highest seq whose result the
//!   server had to forget, the primary's wall-clock time of the session's last write, and the
//!   seqs whose results are recorded;
//! - one **result item** per recorded seq (its lsn and the old value it returned), in one of
//!   [`MAX_RESULTS`] slots, so a session never has more than `MAX_RESULTS + 1` items however
//!   many writes it makes. A new result takes the lowest slot no unfinished result holds, so
//!   a client with one write at a time writes one slot over and over (the store takes a key
//!   written again within its apply window once).
//!
//! A write record therefore carries that write's result and the small header only; results
//! the client declared finished are deleted in the same record as the write that declared it.
//! The rules here are pure: the sequencer (`replica/write.rs`) loads headers, applies the decisions and
//! writes the items.

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// A client session: 128 bits drawn by the client (`client_id_hi:client_id`). `(0, 0)` means
/// the write asks for no exactly-once protection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId {
    pub hi: u64,
    pub lo: u64,
}

impl SessionId {
    /// The session of a request, `None` for the "no session" id `(0, 0)`.
    pub fn new(hi: u64, lo: u64) -> Option<SessionId> {
        (hi != 0 || lo != 0).then_some(SessionId { hi, lo })
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}{:016x}", self.hi, self.lo)
    }
}

/// The result of one write: the value it replaced, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteResult {
    pub old: Option<Bytes>,
}

/// The result of any sequenced operation, as a session records it for retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    /// A put or delete.
    Write(WriteResult),
    /// A compare-and-swap: whether it wrote, and the value before it (on a mismatch, the
    /// value that did not match).
    Cas {
        swapped: bool,
        current: Option<Bytes>,
    },
    /// A range delete: the keys it removed, and whether keys of the range remain.
    DeleteRange { removed: u64, more: bool },
}

impl OpResult {
    fn value_len(&self) -> usize {
        match self {
            OpResult::Write(WriteResult { old }) | OpResult::Cas { current: old, .. } => {
                1 + old.as_ref().map_or(0, Bytes::len)
            }
            OpResult::DeleteRange { .. } => 9,
        }
    }
}

/// Most results one session keeps. When a new result finds every slot held by an
/// unfinished one (the client has more than `MAX_RESULTS` writes unfinished), the oldest
/// result is forgotten, its slot reused, and it is remembered as
/// forgotten: a retry of it is refused, never applied again.
pub const MAX_RESULTS: u64 = 1024;

/// A session's header item.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Results of seqs below this were deleted: the client declared them finished.
    pub first_unfinished: u64,
    /// Highest seq whose result was forgotten to keep the session bounded (0: none).
    pub forgotten: u64,
    /// The primary's wall-clock time (ms since the Unix epoch) of the session's last write.
    pub last_used_ms: u64,
    /// Seqs whose result item is stored, and the slot each is in (one seq per slot).
    pub recorded: BTreeMap<u64, u16>,
    /// Slots `0..slots_used` may hold results (written once, overwritten since).
    pub slots_used: u16,
}

/// What to do with an incoming write of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Apply it and record its result.
    New,
    /// Already applied: answer with its recorded result (its result item).
    Duplicate,
    /// The client declared this seq finished and its result was deleted. Refused: this cannot
    /// be a genuine retry, and its outcome is no longer known.
    Retired,
    /// Its result was forgotten (more than `MAX_RESULTS` unfinished). Refused: it may have
    /// been applied.
    Forgotten,
    /// The session has no header although the client says earlier writes of it finished: it
    /// expired and was collected (or never reached the servers). Refused.
    Expired,
}

/// Decides what to do with write `seq` of a session whose stored header is `header`, from a
/// client whose lowest unfinished seq is `first_unfinished`.
///
/// A session without a header is new as long as the client has finished none of its writes
/// (`first_unfinished <= 1`), whatever `seq`: a new client's first writes may arrive in any
/// order, so seq 5 can come before seq 1. Once the client reports a finished write, a missing
/// header means the session expired (or none of its writes ever reached the sequencer): its
/// results are gone, so the write is refused rather than risk applying a retry twice.
pub fn decide(header: Option<&Header>, seq: u64, first_unfinished: u64) -> Decision {
    match header {
        None if first_unfinished > 1 => Decision::Expired,
        None => Decision::New,
        Some(h) if h.recorded.contains_key(&seq) => Decision::Duplicate,
        Some(h) if seq < h.first_unfinished => Decision::Retired,
        Some(h) if seq <= h.forgotten => Decision::Forgotten,
        Some(_) => Decision::New,
    }
}

impl Header {
    /// Records new write `seq` at `now_ms`; returns the seqs the client declared finished,
    /// which leave the header. Their result items stay in their slots until a later seq
    /// overwrites them (a stored result names its seq), or the session is collected
    /// ([`Header::used_slots`]).
    pub fn record(&mut self, seq: u64, first_unfinished: u64, now_ms: u64) -> Vec<u64> {
        // A client never declares the write it is making finished; a bogus first_unfinished
        // above seq must not erase the result being recorded.
        self.first_unfinished = self.first_unfinished.max(first_unfinished.min(seq));
        let keep = self.recorded.split_off(&self.first_unfinished);
        let finished = std::mem::replace(&mut self.recorded, keep);
        let mine = if self.recorded.len() as u64 >= MAX_RESULTS {
            let (older, slot) = self.recorded.pop_first().expect("MAX_RESULTS > 0");
            self.forgotten = self.forgotten.max(older);
            slot
        } else {
            let mut held: Vec<u16> = self.recorded.values().copied().collect();
            held.sort_unstable();
            held.iter()
                .enumerate()
                .find(|&(i, &s)| usize::from(s) != i)
                .map_or(held.len(), |(i, _)| i) as u16
        };
        self.recorded.insert(seq, mine);
        self.slots_used = self.slots_used.max(mine + 1);
        self.last_used_ms = self.last_used_ms.max(now_ms);
        finished.into_keys().collect()
    }

    /// The slot holding the result of recorded `seq`.
    pub fn slot_of(&self, seq: u64) -> Option<u16> {
        self.recorded.get(&seq).copied()
    }

    /// The result slots this session may have written: one per seq it has seen, at most
    /// [`MAX_RESULTS`]. Finished results stay in their slots until a later seq reuses them.
    pub fn used_slots(&self) -> impl Iterator<Item = u16> {
        0..self.slots_used
    }

    /// Whether the session has had no write for longer than `ttl_ms` at `now_ms`.
    pub fn idle(&self, now_ms: u64, ttl_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_used_ms) > ttl_ms
    }

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(31 + 10 * self.recorded.len());
        b.put_u8(HEADER_VERSION);
        b.put_u64(self.first_unfinished);
        b.put_u64(self.forgotten);
        b.put_u64(self.last_used_ms);
        b.put_u16(self.slots_used);
        b.put_u32(self.recorded.len() as u32);
        for (seq, slot) in &self.recorded {
            b.put_u64(*seq);
            b.put_u16(*slot);
        }
        b.freeze()
    }

    /// Decodes a header; `None` if it is corrupt.
    pub fn decode(mut b: Bytes) -> Option<Header> {
        if b.remaining() < 31 || b.get_u8() != HEADER_VERSION {
            return None;
        }
        let mut h = Header {
            first_unfinished: b.get_u64(),
            forgotten: b.get_u64(),
            last_used_ms: b.get_u64(),
            slots_used: b.get_u16(),
            recorded: BTreeMap::new(),
        };
        let n = b.get_u32() as usize;
        if n as u64 > MAX_RESULTS
            || u64::from(h.slots_used) > MAX_RESULTS
            || b.remaining() != 10 * n
        {
            return None;
        }
        for _ in 0..n {
            let (seq, slot) = (b.get_u64(), b.get_u16());
            if slot >= h.slots_used {
                return None;
            }
            h.recorded.insert(seq, slot);
        }
        Some(h)
    }
}

const HEADER_VERSION: u8 = 2;

/// The content of a result item: which seq it answers, the lsn of that write, its result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResult {
    pub seq: u64,
    pub lsn: u64,
    pub result: OpResult,
}

impl StoredResult {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(17 + self.result.value_len());
        b.put_u64(self.seq);
        b.put_u64(self.lsn);
        match &self.result {
            OpResult::Write(WriteResult { old: Some(v) }) => {
                b.put_u8(1);
                b.put_slice(v);
            }
            OpResult::Write(WriteResult { old: None }) => b.put_u8(0),
            OpResult::Cas { swapped, current } => {
                b.put_u8(2);
                b.put_u8(u8::from(*swapped) | (u8::from(current.is_some()) << 1));
                if let Some(v) = current {
                    b.put_slice(v);
                }
            }
            OpResult::DeleteRange { removed, more } => {
                b.put_u8(3);
                b.put_u64(*removed);
                b.put_u8(u8::from(*more));
            }
        }
        b.freeze()
    }

    /// Decodes a result item; `None` if it is corrupt.
    pub fn decode(mut b: Bytes) -> Option<StoredResult> {
        if b.remaining() < 17 {
            return None;
        }
        let seq = b.get_u64();
        let lsn = b.get_u64();
        let result = match b.get_u8() {
            0 if b.is_empty() => OpResult::Write(WriteResult { old: None }),
            1 => OpResult::Write(WriteResult { old: Some(b) }),
            2 if b.remaining() >= 1 => {
                let flags = b.get_u8();
                let current = match flags >> 1 {
                    0 if b.is_empty() => None,
                    1 => Some(b),
                    _ => return None,
                };
                OpResult::Cas {
                    swapped: flags & 1 == 1,
                    current,
                }
            }
            3 if b.remaining() == 9 => {
                let removed = b.get_u64();
                let more = match b.get_u8() {
                    0 => false,
                    1 => true,
                    _ => return None,
                };
                OpResult::DeleteRange { removed, more }
            }
            _ => return None,
        };
        Some(StoredResult { seq, lsn, result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(first_unfinished: u64, forgotten: u64, recorded: &[u64]) -> Header {
        Header {
            first_unfinished,
            forgotten,
            last_used_ms: 0,
            recorded: recorded.iter().zip(0..).map(|(&s, i)| (s, i)).collect(),
            slots_used: recorded.len() as u16,
        }
    }

    #[test]
    fn zero_is_no_session_and_the_high_half_counts() {
        assert_eq!(SessionId::new(0, 0), None);
        assert_ne!(SessionId::new(1, 5), SessionId::new(2, 5));
        assert!(SessionId::new(0, 5).is_some() && SessionId::new(5, 0).is_some());
    }

    #[test]
    fn a_new_session_takes_its_first_writes_in_any_order() {
        assert_eq!(decide(None, 1, 1), Decision::New);
        // Seq 5 of a brand-new client may overtake its seq 1.
        assert_eq!(decide(None, 5, 1), Decision::New);
        assert_eq!(decide(None, 1, 0), Decision::New);
        let mut h = Header::default();
        assert_eq!(h.record(5, 1, 10), Vec::<u64>::new());
        assert_eq!(decide(Some(&h), 1, 1), Decision::New);
        assert_eq!(decide(Some(&h), 5, 1), Decision::Duplicate);
    }

    #[test]
    fn a_session_without_header_after_finished_writes_expired() {
        assert_eq!(decide(None, 7, 7), Decision::Expired);
        assert_eq!(decide(None, 2, 2), Decision::Expired);
        assert_eq!(decide(None, 9, 3), Decision::Expired);
    }

    #[test]
    fn a_client_with_one_write_at_a_time_reuses_one_slot() {
        let mut h = Header::default();
        assert_eq!(h.used_slots().count(), 0);
        for seq in 1..=100 {
            h.record(seq, seq, 0);
            assert_eq!(h.slot_of(seq), Some(0));
        }
        assert_eq!(h.used_slots().collect::<Vec<_>>(), vec![0]);
        // Three in flight take three slots; a finished one frees its slot for the next.
        h.record(101, 101, 0);
        h.record(102, 101, 0);
        h.record(103, 101, 0);
        assert_eq!(
            (h.slot_of(101), h.slot_of(102), h.slot_of(103)),
            (Some(0), Some(1), Some(2))
        );
        h.record(104, 102, 0);
        assert_eq!(h.slot_of(104), Some(0));
        assert_eq!(h.used_slots().count(), 3);
    }

    #[test]
    fn encoding_keeps_the_slots() {
        let mut h = Header::default();
        h.record(7, 5, 1);
        h.record(5, 5, 2);
        assert_eq!(Header::decode(h.encode()), Some(h.clone()));
        let mut bad = h.encode().to_vec();
        let n = bad.len();
        bad[n - 1] = 200; // a slot past slots_used
        assert_eq!(Header::decode(bad.into()), None);
    }

    #[test]
    fn retry_is_a_duplicate_until_declared_finished_then_retired() {
        let mut h = Header::default();
        assert!(h.record(1, 1, 10).is_empty());
        assert_eq!(decide(Some(&h), 1, 1), Decision::Duplicate);
        assert_eq!(decide(Some(&h), 2, 2), Decision::New);
        // The write of seq 2 declares seq 1 finished: its result is deleted with it.
        assert_eq!(h.record(2, 2, 11), vec![1]);
        assert_eq!(decide(Some(&h), 1, 1), Decision::Retired);
        assert_eq!(decide(Some(&h), 2, 2), Decision::Duplicate);
        assert_eq!(h.recorded.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(h.first_unfinished, 2);
    }

    #[test]
    fn concurrent_seqs_are_all_kept_until_finished() {
        let mut h = Header::default();
        // The client has 5..=8 in flight; they complete out of order.
        assert!(h.record(7, 5, 1).is_empty());
        assert!(h.record(5, 5, 2).is_empty());
        assert_eq!(h.record(8, 6, 3), vec![5]);
        assert_eq!(decide(Some(&h), 7, 6), Decision::Duplicate);
        assert_eq!(decide(Some(&h), 5, 6), Decision::Retired);
        assert_eq!(decide(Some(&h), 6, 6), Decision::New);
    }

    #[test]
    fn first_unfinished_never_passes_the_recorded_seq() {
        let mut h = Header::default();
        h.record(4, 100, 1);
        assert_eq!(decide(Some(&h), 4, 100), Decision::Duplicate);
        assert_eq!(h.first_unfinished, 4);
    }

    #[test]
    fn beyond_max_results_the_oldest_are_forgotten_never_new() {
        let mut h = Header::default();
        // Seq 1 stays unfinished while 10 000 later writes are made.
        for seq in 1..=10_001 {
            assert_eq!(decide(Some(&h), seq, 1), Decision::New, "seq {seq}");
            assert!(h.record(seq, 1, seq).is_empty());
            assert!(h.recorded.len() as u64 <= MAX_RESULTS);
        }
        assert_eq!(h.recorded.len() as u64, MAX_RESULTS);
        assert_eq!(decide(Some(&h), 1, 1), Decision::Forgotten);
        assert_eq!(
            decide(Some(&h), 10_001 - MAX_RESULTS, 1),
            Decision::Forgotten
        );
        assert_eq!(h.forgotten, 10_001 - MAX_RESULTS);
        for seq in 10_002 - MAX_RESULTS..=10_001 {
            assert_eq!(decide(Some(&h), seq, 1), Decision::Duplicate, "seq {seq}");
        }
        assert_eq!(decide(Some(&h), 10_002, 1), Decision::New);
        // Declaring everything up to 9 000 finished drops exactly the recorded ones.
        let finished = h.record(10_002, 9_000, 1);
        assert_eq!(finished, (10_002 - MAX_RESULTS..9_000).collect::<Vec<_>>());
        assert!(h.slot_of(10_002).is_some());
        assert_eq!(decide(Some(&h), 1, 9_000), Decision::Retired);
        assert_eq!(decide(Some(&h), 8_999, 9_000), Decision::Retired);
    }

    #[test]
    fn forgotten_is_only_the_slot_owner_below_the_mark() {
        let h = header(1, 1_030, &[3, 1_031]);
        assert_eq!(decide(Some(&h), 3, 1), Decision::Duplicate);
        assert_eq!(decide(Some(&h), 1_030, 1), Decision::Forgotten);
        assert_eq!(decide(Some(&h), 4, 1), Decision::Forgotten);
        assert_eq!(decide(Some(&h), 1_032, 1), Decision::New);
    }

    #[test]
    fn idle_sessions_expire_after_the_ttl() {
        let mut h = Header::default();
        h.record(1, 1, 10_000);
        assert!(!h.idle(10_000, 2_000));
        assert!(!h.idle(12_000, 2_000));
        assert!(h.idle(12_001, 2_000));
        // A clock that went back never makes a session look idle, nor moves last use back.
        assert!(!h.idle(5_000, 2_000));
        h.record(2, 2, 9_000);
        assert_eq!(h.last_used_ms, 10_000);
    }

    #[test]
    fn encodings_round_trip_and_reject_garbage() {
        let mut h = header(3, 2, &[3, 5, 1_000]);
        h.last_used_ms = 77;
        assert_eq!(Header::decode(h.encode()), Some(h.clone()));
        assert_eq!(
            Header::decode(Header::default().encode()),
            Some(Header::default())
        );
        let enc = h.encode();
        assert_eq!(Header::decode(enc.slice(..enc.len() - 1)), None);
        assert_eq!(Header::decode(Bytes::from_static(b"short")), None);
        let mut wrong_version = enc.to_vec();
        wrong_version[0] = 9;
        assert_eq!(Header::decode(wrong_version.into()), None);

        for old in [
            None,
            Some(Bytes::from_static(b"")),
            Some(Bytes::from_static(b"x")),
        ] {
            let r = StoredResult {
                seq: 4,
                lsn: 9,
                result: OpResult::Write(WriteResult { old }),
            };
            assert_eq!(StoredResult::decode(r.encode()), Some(r));
        }
        for result in [
            OpResult::Cas {
                swapped: true,
                current: Some(Bytes::from_static(b"was")),
            },
            OpResult::Cas {
                swapped: false,
                current: None,
            },
            OpResult::Cas {
                swapped: false,
                current: Some(Bytes::new()),
            },
            OpResult::DeleteRange {
                removed: 10_000,
                more: true,
            },
            OpResult::DeleteRange {
                removed: 0,
                more: false,
            },
        ] {
            let r = StoredResult {
                seq: 7,
                lsn: 3,
                result,
            };
            assert_eq!(StoredResult::decode(r.encode()), Some(r));
        }
        let mut bad = BytesMut::new();
        bad.put_u64(1);
        bad.put_u64(1);
        bad.put_u8(2);
        assert_eq!(StoredResult::decode(bad.freeze()), None);
        assert_eq!(StoredResult::decode(Bytes::from_static(b"tiny")), None);
    }

    #[test]
    fn a_record_carries_one_result_not_the_session() {
        // 64 writers of 1 MiB on one session: the header stays small however many results
        // (and however large their old values) the session holds.
        let mut h = Header::default();
        for seq in 1..=64 {
            h.record(seq, 1, 1);
        }
        assert!(h.encode().len() <= 31 + 64 * 10);
    }
}
