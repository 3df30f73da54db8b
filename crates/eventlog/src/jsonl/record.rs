//! The line format of a JSONL log file.
//!
//! One record per line, fields always in this order:
//!
//! ```text
//! {"seq":7,"subject":"server.s1","type":"ServerEnabled","batch":[2,3],"group":5,"envelope":{…proto3 JSON…}}
//! ```
//!
//! - `seq`: the record's log sequence, 1 for the first line, one more for every line.
//! - `subject`: the aggregate subject (subject tokens never need JSON escaping).
//! - `type`: the event type name as the writer knew it, so a reader that does not know the
//!   type can still say what it is.
//! - `batch`: `[i, n]`, the record is the i-th (1-based) of an atomic append of n events;
//!   omitted when n is 1. Recovery uses it to drop a batch whose tail never reached the disk.
//! - `group`: the first sequence of the write group the record was written in (absent in
//!   files of earlier versions). When damage has destroyed a commit mark, a record of a later
//!   group after it still shows that the damaged group was followed by another one, and so
//!   had been acknowledged (see `recovery`).
//! - `envelope`: the event envelope in the proto3 JSON mapping.
//!
//! Every write group ends with a **commit mark**, a line of its own after an empty line:
//!
//! ```text
//!
//! {"commit":9,"group":5,"crc32":3735928559}
//! ```
//!
//! (The empty line keeps the mark a line of its own even when the end of the record before
//! it, newline included, is damaged; readers and recovery skip empty lines.)
//!
//! - `commit`: the last sequence in the file when the mark was written.
//! - `group`: the group's first sequence, and `crc32`: the CRC-32 of the group's record lines
//!   (each with its `\n`, the empty line before the mark not included). The writer writes a
//!   group's records and its mark together and makes them durable with one `fdatasync`, and
//!   acknowledges the group only after that: the checksum is what tells a group that reached
//!   the disk whole from one a power loss cut during its sync (see `recovery`).
//!
//! Marks without `group` and `crc32` cover no records of their own: the mark that starts a
//! new file (`commit` 0, or the sequence the file continues from), and the mark recovery adds
//! after records an older version acknowledged one by one. (Versions before the checksum
//! wrote every group's mark only after its records were synced, and synced the mark too;
//! their marks have no checksum and that rule still holds for them.) Readers skip marks.
use std::{borrow::Cow, fmt};

use proto::v1::Envelope;

use serde::{
    Deserialize, Deserializer,
    de::{self, DeserializeSeed, Error as _, IgnoredAny, MapAccess, Visitor},
};
use serde_json::value::RawValue;

use crate::{EventLogError, LogKind, RecordedEvent, Subject, SubjectFilter, UnknownBody};

/// Appends one record line (with its `\n`) to `buf`. `envelope_json` is the proto3 JSON of the
/// envelope; serde_json never emits a raw newline inside it.
pub(super) fn encode_line(
    buf: &mut Vec<u8>,
    seq: u64,
    subject: &str,
    event_type: &str,
    batch: Option<(usize, usize)>,
    group: u64,
    envelope_json: &[u8],
) {
    buf.extend_from_slice(b"{\"seq\":");
    push_decimal(buf, seq);
    // Subject tokens are [A-Za-z0-9_-] and type names are identifiers: no escaping needed.
    buf.extend_from_slice(b",\"subject\":\"");
    buf.extend_from_slice(subject.as_bytes());
    buf.extend_from_slice(b"\",\"type\":\"");
    buf.extend_from_slice(event_type.as_bytes());
    buf.push(b'"');
    if let Some((index, count)) = batch {
        buf.extend_from_slice(b",\"batch\":[");
        push_decimal(buf, index as u64);
        buf.push(b',');
        push_decimal(buf, count as u64);
        buf.push(b']');
    }
    buf.extend_from_slice(b",\"group\":");
    push_decimal(buf, group);
    buf.extend_from_slice(b",\"envelope\":");
    buf.extend_from_slice(envelope_json);
    buf.extend_from_slice(b"}\n");
}

/// Appends the commit mark of a write group (with the empty line before it and its `\n`) to
/// `buf`: the group's records, sequences `group..=last`, are `records` (their lines, each
/// with its `\n`).
pub(super) fn encode_group_mark(buf: &mut Vec<u8>, group: u64, last: u64, records: &[u8]) {
    let crc = crc32fast::hash(records);
    begin_mark(buf, last);
    buf.extend_from_slice(b",\"group\":");
    push_decimal(buf, group);
    buf.extend_from_slice(b",\"crc32\":");
    push_decimal(buf, u64::from(crc));
    buf.extend_from_slice(b"}\n");
}

/// Appends a commit mark line that covers no records of its own (with the empty line before
/// it and its `\n`) to `buf`: the records up to sequence `last` are durable.
pub(super) fn encode_mark(buf: &mut Vec<u8>, last: u64) {
    begin_mark(buf, last);
    buf.extend_from_slice(b"}\n");
}

/// Appends the commit mark that starts a segment file of a segmented log: it also names the
/// month (UTC, `YYYY-MM`) the file was started in, which decides when it is closed and when
/// it is dropped for retention (see `segments`).
pub(super) fn encode_segment_mark(buf: &mut Vec<u8>, last: u64, month: &str) {
    begin_mark(buf, last);
    buf.extend_from_slice(b",\"month\":\"");
    buf.extend_from_slice(month.as_bytes());
    buf.extend_from_slice(b"\"}\n");
}

/// The empty line before a commit mark and the mark's first field, naming `last`; each kind
/// of mark adds its own fields and closes the line.
fn begin_mark(buf: &mut Vec<u8>, last: u64) {
    buf.push(b'\n');
    buf.extend_from_slice(MARK_PREFIX);
    push_decimal(buf, last);
}

/// How every commit mark line starts; a record line starts with `{"seq":`.
const MARK_PREFIX: &[u8] = b"{\"commit\":";

/// Whether a line (without its `\n`) is meant as a commit mark (it may still be damaged).
pub(super) fn is_mark(line: &[u8]) -> bool {
    line.starts_with(MARK_PREFIX)
}

/// A commit mark as read back.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Mark {
    /// The last sequence before the mark.
    pub commit: u64,
    /// The month a segment file was started in (its first mark only).
    #[serde(default)]
    pub month: Option<String>,
    /// A write group's mark: the group's first sequence.
    #[serde(default)]
    pub group: Option<u64>,
    /// A write group's mark: the CRC-32 of the group's record lines.
    #[serde(default)]
    pub crc32: Option<u32>,
}

/// The commit mark a line (without its `\n`) holds, or why it is not a valid mark.
pub(super) fn scan_mark(line: &[u8]) -> Result<Mark, String> {
    let text = std::str::from_utf8(line).map_err(|e| format!("not UTF-8: {e}"))?;
    serde_json::from_str::<Mark>(text).map_err(|e| format!("damaged commit mark: {e}"))
}

fn push_decimal(buf: &mut Vec<u8>, value: u64) {
    buf.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// What start-up needs from a line: it validates the whole line as JSON but only keeps the
/// fields the index and the dedupe memory are built from.
#[derive(Deserialize)]
pub(super) struct ScannedLine<'a> {
    pub seq: u64,
    #[serde(borrow)]
    pub subject: Cow<'a, str>,
    #[serde(rename = "type")]
    _event_type: IgnoredAny,
    #[serde(default)]
    pub batch: Option<(u64, u64)>,
    #[serde(default)]
    pub group: Option<u64>,
    #[serde(borrow)]
    pub envelope: EnvelopeId<'a>,
}

#[derive(Deserialize)]
pub(super) struct EnvelopeId<'a> {
    #[serde(rename = "eventId", alias = "event_id", borrow, default)]
    pub event_id: Cow<'a, str>,
}

pub(super) fn scan_line(line: &[u8]) -> Result<ScannedLine<'_>, String> {
    let text = std::str::from_utf8(line).map_err(|e| format!("not UTF-8: {e}"))?;
    serde_json::from_str(text).map_err(|e| e.to_string())
}

/// A line as readers see it when it holds an event this version does not know: the envelope
/// is kept as it was stored.
#[derive(Deserialize)]
struct RawLine<'a> {
    #[serde(borrow)]
    envelope: &'a RawValue,
}

/// Decodes one line (without its `\n`) into a [`RecordedEvent`], or `None` if its subject does
/// not match `filter`. `location` names the line in a `Corrupt` error.
pub(super) fn decode_line(
    log: LogKind,
    line: &[u8],
    filter: Option<&SubjectFilter>,
    location: impl FnOnce() -> String,
) -> Result<Option<RecordedEvent>, EventLogError> {
    match decode(log, line, filter) {
        Ok(event) => Ok(event),
        Err(reason) => Err(EventLogError::Corrupt {
            location: location(),
            reason,
        }),
    }
}

fn decode(
    log: LogKind,
    line: &[u8],
    filter: Option<&SubjectFilter>,
) -> Result<Option<RecordedEvent>, String> {
    let text = std::str::from_utf8(line).map_err(|e| format!("not UTF-8: {e}"))?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let decoded = LineSeed { filter }
        .deserialize(&mut deserializer)
        .and_then(|decoded| deserializer.end().map(|()| decoded))
        .map_err(|e| e.to_string())?;
    let Some(line) = decoded else {
        return Ok(None);
    };
    if let Some(filter) = filter
        && !filter.matches(&line.subject)
    {
        return Ok(None);
    }
    let subject = Subject::parse(&line.subject).map_err(|e| e.to_string())?;
    let envelope = line.envelope;
    let (event_type, unknown_body) = match &envelope.event {
        Some(event) => (Cow::Borrowed(event.type_name()), None),
        None => {
            // Rare: an event type from a newer version. Read the line again to keep the
            // envelope as stored.
            let raw: RawLine<'_> = serde_json::from_str(text).map_err(|e| e.to_string())?;
            (
                Cow::Owned(line.event_type.into_owned()),
                Some(UnknownBody::Json(raw.envelope.get().into())),
            )
        }
    };
    Ok(Some(RecordedEvent {
        log,
        sequence: line.seq,
        subject,
        event_type,
        envelope,
        unknown_body,
    }))
}

/// A decoded line, its strings borrowed from the line where possible.
struct DecodedLine<'a> {
    seq: u64,
    subject: Cow<'a, str>,
    event_type: Cow<'a, str>,
    envelope: Envelope,
}

/// Decodes a line in one pass; the envelope, the costly part, is skipped rather than parsed
/// when the subject (which the writer puts before it) does not match the filter.
struct LineSeed<'f> {
    filter: Option<&'f SubjectFilter>,
}

impl<'de> DeserializeSeed<'de> for LineSeed<'_> {
    type Value = Option<DecodedLine<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for LineSeed<'_> {
    type Value = Option<DecodedLine<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an event log record")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seq = None;
        let mut subject: Option<Cow<'de, str>> = None;
        let mut event_type: Option<Cow<'de, str>> = None;
        let mut envelope = None;
        let mut skipped = false;
        while let Some(key) = map.next_key::<LineKey>()? {
            match key {
                LineKey::Seq => seq = Some(map.next_value::<u64>()?),
                LineKey::Subject => subject = Some(map.next_value::<Text<'de>>()?.0),
                LineKey::Type => event_type = Some(map.next_value::<Text<'de>>()?.0),
                LineKey::Envelope => {
                    let unwanted = match (self.filter, &subject) {
                        (Some(filter), Some(subject)) => !filter.matches(subject),
                        _ => false,
                    };
                    if unwanted {
                        map.next_value::<IgnoredAny>()?;
                        skipped = true;
                    } else {
                        envelope = Some(map.next_value::<Envelope>()?);
                    }
                }
                LineKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let seq = seq.ok_or_else(|| A::Error::missing_field("seq"))?;
        let subject = subject.ok_or_else(|| A::Error::missing_field("subject"))?;
        let event_type = event_type.ok_or_else(|| A::Error::missing_field("type"))?;
        if skipped {
            return Ok(None);
        }
        let envelope = envelope.ok_or_else(|| A::Error::missing_field("envelope"))?;
        Ok(Some(DecodedLine {
            seq,
            subject,
            event_type,
            envelope,
        }))
    }
}

/// A string borrowed from the line unless it had to be unescaped.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

enum LineKey {
    Seq,
    Subject,
    Type,
    Envelope,
    Other,
}

impl<'de> Deserialize<'de> for LineKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = LineKey;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }

            fn visit_str<E: de::Error>(self, key: &str) -> Result<LineKey, E> {
                Ok(match key {
                    "seq" => LineKey::Seq,
                    "subject" => LineKey::Subject,
                    "type" => LineKey::Type,
                    "envelope" => LineKey::Envelope,
                    _ => LineKey::Other,
                })
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_line_scans_back() {
        let mut buf = vec![];
        encode_line(
            &mut buf,
            1234567,
            "server.s1",
            "ServerEnabled",
            Some((2, 3)),
            1234566,
            br#"{"eventId":"x"}"#,
        );
        assert_eq!(
            buf,
            br#"{"seq":1234567,"subject":"server.s1","type":"ServerEnabled","batch":[2,3],"group":1234566,"envelope":{"eventId":"x"}}
"#
        );
        let line = scan_line(&buf[..buf.len() - 1]).expect("scan");
        assert_eq!(line.seq, 1234567);
        assert_eq!(line.subject, "server.s1");
        assert_eq!(line.batch, Some((2, 3)));
        assert_eq!(line.group, Some(1234566));
        assert_eq!(line.envelope.event_id, "x");
    }

    #[test]
    fn a_commit_mark_scans_back_and_is_told_from_a_record() {
        let mut buf = vec![];
        encode_mark(&mut buf, 42);
        assert_eq!(buf, b"\n{\"commit\":42}\n");
        let line = &buf[1..buf.len() - 1];
        assert!(is_mark(line));
        assert_eq!(scan_mark(line).map(|mark| mark.commit), Ok(42));
        let mut buf = vec![];
        encode_segment_mark(&mut buf, 7, "2026-12");
        assert_eq!(buf, b"\n{\"commit\":7,\"month\":\"2026-12\"}\n");
        assert_eq!(
            scan_mark(&buf[1..buf.len() - 1]),
            Ok(Mark {
                commit: 7,
                month: Some("2026-12".to_owned()),
                group: None,
                crc32: None,
            })
        );
        let mut buf = vec![];
        encode_group_mark(&mut buf, 5, 9, b"records\n");
        let crc = crc32fast::hash(b"records\n");
        assert_eq!(
            buf,
            format!("\n{{\"commit\":9,\"group\":5,\"crc32\":{crc}}}\n").as_bytes()
        );
        assert_eq!(
            scan_mark(&buf[1..buf.len() - 1]),
            Ok(Mark {
                commit: 9,
                month: None,
                group: Some(5),
                crc32: Some(crc),
            })
        );
        assert!(scan_mark(b"{\"commit\":4\x002}").is_err());
        assert!(scan_mark(b"{\"commit\":42,\"x\":1}").is_err());
        assert!(!is_mark(br#"{"seq":1,"subject":"server.s1"}"#));
    }

    #[test]
    fn decimals_are_written_in_full() {
        for value in [0, 9, 10, 99, 100, u64::MAX] {
            let mut buf = vec![];
            push_decimal(&mut buf, value);
            assert_eq!(buf, value.to_string().as_bytes());
        }
    }
}
