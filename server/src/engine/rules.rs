//! Switches that turn one safety rule off, for the simulator's tests only (feature
//! `rule-switches`; without it this module does not exist and every rule is always on). Each
//! switch is a per-thread flag that defaults to "rule on", so tests running side by side in
//! one process do not see each other's switches. A test turns one rule off and shows that
//! the simulator reports a violation (docs/simulator.md).

use std::cell::Cell;

/// The safety rules that can be switched off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    /// §2: a quorum is more than half, or exactly half with the primary.
    Quorum,
    /// §4: only consecutive messages of one stream grant a lease.
    ConsecutiveLease,
    /// §4: a key above the commit point is pending and is not read.
    PendingRead,
    /// §5 step 5: a new primary waits out the old view's leases (and a removed member's).
    InstallWait,
    /// §4, §10: an append must continue the member's log (lsn and epoch of the record before).
    HistoryCheck,
    /// §10: a server that lost its state neither votes, proposes nor serves until rejoined.
    Amnesia,
    /// §6: a retried write of a session is answered from its recorded result, not applied.
    SessionDedup,
    /// §2, §4: a write commits only when every member acknowledged it.
    CommitAllMembers,
}

impl Rule {
    pub const ALL: [Rule; 8] = [
        Rule::Quorum,
        Rule::ConsecutiveLease,
        Rule::PendingRead,
        Rule::InstallWait,
        Rule::HistoryCheck,
        Rule::Amnesia,
        Rule::SessionDedup,
        Rule::CommitAllMembers,
    ];

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

thread_local! {
    static OFF: Cell<u32> = const { Cell::new(0) };
}

/// Whether `rule` is on in this thread (the default).
pub fn on(rule: Rule) -> bool {
    OFF.with(|off| off.get() & rule.bit() == 0)
}

/// Turns `rule` on or off in this thread.
pub fn set(rule: Rule, on: bool) {
    OFF.with(|off| {
        let v = off.get();
        off.set(if on { v & !rule.bit() } else { v | rule.bit() });
    });
}

/// Turns every rule back on in this thread.
pub fn reset() {
    OFF.with(|off| off.set(0));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_on_until_switched_off_and_per_thread() {
        for r in Rule::ALL {
            assert!(on(r));
        }
        set(Rule::Quorum, false);
        assert!(!on(Rule::Quorum) && on(Rule::Amnesia));
        std::thread::spawn(|| assert!(on(Rule::Quorum)))
            .join()
            .unwrap();
        reset();
        assert!(on(Rule::Quorum));
    }
}
