//! Watches every server's `Status` during the run for invariants of docs/design.md
//! §2, §8 and §10 that a client history cannot show: a server's view epoch
//! never decreases (across restarts too, since views are persisted), no two
//! servers are primary of the same epoch, and a server whose data was wiped
//! serves again only once it has rejoined the cluster it belonged to (a view
//! at least as new as any seen before the wipe), never a cluster of its own.
//!
//! A wiped server's epochs start anew: its history is cut at the moment the
//! nemesis wiped it (the process was dead by then), and answers to probes
//! sent before that moment are dropped, so an answer of the old process is
//! never taken for one of the new.

use std::collections::BTreeMap;
use std::time::Duration;

use replikv_proto::kv::StatusResponse;
use replikv_testkit::status::StatusProbe;
use tokio::sync::{mpsc, watch};

use super::history::Clock;
use super::nemesis::Amnesia;

/// Time between two rounds of probes.
const INTERVAL: Duration = Duration::from_millis(100);
/// Deadline of one probe, connection included; a paused or dead server just
/// misses the round.
const PROBE_DEADLINE: Duration = Duration::from_millis(300);

/// What one server looked like over the run.
#[derive(Debug, Clone, Default)]
pub struct ServerTrace {
    pub samples: u64,
    pub first_epoch: Option<u64>,
    pub last_epoch: u64,
    /// Times its data was wiped.
    pub wipes: u64,
    /// Answers to probes sent before this moment (ns on the run clock) are
    /// from a process whose data is gone.
    ignore_before: u64,
    /// After a wipe: the newest epoch seen anywhere before it. The server
    /// must not serve in an older view; cleared once it serves in this one
    /// or a newer one.
    rejoin_floor: Option<u64>,
}

/// The monitor's findings.
#[derive(Debug, Clone, Default)]
pub struct Observations {
    pub servers: Vec<ServerTrace>,
    /// Human-readable violations, in the order they were seen.
    pub violations: Vec<String>,
    /// For each epoch, its primary and the server that first reported it.
    pub primaries: BTreeMap<u64, (usize, usize)>,
    /// Wiped servers that served before they had rejoined.
    pub amnesia_violations: Vec<String>,
    /// Wiped servers seen serving again in a current view.
    pub rejoins: u64,
}

impl Observations {
    fn new(n: usize) -> Self {
        Self {
            servers: vec![ServerTrace::default(); n],
            ..Default::default()
        }
    }

    /// Starts the history of a server whose data was wiped at `at` anew.
    pub fn forget(&mut self, wiped: Amnesia) {
        let newest = self.servers.iter().map(|t| t.last_epoch).max().unwrap_or(0);
        let newest = newest.max(self.primaries.keys().next_back().copied().unwrap_or(0));
        let Some(trace) = self.servers.get_mut(wiped.rank) else {
            return;
        };
        trace.wipes += 1;
        trace.samples = 0;
        trace.last_epoch = 0;
        trace.ignore_before = wiped.at;
        trace.rejoin_floor = Some(newest);
    }

    /// Folds one status answer from `rank` to a probe sent at `sent` and
    /// answered by `at` (ns on the run clock).
    pub fn record(&mut self, rank: usize, status: &StatusResponse, sent: u64, at: u64) {
        let epoch = status.view.as_ref().map_or(0, |v| v.epoch);
        let seconds = at as f64 / 1e9;
        let Some(trace) = self.servers.get_mut(rank) else {
            return;
        };
        if sent < trace.ignore_before {
            return;
        }
        let member = matches!(status.role.as_str(), "primary" | "backup");
        if let Some(floor) = trace.rejoin_floor {
            if (status.serving || member) && epoch < floor {
                self.amnesia_violations.push(format!(
                    "server {rank} lost its data, then acted as {} (serving {}) in epoch {epoch}, older than epoch {floor} seen before the wipe (at {seconds:.3} s)",
                    status.role, status.serving
                ));
            } else if status.serving && member {
                trace.rejoin_floor = None;
                self.rejoins += 1;
            }
        }
        if trace.samples > 0 && epoch < trace.last_epoch {
            self.violations.push(format!(
                "server {rank}: epoch went back from {} to {epoch} at {seconds:.3} s (role {})",
                trace.last_epoch, status.role
            ));
        }
        trace.samples += 1;
        trace.first_epoch.get_or_insert(epoch);
        trace.last_epoch = epoch;
        let Some(view) = &status.view else {
            return;
        };
        let primary = view.primary as usize;
        if status.role == "primary" && primary != rank {
            self.violations.push(format!(
                "server {rank} says it is primary, but its view of epoch {epoch} names server {primary} (at {seconds:.3} s)"
            ));
        }
        // One decided view per epoch: whoever reports epoch e must name the
        // same primary.
        let (first, reporter) = *self.primaries.entry(epoch).or_insert((primary, rank));
        if first != primary {
            self.violations.push(format!(
                "epoch {epoch} has two primaries: server {reporter} names server {first}, server {rank} names server {primary} (at {seconds:.3} s)"
            ));
        }
    }
}

/// Polls every server until `stop` turns true; returns what it saw.
pub async fn watch_cluster(
    addrs: Vec<String>,
    clock: Clock,
    mut stop: watch::Receiver<bool>,
    mut wiped: mpsc::UnboundedReceiver<Amnesia>,
) -> Observations {
    let probe = StatusProbe::new(&addrs, PROBE_DEADLINE);
    let mut seen = Observations::new(addrs.len());
    loop {
        let sent = clock.now();
        let replies = probe.all().await;
        let at = clock.now();
        // A wiped server is restarted only after the nemesis sent the
        // notice, so an answer from its new process arrives after the notice.
        while let Ok(amnesia) = wiped.try_recv() {
            seen.forget(amnesia);
        }
        for (rank, reply) in replies.into_iter().enumerate() {
            if let Some(status) = reply {
                seen.record(rank, &status, sent, at);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(INTERVAL) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return seen;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replikv_proto::kv::View;

    fn status(epoch: u64, primary: u32, role: &str) -> StatusResponse {
        StatusResponse {
            serving: role == "primary" || role == "backup",
            view: Some(View {
                epoch,
                primary,
                members: vec![],
                config: None,
            }),
            role: role.into(),
            ..Default::default()
        }
    }

    #[test]
    fn growing_epochs_and_one_primary_per_epoch_pass() {
        let mut o = Observations::new(2);
        o.record(0, &status(1, 0, "primary"), 1, 1);
        o.record(1, &status(1, 0, "backup"), 1, 1);
        o.record(1, &status(2, 1, "primary"), 2, 2);
        o.record(0, &status(2, 1, "backup"), 3, 3);
        o.record(0, &status(2, 1, "backup"), 4, 4);
        assert!(o.violations.is_empty(), "{:?}", o.violations);
        assert_eq!(o.servers[0].first_epoch, Some(1));
        assert_eq!(o.servers[1].last_epoch, 2);
    }

    #[test]
    fn epoch_going_back_is_reported() {
        let mut o = Observations::new(1);
        o.record(0, &status(3, 0, "backup"), 1, 1);
        o.record(0, &status(2, 0, "recovering"), 2, 2);
        assert_eq!(o.violations.len(), 1);
        assert!(o.violations[0].contains("from 3 to 2"));
    }

    #[test]
    fn two_primaries_in_one_epoch_are_reported() {
        let mut o = Observations::new(2);
        o.record(0, &status(4, 0, "primary"), 1, 1);
        o.record(1, &status(4, 1, "primary"), 2, 2);
        assert_eq!(o.violations.len(), 1, "{:?}", o.violations);
        assert!(o.violations[0].contains("two primaries"));
    }

    #[test]
    fn a_primary_outside_its_own_view_is_reported() {
        let mut o = Observations::new(2);
        o.record(1, &status(4, 0, "primary"), 1, 1);
        assert_eq!(o.violations.len(), 1);
    }

    #[test]
    fn a_wiped_server_starts_its_epochs_anew() {
        let mut o = Observations::new(2);
        o.record(0, &status(5, 0, "primary"), 1, 1);
        o.record(1, &status(5, 0, "backup"), 1, 1);
        o.forget(Amnesia { rank: 1, at: 10 });
        // An answer of the old process to a probe sent before the wipe.
        o.record(1, &status(5, 0, "backup"), 9, 12);
        o.record(1, &status(0, 0, "recovering"), 11, 13);
        o.record(1, &status(5, 0, "recovering"), 21, 23);
        o.record(1, &status(6, 0, "backup"), 31, 33);
        assert!(o.violations.is_empty(), "{:?}", o.violations);
        assert!(
            o.amnesia_violations.is_empty(),
            "{:?}",
            o.amnesia_violations
        );
        assert_eq!((o.servers[1].wipes, o.rejoins), (1, 1));
    }

    #[test]
    fn a_wiped_server_serving_an_older_view_is_reported() {
        let mut o = Observations::new(2);
        o.record(0, &status(5, 0, "primary"), 1, 1);
        o.forget(Amnesia { rank: 0, at: 10 });
        // A cluster of its own: the first view again.
        o.record(0, &status(1, 0, "primary"), 11, 12);
        assert_eq!(o.amnesia_violations.len(), 1);
        assert!(o.amnesia_violations[0].contains("older than epoch 5"));
        assert!(o.violations.is_empty(), "{:?}", o.violations);
    }
}
