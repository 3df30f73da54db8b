//! The audit log over HTTP: the event history with the filters of `switchboard audit replay`,
//! plus `server` and `user`, in pages that never show an event twice or skip one, even while
//! events are appended.
use axum::{extract::State, http::Method};
use chrono::DateTime;
use domain::{ServerId, UserId, UserKey};
use eventlog::{EventLogError, EventStream, LogKind, RecordedEvent, SubjectFilter, UnknownBody};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{Access, ApiError, ApiQuery, AppState, Permission, RouteSpec};

pub const ROUTES: &[RouteSpec] = &[RouteSpec::new(
    Method::GET,
    "/api/v1/audit/events",
    Access::AnyOf(&[Permission::ReadAuditLog]),
)];

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(audit_events))
}

/// One stored event.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventItem {
    /// `config` or `invocations`.
    pub log: &'static str,
    /// Position in its log.
    pub position: u64,
    /// The aggregate's subject, e.g. `server.<id>`.
    pub subject: String,
    /// The event type, e.g. `ServerAdded`; types a newer version wrote are shown as recorded.
    pub r#type: String,
    /// The envelope as proto3 JSON.
    #[schema(value_type = Object)]
    pub envelope: Value,
}

impl EventItem {
    pub fn of(event: &RecordedEvent) -> Self {
        let envelope = match &event.unknown_body {
            Some(UnknownBody::Json(raw)) => serde_json::from_str(raw).unwrap_or(Value::Null),
            _ => serde_json::to_value(&event.envelope).unwrap_or(Value::Null),
        };
        EventItem {
            log: event.log.as_str(),
            position: event.sequence,
            subject: event.subject.as_str().to_owned(),
            r#type: event.event_type.to_string(),
            envelope,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventPage {
    pub events: Vec<EventItem>,
    /// Pass as `cursor` for the events after this page. Always present: a page shorter than
    /// `limit` reached the end of the history as it was; the cursor then returns what is
    /// appended later.
    pub next: String,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, utoipa::ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogChoice {
    #[default]
    All,
    Config,
    Invocations,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// `all` (default), `config` or `invocations`.
    pub log: Option<LogChoice>,
    /// Aggregate subject filter, NATS wildcards allowed: `server.>`, `connection.*.<user_key>`.
    pub subject: Option<String>,
    /// Event types, comma-separated, e.g. `ServerAdded,ServerDeleted`.
    pub r#type: Option<String>,
    /// Events that occurred at or after this RFC 3339 time.
    pub since: Option<String>,
    /// Events that occurred before this RFC 3339 time.
    pub until: Option<String>,
    /// Start at this position of the chosen log (with `log=config` or `log=invocations`).
    pub from: Option<u64>,
    /// Events about this server (its id).
    pub server: Option<String>,
    /// Events about this user or caused by them (their user id).
    pub user: Option<String>,
    /// Events per page: 1 to 1000, 100 by default.
    pub limit: Option<usize>,
    /// The `next` of the previous page.
    pub cursor: Option<String>,
}

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// A position in each log: everything up to it has been handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Positions {
    pub config: u64,
    pub invocations: u64,
}

impl Positions {
    pub fn get(&self, log: LogKind) -> u64 {
        match log {
            LogKind::Config => self.config,
            LogKind::Invocations => self.invocations,
        }
    }

    pub fn set(&mut self, log: LogKind, position: u64) {
        match log {
            LogKind::Config => self.config = position,
            LogKind::Invocations => self.invocations = position,
        }
    }

    /// `<config>-<invocations>`, the form cursors and live-update ids take.
    pub fn encode(&self) -> String {
        format!("{}-{}", self.config, self.invocations)
    }

    pub fn parse(text: &str) -> Option<Positions> {
        let (config, invocations) = text.trim().split_once('-')?;
        Some(Positions {
            config: config.parse().ok()?,
            invocations: invocations.parse().ok()?,
        })
    }
}

/// What the audit shows, besides the subject filter the store applies.
#[derive(Debug, Default)]
struct Filter {
    types: Vec<String>,
    since: Option<(i64, i32)>,
    until: Option<(i64, i32)>,
    server: Option<ServerId>,
    user: Option<(UserId, UserKey)>,
}

fn parse_time(name: &str, text: &str) -> Result<(i64, i32), ApiError> {
    let time = DateTime::parse_from_rfc3339(text).map_err(|_| {
        ApiError::bad_request(
            "invalid_query",
            format!("`{name}` must be an RFC 3339 time such as 2026-11-25T12:00:00Z"),
        )
    })?;
    Ok((time.timestamp(), time.timestamp_subsec_nanos() as i32))
}

fn occurred_at(event: &RecordedEvent) -> (i64, i32) {
    event
        .envelope
        .occurred_at
        .as_ref()
        .map_or((0, 0), |t| (t.seconds, t.nanos))
}

impl Filter {
    fn admits(&self, event: &RecordedEvent) -> bool {
        if !self.types.is_empty() && !self.types.iter().any(|t| *t == event.event_type) {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let at = occurred_at(event);
            if self.since.is_some_and(|since| at < since)
                || self.until.is_some_and(|until| at >= until)
            {
                return false;
            }
        }
        if self
            .server
            .as_ref()
            .is_some_and(|server| !is_about_server(event, server))
        {
            return false;
        }
        if let Some((user, key)) = &self.user {
            let acted = matches!(
                event.envelope.actor.as_ref().and_then(|a| a.kind.as_ref()),
                Some(proto::v1::actor::Kind::UserId(id)) if id == user.as_str()
            );
            if !acted && user_key_of(event.subject.as_str()) != Some(key.as_str()) {
                return false;
            }
        }
        true
    }
}

/// The user key in a subject: `connection.<server>.<user>`, `policy.<user>.<server>`,
/// `invocation.<user>`.
pub(crate) fn user_key_of(subject: &str) -> Option<&str> {
    let mut tokens = subject.split('.');
    match tokens.next()? {
        "connection" => tokens.nth(1),
        "policy" | "invocation" => tokens.next(),
        _ => None,
    }
}

/// The server id in a subject: `server.<server>`, `connection.<server>.<user>`,
/// `policy.<user>.<server>`.
fn server_of(subject: &str) -> Option<&str> {
    let mut tokens = subject.split('.');
    match tokens.next()? {
        "server" | "connection" => tokens.next(),
        "policy" => tokens.nth(1),
        _ => None,
    }
}

/// Invocation subjects are per user; the server an invocation is for is in its request.
fn is_about_server(event: &RecordedEvent, server: &ServerId) -> bool {
    let id = server.to_string();
    if let Some(token) = server_of(event.subject.as_str()) {
        return token == id;
    }
    matches!(
        &event.envelope.event,
        Some(domain::Event::InvocationRequested(requested)) if requested.server_id == id
    )
}

/// The event history, oldest first within each log, merged across logs by time.
#[utoipa::path(get, path = "/api/v1/audit/events", tag = "audit", security(("bearer" = [])),
    params(AuditQuery),
    responses(
        (status = 200, description = "One page of events", body = EventPage),
        (status = 400, description = "A filter could not be read", body = crate::ErrorBody),
        (status = 403, description = "Needs read_audit_log", body = crate::ErrorBody),
    ))]
async fn audit_events(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<axum::Json<EventPage>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("`limit` must be between 1 and {MAX_LIMIT}"),
        ));
    }
    let subject = query
        .subject
        .as_deref()
        .map(SubjectFilter::parse)
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid_query", format!("`subject`: {e}")))?;
    let filter = Filter {
        types: query
            .r#type
            .as_deref()
            .map(|t| {
                t.split(',')
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
        since: query
            .since
            .as_deref()
            .map(|t| parse_time("since", t))
            .transpose()?,
        until: query
            .until
            .as_deref()
            .map(|t| parse_time("until", t))
            .transpose()?,
        server: query
            .server
            .as_deref()
            .map(|s| {
                ServerId::parse(s)
                    .map_err(|e| ApiError::bad_request("invalid_query", format!("`server`: {e}")))
            })
            .transpose()?,
        user: query
            .user
            .as_deref()
            .map(|u| {
                UserId::parse(u)
                    .map(|user| {
                        let key = user.key();
                        (user, key)
                    })
                    .map_err(|e| ApiError::bad_request("invalid_query", format!("`user`: {e}")))
            })
            .transpose()?,
    };
    let choice = query.log.unwrap_or_default();
    let logs: &[LogKind] = match choice {
        LogChoice::All => subject.as_ref().map_or(&LogKind::ALL, |s| s.logs()),
        LogChoice::Config => &[LogKind::Config],
        LogChoice::Invocations => &[LogKind::Invocations],
    };
    let mut done = match query.cursor.as_deref() {
        Some(cursor) => Positions::parse(cursor).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                "`cursor` must be the `next` of a previous page",
            )
        })?,
        None => Positions::default(),
    };
    if let Some(from) = query.from {
        if choice == LogChoice::All {
            return Err(ApiError::bad_request(
                "invalid_query",
                "`from` is a position of one log: add `log=config` or `log=invocations`",
            ));
        }
        for log in logs {
            done.set(*log, done.get(*log).max(from.saturating_sub(1)));
        }
    }

    let mut heads: Vec<(LogKind, EventStream, Option<RecordedEvent>)> = Vec::new();
    for log in logs {
        let mut stream = state
            .log
            .read_from(*log, done.get(*log) + 1, subject.as_ref())
            .await?;
        let head = next_admitted(&mut stream, &filter).await?;
        heads.push((*log, stream, head));
    }
    let mut events = Vec::with_capacity(limit.min(64));
    while events.len() < limit {
        let earliest = heads
            .iter()
            .enumerate()
            .filter_map(|(i, (_, _, head))| head.as_ref().map(|e| (occurred_at(e), i)))
            .min();
        let Some((_, index)) = earliest else {
            break;
        };
        let (log, stream, head) = &mut heads[index];
        let next = next_admitted(stream, &filter).await?;
        if let Some(event) = std::mem::replace(head, next) {
            done.set(*log, event.sequence);
            events.push(EventItem::of(&event));
        }
    }
    Ok(axum::Json(EventPage {
        events,
        next: done.encode(),
    }))
}

async fn next_admitted(
    stream: &mut EventStream,
    filter: &Filter,
) -> Result<Option<RecordedEvent>, ApiError> {
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) if filter.admits(&event) => return Ok(Some(event)),
            Ok(_) => {}
            // An unreadable record is reported by `switchboard audit` and skipped here.
            Err(EventLogError::Corrupt { location, reason }) => {
                tracing::warn!(%location, %reason, "skipping an unreadable event in the audit")
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(None)
}
