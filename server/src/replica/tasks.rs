//! The one owner of the replica's background tasks (CONVENTIONS.md "One shutdown path"): the
//! sequencer, flusher, session collector, monitor, one stream per member, view changes run
//! for a failed member, lease-gate wake-ups and transfer sources are all spawned here, and
//! [`Tasks::stop`] ends every one of them on shutdown.

use std::future::Future;
use std::sync::Mutex;

use tokio::task::JoinSet;

/// `std::sync::Mutex`: held only to add a task or take the set, never across an await.
pub(crate) struct Tasks {
    set: Mutex<Option<JoinSet<()>>>,
}

impl Tasks {
    pub(crate) fn new() -> Tasks {
        Tasks {
            set: Mutex::new(Some(JoinSet::new())),
        }
    }

    /// Runs `task` until it ends or the replica stops. After [`Tasks::stop`] nothing starts.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut set = self.set.lock().expect("tasks lock");
        if let Some(set) = set.as_mut() {
            // Finished tasks leave the set here, so it holds only running ones.
            while set.try_join_next().is_some() {}
            set.spawn(task);
        }
    }

    /// Runs blocking `work` on the blocking pool (it cannot be aborted, but it is waited for).
    pub(crate) fn spawn_blocking(&self, work: impl FnOnce() + Send + 'static) {
        let mut set = self.set.lock().expect("tasks lock");
        if let Some(set) = set.as_mut() {
            while set.try_join_next().is_some() {}
            set.spawn_blocking(work);
        }
    }

    /// Stops every task and waits until they are gone.
    pub(crate) async fn stop(&self) {
        let set = self.set.lock().expect("tasks lock").take();
        if let Some(mut set) = set {
            set.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn stop_ends_running_tasks_and_starts_no_new_ones() {
        let tasks = Tasks::new();
        let ended = Arc::new(AtomicBool::new(false));
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = Flag(ended.clone());
        tasks.spawn(async move {
            let _flag = flag;
            std::future::pending::<()>().await
        });
        tasks.stop().await;
        assert!(ended.load(Ordering::SeqCst), "the running task was dropped");
        let started = Arc::new(AtomicBool::new(false));
        let s = started.clone();
        tasks.spawn(async move { s.store(true, Ordering::SeqCst) });
        tokio::task::yield_now().await;
        assert!(!started.load(Ordering::SeqCst));
    }
}
