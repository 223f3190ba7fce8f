//! Installing a decided view and the state transfers around it (docs/design.md §5 step 4-5, §7,
//! §10): who takes the role and how long it waits, whose state the new primary takes, who
//! may serve a transfer, what a transfer may set, and when a joiner may join.

use std::collections::BTreeSet;
use std::time::Duration;

use super::{State, Time};
use crate::storage::Position;
use crate::types::{most_advanced, LogState, Rank, View};

/// A joiner asks to be added once it is this close to the primary; the rest is transferred
/// during the install, while writes pause (§7).
pub const JOIN_WINDOW: u64 = 20_000;

/// What the decided primary knew of its old role when an install began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrimaryInstall {
    /// It was the primary of the view being left: its leases are its own, and writes in
    /// flight simply commit after the install.
    pub was_primary: bool,
    /// The term changed (it was primary of another view): the caller publishes the commit
    /// point so writes in flight get an unknown outcome.
    pub term_changed: bool,
    /// The old role's commit gate, carried over.
    pub old_commit_after: Option<Time>,
    /// The latest send to a member the new view removes (steady clock).
    pub removed_last_send: Option<Time>,
}

/// §5 step 4 on the decided primary, first part: take `view` as a non-member (until it holds
/// the most advanced state), remembering what the old role owes the removed members. The
/// caller persists the Paxos state next.
pub fn begin_install_as_primary(
    st: &mut State,
    me: Rank,
    view: &View,
    prev: &View,
) -> Result<PrimaryInstall, &'static str> {
    if view.epoch < st.view.epoch || (view.epoch == st.view.epoch && st.primary.is_some()) {
        return Err("a newer view is already installed");
    }
    // An install naming an amnesiac server primary finishes a proposal it made before it lost
    // its state (every fresh proposal names its proposer, and an amnesiac never proposes).
    // Where it alone is a quorum (a one- or two-member view) it may have decided the next
    // view and committed in it by itself back then, unknown to anyone now: such a view waits
    // for its data (§10), it never gets a primary without it (found by the simulator, seed 3457).
    if st.amnesiac() && view.is_quorum(&BTreeSet::from([me])) {
        return Err("this server lost its state: it may have left this view alone before");
    }
    let old = st.primary.take();
    let was_primary = old.as_ref().is_some_and(|p| p.epoch == prev.epoch) && prev.primary == me;
    let term_changed = old.is_some() && !was_primary;
    if term_changed {
        st.term += 1;
    }
    let removed_last_send = old.as_ref().and_then(|p| {
        p.peers
            .iter()
            .filter(|(r, _)| !view.is_member(**r))
            .filter_map(|(_, pr)| pr.last_send)
            .max()
    });
    let _ = st.adopt_view(view.clone());
    // The instance is decided: its accepted proposal is spent.
    st.accepted = None;
    Ok(PrimaryInstall {
        was_primary,
        term_changed,
        old_commit_after: old.map(|p| p.commit_after),
        removed_last_send,
    })
}

/// The state the decided primary must take before it serves (§5 step 4): the most advanced
/// among the members (highest (last record epoch, applied)), its own included unless it lost
/// its state (§10: then it must take a member's, whatever its own looks like). `Ok(None)`
/// when it holds the most advanced state itself.
pub fn reconcile_source(
    me: Rank,
    view: &View,
    states: &[LogState],
    mine: LogState,
    amnesiac: bool,
) -> Result<Option<Rank>, &'static str> {
    let mut all: Vec<LogState> = states
        .iter()
        .copied()
        .filter(|s| view.is_member(s.rank) && s.rank != me)
        .collect();
    if !amnesiac {
        all.push(mine);
    }
    match most_advanced(&all, me) {
        None if amnesiac => Err("this server lost its state and no member's state is known"),
        Some(best) if best.rank != me => Ok(Some(best.rank)),
        _ => Ok(None),
    }
}

/// When the new primary may serve and commit (§5 step 5), on the steady clock. A primary
/// that was not the previous view's primary waits L(1+eps) after the install, so every lease
/// granted in the old view has run out. A primary that removes a member commits without it
/// only after `last send to it + L(1+eps)` (regression F1). A single-member view grants no
/// leases, so only a change of primary needs a wait.
pub fn install_waits(
    install: &PrimaryInstall,
    view: &View,
    now_steady: Time,
    lease_guard: Duration,
) -> (Time, Time) {
    let _ = view;
    if !super::rule_on!(InstallWait) {
        return (now_steady, now_steady);
    }
    let serve_after = if install.was_primary {
        now_steady
    } else {
        now_steady + lease_guard
    };
    let old = install.old_commit_after.unwrap_or(now_steady);
    let commit_after = install
        .removed_last_send
        .map_or(old, |t| old.max(t + lease_guard));
    (serve_after, commit_after)
}

/// Whether the decided primary may still take the role for `view` when its install ends
/// (§5 step 4): not if a newer view came meanwhile, and not if meanwhile it promised another
/// proposer a ballot above `view`'s epoch. Not yet primary, it could promise, and that
/// proposer may since have decided the next view with its vote: a primary of `view` would
/// then serve beside the next one, and once the next view's primary lost its disk, its vote
/// alone (half of a two-member view, with the primary) could re-run the decided instance
/// over a history that had moved on (found by the simulator, seed 1533).
///
/// Only a promise in `view`'s own instance or a later one counts: a promise in a re-run of
/// the instance that decided `view` (whose ballot may be far above `view`'s epoch, §5 step 2)
/// decides `view` again.
pub fn still_installing(st: &State, me: Rank, view: &View) -> Result<(), &'static str> {
    if st.view.epoch != view.epoch {
        return Err("superseded during install");
    }
    if st.promise.supersedes(view.epoch) && st.promise.to != me {
        return Err("promised a newer ballot to another proposer during install");
    }
    Ok(())
}

/// Whether an install on a member comes from the right place: the view's primary, to one of
/// its members.
pub fn check_member_install(me: Rank, view: &View, from: Rank) -> Result<(), &'static str> {
    if from != view.primary || !view.is_member(me) {
        Err("install must come from the view's primary to a member")
    } else {
        Ok(())
    }
}

/// An install on a member begins: it adopts the view as a non-member until the state
/// transfer from the primary completes. True if it stepped down as primary. The caller
/// persists the Paxos state, then pulls the transfer.
pub fn begin_member_install(
    st: &mut State,
    view: &View,
    now_steady: Time,
) -> Result<bool, &'static str> {
    if view.epoch < st.view.epoch {
        return Err("a newer view exists");
    }
    let stepped_down = st.adopt_view(view.clone());
    st.accepted = None;
    st.last_heard = now_steady;
    Ok(stepped_down)
}

/// The state transfer of a member install completed: a synced member of `view` now, unless
/// a newer view came meanwhile. Returns its applied lsn.
pub fn finish_member_install(st: &mut State, view: &View, now_steady: Time) -> Option<u64> {
    (st.view.epoch == view.epoch).then(|| {
        st.member = true;
        st.last_heard = now_steady;
        st.pos.applied
    })
}

/// Why a server refuses to serve a state transfer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransferRefusal {
    #[error("only the primary serves state transfers")]
    NotAuthoritative,
    #[error("this server lost its state and has not rejoined yet")]
    Amnesiac,
    #[error("this server holds up to lsn {applied}, short of the receiver's committed {since}")]
    Short { applied: u64, since: u64 },
}

/// Whether this server may serve a state transfer from `since` (§7, §10), and the position
/// it hands over. Only an authoritative source: the primary of its view, or a member asked by
/// the decided primary of a newer view (`epoch`, 0 for a joiner) during reconcile; a deposed
/// primary could otherwise mark its uncommitted records as committed at the receiver. Never
/// an amnesiac server, and never one that holds less than the receiver's committed prefix.
pub fn transfer_source(
    st: &State,
    me: Rank,
    epoch: u64,
    since: u64,
) -> Result<Position, TransferRefusal> {
    let authoritative = st.view.primary == me && st.member;
    let reconciling = epoch > 0 && epoch >= st.view.epoch;
    if !authoritative && !reconciling {
        return Err(TransferRefusal::NotAuthoritative);
    }
    if st.amnesiac() && !st.member {
        return Err(TransferRefusal::Amnesiac);
    }
    if st.pos.applied < since {
        return Err(TransferRefusal::Short {
            applied: st.pos.applied,
            since,
        });
    }
    Ok(st.pos)
}

/// The position a receiver takes at the end of a transfer from `since` (§7, §10): the
/// source's, with a commit point never past what it holds; refused if the source lacks what
/// the receiver knows to be committed (a transfer never lowers the committed prefix).
pub fn transfer_end(since: u64, source: Position) -> Result<Position, TransferRefusal> {
    if source.applied < since {
        return Err(TransferRefusal::Short {
            applied: source.applied,
            since,
        });
    }
    Ok(Position {
        committed: source.committed.min(source.applied),
        ..source
    })
}

/// Whether the primary adds `rank`, which holds up to `applied`, to its view now (§7).
pub fn check_join(
    st: &State,
    me: Rank,
    n: usize,
    rank: Rank,
    applied: u64,
) -> Result<(), &'static str> {
    if st.primary.is_none() {
        return Err("not the primary");
    }
    if rank as usize >= n || rank == me {
        return Err("unknown peer");
    }
    if !st.view.in_config(rank) {
        // docs/design.md §11: a removed server (or one never added) does not come back.
        return Err("not in the configuration");
    }
    if st.pos.applied.saturating_sub(applied) > JOIN_WINDOW {
        return Err("catch up first");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::*;
    use crate::storage::Promise;

    const GUARD: Duration = Duration::from_millis(550);

    fn log(rank: Rank, applied: u64, last_epoch: u64) -> LogState {
        LogState {
            rank,
            applied,
            committed: 0,
            last_epoch,
        }
    }

    #[test]
    fn the_same_primary_keeps_its_term_and_owes_removed_members_their_lease() {
        let prev = View::new(3, 0, [0, 1, 2]);
        let mut st = primary(prev.clone(), 5, ms(0));
        st.primary.as_mut().unwrap().commit_after = ms(40);
        st.primary
            .as_mut()
            .unwrap()
            .peers
            .get_mut(&2)
            .unwrap()
            .last_send = Some(ms(300));
        st.primary
            .as_mut()
            .unwrap()
            .peers
            .get_mut(&1)
            .unwrap()
            .last_send = Some(ms(900));
        st.accepted = Some(crate::storage::Accepted {
            ballot: 4,
            from_epoch: 3,
            view: View::new(4, 0, [0, 1]),
        });
        let next = View::new(4, 0, [0, 1]);
        let i = begin_install_as_primary(&mut st, 0, &next, &prev).unwrap();
        assert!(i.was_primary && !i.term_changed);
        assert_eq!(i.removed_last_send, Some(ms(300)));
        assert_eq!(st.term, 0);
        assert!(!st.member && st.primary.is_none() && st.accepted.is_none());
        let (serve, commit) = install_waits(&i, &next, ms(1000), GUARD);
        assert_eq!(serve, ms(1000), "its own leases: no wait to serve");
        assert_eq!(
            commit,
            ms(850),
            "nothing commits before the dropped member's lease ran out"
        );
    }

    #[test]
    fn a_new_primary_waits_out_the_old_view_s_leases() {
        let prev = View::new(3, 0, [0, 1, 2]);
        let mut st = member(prev.clone(), 5);
        let next = View::new(4, 1, [1, 2]);
        let i = begin_install_as_primary(&mut st, 1, &next, &prev).unwrap();
        assert!(!i.was_primary);
        assert_eq!(install_waits(&i, &next, ms(100), GUARD), (ms(650), ms(100)));
        let alone = View::new(4, 1, [1]);
        assert_eq!(
            install_waits(&i, &alone, ms(100), GUARD).0,
            ms(650),
            "a changed primary waits even alone"
        );
    }

    #[test]
    fn a_primary_of_another_view_changes_term() {
        let old = View::new(2, 0, [0, 1]);
        let mut st = primary(old, 5, ms(0));
        let prev = View::new(3, 1, [0, 1]);
        let i = begin_install_as_primary(&mut st, 0, &View::new(4, 0, [0, 1]), &prev).unwrap();
        assert!(i.term_changed && !i.was_primary);
        assert_eq!(st.term, 1);
    }

    #[test]
    fn an_installed_or_newer_view_is_not_installed_again() {
        let v = View::new(4, 0, [0, 1]);
        let mut st = primary(v.clone(), 5, ms(0));
        assert!(begin_install_as_primary(&mut st, 0, &v, &v).is_err());
        assert!(begin_install_as_primary(&mut st, 0, &View::new(3, 0, [0]), &v).is_err());
        assert!(st.primary.is_some(), "nothing changed");
    }

    #[test]
    fn an_install_ends_without_the_role_after_a_promise_to_another_proposer() {
        let v = View::new(57, 0, [0, 3]);
        let mut st = member(v.clone(), 5);
        st.promise = Promise::new(57, 0, 56);
        assert_eq!(still_installing(&st, 0, &v), Ok(()));
        st.promise = Promise::new(58, 0, 57);
        assert_eq!(
            still_installing(&st, 0, &v),
            Ok(()),
            "its own next proposal"
        );
        st.promise = Promise::new(61, 3, 56);
        assert_eq!(
            still_installing(&st, 0, &v),
            Ok(()),
            "a re-run of the instance that decided this view"
        );
        st.promise = Promise::new(58, 3, 57);
        assert!(still_installing(&st, 0, &v).is_err());
        let _ = st.adopt_view(View::new(58, 3, [0, 3]));
        assert_eq!(
            still_installing(&st, 0, &v),
            Err("superseded during install")
        );
    }

    #[test]
    fn an_amnesiac_server_is_never_made_primary_of_a_view_it_could_leave_alone() {
        let prev = View::new(32, 3, [0, 2, 3]);
        let mut st = member(prev.clone(), 0);
        st.become_amnesiac(Some(prev.clone()), 36);
        let two = View::new(33, 0, [0, 2]);
        assert!(begin_install_as_primary(&mut st, 0, &two, &prev).is_err());
        assert!(begin_install_as_primary(&mut st, 0, &View::new(33, 0, [0]), &prev).is_err());
        assert_eq!(st.view, prev, "nothing changed");
        let three = View::new(33, 0, [0, 2, 3]);
        assert!(
            begin_install_as_primary(&mut st, 0, &three, &prev).is_ok(),
            "in a larger view the next view needs another member, which knows it"
        );
    }

    #[test]
    fn the_new_primary_takes_the_most_advanced_member_state() {
        let v = View::new(5, 1, [0, 1, 2]);
        let states = [log(0, 90, 2), log(2, 60, 3), log(7, 99, 9)];
        assert_eq!(
            reconcile_source(1, &v, &states, log(1, 55, 3), false),
            Ok(Some(2)),
            "a later epoch's history wins; non-members do not count"
        );
        assert_eq!(
            reconcile_source(1, &v, &states, log(1, 60, 3), false),
            Ok(None),
            "ties go to the new primary itself"
        );
        assert_eq!(
            reconcile_source(1, &v, &states, log(1, 999, 4), true),
            Ok(Some(2)),
            "an amnesiac primary never takes its own state (§10)"
        );
        assert!(reconcile_source(1, &v, &[], log(1, 9, 9), true).is_err());
    }

    #[test]
    fn a_member_install_comes_from_the_primary_and_makes_a_member_only_when_done() {
        let v = View::new(5, 1, [0, 1]);
        assert!(check_member_install(0, &v, 1).is_ok());
        assert!(check_member_install(0, &v, 0).is_err());
        assert!(check_member_install(2, &v, 1).is_err());
        let mut st = member(View::new(4, 0, [0, 1]), 3);
        st.accepted = Some(crate::storage::Accepted {
            ballot: 5,
            from_epoch: 4,
            view: v.clone(),
        });
        assert_eq!(begin_member_install(&mut st, &v, ms(9)), Ok(false));
        assert!(!st.member && st.accepted.is_none());
        assert_eq!(st.last_heard, ms(9));
        assert_eq!(finish_member_install(&mut st, &v, ms(12)), Some(3));
        assert!(st.member);
        assert!(begin_member_install(&mut st, &View::new(4, 0, [0, 1]), ms(9)).is_err());
        let _ = st.adopt_view(View::new(6, 1, [0, 1]));
        assert_eq!(
            finish_member_install(&mut st, &v, ms(12)),
            None,
            "superseded"
        );
    }

    #[test]
    fn only_an_authoritative_source_with_the_committed_prefix_serves_a_transfer() {
        let v = View::new(5, 0, [0, 1]);
        let p = primary(v.clone(), 10, ms(0));
        assert_eq!(transfer_source(&p, 0, 0, 10).unwrap().applied, 10);
        assert_eq!(
            transfer_source(&p, 0, 0, 11),
            Err(TransferRefusal::Short {
                applied: 10,
                since: 11
            })
        );
        let b = member(v.clone(), 10);
        assert_eq!(
            transfer_source(&b, 1, 0, 0),
            Err(TransferRefusal::NotAuthoritative)
        );
        assert!(
            transfer_source(&b, 1, 6, 0).is_ok(),
            "reconcile of a newer view"
        );
        assert!(
            transfer_source(&b, 1, 4, 0).is_err(),
            "reconcile of an older view"
        );
        let mut deposed = State::restarted(v, Default::default(), None, pos(10), None, ms(0));
        assert_eq!(
            transfer_source(&deposed, 0, 0, 0),
            Err(TransferRefusal::NotAuthoritative),
            "a restarted primary is no source"
        );
        deposed.amnesiac_until = Some(4);
        assert_eq!(
            transfer_source(&deposed, 0, 6, 0),
            Err(TransferRefusal::Amnesiac)
        );
    }

    #[test]
    fn a_transfer_never_lowers_the_committed_prefix() {
        let src = Position {
            applied: 8,
            committed: 12,
            last_epoch: 3,
        };
        assert_eq!(transfer_end(8, src).unwrap().committed, 8);
        assert!(transfer_end(9, src).is_err());
    }

    #[test]
    fn a_joiner_joins_only_a_primary_and_only_when_close() {
        let p = primary(View::new(5, 0, [0, 1]), JOIN_WINDOW + 10, ms(0));
        assert_eq!(check_join(&p, 0, 3, 2, 10), Ok(()));
        assert_eq!(check_join(&p, 0, 3, 2, 9), Err("catch up first"));
        assert_eq!(check_join(&p, 0, 3, 3, 10), Err("unknown peer"));
        assert_eq!(check_join(&p, 0, 3, 0, 10), Err("unknown peer"));
        let b = member(View::new(5, 0, [0, 1]), 0);
        assert_eq!(check_join(&b, 1, 3, 2, 0), Err("not the primary"));
    }

    #[test]
    fn only_a_server_of_the_configuration_joins() {
        let servers = (0..4).map(|r| crate::types::ServerAddr {
            client: format!("h:{r}"),
            peer: format!("h:{}", r + 100),
        });
        let mut config = crate::types::Configuration::seed(servers);
        config.servers.remove(&2);
        let v = View::new(5, 0, [0, 1]).with_config(Some(config));
        let p = primary(v, 10, ms(0));
        assert_eq!(check_join(&p, 0, 4, 3, 10), Ok(()), "an added rank joins");
        assert_eq!(check_join(&p, 0, 4, 2, 10), Err("not in the configuration"));
    }
}
