//! Error types of the server, and the one place they become gRPC statuses.

/// A configuration that cannot run; the message is one line naming the problem.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);
