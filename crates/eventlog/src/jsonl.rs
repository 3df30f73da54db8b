//! JSONL file adapter, the embedded default: one append-only file per log
//! (`<dir>/config.jsonl`, `<dir>/invocations.jsonl`), one JSON record per line:
//!
//! ```text
//! {"seq":7,"subject":"server.s1","type":"ServerEnabled","batch":[2,3],"group":5,"envelope":{…proto3 JSON…}}
//! ```
//!
//! `seq` is the log sequence (1 for the first line), `type` the event type name as written,
//! `batch: [i, n]` marks the i-th of the n events of one atomic append (left out when n is 1),
//! `group` is the first sequence of the record's write group, and `envelope` is the event
//! envelope in the proto3 JSON mapping. Each write group ends with a commit mark line (see
//! `record`).
//!
//! - **Appends** go to one writer thread per file, which commits them in groups: the group's
//!   records are written and synced, then a commit mark line (`{"commit":N}`) is written and
//!   synced, and only then are the appends answered (`writer`).
//! - **Reads** use an in-memory index of record offsets and of each aggregate's sequences,
//!   covering acknowledged records only, and positioned reads of the file (`reader`).
//! - **Start-up** rebuilds the index and cuts off whatever follows the last commit mark (a
//!   write group a crash left unfinished, in any shape); damage before it fails the open with
//!   `Corrupt` (`recovery`, which also states the rule for files without marks).
//! - Only one writable `JsonlLog` may have a directory open at a time (an exclusive lock on
//!   `<dir>/eventlog.lock`), across processes and within one.
//! - **Auditing** ([`JsonlLog::open_read_only`]) reads a directory without the lock, while
//!   the Switchboard process that holds it keeps appending: a snapshot of the complete
//!   records, with no writer and without changing any file.
use std::{
    fmt,
    fs::{File, TryLockError},
    io,
    ops::Range,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use async_trait::async_trait;
use proto::v1::Envelope;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    AggregateHistory, AppendOutcome, EventLog, EventLogError, EventStream, ExpectedVersion,
    LogKind, RecordedEvent, Subject, SubjectFilter,
};

mod index;
mod pacing;
mod reader;
mod record;
mod recovery;
mod segments;
mod writer;

use index::Index;
use segments::Segment;
pub use writer::LogFile;
use writer::{AppendRequest, Command, Dedupe, PreparedEvent, Writer};

const LOCK_FILE: &str = "eventlog.lock";
/// How often, and how far apart, a held directory lock is asked again (see `lock_dir`).
const LOCK_RETRIES: usize = 20;
const LOCK_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// Turns a log's file into what its writer writes through (see [`JsonlLog::open_with_files`]).
pub type LogFileWrapper = Arc<dyn Fn(LogKind, File) -> Box<dyn LogFile> + Send + Sync>;

/// How long invocation events are kept by default: 400 days, as on JetStream.
pub const DEFAULT_INVOCATION_RETENTION: Duration = Duration::from_secs(400 * 24 * 60 * 60);

/// Tuning of a [`JsonlLog`].
#[derive(Debug, Clone)]
pub struct JsonlOptions {
    /// Most events written and synced together in one group commit. Larger groups amortise
    /// the sync over more events; an append is never split, so one larger than this is a
    /// group of its own.
    pub max_batch_events: usize,
    /// Appends that may wait for a log's writer before `append` itself waits (back-pressure).
    pub queue_capacity: usize,
    /// How many of the most recent event ids per log are reloaded into the dedupe memory at
    /// open, so that a retry of an append made just before a restart is still recognised.
    /// (Records do not carry their append time, so the window is rebuilt by count.)
    pub dedupe_ids_on_open: usize,
    /// How long invocation events are kept (`None`: forever). The invocations log is split
    /// into monthly segment files, and a segment is dropped whole once every event it can
    /// hold is older than this (see `segments`). The configuration log keeps everything.
    pub invocation_retention: Option<Duration>,
    /// The clock that decides segments and retention (a seam for tests).
    pub now: fn() -> SystemTime,
}

impl Default for JsonlOptions {
    fn default() -> Self {
        JsonlOptions {
            max_batch_events: 4096,
            queue_capacity: 8192,
            dedupe_ids_on_open: 100_000,
            invocation_retention: Some(DEFAULT_INVOCATION_RETENTION),
            now: SystemTime::now,
        }
    }
}

/// The JSONL event log. Cheap to clone; the files are closed when the last clone is dropped
/// (or on [`JsonlLog::close`]). Nothing acknowledged can be lost either way: an append is
/// acknowledged only after it is synced.
#[derive(Clone)]
pub struct JsonlLog {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    config: LogHandle,
    invocations: LogHandle,
}

/// One log file: what readers share, and the way to its writer.
struct LogHandle {
    shared: Arc<LogShared>,
    /// `None` when the log was opened read-only.
    writer: Option<WriterLink>,
}

struct WriterLink {
    // Field order matters: the sender is dropped before the writer thread is joined, so the
    // thread sees its queue close and ends.
    commands: mpsc::Sender<Command>,
    _thread: WriterThread,
}

/// What readers of one log share with its writer.
pub(super) struct LogShared {
    kind: LogKind,
    /// The active file, for messages.
    path: PathBuf,
    /// The log's segments, oldest first, with read handles (none for a read-only log whose
    /// file did not exist when it was opened; its index is empty, so nothing is ever read).
    segments: RwLock<Vec<Arc<Segment>>>,
    index: RwLock<Index>,
    /// The last committed sequence, and whether the writer has stopped.
    head: watch::Sender<Head>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Head {
    last: u64,
    closed: bool,
}

impl LogShared {
    fn read_index(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_index(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_segments(&self) -> RwLockReadGuard<'_, Vec<Arc<Segment>>> {
        self.segments.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_segments(&self) -> RwLockWriteGuard<'_, Vec<Arc<Segment>>> {
        self.segments
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the bytes in `range` of the log's virtual byte space (its segments one after
    /// the other) into `bytes` (replacing what it held).
    fn read_into(&self, range: Range<u64>, bytes: &mut Vec<u8>) -> Result<(), EventLogError> {
        // Only newly grown capacity is zeroed; a reused buffer is overwritten as it is.
        bytes.resize((range.end - range.start) as usize, 0);
        if range.is_empty() {
            return Ok(());
        }
        let context = || format!("reading {}", self.path.display());
        // The segments the range covers, with where each ends; the lock is not held during
        // the reads.
        let parts: Vec<(Arc<Segment>, u64)> = {
            let segments = self.read_segments();
            let from = segments
                .partition_point(|segment| segment.base <= range.start)
                .saturating_sub(1);
            segments[from.min(segments.len())..]
                .iter()
                .enumerate()
                .take_while(|(_, segment)| segment.base < range.end)
                .map(|(i, segment)| {
                    let end = segments
                        .get(from + i + 1)
                        .map_or(u64::MAX, |next| next.base);
                    (segment.clone(), end)
                })
                .collect()
        };
        if parts.is_empty() {
            return Err(EventLogError::io(
                context(),
                io::Error::new(io::ErrorKind::NotFound, "the file did not exist at open"),
            ));
        }
        let mut at = range.start;
        for (segment, segment_end) in parts {
            if at >= range.end {
                break;
            }
            let end = range.end.min(segment_end);
            let filled = (at - range.start) as usize;
            let part = &mut bytes[filled..filled + (end - at) as usize];
            read_exact_at(&segment.file, part, at - segment.base)
                .map_err(|e| EventLogError::io(format!("reading {}", segment.path.display()), e))?;
            at = end;
        }
        if at < range.end {
            return Err(EventLogError::io(
                context(),
                io::Error::new(io::ErrorKind::UnexpectedEof, "past the last segment"),
            ));
        }
        Ok(())
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(unix)]
fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

#[cfg(windows)]
fn write_all_at(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_write(buf, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Joins the writer thread when the log is dropped, so that the file is closed and the
/// directory unlocked by the time the drop returns.
struct WriterThread(Mutex<Option<JoinHandle<()>>>);

impl Drop for WriterThread {
    fn drop(&mut self) {
        let handle = self
            .0
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl JsonlLog {
    /// Opens (creating if needed) the logs in `dir`, recovering from an unfinished last
    /// append. Fails if another `JsonlLog` has the directory open, or if a file is corrupt
    /// anywhere but in its last append.
    pub async fn open(dir: &Path, options: JsonlOptions) -> Result<JsonlLog, EventLogError> {
        Self::open_with_files(dir, options, Arc::new(|_, file| Box::new(file))).await
    }

    /// [`JsonlLog::open`], with each log's writer going through `wrap(log, file)` instead of
    /// the file itself: the seam tests use to watch writes and syncs or make them fail.
    /// Recovery at open still reads and repairs the real file.
    pub async fn open_with_files(
        dir: &Path,
        options: JsonlOptions,
        wrap: LogFileWrapper,
    ) -> Result<JsonlLog, EventLogError> {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || open_blocking(dir, &options, &wrap))
            .await
            .map_err(|e| EventLogError::unavailable(format!("opening the event log failed: {e}")))?
    }

    /// Opens the logs in `dir` for reading only, for auditing, also (and especially) while a
    /// running Switchboard has them open with [`JsonlLog::open`] and keeps appending.
    ///
    /// - Takes no lock and changes nothing: no file or directory is created, written or
    ///   truncated, and no writer is started. [`EventLog::append`] fails with
    ///   [`EventLogError::ReadOnly`].
    /// - The log is a snapshot of each file's complete records at open. An unfinished tail
    ///   (a torn last line, or a batch whose last lines are missing) may be an append in
    ///   flight in the other process: it is left out, not reported and not cut off. Damage
    ///   before the tail fails the open with `Corrupt`, as in [`JsonlLog::open`].
    /// - A log file that does not exist yet reads as an empty log; a missing `dir` is an
    ///   error.
    /// - `read_from`, `read_aggregate` and `last_sequence` answer from the snapshot.
    ///   `subscribe` does not follow the files: it delivers the snapshot's events from its
    ///   start position, then ends with one `Closed` error, as on a closed log.
    ///
    /// The snapshot may include the records of an append the other process has written and
    /// is still syncing; in the rare case that sync fails, that process cuts them off again
    /// (and a later read of them through this handle fails).
    pub async fn open_read_only(dir: &Path) -> Result<JsonlLog, EventLogError> {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || open_read_only_blocking(dir))
            .await
            .map_err(|e| EventLogError::unavailable(format!("opening the event log failed: {e}")))?
    }

    /// Whether this handle was opened with [`JsonlLog::open_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.inner.config.writer.is_none()
    }

    /// The directory the logs are in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Finishes the appends already queued, then stops the writers and closes the files
    /// (releasing the directory lock). Later appends fail with `Closed`; subscriptions end
    /// with `Closed` once they have delivered every stored event; reads keep working.
    /// (Nothing to do on a read-only log.)
    pub async fn close(&self) {
        for log in [&self.inner.config, &self.inner.invocations] {
            let Some(writer) = &log.writer else {
                continue;
            };
            let (reply, done) = oneshot::channel();
            if writer.commands.send(Command::Close(reply)).await.is_ok() {
                let _ = done.await;
            }
        }
    }

    fn log(&self, kind: LogKind) -> &LogHandle {
        match kind {
            LogKind::Config => &self.inner.config,
            LogKind::Invocations => &self.inner.invocations,
        }
    }
}

impl fmt::Debug for JsonlLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonlLog")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

fn open_blocking(
    dir: PathBuf,
    options: &JsonlOptions,
    wrap: &LogFileWrapper,
) -> Result<JsonlLog, EventLogError> {
    let existed = dir
        .try_exists()
        .map_err(|e| EventLogError::io(format!("checking {}", dir.display()), e))?;
    crate::private_fs::create_dir_all(&dir)
        .map_err(|e| EventLogError::io(format!("creating {}", dir.display()), e))?;
    if !existed {
        // The files' directory entries are synced as they are created; the directory's own
        // entry must be durable too, or a crash could lose the whole log.
        let parent = match dir.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        recovery::sync_dir(parent).map_err(|e| {
            EventLogError::io(
                format!("syncing the parent directory of {}", dir.display()),
                e,
            )
        })?;
    }
    let lock = Arc::new(lock_dir(&dir)?);
    let config = open_log(&dir, LogKind::Config, options, &lock, wrap)?;
    let invocations = open_log(&dir, LogKind::Invocations, options, &lock, wrap)?;
    Ok(JsonlLog {
        inner: Arc::new(Inner {
            dir,
            config,
            invocations,
        }),
    })
}

fn open_read_only_blocking(dir: PathBuf) -> Result<JsonlLog, EventLogError> {
    let is_dir = std::fs::metadata(&dir)
        .map_err(|e| EventLogError::io(format!("opening the event log in {}", dir.display()), e))?
        .is_dir();
    if !is_dir {
        return Err(EventLogError::io(
            format!("opening the event log in {}", dir.display()),
            io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    let config = snapshot_log(&dir, LogKind::Config)?;
    let invocations = snapshot_log(&dir, LogKind::Invocations)?;
    Ok(JsonlLog {
        inner: Arc::new(Inner {
            dir,
            config,
            invocations,
        }),
    })
}

fn log_path(dir: &Path, kind: LogKind) -> PathBuf {
    dir.join(format!("{}.jsonl", kind.as_str()))
}

/// A log of a read-only open: its snapshot, and no writer (its head is closed from the start,
/// so subscriptions end after the snapshot).
fn snapshot_log(dir: &Path, kind: LogKind) -> Result<LogHandle, EventLogError> {
    let path = log_path(dir, kind);
    let snapshot = recovery::snapshot(dir, kind)?;
    let (head, _) = watch::channel(Head {
        last: snapshot.index.last_sequence(),
        closed: true,
    });
    Ok(LogHandle {
        shared: Arc::new(LogShared {
            kind,
            path,
            segments: RwLock::new(snapshot.segments.into_iter().map(Arc::new).collect()),
            index: RwLock::new(snapshot.index),
            head,
        }),
        writer: None,
    })
}

fn lock_dir(dir: &Path) -> Result<File, EventLogError> {
    let path = dir.join(LOCK_FILE);
    let file = crate::private_fs::open_options()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| EventLogError::io(format!("opening {}", path.display()), e))?;
    crate::private_fs::restrict(&file)
        .map_err(|e| EventLogError::io(format!("restricting {}", path.display()), e))?;
    // A lock released a moment ago can still be held for a moment: a child process forked
    // meanwhile (to run any program) shares the lock file's descriptor until it execs. So a
    // held lock is asked again for a short while before it counts as another owner.
    let mut result = file.try_lock();
    for _ in 0..LOCK_RETRIES {
        if !matches!(result, Err(TryLockError::WouldBlock)) {
            break;
        }
        std::thread::sleep(LOCK_RETRY_PAUSE);
        result = file.try_lock();
    }
    match result {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(EventLogError::Io {
            context: format!(
                "the event log in {} is already open (by another Switchboard process, or \
                 another handle in this one); only one may use it at a time",
                dir.display()
            ),
            source: io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is locked", path.display()),
            ),
        }),
        Err(TryLockError::Error(e)) => {
            Err(EventLogError::io(format!("locking {}", path.display()), e))
        }
    }
}

fn open_log(
    dir: &Path,
    kind: LogKind,
    options: &JsonlOptions,
    lock: &Arc<File>,
    wrap: &LogFileWrapper,
) -> Result<LogHandle, EventLogError> {
    let path = log_path(dir, kind);
    // Only the invocations log is kept for a limited time (and so split into segments).
    let retention = match kind {
        LogKind::Invocations => options.invocation_retention,
        LogKind::Config => None,
    };
    let recovered = recovery::recover(
        dir,
        kind,
        options.dedupe_ids_on_open,
        retention.map(|keep| (keep, (options.now)())),
    )?;
    let versions = recovered
        .index
        .versions()
        .map(|(subject, version)| (subject.into(), version))
        .collect();
    let now = Instant::now();
    let mut dedupe = Dedupe::default();
    for (id, sequence) in recovered.recent_ids {
        dedupe.remember(id, sequence, now);
    }
    let last = recovered.index.last_sequence();
    let file_len = recovered.file_len;
    // What lies past the last commit mark is zeros the writer wrote ahead (see `writer`).
    let allocated_len = recovered
        .file
        .metadata()
        .map_or(file_len, |m| m.len())
        .max(file_len);
    let (head, _) = watch::channel(Head {
        last,
        closed: false,
    });
    let segment_base = recovered.segments.last().map_or(0, |segment| segment.base);
    let active_first_sequence = recovered
        .segments
        .last()
        .map_or(last + 1, |segment| segment.first_sequence);
    let rotation = retention.map(|retention| writer::Rotation {
        dir: dir.to_path_buf(),
        wrap: wrap.clone(),
        retention,
        now: options.now,
        active_month: recovered.active_month,
        active_first_sequence,
    });
    let shared = Arc::new(LogShared {
        kind,
        path: path.clone(),
        segments: RwLock::new(recovered.segments.into_iter().map(Arc::new).collect()),
        index: RwLock::new(recovered.index),
        head,
    });
    let (commands, rx) = mpsc::channel(options.queue_capacity.max(1));
    let writer = Writer {
        shared: shared.clone(),
        file: wrap(kind, recovered.file),
        _lock: lock.clone(),
        rx,
        max_batch_events: options.max_batch_events.max(1),
        file_len,
        allocated_len,
        segment_base,
        rotation,
        next_sequence: last + 1,
        versions,
        dedupe,
        poisoned: None,
    };
    let thread = std::thread::Builder::new()
        .name(writer::thread_name(&path))
        .spawn(move || writer.run())
        .map_err(|e| EventLogError::io(format!("starting the writer of {}", path.display()), e))?;
    Ok(LogHandle {
        shared,
        writer: Some(WriterLink {
            commands,
            _thread: WriterThread(Mutex::new(Some(thread))),
        }),
    })
}

/// Checks the events and does the costly part of an append (serialising the envelopes) on
/// the caller's task, so that the writer thread only decides and copies bytes.
fn prepare(events: &[Envelope]) -> Result<(Vec<PreparedEvent>, Vec<u8>), EventLogError> {
    let invalid = |reason: String| EventLogError::InvalidEvent { reason };
    if events.is_empty() {
        return Err(invalid("an append needs at least one event".to_owned()));
    }
    let mut prepared = Vec::with_capacity(events.len());
    let mut json = Vec::with_capacity(events.len() * 320);
    for envelope in events {
        let shown_id = || envelope.event_id.chars().take(64).collect::<String>();
        let id = uuid::Uuid::parse_str(&envelope.event_id)
            .map_err(|_| invalid(format!("event id {:?} is not a UUID", shown_id())))?
            .as_u128();
        let event_type = envelope
            .event
            .as_ref()
            .map(|event| event.type_name())
            .ok_or_else(|| invalid(format!("event {} has no event body", shown_id())))?;
        serde_json::to_writer(&mut json, envelope).map_err(|e| {
            invalid(format!(
                "event {} cannot be written as JSON: {e}",
                shown_id()
            ))
        })?;
        prepared.push(PreparedEvent {
            id,
            event_type,
            json_end: json.len(),
        });
    }
    if prepared.len() > 1 {
        let mut ids: Vec<u128> = prepared.iter().map(|e| e.id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(invalid(
                "the same event id appears twice in one append".to_owned(),
            ));
        }
    }
    Ok((prepared, json))
}

#[async_trait]
impl EventLog for JsonlLog {
    async fn append(
        &self,
        subject: &Subject,
        expected: ExpectedVersion,
        events: &[Envelope],
    ) -> Result<AppendOutcome, EventLogError> {
        let Some(writer) = &self.log(subject.log()).writer else {
            return Err(EventLogError::ReadOnly {
                dir: self.inner.dir.display().to_string(),
            });
        };
        let (events, json) = prepare(events)?;
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest {
            subject: subject.clone(),
            expected,
            events,
            json,
            reply,
        };
        writer
            .commands
            .send(Command::Append(request))
            .await
            .map_err(|_| EventLogError::Closed)?;
        answer.await.map_err(|_| EventLogError::Closed)?
    }

    async fn read_aggregate(&self, subject: &Subject) -> Result<AggregateHistory, EventLogError> {
        reader::read_aggregate(self.log(subject.log()).shared.clone(), subject).await
    }

    async fn read_from(
        &self,
        log: LogKind,
        from: u64,
        filter: Option<&SubjectFilter>,
    ) -> Result<EventStream, EventLogError> {
        let shared = self.log(log).shared.clone();
        let last = shared.read_index().last_sequence();
        Ok(reader::read_range(
            shared,
            from.max(1),
            last,
            filter.cloned(),
        ))
    }

    async fn read_event(
        &self,
        log: LogKind,
        sequence: u64,
    ) -> Result<Option<RecordedEvent>, EventLogError> {
        use futures_util::StreamExt as _;
        let shared = self.log(log).shared.clone();
        if sequence == 0 || sequence > shared.read_index().last_sequence() {
            return Ok(None);
        }
        let mut events = reader::read_range(shared, sequence, sequence, None);
        let event = events.next().await.transpose()?;
        Ok(event.filter(|event| event.sequence == sequence))
    }

    async fn subscribe(
        &self,
        log: LogKind,
        from: u64,
        filter: Option<&SubjectFilter>,
    ) -> Result<EventStream, EventLogError> {
        let shared = self.log(log).shared.clone();
        Ok(reader::subscribe(shared, from.max(1), filter.cloned()))
    }

    async fn last_sequence(&self, log: LogKind) -> Result<u64, EventLogError> {
        Ok(self.log(log).shared.read_index().last_sequence())
    }
}
