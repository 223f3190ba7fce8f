//! replikv-deploytest: replikv as it is deployed, tested with real containers. Nothing here
//! ships; `cargo test --workspace` runs it (docs: README.md "Deploying").
//!
//! - [`docker`]: the Docker gate (a clear failure, or a skip with `REPLIKV_SKIP_DOCKER=1`),
//!   bounded commands, and the image built by `scripts/build-image.sh` from the binaries of
//!   the test build.
//! - [`compose`]: [`compose::ComposeCluster`], the cluster of `deploy/compose.yaml` started
//!   by `scripts/compose.sh` under a project of its own, the container faults (kill, start,
//!   restart, network disconnect), clients from the host; removed on drop, even in a panic.
//! - [`results`]: the write-unavailability CSV under `results/deploy/`.

pub mod compose;
pub mod docker;
pub mod results;
