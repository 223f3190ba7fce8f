//! Both ends of the primary's append stream (docs/design.md §4, §10): on the member, whether a
//! message is accepted, the history check and the lease it grants; on the primary, what an
//! acknowledgement proves and when a silent member is dropped.

use std::time::Duration;

use super::{commit, Now, State, StreamMark, Time};
use crate::types::{Rank, Record};

/// Why a member refuses an append message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AppendReject {
    /// The sender's view is older than ours, or we promised a newer ballot elsewhere.
    #[error("stale: the sender's view is older, or a newer ballot was promised")]
    Stale,
    /// We are not a synced member of the sender's view (or are a primary ourselves).
    #[error("not a synced member of the sender's view")]
    NotMember,
    /// The message does not continue our log (§10 history check): re-sync.
    #[error("the message does not continue this member's log")]
    Gap,
}

/// The fields of an append message the decisions depend on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppendHeader {
    pub epoch: u64,
    pub primary: Rank,
    pub msg_seq: u64,
    pub committed: u64,
    /// The remaining lease the primary lends, in ms (0: none).
    pub lease_ms: u64,
    pub prev_lsn: u64,
    pub prev_epoch: u64,
    pub gc_horizon: u64,
}

/// Whether a member takes a message of the stream from `epoch`'s `primary` at all (§4, §5
/// step 1): not from an older view, nor from a primary whose ballot it promised away; and only
/// as a synced member of exactly that view, never as a primary itself.
pub fn check(st: &State, epoch: u64, primary: Rank) -> Result<(), AppendReject> {
    let promised_elsewhere = st.promise.supersedes(epoch) && st.promise.to != primary;
    if epoch < st.view.epoch || promised_elsewhere {
        Err(AppendReject::Stale)
    } else if epoch > st.view.epoch
        || primary != st.view.primary
        || !st.member
        || st.primary.is_some()
    {
        Err(AppendReject::NotMember)
    } else {
        Ok(())
    }
}

/// Whether an append message continues this member's log (docs/design.md §4, §10): the member
/// holds exactly the record at `prev_lsn` with epoch `prev_epoch` as its last, and the
/// message's records follow it without a gap. A member with another history there (a wiped
/// disk, a deposed primary's tail) answers GAP and is re-synced, never patched over.
pub fn continues(
    applied: u64,
    last_epoch: u64,
    prev_lsn: u64,
    prev_epoch: u64,
    records: &[Record],
) -> bool {
    if !super::rule_on!(HistoryCheck) {
        return true;
    }
    applied == prev_lsn
        && last_epoch == prev_epoch
        && records
            .first()
            .is_none_or(|r| Some(r.lsn) == applied.checked_add(1))
        && records
            .windows(2)
            .all(|w| Some(w[1].lsn) == w[0].lsn.checked_add(1))
}

/// The member's whole verdict on a message before anything is applied: [`check`], then the
/// history check against its log.
pub fn admit(st: &State, msg: &AppendHeader, records: &[Record]) -> Result<(), AppendReject> {
    check(st, msg.epoch, msg.primary)?;
    if continues(
        st.pos.applied,
        st.pos.last_epoch,
        msg.prev_lsn,
        msg.prev_epoch,
        records,
    ) {
        Ok(())
    } else {
        Err(AppendReject::Gap)
    }
}

/// The commit point a member may hold once it holds everything up to `upto`: what the
/// primary says is committed, never past what it holds, never lower than before.
pub fn commit_point(st: &State, msg_committed: u64, upto: u64) -> u64 {
    st.pos.committed.max(msg_committed.min(upto))
}

/// A message was admitted and its records are applied and durable: take the commit point,
/// the lease it grants and note the primary alive. Returns the horizon up to which
/// tombstones may be collected.
///
/// The lease (§4, docs/protocol.md "Leases"): a message grants `min(L, r)` measured from when
/// this member answered the *previous* message of the same stream. The primary sent this
/// one only after it got that answer, so the grant ends no later than the primary's own
/// lease, even if this member was paused between receiving the message and handling it.
pub fn accepted(st: &mut State, msg: &AppendHeader, lease: Duration, now: Now) -> u64 {
    let committed = commit_point(st, msg.committed, st.pos.applied);
    st.pos.committed = committed;
    if let Some(until) = lease_grant(st.stream, msg, lease) {
        st.lease_until = Some(until);
    }
    // Only a message newer than the last one answered moves the mark. A stray copy of an
    // older message must not: the primary sent the next message after the answer to the
    // original, so measuring the next grant from the copy's (later) answer would stretch
    // the lease past the primary's own (found by the simulator, seed 592).
    let newer = st
        .stream
        .is_none_or(|m| (msg.epoch, msg.msg_seq) > (m.epoch, m.msg_seq));
    if newer {
        st.stream = Some(StreamMark {
            epoch: msg.epoch,
            msg_seq: msg.msg_seq,
            answered_at: now.boot,
        });
    }
    st.last_heard = now.steady;
    msg.gc_horizon.min(committed)
}

/// The lease a message grants, if any: only on the message right after the last one
/// answered on the same stream (consecutive `msg_seq`, same epoch).
pub fn lease_grant(mark: Option<StreamMark>, msg: &AppendHeader, lease: Duration) -> Option<Time> {
    let mark = mark?;
    let consecutive = (mark.epoch == msg.epoch && Some(msg.msg_seq) == mark.msg_seq.checked_add(1))
        || !super::rule_on!(ConsecutiveLease);
    (consecutive && msg.lease_ms > 0)
        .then(|| mark.answered_at + Duration::from_millis(msg.lease_ms).min(lease))
}

/// The lease a message lends its member, in ms (§4): what is left of the primary's own lease
/// ([`commit::primary_lease`]); nothing while it holds none, so a member never holds a lease
/// its primary does not.
pub fn lease_to_lend(st: &State, lease: Duration, now: Now) -> u64 {
    commit::primary_lease(st, lease, now).map_or(0, |d| d.as_millis() as u64)
}

/// Whether the primary's stream to `to` for the term `epoch` should go on.
pub fn stream_current(st: &State, to: Rank, epoch: u64) -> bool {
    st.primary.as_ref().is_some_and(|p| p.epoch == epoch) && st.view.is_member(to)
}

/// The primary is sending a message to `to` (steady clock): a removed member's lease is
/// bounded by the last send (§5 step 5).
pub fn sending(st: &mut State, to: Rank, now_steady: Time) {
    if let Some(pr) = st.primary.as_mut().and_then(|p| p.peers.get_mut(&to)) {
        pr.last_send = Some(now_steady);
    }
}

/// `to` acknowledged the message sent at `sent_boot` holding records up to `last` and commit
/// point `commit_sent`. False if the term `epoch` is over (the stream ends). The caller then
/// advances the commit point.
pub fn acked(
    st: &mut State,
    to: Rank,
    epoch: u64,
    last: u64,
    commit_sent: u64,
    sent_boot: Time,
) -> bool {
    let Some(p) = st.primary.as_mut().filter(|p| p.epoch == epoch) else {
        return false;
    };
    if let Some(pr) = p.peers.get_mut(&to) {
        pr.acked = pr.acked.max(last);
        pr.commit_acked = pr.commit_acked.max(commit_sent);
        pr.ack_sent_at = Some(sent_boot);
    }
    true
}

/// A member of the term `epoch` stopped acknowledging: true if the caller should now propose
/// a view without it (§5); marks it as being dropped so only one proposal runs per member.
#[must_use]
pub fn begin_drop(st: &mut State, rank: Rank, epoch: u64) -> bool {
    let current = st.primary.as_ref().is_some_and(|p| p.epoch == epoch);
    if !current || !st.view.is_member(rank) || st.dropping.contains(&rank) {
        return false;
    }
    st.dropping.push(rank);
    true
}

/// The drop of `rank` ended, decided or not.
pub fn end_drop(st: &mut State, rank: Rank) {
    st.dropping.retain(|&d| d != rank);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::*;
    use crate::storage::Promise;
    use crate::types::View;

    const L: Duration = Duration::from_millis(500);

    fn rec(lsn: u64, epoch: u64) -> Record {
        Record {
            lsn,
            epoch,
            items: Vec::new(),
        }
    }

    fn msg(epoch: u64, msg_seq: u64, lease_ms: u64) -> AppendHeader {
        AppendHeader {
            epoch,
            primary: 0,
            msg_seq,
            lease_ms,
            ..Default::default()
        }
    }

    #[test]
    fn an_append_continues_only_the_same_history() {
        assert!(continues(0, 0, 0, 0, &[rec(1, 1), rec(2, 1)]));
        assert!(continues(5, 2, 5, 2, &[]), "a heartbeat at the same point");
        assert!(continues(5, 2, 5, 2, &[rec(6, 3)]));
        assert!(
            !continues(5, 2, 5, 3, &[rec(6, 3)]),
            "same lsn, other epoch"
        );
        assert!(!continues(0, 0, 5, 2, &[]), "a wiped member is behind");
        assert!(!continues(7, 2, 5, 2, &[rec(6, 2)]), "a member ahead");
        assert!(!continues(5, 2, 5, 2, &[rec(7, 2)]), "a gap");
        assert!(
            !continues(5, 2, 5, 2, &[rec(6, 2), rec(8, 2)]),
            "a gap inside"
        );
        assert!(
            !continues(u64::MAX, 1, u64::MAX, 1, &[rec(0, 1)]),
            "no overflow"
        );
    }

    #[test]
    fn appends_of_older_views_and_of_promised_away_ballots_are_stale() {
        let mut st = member(View::new(3, 0, [0, 1]), 5);
        assert_eq!(check(&st, 2, 0), Err(AppendReject::Stale));
        assert_eq!(check(&st, 3, 0), Ok(()));
        st.promise = Promise::new(4, 1, 3);
        assert_eq!(
            check(&st, 3, 0),
            Err(AppendReject::Stale),
            "a promise to another proposer stops acking the old primary (§5 step 1)"
        );
        st.promise = Promise {
            from_epoch: None,
            ..st.promise
        };
        assert_eq!(
            check(&st, 3, 0),
            Err(AppendReject::Stale),
            "a stored promise without its instance counts by its ballot"
        );
        st.promise = Promise::new(4, 0, 3);
        assert_eq!(check(&st, 3, 0), Ok(()), "promised to the primary itself");
        st.promise = Promise::new(9, 1, 2);
        assert_eq!(
            check(&st, 3, 0),
            Ok(()),
            "a promise in a re-run of the instance that decided this view (it decides this view again)"
        );
    }

    #[test]
    fn only_a_synced_member_of_exactly_that_view_accepts() {
        let st = member(View::new(3, 0, [0, 1]), 5);
        assert_eq!(check(&st, 4, 0), Err(AppendReject::NotMember));
        assert_eq!(check(&st, 3, 2), Err(AppendReject::NotMember));
        let mut recovering = st.clone();
        recovering.member = false;
        assert_eq!(check(&recovering, 3, 0), Err(AppendReject::NotMember));
        let p = primary(View::new(3, 0, [0, 1]), 5, ms(0));
        assert_eq!(check(&p, 3, 0), Err(AppendReject::NotMember));
    }

    #[test]
    fn a_member_with_another_history_answers_gap() {
        let st = member(View::new(3, 0, [0, 1]), 5);
        let mut m = msg(3, 1, 0);
        (m.prev_lsn, m.prev_epoch) = (5, 3);
        assert_eq!(admit(&st, &m, &[rec(6, 3)]), Ok(()));
        m.prev_epoch = 2;
        assert_eq!(admit(&st, &m, &[rec(6, 3)]), Err(AppendReject::Gap));
        m.epoch = 2;
        assert_eq!(
            admit(&st, &m, &[]),
            Err(AppendReject::Stale),
            "the view check comes first"
        );
    }

    #[test]
    fn the_commit_point_follows_the_primary_but_not_past_the_log() {
        let mut st = member(View::new(3, 0, [0, 1]), 5);
        st.pos.committed = 4;
        assert_eq!(commit_point(&st, 9, 7), 7);
        assert_eq!(commit_point(&st, 2, 7), 4, "never back");
        let mut m = msg(3, 1, 0);
        m.committed = 9;
        m.gc_horizon = 8;
        assert_eq!(accepted(&mut st, &m, L, Now::at(ms(10))), 5);
        assert_eq!(st.pos.committed, 5);
        assert_eq!(st.last_heard, ms(10));
    }

    #[test]
    fn a_lease_is_granted_only_on_consecutive_messages_from_the_previous_answer() {
        let mut st = member(View::new(3, 0, [0, 1]), 0);
        accepted(&mut st, &msg(3, 1, 400), L, Now::at(ms(100)));
        assert_eq!(
            st.lease_until, None,
            "the first message has no answer before it"
        );
        accepted(&mut st, &msg(3, 2, 400), L, Now::at(ms(150)));
        assert_eq!(
            st.lease_until,
            Some(ms(500)),
            "measured from the previous answer"
        );
        accepted(&mut st, &msg(3, 4, 400), L, Now::at(ms(300)));
        assert_eq!(
            st.lease_until,
            Some(ms(500)),
            "a skipped message grants nothing"
        );
        accepted(&mut st, &msg(3, 5, 900), L, Now::at(ms(320)));
        assert_eq!(st.lease_until, Some(ms(800)), "at most L");
        accepted(&mut st, &msg(3, 6, 0), L, Now::at(ms(330)));
        assert_eq!(
            st.lease_until,
            Some(ms(800)),
            "no lease lent: nothing granted"
        );
        let other_term = StreamMark {
            epoch: 2,
            msg_seq: 6,
            answered_at: ms(330),
        };
        assert_eq!(lease_grant(Some(other_term), &msg(3, 7, 400), L), None);
        let wrapped = StreamMark {
            epoch: 3,
            msg_seq: u64::MAX,
            answered_at: ms(0),
        };
        assert_eq!(lease_grant(Some(wrapped), &msg(3, 0, 400), L), None);
    }

    #[test]
    fn a_stray_copy_of_an_old_message_neither_grants_nor_moves_the_mark() {
        let mut st = member(View::new(3, 0, [0, 1]), 0);
        accepted(&mut st, &msg(3, 1, 400), L, Now::at(ms(100)));
        accepted(&mut st, &msg(3, 2, 400), L, Now::at(ms(150)));
        assert_eq!(st.lease_until, Some(ms(500)));
        // A late copy of message 1, then message 3, which the primary sent after the answer
        // to the original message 2 (at 150).
        accepted(&mut st, &msg(3, 1, 400), L, Now::at(ms(900)));
        assert_eq!(st.stream.unwrap().answered_at, ms(150), "the mark stays");
        assert_eq!(st.lease_until, Some(ms(500)), "nothing granted");
        accepted(&mut st, &msg(3, 3, 400), L, Now::at(ms(950)));
        assert_eq!(
            st.lease_until,
            Some(ms(550)),
            "measured from the answer to message 2, not from the copy's"
        );
    }

    #[test]
    fn a_primary_lends_only_the_lease_it_holds() {
        let mut st = primary(View::new(3, 0, [0, 1]), 0, ms(0));
        assert_eq!(
            lease_to_lend(&st, L, Now::at(ms(10))),
            0,
            "no ack yet: no lease"
        );
        assert!(acked(&mut st, 1, 3, 0, 0, ms(100)));
        assert_eq!(lease_to_lend(&st, L, Now::at(ms(400))), 200);
        assert_eq!(lease_to_lend(&st, L, Now::at(ms(600))), 0, "ran out");
        st.primary.as_mut().unwrap().serve_after = ms(500);
        assert_eq!(
            lease_to_lend(&st, L, Now::at(ms(450))),
            0,
            "a new primary lends nothing before the old leases ran out"
        );
    }

    #[test]
    fn acks_of_the_current_term_count_and_end_the_stream_otherwise() {
        let v = View::new(3, 0, [0, 1]);
        let mut st = primary(v, 0, ms(0));
        sending(&mut st, 1, ms(7));
        assert!(acked(&mut st, 1, 3, 4, 2, ms(6)));
        let pr = st.primary.as_ref().unwrap().peers[&1];
        assert_eq!(
            (pr.acked, pr.commit_acked, pr.ack_sent_at, pr.last_send),
            (4, 2, Some(ms(6)), Some(ms(7)))
        );
        assert!(acked(&mut st, 1, 3, 1, 1, ms(8)));
        assert_eq!(
            st.primary.as_ref().unwrap().peers[&1].acked,
            4,
            "never back"
        );
        assert!(!acked(&mut st, 1, 2, 9, 9, ms(9)), "an older term");
        assert!(stream_current(&st, 1, 3));
        assert!(!stream_current(&st, 2, 3));
        let _ = st.step_down();
        assert!(!stream_current(&st, 1, 3));
    }

    #[test]
    fn a_member_is_dropped_once_per_term() {
        let mut st = primary(View::new(3, 0, [0, 1, 2]), 0, ms(0));
        assert!(!begin_drop(&mut st, 1, 2), "a failure of an earlier term");
        assert!(begin_drop(&mut st, 1, 3));
        assert!(!begin_drop(&mut st, 1, 3), "already being dropped");
        assert!(!begin_drop(&mut st, 5, 3), "not a member");
        end_drop(&mut st, 1);
        assert!(begin_drop(&mut st, 1, 3));
    }
}
