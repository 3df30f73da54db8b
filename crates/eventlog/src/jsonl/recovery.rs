//! Start-up: read a log file once and rebuild its index (and recent event ids) from its
//! complete records. One scanner serves both ways of opening a log:
//!
//! - [`recover`] (the writer's open, under the directory lock) cuts off an append that never
//!   completed. An append is acknowledged only after its whole batch is written and fsynced,
//!   so whatever a crash leaves at the end of the file (a torn last line, the first lines of a
//!   batch whose other lines are missing, a last line garbled by a partial write) was never
//!   acknowledged: recovery truncates the file back to the start of that append, says so
//!   (`warn`), and keeps every complete record before it.
//! - [`snapshot`] (the read-only open, without the lock, while another process may be
//!   appending) leaves the file alone: such a tail may be an append being written right now,
//!   so it is simply not part of the snapshot.
//!
//! Damage anywhere else is not a crash artefact; it fails either open with `Corrupt`, naming
//! the file and line, and nothing is dropped.
use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{self, Read, Seek, SeekFrom},
    path::Path,
};

use crate::{EventLogError, LogKind, Subject};

use super::{index::Index, record};

const READ_CHUNK: usize = 1 << 20;

/// A log file ready for the writer: positioned at the end of its last complete record.
pub(super) struct Recovered {
    pub file: File,
    pub index: Index,
    /// The most recent event ids with their sequences, oldest first.
    pub recent_ids: VecDeque<(u128, u64)>,
}

/// A log file as a read-only open found it.
pub(super) struct Snapshot {
    /// A read-only handle, or `None` if the file does not exist (yet).
    pub file: Option<File>,
    /// The complete records (an empty index for a missing file).
    pub index: Index,
}

/// What a scan found.
struct Scanned {
    index: Index,
    recent_ids: VecDeque<(u128, u64)>,
    /// How many bytes were scanned (the file's length when the scan began).
    len: u64,
    /// Bytes after the last complete record that are no complete append: where they start and
    /// what they are.
    unfinished: Option<(u64, String)>,
}

/// Opens (creating it if needed) the log file at `path` for writing, rebuilds its index and
/// truncates an unfinished last append.
pub(super) fn recover(
    path: &Path,
    log: LogKind,
    keep_ids: usize,
) -> Result<Recovered, EventLogError> {
    let io_error = |what: &str, e| EventLogError::io(format!("{what} {}", path.display()), e);
    let existed = path.try_exists().map_err(|e| io_error("checking", e))?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| io_error("opening", e))?;
    if !existed && let Some(dir) = path.parent() {
        // A new file is durable only once its directory entry is.
        sync_dir(dir).map_err(|e| io_error("syncing the directory of", e))?;
    }

    let scanned = scan(&file, path, log, keep_ids)?;
    if let Some((cut, why)) = &scanned.unfinished {
        tracing::warn!(
            file = %path.display(),
            dropped_bytes = scanned.len - cut,
            kept_records = scanned.index.last_sequence(),
            "event log ended in an append that never completed ({why}); it was never \
             acknowledged, truncating it"
        );
        file.set_len(*cut).map_err(|e| io_error("truncating", e))?;
        file.sync_all().map_err(|e| io_error("syncing", e))?;
    }
    let end = scanned.index.end();
    file.seek(SeekFrom::Start(end))
        .map_err(|e| io_error("seeking in", e))?;
    Ok(Recovered {
        file,
        index: scanned.index,
        recent_ids: scanned.recent_ids,
    })
}

/// Indexes the complete records of the log file at `path` as it is now, changing nothing: an
/// unfinished tail is left out of the index (and in the file). A missing file is an empty log.
pub(super) fn snapshot(path: &Path, log: LogKind) -> Result<Snapshot, EventLogError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Snapshot {
                file: None,
                index: Index::default(),
            });
        }
        Err(e) => return Err(EventLogError::io(format!("opening {}", path.display()), e)),
    };
    let scanned = scan(&file, path, log, 0)?;
    if let Some((start, why)) = &scanned.unfinished {
        tracing::debug!(
            file = %path.display(),
            left_out_bytes = scanned.len - start,
            records = scanned.index.last_sequence(),
            "the event log ends in an unfinished append ({why}); it is not part of the \
             read-only snapshot"
        );
    }
    Ok(Snapshot {
        file: Some(file),
        index: scanned.index,
    })
}

/// Reads `file` from its start up to the length it has when the scan begins (bytes appended
/// meanwhile are not looked at), and indexes every complete record. Damage followed by a
/// complete line is `Corrupt`; an unfinished tail is reported in `unfinished`.
fn scan(file: &File, path: &Path, log: LogKind, keep_ids: usize) -> Result<Scanned, EventLogError> {
    let io_error = |what: &str, e| EventLogError::io(format!("{what} {}", path.display()), e);
    let len = file.metadata().map_err(|e| io_error("checking", e))?.len();
    let mut reader = file;
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| io_error("seeking in", e))?;
    let mut reader = reader.take(len);

    let mut scan = Scan {
        log,
        path,
        keep_ids,
        index: Index::default(),
        recent_ids: VecDeque::new(),
        line_number: 0,
        batch: None,
        damaged: None,
    };
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    // File offset of `buf[0]`; `buf` holds at most one incomplete line between reads.
    let mut buf_offset = 0u64;
    loop {
        let filled = buf.len();
        buf.resize(filled + READ_CHUNK, 0);
        let read =
            read_some(&mut reader, &mut buf[filled..]).map_err(|e| io_error("reading", e))?;
        buf.truncate(filled + read);
        if read == 0 {
            break;
        }
        let mut start = 0;
        while let Some(newline) = memchr::memchr(b'\n', &buf[start..]) {
            scan.line(buf_offset + start as u64, &buf[start..start + newline])?;
            start += newline + 1;
        }
        buf.drain(..start);
        buf_offset += start as u64;
    }
    // Less than `len` if the file was cut meanwhile.
    let scanned_len = buf_offset + buf.len() as u64;

    let torn = (!buf.is_empty()).then_some(buf_offset);
    let damaged = scan.damaged.as_ref().map(|d| d.offset);
    let unfinished = scan.batch.as_ref().map(|b| b.start);
    let cut = [torn, damaged, unfinished].into_iter().flatten().min();
    let unfinished = cut.map(|cut| {
        let why = if let Some(batch) = &scan.batch {
            format!(
                "an atomic append of {} events of which only {} complete lines were written",
                batch.count,
                batch.records.len()
            )
        } else if let Some(damage) = &scan.damaged {
            format!("a damaged last line ({})", damage.reason)
        } else {
            "a torn last line".to_owned()
        };
        (cut, why)
    });
    debug_assert_eq!(cut.unwrap_or(scanned_len), scan.index.end());
    Ok(Scanned {
        index: scan.index,
        recent_ids: scan.recent_ids,
        len: scanned_len,
        unfinished,
    })
}

fn read_some(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match reader.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            result => return result,
        }
    }
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        // Directories cannot be opened (or need not be synced) on other platforms.
        let _ = dir;
        Ok(())
    }
}

struct Scan<'a> {
    log: LogKind,
    path: &'a Path,
    keep_ids: usize,
    index: Index,
    recent_ids: VecDeque<(u128, u64)>,
    line_number: u64,
    batch: Option<OpenBatch>,
    /// A line that could not be accepted. Fatal unless it turns out to be the last one.
    damaged: Option<Damage>,
}

/// A multi-event append whose lines are still being read; committed to the index only once
/// all its lines are there.
struct OpenBatch {
    start: u64,
    count: u64,
    records: Vec<PendingRecord>,
}

struct PendingRecord {
    offset: u64,
    end: u64,
    subject: Box<str>,
    event_id: Option<u128>,
}

struct Damage {
    offset: u64,
    line_number: u64,
    reason: String,
}

impl Scan<'_> {
    fn line(&mut self, offset: u64, line: &[u8]) -> Result<(), EventLogError> {
        self.line_number += 1;
        if let Some(damage) = self.damaged.take() {
            // A complete line follows the damaged one: not a torn tail but real corruption.
            return Err(EventLogError::Corrupt {
                location: format!("{} line {}", self.path.display(), damage.line_number),
                reason: format!(
                    "{} (the file is left as it is; repair or restore it)",
                    damage.reason
                ),
            });
        }
        if let Err(reason) = self.accept(offset, line) {
            self.damaged = Some(Damage {
                offset,
                line_number: self.line_number,
                reason,
            });
        }
        Ok(())
    }

    /// Checks one line and adds it to the index (or to the open batch). Changes nothing when
    /// the line is refused.
    fn accept(&mut self, offset: u64, bytes: &[u8]) -> Result<(), String> {
        let line = record::scan_line(bytes)?;
        let pending = self.batch.as_ref().map_or(0, |b| b.records.len() as u64);
        let expected = self.index.last_sequence() + pending + 1;
        if line.seq != expected {
            return Err(format!(
                "sequence {} where {expected} was expected",
                line.seq
            ));
        }
        let subject = Subject::parse(&line.subject).map_err(|e| e.to_string())?;
        if subject.log() != self.log {
            return Err(format!(
                "subject {subject} belongs to the {} log, not {}",
                subject.log(),
                self.log
            ));
        }
        // Ids that are not UUIDs cannot be appended through the port; a hand-written line
        // may still have one, it is just not remembered for dedupe.
        let event_id = uuid::Uuid::parse_str(&line.envelope.event_id)
            .ok()
            .map(|id| id.as_u128());
        let record = PendingRecord {
            offset,
            end: offset + bytes.len() as u64 + 1,
            subject: subject.as_str().into(),
            event_id,
        };
        match line.batch {
            None => {
                if let Some(batch) = &self.batch {
                    return Err(format!(
                        "a single record where record {} of a batch of {} was expected",
                        batch.records.len() + 1,
                        batch.count
                    ));
                }
                self.commit(&[record]);
            }
            Some((position, count)) => {
                if count < 2 || position < 1 || position > count {
                    return Err(format!("batch marker [{position},{count}] is out of range"));
                }
                let continues = match &self.batch {
                    None => position == 1,
                    Some(batch) => {
                        batch.count == count && batch.records.len() as u64 + 1 == position
                    }
                };
                if !continues {
                    return Err(format!(
                        "record {position} of a batch of {count} does not continue the \
                         records before it"
                    ));
                }
                let batch = self.batch.get_or_insert_with(|| OpenBatch {
                    start: offset,
                    count,
                    records: Vec::with_capacity(count.min(4096) as usize),
                });
                batch.records.push(record);
                if position == count
                    && let Some(batch) = self.batch.take()
                {
                    self.commit(&batch.records);
                }
            }
        }
        Ok(())
    }

    fn commit(&mut self, records: &[PendingRecord]) {
        for record in records {
            self.index
                .push(&record.subject, &[record.offset], record.end);
            if let Some(id) = record.event_id {
                if self.recent_ids.len() >= self.keep_ids {
                    self.recent_ids.pop_front();
                }
                if self.keep_ids > 0 {
                    self.recent_ids.push_back((id, self.index.last_sequence()));
                }
            }
        }
    }
}
