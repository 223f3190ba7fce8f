//! Clients for the systems replikv is compared with, speaking just the two operations the
//! benchmark needs.
//!
//! - [`etcd`]: etcd's v3 gRPC KV API (`Put`, `Range`), with hand-written prost messages.
//! - [`redis`]: a Redis primary with replicas, each write followed by `WAIT`.

pub mod etcd;
pub mod redis;

use rand::Rng;
use replikv_client::Route;

/// Index of the server a peer request goes to: `random` spreads requests over every server,
/// the other routes use the first one (the peers have no latency-probing client to mirror
/// replikv's `nearest`, and on loopback every server is equally near).
fn pick_server<R: Rng + ?Sized>(route: Route, servers: usize, rng: &mut R) -> usize {
    match route {
        Route::Random if servers > 1 => rng.random_range(0..servers),
        _ => 0,
    }
}
