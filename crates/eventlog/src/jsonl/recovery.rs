//! Start-up: read a log file once and rebuild its index (and recent event ids) from its
//! acknowledged records. One scanner serves both ways of opening a log.
//!
//! **The recovery rule.** The writer writes every write group's records followed by its
//! commit mark, which names the group's first and last sequence and the CRC-32 of its
//! records, makes them durable with one `fdatasync`, and acknowledges the group only after
//! that; it writes the next group only then (`record`, `writer`). A power loss during the
//! sync can leave any part of the group out, in any order (the disk stores the pages of one
//! write as it likes), the mark included. So:
//!
//! - A group is whole when its records are complete, in sequence, and have the checksum its
//!   own mark names. Whole groups are the log.
//! - Only the last group of the file can be anything else without the file being damaged:
//!   it is the one group that may have been cut by a crash or a power loss, and it was
//!   never acknowledged, whatever shape it was left in — cut short, a zero-filled gap or
//!   garbage followed by complete lines, complete records whose mark is missing or torn,
//!   its mark present after records that are not all there or not the ones it covers. It is
//!   dropped as a whole.
//! - A group that is not whole followed by anything of a later group — a record naming a
//!   later group (each record names its group's first sequence), a later group's mark, or
//!   any bytes after the group's own mark — had been acknowledged (the later group was
//!   written only after its sync returned): the open fails with `Corrupt`, naming the file
//!   and the first damaged line, and the file is left alone.
//! - Marks without a checksum were written by earlier versions, which synced a group's
//!   records before writing its mark and synced the mark too: damage before such a mark is
//!   damage to acknowledged records, `Corrupt`, as is a mark that does not match the records
//!   before it.
//! - A file without any commit mark was written by an older version, which acknowledged each
//!   append on its own. There the old rule holds: a torn last line, an incomplete last batch
//!   or a damaged *last* line is an unfinished append and is dropped; damage followed by a
//!   complete line is `Corrupt`. The writer's open then ends the file with a commit mark (a
//!   new file starts with one), so from then on the file follows the rule above.
//! - A run of zero bytes at the end of a file is space, not data: the writer fills the file
//!   with zeros ahead of what it writes (see `writer`), and JSON lines never hold a zero
//!   byte. The scan ends where the last byte that is not zero ends; a group cut short
//!   inside that space is the unfinished last group of the rule above.
//!
//! The two ways of opening:
//! - [`recover`] (the writer's open, under the directory lock) truncates the unacknowledged
//!   tail, says so (`warn`), and makes sure the file ends with a commit mark.
//! - [`snapshot`] (the read-only open, without the lock, while another process may be
//!   appending) leaves the file alone: such a tail may be a group being written right now,
//!   so it is simply not part of the snapshot.
use std::{
    collections::VecDeque,
    fs::File,
    io::{self, Read, Seek, SeekFrom, Write},
    path::Path,
    time::{Duration, SystemTime},
};

use crate::{EventLogError, LogKind, Subject};

use super::{
    index::Index,
    record,
    segments::{self, ClosedSegment, Month, Segment},
};

const READ_CHUNK: usize = 1 << 20;

/// A log ready for the writer: its active file positioned at the end of its last commit
/// mark, and its closed segments.
pub(super) struct Recovered {
    pub file: File,
    /// The active file's length: the end of its last commit mark.
    pub file_len: u64,
    pub index: Index,
    /// The most recent event ids with their sequences, oldest first.
    pub recent_ids: VecDeque<(u128, u64)>,
    /// Every segment, the active file last.
    pub segments: Vec<Segment>,
    /// The month the active file was started in (see `segments`).
    pub active_month: Month,
}

/// A log as a read-only open found it.
pub(super) struct Snapshot {
    /// Its segments (none if the log has no file yet).
    pub segments: Vec<Segment>,
    /// The complete records (an empty index for a missing file).
    pub index: Index,
}

/// What a scan found.
struct Scanned {
    /// The month named by the file's first commit mark (a segment file's start month).
    first_mark_month: Option<String>,
    index: Index,
    recent_ids: VecDeque<(u128, u64)>,
    /// How many bytes were scanned (the file's length when the scan began).
    len: u64,
    /// Where the acknowledged part of the file ends (the cut point for an unfinished tail).
    committed_end: u64,
    /// Whether the acknowledged part ends with a commit mark.
    ends_with_mark: bool,
    /// Bytes after the last complete record that are no complete append: where they start and
    /// what they are.
    unfinished: Option<(u64, String)>,
}

/// Where a scan continues: the index and ids of the segments before, and where the scanned
/// file starts in the log's virtual byte space.
struct Continue {
    index: Index,
    recent_ids: VecDeque<(u128, u64)>,
    base: u64,
    /// The first file read: it may begin with a commit mark naming a later sequence (the
    /// segments before it were dropped for retention).
    first_file: bool,
}

impl Continue {
    fn new() -> Continue {
        Continue {
            index: Index::default(),
            recent_ids: VecDeque::new(),
            base: 0,
            first_file: true,
        }
    }
}

/// Scans the closed segments of `log` in `dir` in order: they were finished before the next
/// one began, so anything unfinished in them is damage.
fn scan_closed(
    closed: &[ClosedSegment],
    log: LogKind,
    keep_ids: usize,
    at: &mut Continue,
    segments: &mut Vec<Segment>,
) -> Result<(), EventLogError> {
    for closed in closed {
        let file = File::open(&closed.path)
            .map_err(|e| EventLogError::io(format!("opening {}", closed.path.display()), e))?;
        let before = at.index.last_sequence();
        let scanned = scan(&file, &closed.path, log, keep_ids, at)?;
        if let Some((_, why)) = &scanned.unfinished {
            return Err(EventLogError::Corrupt {
                location: closed.path.display().to_string(),
                reason: format!(
                    "a closed segment ends in an unfinished write ({why}); the file is left as \
                     it is; repair or restore it"
                ),
            });
        }
        let first_sequence = if before == 0 {
            scanned.index.first_sequence()
        } else {
            before + 1
        };
        segments.push(Segment {
            base: at.base,
            first_sequence,
            month: Some(closed.month),
            path: closed.path.clone(),
            file,
        });
        at.base += scanned.len;
        at.index = scanned.index;
        at.recent_ids = scanned.recent_ids;
        at.first_file = false;
    }
    Ok(())
}

/// Opens (creating it if needed) the log `log` in `dir` for writing: drops the closed
/// segments past `retention` (oldest first, without reading them), rebuilds the index from
/// the others and the active file, and truncates an unfinished last write group.
pub(super) fn recover(
    dir: &Path,
    log: LogKind,
    keep_ids: usize,
    retention: Option<(Duration, SystemTime)>,
) -> Result<Recovered, EventLogError> {
    let path = &segments::active_path(dir, log);
    let io_error = |what: &str, e| EventLogError::io(format!("{what} {}", path.display()), e);
    let mut closed = segments::closed_segments(dir, log)
        .map_err(|e| EventLogError::io(format!("listing {}", dir.display()), e))?;
    if let Some((keep, now)) = retention {
        // A prefix only: the sequences of what is kept stay contiguous.
        let expired = closed
            .iter()
            .take_while(|segment| segment.expired(keep, now))
            .count();
        for segment in closed.drain(..expired) {
            tracing::info!(
                file = %segment.path.display(),
                month = %segment.month,
                "dropping an event log segment past retention"
            );
            std::fs::remove_file(&segment.path).map_err(|e| {
                EventLogError::io(format!("removing {}", segment.path.display()), e)
            })?;
        }
        if expired > 0 {
            sync_dir(dir).map_err(|e| io_error("syncing the directory of", e))?;
        }
    }
    let mut at = Continue::new();
    let mut segments = Vec::new();
    scan_closed(&closed, log, keep_ids, &mut at, &mut segments)?;

    let existed = path.try_exists().map_err(|e| io_error("checking", e))?;
    let mut file = crate::private_fs::open_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| io_error("opening", e))?;
    crate::private_fs::restrict(&file).map_err(|e| io_error("restricting to its owner", e))?;
    if !existed {
        // A new file is durable only once its directory entry is.
        sync_dir(dir).map_err(|e| io_error("syncing the directory of", e))?;
    }
    let now = retention.map_or_else(SystemTime::now, |(_, now)| now);
    // For an active file that does not name its month (written before segments existed),
    // the month it was last written in stands in.
    let last_written = file
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .filter(|_| existed)
        .unwrap_or(now);

    let first_sequence = at.index.last_sequence() + 1;
    let base = at.base;
    let first_file = at.first_file;
    let scanned = scan(&file, path, log, keep_ids, &mut at)?;
    if let Some((cut, why)) = &scanned.unfinished {
        tracing::warn!(
            file = %path.display(),
            dropped_bytes = scanned.len - cut,
            kept_records = scanned.index.last_sequence(),
            "event log ended in a write group that never completed ({why}); it was never \
             acknowledged, truncating it"
        );
        file.set_len(*cut).map_err(|e| io_error("truncating", e))?;
        file.sync_all().map_err(|e| io_error("syncing", e))?;
    }
    let mut end = scanned.committed_end;
    file.seek(SeekFrom::Start(end))
        .map_err(|e| io_error("seeking in", e))?;
    let mut active_month = scanned
        .first_mark_month
        .as_deref()
        .and_then(Month::parse)
        .unwrap_or_else(|| Month::of(last_written));
    if !scanned.ends_with_mark {
        // A new file, or one written by a version without commit marks (its records were
        // each acknowledged on their own and have just been checked): a mark now makes every
        // record before it acknowledged under the commit-mark rule. A new active file after
        // closed segments starts with the mark that carries their sequence on, and a new
        // file of a segmented log names the month it was started in.
        let mut mark = Vec::new();
        if end == 0 && retention.is_some() {
            active_month = Month::of(now);
            record::encode_segment_mark(
                &mut mark,
                scanned.index.last_sequence(),
                &active_month.to_string(),
            );
        } else {
            record::encode_mark(&mut mark, scanned.index.last_sequence());
        }
        file.write_all(&mark)
            .and_then(|()| file.sync_data())
            .map_err(|e| io_error("writing a commit mark to", e))?;
        end += mark.len() as u64;
    }
    let read_file = File::open(path).map_err(|e| io_error("opening", e))?;
    segments.push(Segment {
        base,
        first_sequence: if first_file {
            scanned.index.first_sequence()
        } else {
            first_sequence
        },
        month: None,
        path: path.clone(),
        file: read_file,
    });
    Ok(Recovered {
        file,
        file_len: end,
        index: scanned.index,
        recent_ids: scanned.recent_ids,
        segments,
        active_month,
    })
}

/// Indexes the complete records of the log `log` in `dir` as it is now, changing nothing: an
/// unfinished tail is left out of the index (and in the file). A log without files is empty.
pub(super) fn snapshot(dir: &Path, log: LogKind) -> Result<Snapshot, EventLogError> {
    // The writer may rotate or drop a segment between the listing and the reads; a second
    // look then sees the new layout.
    let mut attempts = 0;
    loop {
        attempts += 1;
        match snapshot_once(dir, log) {
            Err(EventLogError::Io { source, .. })
                if source.kind() == io::ErrorKind::NotFound && attempts < 3 => {}
            Err(EventLogError::Corrupt { .. }) if attempts < 3 => {}
            result => return result,
        }
    }
}

fn snapshot_once(dir: &Path, log: LogKind) -> Result<Snapshot, EventLogError> {
    let path = &segments::active_path(dir, log);
    let closed = segments::closed_segments(dir, log)
        .map_err(|e| EventLogError::io(format!("listing {}", dir.display()), e))?;
    let mut at = Continue::new();
    let mut segments = Vec::new();
    scan_closed(&closed, log, 0, &mut at, &mut segments)?;
    let file = match File::open(path) {
        Ok(file) => file,
        // No file yet; or the writer stopped between renaming the active file and creating
        // the next one (its next open creates it): the closed segments are the whole log.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Snapshot {
                segments,
                index: at.index,
            });
        }
        Err(e) => return Err(EventLogError::io(format!("opening {}", path.display()), e)),
    };
    let first_sequence = at.index.last_sequence() + 1;
    let base = at.base;
    let first_file = at.first_file;
    let scanned = scan(&file, path, log, 0, &mut at)?;
    if let Some((start, why)) = &scanned.unfinished {
        tracing::debug!(
            file = %path.display(),
            left_out_bytes = scanned.len - start,
            records = scanned.index.last_sequence(),
            "the event log ends in an unfinished write group ({why}); it is not part of \
             the read-only snapshot"
        );
    }
    segments.push(Segment {
        base,
        first_sequence: if first_file {
            scanned.index.first_sequence()
        } else {
            first_sequence
        },
        month: None,
        path: path.clone(),
        file,
    });
    Ok(Snapshot {
        segments,
        index: scanned.index,
    })
}

/// Reads `file` from its start up to the length it has when the scan begins (bytes appended
/// meanwhile are not looked at), and indexes every acknowledged record (see the recovery rule
/// above). Damage to acknowledged records is `Corrupt`; an unacknowledged tail is reported in
/// `unfinished`.
fn scan(
    file: &File,
    path: &Path,
    log: LogKind,
    keep_ids: usize,
    at: &mut Continue,
) -> Result<Scanned, EventLogError> {
    let io_error = |what: &str, e| EventLogError::io(format!("{what} {}", path.display()), e);
    let len = file.metadata().map_err(|e| io_error("checking", e))?.len();
    // Zeros at the end are space the writer filled ahead of its writes (see `writer`).
    let len = end_of_data(file, len).map_err(|e| io_error("reading", e))?;
    let mut reader = file;
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| io_error("seeking in", e))?;
    let mut reader = reader.take(len);

    let index_len_at_start = at.index.last_sequence();
    let mut scan = Scan {
        log,
        path,
        keep_ids,
        index: std::mem::take(&mut at.index),
        recent_ids: std::mem::take(&mut at.recent_ids),
        base: at.base,
        may_start_later: at.first_file,
        index_len_at_start,
        first_mark_month: None,
        line_number: 0,
        pending: Vec::new(),
        batch: None,
        marked: false,
        committed_end: 0,
        ends_with_mark: false,
        damaged: None,
        lines_after_damage: 0,
        group_crc: crc32fast::Hasher::new(),
        damaged_group_closed: false,
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
    let torn = !buf.is_empty();
    let unfinished = scan.finish(torn)?;
    Ok(Scanned {
        first_mark_month: scan.first_mark_month.take(),
        index: scan.index,
        recent_ids: scan.recent_ids,
        len: scanned_len,
        committed_end: scan.committed_end,
        ends_with_mark: scan.ends_with_mark,
        unfinished: unfinished.map(|why| (scan.committed_end, why)),
    })
}

/// Where the data of a file `len` bytes long ends: after its last byte that is not zero.
/// The writer fills the file with zeros ahead of what it writes; records and marks are JSON
/// lines, which never hold a zero byte, so a run of zeros at the end is that space (or a
/// write cut short inside it, which the scan then sees as an unfinished last group).
fn end_of_data(file: &File, len: u64) -> io::Result<u64> {
    const PIECE: u64 = 64 * 1024;
    let mut buf = vec![0u8; PIECE as usize];
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(PIECE);
        let piece = &mut buf[..(end - start) as usize];
        super::read_exact_at(file, piece, start)?;
        if let Some(last) = piece.iter().rposition(|&byte| byte != 0) {
            return Ok(start + last as u64 + 1);
        }
        end = start;
    }
    Ok(0)
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
    /// The acknowledged records.
    index: Index,
    recent_ids: VecDeque<(u128, u64)>,
    /// Where the file starts in the log's virtual byte space (offsets in the index are there).
    base: u64,
    /// Whether the file's first commit mark may name a sequence past the index's end: the
    /// first file of a log whose older segments were dropped.
    may_start_later: bool,
    /// The index's last sequence when this file's scan began.
    index_len_at_start: u64,
    /// The month named by the file's first commit mark (a segment file's start month).
    first_mark_month: Option<String>,
    line_number: u64,
    /// Complete appends read since the last commit mark, not yet known to be acknowledged.
    pending: Vec<PendingRecord>,
    /// A multi-event append whose lines are still being read.
    batch: Option<OpenBatch>,
    /// Whether a commit mark has been seen: from then on the commit-mark rule holds.
    marked: bool,
    /// End of the acknowledged part: the last valid commit mark (or, in a file of an older
    /// version, the last complete append).
    committed_end: u64,
    ends_with_mark: bool,
    /// The first line since the last commit mark that could not be accepted.
    damaged: Option<Damage>,
    /// Complete lines read after `damaged`.
    lines_after_damage: u64,
    /// The CRC-32 of the record lines read since the last commit mark.
    group_crc: crc32fast::Hasher,
    /// Whether the damaged group's own commit mark has been read: nothing can follow it
    /// unless the group had been acknowledged.
    damaged_group_closed: bool,
}

/// A multi-event append whose lines are still being read; it joins `pending` only once all
/// its lines are there.
struct OpenBatch {
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
    line_number: u64,
    reason: String,
}

impl Scan<'_> {
    fn line(&mut self, offset: u64, line: &[u8]) -> Result<(), EventLogError> {
        self.line_number += 1;
        self.after_closed_damaged_group()?;
        let end = offset + line.len() as u64 + 1;
        if line.is_empty() {
            // The empty line before each commit mark; it holds nothing to check.
            return Ok(());
        }
        if record::is_mark(line) {
            match record::scan_mark(line) {
                Ok(mark) => {
                    if !self.marked && self.index_len_at_start == self.index.last_sequence() {
                        self.first_mark_month = mark.month.clone();
                    }
                    return self.mark(&mark, end);
                }
                Err(reason) => self.damage(reason),
            }
            return Ok(());
        }
        self.group_crc.update(line);
        self.group_crc.update(b"\n");
        if let Some(damage) = &self.damaged {
            // Lines after damage cannot be checked against the ones before it; what matters
            // is whether they show a later write group: a commit mark (above), or a record
            // naming a later group even though the damage destroyed the mark between.
            self.lines_after_damage += 1;
            let group = self.group_start();
            if let Ok(record) = record::scan_line(line)
                && let Some(later) = record.group.filter(|&g| g > group)
            {
                return Err(self.corrupt(
                    damage,
                    &format!(
                        "line {} holds a record of the write group that starts at sequence \
                         {later}, so the damaged group (from sequence {group}) had been \
                         acknowledged",
                        self.line_number
                    ),
                ));
            }
            return Ok(());
        }
        if let Err(reason) = self.accept(offset, end, line) {
            self.damage(reason);
        }
        Ok(())
    }

    fn damage(&mut self, reason: String) {
        if self.damaged.is_some() {
            self.lines_after_damage += 1;
        } else {
            self.damaged = Some(Damage {
                line_number: self.line_number,
                reason,
            });
        }
    }

    /// A well-formed commit mark, ending at `end`.
    fn mark(&mut self, mark: &record::Mark, end: u64) -> Result<(), EventLogError> {
        let crc = std::mem::take(&mut self.group_crc).finalize();
        if let (Some(group), Some(expected_crc)) = (mark.group, mark.crc32) {
            return self.group_mark(mark.commit, group, crc == expected_crc, end);
        }
        let last = mark.commit;
        if let Some(damage) = self.damaged.take() {
            // The writer writes a mark only after the records before it are synced: this
            // damage is in records that were durable, and perhaps acknowledged.
            return Err(self.corrupt(
                &damage,
                &format!(
                    "a commit mark follows at line {}, so the damaged records had been \
                     acknowledged",
                    self.line_number
                ),
            ));
        }
        let expected = self.index.last_sequence() + self.pending.len() as u64;
        if self.may_start_later
            && !self.marked
            && self.index.is_empty()
            && self.pending.is_empty()
            && self.batch.is_none()
            && last > expected
        {
            // The segments before this file were dropped for retention: its first mark says
            // where its sequences start.
            self.index.start_at(last + 1);
        } else if self.batch.is_some() || last != expected {
            let reason = match &self.batch {
                Some(batch) => format!(
                    "a commit mark inside an atomic append of {} events ({} lines written)",
                    batch.count,
                    batch.records.len()
                ),
                None => format!("a commit mark for sequence {last} after sequence {expected}"),
            };
            self.damage(reason);
            return Ok(());
        }
        self.commit_group(end);
        Ok(())
    }

    /// The commit mark of the write group from sequence `group` to `last`, written with its
    /// records and synced once with them (`crc_matches`: whether the records read since the
    /// last mark have the checksum it names).
    ///
    /// The group's own mark after records that are damaged, incomplete or not the ones it
    /// names is what a power loss during the group's sync can leave (the disk stores the
    /// pages of a write in any order): the group is unacknowledged if nothing of a later
    /// group follows, and `finish` drops it. A mark of a *later* group after damage shows
    /// that the damaged group had been acknowledged (its sync had returned before the later
    /// group was written): `Corrupt`.
    fn group_mark(
        &mut self,
        last: u64,
        group: u64,
        crc_matches: bool,
        end: u64,
    ) -> Result<(), EventLogError> {
        let start = self.group_start();
        if group > start
            && let Some(damage) = &self.damaged
        {
            return Err(self.corrupt(
                damage,
                &format!(
                    "line {} is the commit mark of the write group that starts at sequence \
                     {group}, so the damaged group (from sequence {start}) had been \
                     acknowledged",
                    self.line_number
                ),
            ));
        }
        let expected = self.index.last_sequence() + self.pending.len() as u64;
        let problem = if self.damaged.is_some() {
            // Already noted: the group is not whole.
            Some(String::new())
        } else if group != start {
            Some(format!(
                "the commit mark of the write group from sequence {group} where the group \
                 from {start} was expected"
            ))
        } else if let Some(batch) = &self.batch {
            Some(format!(
                "a commit mark inside an atomic append of {} events ({} lines written)",
                batch.count,
                batch.records.len()
            ))
        } else if last != expected {
            Some(format!(
                "a commit mark for sequence {last} after sequence {expected}"
            ))
        } else if !crc_matches {
            Some("the records before the commit mark do not have its checksum".to_owned())
        } else {
            None
        };
        match problem {
            Some(reason) => {
                self.damage(reason);
                self.damaged_group_closed = group == start;
            }
            None => self.commit_group(end),
        }
        Ok(())
    }

    /// Anything after the commit mark of a damaged group was written after it: the writer
    /// writes a group only once the sync of the group before has returned, so the damaged
    /// group had been acknowledged.
    fn after_closed_damaged_group(&self) -> Result<(), EventLogError> {
        match &self.damaged {
            Some(damage) if self.damaged_group_closed => Err(self.corrupt(
                damage,
                "bytes follow the damaged write group's commit mark, so a later group was \
                 written and the damaged one had been acknowledged",
            )),
            _ => Ok(()),
        }
    }

    /// The records read since the last mark are acknowledged, up to `end`.
    fn commit_group(&mut self, end: u64) {
        let pending = std::mem::take(&mut self.pending);
        self.commit(&pending);
        self.marked = true;
        self.committed_end = end;
        self.ends_with_mark = true;
    }

    /// Decides what the end of the file means: `Corrupt` for damage to acknowledged records,
    /// else why the bytes after `committed_end` (if any) are an unfinished write.
    fn finish(&mut self, torn: bool) -> Result<Option<String>, EventLogError> {
        if torn {
            self.after_closed_damaged_group()?;
        }
        if !self.marked {
            // A file of an older version: each complete append was acknowledged on its own.
            if let Some(damage) = &self.damaged
                && self.lines_after_damage > 0
            {
                return Err(self.corrupt(damage, "complete lines follow it"));
            }
            let pending = std::mem::take(&mut self.pending);
            self.commit(&pending);
            if let Some(last) = pending.last() {
                self.committed_end = last.end;
                self.ends_with_mark = false;
            }
        }
        let why = if let Some(damage) = &self.damaged {
            format!(
                "line {} is damaged ({}), {} lines after it",
                damage.line_number, damage.reason, self.lines_after_damage
            )
        } else if let Some(batch) = &self.batch {
            format!(
                "an atomic append of {} events of which only {} complete lines were written",
                batch.count,
                batch.records.len()
            )
        } else if torn {
            "a torn last line".to_owned()
        } else if !self.pending.is_empty() {
            format!(
                "{} complete records without their commit mark",
                self.pending.len()
            )
        } else {
            return Ok(None);
        };
        Ok(Some(why))
    }

    fn corrupt(&self, damage: &Damage, why: &str) -> EventLogError {
        EventLogError::Corrupt {
            location: format!("{} line {}", self.path.display(), damage.line_number),
            reason: format!(
                "{}; {why} (the file is left as it is; repair or restore it)",
                damage.reason
            ),
        }
    }

    /// The first sequence of the write group being read (the one after the last mark).
    fn group_start(&self) -> u64 {
        self.index.last_sequence() + 1
    }

    /// Checks one record line and adds it to `pending` (or to the open batch). Changes
    /// nothing when the line is refused.
    fn accept(&mut self, offset: u64, end: u64, bytes: &[u8]) -> Result<(), String> {
        let line = record::scan_line(bytes)?;
        if let Some(group) = line.group
            && group != self.group_start()
        {
            return Err(format!(
                "a record of the write group from sequence {group} where the group from {} \
                 was expected (a commit mark is missing)",
                self.group_start()
            ));
        }
        let in_batch = self.batch.as_ref().map_or(0, |b| b.records.len() as u64);
        let expected = self.index.last_sequence() + self.pending.len() as u64 + in_batch + 1;
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
            end,
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
                self.pending.push(record);
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
                    count,
                    records: Vec::with_capacity(count.min(4096) as usize),
                });
                batch.records.push(record);
                if position == count
                    && let Some(batch) = self.batch.take()
                {
                    self.pending.extend(batch.records);
                }
            }
        }
        Ok(())
    }

    fn commit(&mut self, records: &[PendingRecord]) {
        for record in records {
            self.index.push(
                &record.subject,
                &[self.base + record.offset],
                self.base + record.end,
            );
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
