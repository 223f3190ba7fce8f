//! Fault injection on the peer network (docs/design.md §8), enabled only by
//! `--enable-fault-injection`: per-peer rules that drop, delay, or lose the responses of
//! server-to-server traffic. Client traffic is never affected.

use std::sync::RwLock;
use std::time::Duration;

use replikv_proto::peer::{FaultDirection, FaultKind, FaultRule};

use crate::types::Rank;

/// What to do with one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Drop,
    Delay(Duration),
    DropResponse,
}

/// A step of a view change or state transfer where a test can have a server crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// Proposer: a quorum promised, the accepts are not sent yet.
    Prepared,
    /// Acceptor: the promise is persisted, the reply not sent.
    Promised,
    /// Acceptor: the accepted proposal is persisted, the reply not sent.
    Accepted,
    /// Proposer: a quorum accepted, the install is not sent yet.
    Decided,
    /// New primary: it holds the most advanced state, the members are not installed yet.
    Reconciled,
    /// Member: the install's state transfer is done, the reply not sent.
    Installed,
    /// Source: a state transfer has started and is not finished.
    Transferring,
}

impl std::str::FromStr for CrashPoint {
    type Err = String;
    fn from_str(s: &str) -> Result<CrashPoint, String> {
        Ok(match s {
            "prepared" => CrashPoint::Prepared,
            "promised" => CrashPoint::Promised,
            "accepted" => CrashPoint::Accepted,
            "decided" => CrashPoint::Decided,
            "reconciled" => CrashPoint::Reconciled,
            "installed" => CrashPoint::Installed,
            "transferring" => CrashPoint::Transferring,
            other => return Err(format!("unknown crash point {other:?}")),
        })
    }
}

/// The active rules. Read on every peer message, written only by the admin RPC.
#[derive(Default)]
pub struct Faults {
    /// `std::sync::RwLock`: held for a scan of a few rules, never across an await.
    rules: RwLock<Vec<FaultRule>>,
    /// Where this server is to crash next, if anywhere. `std::sync::Mutex`: one read or
    /// write, never across an await.
    crash_at: std::sync::Mutex<Option<CrashPoint>>,
}

impl Faults {
    /// Arms (or with `None` disarms) a crash at `point`.
    pub fn crash_at(&self, point: Option<CrashPoint>) {
        *self.crash_at.lock().expect("crash point lock") = point;
    }

    /// Kills this process with SIGKILL, as a crash would, if a crash is armed at `point`.
    pub fn crash_point(&self, point: CrashPoint) {
        if *self.crash_at.lock().expect("crash point lock") == Some(point) {
            tracing::warn!(?point, "crashing here (fault injection)");
            // SAFETY: kill(2) on this process's own pid with a valid signal number.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }

    pub fn set(&self, rules: Vec<FaultRule>) {
        *self.rules.write().expect("fault rules lock") = rules;
    }

    pub fn len(&self) -> usize {
        self.rules.read().expect("fault rules lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Action for a message this server sends to `peer`.
    pub fn outgoing(&self, peer: Rank) -> Option<Action> {
        self.find(peer, FaultDirection::Outgoing)
    }

    /// Action for a request this server receives from `peer`.
    pub fn incoming(&self, peer: Rank) -> Option<Action> {
        self.find(peer, FaultDirection::Incoming)
    }

    fn find(&self, peer: Rank, dir: FaultDirection) -> Option<Action> {
        let rules = self.rules.read().expect("fault rules lock");
        rules
            .iter()
            .filter(|r| r.peer == peer)
            .filter(|r| {
                let d = FaultDirection::try_from(r.direction).unwrap_or(FaultDirection::Both);
                d == FaultDirection::Both || d == dir
            })
            .map(
                |r| match FaultKind::try_from(r.kind).unwrap_or(FaultKind::Drop) {
                    FaultKind::Drop => Action::Drop,
                    FaultKind::Delay => Action::Delay(Duration::from_millis(r.delay_ms as u64)),
                    // A lost response concerns the side that waits for it: the sender of the
                    // request. On the receiving side it means "process, then do not answer".
                    FaultKind::DropResponse => Action::DropResponse,
                },
            )
            .next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_peer_and_direction() {
        let f = Faults::default();
        assert_eq!(f.outgoing(1), None);
        f.set(vec![
            FaultRule {
                peer: 1,
                kind: FaultKind::Drop as i32,
                direction: FaultDirection::Outgoing as i32,
                delay_ms: 0,
            },
            FaultRule {
                peer: 2,
                kind: FaultKind::Delay as i32,
                direction: FaultDirection::Both as i32,
                delay_ms: 30,
            },
        ]);
        assert_eq!(f.outgoing(1), Some(Action::Drop));
        assert_eq!(f.incoming(1), None);
        assert_eq!(
            f.incoming(2),
            Some(Action::Delay(Duration::from_millis(30)))
        );
        assert_eq!(f.outgoing(3), None);
        f.set(vec![]);
        assert!(f.is_empty());
    }
}
