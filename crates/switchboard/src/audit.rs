//! `switchboard audit replay`: the event history as JSON lines or a table, filtered by subject,
//! type and time. Events of types this version does not know are shown raw, never dropped.
use std::{io::Write, sync::Arc};

use anyhow::Context;
use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use domain::projections::ServerDirectory;
use eventlog::{
    AggregateKind, EventLog, LogKind, RecordedEvent, SubjectFilter, UnknownBody,
    projection::{ProjectionSpec, fold_until},
};
use serde_json::{Value, json};
use service_kit::audit::{self, AuditFilter, MergedHistory, UnreadableRecords};

use crate::{
    cli::{LogChoice, OutputFormat, ReplayArgs},
    configuration::StoreOptions,
};

/// The filter of `audit replay`'s flags.
fn filter_from_args(args: &ReplayArgs) -> anyhow::Result<AuditFilter> {
    let time = |text: &str, flag: &str| {
        audit::parse_time(text).with_context(|| {
            format!("{flag}: {text:?} is not an RFC 3339 time such as 2026-11-25T12:00:00Z")
        })
    };
    Ok(AuditFilter {
        subject: args
            .subject
            .as_deref()
            .map(SubjectFilter::parse)
            .transpose()
            .context("--subject")?,
        types: args.types.iter().map(|t| t.trim().to_owned()).collect(),
        since: args
            .since
            .as_deref()
            .map(|t| time(t, "--since"))
            .transpose()?,
        until: args
            .until
            .as_deref()
            .map(|t| time(t, "--until"))
            .transpose()?,
        server: args
            .server
            .as_deref()
            .map(domain::ServerId::parse)
            .transpose()
            .context("--server")?,
        user: args
            .user
            .as_deref()
            .map(|user| domain::UserId::parse(user).map(audit::with_key))
            .transpose()
            .context("--user")?,
        invocation: args
            .invocation
            .as_deref()
            .map(domain::InvocationId::parse)
            .transpose()
            .context("--invocation")?,
    })
}

pub async fn replay(store: &StoreOptions, args: &ReplayArgs) -> anyhow::Result<()> {
    let filter = filter_from_args(args)?;
    for unknown in filter
        .types
        .iter()
        .filter(|t| !proto::v1::envelope::Event::TYPE_NAMES.contains(&t.as_str()))
    {
        // Not an error: a newer Switchboard may have written events of that type.
        eprintln!(
            "note: {unknown:?} is not an event type this version knows; only events recorded \
             under exactly that name are shown (known types: {})",
            proto::v1::envelope::Event::TYPE_NAMES.join(", ")
        );
    }
    let log = open_for_reading(store).await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    write_history(log.as_ref(), args.log, &filter, args.format, &mut out).await?;
    out.flush().context("writing to standard output")?;
    Ok(())
}

async fn open_for_reading(store: &StoreOptions) -> anyhow::Result<Arc<dyn EventLog>> {
    let nats = store.connect_nats().await?;
    store.open_event_log_for_reading(nats.as_ref()).await
}

/// `switchboard audit servers --at N`: the server directory folded from the config log up to
/// position N (inclusive), as JSON lines, one per server.
pub async fn servers(store: &StoreOptions, at: Option<u64>) -> anyhow::Result<()> {
    let log = open_for_reading(store).await?;
    let until = match at {
        Some(at) => at,
        None => log.last_sequence(LogKind::Config).await?,
    };
    let spec = ProjectionSpec {
        name: "audit_server_directory",
        log: LogKind::Config,
        filter: Some(SubjectFilter::kind(AggregateKind::Server)),
        apply: |directory: &mut ServerDirectory, event: &RecordedEvent| {
            directory.apply(&event.envelope)
        },
        rewind: None,
    };
    let directory = fold_until(log.as_ref(), &spec, ServerDirectory::default(), until).await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for server in directory.iter() {
        let line = json!({
            "asOfSeq": until,
            "serverId": server.id.to_string(),
            "name": server.name,
            "slug": server.slug,
            "description": server.description,
            "url": server.url,
            "catalogEntryId": server.catalog_entry_id,
            "enabled": server.enabled,
        });
        writeln!(out, "{line}")?;
    }
    out.flush().context("writing to standard output")?;
    Ok(())
}

/// Writes the history of the chosen logs; with both logs, events are merged by the time they
/// occurred (each log is in its own order).
pub async fn write_history(
    log: &dyn EventLog,
    choice: LogChoice,
    filter: &AuditFilter,
    format: OutputFormat,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let wanted: &[LogKind] = match choice {
        LogChoice::All => filter.subject.as_ref().map_or(&LogKind::ALL, |s| s.logs()),
        LogChoice::Config => &[LogKind::Config],
        LogChoice::Invocations => &[LogKind::Invocations],
    };
    let mut history =
        MergedHistory::open(log, wanted, |_| 1, filter, UnreadableRecords::Fail).await?;
    if format == OutputFormat::Table {
        writeln!(
            out,
            "{:<5} {:>8}  {:<24}  {:<26}  {:<40}  DETAILS",
            "LOG", "SEQ", "OCCURRED", "TYPE", "SUBJECT"
        )?;
    }
    while let Some(event) = history.next().await? {
        match format {
            OutputFormat::Json => writeln!(out, "{}", event_json(&event))?,
            OutputFormat::Table => write_table_row(&event, out)?,
        }
    }
    Ok(())
}

/// `{"log","seq","subject","type","occurredAt","envelope"}`; for an event this version does not
/// know, `"known": false` and the stored envelope as it is (JSON) or in base64 (protobuf).
pub fn event_json(event: &RecordedEvent) -> Value {
    let mut line = json!({
        "log": event.log.as_str(),
        "seq": event.sequence,
        "subject": event.subject.as_str(),
        "type": event.event_type,
        "occurredAt": format_time(event),
        "known": event.envelope.event.is_some(),
    });
    let envelope = match &event.unknown_body {
        None => serde_json::to_value(&event.envelope).unwrap_or(Value::Null),
        Some(UnknownBody::Json(raw)) => serde_json::from_str(raw).unwrap_or(Value::Null),
        Some(UnknownBody::Protobuf(bytes)) => {
            line["envelopeProtobufBase64"] =
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
            serde_json::to_value(&event.envelope).unwrap_or(Value::Null)
        }
    };
    line["envelope"] = envelope;
    line
}

fn format_time(event: &RecordedEvent) -> String {
    let (seconds, nanos) = audit::occurred_at(event);
    DateTime::<Utc>::from_timestamp(seconds, nanos.max(0) as u32)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".to_owned())
}

/// The envelope's fields that describe an event rather than say what happened.
const ENVELOPE_FIELDS: [&str; 7] = [
    "eventId",
    "occurredAt",
    "actor",
    "correlationId",
    "causationId",
    "schemaVersion",
    "writeId",
];

/// An envelope's event as JSON (as the API and `event_json` write envelopes): its one field
/// that is not metadata, keyed by the event's type in camelCase.
pub(crate) fn envelope_body(envelope: &Value) -> Option<&Value> {
    envelope
        .as_object()?
        .iter()
        .find(|(key, _)| !ENVELOPE_FIELDS.contains(&key.as_str()))
        .map(|(_, body)| body)
}

fn write_table_row(event: &RecordedEvent, out: &mut impl Write) -> std::io::Result<()> {
    let details = match &event.envelope.event {
        Some(_) => serde_json::to_value(&event.envelope)
            .ok()
            .and_then(|envelope| envelope_body(&envelope).map(Value::to_string))
            .unwrap_or_default(),
        None => "(event type unknown to this version; see --format json)".to_owned(),
    };
    let log = match event.log {
        LogKind::Config => "cfg",
        LogKind::Invocations => "inv",
    };
    writeln!(
        out,
        "{:<5} {:>8}  {:<24}  {:<26}  {:<40}  {}",
        log,
        event.sequence,
        format_time(event),
        event.event_type,
        event.subject.as_str(),
        truncate(&details, 160)
    )
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((index, _)) => &text[..index],
        None => text,
    }
}
