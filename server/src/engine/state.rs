//! The replica's protocol state and its named transitions (docs/design.md §4, §5, §7,
//! §10). Each way of entering or leaving a role is written once here; the handlers of the other engine
//! modules and the async replica go through these.

use std::collections::{BTreeMap, BTreeSet};

use super::Time;
use crate::storage::{Accepted, Position, Promise};
use crate::types::{Rank, View};

/// A member's replication progress as its primary tracks it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Highest lsn the member acknowledged.
    pub acked: u64,
    /// Send time of the latest message the member acknowledged (the primary's lease), on
    /// the boot clock.
    pub ack_sent_at: Option<Time>,
    /// Send time of the latest message sent to it (bounds the lease it may hold), on the
    /// steady clock.
    pub last_send: Option<Time>,
    /// Highest commit point the member acknowledged receiving (bounds the GC horizon).
    pub commit_acked: u64,
}

/// What only the primary has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrimaryState {
    pub epoch: u64,
    /// When this server took the role for this view (boot clock).
    pub since: Time,
    /// A new primary waits out every lease of the previous view before serving (§5 step 5);
    /// steady clock.
    pub serve_after: Time,
    /// A removed member's lease must run out before anything commits without it (§5 step 5);
    /// steady clock.
    pub commit_after: Time,
    /// Highest lsn flushed locally.
    pub durable: u64,
    pub peers: BTreeMap<Rank, Progress>,
    /// Whether the caller was already asked to wake the commit point at the lease gate.
    pub gate_wake_scheduled: bool,
}

/// The position of the primary's stream to this member, for lease grants (§4): a message
/// grants a lease measured from when this member answered the message before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamMark {
    pub epoch: u64,
    pub msg_seq: u64,
    /// Boot clock.
    pub answered_at: Time,
}

/// Everything the protocol decides on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    /// The newest view this server knows of.
    pub view: View,
    /// Whether this server's data is a synced member state of `view`. False after a restart,
    /// after learning of a newer view, and while being installed, until a state transfer
    /// from the primary makes it one again.
    pub member: bool,
    pub promise: Promise,
    pub accepted: Option<Accepted>,
    pub pos: Position,
    /// End of the read lease the primary granted (boot clock).
    pub lease_until: Option<Time>,
    /// When this server last heard from its view's primary (appends, installs); steady clock.
    pub last_heard: Time,
    pub stream: Option<StreamMark>,
    pub primary: Option<PrimaryState>,
    /// Changes whenever this server stops being primary: writes it sequenced but had not
    /// committed then have an unknown outcome.
    pub term: u64,
    /// Ranks the primary is already trying to drop.
    pub dropping: Vec<Rank>,
    /// `Some(e)` while this server is amnesiac (docs/design.md §10): it lost its state, so it
    /// neither votes nor proposes nor serves until installed in a view newer than `e`.
    pub amnesiac_until: Option<u64>,
}

impl State {
    /// The state a server restarts with: never a member (§7), whatever it stored; it becomes
    /// one again only through an install.
    pub fn restarted(
        view: View,
        promise: Promise,
        accepted: Option<Accepted>,
        pos: Position,
        amnesiac_until: Option<u64>,
        now_steady: Time,
    ) -> State {
        State {
            view,
            member: false,
            promise,
            accepted,
            pos,
            lease_until: None,
            last_heard: now_steady,
            stream: None,
            primary: None,
            term: 0,
            dropping: Vec::new(),
            amnesiac_until,
        }
    }

    /// Gives up the primary role; true if this server was primary. Writes it sequenced but
    /// had not committed get an unknown outcome (the term changes), so the caller publishes
    /// the commit point and stops the primary's streams.
    #[must_use]
    pub fn step_down(&mut self) -> bool {
        if self.primary.take().is_some() {
            self.term += 1;
            true
        } else {
            false
        }
    }

    /// Adopts `view` without being a synced member of it (this server never received its
    /// install's state transfer): it steps down, stops serving reads and forgets its stream,
    /// and becomes a member again only through an install (§5, §7). True if it stepped down.
    #[must_use]
    pub fn adopt_view(&mut self, view: View) -> bool {
        let stepped_down = self.step_down();
        self.view = view;
        self.member = false;
        self.lease_until = None;
        self.stream = None;
        stepped_down
    }

    /// Adopts a newer view learned from a peer; false (and nothing changes) if `view` is not
    /// newer than the one held. The caller persists the view when it changed.
    #[must_use]
    pub fn learn_view(&mut self, view: View) -> LearnOutcome {
        if view.epoch <= self.view.epoch {
            return LearnOutcome::NotNewer;
        }
        if self.adopt_view(view) {
            LearnOutcome::SteppedDown
        } else {
            LearnOutcome::Adopted
        }
    }

    /// Takes the primary role for `view` with everything up to `applied` on every member.
    /// Members in `synced` hold everything applied (their install succeeded); the others
    /// count as having acknowledged nothing in this view (docs/design.md §10 "Failed installs").
    pub fn become_primary(
        &mut self,
        view: &View,
        serve_after: Time,
        commit_after: Time,
        synced: &BTreeSet<Rank>,
        now_boot: Time,
    ) {
        let applied = self.pos.applied;
        let peers = view
            .backups()
            .map(|m| {
                let acked = if synced.contains(&m) { applied } else { 0 };
                (
                    m,
                    Progress {
                        acked,
                        ..Default::default()
                    },
                )
            })
            .collect();
        self.view = view.clone();
        self.member = true;
        self.lease_until = None;
        self.stream = None;
        self.dropping.clear();
        self.primary = Some(PrimaryState {
            epoch: view.epoch,
            since: now_boot,
            serve_after,
            commit_after,
            durable: applied,
            peers,
            gate_wake_scheduled: false,
        });
    }

    /// An install made this server a synced member of `view`: an amnesiac server votes again
    /// once that view is newer than anything it heard of when it lost its state (§10). True
    /// if amnesia ended (the caller persists that).
    #[must_use]
    pub fn end_amnesia_if_past(&mut self, view: &View) -> bool {
        match self.amnesiac_until {
            Some(e) if view.epoch > e && self.member && self.view.epoch == view.epoch => {
                self.amnesiac_until = None;
                true
            }
            _ => false,
        }
    }

    /// A server without state joins the cluster it found (§10): amnesiac until installed in a
    /// view newer than `heard`, the highest epoch or ballot any peer reported.
    pub fn become_amnesiac(&mut self, newest: Option<View>, heard: u64) {
        if let Some(v) = newest {
            self.view = v;
        }
        self.member = false;
        self.amnesiac_until = Some(heard);
    }

    /// Whether this server lost its state and has not rejoined yet.
    pub fn amnesiac(&self) -> bool {
        self.amnesiac_until.is_some() && super::rule_on!(Amnesia)
    }

    /// The role shown by `Status`.
    pub fn role(&self, me: Rank) -> &'static str {
        if self.primary.is_some() {
            "primary"
        } else if !self.view.in_config(me) {
            "removed"
        } else if self.amnesiac() && !self.member {
            "amnesiac"
        } else if !self.member {
            if self.view.is_member(me) {
                "recovering"
            } else {
                "joining"
            }
        } else {
            "backup"
        }
    }
}

/// What [`State::learn_view`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LearnOutcome {
    NotNewer,
    Adopted,
    /// Adopted, and this server was primary until then.
    SteppedDown,
}

impl LearnOutcome {
    pub fn adopted(self) -> bool {
        self != LearnOutcome::NotNewer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::*;

    #[test]
    fn a_restarted_server_is_never_a_member() {
        let st = State::restarted(
            View::new(4, 0, [0, 1]),
            Default::default(),
            None,
            pos(7),
            None,
            ms(3),
        );
        assert!(!st.member);
        assert_eq!(st.primary, None);
        assert_eq!(st.lease_until, None);
        assert_eq!(st.last_heard, ms(3));
        assert_eq!(st.role(1), "recovering");
        assert_eq!(st.role(2), "joining");
    }

    #[test]
    fn stepping_down_changes_the_term_once() {
        let v = View::new(2, 0, [0, 1]);
        let mut st = primary(v, 5, ms(0));
        assert!(st.step_down());
        assert_eq!(st.term, 1);
        assert!(!st.step_down(), "a backup has nothing to give up");
        assert_eq!(st.term, 1);
    }

    #[test]
    fn adopting_a_view_drops_membership_lease_and_stream() {
        let mut st = member(View::new(2, 0, [0, 1]), 5);
        st.lease_until = Some(ms(900));
        st.stream = Some(StreamMark {
            epoch: 2,
            msg_seq: 4,
            answered_at: ms(1),
        });
        assert!(!st.adopt_view(View::new(3, 1, [1])));
        assert_eq!(st.view.epoch, 3);
        assert!(!st.member);
        assert_eq!(st.lease_until, None);
        assert_eq!(st.stream, None);
        assert_eq!(st.role(0), "joining");
    }

    #[test]
    fn learning_only_takes_newer_views_and_deposes_a_primary() {
        let v = View::new(2, 0, [0, 1]);
        let mut st = primary(v.clone(), 5, ms(0));
        assert_eq!(st.learn_view(v.clone()), LearnOutcome::NotNewer);
        assert!(st.primary.is_some());
        assert_eq!(
            st.learn_view(View::new(3, 1, [0, 1])),
            LearnOutcome::SteppedDown
        );
        assert!(st.primary.is_none());
        assert!(!st.member);
        assert_eq!(st.term, 1);
        assert_eq!(
            st.learn_view(View::new(4, 1, [1])),
            LearnOutcome::Adopted,
            "a non-primary adopts without a new term"
        );
        assert_eq!(st.term, 1);
    }

    #[test]
    fn a_new_primary_counts_only_synced_members_as_holding_its_state() {
        let v = View::new(5, 0, [0, 1, 2]);
        let mut st = member(View::new(4, 1, [0, 1, 2]), 9);
        st.lease_until = Some(ms(100));
        st.dropping.push(2);
        st.become_primary(&v, ms(10), ms(20), &[1].into(), ms(7));
        let p = st.primary.as_ref().unwrap();
        assert_eq!(p.peers[&1].acked, 9);
        assert_eq!(
            p.peers[&2].acked, 0,
            "a failed install acknowledged nothing"
        );
        assert_eq!(
            (p.serve_after, p.commit_after, p.since),
            (ms(10), ms(20), ms(7))
        );
        assert_eq!(p.durable, 9);
        assert!(st.member);
        assert_eq!(st.lease_until, None);
        assert!(st.dropping.is_empty());
        assert_eq!(st.view, v);
    }

    #[test]
    fn amnesia_ends_only_as_a_synced_member_of_a_newer_view() {
        let mut st = member(View::new(3, 0, [0, 1]), 0);
        st.become_amnesiac(Some(View::new(6, 0, [0])), 7);
        assert!(st.amnesiac());
        assert_eq!(st.view.epoch, 6);
        assert_eq!(st.role(1), "amnesiac");
        // Not a member yet.
        assert!(!st.end_amnesia_if_past(&View::new(8, 0, [0, 1])));
        st.view = View::new(7, 0, [0, 1]);
        st.member = true;
        assert!(
            !st.end_amnesia_if_past(&View::new(7, 0, [0, 1])),
            "a view it may have voted in before it lost its state"
        );
        st.view = View::new(8, 0, [0, 1]);
        assert!(
            !st.end_amnesia_if_past(&View::new(9, 0, [0, 1])),
            "not the view it holds"
        );
        assert!(st.end_amnesia_if_past(&View::new(8, 0, [0, 1])));
        assert!(!st.amnesiac());
    }
}
