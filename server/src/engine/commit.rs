//! The primary's commit point and lease, read permission, and the tombstone-collection
//! horizon (docs/design.md §3, §4, §5 step 5).

use std::time::Duration;

use super::{Now, State, Time};

/// What [`advance_commit`] asks of the caller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Advance {
    /// The commit point moved: wake the writes and reads waiting on it.
    pub moved: bool,
    /// Call [`advance_commit`] again at this time (steady clock): a lease gate is still
    /// closed. Asked once per gate.
    pub wake_at: Option<Time>,
    /// Tombstones up to here may be collected.
    pub collect_up_to: Option<u64>,
}

/// Moves the commit point to the highest lsn every member of the view has acknowledged and
/// this server has made durable (§2, §4), once the lease gates allow (§5 step 5): a new
/// primary waits out the old view's leases, and a primary that removed a member waits out
/// that member's lease before anything commits without it.
pub fn advance_commit(st: &mut State, now_steady: Time) -> Advance {
    let mut out = Advance::default();
    let committed = st.pos.committed;
    let Some(p) = st.primary.as_mut() else {
        return out;
    };
    let gate = p.serve_after.max(p.commit_after);
    if now_steady < gate {
        if !p.gate_wake_scheduled {
            p.gate_wake_scheduled = true;
            out.wake_at = Some(gate);
        }
        return out;
    }
    let every_member = super::rule_on!(CommitAllMembers);
    let c = st.view.backups().fold(p.durable, |c, m| {
        if every_member {
            c.min(p.peers.get(&m).map_or(0, |x| x.acked))
        } else {
            c
        }
    });
    if c > committed {
        st.pos.committed = c;
        out.moved = true;
    }
    out.collect_up_to = Some(gc_horizon(st));
    out
}

/// The wake-up asked for by [`Advance::wake_at`] happened.
pub fn gate_woke(st: &mut State) {
    if let Some(p) = st.primary.as_mut() {
        p.gate_wake_scheduled = false;
    }
}

/// Remaining lease of the primary (§4): until `min over members (send time of the latest
/// message it acked) + L`, and only once the new-primary wait is over (§5 step 5). A view
/// with a single member needs no lease.
pub fn primary_lease(st: &State, lease: Duration, now: Now) -> Option<Duration> {
    let p = st.primary.as_ref()?;
    if now.steady < p.serve_after {
        return None;
    }
    let mut until: Option<Time> = None;
    for m in st.view.backups() {
        let t = p.peers.get(&m)?.ack_sent_at? + lease;
        until = Some(until.map_or(t, |u| u.min(t)));
    }
    match until {
        None => Some(lease),
        Some(u) if u > now.boot => Some(u - now.boot),
        Some(_) => None,
    }
}

/// Remaining read lease of a backup: only a synced member holds one.
pub fn backup_lease(st: &State, now_boot: Time) -> Option<Duration> {
    st.lease_until
        .filter(|_| st.member)
        .and_then(|u| u.checked_duration_since(now_boot))
}

/// Whether this server may answer reads now (§4): the primary with its lease, a synced
/// member with the lease its primary granted. An amnesiac server is no member (§10).
pub fn can_read(st: &State, lease: Duration, now: Now) -> bool {
    if st.primary.is_some() {
        primary_lease(st, lease, now).is_some()
    } else {
        st.member && st.lease_until.is_some_and(|u| u > now.boot)
    }
}

/// Why this server may not answer reads now; `None` if it may.
pub fn read_refusal(st: &State, lease: Duration, now: Now) -> Option<&'static str> {
    if can_read(st, lease, now) {
        None
    } else if !st.member {
        Some("this server is recovering")
    } else if st.primary.is_some() {
        Some("primary lease not (yet) valid")
    } else {
        Some("no read lease from the primary")
    }
}

/// Whether a read of a key last written at `lsn` must wait for its commit notice (§4): a
/// pending key could otherwise be read new at one server and old at another.
pub fn read_is_pending(st: &State, lsn: u64) -> bool {
    lsn > st.pos.committed && super::rule_on!(PendingRead)
}

/// The tombstone-collection horizon of the primary (docs/design.md §3): the lowest commit point a
/// member acknowledged receiving, and its own. Every member's commit point is at or above
/// every member's horizon, so a transfer between members (a view change's reconcile,
/// `since` = the receiver's commit point) is never forced to be full.
pub fn gc_horizon(st: &State) -> u64 {
    let Some(p) = st.primary.as_ref() else {
        return 0;
    };
    st.view.backups().fold(st.pos.committed, |h, m| {
        h.min(p.peers.get(&m).map_or(0, |x| x.commit_acked))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::*;
    use crate::types::View;

    const L: Duration = Duration::from_millis(500);

    fn ack(st: &mut State, m: u32, lsn: u64, sent_at: Time) {
        let p = st.primary.as_mut().unwrap().peers.get_mut(&m).unwrap();
        p.acked = lsn;
        p.ack_sent_at = Some(sent_at);
    }

    #[test]
    fn commit_needs_every_member_and_the_primary_durable() {
        let mut st = primary(View::new(2, 0, [0, 1, 2]), 10, ms(0));
        st.pos.applied = 15;
        st.primary.as_mut().unwrap().durable = 15;
        ack(&mut st, 1, 15, ms(1));
        let a = advance_commit(&mut st, ms(5));
        assert!(!a.moved, "member 2 has not acknowledged lsn 11..15");
        assert_eq!(st.pos.committed, 10);
        ack(&mut st, 2, 13, ms(1));
        assert!(advance_commit(&mut st, ms(5)).moved);
        assert_eq!(st.pos.committed, 13);
        ack(&mut st, 2, 15, ms(1));
        st.primary.as_mut().unwrap().durable = 14;
        advance_commit(&mut st, ms(5));
        assert_eq!(st.pos.committed, 14, "not past what the primary flushed");
    }

    #[test]
    fn the_commit_point_never_moves_back() {
        let mut st = primary(View::new(2, 0, [0, 1]), 10, ms(0));
        ack(&mut st, 1, 3, ms(1));
        assert!(!advance_commit(&mut st, ms(5)).moved);
        assert_eq!(st.pos.committed, 10);
    }

    #[test]
    fn a_single_member_view_commits_what_it_flushed() {
        let mut st = primary(View::new(2, 0, [0]), 0, ms(0));
        st.pos.applied = 4;
        st.primary.as_mut().unwrap().durable = 4;
        assert!(advance_commit(&mut st, ms(1)).moved);
        assert_eq!(st.pos.committed, 4);
        assert_eq!(
            primary_lease(&st, L, Now::at(ms(1))),
            Some(L),
            "no lease needed with nobody to grant one"
        );
    }

    /// Regression F1 (tests/regressions.rs `install_after_dropping_a_member_waits_out_its_lease`):
    /// nothing commits without a removed member until its lease has run out.
    #[test]
    fn lease_gates_hold_the_commit_point_and_ask_for_one_wake_up() {
        let mut st = primary(View::new(2, 0, [0, 1]), 10, ms(0));
        st.primary.as_mut().unwrap().commit_after = ms(600);
        st.primary.as_mut().unwrap().durable = 12;
        ack(&mut st, 1, 12, ms(1));
        let a = advance_commit(&mut st, ms(100));
        assert_eq!(a.wake_at, Some(ms(600)));
        assert!(!a.moved);
        assert_eq!(st.pos.committed, 10);
        assert_eq!(advance_commit(&mut st, ms(200)).wake_at, None, "asked once");
        gate_woke(&mut st);
        let a = advance_commit(&mut st, ms(600));
        assert!(a.moved);
        assert_eq!(st.pos.committed, 12);
        st.primary.as_mut().unwrap().serve_after = ms(900);
        st.primary.as_mut().unwrap().durable = 13;
        ack(&mut st, 1, 13, ms(1));
        assert_eq!(advance_commit(&mut st, ms(700)).wake_at, Some(ms(900)));
    }

    #[test]
    fn primary_lease_runs_from_the_oldest_acknowledged_send() {
        let mut st = primary(View::new(2, 0, [0, 1, 2]), 0, ms(0));
        assert_eq!(primary_lease(&st, L, Now::at(ms(1))), None, "no acks yet");
        ack(&mut st, 1, 0, ms(100));
        assert_eq!(
            primary_lease(&st, L, Now::at(ms(101))),
            None,
            "member 2 silent"
        );
        ack(&mut st, 2, 0, ms(300));
        assert_eq!(
            primary_lease(&st, L, Now::at(ms(400))),
            Some(Duration::from_millis(200))
        );
        assert_eq!(primary_lease(&st, L, Now::at(ms(600))), None);
        assert!(!can_read(&st, L, Now::at(ms(600))));
        assert!(can_read(&st, L, Now::at(ms(599))));
    }

    #[test]
    fn a_new_primary_serves_no_reads_before_the_old_leases_ran_out() {
        let mut st = primary(View::new(2, 0, [0, 1]), 0, ms(0));
        st.primary.as_mut().unwrap().serve_after = ms(550);
        ack(&mut st, 1, 0, ms(500));
        assert_eq!(primary_lease(&st, L, Now::at(ms(549))), None);
        assert!(primary_lease(&st, L, Now::at(ms(550))).is_some());
        assert_eq!(
            read_refusal(&st, L, Now::at(ms(549))),
            Some("primary lease not (yet) valid")
        );
    }

    #[test]
    fn the_lease_is_on_the_boot_clock_and_the_wait_on_the_steady_one() {
        let mut st = primary(View::new(2, 0, [0, 1]), 0, ms(0));
        st.primary.as_mut().unwrap().serve_after = ms(100);
        ack(&mut st, 1, 0, ms(1000));
        // The boot clock ran on through a suspend the steady clock did not see.
        let after_suspend = Now {
            steady: ms(200),
            boot: ms(5000),
        };
        assert_eq!(primary_lease(&st, L, after_suspend), None);
    }

    #[test]
    fn a_backup_reads_only_as_a_synced_member_with_a_lease() {
        let mut st = member(View::new(2, 0, [0, 1]), 3);
        assert_eq!(
            read_refusal(&st, L, Now::at(ms(1))),
            Some("no read lease from the primary")
        );
        st.lease_until = Some(ms(300));
        assert!(can_read(&st, L, Now::at(ms(299))));
        assert!(!can_read(&st, L, Now::at(ms(300))));
        assert_eq!(backup_lease(&st, ms(100)), Some(Duration::from_millis(200)));
        st.member = false;
        assert!(!can_read(&st, L, Now::at(ms(1))));
        assert_eq!(backup_lease(&st, ms(100)), None);
        assert_eq!(
            read_refusal(&st, L, Now::at(ms(1))),
            Some("this server is recovering")
        );
    }

    #[test]
    fn a_key_newer_than_the_commit_point_is_pending() {
        let st = member(View::new(2, 0, [0, 1]), 3);
        assert!(!read_is_pending(&st, 3));
        assert!(read_is_pending(&st, 4));
    }

    #[test]
    fn gc_horizon_is_the_lowest_commit_point_any_member_received() {
        let mut st = primary(View::new(2, 0, [0, 1, 2]), 20, ms(0));
        assert_eq!(gc_horizon(&st), 0);
        for (m, c) in [(1, 15), (2, 12)] {
            st.primary
                .as_mut()
                .unwrap()
                .peers
                .get_mut(&m)
                .unwrap()
                .commit_acked = c;
        }
        assert_eq!(gc_horizon(&st), 12);
        st.pos.committed = 5;
        assert_eq!(gc_horizon(&st), 5, "never past its own commit point");
        assert_eq!(gc_horizon(&member(View::new(2, 0, [0, 1]), 3)), 0);
    }
}
