//! Redis as a replicated store: writes to the primary (the first address), each followed by
//! `WAIT <replicas> <timeout>` so that a write counts as done only once as many replicas hold
//! it as replikv's would; reads from the primary or, with `--route random`, from any server.
//!
//! Reads from a Redis replica are not linearizable (replication is asynchronous until WAIT),
//! so `--route random` trades Redis's consistency for read throughput; the default
//! comparison in `scripts/bench-peers.sh` says which route it used.

use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::SeedableRng;
use replikv_client::Route;

use crate::target::{TargetError, TargetOptions, TargetStats};

/// One session to a Redis primary and its replicas: its own connection to each.
pub struct RedisKv {
    /// `servers[0]` is the primary.
    servers: Vec<MultiplexedConnection>,
    route: Route,
    wait: u32,
    timeout: Duration,
    rng: StdRng,
    requests: u64,
}

impl RedisKv {
    pub async fn connect(opts: &TargetOptions) -> Result<Self, TargetError> {
        // Only `random` reads from replicas; the other routes need the primary alone.
        let needed = match opts.route {
            Route::Random => opts.servers.len(),
            _ => 1,
        };
        let mut servers = Vec::with_capacity(needed);
        for addr in opts.servers.iter().take(needed) {
            let client = ::redis::Client::open(format!("redis://{addr}/"))?;
            let config = ::redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Duration::from_secs(1))
                // Longer than our own per-command deadline, so that a slow WAIT ends in its
                // own reply (with however many replicas made it), not in the crate's timeout.
                .set_response_timeout(opts.request_timeout + Duration::from_secs(2));
            servers.push(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            );
        }
        Ok(RedisKv {
            servers,
            route: opts.route,
            wait: opts.redis_wait,
            timeout: opts.request_timeout,
            rng: StdRng::from_os_rng(),
            requests: 0,
        })
    }

    pub async fn get(&mut self, key: Bytes) -> Result<Option<Bytes>, TargetError> {
        self.requests += 1;
        let server = super::pick_server(self.route, self.servers.len(), &mut self.rng);
        let mut conn = self.servers[server].clone();
        let value: Option<Vec<u8>> = bounded(
            self.timeout,
            ::redis::cmd("GET").arg(&key[..]).query_async(&mut conn),
        )
        .await?;
        Ok(value.map(Bytes::from))
    }

    pub async fn put(&mut self, key: Bytes, value: Bytes) -> Result<Option<Bytes>, TargetError> {
        self.requests += 1;
        let mut conn = self.servers[0].clone();
        // `SET ... GET` returns the old value in the same round trip (Redis >= 6.2).
        let old: Option<Vec<u8>> = bounded(
            self.timeout,
            ::redis::cmd("SET")
                .arg(&key[..])
                .arg(&value[..])
                .arg("GET")
                .query_async(&mut conn),
        )
        .await?;
        if self.wait > 0 {
            self.requests += 1;
            // WAIT's own timeout is in milliseconds; keep it inside our deadline so the reply
            // (with however many replicas made it) arrives before we give up on it.
            let wait_ms = self.timeout.as_millis().max(1) as u64;
            let acked: i64 = bounded(
                self.timeout + Duration::from_secs(1),
                ::redis::cmd("WAIT")
                    .arg(self.wait)
                    .arg(wait_ms)
                    .query_async(&mut conn),
            )
            .await?;
            if acked < i64::from(self.wait) {
                return Err(TargetError::NotReplicated {
                    acked,
                    wanted: self.wait,
                });
            }
        }
        Ok(old.map(Bytes::from))
    }

    pub fn stats(&self) -> TargetStats {
        TargetStats {
            requests: self.requests,
            retries: 0,
        }
    }
}

async fn bounded<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = ::redis::RedisResult<T>>,
) -> Result<T, TargetError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(TargetError::Timeout(limit)),
    }
}
