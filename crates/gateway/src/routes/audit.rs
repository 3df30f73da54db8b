//! The audit log over HTTP: the event history with the filters of `switchboard audit replay`,
//! plus `server` and `user`, in pages that never show an event twice or skip one, even while
//! events are appended.
use axum::{extract::State, http::Method};
use domain::{ServerId, UserId};
use eventlog::{LogKind, RecordedEvent, SubjectFilter, UnknownBody};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use service_kit::audit::{self, AuditFilter, MergedHistory, UnreadableRecords};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{Access, ApiError, ApiQuery, AppState, Caller, Permission, RouteSpec};

pub const ROUTES: &[RouteSpec] = &[
    RouteSpec::new(
        Method::GET,
        "/api/v1/audit/events",
        Access::AnyOf(&[Permission::ReadAuditLog]),
    ),
    RouteSpec::new(
        Method::GET,
        "/api/v1/me/events",
        Access::AnyOf(&[Permission::ViewAndConnect, Permission::ReadAuditLog]),
    ),
];

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(audit_events))
        .routes(routes!(my_events))
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
    /// `limit` that is not `partial` reached the end of the history as it was; the cursor
    /// then returns what is appended later.
    pub next: String,
    /// The page stopped before `limit` events without reaching the end: it read its share of
    /// the log (a filter that admits few events reads many for each), or its events reached
    /// 8 MiB (invocations with captured payloads). The history may go on, from `next`.
    pub partial: bool,
    /// Names in `type` this version does not know (a typo, or a type a newer version
    /// wrote): only events recorded under exactly such a name match them. Absent when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown_types: Vec<String>,
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
    /// Events about this server (its id): its own events and name claims, its connections
    /// and tool settings, and the requests of invocations of it. An invocation's later events
    /// (approval, outcome) carry its `invocation_id`, not the server: follow that id with
    /// `invocation`.
    pub server: Option<String>,
    /// Events about this user or caused by them (their user id).
    pub user: Option<String>,
    /// The events of invocations with this id (request, decision, start, outcome): with
    /// `server`, what followed the server's invocation requests.
    pub invocation: Option<String>,
    /// Events per page: 1 to 1000, 100 by default.
    pub limit: Option<usize>,
    /// The `next` of the previous page.
    pub cursor: Option<String>,
}

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// Events one request reads at most, admitted by its filter or not.
const MAX_SCANNED: usize = 20_000;
/// Stored bytes of events a page hands out at most (at least one event): with payload
/// capture an event can hold a megabyte, and a page of 1,000 of them would be gigabytes of
/// JSON built for one request.
const MAX_PAGE_BYTES: usize = 8 * 1024 * 1024;

/// An event's stored size, the measure of a page's budget.
fn stored_size(event: &RecordedEvent) -> usize {
    use proto::Message;
    match &event.unknown_body {
        Some(UnknownBody::Json(raw)) => raw.len(),
        Some(UnknownBody::Protobuf(raw)) => raw.len(),
        None => event.envelope.encoded_len(),
    }
}

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

    /// `None` for anything but two positions a log can reach (below 2^63: reading resumes at
    /// the next one, which must not overflow).
    pub fn parse(text: &str) -> Option<Positions> {
        let (config, invocations) = text.trim().split_once('-')?;
        let position = |text: &str| {
            text.parse::<u64>()
                .ok()
                .filter(|position| *position <= i64::MAX as u64)
        };
        Some(Positions {
            config: position(config)?,
            invocations: position(invocations)?,
        })
    }
}

fn parse_time(name: &str, text: &str) -> Result<(i64, i32), ApiError> {
    audit::parse_time(text).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_query",
            format!("`{name}` must be an RFC 3339 time such as 2026-11-25T12:00:00Z"),
        )
    })
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
    event_page(&state, query).await.map(axum::Json)
}

/// Your own history: the events about you or caused by you — your connections, tool
/// settings, approvals and every invocation made as you, with who made each change — with
/// the audit log's filters and pages. What the AI did as you, without the audit log's
/// permission.
#[utoipa::path(get, path = "/api/v1/me/events", tag = "me", security(("bearer" = [])),
    params(AuditQuery),
    responses(
        (status = 200, description = "One page of your events", body = EventPage),
        (status = 400, description = "A filter could not be read, or `user` names someone else", body = crate::ErrorBody),
    ))]
async fn my_events(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(mut query): ApiQuery<AuditQuery>,
) -> Result<axum::Json<EventPage>, ApiError> {
    if query
        .user
        .as_deref()
        .is_some_and(|user| user != caller.user.as_str())
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            "`user` here can only be you (leave it out); another user's events are in \
             /api/v1/audit/events, with read_audit_log",
        ));
    }
    query.user = Some(caller.user.as_str().to_owned());
    event_page(&state, query).await.map(axum::Json)
}

/// One page of the events `query` selects.
async fn event_page(state: &AppState, query: AuditQuery) -> Result<EventPage, ApiError> {
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
    let filter = AuditFilter {
        subject,
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
                    .map(service_kit::audit::with_key)
                    .map_err(|e| ApiError::bad_request("invalid_query", format!("`user`: {e}")))
            })
            .transpose()?,
        invocation: query
            .invocation
            .as_deref()
            .map(|id| {
                domain::InvocationId::parse(id).map_err(|e| {
                    ApiError::bad_request("invalid_query", format!("`invocation`: {e}"))
                })
            })
            .transpose()?,
    };
    if let (Some(since), Some(until)) = (filter.since, filter.until)
        && since >= until
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            "`since` must be before `until` (`since` is included, `until` is not)",
        ));
    }
    let choice = query.log.unwrap_or_default();
    if let Some(subject) = &filter.subject {
        let chosen = match choice {
            LogChoice::All => None,
            LogChoice::Config => Some(LogKind::Config),
            LogChoice::Invocations => Some(LogKind::Invocations),
        };
        if chosen.is_some_and(|log| !subject.logs().contains(&log)) {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!(
                    "`subject` {} selects nothing in the log `log` chose",
                    subject.as_str()
                ),
            ));
        }
    }
    let logs: &[LogKind] = match choice {
        LogChoice::All => filter.subject.as_ref().map_or(&LogKind::ALL, |s| s.logs()),
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
        if from > i64::MAX as u64 {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("`from` must be at most {}", i64::MAX),
            ));
        }
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

    let mut history = MergedHistory::open_bounded(
        state.log.as_ref(),
        logs,
        |log| done.get(log) + 1,
        &filter,
        UnreadableRecords::Skip,
        Some(MAX_SCANNED),
    )
    .await?;
    let mut events = Vec::with_capacity(limit.min(64));
    let mut bytes = 0;
    let mut full = false;
    while events.len() < limit {
        if bytes >= MAX_PAGE_BYTES {
            full = true;
            break;
        }
        let Some(event) = history.next().await? else {
            break;
        };
        bytes += stored_size(&event);
        done.set(event.log, event.sequence);
        events.push(EventItem::of(&event));
    }
    // The cursor passes what the filter left out too, so the next page does not read it again.
    for log in logs {
        if let Some(settled) = history.settled_through(*log) {
            done.set(*log, done.get(*log).max(settled));
        }
    }
    Ok(EventPage {
        events,
        next: done.encode(),
        partial: full || history.exhausted(),
        unknown_types: filter
            .types
            .iter()
            .filter(|t| !proto::v1::envelope::Event::TYPE_NAMES.contains(&t.as_str()))
            .cloned()
            .collect(),
    })
}
