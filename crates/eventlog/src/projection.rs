//! Projections: folds of a log into in-memory state, kept current by a live subscription and
//! resumable from a checkpoint (a snapshot of the state and the log position it reflects), so a
//! restart does not replay from zero.
//!
//! A projection is described by a [`ProjectionSpec`]: a name, the log it reads, an optional
//! subject filter and a pure `apply` function. The fold logic itself lives in `domain` (which
//! knows no IO); the runner here feeds it.
use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    task::Poll,
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Serialize, de::DeserializeOwned};
use tokio::{sync::watch, task::JoinHandle};

use crate::{EventLog, EventLogError, LogKind, RecordedEvent, SubjectFilter};

/// A projection's saved progress: the last applied log sequence and the state at that point.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub position: u64,
    pub snapshot: Bytes,
}

/// Where checkpoints are kept: a file per projection (embedded) or a JetStream KV bucket.
#[async_trait]
pub trait CheckpointStore: Send + Sync + fmt::Debug + 'static {
    async fn load(&self, name: &str) -> Result<Option<Checkpoint>, EventLogError>;
    async fn save(&self, name: &str, checkpoint: &Checkpoint) -> Result<(), EventLogError>;
}

/// What a projection is: which events it folds and how.
pub struct ProjectionSpec<P> {
    /// Stable name, the checkpoint key. Change it when the snapshot's shape changes, so an old
    /// snapshot is not restored into a new shape (the projection then rebuilds from zero).
    pub name: &'static str,
    pub log: LogKind,
    pub filter: Option<SubjectFilter>,
    /// Pure fold step. Must tolerate events it does not know (newer writers).
    pub apply: fn(&mut P, &RecordedEvent),
    /// For a snapshot that leaves part of the state out (kept in memory only): where a
    /// restored state is folded from again, before its checkpoint's position, to rebuild it.
    /// `apply` must then leave what it folded before unchanged when it sees it again.
    pub rewind: Option<fn(&P) -> u64>,
}

impl<P> Clone for ProjectionSpec<P> {
    fn clone(&self) -> Self {
        ProjectionSpec {
            name: self.name,
            log: self.log,
            filter: self.filter.clone(),
            apply: self.apply,
            rewind: self.rewind,
        }
    }
}

impl<P> fmt::Debug for ProjectionSpec<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionSpec")
            .field("name", &self.name)
            .field("log", &self.log)
            .field("filter", &self.filter)
            .finish_non_exhaustive()
    }
}

/// When the runner saves a checkpoint: after this many applied events, or this long after the
/// first unsaved event, whichever comes first; and always at shutdown.
#[derive(Debug, Clone)]
pub struct CheckpointPolicy {
    pub every_events: u64,
    pub every: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            every_events: 10_000,
            every: Duration::from_secs(5),
        }
    }
}

/// Folds `log` events `1..=until` into `initial`: the state "as of position N", for audits.
pub async fn fold_until<P>(
    log: &dyn EventLog,
    spec: &ProjectionSpec<P>,
    mut state: P,
    until: u64,
) -> Result<P, EventLogError> {
    let mut events = log.read_from(spec.log, 1, spec.filter.as_ref()).await?;
    while let Some(event) = events.next().await {
        let event = event?;
        if event.sequence > until {
            break;
        }
        (spec.apply)(&mut state, &event);
    }
    Ok(state)
}

struct Shared<P> {
    /// The state together with the position it reflects: one lock, so a checkpoint can never
    /// pair a state with the position of another moment (events would be applied twice or
    /// skipped after a restart from it).
    state: RwLock<Projected<P>>,
    /// The same position, published after the state: watchers wait on it for
    /// read-your-writes (a reader that saw position N finds at least N in the state).
    position: watch::Sender<u64>,
}

struct Projected<P> {
    state: P,
    position: u64,
}

/// Keeps one projection current. Cheap to clone; readers never wait for the writer longer than
/// one batch of applies.
pub struct ProjectionRunner<P> {
    shared: Arc<Shared<P>>,
    spec: ProjectionSpec<P>,
    checkpoints: Arc<dyn CheckpointStore>,
    task: Arc<Follower>,
}

/// The task that follows the log; it stops when the last clone of its runner is dropped.
struct Follower(JoinHandle<()>);

impl Drop for Follower {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<P> Clone for ProjectionRunner<P> {
    fn clone(&self) -> Self {
        ProjectionRunner {
            shared: self.shared.clone(),
            spec: self.spec.clone(),
            checkpoints: self.checkpoints.clone(),
            task: self.task.clone(),
        }
    }
}

impl<P> fmt::Debug for ProjectionRunner<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionRunner")
            .field("spec", &self.spec)
            .field("position", &*self.shared.position.borrow())
            .finish_non_exhaustive()
    }
}

impl<P> ProjectionRunner<P>
where
    P: Default + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Restores the projection from its checkpoint (or starts empty), catches up to the end of
    /// the log as it is now, and keeps following it in the background. Returns once caught up.
    pub async fn start(
        log: Arc<dyn EventLog>,
        checkpoints: Arc<dyn CheckpointStore>,
        spec: ProjectionSpec<P>,
        policy: CheckpointPolicy,
    ) -> Result<Self, EventLogError> {
        Self::start_configured(log, checkpoints, spec, policy, |_| {}).await
    }

    /// [`ProjectionRunner::start`] for a projection that takes settings: `configure` is given
    /// the state (restored or new) before it folds anything, since settings are not part of
    /// a snapshot.
    pub async fn start_configured(
        log: Arc<dyn EventLog>,
        checkpoints: Arc<dyn CheckpointStore>,
        spec: ProjectionSpec<P>,
        policy: CheckpointPolicy,
        configure: impl FnOnce(&mut P) + Send,
    ) -> Result<Self, EventLogError> {
        let (mut state, mut position) = match checkpoints.load(spec.name).await? {
            Some(checkpoint) => match serde_json::from_slice::<P>(&checkpoint.snapshot) {
                Ok(state) => (state, checkpoint.position),
                Err(error) => {
                    tracing::warn!(
                        projection = spec.name,
                        %error,
                        "checkpoint snapshot unreadable; rebuilding the projection from the start"
                    );
                    (P::default(), 0)
                }
            },
            None => (P::default(), 0),
        };
        // Catch up in the foreground up to the end of the log as it is now, so the returned
        // runner already reflects everything written before start. The position then means
        // "log read through here", also for filtered projections that skipped events.
        let end = log.last_sequence(spec.log).await?;
        if position > end {
            // A checkpoint past the end of the log belongs to another log (the store was
            // recreated, or the checkpoint is damaged): resuming from it would skip every
            // event up to its position.
            tracing::warn!(
                projection = spec.name,
                checkpoint = position,
                log_end = end,
                "checkpoint is ahead of the log; rebuilding the projection from the start"
            );
            (state, position) = (P::default(), 0);
        }
        configure(&mut state);
        // A restored state that leaves part out is folded again from where it says.
        let from = match spec.rewind {
            Some(rewind) if position > 0 => rewind(&state).clamp(1, position + 1),
            _ => position + 1,
        };
        if end >= from {
            let mut events = log.read_from(spec.log, from, spec.filter.as_ref()).await?;
            while let Some(event) = events.next().await {
                let event = match event {
                    Ok(event) => event,
                    Err(error @ EventLogError::Corrupt { .. }) => {
                        tracing::error!(projection = spec.name, %error, "skipping an unreadable event");
                        continue;
                    }
                    Err(error) => return Err(error),
                };
                if event.sequence > end {
                    break;
                }
                (spec.apply)(&mut state, &event);
            }
            position = end;
        }
        let shared = Arc::new(Shared {
            state: RwLock::new(Projected { state, position }),
            position: watch::Sender::new(position),
        });
        let task = tokio::spawn(follow(
            log,
            checkpoints.clone(),
            spec.clone(),
            policy,
            shared.clone(),
        ));
        Ok(ProjectionRunner {
            shared,
            spec,
            checkpoints,
            task: Arc::new(Follower(task)),
        })
    }

    /// Reads the current state. Do not block inside `read`.
    pub fn read<R>(&self, read: impl FnOnce(&P) -> R) -> R {
        let state = self
            .shared
            .state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        read(&state.state)
    }

    /// Reads the current state together with the log sequence it reflects (taken under the
    /// same lock, so they always belong together).
    pub fn read_at<R>(&self, read: impl FnOnce(&P, u64) -> R) -> R {
        let state = self
            .shared
            .state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        read(&state.state, state.position)
    }

    /// The last log sequence the state reflects.
    pub fn position(&self) -> u64 {
        *self.shared.position.borrow()
    }

    /// Waits until the projection has seen the log up to `sequence` (e.g. the sequence an
    /// append just returned), so a caller reads its own writes. With a subject filter, wait
    /// only for sequences of events the projection folds: skipped events do not move it.
    pub async fn wait_for(&self, sequence: u64) {
        let mut position = self.shared.position.subscribe();
        // The sender lives as long as `self`, so this only ends when the position is reached.
        let _ = position.wait_for(|p| *p >= sequence).await;
    }

    /// Saves a checkpoint of the current state now.
    pub async fn save_checkpoint(&self) -> Result<(), EventLogError> {
        let checkpoint = snapshot(&self.shared)?;
        self.checkpoints.save(self.spec.name, &checkpoint).await
    }

    /// Stops following the log and saves a final checkpoint.
    pub async fn shutdown(self) -> Result<(), EventLogError> {
        self.task.0.abort();
        self.save_checkpoint().await
    }
}

fn snapshot<P: Serialize>(shared: &Shared<P>) -> Result<Checkpoint, EventLogError> {
    let projected = shared
        .state
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let position = projected.position;
    let snapshot =
        serde_json::to_vec(&projected.state).map_err(|e| EventLogError::InvalidEvent {
            reason: format!("projection snapshot could not be encoded: {e}"),
        })?;
    Ok(Checkpoint {
        position,
        snapshot: snapshot.into(),
    })
}

/// How many ready events are applied under one write lock.
const APPLY_BATCH: usize = 512;

async fn follow<P>(
    log: Arc<dyn EventLog>,
    checkpoints: Arc<dyn CheckpointStore>,
    spec: ProjectionSpec<P>,
    policy: CheckpointPolicy,
    shared: Arc<Shared<P>>,
) where
    P: Serialize + Send + Sync + 'static,
{
    const FIRST_RETRY: Duration = Duration::from_millis(50);
    let mut unsaved = 0u64;
    // When the oldest unsaved event must be checkpointed at the latest.
    let mut save_by: Option<tokio::time::Instant> = None;
    let mut retry_delay = FIRST_RETRY;
    let mut batch = Vec::new();
    loop {
        let from = *shared.position.borrow() + 1;
        let mut events = match log.subscribe(spec.log, from, spec.filter.as_ref()).await {
            Ok(events) => events.fuse(),
            Err(EventLogError::Closed) => return,
            Err(error) => {
                tracing::warn!(projection = spec.name, %error, "cannot follow the log; retrying");
                tokio::time::sleep(retry_delay).await;
                retry_delay = (retry_delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let failure = loop {
            let deadline = save_by;
            let taken = tokio::select! {
                taken = next_batch(&mut events, &mut batch) => taken,
                () = sleep_until(deadline), if deadline.is_some() => {
                    save_checkpoint(&spec, &shared, checkpoints.as_ref()).await;
                    unsaved = 0;
                    save_by = None;
                    continue;
                }
            };
            if !taken {
                break None;
            }
            let mut applied = 0u64;
            let mut last = None;
            let mut failure = None;
            {
                let mut projected = shared
                    .state
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                for item in batch.drain(..) {
                    match item {
                        Ok(event) => {
                            (spec.apply)(&mut projected.state, &event);
                            applied += 1;
                            last = Some(event.sequence);
                        }
                        // An unreadable record cannot be folded by any version; the stream
                        // goes on past it and the audit shows it.
                        Err(error @ EventLogError::Corrupt { .. }) => {
                            tracing::error!(projection = spec.name, %error, "skipping an unreadable event");
                        }
                        Err(error) => {
                            failure = Some(error);
                            break;
                        }
                    }
                }
                if let Some(sequence) = last {
                    projected.position = sequence;
                }
            }
            if let Some(sequence) = last {
                retry_delay = FIRST_RETRY;
                unsaved += applied;
                save_by.get_or_insert_with(|| tokio::time::Instant::now() + policy.every);
                shared.position.send_replace(sequence);
            }
            if unsaved >= policy.every_events {
                save_checkpoint(&spec, &shared, checkpoints.as_ref()).await;
                unsaved = 0;
                save_by = None;
            }
            if failure.is_some() {
                break failure;
            }
        };
        match failure {
            Some(EventLogError::Closed) => {
                save_checkpoint(&spec, &shared, checkpoints.as_ref()).await;
                return;
            }
            Some(error) => {
                tracing::warn!(projection = spec.name, %error, "log subscription failed; resuming")
            }
            None => tracing::warn!(projection = spec.name, "log subscription ended; resuming"),
        }
        tokio::time::sleep(retry_delay).await;
        retry_delay = (retry_delay * 2).min(Duration::from_secs(5));
    }
}

/// Waits for the next event and takes every one ready behind it, up to [`APPLY_BATCH`], into
/// `batch` (emptied first, its allocation kept: `ready_chunks` allocates room for a whole
/// batch at each wake, 300 KB for the few events a live write group brings). False when the
/// stream has ended and nothing was taken. Cancel-safe: an event taken is in `batch` and the
/// future has returned.
async fn next_batch(
    events: &mut futures_util::stream::Fuse<crate::EventStream>,
    batch: &mut Vec<Result<RecordedEvent, EventLogError>>,
) -> bool {
    batch.clear();
    std::future::poll_fn(|cx| {
        loop {
            match events.poll_next_unpin(cx) {
                Poll::Ready(Some(item)) => {
                    batch.push(item);
                    if batch.len() >= APPLY_BATCH {
                        return Poll::Ready(true);
                    }
                }
                Poll::Ready(None) => return Poll::Ready(!batch.is_empty()),
                Poll::Pending if batch.is_empty() => return Poll::Pending,
                Poll::Pending => return Poll::Ready(true),
            }
        }
    })
    .await
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Saves a checkpoint now; a failure is logged, not fatal: the projection keeps working and
/// the next checkpoint tries again (a restart then replays a little more).
async fn save_checkpoint<P: Serialize>(
    spec: &ProjectionSpec<P>,
    shared: &Shared<P>,
    checkpoints: &dyn CheckpointStore,
) {
    match snapshot(shared) {
        Ok(checkpoint) => {
            if let Err(error) = checkpoints.save(spec.name, &checkpoint).await {
                tracing::warn!(projection = spec.name, %error, "checkpoint not saved");
            }
        }
        Err(error) => tracing::warn!(projection = spec.name, %error, "checkpoint not taken"),
    }
}

/// Checkpoints as files in a directory (embedded default): `<name>.checkpoint`, written to a
/// temporary file, fsynced and renamed into place, so a crash leaves the old or the new one.
#[derive(Debug, Clone)]
pub struct FileCheckpointStore {
    dir: PathBuf,
}

impl FileCheckpointStore {
    /// Opens (creating it with mode 0700 if needed, and tightening it to 0700) the
    /// checkpoint directory; checkpoint files are written with mode 0600.
    pub fn open(dir: &Path) -> Result<Self, EventLogError> {
        crate::private_fs::create_dir_all(dir)
            .map_err(|e| EventLogError::io(format!("creating {}", dir.display()), e))?;
        // Temporary files of saves a crash interrupted; the checkpoints they were to replace
        // are intact.
        let entries = std::fs::read_dir(dir)
            .map_err(|e| EventLogError::io(format!("listing {}", dir.display()), e))?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(FileCheckpointStore {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, name: &str) -> Result<PathBuf, EventLogError> {
        if !crate::subject::is_token(name) {
            return Err(EventLogError::InvalidSubject {
                subject: name.to_owned(),
                reason: "projection names use only A-Z a-z 0-9 _ -".to_owned(),
            });
        }
        Ok(self.dir.join(format!("{name}.checkpoint")))
    }
}

#[async_trait]
impl CheckpointStore for FileCheckpointStore {
    async fn load(&self, name: &str) -> Result<Option<Checkpoint>, EventLogError> {
        let path = self.path(name)?;
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(EventLogError::io(format!("reading {}", path.display()), e)),
        };
        decode_checkpoint(&bytes)
            .map(Some)
            .ok_or_else(|| EventLogError::Corrupt {
                location: path.display().to_string(),
                reason: "checkpoint shorter than its 8-byte position".to_owned(),
            })
    }

    async fn save(&self, name: &str, checkpoint: &Checkpoint) -> Result<(), EventLogError> {
        let path = self.path(name)?;
        let bytes = encode_checkpoint(checkpoint);
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || write_atomically(&dir, &path, &bytes))
            .await
            .map_err(|e| EventLogError::unavailable(format!("checkpoint writer failed: {e}")))?
    }
}

/// `position` as 8 bytes big-endian, then the snapshot.
pub(crate) fn encode_checkpoint(checkpoint: &Checkpoint) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(8 + checkpoint.snapshot.len());
    bytes.extend_from_slice(&checkpoint.position.to_be_bytes());
    bytes.extend_from_slice(&checkpoint.snapshot);
    bytes
}

pub(crate) fn decode_checkpoint(bytes: &[u8]) -> Option<Checkpoint> {
    let (position, snapshot) = bytes.split_first_chunk::<8>()?;
    Some(Checkpoint {
        position: u64::from_be_bytes(*position),
        snapshot: Bytes::copy_from_slice(snapshot),
    })
}

fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), EventLogError> {
    use std::io::Write;
    // Unique per write: a save still running in an aborted follower must not share its
    // temporary file with the final save at shutdown.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("checkpoint.{}.{n}.tmp", std::process::id()));
    let io = |what: &str, e| EventLogError::io(format!("{what} {}", tmp.display()), e);
    let mut file = crate::private_fs::open_options()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| io("creating", e))?;
    file.write_all(bytes).map_err(|e| io("writing", e))?;
    file.sync_data().map_err(|e| io("syncing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("renaming", e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| EventLogError::io(format!("syncing {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use std::task::Poll;

    use futures_util::StreamExt;

    use super::{APPLY_BATCH, next_batch};
    use crate::{EventLogError, EventStream};

    fn item(n: usize) -> Result<crate::RecordedEvent, EventLogError> {
        Err(EventLogError::Corrupt {
            location: n.to_string(),
            reason: String::new(),
        })
    }

    fn location(item: &Result<crate::RecordedEvent, EventLogError>) -> String {
        match item {
            Err(EventLogError::Corrupt { location, .. }) => location.clone(),
            _ => String::new(),
        }
    }

    #[tokio::test]
    async fn a_batch_takes_what_is_ready_up_to_the_limit_and_reuses_its_room() {
        let total = APPLY_BATCH + 10;
        let events: EventStream = Box::pin(futures_util::stream::iter((0..total).map(item)));
        let mut events = events.fuse();
        let mut batch = Vec::new();

        assert!(next_batch(&mut events, &mut batch).await);
        assert_eq!(batch.len(), APPLY_BATCH);
        assert_eq!(location(&batch[0]), "0");
        let room = batch.as_ptr();

        assert!(next_batch(&mut events, &mut batch).await);
        assert_eq!(
            batch.len(),
            10,
            "the rest, and the first batch's events are gone"
        );
        assert_eq!(location(&batch[0]), APPLY_BATCH.to_string());
        assert_eq!(
            batch.as_ptr(),
            room,
            "the first batch's allocation, not a new one"
        );

        assert!(
            !next_batch(&mut events, &mut batch).await,
            "the stream ended"
        );
        assert!(batch.is_empty());
        assert!(
            !next_batch(&mut events, &mut batch).await,
            "and stays ended"
        );
    }

    #[tokio::test]
    async fn a_batch_ends_at_the_first_event_not_ready_and_waits_only_when_it_has_none() {
        // Two events, then nothing ready, then a third, then the end.
        let mut steps = vec![
            Poll::Ready(Some(item(0))),
            Poll::Ready(Some(item(1))),
            Poll::Pending,
            Poll::Pending,
            Poll::Ready(Some(item(2))),
            Poll::Ready(None),
        ]
        .into_iter();
        let events: EventStream = Box::pin(futures_util::stream::poll_fn(move |cx| {
            let step = steps.next().unwrap_or(Poll::Ready(None));
            if step.is_pending() {
                cx.waker().wake_by_ref();
            }
            step
        }));
        let mut events = events.fuse();
        let mut batch = Vec::new();

        assert!(next_batch(&mut events, &mut batch).await);
        let taken: Vec<String> = batch.iter().map(location).collect();
        assert_eq!(
            taken,
            ["0", "1"],
            "stops at the first pending poll with events in hand"
        );

        // Nothing ready at first: it waits (and is woken) instead of returning empty.
        assert!(next_batch(&mut events, &mut batch).await);
        let taken: Vec<String> = batch.iter().map(location).collect();
        assert_eq!(taken, ["2"]);

        assert!(!next_batch(&mut events, &mut batch).await);
    }
}
