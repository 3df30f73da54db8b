//! Segment files and retention.
//!
//! A log is its *active* file (`<log>.jsonl`, the one the writer appends to) preceded by
//! zero or more *closed* segments. When the month (UTC) of a group commit differs from the
//! month the active file was last written in, the writer renames the active file to
//! `<log>.<YYYY-MM>.<first sequence>.jsonl` (the month of its last write, the sequence of its
//! first record) and starts a new active file whose first line is a commit mark naming the
//! last sequence before it. Only the invocations log is segmented; the configuration log keeps
//! everything in one file.
//!
//! Retention drops whole closed segments, oldest first, once the newest event they can hold
//! is past retention (the start of the month after their month of last write, plus the
//! retention); history is never rewritten in place. The active file is never dropped: it
//! carries the log's sequence on.
//!
//! Offsets in the index are positions in the log's virtual byte space: the segments one after
//! the other, each starting where the one before it ends.
use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::LogKind;

/// A calendar month (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Month {
    year: i64,
    /// 1 to 12.
    month: u32,
}

impl Month {
    /// The month `time` falls in (UTC); times before 1970 count as January 1970.
    pub fn of(time: SystemTime) -> Month {
        let seconds = time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let days = i64::try_from(seconds / 86_400).unwrap_or(i64::MAX / 2);
        let (year, month, _) = civil_from_days(days);
        Month { year, month }
    }

    /// The first instant of the month after this one.
    pub fn end(self) -> SystemTime {
        let (year, month) = if self.month == 12 {
            (self.year + 1, 1)
        } else {
            (self.year, self.month + 1)
        };
        let days = days_from_civil(year, month, 1);
        let seconds = u64::try_from(days).unwrap_or(0).saturating_mul(86_400);
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    /// `YYYY-MM`.
    pub fn parse(text: &str) -> Option<Month> {
        let (year, month) = text.split_once('-')?;
        if year.len() != 4 || month.len() != 2 {
            return None;
        }
        let year: i64 = year.parse().ok()?;
        let month: u32 = month.parse().ok()?;
        (1..=12).contains(&month).then_some(Month { year, month })
    }
}

impl std::fmt::Display for Month {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// Howard Hinnant's `civil_from_days`: the proleptic Gregorian date of a day count since
/// 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month as u32, day as u32)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A closed segment file found in the log directory.
#[derive(Debug)]
pub(super) struct ClosedSegment {
    pub path: PathBuf,
    /// The month it was last written in.
    pub month: Month,
    /// The sequence of its first record.
    pub first_sequence: u64,
}

impl ClosedSegment {
    /// Whether every event it can hold is older than `retention` at `now`.
    pub fn expired(&self, retention: Duration, now: SystemTime) -> bool {
        expired(self.month, retention, now)
    }
}

pub(super) fn expired(month: Month, retention: Duration, now: SystemTime) -> bool {
    month
        .end()
        .checked_add(retention)
        .is_some_and(|expiry| expiry <= now)
}

/// The active file of `log` in `dir`.
pub(super) fn active_path(dir: &Path, log: LogKind) -> PathBuf {
    dir.join(format!("{}.jsonl", log.as_str()))
}

/// The name a closed segment gets.
pub(super) fn closed_path(dir: &Path, log: LogKind, month: Month, first_sequence: u64) -> PathBuf {
    dir.join(format!("{}.{month}.{first_sequence}.jsonl", log.as_str()))
}

/// The closed segments of `log` in `dir`, oldest first. A missing directory has none.
pub(super) fn closed_segments(dir: &Path, log: LogKind) -> io::Result<Vec<ClosedSegment>> {
    let listing = match fs::read_dir(dir) {
        Ok(listing) => listing,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let prefix = format!("{}.", log.as_str());
    let mut segments = Vec::new();
    for entry in listing {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let Some(middle) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".jsonl"))
        else {
            continue;
        };
        let Some((month, first)) = middle.split_once('.') else {
            continue;
        };
        let (Some(month), Ok(first_sequence)) = (Month::parse(month), first.parse::<u64>()) else {
            continue;
        };
        segments.push(ClosedSegment {
            path: entry.path(),
            month,
            first_sequence,
        });
    }
    segments.sort_by_key(|segment| segment.first_sequence);
    Ok(segments)
}

/// One segment of an open log, as readers use it.
#[derive(Debug)]
pub(super) struct Segment {
    /// Where its bytes start in the log's virtual byte space.
    pub base: u64,
    /// The sequence of its first record (or of the next record, if it has none yet).
    pub first_sequence: u64,
    /// The month of its last write for a closed segment; `None` for the active file.
    pub month: Option<Month>,
    pub path: PathBuf,
    /// A read-only handle for positioned reads. It stays valid when the file is renamed (a
    /// rotation) or unlinked (retention) while a read is under way.
    pub file: File,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_computed_in_utc() {
        let at = |seconds: u64| Month::of(UNIX_EPOCH + Duration::from_secs(seconds));
        assert_eq!(at(0).to_string(), "1970-01");
        // 2024-02-29T23:59:59Z and the second after it.
        assert_eq!(at(1_709_251_199).to_string(), "2024-02");
        assert_eq!(at(1_709_251_200).to_string(), "2024-03");
        // 2026-12-31T23:59:59Z.
        assert_eq!(at(1_798_761_599).to_string(), "2026-12");
        assert_eq!(
            at(1_709_251_199).end(),
            UNIX_EPOCH + Duration::from_secs(1_709_251_200)
        );
        assert_eq!(
            at(1_798_761_599).end(),
            UNIX_EPOCH + Duration::from_secs(1_798_761_600)
        );
        assert_eq!(Month::parse("2026-12"), Some(at(1_798_761_599)));
        assert_eq!(Month::parse("2026-13"), None);
        assert_eq!(Month::parse("26-12"), None);
    }

    #[test]
    fn a_segment_expires_when_its_last_month_is_past_retention() {
        let month = Month::parse("2025-01").expect("month");
        let retention = Duration::from_secs(400 * 86_400);
        let expiry = month.end() + retention;
        assert!(!expired(month, retention, expiry - Duration::from_secs(1)));
        assert!(expired(month, retention, expiry));
    }
}
