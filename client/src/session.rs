//! Request ids for exactly-once writes (DESIGN.md §6).
//!
//! Every write gets `(client_id, seq)` once, before its first attempt, and
//! every retry reuses it, so a server that already applied it answers with the
//! recorded result instead of applying it again. `first_unfinished` tells the
//! servers which recorded results this client can no longer ask for.

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};

use replikv_proto::kv::RequestId;

/// One client's write sequence.
#[derive(Debug)]
pub(crate) struct Session {
    client_id: u64,
    /// A `std` mutex because the critical sections are a few integer
    /// operations with no `.await`. The seq counter lives under the same lock
    /// as the in-flight set: were it a separate atomic, a write could take seq
    /// n, and a second write take n + 1 and compute `first_unfinished = n + 1`
    /// before n was inserted, letting the servers forget n's result while n is
    /// still being retried.
    state: Mutex<SessionState>,
}

#[derive(Debug)]
struct SessionState {
    next_seq: u64,
    in_flight: BTreeSet<u64>,
}

/// A write in flight. Dropping it (the request finished, failed, or its
/// future was dropped) marks the seq finished.
#[derive(Debug)]
pub(crate) struct WriteTicket<'a> {
    session: &'a Session,
    id: RequestId,
}

impl Session {
    pub fn new(client_id: u64) -> Self {
        Self {
            client_id,
            state: Mutex::new(SessionState {
                next_seq: 1,
                in_flight: BTreeSet::new(),
            }),
        }
    }

    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// Assigns the next seq to a new write.
    pub fn begin(&self) -> WriteTicket<'_> {
        // A panic elsewhere while holding this lock cannot leave the state
        // inconsistent (each section is one insert or remove), so a poisoned
        // lock is still usable.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let seq = state.next_seq;
        state.next_seq += 1;
        state.in_flight.insert(seq);
        let first_unfinished = state.in_flight.first().copied().unwrap_or(seq);
        WriteTicket {
            session: self,
            id: RequestId {
                client_id: self.client_id,
                seq,
                first_unfinished,
                client_id_hi: 0,
            },
        }
    }

    /// Seqs of writes in flight now (for tests and diagnostics).
    #[cfg(test)]
    fn in_flight(&self) -> Vec<u64> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.in_flight.iter().copied().collect()
    }
}

impl WriteTicket<'_> {
    /// The id every attempt of this write carries.
    pub fn id(&self) -> RequestId {
        self.id
    }
}

impl Drop for WriteTicket<'_> {
    fn drop(&mut self) {
        let mut state = self
            .session
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.in_flight.remove(&self.id.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_start_at_one_and_grow() {
        let s = Session::new(42);
        let a = s.begin().id();
        let b = s.begin().id();
        assert_eq!((a.client_id, a.seq, a.first_unfinished), (42, 1, 1));
        assert_eq!((b.client_id, b.seq, b.first_unfinished), (42, 2, 2));
    }

    #[test]
    fn first_unfinished_is_the_oldest_write_still_in_flight() {
        let s = Session::new(7);
        let one = s.begin();
        let two = s.begin();
        assert_eq!(two.id().first_unfinished, 1);
        drop(one);
        let three = s.begin();
        assert_eq!(three.id().first_unfinished, 2);
        drop(two);
        drop(three);
        assert!(s.in_flight().is_empty());
        let four = s.begin();
        assert_eq!((four.id().seq, four.id().first_unfinished), (4, 4));
    }

    #[test]
    fn concurrent_writers_never_see_a_first_unfinished_past_their_own_seq() {
        let s = Session::new(1);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..500 {
                        let t = s.begin();
                        assert!(t.id().first_unfinished <= t.id().seq);
                    }
                });
            }
        });
        assert!(s.in_flight().is_empty());
        assert_eq!(s.begin().id().seq, 2001);
    }
}
