//! View changes as single-decree Paxos (docs/design.md §5): the acceptor's prepare and accept, and
//! the proposer's ballots, tallies, the value it proposes and whether it still should.
//! Acceptor handlers change [`State`]; the caller persists the Paxos state (view, promise,
//! accepted proposal) before it sends any reply that depends on the change (§10 fail-stop).

use std::collections::BTreeSet;
use std::time::Duration;

use super::membership::{self, Change};
use super::{State, Time};
use crate::storage::{Accepted, Promise};
use crate::types::{LogState, Rank, View, MAX_EPOCH};

/// Why a view change is proposed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The primary drops a member whose acks timed out in the primary term of this epoch
    /// (a failure seen in an earlier term says nothing about the member after a re-install).
    Drop(Rank, u64),
    /// The primary adds a caught-up joiner (or re-adds a restarted member).
    Add(Rank),
    /// A backup whose primary went silent takes over.
    TakeOver,
    /// A restarted primary never resumes silently (§7).
    Restart,
    /// The primary changes the configuration (docs/design.md §11).
    Reconfigure(Change),
}

/// Why an acceptor refuses a prepare; the message goes back to the proposer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrepareRefusal {
    #[error("malformed view")]
    Malformed,
    /// It forgot what it promised and accepted: its vote could undo a decision (§10).
    #[error("this server lost its state and has not rejoined yet")]
    Amnesiac,
    #[error("ballot out of range")]
    BallotOutOfRange,
    #[error("a newer view exists")]
    NewerView,
    #[error("promised a higher ballot")]
    PromisedHigher,
    /// docs/design.md §11: a server outside the configuration (a removed one) never leads.
    #[error("the proposer is not in this server's configuration")]
    NotConfigured,
    #[error("this server is the live primary")]
    LivePrimary,
    /// Loyalty (§4): a backup does not help depose a primary it heard from within L(1+eps).
    #[error("the primary is alive")]
    PrimaryAlive,
}

/// A prepare as the acceptor sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepare {
    pub ballot: u64,
    pub proposer: Rank,
    /// The view the proposer wants to leave.
    pub from: View,
}

/// Acceptor, phase 1 (§5 step 1). On success the promise is in `st`, and the answer carries
/// the proposal this acceptor accepted for the same instance, if any; the caller persists the
/// Paxos state before it replies.
pub fn prepare(
    st: &mut State,
    me: Rank,
    req: &Prepare,
    now_steady: Time,
    lease_guard: Duration,
) -> Result<Option<Accepted>, PrepareRefusal> {
    let from = &req.from;
    if st.amnesiac() {
        return Err(PrepareRefusal::Amnesiac);
    }
    if req.ballot > MAX_EPOCH {
        return Err(PrepareRefusal::BallotOutOfRange);
    }
    if from.epoch < st.view.epoch {
        return Err(PrepareRefusal::NewerView);
    }
    if !st.view.in_config(req.proposer) {
        return Err(PrepareRefusal::NotConfigured);
    }
    if req.ballot <= st.promise.ballot || req.ballot <= from.epoch {
        return Err(PrepareRefusal::PromisedHigher);
    }
    if req.proposer != me {
        if st.primary.is_some() {
            return Err(PrepareRefusal::LivePrimary);
        }
        if req.proposer != st.view.primary
            && from.epoch == st.view.epoch
            && now_steady < st.last_heard + lease_guard
        {
            return Err(PrepareRefusal::PrimaryAlive);
        }
    }
    if from.epoch > st.view.epoch {
        // This server missed the install of `from`; promising is still safe (it has accepted
        // nothing for that instance), but its data is not a member's.
        let _ = st.adopt_view(from.clone());
    }
    st.promise = Promise::new(req.ballot, req.proposer, from.epoch);
    if req.proposer != st.view.primary {
        // Stop acting on the old primary's lease: it can no longer commit without us.
        st.lease_until = None;
    }
    Ok(st.accepted.clone().filter(|a| a.from_epoch == from.epoch))
}

/// An accept as the acceptor sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accept {
    pub ballot: u64,
    pub proposer: Rank,
    pub from: View,
    pub view: View,
}

/// Acceptor, phase 2 (§5 step 3): accepts unless it promised a higher ballot (or the same
/// ballot to another proposer). The view's epoch is the ballot that first proposed it, so a
/// re-proposed value may carry an epoch below the ballot, never above it nor at or below
/// the epoch it leaves. True if accepted; the caller persists before it replies.
#[must_use]
pub fn accept(st: &mut State, req: Accept) -> bool {
    // An equal ballot promised to another proposer is not ours to accept.
    let promised_other = req.ballot == st.promise.ballot && st.promise.to != req.proposer;
    if st.amnesiac()
        || req.from.epoch < st.view.epoch
        || req.ballot < st.promise.ballot
        || promised_other
        || req.view.epoch > req.ballot
        || req.view.epoch <= req.from.epoch
    {
        return false;
    }
    st.promise = Promise::new(req.ballot, req.proposer, req.from.epoch);
    st.accepted = Some(Accepted {
        ballot: req.ballot,
        from_epoch: req.from.epoch,
        view: req.view,
    });
    true
}

/// Whether a ballot heard from a peer is one a real cluster could have reached; a larger one
/// is a forgery and is ignored (docs/design.md §10).
pub fn plausible_ballot(ballot: u64) -> bool {
    ballot <= MAX_EPOCH
}

/// The proposer's next ballot: above every ballot it has seen and the epoch it leaves, never
/// past [`MAX_EPOCH`] (`None`: the ballots are exhausted).
pub fn next_ballot(max_seen: u64, from_epoch: u64) -> Option<u64> {
    max_seen
        .max(from_epoch)
        .checked_add(1)
        .filter(|&b| b <= MAX_EPOCH)
}

/// Whether `reason` still calls for a view change given the current state; the reason why
/// not otherwise.
pub fn still_needed(
    st: &State,
    me: Rank,
    reason: Reason,
    now_steady: Time,
    lease_guard: Duration,
) -> Result<(), &'static str> {
    match reason {
        Reason::Drop(r, epoch) => {
            let same_term = st.primary.as_ref().is_some_and(|p| p.epoch == epoch);
            if !same_term || !st.view.is_member(r) {
                return Err("the failure belongs to an earlier view, or the member is gone");
            }
        }
        Reason::Add(j) => {
            if st.primary.is_none() {
                return Err("not the primary");
            }
            if !st.view.in_config(j) {
                return Err("the joiner is not in the configuration");
            }
        }
        Reason::Reconfigure(change) => {
            if st.primary.is_none() {
                return Err("not the primary");
            }
            if membership::check(&st.view, &change).is_err() {
                return Err("the membership change no longer applies to the current view");
            }
        }
        Reason::TakeOver => {
            if st.amnesiac() {
                return Err("this server lost its state and has not rejoined yet");
            }
            if !st.view.in_config(me) {
                return Err("this server was removed from the configuration");
            }
            if st.primary.is_some() || !st.view.is_member(me) {
                return Err("not a backup of the current view");
            }
            if now_steady < st.last_heard + lease_guard {
                return Err("the primary is alive");
            }
        }
        Reason::Restart => {
            if st.amnesiac() {
                return Err("this server lost its state and has not rejoined yet");
            }
            if !st.view.in_config(me) {
                return Err("this server was removed from the configuration");
            }
            if st.view.primary != me || st.primary.is_some() {
                return Err("not a restarted primary");
            }
        }
    }
    Ok(())
}

/// Counts the "yes" answers of one phase until they form a quorum of the view being left
/// (§5): the proposer goes on as soon as a quorum said yes (plus a short grace for
/// stragglers), rather than waiting for every member. Waiting for every member let one
/// silent member (an isolated primary) stretch every round to the full timeout, long enough
/// for the next proposer to pre-empt it, round after round (regression F2).
#[derive(Clone, Debug)]
pub struct Tally {
    view: View,
    ayes: BTreeSet<Rank>,
    reached: bool,
}

impl Tally {
    pub fn new(view: &View) -> Tally {
        Tally {
            view: view.clone(),
            ayes: BTreeSet::new(),
            reached: false,
        }
    }

    /// Counts a yes from `rank`; true exactly once, when the yeses first form a quorum.
    pub fn yes(&mut self, rank: Rank) -> bool {
        self.ayes.insert(rank);
        if !self.reached && self.view.is_quorum(&self.ayes) {
            self.reached = true;
            return true;
        }
        false
    }

    pub fn is_quorum(&self) -> bool {
        self.reached
    }

    pub fn ayes(&self) -> &BTreeSet<Rank> {
        &self.ayes
    }
}

/// One acceptor's answer to a prepare, as the proposer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromiseReply {
    pub rank: Rank,
    pub promised: bool,
    /// The acceptor's installed view (if it could be read).
    pub view: Option<View>,
    /// The highest ballot the acceptor promised.
    pub promised_ballot: u64,
    /// The proposal it accepted for this instance: (ballot, view).
    pub accepted: Option<(u64, View)>,
    pub log: LogState,
    pub reason: String,
}

/// What the prepare phase showed the proposer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrepareOutcome {
    /// Some acceptor holds a newer view: adopt it and start over from it (§5 step 2).
    NewerView(View),
    /// No quorum promised; the last refusal's reason.
    NoQuorum {
        promisers: BTreeSet<Rank>,
        last_refusal: Option<String>,
    },
    /// A quorum promised: propose `view` to the promisers; `states` are their logs (for the
    /// reconcile of §5 step 4).
    Quorum {
        promisers: BTreeSet<Rank>,
        states: Vec<LogState>,
        view: View,
    },
}

/// The proposer's phase-1 decision (§5 step 2): a newer view wins; with a quorum of
/// promises it proposes the accepted proposal with the highest ballot if any (Paxos keeps a
/// value once chosen), else a new view with itself as primary and the promisers as members
/// (minus a dropped member, plus a joiner).
pub fn after_prepare(
    me: Rank,
    from: &View,
    ballot: u64,
    reason: Reason,
    replies: &[PromiseReply],
) -> PrepareOutcome {
    let mut promisers = BTreeSet::new();
    let mut states = Vec::new();
    let mut best: Option<(u64, &View)> = None;
    let mut last_refusal = None;
    for r in replies {
        if let Some(v) = r.view.as_ref().filter(|v| v.epoch > from.epoch) {
            return PrepareOutcome::NewerView(v.clone());
        }
        if !r.promised {
            last_refusal = Some(format!("rank {} refused: {}", r.rank, r.reason));
            continue;
        }
        promisers.insert(r.rank);
        states.push(r.log);
        if let Some((b, v)) = &r.accepted {
            if best.is_none_or(|(bb, _)| *b > bb) {
                best = Some((*b, v));
            }
        }
    }
    if !from.is_quorum(&promisers) {
        return PrepareOutcome::NoQuorum {
            promisers,
            last_refusal,
        };
    }
    let view = match best {
        // The value is the whole view, epoch and configuration included: re-stamping it with
        // this ballot would let a re-run of an instance decided long ago overtake the views
        // decided after it (found by the simulator, seeds 3457 and 7061).
        Some((_, v)) => v.clone(),
        None => {
            let mut members = promisers.clone();
            let mut config = from.config.clone();
            match reason {
                Reason::Drop(r, _) => {
                    members.remove(&r);
                }
                Reason::Add(j) => {
                    members.insert(j);
                    if let Some(c) = config.as_mut() {
                        membership::joined(c, j);
                    }
                }
                Reason::Reconfigure(change) => match membership::apply(from, &change, &mut members)
                {
                    Ok(c) => config = Some(c),
                    Err(e) => {
                        return PrepareOutcome::NoQuorum {
                            promisers,
                            last_refusal: Some(e.to_string()),
                        }
                    }
                },
                Reason::TakeOver | Reason::Restart => {}
            }
            // docs/design.md §11: a view's members are servers of its configuration.
            if let Some(c) = &config {
                members.retain(|m| c.contains(*m));
            }
            View::new(ballot, me, members).with_config(config)
        }
    };
    PrepareOutcome::Quorum {
        promisers,
        states,
        view,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::*;

    const GUARD: Duration = Duration::from_millis(550);

    fn prep(ballot: u64, proposer: Rank, from: View) -> Prepare {
        Prepare {
            ballot,
            proposer,
            from,
        }
    }

    fn reply(rank: Rank, promised: bool) -> PromiseReply {
        PromiseReply {
            rank,
            promised,
            view: None,
            promised_ballot: 0,
            accepted: None,
            log: LogState {
                rank,
                applied: 0,
                committed: 0,
                last_epoch: 0,
            },
            reason: "no".into(),
        }
    }

    #[test]
    fn a_promise_is_kept_in_the_state_with_the_accepted_proposal_of_that_instance() {
        let v = View::new(3, 0, [0, 1, 2]);
        let mut st = member(v.clone(), 5);
        st.accepted = Some(Accepted {
            ballot: 4,
            from_epoch: 3,
            view: View::new(4, 2, [1, 2]),
        });
        st.last_heard = ms(0);
        let a = prepare(&mut st, 1, &prep(5, 2, v.clone()), ms(600), GUARD).unwrap();
        assert_eq!(a.unwrap().ballot, 4);
        assert_eq!(st.promise, Promise::new(5, 2, 3));
        st.accepted.as_mut().unwrap().from_epoch = 2;
        assert_eq!(
            prepare(&mut st, 1, &prep(6, 2, v), ms(600), GUARD),
            Ok(None),
            "an acceptance of another instance is not reported"
        );
    }

    #[test]
    fn low_equal_and_hostile_ballots_are_refused() {
        let v = View::new(3, 0, [0, 1]);
        let mut st = member(v.clone(), 5);
        st.promise = Promise::new(5, 1, 3);
        let late = ms(10_000);
        assert_eq!(
            prepare(&mut st, 1, &prep(5, 1, v.clone()), late, GUARD),
            Err(PrepareRefusal::PromisedHigher)
        );
        assert_eq!(
            prepare(
                &mut st,
                1,
                &prep(3, 1, View::new(3, 0, [0, 1])),
                late,
                GUARD
            ),
            Err(PrepareRefusal::PromisedHigher),
            "a ballot must beat the epoch it leaves"
        );
        assert_eq!(
            prepare(&mut st, 1, &prep(MAX_EPOCH + 1, 1, v.clone()), late, GUARD),
            Err(PrepareRefusal::BallotOutOfRange)
        );
        assert_eq!(
            prepare(&mut st, 1, &prep(u64::MAX, 1, v.clone()), late, GUARD),
            Err(PrepareRefusal::BallotOutOfRange)
        );
        assert_eq!(
            prepare(
                &mut st,
                1,
                &prep(9, 1, View::new(2, 0, [0, 1])),
                late,
                GUARD
            ),
            Err(PrepareRefusal::NewerView)
        );
        assert_eq!(st.promise, Promise::new(5, 1, 3), "nothing changed");
    }

    #[test]
    fn a_backup_stays_loyal_to_a_primary_it_heard_within_the_lease_guard() {
        let v = View::new(3, 0, [0, 1, 2]);
        let mut st = member(v.clone(), 5);
        st.last_heard = ms(1000);
        assert_eq!(
            prepare(&mut st, 1, &prep(4, 2, v.clone()), ms(1549), GUARD),
            Err(PrepareRefusal::PrimaryAlive)
        );
        assert!(
            prepare(&mut st.clone(), 1, &prep(4, 0, v.clone()), ms(1549), GUARD).is_ok(),
            "the primary itself may run a view change"
        );
        assert!(prepare(&mut st, 1, &prep(4, 2, v.clone()), ms(1550), GUARD).is_ok());
    }

    #[test]
    fn a_promise_to_another_proposer_drops_the_read_lease() {
        let v = View::new(3, 0, [0, 1, 2]);
        let mut st = member(v.clone(), 5);
        st.lease_until = Some(ms(99_999));
        prepare(&mut st.clone(), 1, &prep(4, 0, v.clone()), ms(0), GUARD).unwrap();
        let mut to_primary = st.clone();
        prepare(&mut to_primary, 1, &prep(4, 0, v.clone()), ms(0), GUARD).unwrap();
        assert_eq!(to_primary.lease_until, Some(ms(99_999)));
        prepare(&mut st, 1, &prep(4, 2, v), ms(10_000), GUARD).unwrap();
        assert_eq!(st.lease_until, None);
    }

    #[test]
    fn a_live_primary_refuses_others_and_an_amnesiac_refuses_everyone() {
        let v = View::new(3, 0, [0, 1]);
        let mut p = primary(v.clone(), 5, ms(0));
        assert_eq!(
            prepare(&mut p, 0, &prep(4, 1, v.clone()), ms(9_000), GUARD),
            Err(PrepareRefusal::LivePrimary)
        );
        assert!(prepare(&mut p, 0, &prep(4, 0, v.clone()), ms(9_000), GUARD).is_ok());
        let mut a = member(v.clone(), 0);
        a.amnesiac_until = Some(3);
        assert_eq!(
            prepare(&mut a, 1, &prep(4, 0, v.clone()), ms(9_000), GUARD),
            Err(PrepareRefusal::Amnesiac)
        );
        let acc = Accept {
            ballot: 4,
            proposer: 0,
            from: v.clone(),
            view: View::new(4, 0, [0, 1]),
        };
        assert!(!accept(&mut a, acc), "an amnesiac server never accepts");
        assert_eq!(a.accepted, None);
    }

    #[test]
    fn promising_for_a_view_it_missed_makes_it_a_non_member_of_that_view() {
        let mut st = member(View::new(3, 0, [0, 1, 2]), 5);
        let missed = View::new(5, 2, [1, 2]);
        prepare(&mut st, 1, &prep(6, 2, missed.clone()), ms(0), GUARD).unwrap();
        assert_eq!(st.view, missed);
        assert!(!st.member);
    }

    #[test]
    fn accept_needs_the_promised_ballot_and_a_matching_view() {
        let from = View::new(3, 0, [0, 1]);
        let mut st = member(from.clone(), 5);
        st.promise = Promise::new(5, 1, 3);
        let acc = |ballot: u64, proposer: Rank, epoch: u64| Accept {
            ballot,
            proposer,
            from: from.clone(),
            view: View::new(epoch, proposer, [0, 1]),
        };
        assert!(!accept(&mut st, acc(4, 1, 4)), "below the promise");
        assert!(
            !accept(&mut st, acc(5, 0, 5)),
            "the same ballot promised to another"
        );
        assert!(
            !accept(&mut st, acc(5, 1, 6)),
            "a view epoch above the ballot"
        );
        assert!(
            !accept(&mut st, acc(5, 1, 3)),
            "a view epoch at or below the one it leaves"
        );
        assert_eq!(st.accepted, None);
        assert!(
            accept(&mut st.clone(), acc(5, 1, 4)),
            "a re-proposed value keeps the epoch it was first proposed with"
        );
        assert!(accept(&mut st, acc(5, 1, 5)));
        assert_eq!(st.accepted.as_ref().unwrap().from_epoch, 3);
        assert!(
            accept(&mut st, acc(7, 0, 7)),
            "a higher ballot needs no promise"
        );
        assert_eq!(st.promise, Promise::new(7, 0, 3));
        let mut newer = member(View::new(4, 0, [0, 1]), 5);
        assert!(!accept(&mut newer, acc(8, 0, 8)), "leaving an older view");
    }

    #[test]
    fn ballots_grow_and_stop_at_the_maximum() {
        assert_eq!(next_ballot(0, 3), Some(4));
        assert_eq!(next_ballot(9, 3), Some(10));
        assert_eq!(next_ballot(MAX_EPOCH, 1), None);
        assert_eq!(next_ballot(u64::MAX, 1), None);
        assert!(plausible_ballot(MAX_EPOCH));
        assert!(!plausible_ballot(MAX_EPOCH + 1));
    }

    #[test]
    fn a_tally_says_quorum_once() {
        let v = View::new(3, 0, [0, 1, 2, 3]);
        let mut t = Tally::new(&v);
        assert!(!t.yes(1));
        assert!(!t.yes(5), "non-members do not count");
        assert!(!t.yes(2), "half without the primary");
        assert!(t.yes(3));
        assert!(!t.yes(0), "said once");
        assert!(t.is_quorum());
        let mut with_primary = Tally::new(&v);
        with_primary.yes(0);
        assert!(with_primary.yes(3));
    }

    #[test]
    fn the_proposer_re_proposes_the_highest_accepted_value() {
        let from = View::new(3, 0, [0, 1, 2]);
        let mut r1 = reply(1, true);
        r1.accepted = Some((4, View::new(4, 2, [1, 2])));
        let mut r2 = reply(2, true);
        r2.accepted = Some((5, View::new(5, 2, [0, 2])));
        match after_prepare(1, &from, 6, Reason::TakeOver, &[r1, r2]) {
            PrepareOutcome::Quorum {
                view, promisers, ..
            } => {
                assert_eq!(
                    view,
                    View::new(5, 2, [0, 2]),
                    "the value keeps its epoch: a re-run decides the same view"
                );
                assert_eq!(promisers, [1, 2].into());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn without_an_accepted_value_the_promisers_form_the_view() {
        let from = View::new(3, 0, [0, 1, 2]);
        let rs = [reply(0, true), reply(1, true), reply(2, true)];
        let view = |reason| match after_prepare(0, &from, 4, reason, &rs) {
            PrepareOutcome::Quorum { view, .. } => view,
            other => panic!("{other:?}"),
        };
        assert_eq!(view(Reason::Drop(2, 3)), View::new(4, 0, [0, 1]));
        assert_eq!(view(Reason::Add(3)), View::new(4, 0, [0, 1, 2, 3]));
        assert_eq!(view(Reason::Restart), View::new(4, 0, [0, 1, 2]));
    }

    #[test]
    fn no_quorum_of_promises_and_newer_views_stop_the_round() {
        let from = View::new(3, 0, [0, 1, 2]);
        let out = after_prepare(
            1,
            &from,
            4,
            Reason::TakeOver,
            &[reply(1, true), reply(2, false)],
        );
        assert_eq!(
            out,
            PrepareOutcome::NoQuorum {
                promisers: [1].into(),
                last_refusal: Some("rank 2 refused: no".into())
            }
        );
        let two = View::new(3, 0, [0, 1]);
        assert!(
            matches!(
                after_prepare(1, &two, 4, Reason::TakeOver, &[reply(1, true)]),
                PrepareOutcome::NoQuorum { .. }
            ),
            "a backup alone is no quorum of a two-member view (docs/design.md §10)"
        );
        let mut newer = reply(2, false);
        newer.view = Some(View::new(7, 2, [2]));
        assert_eq!(
            after_prepare(1, &from, 4, Reason::TakeOver, &[reply(1, true), newer]),
            PrepareOutcome::NewerView(View::new(7, 2, [2]))
        );
    }

    #[test]
    fn a_proposal_is_needed_only_while_its_reason_holds() {
        let v = View::new(3, 0, [0, 1, 2]);
        let mut b = member(v.clone(), 0);
        b.last_heard = ms(1000);
        assert_eq!(
            still_needed(&b, 1, Reason::TakeOver, ms(1549), GUARD),
            Err("the primary is alive")
        );
        assert_eq!(
            still_needed(&b, 1, Reason::TakeOver, ms(1550), GUARD),
            Ok(())
        );
        assert!(still_needed(&b, 3, Reason::TakeOver, ms(9000), GUARD).is_err());
        assert!(still_needed(&b, 1, Reason::Add(3), ms(0), GUARD).is_err());
        b.amnesiac_until = Some(3);
        assert!(still_needed(&b, 1, Reason::TakeOver, ms(9000), GUARD).is_err());
        let p = primary(v.clone(), 0, ms(0));
        assert_eq!(
            still_needed(&p, 0, Reason::Drop(2, 3), ms(0), GUARD),
            Ok(())
        );
        assert!(still_needed(&p, 0, Reason::Drop(2, 2), ms(0), GUARD).is_err());
        assert!(still_needed(&p, 0, Reason::Drop(5, 3), ms(0), GUARD).is_err());
        assert!(still_needed(&p, 0, Reason::Restart, ms(0), GUARD).is_err());
        let restarted = State::restarted(v, Default::default(), None, pos(0), None, ms(0));
        assert_eq!(
            still_needed(&restarted, 0, Reason::Restart, ms(0), GUARD),
            Ok(())
        );
        assert!(still_needed(&restarted, 1, Reason::Restart, ms(0), GUARD).is_err());
    }

    fn configured(epoch: u64, primary: Rank, members: &[Rank], ranks: u32) -> View {
        let servers = (0..ranks).map(|r| crate::types::ServerAddr {
            client: format!("127.0.0.1:{}", 7000 + r),
            peer: format!("127.0.0.1:{}", 7100 + r),
        });
        View::new(epoch, primary, members.iter().copied())
            .with_config(Some(crate::types::Configuration::seed(servers)))
    }

    #[test]
    fn a_proposer_outside_the_configuration_gets_no_promise() {
        let mut v = configured(3, 0, &[0, 1, 2], 3);
        v.config.as_mut().unwrap().servers.remove(&2);
        let mut st = member(v.clone(), 5);
        assert_eq!(
            prepare(&mut st, 1, &prep(4, 2, v.clone()), ms(10_000), GUARD),
            Err(PrepareRefusal::NotConfigured)
        );
        assert_eq!(st.promise.ballot, 0, "nothing promised");
        let mut removed = member(v.clone(), 5);
        assert!(still_needed(&removed, 2, Reason::TakeOver, ms(10_000), GUARD).is_err());
        removed.view.primary = 2;
        assert!(still_needed(&removed, 2, Reason::Restart, ms(10_000), GUARD).is_err());
    }

    #[test]
    fn a_reconfiguration_is_proposed_with_the_view_and_a_join_ends_it() {
        let from = configured(3, 0, &[0, 1, 2], 3);
        let replies = [reply(0, true), reply(1, true), reply(2, true)];
        let added = crate::types::ServerAddr {
            client: "127.0.0.1:7003".into(),
            peer: "127.0.0.1:7103".into(),
        };
        let PrepareOutcome::Quorum { view, .. } = after_prepare(
            0,
            &from,
            4,
            Reason::Reconfigure(Change::Add(added.clone())),
            &replies,
        ) else {
            panic!("a quorum promised")
        };
        assert_eq!(view.members, [0, 1, 2]);
        let c = view.config.clone().unwrap();
        assert_eq!((c.servers[&3].clone(), c.pending), (added, Some(3)));
        let st = primary(view.clone(), 5, ms(0));
        assert!(still_needed(&st, 0, Reason::Add(3), ms(0), GUARD).is_ok());
        assert!(
            still_needed(&st, 0, Reason::Add(4), ms(0), GUARD).is_err(),
            "a rank outside the configuration never joins"
        );
        let replies = [reply(0, true), reply(1, true), reply(2, true)];
        let PrepareOutcome::Quorum { view: joined, .. } =
            after_prepare(0, &view, 5, Reason::Add(3), &replies)
        else {
            panic!("a quorum promised")
        };
        assert_eq!(joined.members, [0, 1, 2, 3]);
        assert_eq!(joined.config.unwrap().pending, None);

        let PrepareOutcome::Quorum { view: shrunk, .. } = after_prepare(
            0,
            &from,
            4,
            Reason::Reconfigure(Change::Remove(1)),
            &[reply(0, true), reply(1, true), reply(2, true)],
        ) else {
            panic!("a quorum promised")
        };
        assert_eq!(shrunk.members, [0, 2]);
        assert!(!shrunk.config.unwrap().contains(1));
    }

    #[test]
    fn an_accepted_proposal_keeps_its_configuration() {
        let from = configured(3, 0, &[0, 1, 2], 3);
        let mut accepted = configured(4, 1, &[1, 2], 4);
        accepted.config.as_mut().unwrap().servers.remove(&0);
        let mut r1 = reply(1, true);
        r1.accepted = Some((4, accepted.clone()));
        let PrepareOutcome::Quorum { view, .. } =
            after_prepare(2, &from, 5, Reason::TakeOver, &[r1, reply(2, true)])
        else {
            panic!("a quorum promised")
        };
        assert_eq!(view.config, accepted.config);
        assert_eq!(view.primary, 1);
    }
}
