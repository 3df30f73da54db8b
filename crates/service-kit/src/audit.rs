//! Reading the audit history, shared by `switchboard audit replay` and the HTTP audit route:
//! which events to show ([`AuditFilter`]), and the logs merged by the time events occurred
//! ([`MergedHistory`]), each log in its own order.
use domain::{InvocationId, ServerId, UserId, UserKey};
use eventlog::{EventLog, EventLogError, EventStream, LogKind, RecordedEvent, SubjectFilter};
use futures_util::StreamExt;

/// Which events to show. The subject filter is applied by the store; the rest here.
#[derive(Debug, Default)]
pub struct AuditFilter {
    pub subject: Option<SubjectFilter>,
    /// Event type names; empty: every type.
    pub types: Vec<String>,
    /// Inclusive lower bound, seconds and nanos since the epoch.
    pub since: Option<(i64, i32)>,
    /// Exclusive upper bound.
    pub until: Option<(i64, i32)>,
    /// Events about this server.
    pub server: Option<ServerId>,
    /// Events about this user (their subjects) or caused by them.
    pub user: Option<(UserId, UserKey)>,
    /// The events of invocations with this id (the orchestrator's; each user's own).
    pub invocation: Option<InvocationId>,
}

/// The user of a `user` filter with their subject key (worked out once, not per event).
pub fn with_key(user: UserId) -> (UserId, UserKey) {
    let key = user.key();
    (user, key)
}

/// An RFC 3339 time as seconds and nanos since the epoch.
pub fn parse_time(text: &str) -> Option<(i64, i32)> {
    let time = chrono::DateTime::parse_from_rfc3339(text).ok()?;
    Some((time.timestamp(), time.timestamp_subsec_nanos() as i32))
}

/// When an event occurred, as seconds and nanos (0 when it carries no time).
pub fn occurred_at(event: &RecordedEvent) -> (i64, i32) {
    event
        .envelope
        .occurred_at
        .as_ref()
        .map_or((0, 0), |t| (t.seconds, t.nanos))
}

/// The user key in a subject: `connection.<server>.<user>`, `policy.<user>.<server>`,
/// `invocation.<user>`.
pub fn user_key_of(subject: &str) -> Option<&str> {
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
/// Name claims are on the name's subject (`server.name.<slug>`) and name their server.
fn is_about_server(event: &RecordedEvent, server: &ServerId) -> bool {
    let id = server.to_string();
    match &event.envelope.event {
        Some(domain::Event::InvocationRequested(requested)) => return requested.server_id == id,
        Some(domain::Event::ServerNameClaimed(claimed)) => return claimed.server_id == id,
        Some(domain::Event::ServerNameReleased(released)) => return released.server_id == id,
        _ => {}
    }
    server_of(event.subject.as_str()).is_some_and(|token| token == id)
}

impl AuditFilter {
    pub fn admits(&self, event: &RecordedEvent) -> bool {
        if self
            .subject
            .as_ref()
            .is_some_and(|subject| !subject.matches(event.subject.as_str()))
        {
            return false;
        }
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
        if let Some(invocation) = &self.invocation
            && event
                .envelope
                .event
                .as_ref()
                .and_then(domain::invocation::invocation_id_of)
                != Some(invocation.as_str())
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

/// What to do with a record no version can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnreadableRecords {
    /// Stop with the `Corrupt` error (the CLI: an auditor must see the damage).
    Fail,
    /// Log it and go on (the API: one damaged record must not hide the rest).
    Skip,
}

/// The admitted events of several logs, merged by the time they occurred.
pub struct MergedHistory<'f> {
    filter: &'f AuditFilter,
    unreadable: UnreadableRecords,
    heads: Vec<Head>,
    /// How many more events may be read, admitted or not (`None`: no bound).
    budget: Option<usize>,
}

/// One log's stream, its next admitted event, and the last position read from it.
struct Head {
    kind: LogKind,
    stream: EventStream,
    next: Option<RecordedEvent>,
    read_through: u64,
}

impl std::fmt::Debug for MergedHistory<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MergedHistory")
            .field(
                "logs",
                &self.heads.iter().map(|h| h.kind).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl<'f> MergedHistory<'f> {
    /// Reads each of `logs` from the position `from` gives it (inclusive).
    pub async fn open(
        log: &dyn EventLog,
        logs: &[LogKind],
        from: impl Fn(LogKind) -> u64,
        filter: &'f AuditFilter,
        unreadable: UnreadableRecords,
    ) -> Result<Self, EventLogError> {
        Self::open_bounded(log, logs, from, filter, unreadable, None).await
    }

    /// [`open`](Self::open), reading at most `budget` events in all, admitted or not (a
    /// filter that admits little must not read a whole log for one request): once they are
    /// read, [`next`](Self::next) ends and [`exhausted`](Self::exhausted) says so.
    pub async fn open_bounded(
        log: &dyn EventLog,
        logs: &[LogKind],
        from: impl Fn(LogKind) -> u64,
        filter: &'f AuditFilter,
        unreadable: UnreadableRecords,
        budget: Option<usize>,
    ) -> Result<Self, EventLogError> {
        let mut history = MergedHistory {
            filter,
            unreadable,
            heads: Vec::new(),
            budget,
        };
        // A store that filters by reading every record here would pass over records the budget
        // never counts (one page could read a whole log for a rare subject): with a budget,
        // such a store hands over everything and the filter below counts each record.
        let source_filter = match budget {
            Some(_) if !log.filters_where_stored() => None,
            _ => filter.subject.as_ref(),
        };
        for kind in logs {
            let start = from(*kind);
            let stream = log.read_from(*kind, start, source_filter).await?;
            let mut head = Head {
                kind: *kind,
                stream,
                next: None,
                read_through: start.saturating_sub(1),
            };
            head.next = next_admitted(filter, unreadable, &mut head, &mut history.budget).await?;
            history.heads.push(head);
        }
        Ok(history)
    }

    /// The next event, the earliest of the logs' next ones.
    pub async fn next(&mut self) -> Result<Option<RecordedEvent>, EventLogError> {
        if self.exhausted() {
            return Ok(None);
        }
        let earliest = self
            .heads
            .iter()
            .enumerate()
            .filter_map(|(i, head)| head.next.as_ref().map(|e| (occurred_at(e), i)))
            .min();
        let Some((_, index)) = earliest else {
            return Ok(None);
        };
        let (filter, unreadable) = (self.filter, self.unreadable);
        let head = &mut self.heads[index];
        let next = next_admitted(filter, unreadable, head, &mut self.budget).await?;
        Ok(std::mem::replace(&mut head.next, next))
    }

    /// Whether the reading budget ran out (the history may go on).
    pub fn exhausted(&self) -> bool {
        self.budget == Some(0)
    }

    /// The position of `kind` up to which every event was handed out or passed over: what
    /// follows it is still to come (its next admitted event, or what was not read yet).
    pub fn settled_through(&self, kind: LogKind) -> Option<u64> {
        let head = self.heads.iter().find(|head| head.kind == kind)?;
        Some(match &head.next {
            Some(next) => next.sequence.saturating_sub(1),
            None => head.read_through,
        })
    }
}

/// The next event of the head's stream the filter admits, within `budget`. A free function:
/// the stream is borrowed alone, so the history need not be shared across an await.
async fn next_admitted(
    filter: &AuditFilter,
    unreadable: UnreadableRecords,
    head: &mut Head,
    budget: &mut Option<usize>,
) -> Result<Option<RecordedEvent>, EventLogError> {
    loop {
        if let Some(left) = budget {
            if *left == 0 {
                return Ok(None);
            }
            *left -= 1;
        }
        let Some(event) = head.stream.next().await else {
            return Ok(None);
        };
        match event {
            Ok(event) => {
                head.read_through = event.sequence;
                if filter.admits(&event) {
                    return Ok(Some(event));
                }
            }
            Err(EventLogError::Corrupt { location, reason })
                if unreadable == UnreadableRecords::Skip =>
            {
                tracing::warn!(%location, %reason, "skipping an unreadable event in the audit")
            }
            Err(error) => return Err(error),
        }
    }
}
