//! Live updates: server-sent events of the changes the caller may see. The event id carries
//! the position in each log, so a reconnect with `Last-Event-ID` resumes without a gap or a
//! repeat. A client too slow to keep up is disconnected (it reconnects and resumes) rather
//! than buffered without bound.
use std::convert::Infallible;

use axum::{
    extract::State,
    http::{HeaderMap, Method},
    response::sse::{Event, KeepAlive, Sse},
};
use eventlog::{EventLogError, EventStream, LogKind, RecordedEvent};
use futures_util::{Stream, StreamExt, stream};
use tokio::sync::mpsc;
use utoipa_axum::{router::OpenApiRouter, routes};

use service_kit::audit::user_key_of;

use super::audit::{EventItem, Positions};
use crate::{Access, ApiError, AppState, Caller, Permission, RouteSpec};

pub const ROUTES: &[RouteSpec] = &[RouteSpec::new(
    Method::GET,
    "/api/v1/stream",
    Access::AnyOf(&[Permission::ViewAndConnect, Permission::ReadAuditLog]),
)];

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(live_updates))
}

/// What one caller may see of the event stream.
#[derive(Debug, Clone)]
pub(crate) enum Visibility {
    /// `read_audit_log`: every event.
    Everything,
    /// `view_and_connect`: server list changes, and the caller's own connections, tool
    /// settings, approvals and invocations.
    Own { user_key: String },
}

impl Visibility {
    pub(crate) fn of(caller: &Caller) -> Visibility {
        if caller.may(Permission::ReadAuditLog) {
            Visibility::Everything
        } else {
            Visibility::Own {
                user_key: caller.user.key().as_str().to_owned(),
            }
        }
    }

    pub(crate) fn admits(&self, event: &RecordedEvent) -> bool {
        match self {
            Visibility::Everything => true,
            Visibility::Own { user_key } => {
                let subject = event.subject.as_str();
                if subject.starts_with("server.") {
                    // The client registration is an admin's business (it names the vault
                    // entry of the client secret).
                    return event.event_type != "ServerClientRegistered";
                }
                user_key_of(subject) == Some(user_key.as_str())
            }
        }
    }
}

/// Server-sent events: `id` = `<config position>-<invocations position>`, `event` = the event
/// type, `data` = `{log, position, subject, type, envelope}`. Without `Last-Event-ID` the
/// stream starts with the next change.
#[utoipa::path(get, path = "/api/v1/stream", tag = "stream", security(("bearer" = [])),
    params(("Last-Event-ID" = Option<String>, Header, description = "The id of the last event received, to resume after it")),
    responses(
        (status = 200, description = "A stream of events", content_type = "text/event-stream"),
        (status = 400, description = "Last-Event-ID could not be read", body = crate::ErrorBody),
    ))]
async fn live_updates(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let start = match headers.get("last-event-id") {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(Positions::parse)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_last_event_id",
                    "Last-Event-ID must be the id of an event this stream sent",
                )
            })?,
        None => Positions {
            config: state.log.last_sequence(LogKind::Config).await?,
            invocations: state.log.last_sequence(LogKind::Invocations).await?,
        },
    };
    let config = state
        .log
        .subscribe(LogKind::Config, start.config + 1, None)
        .await?;
    let invocations = state
        .log
        .subscribe(LogKind::Invocations, start.invocations + 1, None)
        .await?;
    let (sender, receiver) = mpsc::channel(state.settings.stream_buffer.max(1));
    tokio::spawn(relay(
        stream::select(config, invocations),
        Visibility::of(&caller),
        start,
        sender,
        state.shutdown.clone(),
    ));
    let events = stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|event| (Ok(event), receiver))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(state.settings.stream_keep_alive)))
}

/// Reads the logs as fast as they grow and hands the caller's events to the client's bounded
/// buffer; ends the client's stream when the buffer is full (too slow), the client left, the
/// log failed or the process shuts down.
async fn relay(
    mut events: stream::Select<EventStream, EventStream>,
    visibility: Visibility,
    mut positions: Positions,
    sender: mpsc::Sender<Event>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let next = tokio::select! {
            next = events.next() => next,
            () = shutdown.cancelled() => return,
            () = sender.closed() => return,
        };
        let event = match next {
            Some(Ok(event)) => event,
            Some(Err(EventLogError::Corrupt { location, reason })) => {
                tracing::warn!(%location, %reason, "live updates skip an unreadable event");
                continue;
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "live updates: the log failed; the client will reconnect");
                return;
            }
            None => return,
        };
        positions.set(event.log, event.sequence);
        if !visibility.admits(&event) {
            continue;
        }
        let data = match serde_json::to_string(&EventItem::of(&event)) {
            Ok(data) => data,
            Err(error) => {
                tracing::error!(%error, "live update not encodable");
                continue;
            }
        };
        let sse = Event::default()
            .id(positions.encode())
            .event(event.event_type.as_ref())
            .data(data);
        match sender.try_send(sse) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::info!("a live-update client fell too far behind; disconnecting it");
                return;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{borrow::Cow, time::Duration};

    use eventlog::Subject;
    use futures_util::StreamExt;

    use super::*;

    fn recorded(sequence: u64) -> Result<RecordedEvent, EventLogError> {
        Ok(RecordedEvent {
            log: LogKind::Config,
            sequence,
            subject: Subject::parse("server.s1").expect("subject"),
            event_type: Cow::Borrowed("ServerEnabled"),
            envelope: proto::v1::Envelope::default(),
            unknown_body: None,
        })
    }

    #[tokio::test]
    async fn a_client_that_falls_behind_is_disconnected_not_buffered() {
        let config: EventStream = stream::iter((1..=50).map(recorded)).boxed();
        // The other log never ends: only the full buffer can end the relay.
        let invocations: EventStream = stream::pending().boxed();
        let (sender, mut receiver) = mpsc::channel(4);
        let relayed = tokio::time::timeout(
            Duration::from_secs(10),
            relay(
                stream::select(config, invocations),
                Visibility::Everything,
                Positions::default(),
                sender,
                tokio_util::sync::CancellationToken::new(),
            ),
        )
        .await;
        assert!(relayed.is_ok(), "the relay gave up on the slow client");
        // The client gets what was buffered, in order, then the end of its stream: it
        // reconnects from the last id it saw.
        let mut ids = Vec::new();
        while let Some(_event) = receiver.recv().await {
            ids.push(ids.len());
        }
        assert_eq!(ids.len(), 4, "exactly the buffer, nothing more held");
    }
}
