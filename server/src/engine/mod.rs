//! The replica's protocol decisions as plain, synchronous code over plain data (docs/design.md
//! §4, §5, §7, §10): what to commit, whom to trust with a lease, what to promise, which view
//! to propose, when to take over, what an install or a transfer may do. No clock is read
//! here, nothing is spawned, sent or stored: every handler takes the time it runs at (`now`)
//! as a value and returns what the caller must do (persist, send, answer, wake up later).
//! The async replica (`crate::replica`) executes those answers,
//! so a deterministic simulator can drive the same decisions with simulated time.
//!
//! - [`state`]: the replica's protocol state and its named transitions (adopt a view, step
//!   down, become primary, end amnesia), each written once.
//! - [`commit`]: the commit point, the primary's lease, read permission, the GC horizon.
//! - [`append`]: both ends of the append stream: acceptance and the history check on the
//!   member, lease grants, acknowledgements and drops on the primary.
//! - [`paxos`]: the acceptor (prepare, accept) and the proposer (ballots, tallies, the value
//!   to propose, whether a proposal is still needed).
//! - [`install`]: install and reconcile rules, state-transfer sources, joins.
//! - [`membership`]: membership changes: which the primary may propose, and the
//!   configuration after one (docs/design.md §11).
//! - [`monitor`]: take-over timing, rejoin and the retry of stuck drops.
//! - [`sequencer`]: the primary sequencer's session rules (docs/design.md §6, §10).
//! - `rules` (feature `rule-switches`, tests only): switches that turn one safety rule off,
//!   so the simulator's tests can show each rule is needed.

/// Whether the safety rule `$r` ([`rules::Rule`]) is on: always, unless the crate is built
/// with the `rule-switches` feature and a test switched it off.
macro_rules! rule_on {
    ($r:ident) => {{
        #[cfg(feature = "rule-switches")]
        let on = $crate::engine::rules::on($crate::engine::rules::Rule::$r);
        #[cfg(not(feature = "rule-switches"))]
        let on = true;
        on
    }};
}
pub(crate) use rule_on;

pub mod append;
pub mod commit;
pub mod install;
pub mod membership;
pub mod monitor;
pub mod paxos;
#[cfg(feature = "rule-switches")]
pub mod rules;
pub mod sequencer;
pub mod state;

use std::ops::{Add, Sub};
use std::time::Duration;

pub use state::{PrimaryState, Progress, State, StreamMark};

/// A point in time, as a plain value: the time since an origin the caller chose. The replica
/// measures two clocks with it (docs/design.md §10 "Leases on the boot clock"): lease validity on
/// the boot clock, and waits that protect others (a new primary's wait, a backup's loyalty)
/// on the steady clock. Each field of [`State`] says which clock it is on; the engine only
/// ever compares times of one clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(Duration);

impl Time {
    pub const ZERO: Time = Time(Duration::ZERO);

    pub const fn from_duration(d: Duration) -> Time {
        Time(d)
    }

    pub const fn from_millis(ms: u64) -> Time {
        Time(Duration::from_millis(ms))
    }

    pub const fn from_nanos(ns: u64) -> Time {
        Time(Duration::from_nanos(ns))
    }

    /// Time since the origin.
    pub const fn since_origin(self) -> Duration {
        self.0
    }

    /// Time from `earlier` to `self`, or `None` if `earlier` is later.
    pub fn checked_duration_since(self, earlier: Time) -> Option<Duration> {
        self.0.checked_sub(earlier.0)
    }
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        Time(self.0 + d)
    }
}

impl Sub for Time {
    type Output = Duration;
    /// Saturates at zero, like `Instant`'s subtraction.
    fn sub(self, earlier: Time) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

/// The current time on both clocks the protocol uses (see [`Time`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Now {
    /// The steady clock (`CLOCK_MONOTONIC`, what `Instant` reads): waits that protect others.
    pub steady: Time,
    /// The boot clock: lease validity.
    pub boot: Time,
}

impl Now {
    /// Both clocks at `t` (tests and simulations, where the clocks do not drift apart).
    pub fn at(t: Time) -> Now {
        Now { steady: t, boot: t }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Small builders shared by the engine's tests.
    use super::*;
    use crate::config::Timing;
    use crate::storage::Position;
    use crate::types::View;

    pub fn ms(n: u64) -> Time {
        Time::from_millis(n)
    }

    pub fn timing() -> Timing {
        Timing {
            lease: Duration::from_millis(500),
            heartbeat: Duration::from_millis(100),
            ack_timeout: Duration::from_millis(250),
        }
    }

    /// A synced member (not primary) of `view`, at `applied` everything committed.
    pub fn member(view: View, applied: u64) -> State {
        let mut st = State::restarted(
            view.clone(),
            Default::default(),
            None,
            pos(applied),
            None,
            Time::ZERO,
        );
        st.member = true;
        st.pos.last_epoch = view.epoch;
        st
    }

    pub fn pos(applied: u64) -> Position {
        Position {
            applied,
            committed: applied,
            last_epoch: 1,
        }
    }

    /// The primary of `view`, every backup synced at `applied`, serving from `at`.
    pub fn primary(view: View, applied: u64, at: Time) -> State {
        let mut st = member(view.clone(), applied);
        st.become_primary(&view, at, at, &view.backups().collect(), at);
        st
    }
}
