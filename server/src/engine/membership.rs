//! Membership changes (docs/design.md §11): whether the primary may propose a change of the
//! configuration now, and the configuration it proposes. A change is one view change, decided
//! by the members of the view it leaves, one at a time.

use std::collections::BTreeSet;

use crate::types::{Configuration, Rank, ServerAddr, View};

/// A change of the configuration an operator asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A new server, at the next unused rank. It becomes a member later, by the join path.
    Add(ServerAddr),
    /// A server leaves the configuration and, if it is one, the members.
    Remove(Rank),
}

/// Why a change is refused; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("the view holds no configuration")]
    NoConfiguration,
    #[error("address {addr} is already in the configuration (rank {rank})")]
    AddressInUse { addr: String, rank: Rank },
    #[error("rank {0} is not in the configuration")]
    UnknownRank(Rank),
    #[error(
        "rank {0} is the primary and cannot remove itself: stop it so that the next rank takes \
         over, then remove it"
    )]
    Primary(Rank),
    #[error(
        "a membership change is in progress: rank {0} was added and has not joined yet (start \
         it with --join, or remove it)"
    )]
    InProgress(Rank),
    #[error("the ranks are exhausted")]
    RanksExhausted,
}

/// Whether `change` may be proposed from `view` (docs/design.md §11): one change at a time,
/// so a second one waits until the added server has joined (or is removed again); an
/// address belongs to one rank; the primary does not remove itself.
pub fn check(view: &View, change: &Change) -> Result<(), ChangeError> {
    let config = view.config.as_ref().ok_or(ChangeError::NoConfiguration)?;
    match change {
        Change::Add(addr) => {
            if let Some(p) = config.pending {
                return Err(ChangeError::InProgress(p));
            }
            for a in [&addr.client, &addr.peer] {
                if let Some(rank) = config.rank_of(a) {
                    return Err(ChangeError::AddressInUse {
                        addr: a.clone(),
                        rank,
                    });
                }
            }
            if config.next_rank == Rank::MAX {
                return Err(ChangeError::RanksExhausted);
            }
        }
        Change::Remove(r) => {
            if !config.contains(*r) {
                return Err(ChangeError::UnknownRank(*r));
            }
            if *r == view.primary {
                return Err(ChangeError::Primary(*r));
            }
            // Cancelling the change in progress is the one other change allowed meanwhile.
            if let Some(p) = config.pending.filter(|p| p != r) {
                return Err(ChangeError::InProgress(p));
            }
        }
    }
    Ok(())
}

/// The configuration and members the view after `change` has, from `view`'s configuration
/// and the members the proposer would keep (`members`, changed in place).
pub fn apply(
    view: &View,
    change: &Change,
    members: &mut BTreeSet<Rank>,
) -> Result<Configuration, ChangeError> {
    check(view, change)?;
    let mut config = view.config.clone().ok_or(ChangeError::NoConfiguration)?;
    match change {
        Change::Add(addr) => {
            let rank = config.next_rank;
            config.servers.insert(rank, addr.clone());
            config.next_rank += 1;
            config.pending = Some(rank);
        }
        Change::Remove(r) => {
            config.servers.remove(r);
            members.remove(r);
            if config.pending == Some(*r) {
                config.pending = None;
            }
        }
    }
    Ok(config)
}

/// A server of the configuration becomes a member: the change that added it is over.
pub fn joined(config: &mut Configuration, rank: Rank) {
    if config.pending == Some(rank) {
        config.pending = None;
    }
}

/// The rank `change` added in `decided`, if the decided view holds that change: the server
/// with the added address. `None` when another proposal was decided instead.
pub fn added_rank(decided: &View, addr: &ServerAddr) -> Option<Rank> {
    let config = decided.config.as_ref()?;
    config
        .servers
        .iter()
        .find(|(_, s)| *s == addr)
        .map(|(&r, _)| r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> ServerAddr {
        ServerAddr {
            client: format!("127.0.0.1:{port}"),
            peer: format!("127.0.0.1:{}", port + 100),
        }
    }

    fn three() -> View {
        View::new(5, 0, [0, 1, 2])
            .with_config(Some(Configuration::seed([7000, 7001, 7002].map(addr))))
    }

    #[test]
    fn an_added_server_gets_the_next_rank_and_is_not_a_member_yet() {
        let v = three();
        let mut members: BTreeSet<Rank> = v.members.iter().copied().collect();
        let c = apply(&v, &Change::Add(addr(7003)), &mut members).unwrap();
        assert_eq!(c.servers[&3], addr(7003));
        assert_eq!((c.next_rank, c.pending), (4, Some(3)));
        assert_eq!(members, BTreeSet::from([0, 1, 2]), "it joins later");
    }

    #[test]
    fn ranks_are_never_reused() {
        let v = three();
        let mut members: BTreeSet<Rank> = v.members.iter().copied().collect();
        let c = apply(&v, &Change::Remove(2), &mut members).unwrap();
        assert_eq!(members, BTreeSet::from([0, 1]));
        let v = View::new(6, 0, members.clone()).with_config(Some(c));
        let c = apply(&v, &Change::Add(addr(7002)), &mut members).unwrap();
        assert_eq!(c.servers[&3], addr(7002), "rank 2 stays retired");
        assert!(!c.contains(2));
    }

    #[test]
    fn a_used_address_an_unknown_rank_and_the_primary_are_refused() {
        let v = three();
        let dup = ServerAddr {
            client: "127.0.0.1:9000".into(),
            peer: "127.0.0.1:7101".into(),
        };
        assert_eq!(
            check(&v, &Change::Add(dup)),
            Err(ChangeError::AddressInUse {
                addr: "127.0.0.1:7101".into(),
                rank: 1
            })
        );
        assert_eq!(
            check(&v, &Change::Remove(7)),
            Err(ChangeError::UnknownRank(7))
        );
        assert_eq!(check(&v, &Change::Remove(0)), Err(ChangeError::Primary(0)));
        assert_eq!(
            check(&View::new(5, 0, [0]), &Change::Remove(1)),
            Err(ChangeError::NoConfiguration)
        );
    }

    #[test]
    fn one_change_at_a_time_except_cancelling_it() {
        let v = three();
        let mut members: BTreeSet<Rank> = v.members.iter().copied().collect();
        let c = apply(&v, &Change::Add(addr(7003)), &mut members).unwrap();
        let v = View::new(6, 0, members.clone()).with_config(Some(c));
        assert_eq!(
            check(&v, &Change::Add(addr(7004))),
            Err(ChangeError::InProgress(3))
        );
        assert_eq!(
            check(&v, &Change::Remove(1)),
            Err(ChangeError::InProgress(3))
        );
        let c = apply(&v, &Change::Remove(3), &mut members).unwrap();
        assert_eq!(c.pending, None);
        assert_eq!(c.next_rank, 4);
        let mut joined_config = v.config.clone().unwrap();
        joined(&mut joined_config, 3);
        assert_eq!(joined_config.pending, None);
    }

    #[test]
    fn the_decided_view_tells_which_rank_was_added() {
        let v = three();
        let mut members: BTreeSet<Rank> = v.members.iter().copied().collect();
        let c = apply(&v, &Change::Add(addr(7003)), &mut members).unwrap();
        let decided = View::new(6, 0, members).with_config(Some(c));
        assert_eq!(added_rank(&decided, &addr(7003)), Some(3));
        assert_eq!(added_rank(&three(), &addr(7003)), None);
    }
}
