//! Membership changes an operator asks for (docs/design.md §11): the primary checks the change
//! against its view, proposes it as a view change and answers once it is decided and
//! installed. The rules are the engine's (`engine::membership`).

use std::sync::Arc;

use tracing::info;

use super::{Node, Reason};
use crate::engine::membership::{self, Change, ChangeError};
use crate::error::ServeError;
use crate::types::{Rank, View};

impl Node {
    /// The installed view with its configuration (the seed while it holds none).
    pub fn member_view(&self) -> View {
        let st = self.st();
        let config = st.view.config.clone().unwrap_or_else(|| self.seed.clone());
        st.view.clone().with_config(Some(config))
    }

    /// Runs `change` as a view change on the primary; the decided view, and the rank the
    /// change concerns. Elsewhere the answer names the primary and nothing changed.
    pub async fn change_membership(
        self: &Arc<Self>,
        change: Change,
    ) -> Result<(Rank, View), ServeError> {
        {
            let st = self.st();
            if st.primary.is_none() {
                return Err(ServeError::unavailable(
                    "membership changes are decided by the primary",
                    self.hint(&st),
                ));
            }
            membership::check(&st.view, &change).map_err(refusal)?;
        }
        // One change at a time (docs/design.md §11): a second one asked meanwhile is refused
        // rather than queued behind the first.
        let Ok(_one) = self.changing_membership.try_lock() else {
            return Err(ServeError::Precondition(
                "a membership change is in progress; try again once it is done".into(),
            ));
        };
        info!(?change, "membership change asked");
        let decided = self
            .change_view(Reason::Reconfigure(change.clone()))
            .await
            .map_err(|e| {
                ServeError::unavailable(format!("the membership change was not decided: {e}"), None)
            })?;
        let config = decided.config.as_ref();
        let rank = match &change {
            Change::Add(addr) => membership::added_rank(&decided, addr),
            Change::Remove(r) => config.filter(|c| !c.contains(*r)).map(|_| *r),
        };
        match rank {
            Some(rank) => Ok((rank, decided)),
            // Another proposal was decided instead of ours (Paxos keeps an accepted value).
            None => Err(ServeError::unavailable(
                "another view change was decided instead; ask again",
                None,
            )),
        }
    }
}

/// How a refused change is answered: bad input, or not now.
fn refusal(e: ChangeError) -> ServeError {
    match e {
        ChangeError::AddressInUse { .. } | ChangeError::UnknownRank(_) => {
            ServeError::InvalidArgument(e.to_string())
        }
        ChangeError::Primary(_)
        | ChangeError::InProgress(_)
        | ChangeError::NoConfiguration
        | ChangeError::RanksExhausted => ServeError::Precondition(e.to_string()),
    }
}
