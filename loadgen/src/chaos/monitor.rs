//! Watches every server's `Status` during the run for two invariants of
//! DESIGN.md §2 and §8 that a client history cannot show: a server's view
//! epoch never decreases (across restarts too, since views are persisted),
//! and no two servers are primary of the same epoch.

use std::collections::BTreeMap;
use std::time::Duration;

use replikv_proto::kv::kv_client::KvClient;
use replikv_proto::kv::{StatusRequest, StatusResponse};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use super::history::Clock;

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
}

/// The monitor's findings.
#[derive(Debug, Clone, Default)]
pub struct Observations {
    pub servers: Vec<ServerTrace>,
    /// Human-readable violations, in the order they were seen.
    pub violations: Vec<String>,
    /// For each epoch, its primary and the server that first reported it.
    pub primaries: BTreeMap<u64, (usize, usize)>,
}

impl Observations {
    fn new(n: usize) -> Self {
        Self {
            servers: vec![ServerTrace::default(); n],
            ..Default::default()
        }
    }

    /// Folds one status answer from `rank` seen at `at` (ns on the run clock).
    pub fn record(&mut self, rank: usize, status: &StatusResponse, at: u64) {
        let epoch = status.view.as_ref().map_or(0, |v| v.epoch);
        let seconds = at as f64 / 1e9;
        let Some(trace) = self.servers.get_mut(rank) else {
            return;
        };
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
) -> Observations {
    let clients: Vec<Option<KvClient<Channel>>> = addrs
        .iter()
        .map(|addr| {
            Endpoint::from_shared(format!("http://{addr}"))
                .ok()
                .map(|e| KvClient::new(e.connect_timeout(PROBE_DEADLINE).connect_lazy()))
        })
        .collect();
    let mut seen = Observations::new(addrs.len());
    loop {
        let probes = clients.iter().map(|client| async move {
            let mut client = client.clone()?;
            let reply = tokio::time::timeout(PROBE_DEADLINE, client.status(StatusRequest {})).await;
            reply.ok()?.ok().map(tonic::Response::into_inner)
        });
        let replies = futures::future::join_all(probes).await;
        let at = clock.now();
        for (rank, reply) in replies.into_iter().enumerate() {
            if let Some(status) = reply {
                seen.record(rank, &status, at);
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
            view: Some(View {
                epoch,
                primary,
                members: vec![],
            }),
            role: role.into(),
            ..Default::default()
        }
    }

    #[test]
    fn growing_epochs_and_one_primary_per_epoch_pass() {
        let mut o = Observations::new(2);
        o.record(0, &status(1, 0, "primary"), 1);
        o.record(1, &status(1, 0, "backup"), 1);
        o.record(1, &status(2, 1, "primary"), 2);
        o.record(0, &status(2, 1, "backup"), 3);
        o.record(0, &status(2, 1, "backup"), 4);
        assert!(o.violations.is_empty(), "{:?}", o.violations);
        assert_eq!(o.servers[0].first_epoch, Some(1));
        assert_eq!(o.servers[1].last_epoch, 2);
    }

    #[test]
    fn epoch_going_back_is_reported() {
        let mut o = Observations::new(1);
        o.record(0, &status(3, 0, "backup"), 1);
        o.record(0, &status(2, 0, "recovering"), 2);
        assert_eq!(o.violations.len(), 1);
        assert!(o.violations[0].contains("from 3 to 2"));
    }

    #[test]
    fn two_primaries_in_one_epoch_are_reported() {
        let mut o = Observations::new(2);
        o.record(0, &status(4, 0, "primary"), 1);
        o.record(1, &status(4, 1, "primary"), 2);
        assert_eq!(o.violations.len(), 1, "{:?}", o.violations);
        assert!(o.violations[0].contains("two primaries"));
    }

    #[test]
    fn a_primary_outside_its_own_view_is_reported() {
        let mut o = Observations::new(2);
        o.record(1, &status(4, 0, "primary"), 1);
        assert_eq!(o.violations.len(), 1);
    }
}
