//! Fault injection on the peer network (DESIGN.md §8), enabled only by
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

/// The active rules. Read on every peer message, written only by the admin RPC.
#[derive(Default)]
pub struct Faults {
    /// `std::sync::RwLock`: held for a scan of a few rules, never across an await.
    rules: RwLock<Vec<FaultRule>>,
}

impl Faults {
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
