//! Live updates: server-sent events of the changes the caller may see. The event id carries
//! the position in each log, so a reconnect with `Last-Event-ID` resumes without a gap or a
//! repeat. A slow client is waited for, so a resume with a long backlog catches up at the
//! client's pace; a client that stops reading is disconnected rather than buffered without
//! bound (it reconnects and resumes).
use std::{collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use axum::{
    extract::State,
    http::{HeaderMap, Method, StatusCode},
    response::sse::{Event, KeepAlive, Sse},
};
use eventlog::{EventLogError, EventStream, LogKind, RecordedEvent, SubjectFilter};
use futures_util::{Stream, StreamExt, stream};
use tokio::sync::mpsc;
use utoipa_axum::{router::OpenApiRouter, routes};

use service_kit::audit::user_key_of;

use super::audit::{EventItem, Positions};
use domain::UserId;
use invoker::{NextToolListChange, ToolListChanges};
use tokio_util::sync::CancellationToken;

use crate::{Access, ApiError, AppState, Caller, Permission, RouteSpec};

pub const ROUTES: &[RouteSpec] = &[
    RouteSpec::new(
        Method::GET,
        "/api/v1/stream",
        Access::AnyOf(&[Permission::ViewAndConnect, Permission::ReadAuditLog]),
    ),
    RouteSpec::new(
        Method::GET,
        "/api/v1/tools/changes",
        Access::AnyOf(&[Permission::ViewAndConnect, Permission::InvokeForUsers]),
    ),
];

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(live_updates))
        .routes(routes!(tool_list_changes))
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
                    // entry of the client secret), and so are the claims on names (an add
                    // that failed claimed one too).
                    return !matches!(
                        &*event.event_type,
                        "ServerClientRegistered" | "ServerNameClaimed" | "ServerNameReleased"
                    );
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
        (status = 400, description = "Last-Event-ID could not be read, or is past the end of the log", body = crate::ErrorBody),
        (status = 429, description = "The caller has 16 streams open already", body = crate::ErrorBody),
    ))]
async fn live_updates(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let slot = take_slot(&state, &caller)?;
    let end = Positions {
        config: state.log.last_sequence(LogKind::Config).await?,
        invocations: state.log.last_sequence(LogKind::Invocations).await?,
    };
    let start = match headers.get("last-event-id") {
        Some(value) => {
            let resume = value
                .to_str()
                .ok()
                .and_then(Positions::parse)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_last_event_id",
                        "Last-Event-ID must be the id of an event this stream sent",
                    )
                })?;
            // An id past the end names events this store never had (it was reset, restored
            // or swapped): resuming after it would silently skip the events to come.
            if resume.config > end.config || resume.invocations > end.invocations {
                return Err(ApiError::bad_request(
                    "invalid_last_event_id",
                    format!(
                        "Last-Event-ID {} is past the end of the event log ({}): the store was \
                         reset or replaced; reconnect without Last-Event-ID",
                        resume.encode(),
                        end.encode()
                    ),
                ));
            }
            resume
        }
        None => end,
    };
    let visibility = Visibility::of(&caller);
    let config = state
        .log
        .subscribe(LogKind::Config, start.config + 1, None)
        .await?;
    // A user who sees only their own invocations reads only their subject, not every user's.
    let own_invocations = match &visibility {
        Visibility::Everything => None,
        Visibility::Own { user_key } => Some(
            SubjectFilter::parse(&format!("invocation.{user_key}"))
                .map_err(|e| ApiError::internal(format!("the caller's subject: {e}")))?,
        ),
    };
    let invocations = state
        .log
        .subscribe(
            LogKind::Invocations,
            start.invocations + 1,
            own_invocations.as_ref(),
        )
        .await?;
    let (sender, receiver) = mpsc::channel(state.settings.stream_buffer.max(1));
    let token_ends = token_ends(&caller);
    tokio::spawn(relay(
        stream::select(config, invocations),
        visibility,
        start,
        sender,
        Ends {
            shutdown: state.shutdown.clone(),
            token_ends,
            send_timeout: state.settings.stream_send_timeout,
        },
    ));
    Ok(Sse::new(client_stream(receiver, slot))
        .keep_alive(KeepAlive::new().interval(state.settings.stream_keep_alive)))
}

/// A slot for one more of the caller's streams, or why not.
fn take_slot(state: &AppState, caller: &Caller) -> Result<StreamSlot, ApiError> {
    state.stream_slots.take(&caller.user).ok_or_else(|| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_streams",
            too_many_streams(),
        )
    })
}

/// What a caller holding [`MAX_STREAMS_PER_USER`] streams is told when asking for one more.
pub(crate) fn too_many_streams() -> String {
    format!("you have {MAX_STREAMS_PER_USER} live-update streams open already; close one first")
}

/// When the caller's token expires. A stream ends then: the client reconnects with a fresh
/// one (and `Last-Event-ID`), and a token that lost its roles stops seeing events.
pub(crate) fn token_ends(caller: &Caller) -> Option<tokio::time::Instant> {
    caller.valid_until.map(|until| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        tokio::time::Instant::now() + Duration::from_secs(until.saturating_sub(now))
    })
}

/// The user whose tool-list changes a stream carries; `None`: every user's.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ToolChangesQuery {
    /// One user (an `invoke_for_users` caller; without it, such a caller gets every user's
    /// changes, any other caller their own).
    pub user: Option<String>,
}

/// A user's usable tools changed.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ToolsChangedItem {
    pub user: String,
    /// Pass it as `GET /api/v1/tools?after_config_position=`: the list then shows the change.
    pub config_position: u64,
}

/// Server-sent events, one a change of what `GET /api/v1/tools` answers for a user: `event:
/// tools_changed`, `id` = `data.config_position`, `data` = `{user, config_position}` — a
/// tool's setting, a connection made, lost or removed, a server enabled, disabled, renamed or
/// deleted, a server's tools changed; not what changes no list (a token refreshed, a blocked
/// tool redefined). An orchestrator that keeps a user's tools between turns lists them again.
/// `event: lagged` says changes were missed (the client read too slowly): list again. Starts
/// with the next change.
#[utoipa::path(get, path = "/api/v1/tools/changes", tag = "invocations", security(("bearer" = [])),
    params(ToolChangesQuery),
    responses(
        (status = 200, description = "A stream of changes", content_type = "text/event-stream"),
        (status = 403, description = "Naming another user needs invoke_for_users", body = crate::ErrorBody),
        (status = 429, description = "The caller has 16 streams open already", body = crate::ErrorBody),
    ))]
async fn tool_list_changes(
    State(state): State<AppState>,
    caller: Caller,
    crate::ApiQuery(query): crate::ApiQuery<ToolChangesQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let whose = match query.user.as_deref() {
        Some(named) => Some(super::invocations::user_for(&caller, Some(named))?),
        None if caller.may(Permission::InvokeForUsers) => None,
        None => Some(caller.user.clone()),
    };
    let slot = take_slot(&state, &caller)?;
    let changes = state.invoker.tool_list_changes().await?;
    let ends = (state.shutdown.clone(), token_ends(&caller));
    let events = stream::unfold(
        (changes, slot, whose, ends),
        move |(mut changes, slot, whose, ends)| async move {
            let (shutdown, token_ends) = &ends;
            let event =
                match next_tool_list_change(&mut changes, whose.as_ref(), shutdown, *token_ends)
                    .await?
                {
                    NextToolListChange::Changed(change) => {
                        let item = ToolsChangedItem {
                            user: change.user.as_str().to_owned(),
                            config_position: change.config_position,
                        };
                        Event::default()
                            .event("tools_changed")
                            .id(change.config_position.to_string())
                            .json_data(&item)
                            .unwrap_or_else(|_| Event::default().event("tools_changed"))
                    }
                    NextToolListChange::Missed(missed) => Event::default()
                        .event("lagged")
                        .data(serde_json::json!({ "missed": missed }).to_string()),
                };
            Some((Ok(event), (changes, slot, whose, ends)))
        },
    );
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(state.settings.stream_keep_alive)))
}

/// The next change a tool-list stream carries for `whose` (every user's when `None`), or
/// that some were missed (the receiver fell behind: list again); `None` once the stream
/// ends — Switchboard stopping, the caller's token expired (`token_ends`), the invoker gone.
/// The SSE route and the MCP endpoint's subscriptions both follow changes through it.
pub(crate) async fn next_tool_list_change(
    changes: &mut ToolListChanges,
    whose: Option<&UserId>,
    shutdown: &CancellationToken,
    token_ends: Option<tokio::time::Instant>,
) -> Option<NextToolListChange> {
    let token_expired = async {
        match token_ends {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(token_expired);
    loop {
        let change = tokio::select! {
            () = shutdown.cancelled() => return None,
            () = &mut token_expired => return None,
            change = changes.next() => change?,
        };
        match change {
            NextToolListChange::Changed(change)
                if whose.is_some_and(|user| *user != change.user) => {}
            change => return Some(change),
        }
    }
}

/// What the client's response sends: the relay's events. The response holds the stream's
/// slot, not the relay: a relay that gave up on a client leaves its buffered events in the
/// response until the connection goes, and those count against the user's streams too.
fn client_stream(
    receiver: mpsc::Receiver<Event>,
    slot: StreamSlot,
) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold((receiver, slot), |(mut receiver, slot)| async move {
        receiver
            .recv()
            .await
            .map(|event| (Ok(event), (receiver, slot)))
    })
}

/// Live-update streams one user may hold open at once (browser tabs, a console and a
/// script); more are refused, so that one caller cannot make the process follow the logs
/// without bound.
pub const MAX_STREAMS_PER_USER: usize = 16;

/// The open streams, by user.
#[derive(Debug, Default)]
pub struct StreamSlots(std::sync::Mutex<HashMap<UserId, usize>>);

impl StreamSlots {
    /// A slot for one more stream of `user`, or `None` when they hold the most already.
    pub(crate) fn take(self: &Arc<Self>, user: &UserId) -> Option<StreamSlot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(user.clone()).or_default();
        if *count >= MAX_STREAMS_PER_USER {
            return None;
        }
        *count += 1;
        Some(StreamSlot {
            slots: self.clone(),
            user: user.clone(),
        })
    }
}

/// One open stream; gives its slot back when the stream ends.
#[derive(Debug)]
pub(crate) struct StreamSlot {
    slots: Arc<StreamSlots>,
    user: UserId,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.user);
            }
        }
    }
}

/// What ends a relay besides its client and its logs.
struct Ends {
    shutdown: tokio_util::sync::CancellationToken,
    /// When the caller's token expires.
    token_ends: Option<tokio::time::Instant>,
    /// How long a full buffer may wait for the client to take an event.
    send_timeout: Duration,
}

/// Reads the logs and hands the caller's events to the client's bounded buffer, waiting while
/// it is full; ends the client's stream when the client took nothing for `send_timeout`, left,
/// the log failed, the token expired or the process shuts down.
async fn relay(
    mut events: stream::Select<EventStream, EventStream>,
    visibility: Visibility,
    mut positions: Positions,
    sender: mpsc::Sender<Event>,
    ends: Ends,
) {
    let token_ends = async {
        match ends.token_ends {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(token_ends);
    loop {
        let next = tokio::select! {
            next = events.next() => next,
            () = ends.shutdown.cancelled() => return,
            () = sender.closed() => return,
            () = &mut token_ends => return,
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
        let sent = tokio::select! {
            sent = sender.send_timeout(sse, ends.send_timeout) => sent,
            () = ends.shutdown.cancelled() => return,
            () = &mut token_ends => return,
        };
        match sent {
            Ok(()) => {}
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                tracing::info!("a live-update client stopped reading; disconnecting it");
                return;
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => return,
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

    fn ends(token_ends: Option<tokio::time::Instant>, send_timeout: Duration) -> Ends {
        Ends {
            shutdown: tokio_util::sync::CancellationToken::new(),
            token_ends,
            send_timeout,
        }
    }

    #[tokio::test]
    async fn a_stream_ends_when_its_token_does() {
        // Both logs stay silent: only the token's end can end the relay.
        let config: EventStream = stream::pending().boxed();
        let invocations: EventStream = stream::pending().boxed();
        let (sender, mut receiver) = mpsc::channel(4);
        let token_ends = tokio::time::Instant::now() + Duration::from_millis(20);
        tokio::time::timeout(
            Duration::from_secs(10),
            relay(
                stream::select(config, invocations),
                Visibility::Everything,
                Positions::default(),
                sender,
                ends(Some(token_ends), Duration::from_secs(30)),
            ),
        )
        .await
        .expect("the relay ended with the token");
        assert!(tokio::time::Instant::now() >= token_ends);
        assert!(receiver.recv().await.is_none(), "the client's stream ended");
    }

    #[test]
    fn a_user_holds_a_bounded_number_of_streams() {
        let slots = Arc::new(StreamSlots::default());
        let alice = UserId::parse("alice@example.com").expect("user");
        let bob = UserId::parse("bob@example.com").expect("user");
        let mut held: Vec<StreamSlot> = (0..MAX_STREAMS_PER_USER)
            .map(|_| slots.take(&alice).expect("a slot"))
            .collect();
        assert!(slots.take(&alice).is_none(), "one too many");
        let bobs = slots.take(&bob).expect("others are not affected");
        held.pop();
        let again = slots.take(&alice).expect("a closed stream frees its slot");
        drop((again, bobs));
        assert_eq!(
            slots.0.lock().expect("lock").get(&alice).copied(),
            Some(MAX_STREAMS_PER_USER - 1)
        );
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_disconnected_not_buffered() {
        let config: EventStream = stream::iter((1..=50).map(recorded)).boxed();
        // The other log never ends: only the client's silence can end the relay.
        let invocations: EventStream = stream::pending().boxed();
        let (sender, mut receiver) = mpsc::channel(4);
        let relayed = tokio::time::timeout(
            Duration::from_secs(10),
            relay(
                stream::select(config, invocations),
                Visibility::Everything,
                Positions::default(),
                sender,
                ends(None, Duration::from_millis(50)),
            ),
        )
        .await;
        assert!(relayed.is_ok(), "the relay gave up on the silent client");
        // The client gets what was buffered, in order, then the end of its stream: it
        // reconnects from the last id it saw.
        let mut ids = Vec::new();
        while let Some(event) = receiver.recv().await {
            ids.push(event);
        }
        assert_eq!(ids.len(), 4, "exactly the buffer, nothing more held");
    }

    #[tokio::test]
    async fn a_slow_client_catches_up_with_a_backlog_many_times_its_buffer() {
        let config: EventStream = stream::iter((1..=50).map(recorded)).boxed();
        let invocations: EventStream = stream::pending().boxed();
        let (sender, mut receiver) = mpsc::channel(4);
        let relay = tokio::spawn(relay(
            stream::select(config, invocations),
            Visibility::Everything,
            Positions::default(),
            sender,
            ends(None, Duration::from_secs(30)),
        ));
        let mut positions = Vec::new();
        for _ in 0..50 {
            let event = tokio::time::timeout(Duration::from_secs(10), receiver.recv())
                .await
                .expect("the relay waits for the client instead of dropping it")
                .expect("an event");
            positions.push(event);
            // The client reads one event at a time, letting the relay fill the buffer again.
            tokio::task::yield_now().await;
        }
        assert_eq!(
            positions.len(),
            50,
            "the whole backlog, through a buffer of 4"
        );
        assert!(!relay.is_finished(), "the stream goes on after the backlog");
        drop(receiver);
        tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("the relay ends when the client leaves")
            .expect("the relay did not panic");
    }

    #[tokio::test]
    async fn the_response_holds_its_slot_until_it_is_dropped() {
        let slots = Arc::new(StreamSlots::default());
        let alice = UserId::parse("alice@example.com").expect("user");
        let (sender, receiver) = mpsc::channel(4);
        sender
            .send(Event::default().data("buffered"))
            .await
            .expect("buffered");
        let response = client_stream(receiver, slots.take(&alice).expect("a slot"));
        // The relay has given up on the client; the buffered event is still in the response.
        drop(sender);
        let open = || slots.0.lock().expect("lock").get(&alice).copied();
        assert_eq!(
            open(),
            Some(1),
            "a response with events undelivered holds its slot"
        );
        let delivered: Vec<_> = response.collect().await;
        assert_eq!(delivered.len(), 1);
        assert_eq!(open(), None, "a finished response frees its slot");
    }
}
