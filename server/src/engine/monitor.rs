//! Failure detection and revival timing (docs/design.md §5 "Who proposes", §7): when a backup
//! takes over from a silent primary, when a non-member tries to rejoin, and which members a
//! primary keeps trying to drop.

use std::time::Duration;

use super::{Now, State};
use crate::config::Timing;
use crate::types::{Rank, View};

/// Stagger per rank of distance after the old primary, so the next rank proposes first (the
/// classic `(primary + 1) % n` order) and duelling proposers are rare (§5).
pub const TAKEOVER_STAGGER: Duration = Duration::from_millis(150);

/// What one tick of the monitor should do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tick {
    /// Members (with the primary term) that have acknowledged nothing for 2·L(1+eps): drop
    /// them again (a drop that found no quorum is not forgotten).
    pub stuck: Vec<(Rank, u64)>,
    /// The primary went silent: propose a take-over.
    pub takeover: bool,
    /// Not a synced member: catch up and ask to join.
    pub rejoin: bool,
}

/// The monitor's decision at `now` for server `me` of `n`.
pub fn tick(st: &State, me: Rank, n: usize, timing: &Timing, now: Now) -> Tick {
    let stuck = match &st.primary {
        Some(p) => {
            let limit = timing.lease_guard() * 2;
            st.view
                .backups()
                .filter(|m| {
                    let last = p
                        .peers
                        .get(m)
                        .and_then(|x| x.ack_sent_at)
                        .unwrap_or(p.since);
                    now.boot > last + limit
                })
                .map(|m| (m, p.epoch))
                .collect()
        }
        None => Vec::new(),
    };
    let in_view = st.view.is_member(me) && !st.amnesiac();
    let silent = now.steady > st.last_heard + timing.lease_guard() + stagger(&st.view, me, n);
    // docs/design.md §11: a server removed from the configuration neither leads nor rejoins.
    let configured = st.view.in_config(me);
    let takeover = st.primary.is_none() && in_view && st.view.primary != me && silent && configured;
    Tick {
        stuck,
        takeover,
        rejoin: !st.member && !takeover && configured,
    }
}

/// How much longer than L(1+eps) `me` waits before it takes over from `view`'s primary: its
/// rank distance after the primary, times [`TAKEOVER_STAGGER`].
pub fn stagger(view: &View, me: Rank, n: usize) -> Duration {
    let n = n.max(1);
    let distance = (me as usize + n - view.primary as usize % n) % n;
    TAKEOVER_STAGGER * distance as u32
}

/// What a revival attempt does (§7), once the newest view is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejoin {
    /// A restarted primary never resumes silently: it runs a view change.
    Restart,
    /// The view names this server primary, but it lost its state: another member must take
    /// over first, then it joins (§10).
    WaitForTakeOver,
    /// Catch up from the view's primary, then ask it to join.
    CatchUpFrom(Rank),
}

pub fn rejoin(st: &State, me: Rank) -> Rejoin {
    match st.view.primary {
        p if p == me && st.amnesiac() => Rejoin::WaitForTakeOver,
        p if p == me => Rejoin::Restart,
        p => Rejoin::CatchUpFrom(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::*;
    use crate::engine::Time;

    #[test]
    fn a_removed_server_neither_takes_over_nor_rejoins() {
        let mut v = View::new(3, 0, [0, 1, 2]).with_config(Some(
            crate::types::Configuration::seed((0..3).map(|r| crate::types::ServerAddr {
                client: format!("h:{r}"),
                peer: format!("h:{}", r + 100),
            })),
        ));
        let long_after = Now {
            boot: ms(60_000),
            steady: ms(60_000),
        };
        let st = member(v.clone(), 5);
        assert!(
            tick(&st, 1, 3, &timing(), long_after).takeover,
            "a configured backup would"
        );
        v.config.as_mut().unwrap().servers.remove(&1);
        let st = member(v.clone(), 5);
        let t = tick(&st, 1, 3, &timing(), long_after);
        assert!(!t.takeover && !t.rejoin);
        let mut outside = member(v, 5);
        outside.member = false;
        assert!(!tick(&outside, 1, 3, &timing(), long_after).rejoin);
    }

    #[test]
    fn the_next_rank_after_the_primary_takes_over_first() {
        let t = timing();
        let v = View::new(3, 1, [0, 1, 2, 3]);
        assert_eq!(stagger(&v, 2, 4), TAKEOVER_STAGGER);
        assert_eq!(stagger(&v, 3, 4), TAKEOVER_STAGGER * 2);
        assert_eq!(stagger(&v, 0, 4), TAKEOVER_STAGGER * 3);
        let mut b = member(v.clone(), 0);
        b.last_heard = ms(1000);
        let guard_end = 1000 + t.lease_guard().as_millis() as u64 + 150;
        assert!(!tick(&b, 2, 4, &t, Now::at(ms(guard_end))).takeover);
        assert!(tick(&b, 2, 4, &t, Now::at(ms(guard_end + 1))).takeover);
        assert!(!tick(&b, 3, 4, &t, Now::at(ms(guard_end + 1))).takeover);
        assert!(tick(&b, 3, 4, &t, Now::at(ms(guard_end + 151))).takeover);
    }

    #[test]
    fn only_a_backup_of_the_view_with_its_state_takes_over() {
        let t = timing();
        let v = View::new(3, 1, [0, 1, 2]);
        let late = Now::at(ms(60_000));
        let mut b = member(v.clone(), 0);
        b.amnesiac_until = Some(3);
        let k = tick(&b, 2, 3, &t, late);
        assert!(!k.takeover, "an amnesiac server never proposes (§10)");
        assert!(!k.rejoin, "a synced member has nothing to rejoin");
        let outsider = member(View::new(3, 1, [1, 2]), 0);
        assert!(!tick(&outsider, 0, 3, &t, late).takeover);
        let p = primary(v.clone(), 0, ms(60_000));
        assert!(!tick(&p, 1, 3, &t, late).takeover);
        let mut recovering = member(v, 0);
        recovering.member = false;
        let k = tick(&recovering, 2, 3, &t, late);
        assert!(
            k.takeover && !k.rejoin,
            "a restarted backup may still take over"
        );
        recovering.last_heard = ms(60_000);
        assert!(tick(&recovering, 2, 3, &t, late).rejoin);
    }

    #[test]
    fn a_primary_retries_dropping_members_silent_for_two_lease_guards() {
        let t = timing();
        let mut p = primary(View::new(3, 0, [0, 1, 2]), 0, ms(0));
        let limit = t.lease_guard().as_millis() as u64 * 2;
        p.primary
            .as_mut()
            .unwrap()
            .peers
            .get_mut(&1)
            .unwrap()
            .ack_sent_at = Some(ms(500));
        assert_eq!(tick(&p, 0, 3, &t, Now::at(ms(limit))).stuck, vec![]);
        assert_eq!(
            tick(&p, 0, 3, &t, Now::at(ms(limit + 1))).stuck,
            vec![(2, 3)]
        );
        let both = tick(&p, 0, 3, &t, Now::at(ms(limit + 501)));
        assert_eq!(both.stuck, vec![(1, 3), (2, 3)]);
        let _ = Time::ZERO;
    }

    #[test]
    fn a_restarted_primary_proposes_unless_it_lost_its_state() {
        let v = View::new(3, 1, [0, 1, 2]);
        let mut st = member(v, 0);
        assert_eq!(rejoin(&st, 1), Rejoin::Restart);
        assert_eq!(rejoin(&st, 0), Rejoin::CatchUpFrom(1));
        st.amnesiac_until = Some(3);
        assert_eq!(rejoin(&st, 1), Rejoin::WaitForTakeOver);
    }
}
