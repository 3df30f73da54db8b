//! The writer of one log file: a dedicated thread that owns the file and commits appends in
//! groups.
//!
//! Group commit: the thread takes everything queued (up to `max_batch_events`), decides each
//! append in order against its in-memory versions and event ids (a refused append writes
//! nothing; the ones after it still go ahead and see the earlier ones' effects), serialises
//! the accepted ones into one buffer followed by the group's commit mark (which carries the
//! CRC-32 of the group's records, see `record`), and makes one `write` and one `fdatasync`.
//! Only then are the new records published to readers (the index), the callers answered and,
//! last, live subscribers woken: a caller waits on the sync, a subscriber only follows. One
//! sync for many appends is what makes a durable log fast; the checksum is what lets
//! recovery tell a group that reached the disk whole from one cut by a power loss during its
//! sync (see `recovery`) without a second sync between the records and the mark.
//!
//! Zeros ahead: the writer keeps the file [`PREALLOCATE_BYTES`] longer than what it has
//! written, filled with zeros, and writes each group over them. A sync after a write that
//! grows the file must also make the new file size durable — a second write to the disk,
//! of the file's metadata — while a sync after an overwrite of written blocks writes the
//! data alone (on the benchmark machine's disk, 105 µs p50 against 142–187 µs); WAL files
//! are preallocated the same way (PostgreSQL's segments). Recovery reads a run of zeros at
//! the end of a file as space, not as records (JSON lines never hold a zero byte).
//!
//! A failed write or sync leaves the file in an unknown state (after a failed `fsync` the
//! kernel may already have dropped the dirty pages). The writer then answers every append of
//! the group with `Unavailable`, tries to cut the file back to its last acknowledged length,
//! and refuses all further appends: the log is read-only until it is reopened, when recovery
//! checks the file again. The failed appends may or may not be in the file; retrying them with
//! the same event ids after the reopen stores them at most once.
use std::{
    collections::{HashMap, VecDeque},
    fs::File,
    io::{self, Write},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::{mpsc, oneshot};

use crate::{AppendOutcome, DEDUPE_WINDOW, EventLogError, ExpectedVersion, Subject};

use super::{
    LogFileWrapper, LogShared,
    pacing::Pacing,
    record,
    segments::{self, Month, Segment},
};

/// What a caller asks of the writer.
pub(super) enum Command {
    Append(AppendRequest),
    /// Finish what is queued before this, stop, and close the file.
    Close(oneshot::Sender<()>),
}

/// An append, prepared by the caller: ids parsed and envelopes already serialised, so that
/// the writer thread only copies bytes.
pub(super) struct AppendRequest {
    pub subject: Subject,
    pub expected: ExpectedVersion,
    pub events: Vec<PreparedEvent>,
    /// The envelopes' proto3 JSON, one after the other.
    pub json: Vec<u8>,
    pub reply: oneshot::Sender<Result<AppendOutcome, EventLogError>>,
}

pub(super) struct PreparedEvent {
    pub id: u128,
    pub event_type: &'static str,
    /// End of this envelope's JSON in `AppendRequest::json` (it starts where the previous ends).
    pub json_end: usize,
}

/// What the writer needs of its file: a seam, so that tests can watch the writes and syncs
/// or make them fail (see [`JsonlLog::open_with_files`](super::JsonlLog::open_with_files)).
/// The writer only ever appends: each `write_all` continues where the last one ended.
pub trait LogFile: Send {
    /// Writes all of `bytes` where the last write ended.
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes everything written so far durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
    /// Cuts the file back to `len` bytes (after a failed write; the log refuses appends then).
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Writes zeros from `from` up to `to`, past the end of what was written, without
    /// moving where the next `write_all` goes (see "zeros ahead" above). Optional: a file
    /// that does nothing here only loses the cheaper syncs.
    fn zero_fill(&mut self, from: u64, to: u64) -> io::Result<()> {
        let _ = (from, to);
        Ok(())
    }
}

impl LogFile for File {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        Write::write_all(self, bytes)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn zero_fill(&mut self, from: u64, to: u64) -> io::Result<()> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut at = from;
        while at < to {
            let piece = usize::try_from(to - at).map_or(ZEROS.len(), |n| n.min(ZEROS.len()));
            super::write_all_at(self, &ZEROS[..piece], at)?;
            at += piece as u64;
        }
        Ok(())
    }
}

/// How far ahead of what it has written the writer keeps the file filled with zeros.
pub(super) const PREALLOCATE_BYTES: u64 = 1 << 20;

pub(super) struct Writer {
    pub shared: Arc<LogShared>,
    pub file: Box<dyn LogFile>,
    /// Keeps the directory lock for as long as any writer runs.
    pub _lock: Arc<File>,
    pub rx: mpsc::Receiver<Command>,
    pub max_batch_events: usize,
    /// Length of the active file up to the commit mark of the last acknowledged group.
    pub file_len: u64,
    /// The active file's length on disk: `file_len` and the zeros written ahead of it.
    pub allocated_len: u64,
    /// Where the active file starts in the log's virtual byte space (the index's offsets).
    pub segment_base: u64,
    /// Monthly segments and retention (the invocations log), or `None`.
    pub rotation: Option<Rotation>,
    pub next_sequence: u64,
    /// Each aggregate's version, including appends of the group being decided.
    pub versions: HashMap<Box<str>, u64>,
    pub dedupe: Dedupe,
    /// Why the log refuses appends after a failed write.
    pub poisoned: Option<String>,
}

/// What the writer of a segmented log needs (see `segments`).
pub(super) struct Rotation {
    pub dir: PathBuf,
    pub wrap: LogFileWrapper,
    pub retention: Duration,
    pub now: fn() -> SystemTime,
    /// The month the active file was last written in.
    pub active_month: Month,
    /// The sequence of the active file's first record (or of the next, if it has none).
    pub active_first_sequence: u64,
}

/// Event ids stored within the dedupe window, with their sequences.
#[derive(Default)]
pub(super) struct Dedupe {
    ids: HashMap<u128, u64>,
    /// Ids in the order they were stored, to forget them when the window has passed.
    order: VecDeque<(Instant, u128)>,
}

impl Dedupe {
    pub fn remember(&mut self, id: u128, sequence: u64, at: Instant) {
        self.ids.insert(id, sequence);
        self.order.push_back((at, id));
    }

    fn forget_older_than_window(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.order.front() {
            if now.duration_since(at) <= DEDUPE_WINDOW {
                break;
            }
            self.order.pop_front();
            self.ids.remove(&id);
        }
    }
}

/// One decided append of the group, waiting for the sync.
struct Decided {
    reply: oneshot::Sender<Result<AppendOutcome, EventLogError>>,
    outcome: Result<AppendOutcome, EventLogError>,
    /// For an append that wrote records: its subject, which of the group's record offsets
    /// are its records', and the file offset where its last record ends.
    written: Option<(Subject, std::ops::Range<usize>, u64)>,
}

impl Writer {
    /// Runs until the log is closed or every handle is dropped, then closes the file.
    pub fn run(mut self) {
        let close_reply = self.serve();
        // A log at rest holds no zeros ahead: its file is plain JSON lines (a crash leaves
        // them, and recovery reads them as space).
        if self.allocated_len > self.file_len {
            let _ = self.file.set_len(self.file_len);
        }
        let shared = self.shared.clone();
        // Dropping the writer closes the file, releases its share of the directory lock and
        // answers queued appends with `Closed` (their reply senders are dropped).
        drop(self);
        shared.head.send_modify(|head| head.closed = true);
        if let Some(reply) = close_reply {
            let _ = reply.send(());
        }
    }

    fn serve(&mut self) -> Option<oneshot::Sender<()>> {
        let mut carried: Option<Command> = None;
        let mut group: Vec<AppendRequest> = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut offsets: Vec<u64> = Vec::new();
        let mut decided: Vec<Decided> = Vec::new();
        let mut pacing = Pacing::start();
        loop {
            let first = match carried.take() {
                Some(command) => command,
                None => self.rx.blocking_recv()?,
            };
            let mut close = None;
            let mut events = 0;
            match first {
                Command::Append(request) => {
                    events += request.events.len();
                    group.push(request);
                }
                Command::Close(reply) => close = Some(reply),
            }
            while close.is_none() && events < self.max_batch_events {
                match self.rx.try_recv() {
                    Ok(Command::Append(request)) => {
                        if events + request.events.len() > self.max_batch_events {
                            carried = Some(Command::Append(request));
                            break;
                        }
                        events += request.events.len();
                        group.push(request);
                    }
                    Ok(Command::Close(reply)) => close = Some(reply),
                    Err(_) => break,
                }
            }
            if !group.is_empty() {
                self.commit_group(
                    &mut group,
                    &mut buf,
                    &mut offsets,
                    &mut decided,
                    &mut pacing,
                );
            }
            if close.is_some() {
                return close;
            }
            // A huge append should not pin its buffer for the life of the log.
            if buf.capacity() > 64 << 20 {
                buf = Vec::new();
            }
        }
    }

    fn commit_group(
        &mut self,
        group: &mut Vec<AppendRequest>,
        buf: &mut Vec<u8>,
        offsets: &mut Vec<u64>,
        decided: &mut Vec<Decided>,
        pacing: &mut Pacing,
    ) {
        let callers = group.len();
        let now = Instant::now();
        self.dedupe.forget_older_than_window(now);
        if self.poisoned.is_none()
            && let Err(error) = self.maintain_segments()
        {
            // The active file may have been renamed without a new one in its place: like a
            // failed write, only a reopen (and its recovery) sets this right.
            tracing::error!(file = %self.shared.path.display(), %error, "event log segment rotation failed");
            self.poisoned = Some(format!(
                "starting a new segment of {} failed ({error}); the log refuses appends until \
                 it is reopened",
                self.shared.path.display()
            ));
        }
        buf.clear();
        offsets.clear();
        let first_sequence = self.next_sequence;
        decided.clear();
        for request in group.drain(..) {
            let start = offsets.len();
            let outcome = self.decide(&request, first_sequence, now, buf, offsets);
            let written = (offsets.len() > start).then(|| {
                (
                    request.subject,
                    start..offsets.len(),
                    self.segment_base + self.file_len + buf.len() as u64,
                )
            });
            decided.push(Decided {
                reply: request.reply,
                outcome,
                written,
            });
        }

        if !buf.is_empty() {
            let mut mark = Vec::with_capacity(64);
            record::encode_group_mark(&mut mark, first_sequence, self.next_sequence - 1, buf);
            buf.extend_from_slice(&mark);
            if let Err(error) = self.write_and_sync(buf) {
                self.fail_group(decided, &error);
                return;
            }
        }

        if self.next_sequence > first_sequence {
            {
                let mut index = self.shared.write_index();
                for d in decided.iter() {
                    if let Some((subject, range, end)) = &d.written {
                        index.push(subject.as_str(), &offsets[range.clone()], *end);
                    }
                }
            }
            self.file_len += buf.len() as u64;
        }
        // Before the callers are answered, so that what they do next finds it set.
        pacing.after_sync(callers, !self.rx.is_empty());
        for d in decided.drain(..) {
            let _ = d.reply.send(d.outcome);
        }
        // Subscribers are woken after the callers, who wait on this sync; what they read is
        // in the index already (and `last_sequence` reads the index).
        if self.next_sequence > first_sequence {
            let last = self.next_sequence - 1;
            self.shared.head.send_modify(|head| head.last = last);
        }
    }

    /// For a segmented log, before a group is written: starts a new active file when the
    /// month has changed since the active one was last written, and drops closed segments
    /// past retention.
    fn maintain_segments(&mut self) -> io::Result<()> {
        let Some(rotation) = &mut self.rotation else {
            return Ok(());
        };
        let now = (rotation.now)();
        let month = Month::of(now);
        let last = self.next_sequence - 1;
        if month != rotation.active_month {
            if rotation.active_first_sequence <= last {
                let shared = &self.shared;
                let active = shared.path.clone();
                let closed = segments::closed_path(
                    &rotation.dir,
                    shared.kind,
                    rotation.active_month,
                    rotation.active_first_sequence,
                );
                // A closed segment keeps no zeros ahead (recovery would read them as space;
                // this only saves the disk).
                let _ = self.file.set_len(self.file_len);
                // The renamed file keeps its inode: the writer's and the readers' handles
                // stay valid.
                std::fs::rename(&active, &closed)?;
                let mut file = crate::private_fs::open_options()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&active)?;
                let mut mark = Vec::with_capacity(48);
                record::encode_segment_mark(&mut mark, last, &month.to_string());
                Write::write_all(&mut file, &mark)?;
                file.sync_data()?;
                super::recovery::sync_dir(&rotation.dir)?;
                let read_file = File::open(&active)?;
                let base = self.segment_base + self.file_len;
                {
                    let mut segments = shared.write_segments();
                    if let Some(previous) = segments.pop() {
                        segments.push(Arc::new(Segment {
                            base: previous.base,
                            first_sequence: previous.first_sequence,
                            month: Some(rotation.active_month),
                            path: closed,
                            file: previous.file.try_clone()?,
                        }));
                    }
                    segments.push(Arc::new(Segment {
                        base,
                        first_sequence: last + 1,
                        month: None,
                        path: active,
                        file: read_file,
                    }));
                }
                self.file = (rotation.wrap)(shared.kind, file);
                self.segment_base = base;
                self.file_len = mark.len() as u64;
                self.allocated_len = self.file_len;
                rotation.active_first_sequence = last + 1;
            }
            rotation.active_month = month;
        }
        self.drop_expired_segments(now);
        Ok(())
    }

    /// Drops the oldest closed segments past retention. A failure is logged and tried again
    /// at the next group: nothing depends on it.
    fn drop_expired_segments(&mut self, now: SystemTime) {
        let Some(rotation) = &self.rotation else {
            return;
        };
        loop {
            let (path, next_first) = {
                let segments = self.shared.read_segments();
                let (Some(oldest), Some(next)) = (segments.first(), segments.get(1)) else {
                    return;
                };
                match oldest.month {
                    Some(month) if segments::expired(month, rotation.retention, now) => {
                        (oldest.path.clone(), next.first_sequence)
                    }
                    _ => return,
                }
            };
            if let Err(error) =
                std::fs::remove_file(&path).and_then(|()| super::recovery::sync_dir(&rotation.dir))
            {
                tracing::warn!(file = %path.display(), %error, "cannot drop an event log segment past retention");
                return;
            }
            tracing::info!(file = %path.display(), "dropped an event log segment past retention");
            self.shared.write_segments().remove(0);
            let emptied = self.shared.write_index().drop_before(next_first);
            // An aggregate whose every event is gone starts again from version 0, as on
            // JetStream when a subject's messages have all expired.
            for subject in emptied {
                self.versions.remove(&subject);
            }
        }
    }

    /// After a failed write or sync: fails every append of the group, including the ones
    /// that were refused or duplicates (their answer may rest on records of this group), and
    /// poisons the log.
    fn fail_group(&mut self, decided: &mut Vec<Decided>, error: &io::Error) {
        let reason = format!(
            "writing to {} failed ({error}); the log refuses appends until it is \
             reopened, and the failed appends may be retried with the same event ids then",
            self.shared.path.display()
        );
        tracing::error!(file = %self.shared.path.display(), %error, "event log write failed");
        // Best effort: the file should not keep records nobody was told about. If this fails
        // too, recovery drops them at the next open (they have no commit mark).
        let _ = self.file.set_len(self.file_len);
        self.allocated_len = self.file_len;
        self.poisoned = Some(reason.clone());
        for d in decided.drain(..) {
            let _ = d.reply.send(Err(EventLogError::Unavailable {
                reason: reason.clone(),
            }));
        }
    }

    /// Decides one append of the group and, if it is accepted, serialises its records into
    /// `buf` and notes where in the file each will start.
    fn decide(
        &mut self,
        request: &AppendRequest,
        group: u64,
        now: Instant,
        buf: &mut Vec<u8>,
        offsets: &mut Vec<u64>,
    ) -> Result<AppendOutcome, EventLogError> {
        if let Some(reason) = &self.poisoned {
            return Err(EventLogError::Unavailable {
                reason: reason.clone(),
            });
        }
        let known = request
            .events
            .iter()
            .filter(|e| self.dedupe.ids.contains_key(&e.id))
            .count();
        if known == request.events.len() {
            // A retry: answer what the original append got, whatever version it expected.
            let sequence_of = |e: Option<&PreparedEvent>| {
                e.and_then(|e| self.dedupe.ids.get(&e.id).copied())
                    .unwrap_or_default()
            };
            return Ok(AppendOutcome {
                first_sequence: sequence_of(request.events.first()),
                last_sequence: sequence_of(request.events.last()),
                duplicate: true,
            });
        }
        if known > 0 {
            return Err(EventLogError::InvalidEvent {
                reason: format!(
                    "{known} of these {} event ids are already stored and the others are not; \
                     a retry must resend exactly the events of the original append",
                    request.events.len()
                ),
            });
        }
        let subject = request.subject.as_str();
        let actual = self.versions.get(subject).copied().unwrap_or(0);
        if !request.expected.admits(actual) {
            return Err(EventLogError::Conflict {
                subject: subject.to_owned(),
                expected: request.expected,
                actual: Some(actual),
            });
        }

        let count = request.events.len();
        let first = self.next_sequence;
        let mut json_start = 0;
        for (i, event) in request.events.iter().enumerate() {
            let sequence = first + i as u64;
            offsets.push(self.segment_base + self.file_len + buf.len() as u64);
            record::encode_line(
                buf,
                sequence,
                subject,
                event.event_type,
                (count > 1).then_some((i + 1, count)),
                group,
                request
                    .json
                    .get(json_start..event.json_end)
                    .unwrap_or_default(),
            );
            json_start = event.json_end;
            self.dedupe.remember(event.id, sequence, now);
        }
        let last = first + count as u64 - 1;
        self.next_sequence = last + 1;
        match self.versions.get_mut(subject) {
            Some(version) => *version = last,
            None => {
                self.versions.insert(subject.into(), last);
            }
        }
        Ok(AppendOutcome {
            first_sequence: first,
            last_sequence: last,
            duplicate: false,
        })
    }

    /// Writes a group's records and commit mark and makes them durable. The disk may store
    /// the pages of one write in any order, and a power loss during the sync can leave any
    /// of them out; the mark's checksum lets recovery see whether the whole group arrived.
    fn write_and_sync(&mut self, group: &[u8]) -> io::Result<()> {
        self.file.write_all(group)?;
        let end = self.file_len + group.len() as u64;
        if end > self.allocated_len {
            // This sync records a new file size anyway: take the next stretch of zeros
            // into it, so that the syncs after it need not. A failure here costs only that.
            let ahead = end + PREALLOCATE_BYTES;
            match self.file.zero_fill(end, ahead) {
                Ok(()) => self.allocated_len = ahead,
                Err(error) => {
                    tracing::debug!(%error, "cannot write zeros ahead in the event log");
                    self.allocated_len = end;
                }
            }
        }
        self.file.sync_data()
    }
}

/// Where the writer thread's file lives, for messages.
pub(super) fn thread_name(path: &std::path::Path) -> String {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("jsonl-{name}")
}
