//! replikv wire protocol.
//!
//! - [`kv`]: the public client API (`replikv.v1`, `proto/kv.proto`).
//! - [`peer`]: the server-to-server protocol and the fault-injection admin
//!   service (`replikv.peer.v1`, `proto/peer.proto`).
//! - [`ops`]: the operations API on the client port (`replikv.ops.v1`, `proto/ops.proto`):
//!   backups; every call of it is an admin operation.
//! - [`snapshot`]: the snapshot file: its layout, encoder and checking reader.
//! - [`pipeline`]: serving and reading the `Pipeline` call of `Kv`.
//! - Header names and limits every crate agrees on.
//!
//! Generated code stays at the edge: the server converts these types into its
//! own domain types in one module and never passes prost types inward.

/// Generated modules, nested as the protobuf packages are so that
/// cross-package references resolve.
mod generated {
    pub mod replikv {
        pub mod v1 {
            tonic::include_proto!("replikv.v1");
        }
        pub mod ops {
            pub mod v1 {
                tonic::include_proto!("replikv.ops.v1");
            }
        }
        pub mod peer {
            pub mod v1 {
                tonic::include_proto!("replikv.peer.v1");
            }
        }
    }
}

pub mod pipeline;
pub mod snapshot;

pub use generated::replikv::ops::v1 as ops;
pub use generated::replikv::peer::v1 as peer;
pub use generated::replikv::v1 as kv;

/// Metadata header on `UNAVAILABLE` naming the rank of the primary the server
/// knows of, so a client can go there directly.
pub const PRIMARY_RANK_HEADER: &str = "replikv-primary";
/// Metadata header on `UNAVAILABLE` naming the address of that primary.
pub const PRIMARY_ADDR_HEADER: &str = "replikv-primary-addr";
/// Metadata header on a failed write: [`OUTCOME_UNKNOWN`] when it may still
/// have taken effect (a retry with the same request id is safe),
/// [`OUTCOME_NONE`] when the server is sure it did not. A client that sees
/// neither must assume the outcome is unknown.
pub const OUTCOME_HEADER: &str = "replikv-outcome";
/// See [`OUTCOME_HEADER`].
pub const OUTCOME_UNKNOWN: &str = "unknown";
/// See [`OUTCOME_HEADER`].
pub const OUTCOME_NONE: &str = "none";
/// Metadata header of a `FAILED_PRECONDITION` with which a session refuses a write (docs/design.md
/// §10 "Sessions"): [`SESSION_EXPIRED`] or [`SESSION_RESULT_UNKNOWN`]. The refused request
/// applied nothing; every server answers it the same way, so it is not retried elsewhere.
pub const SESSION_HEADER: &str = "replikv-session";
/// See [`SESSION_HEADER`]: the servers hold no state of the session (it was idle past the
/// session TTL and collected); the client starts a new session.
pub const SESSION_EXPIRED: &str = "expired";
/// See [`SESSION_HEADER`]: the write's recorded result is no longer known (declared
/// finished, or forgotten beyond the results a session keeps); an earlier attempt may have
/// applied it.
pub const SESSION_RESULT_UNKNOWN: &str = "result-unknown";

/// Metadata header naming the user a client call speaks for (docs/security.md "Users").
pub const USER_HEADER: &str = "replikv-user";
/// Metadata header carrying the user's token, as `Bearer <token>`.
pub const AUTHORIZATION_HEADER: &str = "authorization";
/// The user every cluster is formed with; it may manage users.
pub const ADMIN_USER: &str = "admin";

/// Default largest key, in bytes.
pub const DEFAULT_MAX_KEY_BYTES: usize = 1024;
/// Default largest value, in bytes.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;
/// gRPC message size limit: the largest value plus room for the envelope.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
