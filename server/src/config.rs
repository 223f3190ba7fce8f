//! Server options: command-line flags (clap), environment, or a TOML file via `--config`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

use crate::error::ConfigError;
use crate::limits::Capacity;
use crate::tls::TlsFiles;
use crate::types::{Configuration, ServerAddr};

/// How a member makes an applied batch durable before it acknowledges it (docs/design.md §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// One flush per applied batch (group commit) before acking.
    #[default]
    Always,
    /// No flush before acking: the log is synced in the background, within ~100 ms of a write;
    /// durability comes from replication.
    None,
}

impl SyncMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Always => "always",
            SyncMode::None => "none",
        }
    }
}

/// `replikv-server` options.
#[derive(Clone, Debug, Parser)]
#[command(name = "replikv-server", version, about = "A replikv replica")]
pub struct Opt {
    /// TOML file with any of the options below (flags given on the command line win).
    #[arg(long, env = "REPLIKV_CONFIG")]
    pub config: Option<PathBuf>,
    /// This server's index in --peers.
    #[arg(long, env = "REPLIKV_RANK", conflicts_with = "rank_from_hostname")]
    pub rank: Option<u32>,
    /// Take the rank from the trailing `-N` of this machine's hostname (`replikv-2` is rank
    /// 2), as a Kubernetes StatefulSet names its pods by ordinal. Instead of --rank.
    #[arg(long)]
    pub rank_from_hostname: bool,
    /// The static, ranked server list, identical on every server. Each entry is
    /// `host:client_port/peer_port`: clients reach the server at host:client_port (the Kv
    /// API and nothing else), the other servers at host:peer_port (the peer protocol, never
    /// served on the client port). An entry `host:port` means `host:port/port+1`.
    #[arg(long, env = "REPLIKV_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Instead of --peers: the client address (`host:port`) of any server of a running
    /// cluster, to learn the configuration from (docs/design.md §11). A server added with
    /// `replikv member add` is started with `--join` and the `--rank` that answered; it
    /// catches up and joins. The configuration it learns is only a seed: the one it
    /// later holds in its view wins.
    #[arg(long, env = "REPLIKV_JOIN", conflicts_with = "peers")]
    pub join: Option<String>,
    /// Directory of the sled database.
    #[arg(long, env = "REPLIKV_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address the client API listens on (default: this server's client address in --peers).
    #[arg(long, env = "REPLIKV_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address the peer protocol listens on (default: this server's peer address in --peers).
    #[arg(long, env = "REPLIKV_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// Directory made by `replikv cert`: ca.pem, node-<rank>.pem and node-<rank>-key.pem.
    /// Both ports then speak TLS, and the peer port requires a node certificate of the same
    /// CA naming the sender's rank (docs/security.md).
    #[arg(long, env = "REPLIKV_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The cluster CA certificate (PEM), instead of --tls-dir's ca.pem.
    #[arg(long, env = "REPLIKV_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This server's certificate (PEM), instead of --tls-dir's node-<rank>.pem.
    #[arg(long, env = "REPLIKV_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// This server's private key (PEM), instead of --tls-dir's node-<rank>-key.pem.
    #[arg(long, env = "REPLIKV_TLS_KEY", requires_all = ["tls_ca", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
    /// Serve without TLS on a non-loopback address: anyone who can reach the ports can read
    /// and write every key and speak the peer protocol. Without TLS a server listens on
    /// loopback addresses only.
    #[arg(long, env = "REPLIKV_INSECURE")]
    pub insecure: bool,
    /// With TLS, still serve the client port in the clear (the peer port keeps mutual TLS).
    /// Only on a loopback client address, unless --insecure.
    #[arg(long)]
    pub no_client_tls: bool,
    /// always: flush each applied batch before acking; none: rely on replication.
    #[arg(long, value_enum)]
    pub sync: Option<SyncMode>,
    /// Lease length L in milliseconds (docs/design.md §2).
    #[arg(long)]
    pub lease_ms: Option<u64>,
    /// Heartbeat interval H in milliseconds (default L/5).
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// A member that has not acknowledged an append for this long is dropped.
    #[arg(long)]
    pub ack_timeout_ms: Option<u64>,
    /// Form a new cluster (docs/design.md §10): on rank 0 with an empty data directory, once every
    /// server of --peers answers that it holds no state either. Safe to leave on: a server
    /// whose data directory was lost never forms a new cluster while any peer holds the
    /// cluster's state; it rejoins that cluster instead. Ignored on other ranks.
    #[arg(long)]
    pub bootstrap: bool,
    /// Largest key in bytes.
    #[arg(long)]
    pub max_key_bytes: Option<usize>,
    /// Largest value in bytes.
    #[arg(long)]
    pub max_value_bytes: Option<usize>,
    /// Most open connections on the client port; further ones are closed as they are
    /// accepted (docs/security.md "Limits"). Default 1024.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Most open connections on the peer port. Default 128.
    #[arg(long)]
    pub max_peer_connections: Option<usize>,
    /// Most concurrent calls (HTTP/2 streams) on one client connection. Default 256.
    #[arg(long)]
    pub max_client_streams: Option<u32>,
    /// Most client requests served at once; further ones are refused with
    /// RESOURCE_EXHAUSTED (nothing applied). Default 4096.
    #[arg(long)]
    pub max_in_flight: Option<usize>,
    /// Most catch-up state transfers served at once to rejoining servers. Default 2.
    #[arg(long)]
    pub max_transfers: Option<usize>,
    /// Serve the Admin fault-injection service (tests only).
    #[arg(long)]
    pub enable_fault_injection: bool,
    /// A client session idle this long expires and is collected (e.g. "1h", "90s"; at least
    /// 1s; default 1h). Keep it well above any client's request deadline (docs/design.md §6).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub session_ttl: Option<Duration>,
    /// Also serve the gRPC health service in the clear on this address, for probes that
    /// cannot speak TLS (Kubernetes' gRPC probes). It reveals only whether the server serves.
    #[arg(long, env = "REPLIKV_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Serve Prometheus metrics over HTTP at /metrics on this address.
    #[arg(long, env = "REPLIKV_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// A snapshot file (`replikv snapshot save`) the new cluster starts from: with
    /// --bootstrap on rank 0, when it forms a new cluster (docs/design.md §12). Checked at start.
    #[arg(long, env = "REPLIKV_RESTORE")]
    pub restore: Option<PathBuf>,
    /// Write a snapshot of this server's committed state into this directory every
    /// --backup-every, keeping the newest --backup-keep (docs/design.md §12).
    #[arg(long, env = "REPLIKV_BACKUP_DIR")]
    pub backup_dir: Option<PathBuf>,
    /// How often to write a backup (e.g. "1h", "30s"; default 1h).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub backup_every: Option<Duration>,
    /// How many backups to keep (default 7).
    #[arg(long)]
    pub backup_keep: Option<usize>,
    /// Serve every client as the admin user, with no credentials (docs/security.md
    /// "Users"). Only on a loopback client address, unless --insecure.
    #[arg(long)]
    pub no_auth: bool,
    /// When this server forms the cluster (--bootstrap): the admin user's token, read from
    /// this file, or generated and written to it when it does not exist (default:
    /// <data dir>/admin-token).
    #[arg(long, env = "REPLIKV_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

/// The same options as read from a `--config` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    rank: Option<u32>,
    peers: Option<Vec<String>>,
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    peer_listen: Option<SocketAddr>,
    tls_dir: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    insecure: Option<bool>,
    no_client_tls: Option<bool>,
    sync: Option<SyncMode>,
    lease_ms: Option<u64>,
    heartbeat_ms: Option<u64>,
    ack_timeout_ms: Option<u64>,
    bootstrap: Option<bool>,
    rank_from_hostname: Option<bool>,
    max_key_bytes: Option<usize>,
    max_value_bytes: Option<usize>,
    max_connections: Option<usize>,
    max_peer_connections: Option<usize>,
    max_client_streams: Option<u32>,
    max_in_flight: Option<usize>,
    max_transfers: Option<usize>,
    enable_fault_injection: Option<bool>,
    session_ttl: Option<String>,
    health_listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    restore: Option<PathBuf>,
    backup_dir: Option<PathBuf>,
    backup_every: Option<String>,
    backup_keep: Option<usize>,
    no_auth: Option<bool>,
    admin_token_file: Option<PathBuf>,
}

/// Default lifetime of an idle client session.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(3600);

/// Validated server configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub rank: u32,
    /// Every server's client address (`host:port`), by rank: what Status reports and
    /// clients dial.
    pub peers: Vec<String>,
    /// Every server's peer-plane address (`host:port`), by rank: what servers dial.
    pub peer_addrs: Vec<String>,
    /// The configuration this server starts from (docs/design.md §11): `--peers` as ranks
    /// 0.., or what `--join` learned. The configuration in the server's view wins over it.
    pub seed: Configuration,
    pub data_dir: PathBuf,
    /// Where the client API listens.
    pub listen: SocketAddr,
    /// Where the peer protocol listens.
    pub peer_listen: SocketAddr,
    /// TLS material; `None` only for a server that listens on loopback or was started
    /// with `--insecure`.
    pub tls: Option<TlsFiles>,
    /// Whether the client port speaks TLS (with `tls`; see [`Opt::no_client_tls`]).
    pub client_tls: bool,
    pub sync: SyncMode,
    pub timing: Timing,
    pub limits: Limits,
    /// Connections, streams, requests and transfers served at once.
    pub capacity: Capacity,
    pub fault_injection: bool,
    /// May form a new cluster (see [`Opt::bootstrap`]).
    pub bootstrap: bool,
    /// How long an idle client session lives (docs/design.md §10 "Sessions").
    pub session_ttl: Duration,
    /// Health, metrics, restore and backups (docs/design.md §12).
    pub ops: OpsConfig,
    /// Clients must authenticate as users (docs/design.md §13); off only with `--no-auth`.
    pub auth: bool,
    /// See [`Opt::admin_token_file`].
    pub admin_token_file: Option<PathBuf>,
}

/// What the server offers its operators besides the Kv API (docs/design.md §12).
#[derive(Clone, Debug, Default)]
pub struct OpsConfig {
    /// A plaintext listener serving only the gRPC health service.
    pub health_listen: Option<SocketAddr>,
    /// An HTTP listener serving `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
    /// The snapshot a bootstrapping rank 0 forms the new cluster from.
    pub restore: Option<PathBuf>,
    /// Periodic backups of this server's committed state.
    pub backups: Option<BackupSchedule>,
}

/// `--backup-dir`, `--backup-every`, `--backup-keep`.
#[derive(Clone, Debug)]
pub struct BackupSchedule {
    pub dir: PathBuf,
    pub every: Duration,
    pub keep: usize,
}

/// Default interval and count of periodic backups.
pub const DEFAULT_BACKUP_EVERY: Duration = Duration::from_secs(3600);
pub const DEFAULT_BACKUP_KEEP: usize = 7;

/// The protocol's clocks (docs/design.md §2, §4, §5).
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// L: lease length.
    pub lease: Duration,
    /// H: heartbeat interval.
    pub heartbeat: Duration,
    /// How long a member may leave an append unacknowledged before it is dropped.
    pub ack_timeout: Duration,
}

impl Timing {
    /// L * (1 + eps): how long to wait for every lease granted earlier to have run out,
    /// allowing 10 % clock-rate drift.
    pub fn lease_guard(&self) -> Duration {
        self.lease + self.lease / 10
    }
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease: Duration::from_millis(500),
            heartbeat: Duration::from_millis(100),
            ack_timeout: Duration::from_millis(250),
        }
    }
}

/// Input limits; anything larger is INVALID_ARGUMENT and stores nothing.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: replikv_proto::DEFAULT_MAX_KEY_BYTES,
            max_value_bytes: replikv_proto::DEFAULT_MAX_VALUE_BYTES,
        }
    }
}

impl Opt {
    /// Merges the config file (if any) under the flags and validates the result.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        self.resolve_with(None)
    }

    /// As [`Opt::resolve`], with `joined`, the configuration `--join` learned, in place of
    /// `--peers`.
    pub fn resolve_with(&self, joined: Option<Configuration>) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError(format!("cannot read config file {}: {e}", path.display()))
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| {
                    ConfigError(format!(
                        "config file {}: {}",
                        path.display(),
                        e.message().trim()
                    ))
                })?
            }
            None => FileConfig::default(),
        };
        let capacity = self.capacity(&file)?;
        let ops = self.resolve_ops(&file)?;
        let from_hostname = self.rank_from_hostname || file.rank_from_hostname.unwrap_or(false);
        let rank = match (self.rank.or(file.rank), from_hostname) {
            (Some(_), true) => {
                return Err(ConfigError(
                    "give --rank or --rank-from-hostname, not both".into(),
                ))
            }
            (Some(rank), false) => rank,
            (None, true) => {
                let host = hostname().map_err(|e| {
                    ConfigError(format!(
                        "--rank-from-hostname: cannot read the hostname: {e}"
                    ))
                })?;
                rank_from_hostname(&host)
                    .map_err(|e| ConfigError(format!("--rank-from-hostname: {e}")))?
            }
            (None, false) => return Err(ConfigError("--rank is required".into())),
        };
        let seed = match joined {
            Some(c) => {
                if !c.contains(rank) {
                    return Err(ConfigError(format!(
                        "--rank {rank} is not in the cluster's configuration (ranks {:?}): \
                         add this server first with `replikv member add`",
                        c.ranks().collect::<Vec<_>>()
                    )));
                }
                c
            }
            None => {
                let peers = if self.peers.is_empty() {
                    file.peers.unwrap_or_default()
                } else {
                    self.peers.clone()
                };
                if peers.is_empty() {
                    return Err(ConfigError(
                        "--peers (host:port,host:port,...) or --join is required".into(),
                    ));
                }
                let servers = peers
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        parse_server(p).map_err(|e| ConfigError(format!("peer {i} ({p:?}): {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if rank as usize >= peers.len() {
                    return Err(ConfigError(format!(
                        "--rank {rank} is out of range: --peers lists {} servers (ranks 0..{})",
                        peers.len(),
                        peers.len() - 1
                    )));
                }
                Configuration::seed(servers)
            }
        };
        let (peers, peer_addrs): (Vec<String>, Vec<String>) = seed
            .servers
            .values()
            .map(|s| (s.client.clone(), s.peer.clone()))
            .unzip();
        let own = &seed.servers[&rank];
        let data_dir = self
            .data_dir
            .clone()
            .or(file.data_dir)
            .ok_or_else(|| ConfigError("--data-dir is required".into()))?;
        let listen = match self.listen.or(file.listen) {
            Some(a) => a,
            None => resolve_addr(&own.client).map_err(|e| {
                ConfigError(format!(
                    "cannot listen on peer {rank} ({}): {e}",
                    own.client
                ))
            })?,
        };
        let peer_listen = match self.peer_listen.or(file.peer_listen) {
            Some(a) => a,
            None => resolve_addr(&own.peer).map_err(|e| {
                ConfigError(format!(
                    "cannot listen on peer {rank}'s peer address ({}): {e}",
                    own.peer
                ))
            })?,
        };
        if peer_listen == listen {
            return Err(ConfigError(format!(
                "the client and peer ports must differ ({listen}): peer calls are never served \
                 on the client port"
            )));
        }
        let tls = match (
            self.tls_dir.clone().or(file.tls_dir),
            self.tls_ca.clone().or(file.tls_ca),
            self.tls_cert.clone().or(file.tls_cert),
            self.tls_key.clone().or(file.tls_key),
        ) {
            (_, Some(ca), Some(cert), Some(key)) => Some(TlsFiles { ca, cert, key }),
            (_, Some(_), _, _) | (_, _, Some(_), _) | (_, _, _, Some(_)) => {
                return Err(ConfigError(
                    "--tls-ca, --tls-cert and --tls-key go together".into(),
                ))
            }
            (Some(dir), None, None, None) => Some(TlsFiles::in_dir(&dir, rank)),
            (None, None, None, None) => None,
        };
        let insecure = self.insecure || file.insecure.unwrap_or(false);
        let client_tls =
            tls.is_some() && !(self.no_client_tls || file.no_client_tls.unwrap_or(false));
        if !insecure {
            let clear = [(listen, !client_tls), (peer_listen, tls.is_none())];
            for (addr, _) in clear.into_iter().filter(|(_, clear)| *clear) {
                if !addr.ip().is_loopback() {
                    return Err(ConfigError(format!(
                        "refusing to listen on {addr} without TLS: anyone who reaches it could \
                         read and write every key and take over the cluster. Give --tls-dir \
                         (certificates from `replikv cert`), or --insecure to serve in the \
                         clear on a trusted network"
                    )));
                }
            }
        }
        let auth = !(self.no_auth || file.no_auth.unwrap_or(false));
        if !auth && !insecure && !listen.ip().is_loopback() {
            return Err(ConfigError(format!(
                "refusing to serve {listen} with --no-auth: anyone who reaches it could read \
                 and write every key as the admin user. Drop --no-auth, or add --insecure on a \
                 trusted network"
            )));
        }
        let lease_ms = self.lease_ms.or(file.lease_ms).unwrap_or(500);
        if !(10..=60_000).contains(&lease_ms) {
            return Err(ConfigError(format!(
                "--lease-ms {lease_ms} must be within 10..=60000"
            )));
        }
        let heartbeat_ms = self
            .heartbeat_ms
            .or(file.heartbeat_ms)
            .unwrap_or(lease_ms / 5);
        if heartbeat_ms == 0 || heartbeat_ms * 2 > lease_ms {
            return Err(ConfigError(format!(
                "--heartbeat-ms {heartbeat_ms} must be at least 1 and at most half the lease ({lease_ms} ms)"
            )));
        }
        let ack_timeout_ms = self.ack_timeout_ms.or(file.ack_timeout_ms).unwrap_or(250);
        if ack_timeout_ms == 0 {
            return Err(ConfigError("--ack-timeout-ms must be positive".into()));
        }
        let limits = Limits {
            max_key_bytes: self
                .max_key_bytes
                .or(file.max_key_bytes)
                .unwrap_or(replikv_proto::DEFAULT_MAX_KEY_BYTES),
            max_value_bytes: self
                .max_value_bytes
                .or(file.max_value_bytes)
                .unwrap_or(replikv_proto::DEFAULT_MAX_VALUE_BYTES),
        };
        if limits.max_key_bytes == 0 || limits.max_key_bytes > 64 * 1024 {
            return Err(ConfigError(
                "--max-key-bytes must be within 1..=65536".into(),
            ));
        }
        if limits.max_value_bytes > 32 * 1024 * 1024 {
            return Err(ConfigError(
                "--max-value-bytes must be at most 33554432".into(),
            ));
        }
        let session_ttl = match (self.session_ttl, file.session_ttl) {
            (Some(d), _) => d,
            (None, Some(text)) => humantime::parse_duration(&text)
                .map_err(|e| ConfigError(format!("session_ttl {text:?}: {e}")))?,
            (None, None) => DEFAULT_SESSION_TTL,
        };
        if session_ttl < Duration::from_secs(1) {
            return Err(ConfigError("--session-ttl must be at least 1s".into()));
        }
        Ok(Config {
            ops,
            session_ttl,
            rank,
            peers,
            peer_addrs,
            seed,
            data_dir,
            listen,
            peer_listen,
            tls,
            client_tls,
            sync: self.sync.or(file.sync).unwrap_or_default(),
            timing: Timing {
                lease: std::time::Duration::from_millis(lease_ms),
                heartbeat: std::time::Duration::from_millis(heartbeat_ms),
                ack_timeout: std::time::Duration::from_millis(ack_timeout_ms),
            },
            limits,
            capacity,
            fault_injection: self.enable_fault_injection
                || file.enable_fault_injection.unwrap_or(false),
            bootstrap: self.bootstrap || file.bootstrap.unwrap_or(false),
            auth,
            admin_token_file: self.admin_token_file.clone().or(file.admin_token_file),
        })
    }
}

/// A `--peers` entry (or a `replikv member add` address): `host:client_port/peer_port`, or
/// `host:port` for `host:port/port+1`.
pub fn parse_server(p: &str) -> Result<ServerAddr, String> {
    let (client, peer) = split_peer(p)?;
    Ok(ServerAddr { client, peer })
}

impl Opt {
    /// The health, metrics, restore and backup options (docs/design.md §12).
    fn resolve_ops(&self, file: &FileConfig) -> Result<OpsConfig, ConfigError> {
        let every = match (self.backup_every, &file.backup_every) {
            (Some(d), _) => Some(d),
            (None, Some(text)) => Some(
                humantime::parse_duration(text)
                    .map_err(|e| ConfigError(format!("backup_every {text:?}: {e}")))?,
            ),
            (None, None) => None,
        };
        let keep = self.backup_keep.or(file.backup_keep);
        let dir = self.backup_dir.clone().or(file.backup_dir.clone());
        let backups = match dir {
            None if every.is_some() || keep.is_some() => {
                return Err(ConfigError(
                    "--backup-every and --backup-keep need --backup-dir".into(),
                ))
            }
            None => None,
            Some(dir) => {
                let every = every.unwrap_or(DEFAULT_BACKUP_EVERY);
                if every < Duration::from_secs(1) {
                    return Err(ConfigError("--backup-every must be at least 1s".into()));
                }
                let keep = keep.unwrap_or(DEFAULT_BACKUP_KEEP);
                if keep == 0 {
                    return Err(ConfigError("--backup-keep must be at least 1".into()));
                }
                Some(BackupSchedule { dir, every, keep })
            }
        };
        Ok(OpsConfig {
            health_listen: self.health_listen.or(file.health_listen),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            restore: self.restore.clone().or(file.restore.clone()),
            backups,
        })
    }
}

impl Opt {
    /// The capacity limits, each at least 1.
    fn capacity(&self, file: &FileConfig) -> Result<Capacity, ConfigError> {
        let d = Capacity::default();
        let capacity = Capacity {
            max_connections: self
                .max_connections
                .or(file.max_connections)
                .unwrap_or(d.max_connections),
            max_peer_connections: self
                .max_peer_connections
                .or(file.max_peer_connections)
                .unwrap_or(d.max_peer_connections),
            max_client_streams: self
                .max_client_streams
                .or(file.max_client_streams)
                .unwrap_or(d.max_client_streams),
            max_in_flight: self
                .max_in_flight
                .or(file.max_in_flight)
                .unwrap_or(d.max_in_flight),
            max_transfers: self
                .max_transfers
                .or(file.max_transfers)
                .unwrap_or(d.max_transfers),
        };
        let checks = [
            ("--max-connections", capacity.max_connections),
            ("--max-peer-connections", capacity.max_peer_connections),
            ("--max-client-streams", capacity.max_client_streams as usize),
            ("--max-in-flight", capacity.max_in_flight),
            ("--max-transfers", capacity.max_transfers),
        ];
        for (flag, value) in checks {
            // Beyond this a tokio semaphore panics; far beyond any sane setting anyway.
            if value == 0 || value > 1 << 24 {
                return Err(ConfigError(format!(
                    "{flag} {value} must be within 1..={}",
                    1 << 24
                )));
            }
        }
        Ok(capacity)
    }
}

/// Splits a `--peers` entry, `host:client_port/peer_port` or `host:port` (peer port
/// `port + 1`), into its client and peer addresses.
fn split_peer(p: &str) -> Result<(String, String), String> {
    let (addr, peer_port) = match p.split_once('/') {
        Some((addr, peer)) => (addr, Some(peer)),
        None => (p, None),
    };
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or("expected host:port or host:client_port/peer_port")?;
    if host.is_empty() {
        return Err("empty host".into());
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("port {port:?} is not a number in 0..=65535"))?;
    let peer_port = match peer_port {
        Some(pp) => pp
            .parse::<u16>()
            .map_err(|_| format!("peer port {pp:?} is not a number in 0..=65535"))?,
        None => port
            .checked_add(1)
            .ok_or("port 65535 leaves no room for the peer port (port + 1)")?,
    };
    if peer_port == port {
        return Err("the client and peer ports must differ".into());
    }
    Ok((format!("{host}:{port}"), format!("{host}:{peer_port}")))
}

/// The rank a hostname names by its trailing `-N`: `replikv-2` and
/// `replikv-2.replikv-peers.default.svc` are rank 2 (a StatefulSet's pod ordinal).
pub fn rank_from_hostname(host: &str) -> Result<u32, String> {
    let name = host.split('.').next().unwrap_or_default();
    let ordinal = name
        .rsplit_once('-')
        .map(|(_, n)| n)
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| format!("hostname {host:?} does not end in -N (e.g. replikv-0)"))?;
    ordinal
        .parse::<u32>()
        .map_err(|_| format!("hostname {host:?}: {ordinal} is too large for a rank"))
}

/// This machine's hostname (in a container or pod: the one its runtime gave it).
fn hostname() -> std::io::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname(2) writes at most buf.len() bytes into buf, which outlives the call.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..len].to_vec())
        .map_err(|_| std::io::Error::other("the hostname is not UTF-8"))
}

fn resolve_addr(p: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    p.to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| "address resolves to nothing".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(args: &[&str]) -> Opt {
        Opt::parse_from(std::iter::once("replikv-server").chain(args.iter().copied()))
    }

    #[test]
    fn flags_resolve_with_defaults() {
        let c = opt(&[
            "--rank",
            "1",
            "--peers",
            "127.0.0.1:1,127.0.0.1:2",
            "--data-dir",
            "/tmp/x",
        ])
        .resolve()
        .unwrap();
        assert_eq!(c.rank, 1);
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.timing.lease.as_millis(), 500);
        assert_eq!(c.timing.heartbeat.as_millis(), 100);
        assert_eq!(c.sync, SyncMode::Always);
        assert_eq!(c.session_ttl, DEFAULT_SESSION_TTL);
        assert_eq!(c.peer_listen.port(), 3);
        assert_eq!(c.peers, ["127.0.0.1:1", "127.0.0.1:2"]);
        assert_eq!(c.peer_addrs, ["127.0.0.1:2", "127.0.0.1:3"]);
        assert!(c.tls.is_none());
    }

    #[test]
    fn capacity_flags_resolve_and_zero_is_refused() {
        let base = [
            "--rank",
            "0",
            "--peers",
            "127.0.0.1:1",
            "--data-dir",
            "/tmp/x",
        ];
        let c = opt(&base).resolve().unwrap();
        assert_eq!(c.capacity, Capacity::default());
        let mut args = base.to_vec();
        args.extend(["--max-connections", "8", "--max-in-flight", "16"]);
        args.extend(["--max-transfers", "1", "--max-client-streams", "4"]);
        args.extend(["--max-peer-connections", "9"]);
        let c = opt(&args).resolve().unwrap();
        assert_eq!(
            c.capacity,
            Capacity {
                max_connections: 8,
                max_peer_connections: 9,
                max_client_streams: 4,
                max_in_flight: 16,
                max_transfers: 1,
            }
        );
        for flag in ["--max-connections", "--max-in-flight", "--max-transfers"] {
            let mut args = base.to_vec();
            args.extend([flag, "0"]);
            let e = opt(&args).resolve().unwrap_err();
            assert!(e.0.contains(flag), "{e:?}");
        }
    }

    #[test]
    fn peer_entries_name_both_ports() {
        let c = opt(&[
            "--rank",
            "1",
            "--peers",
            "127.0.0.1:7000/7100,127.0.0.1:7001/7101",
            "--data-dir",
            "/tmp/x",
            "--tls-dir",
            "/certs",
        ])
        .resolve()
        .unwrap();
        assert_eq!(c.listen.port(), 7001);
        assert_eq!(c.peer_listen.port(), 7101);
        assert_eq!(c.peers, ["127.0.0.1:7000", "127.0.0.1:7001"]);
        assert_eq!(c.peer_addrs, ["127.0.0.1:7100", "127.0.0.1:7101"]);
        assert_eq!(
            c.tls.unwrap().cert,
            std::path::Path::new("/certs/node-1.pem")
        );
        for bad in ["127.0.0.1:7000/7000", "127.0.0.1:7000/x"] {
            assert!(opt(&["--rank", "0", "--peers", bad, "--data-dir", "/x"])
                .resolve()
                .is_err());
        }
    }

    #[test]
    fn no_tls_on_a_public_address_needs_insecure() {
        let args = ["--rank", "0", "--peers", "0.0.0.0:7000", "--data-dir", "/x"];
        let e = opt(&args).resolve().unwrap_err();
        assert!(
            e.0.contains("without TLS") && e.0.contains("--insecure"),
            "{e}"
        );
        let mut insecure = args.to_vec();
        insecure.push("--insecure");
        assert!(opt(&insecure).resolve().is_ok());
        let mut tls = args.to_vec();
        tls.extend(["--tls-dir", "/certs"]);
        assert!(opt(&tls).resolve().is_ok());
    }

    #[test]
    fn session_ttl_takes_human_durations_and_rejects_tiny_ones() {
        let base = [
            "--rank",
            "0",
            "--peers",
            "127.0.0.1:1",
            "--data-dir",
            "/tmp/x",
        ];
        let with = |ttl: &str| {
            let mut args = base.to_vec();
            args.extend(["--session-ttl", ttl]);
            opt(&args).resolve()
        };
        assert_eq!(with("2s").unwrap().session_ttl, Duration::from_secs(2));
        assert_eq!(
            with("1h 30m").unwrap().session_ttl,
            Duration::from_secs(5400)
        );
        assert!(with("10ms").unwrap_err().0.contains("at least 1s"));
        assert!(
            Opt::try_parse_from(["replikv-server", "--session-ttl", "soon"].iter().copied())
                .is_err()
        );
    }

    #[test]
    fn rank_comes_from_the_hostname_ordinal() {
        assert_eq!(rank_from_hostname("replikv-0"), Ok(0));
        assert_eq!(rank_from_hostname("replikv-12"), Ok(12));
        assert_eq!(rank_from_hostname("my-kv-store-2"), Ok(2));
        assert_eq!(
            rank_from_hostname("replikv-2.replikv-peers.default.svc.cluster.local"),
            Ok(2)
        );
        for bad in [
            "replikv",
            "replikv-",
            "replikv-x",
            "replikv-1a",
            "",
            "7",
            "-",
            "a-99999999999",
        ] {
            let e = rank_from_hostname(bad).unwrap_err();
            assert!(e.contains("hostname"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn rank_and_rank_from_hostname_exclude_each_other() {
        let both = Opt::try_parse_from([
            "replikv-server",
            "--rank",
            "0",
            "--rank-from-hostname",
            "--peers",
            "127.0.0.1:1",
            "--data-dir",
            "/x",
        ]);
        assert!(both.is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "rank = 0\nrank_from_hostname = true\n").unwrap();
        let e = opt(&[
            "--config",
            path.to_str().unwrap(),
            "--peers",
            "127.0.0.1:1",
            "--data-dir",
            "/x",
        ])
        .resolve()
        .unwrap_err();
        assert!(e.0.contains("not both"), "{e}");
    }

    #[test]
    fn rank_out_of_range_is_an_error() {
        let e = opt(&[
            "--rank",
            "2",
            "--peers",
            "127.0.0.1:1,127.0.0.1:2",
            "--data-dir",
            "/tmp/x",
        ])
        .resolve()
        .unwrap_err();
        assert!(e.0.contains("out of range"), "{e}");
    }

    #[test]
    fn malformed_peer_is_an_error() {
        let e = opt(&[
            "--rank",
            "0",
            "--peers",
            "127.0.0.1",
            "--data-dir",
            "/tmp/x",
        ])
        .resolve()
        .unwrap_err();
        assert!(e.0.contains("host:port"), "{e}");
    }

    #[test]
    fn config_file_wrong_type_is_one_clear_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "rank = \"zero\"\npeers = [\"127.0.0.1:1\"]\ndata_dir = \"/tmp/x\"\n",
        )
        .unwrap();
        let e = opt(&["--config", path.to_str().unwrap()])
            .resolve()
            .unwrap_err();
        assert!(e.0.contains("invalid type"), "{e}");
        assert!(!e.0.contains('\n'), "{e}");
    }

    #[test]
    fn config_file_unknown_field_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "rank = 0\npeers = [\"127.0.0.1:1\"]\ndata_dir = \"/x\"\nbogus = 1\n",
        )
        .unwrap();
        let e = opt(&["--config", path.to_str().unwrap()])
            .resolve()
            .unwrap_err();
        assert!(e.0.contains("bogus"), "{e}");
    }

    #[test]
    fn config_file_supplies_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "rank = 0\npeers = [\"127.0.0.1:7000\"]\ndata_dir = \"/x\"\nsync = \"none\"\nlease_ms = 1000\n",
        )
        .unwrap();
        let c = opt(&["--config", path.to_str().unwrap()])
            .resolve()
            .unwrap();
        assert_eq!(c.sync, SyncMode::None);
        assert_eq!(c.timing.heartbeat.as_millis(), 200);
    }
}
