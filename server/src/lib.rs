//! replikv replica.
//!
//! - [`config`]: flags / TOML config, validated into [`config::Config`].
//! - [`error`]: error enums and their single mapping to `tonic::Status`.
//! - [`cluster`]: [`cluster::LocalCluster`], N real server processes on loopback for tests and tools.

pub mod cluster;
pub mod config;
pub mod error;

pub use config::{Config, Opt, SyncMode};

/// Runs a server with the given options until SIGTERM / Ctrl-C.
pub async fn serve(opt: Opt) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let _config = opt.resolve()?;
    Err("not implemented yet".into())
}

/// Installs the tracing subscriber (`RUST_LOG`, default `info`) used by the binaries.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
