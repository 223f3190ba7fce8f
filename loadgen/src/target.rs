//! The store under test: replikv, or a peer system driven through the same two operations.
//!
//! [`Target`] is an enum rather than a trait object so that the hot loop pays no boxing for
//! its futures and each variant keeps its own connection type.

use std::time::Duration;

use bytes::Bytes;
use clap::ValueEnum;
use replikv_client::config::{Credentials, TlsSettings};
use replikv_client::{Client, ClientConfig, Route};
use serde::Serialize;
use thiserror::Error;

use crate::peers::etcd::EtcdKv;
use crate::peers::redis::RedisKv;

/// Which system the load goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// A replikv cluster, through `replikv_client::Client`.
    Replikv,
    /// An etcd cluster, through its v3 gRPC KV API.
    Etcd,
    /// A Redis primary (the first address) and its replicas, each write followed by `WAIT`.
    Redis,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Replikv => "replikv",
            TargetKind::Etcd => "etcd",
            TargetKind::Redis => "redis",
        }
    }
}

/// How to reach the target; one [`Target`] (one session) is made from it per client.
#[derive(Clone, Debug)]
pub struct TargetOptions {
    pub kind: TargetKind,
    /// `host:port` of every server. For Redis the first one is the primary.
    pub servers: Vec<String>,
    /// Which server a request goes to first (see [`Route`]; etcd and Redis: `random` spreads
    /// reads over every server, the others send everything to the first).
    pub route: Route,
    /// Budget for one operation, retries included.
    pub request_timeout: Duration,
    /// etcd: serve reads from the contacted member's local state instead of through the
    /// leader (`serializable: true`, not linearizable).
    pub etcd_serializable: bool,
    /// Redis: replicas that must acknowledge each write (`WAIT <n> <timeout>`); 0 skips WAIT.
    pub redis_wait: u32,
    /// replikv: the CA to trust and the user to speak for; `None` reads `REPLIKV_CA`,
    /// `REPLIKV_USER` and `REPLIKV_TOKEN` (docs/security.md).
    pub replikv_access: Option<(Option<TlsSettings>, Option<Credentials>)>,
}

impl TargetOptions {
    pub fn new(kind: TargetKind, servers: Vec<String>) -> Self {
        TargetOptions {
            kind,
            servers,
            route: Route::default(),
            request_timeout: Duration::from_secs(10),
            etcd_serializable: false,
            redis_wait: 0,
            replikv_access: None,
        }
    }
}

/// Why an operation (or a connection) failed.
#[derive(Debug, Error)]
pub enum TargetError {
    #[error("replikv: {0}")]
    Replikv(#[from] replikv_client::Error),
    #[error("etcd: {0}")]
    Etcd(#[from] tonic::Status),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("redis WAIT: {acked} of {wanted} replicas acknowledged the write in time")]
    NotReplicated { acked: i64, wanted: u32 },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Config(String),
    #[error("{0} does not serve scans")]
    NoScans(&'static str),
}

impl TargetError {
    /// True when a failed write may still have taken effect. replikv says so itself
    /// (docs/design.md §6); for the peers a timeout or a write that reached the Redis primary
    /// but not enough replicas is the same situation.
    pub fn may_have_applied(&self) -> bool {
        use tonic::Code;
        match self {
            TargetError::Replikv(e) => e.is_outcome_unknown(),
            TargetError::Timeout(_) | TargetError::NotReplicated { .. } => true,
            // The request may have reached the leader before the answer was lost.
            TargetError::Etcd(status) => matches!(
                status.code(),
                Code::Unknown
                    | Code::DeadlineExceeded
                    | Code::Unavailable
                    | Code::Cancelled
                    | Code::Internal
            ),
            TargetError::Redis(e) => e.is_timeout() || e.is_io_error() || e.is_connection_dropped(),
            TargetError::Connect { .. } | TargetError::Config(_) | TargetError::NoScans(_) => false,
        }
    }
}

/// Requests made and retries done by one session, as the client library counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetStats {
    pub requests: u64,
    pub retries: u64,
}

impl TargetStats {
    /// The counts accumulated since `earlier`.
    pub fn since(self, earlier: TargetStats) -> TargetStats {
        TargetStats {
            requests: self.requests.saturating_sub(earlier.requests),
            retries: self.retries.saturating_sub(earlier.retries),
        }
    }
}

impl std::ops::AddAssign for TargetStats {
    fn add_assign(&mut self, other: TargetStats) {
        self.requests += other.requests;
        self.retries += other.retries;
    }
}

/// One client session to the store under test.
pub enum Target {
    Replikv(Client),
    Etcd(EtcdKv),
    Redis(RedisKv),
}

impl Target {
    /// Opens one session. Each benchmark client calls this once, so every client has its own
    /// connections (and, for replikv, its own exactly-once session id).
    pub async fn connect(opts: &TargetOptions) -> Result<Target, TargetError> {
        if opts.servers.is_empty() {
            return Err(TargetError::Config("no servers given".into()));
        }
        let deadline = opts.request_timeout + Duration::from_secs(1);
        let connect = async {
            Ok(match opts.kind {
                TargetKind::Replikv => {
                    let mut config = ClientConfig::new(opts.servers.iter().cloned())
                        .with_route(opts.route)
                        .with_request_timeout(opts.request_timeout);
                    if let Some((tls, credentials)) = &opts.replikv_access {
                        config = config
                            .with_tls(tls.clone())
                            .with_credentials(credentials.clone());
                    }
                    Target::Replikv(Client::connect(config).await?)
                }
                TargetKind::Etcd => Target::Etcd(EtcdKv::connect(opts)?),
                TargetKind::Redis => Target::Redis(RedisKv::connect(opts).await?),
            })
        };
        tokio::time::timeout(deadline, connect)
            .await
            .map_err(|_| TargetError::Timeout(deadline))?
    }

    /// Opens `sessions` sessions. With `conns` > 0 they share `conns` sets of connections
    /// (session i uses set i mod `conns`), as one application process shares a few
    /// connections among its tasks; with 0 every session has connections of its own. Redis
    /// sessions always have their own: `WAIT` blocks the connection it is sent on.
    pub async fn connect_many(
        opts: &TargetOptions,
        sessions: usize,
        conns: usize,
    ) -> Result<Vec<Target>, TargetError> {
        let own = conns == 0 || opts.kind == TargetKind::Redis;
        let first = if own { sessions } else { conns.min(sessions) };
        let mut targets =
            futures::future::try_join_all((0..first).map(|_| Target::connect(opts))).await?;
        for i in first..sessions {
            let shared = targets[i % first].new_session()?;
            targets.push(shared);
        }
        Ok(targets)
    }

    /// Another session over this one's connections.
    fn new_session(&self) -> Result<Target, TargetError> {
        Ok(match self {
            Target::Replikv(client) => Target::Replikv(client.new_session()?),
            Target::Etcd(etcd) => Target::Etcd(etcd.new_session()),
            Target::Redis(_) => unreachable!("Redis sessions never share a connection"),
        })
    }

    /// Reads `key`; `None` when it is absent.
    pub async fn get(&mut self, key: Bytes) -> Result<Option<Bytes>, TargetError> {
        match self {
            Target::Replikv(client) => Ok(client.get(key).await?),
            Target::Etcd(etcd) => etcd.get(key).await,
            Target::Redis(redis) => redis.get(key).await,
        }
    }

    /// Writes `value` under `key`; returns the value it replaced, as replikv's Put does (the
    /// peers are asked for the old value too, so every target does the same work).
    pub async fn put(&mut self, key: Bytes, value: Bytes) -> Result<Option<Bytes>, TargetError> {
        match self {
            Target::Replikv(client) => Ok(client.put(key, value).await?),
            Target::Etcd(etcd) => etcd.put(key, value).await,
            Target::Redis(redis) => redis.put(key, value).await,
        }
    }

    /// Lists up to `limit` keys from `from` on (one linearizable page); returns how many.
    pub async fn scan(&mut self, from: Bytes, limit: u32) -> Result<usize, TargetError> {
        match self {
            Target::Replikv(client) => {
                let range = replikv_client::Range::Keys { from, to: None };
                Ok(client.scan(&range, limit, None).await?.items.len())
            }
            Target::Etcd(_) => Err(TargetError::NoScans("the etcd target")),
            Target::Redis(_) => Err(TargetError::NoScans("the Redis target")),
        }
    }

    /// Requests and retries so far.
    pub fn stats(&self) -> TargetStats {
        match self {
            Target::Replikv(client) => {
                let stats = client.stats();
                TargetStats {
                    requests: stats.requests,
                    retries: stats.retries,
                }
            }
            Target::Etcd(etcd) => etcd.stats(),
            Target::Redis(redis) => redis.stats(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_writes_that_may_have_applied_are_told_apart() {
        assert!(TargetError::NotReplicated {
            acked: 1,
            wanted: 2
        }
        .may_have_applied());
        assert!(TargetError::Timeout(Duration::from_secs(1)).may_have_applied());
        assert!(TargetError::Etcd(tonic::Status::unavailable("leader lost")).may_have_applied());
        assert!(!TargetError::Etcd(tonic::Status::invalid_argument("bad key")).may_have_applied());
        assert!(!TargetError::Config("no servers".into()).may_have_applied());
        assert!(
            TargetError::Replikv(replikv_client::Error::OutcomeUnknown("lost".into()))
                .may_have_applied()
        );
        assert!(
            !TargetError::Replikv(replikv_client::Error::Unavailable("down".into()))
                .may_have_applied()
        );
    }

    #[tokio::test]
    async fn sessions_share_the_requested_connections_with_ids_of_their_own() {
        // Nothing listens on port 1: replikv connections open lazily, so no I/O happens.
        let opts = TargetOptions::new(TargetKind::Replikv, vec!["127.0.0.1:1".into()]);
        for conns in [0, 1, 2, 9] {
            let targets = Target::connect_many(&opts, 5, conns).await.unwrap();
            assert_eq!(targets.len(), 5);
            let mut ids: Vec<u128> = targets
                .iter()
                .map(|t| match t {
                    Target::Replikv(c) => c.client_id(),
                    _ => unreachable!(),
                })
                .collect();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(
                ids.len(),
                5,
                "conns {conns}: one exactly-once id per session"
            );
        }
    }

    #[test]
    fn stats_subtract_and_add() {
        let mut total = TargetStats {
            requests: 10,
            retries: 2,
        };
        let later = TargetStats {
            requests: 15,
            retries: 3,
        };
        assert_eq!(
            later.since(total),
            TargetStats {
                requests: 5,
                retries: 1
            }
        );
        total += later;
        assert_eq!(
            total,
            TargetStats {
                requests: 25,
                retries: 5
            }
        );
    }
}
