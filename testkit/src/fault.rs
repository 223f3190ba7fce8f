//! The fault client: the Admin (fault-injection) RPC that servers started with
//! `--enable-fault-injection` serve, and the rule sets the tests and the nemesis install
//! with it. Rules act only on server-to-server traffic; a rule on server S about peer P
//! covers the traffic between S and P, which is why cutting a link takes a rule on both
//! of its ends.

use std::collections::BTreeSet;
use std::time::Duration;

use replikv_proto::peer::admin_client::AdminClient;
use replikv_proto::peer::{FaultDirection, FaultKind, FaultRequest, FaultRule};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::LocalCluster;

/// Deadline of one Admin RPC, connection included, unless a client says otherwise.
pub const ADMIN_DEADLINE: Duration = Duration::from_secs(1);
/// Attempts to heal a server before giving up on it (it may be restarting).
const HEAL_ATTEMPTS: usize = 3;
/// Attempts to install rules on a server (one restarted just before may take a moment to
/// listen).
const APPLY_ATTEMPTS: usize = 10;
/// Pause between two attempts of a retried request.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// The Admin service of every server of a cluster, by rank.
#[derive(Clone)]
pub struct FaultClient {
    clients: Vec<AdminClient<Channel>>,
    deadline: Duration,
}

impl FaultClient {
    /// Prepares one lazily connected channel per server of `cluster` (the Admin service is
    /// served on the peer plane); no I/O yet.
    pub fn new(cluster: &LocalCluster) -> Result<Self, String> {
        Self::with_deadline(cluster, ADMIN_DEADLINE)
    }

    /// [`FaultClient::new`] with another deadline per RPC. On a secure cluster it presents
    /// the cluster's `testkit` client certificate.
    pub fn with_deadline(cluster: &LocalCluster, deadline: Duration) -> Result<Self, String> {
        let tls = match cluster.certs_dir() {
            None => None,
            Some(dir) => {
                let read = |p: std::path::PathBuf| {
                    std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))
                };
                let (cert, key) = replikv_client::certs::client_paths(&dir, "testkit");
                Some(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(read(
                            replikv_client::certs::ca_path(&dir),
                        )?))
                        .identity(Identity::from_pem(read(cert)?, read(key)?)),
                )
            }
        };
        let clients = cluster
            .peer_addrs()
            .iter()
            .map(|addr| {
                let scheme = if tls.is_some() { "https" } else { "http" };
                let e = Endpoint::from_shared(format!("{scheme}://{addr}"))
                    .map_err(|e| format!("bad server address {addr:?}: {e}"))?;
                let e = match &tls {
                    Some(t) => e.tls_config(t.clone()).map_err(|e| e.to_string())?,
                    None => e,
                };
                Ok(AdminClient::new(e.connect_timeout(deadline).connect_lazy()))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { clients, deadline })
    }

    /// Sends one request to server `rank` (replacing its rules, arming a crash, ...).
    pub async fn send(&self, rank: usize, request: FaultRequest) -> Result<(), String> {
        let mut client = self
            .clients
            .get(rank)
            .ok_or_else(|| format!("no server {rank}"))?
            .clone();
        let deadline = self.deadline;
        match tokio::time::timeout(deadline, client.fault(request)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(format!(
                "server {rank}: {}: {}",
                status.code(),
                status.message()
            )),
            Err(_) => Err(format!("server {rank}: no answer within {deadline:?}")),
        }
    }

    /// Installs `rules` (per rank) on every server that has some, retrying a little: a
    /// server restarted just before may not listen yet.
    pub async fn apply(&self, rules: &[Vec<FaultRule>]) -> Result<(), String> {
        let sends = rules
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.is_empty())
            .map(|(rank, r)| {
                let request = FaultRequest {
                    rules: r.clone(),
                    ..Default::default()
                };
                self.send_retrying(rank, request, APPLY_ATTEMPTS)
            });
        let errors: Vec<String> = futures::future::join_all(sends)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Removes every rule on every server in `ranks`, retrying a little: a server that was
    /// just restarted may not listen yet (and then has no rules anyway, which is why the
    /// last failure is only reported).
    pub async fn heal(&self, ranks: impl IntoIterator<Item = usize>) -> Vec<String> {
        let heal_one = |rank: usize| {
            let request = FaultRequest {
                heal: true,
                ..Default::default()
            };
            self.send_retrying(rank, request, HEAL_ATTEMPTS)
        };
        futures::future::join_all(ranks.into_iter().map(heal_one))
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect()
    }

    /// [`FaultClient::send`] up to `attempts` times, 200 ms apart, until one succeeds; the
    /// last error if none does.
    pub async fn send_retrying(
        &self,
        rank: usize,
        request: FaultRequest,
        attempts: usize,
    ) -> Result<(), String> {
        let mut last = Ok(());
        for attempt in 0..attempts {
            if attempt > 0 {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            last = self.send(rank, request.clone()).await;
            if last.is_ok() {
                break;
            }
        }
        last
    }
}

/// One rule about the traffic with `peer`.
pub fn rule(peer: usize, kind: FaultKind, direction: FaultDirection, delay_ms: u32) -> FaultRule {
    FaultRule {
        peer: peer as u32,
        kind: kind as i32,
        direction: direction as i32,
        delay_ms,
    }
}

/// Rules that cut every link between `side` and the other servers, in both directions,
/// on both ends.
pub fn cut(n: usize, side: &BTreeSet<usize>) -> Vec<Vec<FaultRule>> {
    (0..n)
        .map(|a| {
            (0..n)
                .filter(|b| side.contains(&a) != side.contains(b))
                .map(|b| rule(b, FaultKind::Drop, FaultDirection::Both, 0))
                .collect()
        })
        .collect()
}

/// Rules under which the requests `from` sends to `to` are lost, while `to` still reaches
/// `from` (and gets its replies).
pub fn one_way(n: usize, from: usize, to: usize) -> Vec<Vec<FaultRule>> {
    let mut rules = vec![Vec::new(); n];
    rules[from].push(rule(to, FaultKind::Drop, FaultDirection::Outgoing, 0));
    rules[to].push(rule(from, FaultKind::Drop, FaultDirection::Incoming, 0));
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(rules: &[Vec<FaultRule>]) -> Vec<(usize, u32, i32)> {
        rules
            .iter()
            .enumerate()
            .flat_map(|(s, r)| r.iter().map(move |r| (s, r.peer, r.direction)))
            .collect()
    }

    #[test]
    fn isolating_one_server_cuts_both_ends_of_each_of_its_links() {
        let rules = cut(3, &BTreeSet::from([1]));
        let both = FaultDirection::Both as i32;
        assert_eq!(
            links(&rules),
            [(0, 1, both), (1, 0, both), (1, 2, both), (2, 1, both)]
        );
    }

    #[test]
    fn majority_split_cuts_only_links_across_it() {
        let rules = cut(5, &BTreeSet::from([0, 3]));
        assert_eq!(links(&rules).len(), 2 * 2 * 3);
        assert!(rules[0].iter().all(|r| ![0, 3].contains(&r.peer)));
        assert!(rules[1].iter().all(|r| [0, 3].contains(&r.peer)));
    }

    #[test]
    fn one_way_drops_one_direction_on_both_ends() {
        let rules = one_way(3, 2, 0);
        assert_eq!(
            links(&rules),
            [
                (0, 2, FaultDirection::Incoming as i32),
                (2, 0, FaultDirection::Outgoing as i32)
            ]
        );
    }
}
