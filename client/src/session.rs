//! Session ids and request ids for exactly-once writes (docs/design.md §6, §10).
//!
//! Every write gets `(client_id, seq)` once, before its first attempt, and
//! every retry reuses it, so a server that already applied it answers with the
//! recorded result instead of applying it again. `first_unfinished` tells the
//! servers which recorded results this client can no longer ask for.
//!
//! The session id is 128 bits drawn from the operating system for each session
//! ([`random_session_id`]). Two sessions that shared an id would have their
//! writes taken for retries of each other's and answered with each other's
//! recorded results: acknowledged but never applied. A userspace generator
//! cannot promise distinct ids, because `fork` copies its state into every
//! child, which then draws the same numbers as its siblings.

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};

use replikv_proto::kv::RequestId;

/// A fresh session id: 128 bits from the operating system's random source
/// (`getrandom(2)` on Linux), read anew on every call, so that processes,
/// forked children and restarts never share one (two of 2^128 meet with
/// negligible probability).
///
/// Both 64-bit halves are non-zero: an unset proto3 field reads as 0, and a
/// server that looks only at the low half (`client_id`) takes 0 there for a
/// write without a session.
pub fn random_session_id() -> Result<u128, getrandom::Error> {
    loop {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        let id = u128::from_le_bytes(bytes);
        if low_half(id) != 0 && high_half(id) != 0 {
            return Ok(id);
        }
    }
}

/// The `client_id` field of a session id.
pub(crate) fn low_half(id: u128) -> u64 {
    id as u64
}

/// The `client_id_hi` field of a session id.
pub(crate) fn high_half(id: u128) -> u64 {
    (id >> 64) as u64
}

/// One client's write sequence.
#[derive(Debug)]
pub(crate) struct Session {
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
    /// Replaced by [`Session::renew`] when the servers no longer hold the session.
    client_id: u128,
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
    pub fn new(client_id: u128) -> Self {
        Self {
            state: Mutex::new(SessionState {
                client_id,
                next_seq: 1,
                in_flight: BTreeSet::new(),
            }),
        }
    }

    pub fn client_id(&self) -> u128 {
        self.lock().client_id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SessionState> {
        // A panic elsewhere while holding this lock cannot leave the state
        // inconsistent (each section is a few assignments), so a poisoned lock
        // is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts over under the session id `fresh`, after the servers answered that they
    /// hold no state of the current one (it expired, docs/design.md §10). Writes still in flight
    /// keep their ids; their tickets no longer touch the new session's seqs.
    pub fn renew(&self, fresh: u128) {
        let mut state = self.lock();
        state.client_id = fresh;
        state.next_seq = 1;
        state.in_flight.clear();
    }

    /// Assigns the next seq to a new write.
    pub fn begin(&self) -> WriteTicket<'_> {
        let mut state = self.lock();
        let seq = state.next_seq;
        state.next_seq += 1;
        state.in_flight.insert(seq);
        let first_unfinished = state.in_flight.first().copied().unwrap_or(seq);
        WriteTicket {
            session: self,
            id: RequestId {
                client_id: low_half(state.client_id),
                client_id_hi: high_half(state.client_id),
                seq,
                first_unfinished,
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
        let mut state = self.session.lock();
        let id = u128::from(self.id.client_id_hi) << 64 | u128::from(self.id.client_id);
        // A ticket of a session since renewed must not finish a seq of the new one.
        if state.client_id == id {
            state.in_flight.remove(&self.id.seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewed_session_starts_over_and_old_tickets_leave_it_alone() {
        let s = Session::new(1 << 64 | 5);
        let old = s.begin();
        let _old2 = s.begin();
        s.renew(2 << 64 | 9);
        let fresh = s.begin();
        assert_eq!(
            (
                fresh.id().client_id_hi,
                fresh.id().client_id,
                fresh.id().seq
            ),
            (2, 9, 1)
        );
        assert_eq!(fresh.id().first_unfinished, 1);
        drop(old);
        assert_eq!(
            s.in_flight(),
            vec![1],
            "the old seq 1 did not finish the new one"
        );
        drop(fresh);
        assert!(s.in_flight().is_empty());
    }

    #[test]
    fn seqs_start_at_one_and_grow() {
        let s = Session::new(42);
        let a = s.begin().id();
        let b = s.begin().id();
        assert_eq!((a.client_id, a.seq, a.first_unfinished), (42, 1, 1));
        assert_eq!((b.client_id, b.seq, b.first_unfinished), (42, 2, 2));
        assert_eq!(a.client_id_hi, 0);
    }

    #[test]
    fn both_halves_of_the_session_id_go_on_the_wire() {
        let id = (7u128 << 64) | 9;
        let wire = Session::new(id).begin().id();
        assert_eq!((wire.client_id_hi, wire.client_id), (7, 9));
    }

    /// Draws one id in a forked child and sends it back through a pipe. The child only
    /// draws (one `getrandom` system call) and writes, taking no lock and allocating
    /// nothing, which is safe after forking a multi-threaded test process.
    fn id_drawn_in_a_child() -> u128 {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only draws an id, writes it and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let id = random_session_id().map_or(0, |id| id).to_le_bytes();
            // SAFETY: writes the id's bytes into the pipe, then ends the child at once.
            unsafe {
                libc::write(fds[1], id.as_ptr().cast(), id.len());
                libc::_exit(0);
            }
        }
        let mut buf = [0u8; 16];
        // SAFETY: closes our copy of the write end, reads into `buf`, closes the read end
        // and reaps our own child.
        let n = unsafe {
            libc::close(fds[1]);
            let n = libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len());
            libc::close(fds[0]);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
            n
        };
        assert_eq!(n, buf.len() as isize, "the child sent its id");
        u128::from_le_bytes(buf)
    }

    #[test]
    fn session_ids_never_repeat_within_a_process_or_across_forks() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100_000 {
            let id = random_session_id().unwrap();
            assert!(low_half(id) != 0 && high_half(id) != 0, "{id:#x}");
            assert!(seen.insert(id), "{id:#x} came twice");
        }
        // Each child starts from a copy of this process after it drew ids: a generator
        // whose state lives in the process would make every child draw the same one.
        for _ in 0..16 {
            let id = id_drawn_in_a_child();
            assert!(low_half(id) != 0 && high_half(id) != 0, "{id:#x}");
            assert!(seen.insert(id), "a forked child repeated {id:#x}");
        }
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
