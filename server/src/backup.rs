//! Snapshots, backups and restore (docs/design.md §12 "Snapshots").
//!
//! - [`Node::begin_snapshot`]: pins this server's state as of its applied lsn `A` and waits,
//!   in the same view, until `A` is committed: the snapshot is then the committed history
//!   up to `A`, every key as of that one point (`storage::snapshot` keeps it while writes go
//!   on).
//! - [`BackupService`]: the client-port `Snapshot` call, which streams the file's bytes (an
//!   admin operation: `auth::Users::admin`).
//! - [`periodic`]: `--backup-dir`: each server writes snapshots of its own committed state
//!   and keeps the newest `--backup-keep`.
//! - [`check_restore`] and [`Node::restore`]: `--restore FILE` on a bootstrapping rank 0, which
//!   forms the new cluster (with a new cluster id) holding the snapshot's keys.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::Stream;
use replikv_proto::ops::backup_server::Backup;
use replikv_proto::ops::{SnapshotChunk, SnapshotRequest};
use replikv_proto::snapshot::{self as file, Encoder, Header, SnapshotError};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::config::{BackupSchedule, Config};
use crate::engine::commit;
use crate::error::{ServeError, StorageError};
use crate::replica::Node;
use crate::storage::{Position, SnapshotPin};
use crate::types::{user_item, Entry, SyncEntry};

/// How long a snapshot waits for its point to be committed.
const COMMIT_WAIT: Duration = Duration::from_secs(5);
/// Keys read per page, and the size of one streamed chunk.
const PAGE_KEYS: usize = 1000;
const CHUNK_BYTES: usize = 1 << 20;
/// Keys set per batch when a snapshot is restored.
const RESTORE_BATCH: usize = 1000;

/// A snapshot being read: the store's pin and the file header.
pub struct Snapshot {
    pin: SnapshotPin,
    pub header: Header,
}

impl Node {
    /// Pins this server's state for a snapshot and waits until it is committed (see the
    /// module doc). Only a server that answers reads takes one.
    pub async fn begin_snapshot(self: &Arc<Self>) -> Result<Snapshot, ServeError> {
        self.check_serving()?;
        let cluster = self
            .identity
            .get()
            .map(|id| id.to_string())
            .ok_or_else(|| ServeError::unavailable("this server has no cluster yet", None))?;
        let (pin, epoch) = {
            // No write enters the store while the data lock is held: the pin's point is
            // exactly the applied lsn.
            let _data = self.data.lock().await;
            let st = self.st();
            (self.store.pin_snapshot(st.pos.applied), st.view.epoch)
        };
        let lsn = pin.lsn();
        let mut commits = self.commit_tx.subscribe();
        let deadline = tokio::time::Instant::now() + COMMIT_WAIT;
        loop {
            {
                let st = self.st();
                if st.view.epoch != epoch || !st.member {
                    return Err(ServeError::unavailable(
                        "the view changed before the snapshot's point was committed; retry",
                        self.hint(&st),
                    ));
                }
                if st.pos.committed >= lsn {
                    break;
                }
            }
            let waited = tokio::time::timeout_at(deadline, commits.changed()).await;
            if !matches!(waited, Ok(Ok(()))) {
                return Err(ServeError::unavailable(
                    "the snapshot's point was not committed in time; retry",
                    self.hint(&self.st()),
                ));
            }
        }
        self.check_serving()?;
        let created_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        info!(lsn, epoch, "snapshot pinned at a committed point");
        Ok(Snapshot {
            pin,
            header: Header {
                cluster,
                epoch,
                lsn,
                created_unix_ms,
                rank: self.me,
            },
        })
    }

    fn check_serving(&self) -> Result<(), ServeError> {
        let st = self.st();
        match commit::read_refusal(&st, self.cfg.timing.lease, self.clock.now()) {
            None => Ok(()),
            Some(reason) => Err(ServeError::unavailable(reason, self.hint(&st))),
        }
    }

    /// Writes `snap` as a snapshot file's bytes, in chunks of about [`CHUNK_BYTES`], to
    /// `sink`; stops when `sink` answers false. Returns the keys written, `None` if stopped.
    /// Blocking: it reads the store.
    pub fn write_snapshot(
        &self,
        snap: &Snapshot,
        mut sink: impl FnMut(Vec<u8>) -> bool,
    ) -> Result<Option<u64>, StorageError> {
        let mut buf = Vec::with_capacity(CHUNK_BYTES + 64 * 1024);
        let mut enc = Encoder::new(&snap.header, &mut buf);
        let mut after: Option<Bytes> = None;
        loop {
            let page = self
                .store
                .snapshot_page(&snap.pin, after.as_ref(), PAGE_KEYS)?;
            for (key, e) in &page.entries {
                let value = e.value.as_deref().unwrap_or_default();
                enc.entry(key, e.lsn, value, &mut buf);
                if buf.len() >= CHUNK_BYTES && !sink(std::mem::take(&mut buf)) {
                    return Ok(None);
                }
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let keys = enc.finish(&mut buf);
        if !sink(buf) {
            return Ok(None);
        }
        self.metrics.snapshots.inc();
        info!(
            lsn = snap.header.lsn,
            keys,
            preserved = snap.pin.preserved(),
            "snapshot written"
        );
        Ok(Some(keys))
    }
}

/// The `Backup` service on the client port.
pub struct BackupService {
    node: Arc<Node>,
    users: Arc<crate::auth::Users>,
}

impl BackupService {
    pub fn new(node: Arc<Node>, users: Arc<crate::auth::Users>) -> Self {
        BackupService { node, users }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<SnapshotChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Backup for BackupService {
    type SnapshotStream = ChunkStream;

    async fn snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        self.users
            .admin(&self.node.store, req.metadata(), "a snapshot")?;
        let snap = self
            .node
            .begin_snapshot()
            .await
            .map_err(ServeError::into_status)?;
        let (tx, rx) = mpsc::channel::<Result<SnapshotChunk, Status>>(4);
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || {
            let send = |data: Vec<u8>| {
                tx.blocking_send(Ok(SnapshotChunk { data: data.into() }))
                    .is_ok()
            };
            if let Err(e) = node.write_snapshot(&snap, send) {
                let _ = tx.blocking_send(Err(ServeError::Storage(e).into_status()));
            }
        });
        let chunks = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(futures::StreamExt::take_until(
            chunks,
            self.node.stopped(),
        ))))
    }
}

/// The name prefix and suffix of a periodic backup file.
const BACKUP_PREFIX: &str = "replikv-";
const BACKUP_SUFFIX: &str = ".snap";

/// Periodic backups (`--backup-dir`): every `every`, a server that answers reads writes a
/// snapshot of its own committed state (docs/design.md §12); one that does not skips that
/// round. Runs until the task is dropped.
pub async fn periodic(node: Arc<Node>, schedule: BackupSchedule) {
    let mut ticks =
        tokio::time::interval_at(tokio::time::Instant::now() + schedule.every, schedule.every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match backup_once(&node, &schedule).await {
            Ok(path) => info!(path = %path.display(), "backup written"),
            Err(e) => warn!(error = %e, dir = %schedule.dir.display(), "no backup this round"),
        }
    }
}

/// Writes one backup into the schedule's directory and removes the oldest beyond its count.
pub async fn backup_once(node: &Arc<Node>, schedule: &BackupSchedule) -> Result<PathBuf, String> {
    let snap = node.begin_snapshot().await.map_err(|e| e.to_string())?;
    let dir = schedule.dir.clone();
    let keep = schedule.keep;
    let node = node.clone();
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let h = &snap.header;
        // Names sort by time: zero-padded milliseconds.
        let name = format!(
            "{BACKUP_PREFIX}{:015}-e{}-l{}{BACKUP_SUFFIX}",
            h.created_unix_ms, h.epoch, h.lsn
        );
        let path = dir.join(&name);
        let tmp = dir.join(format!("{name}.tmp"));
        // The oldest go before the new one takes its name: never more than `keep` backups.
        write_file(&node, &snap, &tmp)
            .and_then(|()| prune(&dir, keep - 1, &tmp))
            .and_then(|()| std::fs::rename(&tmp, &path).map_err(|e| e.to_string()))
            .and_then(|()| sync_dir(&dir))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })?;
        Ok(path)
    })
    .await
    .map_err(|e| format!("backup task failed: {e}"))?
}

fn write_file(node: &Node, snap: &Snapshot, path: &Path) -> Result<(), String> {
    let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut w = std::io::BufWriter::new(f);
    let mut failed = None;
    node.write_snapshot(snap, |bytes| match w.write_all(&bytes) {
        Ok(()) => true,
        Err(e) => {
            failed = Some(e);
            false
        }
    })
    .map_err(|e| e.to_string())?;
    if let Some(e) = failed {
        return Err(format!("{}: {e}", path.display()));
    }
    let f = w.into_inner().map_err(|e| e.to_string())?;
    f.sync_all().map_err(|e| format!("{}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Keeps the newest `keep` backups of `dir` and removes the rest, and any temporary file a
/// crash left behind (but `current`). Only files named as backups are touched.
fn prune(dir: &Path, keep: usize, current: &Path) -> Result<(), String> {
    let mut backups = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(BACKUP_PREFIX) {
            continue;
        }
        if name.ends_with(&format!("{BACKUP_SUFFIX}.tmp")) && entry.path() != current {
            let _ = std::fs::remove_file(entry.path());
        } else if name.ends_with(BACKUP_SUFFIX) {
            backups.push(name);
        }
    }
    backups.sort();
    let excess = backups.len().saturating_sub(keep);
    for name in &backups[..excess] {
        std::fs::remove_file(dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
        info!(file = %name, "old backup removed");
    }
    Ok(())
}

/// Checks `--restore` when the server starts, before it changes anything: the flag belongs on
/// a bootstrapping rank 0, and the file must be a whole, undamaged snapshot.
pub fn check_restore(cfg: &Config) -> Result<Option<(Header, u64)>, String> {
    let Some(path) = &cfg.ops.restore else {
        return Ok(None);
    };
    if cfg.rank != 0 || !cfg.bootstrap {
        return Err("--restore forms a new cluster: give it to rank 0 with --bootstrap".into());
    }
    let (header, keys) =
        file::verify(path).map_err(|e| format!("cannot restore from {}: {e}", path.display()))?;
    info!(
        file = %path.display(),
        keys,
        lsn = header.lsn,
        from_cluster = %header.cluster,
        "restore file checked: a new cluster formed here will hold it"
    );
    Ok(Some((header, keys)))
}

impl Node {
    /// Loads the `--restore` snapshot into a data directory that holds nothing, as the new
    /// cluster's first state (docs/design.md §12): every key with its lsn, and the log position
    /// at the snapshot's commit point. Called by the bootstrap before it writes the cluster
    /// id, whose flush makes all of it durable at once. No session is restored.
    pub(crate) fn restore(&self, path: &Path) -> Result<(), String> {
        let err = |e: SnapshotError| format!("cannot restore from {}: {e}", path.display());
        // Checked whole once more: the file may have changed since the server started.
        let (header, _) = file::verify(path).map_err(err)?;
        let f = std::fs::File::open(path).map_err(|e| err(e.into()))?;
        let (mut reader, _) = file::Reader::open(std::io::BufReader::new(f)).map_err(err)?;
        let mut batch = Vec::with_capacity(RESTORE_BATCH);
        let mut keys = 0u64;
        while let Some(e) = reader.next().map_err(err)? {
            batch.push(SyncEntry {
                key: user_item(&e.key),
                entry: Some(Entry {
                    lsn: e.lsn,
                    value: Some(e.value.into()),
                }),
            });
            keys += 1;
            if batch.len() >= RESTORE_BATCH {
                self.store
                    .set_entries(&batch, None)
                    .map_err(|e| e.to_string())?;
                batch.clear();
            }
        }
        // The first view's records carry epoch 1: the snapshot's lsns continue in it.
        let pos = Position {
            applied: header.lsn,
            committed: header.lsn,
            last_epoch: 1,
        };
        self.store
            .set_entries(&batch, Some(pos))
            .map_err(|e| e.to_string())?;
        self.st().pos = pos;
        info!(
            keys,
            lsn = header.lsn,
            from_cluster = %header.cluster,
            "restored the snapshot into the new cluster"
        );
        Ok(())
    }
}
