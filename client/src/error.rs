//! The client's error type, and how one failed RPC attempt is classified.

use std::time::Duration;

use replikv_proto::{OUTCOME_HEADER, OUTCOME_NONE, OUTCOME_UNKNOWN, PRIMARY_ADDR_HEADER};
use tonic::{Code, Status};

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The input was rejected (by this library or a server). Never retried;
    /// nothing was changed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The client configuration is unusable (bad server list, zero timeout,
    /// or a server that does not speak the replikv API).
    #[error("configuration error: {0}")]
    Config(String),
    /// No server could serve the request before its deadline. A write was
    /// definitely not applied.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A write that may or may not have been applied. Reading the key tells;
    /// the servers will not apply it later on their own.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// The servers answered `RESOURCE_EXHAUSTED` until the deadline. A write
    /// was definitely not applied.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The servers no longer hold this client's write session (it was idle
    /// longer than their session TTL and was collected). The write was
    /// definitely not applied. [`crate::Client`]'s writes handle it by
    /// starting a new session and trying once more, so a caller sees it only
    /// if the new session is refused too.
    #[error("session expired: {0}")]
    SessionExpired(String),
    /// The cluster refused the request as it stands now (`FAILED_PRECONDITION`): for
    /// example a membership change while another one is in progress. Nothing changed.
    #[error("refused: {0}")]
    Refused(String),
    /// The servers do not know the client's user or token, or got none (docs/security.md
    /// "Users"). Nothing was changed.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The client's user may not make this call (it needs the admin user). Nothing was
    /// changed.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
}

impl Error {
    /// True when a write may have taken effect although it failed.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Error::OutcomeUnknown(_))
    }
}

/// What the retry loop should do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Try another server (after a backoff).
    Retry,
    /// The input is bad; every server would say so.
    GiveUpInvalid,
    /// The server does not serve the replikv API.
    GiveUpConfig,
    /// The credentials were refused (`denied`: the user is known but may not do this).
    GiveUpAuth { denied: bool },
    /// The write's session refused it (docs/design.md §10); every server would.
    /// `expired`: the servers hold no state of the session; otherwise the
    /// write's recorded result is no longer known.
    GiveUpSession { expired: bool },
}

/// One failed attempt, as the retry loop sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AttemptFailure {
    pub next: Next,
    /// The server answered `RESOURCE_EXHAUSTED`.
    pub overloaded: bool,
    /// A server (rather than a refused connection or a timer) produced this
    /// failure, so it says something about the servers' load.
    pub answered: bool,
    /// A write attempt that may have been applied. Only a server's explicit
    /// "no outcome" or a connection that never opened clears it (docs/design.md §6:
    /// an outcome that may have taken effect is never reported as a definite
    /// failure).
    pub may_have_applied: bool,
    /// The primary's address from an `UNAVAILABLE` redirect.
    pub primary_addr: Option<String>,
    /// For error messages.
    pub detail: String,
}

impl AttemptFailure {
    /// The attempt's own deadline passed: the request may be executing still.
    pub fn timed_out(after: Duration) -> Self {
        Self {
            next: Next::Retry,
            overloaded: false,
            answered: false,
            may_have_applied: true,
            primary_addr: None,
            detail: format!("no answer within {}", humantime::format_duration(after)),
        }
    }

    /// Classifies a gRPC status, from a server or from the local transport.
    pub fn from_status(status: &Status) -> Self {
        let code = status.code();
        let header = |name: &str| {
            status
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let session = header(replikv_proto::SESSION_HEADER);
        let next = match code {
            Code::FailedPrecondition if session.is_some() => Next::GiveUpSession {
                expired: session.as_deref() == Some(replikv_proto::SESSION_EXPIRED),
            },
            Code::InvalidArgument | Code::OutOfRange | Code::AlreadyExists => Next::GiveUpInvalid,
            Code::Unimplemented => Next::GiveUpConfig,
            Code::Unauthenticated => Next::GiveUpAuth { denied: false },
            Code::PermissionDenied => Next::GiveUpAuth { denied: true },
            // Unavailable, ResourceExhausted, DeadlineExceeded and whatever a
            // broken connection turns into (Unknown, Internal, Cancelled...):
            // another server may do better.
            _ => Next::Retry,
        };
        let never_connected = never_connected(status);
        let may_have_applied = match header(OUTCOME_HEADER).as_deref() {
            Some(OUTCOME_NONE) => false,
            Some(OUTCOME_UNKNOWN) => true,
            // No (or an unrecognised) header: decide from what we know about
            // where the request got to.
            _ => !(never_connected || rejected_before_executing(code)),
        };
        let detail = if status.message().is_empty() {
            format!("{code:?}")
        } else {
            format!("{code:?}: {}", status.message())
        };
        Self {
            next,
            overloaded: code == Code::ResourceExhausted && !never_connected,
            answered: !never_connected,
            may_have_applied,
            primary_addr: if code == Code::Unavailable {
                header(PRIMARY_ADDR_HEADER).filter(|a| !a.is_empty())
            } else {
                None
            },
            detail,
        }
    }
}

/// Codes a server returns only before it starts executing a request:
/// validation failures, an unknown method, and load shedding (the server's
/// concurrency limit rejects a request before it reaches the handler).
fn rejected_before_executing(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::OutOfRange
            | Code::AlreadyExists
            | Code::Unimplemented
            | Code::Unauthenticated
            | Code::PermissionDenied
            | Code::ResourceExhausted
    )
}

/// True when the attempt failed while opening the connection, so the request
/// never left this process. tonic keeps the transport error as the status's
/// source; a `ConnectError` (refused, unreachable, connect timeout) anywhere in
/// that chain means no byte of the request was sent.
fn never_connected(status: &Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(err) = source {
        if err.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        source = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn with_header(mut status: Status, name: &'static str, value: &'static str) -> Status {
        status
            .metadata_mut()
            .insert(name, MetadataValue::from_static(value));
        status
    }

    #[test]
    fn unavailable_without_outcome_header_may_have_applied() {
        let f = AttemptFailure::from_status(&Status::unavailable("lost the primary"));
        assert_eq!(f.next, Next::Retry);
        assert!(f.may_have_applied);
        assert!(!f.overloaded);
        assert_eq!(f.primary_addr, None);
    }

    #[test]
    fn outcome_header_decides_when_present() {
        let none = with_header(Status::unavailable("no"), OUTCOME_HEADER, OUTCOME_NONE);
        assert!(!AttemptFailure::from_status(&none).may_have_applied);
        let unknown = with_header(
            Status::deadline_exceeded("slow"),
            OUTCOME_HEADER,
            OUTCOME_UNKNOWN,
        );
        assert!(AttemptFailure::from_status(&unknown).may_have_applied);
        // Even a code that normally means "rejected up front" defers to the
        // server's explicit word.
        let shed_late = with_header(
            Status::resource_exhausted("busy"),
            OUTCOME_HEADER,
            OUTCOME_UNKNOWN,
        );
        assert!(AttemptFailure::from_status(&shed_late).may_have_applied);
    }

    #[test]
    fn session_refusals_give_up_at_once() {
        let expired = with_header(
            Status::failed_precondition("session x expired"),
            replikv_proto::SESSION_HEADER,
            replikv_proto::SESSION_EXPIRED,
        );
        let expired = with_header(expired, OUTCOME_HEADER, OUTCOME_NONE);
        let f = AttemptFailure::from_status(&expired);
        assert_eq!(f.next, Next::GiveUpSession { expired: true });
        assert!(!f.may_have_applied);
        let unknown = with_header(
            Status::failed_precondition("result no longer known"),
            replikv_proto::SESSION_HEADER,
            replikv_proto::SESSION_RESULT_UNKNOWN,
        );
        assert_eq!(
            AttemptFailure::from_status(&unknown).next,
            Next::GiveUpSession { expired: false }
        );
        // Without the header it is some other precondition: another server may do better.
        let other = Status::failed_precondition("something else");
        assert_eq!(AttemptFailure::from_status(&other).next, Next::Retry);
    }

    #[test]
    fn primary_redirect_is_read_from_unavailable_only() {
        let redirect = with_header(
            Status::unavailable("not primary"),
            PRIMARY_ADDR_HEADER,
            "127.0.0.1:7001",
        );
        assert_eq!(
            AttemptFailure::from_status(&redirect)
                .primary_addr
                .as_deref(),
            Some("127.0.0.1:7001")
        );
        let other = with_header(
            Status::internal("boom"),
            PRIMARY_ADDR_HEADER,
            "127.0.0.1:7001",
        );
        assert_eq!(AttemptFailure::from_status(&other).primary_addr, None);
    }

    #[test]
    fn bad_input_gives_up_and_changed_nothing() {
        let f = AttemptFailure::from_status(&Status::invalid_argument("key too large"));
        assert_eq!(f.next, Next::GiveUpInvalid);
        assert!(!f.may_have_applied);
        assert!(f.detail.contains("key too large"));
        let f = AttemptFailure::from_status(&Status::unimplemented(""));
        assert_eq!(f.next, Next::GiveUpConfig);
    }

    #[test]
    fn overload_is_retried_and_did_not_apply() {
        let f = AttemptFailure::from_status(&Status::resource_exhausted("too many requests"));
        assert_eq!(f.next, Next::Retry);
        assert!(f.overloaded);
        assert!(!f.may_have_applied);
    }

    #[test]
    fn connection_refused_did_not_apply() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let status = Status::from_error(Box::new(tonic::ConnectError(Box::new(io))));
        assert_eq!(status.code(), Code::Unavailable);
        let f = AttemptFailure::from_status(&status);
        assert_eq!(f.next, Next::Retry);
        assert!(!f.may_have_applied);
        assert!(!f.answered);
    }

    #[test]
    fn broken_connection_and_timeouts_may_have_applied() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let status = Status::from_error(Box::new(io));
        assert!(AttemptFailure::from_status(&status).may_have_applied);
        assert!(AttemptFailure::timed_out(Duration::from_secs(2)).may_have_applied);
        assert!(AttemptFailure::from_status(&Status::unknown("h2 error")).may_have_applied);
    }

    #[test]
    fn only_outcome_unknown_reports_unknown_outcome() {
        assert!(Error::OutcomeUnknown("x".into()).is_outcome_unknown());
        assert!(!Error::Unavailable("x".into()).is_outcome_unknown());
        assert!(!Error::Overloaded("x".into()).is_outcome_unknown());
    }
}
