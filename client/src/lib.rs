//! replikv client library and the `replikv` command line.
//!
//! - [`config`]: [`ClientConfig`], [`Route`] and server-address parsing.
//! - [`error`]: [`Error`], and how a failed attempt is classified (retry or
//!   not, may it have been applied, primary redirect).
//! - `backoff`: jittered exponential backoff between attempts.
//! - `session`: session ids (128 bits from the operating system, drawn per
//!   session, so no two processes or forked children share one) and request
//!   ids for exactly-once writes (`seq`, `first_unfinished`).
//! - `routing`: which server an attempt goes to (random order, known
//!   primary, latency averages).
//! - [`client`]: the async [`Client`]: one lazy channel per server and the
//!   retry loop (docs/design.md §6).
//! - [`blocking`]: [`BlockingClient`], the same API behind a private runtime;
//!   usable after `fork` (a child's first call builds a client of its own).
//! - [`certs`]: `replikv cert`: a cluster CA, node and client certificates (PEM).
//! - [`cli`]: the `replikv` command (`get`, `put`, `delete`, `status`, `shell`).
//! - [`shell`]: `replikv shell`, a line protocol on stdin for people and programs.
//! - [`snapshot`]: `replikv snapshot save|check` and `replikv health`: the cluster as a
//!   whole (docs/design.md §12).
//!
//! ```no_run
//! # async fn demo() -> Result<(), replikv_client::Error> {
//! use replikv_client::{Client, ClientConfig};
//! let client = Client::connect(ClientConfig::new(["127.0.0.1:7000", "127.0.0.1:7001"])).await?;
//! let old = client.put("greeting", "hello").await?;
//! assert_eq!(client.get("greeting").await?.as_deref(), Some(&b"hello"[..]));
//! # let _ = old;
//! # Ok(())
//! # }
//! ```

mod backoff;
pub mod blocking;
pub mod certs;
pub mod cli;
pub mod client;
pub mod config;
pub mod error;
mod pipe;
mod routing;
mod session;
pub mod shell;
pub mod snapshot;

pub use blocking::BlockingClient;
pub use client::{CasOutcome, Client, ClientStats, Range, RangeDeleted, ScanPage};
pub use config::{ClientConfig, Route};
pub use error::Error;
pub use replikv_proto::kv::StatusResponse;
