//! The simulator replays a seed exactly, finds nothing wrong with every rule on, and finds a
//! violation within the CI seed budget when any one safety rule is switched off
//! (docs/simulator.md has the table).

use std::time::Duration;

use replikv_server::engine::rules::{self, Rule};
use replikv_sim::{run, Config, Report};

/// Seeds a rule-switch test may try before it must have found a violation.
const BUDGET: u64 = 400;

fn cfg(seed: u64) -> Config {
    Config::new(seed)
}

/// The default fault model plus the retrying proxy on the append stream.
fn with_retries(seed: u64) -> Config {
    Config {
        proxy_retries: true,
        ..Config::new(seed)
    }
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let a = run(cfg(7));
    let b = run(cfg(7));
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!((a.events, a.ops), (b.events, b.ops));
    assert_ne!(a.trace_hash, run(cfg(8)).trace_hash);
    assert!(a.ops > 100, "clients made progress: {} ops", a.ops);
    assert!(
        a.acked_writes > 20,
        "writes were acknowledged: {}",
        a.acked_writes
    );
}

#[test]
fn a_traced_run_is_the_same_run() {
    let plain = run(cfg(3));
    let traced = run(Config {
        trace: true,
        ..cfg(3)
    });
    assert_eq!(plain.trace_hash, traced.trace_hash);
}

/// The retrying proxy is off by default, and draws nothing from the run's generator: a run
/// where it sent no copy is the same run as without it.
#[test]
fn the_retrying_proxy_changes_a_run_only_through_its_copies() {
    let mut retried = 0;
    for seed in 0..10 {
        let plain = run(cfg(seed));
        assert_eq!(plain.proxy_retries, 0);
        let r = run(with_retries(seed));
        if r.proxy_retries == 0 {
            assert_eq!(r.trace_hash, plain.trace_hash, "seed {seed}");
        } else {
            assert_ne!(r.trace_hash, plain.trace_hash, "seed {seed}");
            assert_eq!(r.trace_hash, run(with_retries(seed)).trace_hash);
            retried += 1;
        }
    }
    assert!(
        retried >= 3,
        "paused members' appends were sent again: {retried}/10 seeds"
    );
}

/// Runs `seeds` with every rule on: no violation, every run to its end, most settled.
fn all_clean(seeds: std::ops::Range<u64>, cfg: fn(u64) -> Config, flag: &str) {
    let mut settled = 0;
    let count = seeds.end - seeds.start;
    for seed in seeds {
        let r = run(cfg(seed));
        assert!(
            r.violations.is_empty(),
            "seed {seed}: {:?}\nreproduce: replikv-sim --seed {seed}{flag}",
            r.violations
        );
        assert_eq!(
            r.simulated,
            Duration::from_secs(75),
            "seed {seed} ran to its end"
        );
        settled += u64::from(!r.unsettled);
    }
    assert!(
        settled * 4 >= count * 3,
        "most runs end with a settled cluster: {settled}/{count}"
    );
}

#[test]
fn no_seed_violates_an_invariant_with_every_rule_on() {
    all_clean(0..120, cfg, "");
    all_clean(0..60, with_retries, " --proxy-retries");
}

/// The first seed (from 0) at which the simulator reports a violation with `rule` off; the
/// same seed must pass with the rule on, so the switch is what broke it.
fn first_failing(rule: Rule) -> (u64, Report) {
    first_failing_with(rule, cfg)
}

/// [`first_failing`] under the fault model `cfg` makes.
fn first_failing_with(rule: Rule, cfg: fn(u64) -> Config) -> (u64, Report) {
    for seed in 0..BUDGET {
        rules::set(rule, false);
        let r = run(cfg(seed));
        rules::reset();
        if !r.violations.is_empty() {
            let on = run(cfg(seed));
            assert!(
                on.violations.is_empty(),
                "seed {seed} fails even with {rule:?} on: {:?}",
                on.violations
            );
            println!("{rule:?}: first failing seed {seed}: {:?}", r.violations);
            return (seed, r);
        }
    }
    panic!("no violation within {BUDGET} seeds with {rule:?} off");
}

fn caught(r: &Report, what: &[&str]) -> bool {
    r.violations
        .iter()
        .any(|v| what.iter().any(|w| v.contains(w)))
}

#[test]
fn without_the_quorum_rule_two_primaries_commit() {
    let (_, r) = first_failing(Rule::Quorum);
    assert!(caught(
        &r,
        &["two primaries", "linearizable", "lost", "diverged"]
    ));
}

/// A member paused with a heartbeat waiting, and the proxy's copy of it behind: with any
/// message granting, the copy grants a lease measured from the answer to the original,
/// given long after the primary sent it, and the member, dropped from the view meanwhile,
/// serves stale reads beside the primary's new writes.
#[test]
fn without_consecutive_leases_a_retried_heartbeat_outlives_the_primary() {
    let (_, r) = first_failing_with(Rule::ConsecutiveLease, with_retries);
    assert!(caught(&r, &["linearizable"]));
    assert!(r.proxy_retries > 0);
}

#[test]
fn without_the_pending_key_rule_reads_go_back_in_time() {
    let (_, r) = first_failing(Rule::PendingRead);
    assert!(caught(&r, &["linearizable"]));
}

#[test]
fn without_the_lease_wait_a_new_primary_serves_beside_old_leases() {
    let (_, r) = first_failing(Rule::InstallWait);
    assert!(caught(&r, &["linearizable", "lost"]));
}

#[test]
fn without_the_history_check_a_stray_append_rewrites_a_member() {
    let (_, r) = first_failing(Rule::HistoryCheck);
    assert!(caught(&r, &["linearizable", "lost", "diverged"]));
}

#[test]
fn without_amnesia_a_wiped_server_votes_away_a_decision() {
    let (_, r) = first_failing(Rule::Amnesia);
    assert!(caught(
        &r,
        &["linearizable", "lost", "diverged", "two primaries", "epoch"]
    ));
}

#[test]
fn without_session_dedup_a_retried_write_applies_twice() {
    let (_, r) = first_failing(Rule::SessionDedup);
    assert!(caught(&r, &["linearizable"]));
}

#[test]
fn without_every_member_acking_a_failover_loses_writes() {
    let (_, r) = first_failing(Rule::CommitAllMembers);
    assert!(caught(&r, &["linearizable", "lost", "diverged"]));
}

/// Seeds that found real bugs, kept as regressions (docs/simulator.md "Bugs found").
#[test]
fn regression_seeds_stay_clean() {
    // A stray copy of an old append moved the member's stream mark, so the next message
    // granted a lease measured from the copy's answer, past the primary's own lease.
    // A decided primary finished its install after promising the next instance's proposer.
    // A re-run of an old, decided instance re-stamped its value with the new ballot, so the
    // same view came back with an epoch above the views decided after it, and an amnesiac
    // server was made primary of a two-member view it had left alone before its disk was lost.
    for seed in [592, 1533, 3457, 7061] {
        let r = run(cfg(seed));
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
    }
    // The simulator's own hole: a server that lost its disk restarted its call ids at 1, and
    // a partitioned peer's late answer to a forward of the server's earlier life was taken
    // as the answer to the new forward with the same id (a delete returned another key's
    // value). Real calls end with the process; ids now carry the incarnation.
    let r = run(Config {
        proxy_retries: true,
        ..cfg(6_035_502_779)
    });
    assert!(
        r.violations.is_empty(),
        "seed 6035502779: {:?}",
        r.violations
    );
}
