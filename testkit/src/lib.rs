//! replikv-testkit: the tooling that tests, the load generator and the chaos nemesis use
//! to run and break real clusters. Nothing here ships in the server.
//!
//! - [`cluster`]: [`LocalCluster`], N real server processes on loopback: start, kill,
//!   pause, restart, wipe, wait for a primary or for convergence.
//! - [`status`]: the status probe: the public `Status` RPC under a deadline.
//! - [`fault`]: the fault client: the Admin (fault-injection) RPC and its rule sets.
//! - [`process`]: child-process guards: bounded waits, kill and reap on drop.
//! - [`fixtures`]: the integration tests' shared fixtures: a bounded serial runner,
//!   clusters, clients, a recording writer, read-back checks.
//! - [`fake`]: scripted in-process `Kv` servers for the client's retry tests.

pub mod cluster;
pub mod fake;
pub mod fault;
pub mod fixtures;
pub mod process;
pub mod status;

pub use cluster::{ClusterOptions, LocalCluster, ServerCommand};
