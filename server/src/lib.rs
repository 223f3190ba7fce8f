//! replikv replica: a fully replicated primary-backup key-value server (see docs/design.md).
//!
//! - [`auth`]: users, their tokens and namespaces; the user table each server keeps.
//! - [`config`]: flags / TOML config, validated into [`config::Config`].
//! - [`identity`]: the cluster id, and what a data directory stores about its cluster.
//! - [`join`]: `--join`: the configuration learned from a running cluster's client port.
//! - [`clock`]: the boot clock leases are measured on (it keeps running through a suspend),
//!   and the replica's clocks, read there and handed to the engine as plain times.
//! - [`error`]: error enums and their single mapping to `tonic::Status`.
//! - [`types`]: views and the quorum rule, records, entries: pure domain logic.
//! - [`session`]: exactly-once session table (pure).
//! - [`storage`]: the store the replica uses, one job per file: the key layout, the lsn
//!   index, the write-ahead log, the log in front of sled with its applier and checkpoints,
//!   tombstone collection, compaction of sled; persisted Paxos state.
//! - [`engine`]: the protocol's decisions as plain synchronous code (commit point, leases,
//!   appends, Paxos, installs, take-over timing, session rules), time passed in, no I/O.
//! - [`message`]: the peer protocol's messages as domain types, with typed rejections.
//! - [`convert`]: protobuf <-> domain conversions, the only place that knows both.
//! - [`network`]: the peer network trait (domain messages), its gRPC implementation and an
//!   in-process router for tests.
//! - [`fault`]: fault-injection rules for the peer network.
//! - [`replica`]: the async replica, one file per protocol step (write path, read path, the
//!   append stream, view change, state transfer, monitor), executing the engine's decisions;
//!   one owner of its background tasks.
//! - [`limits`]: limits against abusive clients and heavy work: connections per listener,
//!   client requests in flight, concurrent catch-up transfers.
//! - [`tls`]: TLS settings for both listeners and the rank a verified peer certificate names.
//! - [`service`]: the gRPC services: Kv (client listener), Peer and Admin (peer listener).
//! - [`health`]: the standard gRPC health service: readiness and liveness.
//! - [`metrics`]: Prometheus metrics and their `/metrics` HTTP listener.
//! - [`backup`]: snapshots (the client-port `Backup` service), periodic backups, restore.
//!
//! [`run`] serves two listeners (docs/design.md §10 "Peer plane"): the client listener serves
//! the Kv API only, the peer listener the peer protocol and the Admin service only, with
//! mutual TLS when the server has certificates. The client listener also serves the health
//! service and the `Backup` service (an admin operation);
//! `--health-listen` and `--metrics-listen` add a plaintext health listener and an HTTP
//! metrics listener (docs/design.md §12).

pub mod auth;
pub mod backup;
pub mod clock;
pub mod config;
pub mod convert;
pub mod engine;
pub mod error;
pub mod fault;
pub mod health;
pub mod identity;
pub mod join;
pub mod limits;
pub mod message;
pub mod metrics;
pub mod network;
pub mod replica;
pub mod service;
pub mod session;
pub mod storage;
pub mod tls;
pub mod types;

use std::future::Future;
use std::sync::Arc;

use replikv_proto::kv::kv_server::KvServer;
use replikv_proto::kv::members_server::MembersServer;
use replikv_proto::peer::admin_server::AdminServer;
use replikv_proto::peer::peer_server::PeerServer;
use tokio::net::TcpListener;
use tracing::{info, warn};

pub use config::{Config, Opt, SyncMode};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a shutdown waits for open calls to finish.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Concurrent HTTP/2 streams (calls) per client connection by default (`--max-client-streams`);
/// `Pipeline` multiplexes many requests over one.
pub const MAX_CLIENT_STREAMS: u32 = limits::DEFAULT_MAX_CLIENT_STREAMS;

/// Exit status of a server that stopped itself (fail-stop): a storage failure or a panic.
pub const FAIL_STOP_EXIT: i32 = 70;

/// The server's sockets: the client API and the peer protocol never share one; the
/// plaintext health and the metrics listeners are optional.
pub struct Listeners {
    pub client: TcpListener,
    pub peer: TcpListener,
    pub health: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds `config.listen`, `config.peer_listen` and the optional listeners.
    pub async fn bind(config: &Config) -> Result<Listeners, BoxError> {
        let bind = |addr: std::net::SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))
        };
        Ok(Listeners {
            client: bind(config.listen).await?,
            peer: bind(config.peer_listen).await?,
            health: match config.ops.health_listen {
                Some(a) => Some(bind(a).await?),
                None => None,
            },
            metrics: match config.ops.metrics_listen {
                Some(a) => Some(bind(a).await?),
                None => None,
            },
        })
    }
}

/// Runs a server with the given options until SIGTERM / Ctrl-C.
pub async fn serve(opt: Opt) -> Result<(), BoxError> {
    fail_stop_on_panic();
    let config = match &opt.join {
        Some(addr) => opt.resolve_with(Some(join::configuration(&opt, addr).await?))?,
        None => opt.resolve()?,
    };
    let listeners = Listeners::bind(&config).await?;
    run(config, listeners, shutdown_signal()).await
}

/// Accepted sockets of `listener`, with Nagle disabled: accepted sockets bypass the
/// builder's TCP settings, and with Nagle a small response waits for the peer's delayed ACK
/// (~40 ms) before it is sent.
fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |s| {
            s.inspect(|s| {
                let _ = s.set_nodelay(true);
            })
        },
    )
}

/// Serves until `shutdown` completes. Tests and tools call this directly.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BoxError> {
    let tls = match &config.tls {
        Some(files) => Some(Arc::new(tls::NodeTls::load(files, config.rank)?)),
        None => None,
    };
    // A bad restore file stops the server here, before anything is changed.
    backup::check_restore(&config)?;
    let store = storage::Store::open(&config.data_dir, config.sync)
        .map_err(|e| format!("cannot open data dir {}: {e}", config.data_dir.display()))?;
    let faults = Arc::new(fault::Faults::default());
    let identity = Arc::new(identity::Identity::default());
    let net = Arc::new(network::GrpcNetwork::new(
        config.rank,
        &config.seed,
        tls.as_deref(),
        faults.clone(),
        identity.clone(),
    )?);
    let node = replica::Node::open(config.clone(), store, net, faults, identity)
        .map_err(|e| format!("cannot open data dir {}: {e}", config.data_dir.display()))?;
    let limits = config.limits;
    let capacity = config.capacity;
    let addr = listeners.client.local_addr()?;
    let peer_addr = listeners.peer.local_addr()?;
    info!(
        rank = config.rank,
        %addr,
        %peer_addr,
        peers = ?config.peers,
        peer_addrs = ?config.peer_addrs,
        tls = tls.is_some(),
        auth = config.auth,
        sync = config.sync.as_str(),
        ?capacity,
        "replikv server starting"
    );

    let max = replikv_proto::MAX_MESSAGE_BYTES;
    let users = Arc::new(auth::Users::new(config.auth));
    let in_flight = limits::InFlight::new(capacity.max_in_flight);
    let kv = KvServer::new(service::KvService::new(
        node.clone(),
        limits,
        users.clone(),
        in_flight,
    ))
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let members = MembersServer::new(service::MembersService::new(node.clone(), users.clone()));
    let backup_service = replikv_proto::ops::backup_server::BackupServer::new(
        backup::BackupService::new(node.clone(), users.clone()),
    );
    let peer = PeerServer::new(service::PeerService::new(
        node.clone(),
        limits,
        users,
        tls.clone(),
    ))
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let (health_reporter, health_service) = health::health_reporter();
    // Not ready until the replica says so: the client port must not open on SERVING.
    health_reporter
        .set_service_status(health::READINESS, tonic_health::ServingStatus::NotServing)
        .await;
    let admin = config
        .fault_injection
        .then(|| AdminServer::new(service::AdminService::new(node.clone())));
    let mut client_builder = tonic::transport::Server::builder();
    let mut peer_builder = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        if config.client_tls {
            client_builder = client_builder.tls_config(tls.client_server())?;
        }
        peer_builder = peer_builder.tls_config(tls.peer_server())?;
    }
    // One shutdown signal for both listeners.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopping = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let client_server = client_builder
        .tcp_nodelay(true)
        // An abusive client opens at most this many calls at once on one connection, and
        // has at most as many served at once.
        .max_concurrent_streams(Some(capacity.max_client_streams))
        .concurrency_limit_per_connection(capacity.max_client_streams as usize)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .add_service(kv)
        .add_service(members)
        .add_service(health_service.clone())
        .add_service(backup_service)
        .serve_with_incoming_shutdown(
            limits::limit_connections(
                incoming(listeners.client),
                capacity.max_connections,
                "client",
            ),
            stopping(),
        );
    let peer_server = peer_builder
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .add_service(peer)
        .add_optional_service(admin)
        .serve_with_incoming_shutdown(
            limits::limit_connections(
                incoming(listeners.peer),
                capacity.max_peer_connections,
                "peer",
            ),
            stopping(),
        );
    let server = {
        let node = node.clone();
        async move {
            let trigger = async move {
                shutdown.await;
                // A graceful shutdown waits for every open call to end, and the pipeline
                // and append streams would not end by themselves.
                node.stop_streams();
                let _ = stop_tx.send(true);
                std::future::pending::<()>().await;
            };
            tokio::select! {
                r = async { tokio::try_join!(client_server, peer_server) } => r.map(|_| ()),
                _ = trigger => Ok(()),
            }
        }
    };
    node.start();
    // The operators' side (docs/design.md §12): health, metrics, backups; they end with the
    // server.
    let mut ops = tokio::task::JoinSet::new();
    ops.spawn(health::watch(node.clone(), health_reporter, stopping()));
    if let Some(listener) = listeners.health {
        let serve = health::serve_plain(listener, health_service, stopping());
        ops.spawn(async move {
            if let Err(e) = serve.await {
                warn!(error = %e, "the health listener stopped");
            }
        });
    }
    if let Some(listener) = listeners.metrics {
        ops.spawn(metrics::serve(listener, node.clone(), stopping()));
    }
    if let Some(schedule) = config.ops.backups.clone() {
        ops.spawn(backup::periodic(node.clone(), schedule));
    }
    // A client that keeps its side of a stream open could hold the graceful shutdown up
    // for ever: past the grace period, the remaining connections are simply dropped.
    let stopped = node.stopped();
    tokio::select! {
        r = server => r?,
        _ = async { stopped.await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            warn!(grace = ?SHUTDOWN_GRACE, "calls still open after the grace period; closing them");
        }
    }
    info!("shutting down");
    ops.abort_all();
    node.stop().await;
    node.store.flush_data().await.ok();
    Ok(())
}

/// A panic anywhere in the server stops the process (docs/design.md §10, fail-stop): tokio would
/// otherwise end only the task that panicked, and the server would go on serving without its
/// sequencer, replicator, monitor or flusher. The default hook prints the panic first.
pub fn fail_stop_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        tracing::error!(panic = %info, "a server task panicked: stopping (fail-stop)");
        std::process::exit(FAIL_STOP_EXIT);
    }));
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Installs the tracing subscriber (`RUST_LOG`, default `info`) used by the server binary.
pub fn init_tracing() {
    init_tracing_with_default("info");
}

/// Installs the tracing subscriber on stderr: `RUST_LOG` if set, else `default` (e.g. "warn"
/// for tools whose own output is the point); colours only on a terminal.
pub fn init_tracing_with_default(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}
