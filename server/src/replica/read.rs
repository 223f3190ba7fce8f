//! Linearizable local reads (docs/design.md §4): with a valid lease, and only once the key's
//! latest write is committed (`engine::commit`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::engine::commit;
use crate::error::ServeError;
use crate::types::{key_of_user_item, user_item, ItemRange};

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

    /// A linearizable scan (docs/design.md §6 "Scans"): the first `limit` keys of `range` that
    /// hold a value, with their values, and whether more may follow. Served like a read:
    /// only with a valid lease before and after, and only once every entry the page covers
    /// (tombstones included) is committed, waiting for that as a read of a pending key does.
    ///
    /// The store answers as of one applied batch `A`: the page is the state of the keys it
    /// covers after the log prefix up to `A`, and the newest entry among them, `n <= A`, is
    /// committed before the answer. No write between `n` and `A` touches those keys, so the
    /// page is what a read of each would see once `n` is committed; writes sequenced after
    /// the scan began are concurrent with it and may be ordered after it. The page is not
    /// scanned again after the wait, so writes that keep coming cannot starve a scan.
    pub async fn scan(
        self: &Arc<Self>,
        range: &ItemRange,
        limit: usize,
    ) -> Result<(Vec<(Bytes, Bytes)>, bool), ServeError> {
        self.check_read()?;
        let page = self
            .store
            .scan(range.start.clone(), range.end.clone(), limit)?;
        let newest = page.entries.iter().map(|(_, e)| e.lsn).max().unwrap_or(0);
        if commit::read_is_pending(&self.st(), newest) {
            let mut commits = self.commit_tx.subscribe();
            let waited = tokio::time::timeout(
                PENDING_READ_WAIT,
                commits.wait_for(|c| c.committed >= newest),
            )
            .await;
            if !matches!(waited, Ok(Ok(_))) {
                let hint = self.hint(&self.st());
                return Err(ServeError::unavailable(
                    "the range has a write that is not committed yet",
                    hint,
                ));
            }
        }
        // The lease must still hold after the scan, or the page may be stale.
        self.check_read()?;
        let more = !page.exhausted;
        let mut items: Vec<(Bytes, Bytes)> = page
            .live()
            .filter_map(|(item, v)| {
                let key = key_of_user_item(item)?;
                Some((item.slice_ref(key), v.clone()))
            })
            .collect();
        let more = more || items.len() > limit;
        items.truncate(limit);
        Ok((items, more))
    }

    fn check_read(&self) -> Result<(), ServeError> {
        self.refuse_if_removed()?;
        let st = self.st();
        match commit::read_refusal(&st, self.cfg.timing.lease, self.clock.now()) {
            None => Ok(()),
            Some(reason) => Err(ServeError::unavailable(reason, self.hint(&st))),
        }
    }
}
