//! Linearizable local reads (DESIGN.md §4): with a valid lease, and only once the key's
//! latest write is committed (`engine::commit`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::engine::commit;
use crate::error::ServeError;
use crate::types::user_item;

use super::Node;

/// How long a read waits for a pending key's commit notice.
const PENDING_READ_WAIT: Duration = Duration::from_secs(1);

impl Node {
    /// A linearizable local read (§4): only with a valid lease, and only once the key's
    /// latest write is committed.
    pub async fn read(self: &Arc<Self>, key: &[u8]) -> Result<Option<Bytes>, ServeError> {
        let item = user_item(key);
        let deadline = Instant::now() + PENDING_READ_WAIT;
        let mut commits = self.commit_tx.subscribe();
        loop {
            self.check_read()?;
            let entry = self.store.get(&item)?;
            let pending = entry
                .as_ref()
                .is_some_and(|e| commit::read_is_pending(&self.st(), e.lsn));
            match entry {
                Some(e) if pending => {
                    let lsn = e.lsn;
                    let waited =
                        tokio::time::timeout_at(deadline, commits.wait_for(|c| c.committed >= lsn))
                            .await;
                    if waited.is_err() {
                        let hint = self.hint(&self.st());
                        return Err(ServeError::unavailable(
                            "key has a write that is not committed yet",
                            hint,
                        ));
                    }
                }
                other => {
                    // The lease must still hold after the read, or the value may be stale.
                    self.check_read()?;
                    return Ok(other.and_then(|e| e.value));
                }
            }
        }
    }

    fn check_read(&self) -> Result<(), ServeError> {
        let st = self.st();
        match commit::read_refusal(&st, self.cfg.timing.lease, self.clock.now()) {
            None => Ok(()),
            Some(reason) => Err(ServeError::unavailable(reason, self.hint(&st))),
        }
    }
}
