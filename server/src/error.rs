//! Error types of the server, and the one place they become gRPC statuses (docs/design.md §6).

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use crate::types::Rank;

/// A configuration that cannot run; the message is one line naming the problem.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Local storage failed. Any of these on the write path makes the server fail-stop.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error("a batch of {0} bytes is larger than a write-ahead log record can hold")]
    BatchTooLarge(usize),
    #[error("an earlier write to sled failed: {0}")]
    EarlierWriteFailed(String),
    #[error("injected storage fault")]
    Injected,
}

/// Whether a failed write may still have taken effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Certainly not applied.
    None,
    /// May have been applied (a retry with the same request id is safe).
    Unknown,
}

/// The primary a client should try instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrimaryHint {
    pub rank: Rank,
    pub addr: String,
}

impl PrimaryHint {
    /// Names this primary in a response's (or error's) metadata.
    pub fn insert_into(&self, metadata: &mut MetadataMap) {
        if let Ok(v) = MetadataValue::try_from(self.rank.to_string()) {
            metadata.insert(replikv_proto::PRIMARY_RANK_HEADER, v);
        }
        if let Ok(v) = MetadataValue::try_from(self.addr.as_str()) {
            metadata.insert(replikv_proto::PRIMARY_ADDR_HEADER, v);
        }
    }
}

/// Why a request was not served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad input: never retried, nothing changed.
    #[error("{0}")]
    InvalidArgument(String),
    /// Not able to serve here and now (not primary, no lease, view change, pending key...).
    #[error("{reason}")]
    Unavailable {
        reason: String,
        primary: Option<PrimaryHint>,
        outcome: Outcome,
    },
    /// Too many requests in flight.
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("storage failure: {0}")]
    Storage(#[from] StorageError),
    /// The cluster's state does not allow the request now (a membership change while
    /// another is in progress, docs/design.md §11); nothing changed.
    #[error("{0}")]
    Precondition(String),
    /// The write's session cannot answer it (docs/design.md §10 "Sessions"): its recorded result
    /// is no longer known, or the session expired. This request applied nothing; an earlier
    /// attempt of the same request may have. Never retried elsewhere: every server answers
    /// the same.
    #[error("{message}")]
    Session {
        refusal: SessionRefusal,
        message: String,
    },
}

/// Why a session refused a write; named in the [`SESSION_HEADER`] of the status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionRefusal {
    /// The write's result was deleted (declared finished) or forgotten (too many unfinished).
    ResultUnknown,
    /// The session expired and its state was collected: the client needs a new session.
    Expired,
}

pub use replikv_proto::SESSION_HEADER;

impl SessionRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionRefusal::ResultUnknown => replikv_proto::SESSION_RESULT_UNKNOWN,
            SessionRefusal::Expired => replikv_proto::SESSION_EXPIRED,
        }
    }
}

impl ServeError {
    pub fn unavailable(reason: impl Into<String>, primary: Option<PrimaryHint>) -> ServeError {
        ServeError::Unavailable {
            reason: reason.into(),
            primary,
            outcome: Outcome::None,
        }
    }

    pub fn unknown(reason: impl Into<String>, primary: Option<PrimaryHint>) -> ServeError {
        ServeError::Unavailable {
            reason: reason.into(),
            primary,
            outcome: Outcome::Unknown,
        }
    }

    /// A session refusal as the primary reported it to a forwarding server.
    pub fn session_from_status(s: &Status) -> ServeError {
        let expired = s
            .metadata()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            == Some(SessionRefusal::Expired.as_str());
        ServeError::Session {
            refusal: if expired {
                SessionRefusal::Expired
            } else {
                SessionRefusal::ResultUnknown
            },
            message: s.message().to_string(),
        }
    }

    /// The single mapping to gRPC. `UNAVAILABLE` carries the known primary and, for writes,
    /// whether the outcome is known; `RESOURCE_EXHAUSTED` and `INVALID_ARGUMENT` are always
    /// definite (nothing was applied). A session refusal is `FAILED_PRECONDITION` with the
    /// "no outcome" header (this request applied nothing) and the refusal's reason.
    pub fn into_status(self) -> Status {
        match self {
            ServeError::Session { refusal, message } => {
                let mut s = with_outcome(Status::failed_precondition(message), Outcome::None);
                s.metadata_mut()
                    .insert(SESSION_HEADER, MetadataValue::from_static(refusal.as_str()));
                s
            }
            ServeError::InvalidArgument(m) => {
                with_outcome(Status::invalid_argument(m), Outcome::None)
            }
            ServeError::Overloaded(m) => with_outcome(Status::resource_exhausted(m), Outcome::None),
            ServeError::Precondition(m) => {
                with_outcome(Status::failed_precondition(m), Outcome::None)
            }
            ServeError::Unavailable {
                reason,
                primary,
                outcome,
            } => {
                let mut s = with_outcome(Status::unavailable(reason), outcome);
                if let Some(p) = primary {
                    p.insert_into(s.metadata_mut());
                }
                s
            }
            // The server fail-stops on storage errors; whatever was in flight is unknown.
            ServeError::Storage(e) => with_outcome(
                Status::new(Code::Unavailable, e.to_string()),
                Outcome::Unknown,
            ),
        }
    }
}

fn with_outcome(mut s: Status, o: Outcome) -> Status {
    let v = match o {
        Outcome::None => replikv_proto::OUTCOME_NONE,
        Outcome::Unknown => replikv_proto::OUTCOME_UNKNOWN,
    };
    s.metadata_mut()
        .insert(replikv_proto::OUTCOME_HEADER, MetadataValue::from_static(v));
    s
}

/// Reads the outcome a forwarded write's status reported (absent header: unknown).
pub fn status_outcome(s: &Status) -> Outcome {
    match s
        .metadata()
        .get(replikv_proto::OUTCOME_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some(replikv_proto::OUTCOME_NONE) => Outcome::None,
        _ => Outcome::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_carries_primary_and_outcome() {
        let s = ServeError::unknown(
            "deposed",
            Some(PrimaryHint {
                rank: 2,
                addr: "127.0.0.1:7002".into(),
            }),
        )
        .into_status();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(
            s.metadata()
                .get(replikv_proto::PRIMARY_ADDR_HEADER)
                .unwrap(),
            "127.0.0.1:7002"
        );
        assert_eq!(status_outcome(&s), Outcome::Unknown);
        let s = ServeError::InvalidArgument("key too long".into()).into_status();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(status_outcome(&s), Outcome::None);
        assert_eq!(
            status_outcome(&Status::unavailable("transport")),
            Outcome::Unknown
        );
    }

    #[test]
    fn session_refusals_are_failed_precondition_and_survive_a_forward() {
        for refusal in [SessionRefusal::Expired, SessionRefusal::ResultUnknown] {
            let s = ServeError::Session {
                refusal,
                message: "session x".into(),
            }
            .into_status();
            assert_eq!(s.code(), Code::FailedPrecondition);
            assert_eq!(status_outcome(&s), Outcome::None);
            assert_eq!(s.metadata().get(SESSION_HEADER).unwrap(), refusal.as_str());
            match ServeError::session_from_status(&s) {
                ServeError::Session {
                    refusal: r,
                    message,
                } => {
                    assert_eq!((r, message.as_str()), (refusal, "session x"))
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
