//! The Invocation aggregate: one tool call request, identified by its invocation id. Its
//! events live on its user's subject, `invocation.<user_key>` ([`subject`]): the subjects
//! stay as many as the users, however many invocations are kept. Nothing is appended there
//! with an expected version, so one user's parallel invocations never conflict.
//!
//! **At most once** rests on three events that competing writers must not both record, and
//! that every writer therefore records under one event id derived from the invocation
//! ([`settling_event_id`]): the log stores an event id once, so of any number of writers
//! exactly one's event is stored, and each learns where it is. They are the claim
//! (`InvocationRequested`: one request goes on), the decision (`InvocationApproved`, `Denied`
//! or `Expired`: one decision) and the outcome (`InvocationRejected`, `Completed` or `Failed`:
//! one terminal event). The envelope's `write_id` tells a writer whether the stored event is
//! its own. The log remembers event ids for its dedupe window; beyond it, the claim is upheld
//! by the open invocations read model, which knows every invocation of the claim window
//! ([`crate::projections::open_invocations`]).
//!
//! Loading an invocation folds the events of its user's subject from its request on,
//! skipping other invocations' ([`InvocationState::replay`]): the cost is what the user did
//! during this invocation, not their history.
//!
//! The state machine:
//! ```text
//! Request ─┬─ rejected (tool_blocked, server_disabled, not_connected, unknown_tool)   [terminal]
//!          ├─ awaiting approval ─┬─ Approve ──→ ready
//!          │                     ├─ Deny ─────→ denied                                 [terminal]
//!          │                     └─ Expire ───→ expired                                [terminal]
//!          ├─ running (allowed: the request records the start, `started`)
//!          └─ ready ── Start ──→ running ─┬─ Complete → completed                       [terminal]
//!                                         └─ Fail ────→ failed                          [terminal]
//! ```
//! An allowed request is called at once, so its `InvocationRequested` records the start
//! (`started`) and no `InvocationStarted` follows: the claim is then the only append before
//! the call. `Start` starts an approved invocation (and one recorded by an earlier version,
//! whose allowed requests were `ready`).
//! `Fail` also closes an invocation that never started (e.g. its token could not be loaded).
//! Start is accepted once: at most one call to the MCP server per invocation id. Exactly one
//! terminal event; after it, every command is refused with `invocation_finished` (a request
//! replayed with identical content records nothing instead, so a retried publish is harmless).
use std::time::{Duration, SystemTime};

use proto::v1::{self as pb, envelope::Event};

use crate::time::{from_timestamp, to_timestamp};
use crate::{Aggregate, DomainError, InvocationId, ServerId, ToolName, ToolState, UserId};

/// The subject of a user's invocation events, relative to the deployment's prefix.
pub fn subject(user: &UserId) -> String {
    format!("invocation.{}", user.key())
}

/// What an event settles for its invocation, when competing writers must not both record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settles {
    /// `InvocationRequested`: the request that goes on.
    Claim,
    /// `InvocationApproved`, `InvocationDenied`, `InvocationExpired`.
    Decision,
    /// `InvocationRejected`, `InvocationCompleted`, `InvocationFailed`: the terminal event.
    Outcome,
}

impl Settles {
    /// What `event` settles; `None` for events only the winner of a claim or decision writes.
    pub fn of(event: &Event) -> Option<Settles> {
        match event {
            Event::InvocationRequested(_) => Some(Settles::Claim),
            Event::InvocationApproved(_)
            | Event::InvocationDenied(_)
            | Event::InvocationExpired(_) => Some(Settles::Decision),
            Event::InvocationRejected(_)
            | Event::InvocationCompleted(_)
            | Event::InvocationFailed(_) => Some(Settles::Outcome),
            _ => None,
        }
    }

    fn label(self) -> &'static [u8] {
        match self {
            Settles::Claim => b"claim",
            Settles::Decision => b"decision",
            Settles::Outcome => b"outcome",
        }
    }
}

/// The event id every writer of what `settles` for `user`'s invocation `id` uses: a UUIDv8
/// from the SHA-256 of the three, so the log stores one such event per invocation.
pub fn settling_event_id(user: &UserId, id: &InvocationId, settles: Settles) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [
        user.as_str().as_bytes(),
        id.as_str().as_bytes(),
        settles.label(),
    ] {
        // Length-prefixed: no two triples hash the same bytes.
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part);
    }
    let digest = context.finish();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest.as_ref()[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// The invocation an event belongs to, if it is an invocation event.
pub fn invocation_id_of(event: &Event) -> Option<&str> {
    Some(match event {
        Event::InvocationRequested(e) => &e.invocation_id,
        Event::InvocationRejected(e) => &e.invocation_id,
        Event::InvocationAwaitingApproval(e) => &e.invocation_id,
        Event::InvocationApproved(e) => &e.invocation_id,
        Event::InvocationDenied(e) => &e.invocation_id,
        Event::InvocationExpired(e) => &e.invocation_id,
        Event::InvocationStarted(e) => &e.invocation_id,
        Event::InvocationCompleted(e) => &e.invocation_id,
        Event::InvocationFailed(e) => &e.invocation_id,
        _ => return None,
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum InvocationStatus {
    /// No `InvocationRequested` yet.
    #[default]
    NotRequested,
    AwaitingApproval {
        expires_at: SystemTime,
    },
    /// Allowed to start: by an *Always allow* setting, or approved by the user.
    Ready {
        approved_by: Option<String>,
    },
    Running,
    Rejected {
        reason_code: String,
    },
    Denied,
    Expired,
    Completed {
        is_error: bool,
    },
    Failed {
        error_code: String,
    },
}

impl InvocationStatus {
    /// Whether the invocation has its one terminal event.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            InvocationStatus::Rejected { .. }
                | InvocationStatus::Denied
                | InvocationStatus::Expired
                | InvocationStatus::Completed { .. }
                | InvocationStatus::Failed { .. }
        )
    }
}

/// One invocation as its events describe it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InvocationState {
    request: Option<pb::InvocationRequested>,
    status: InvocationStatus,
}

impl InvocationState {
    /// Folds the events of invocation `id` out of a stream that may hold other invocations'
    /// events too (a user's invocation subject).
    pub fn replay<'a>(id: &InvocationId, events: impl IntoIterator<Item = &'a Event>) -> Self {
        let id = id.as_str();
        let mut state = InvocationState::default();
        for event in events {
            if invocation_id_of(event) == Some(id) {
                state.apply(event);
            }
        }
        state
    }

    pub fn status(&self) -> &InvocationStatus {
        &self.status
    }

    /// The request, once recorded.
    pub fn request(&self) -> Option<&pb::InvocationRequested> {
        self.request.as_ref()
    }
}

impl Aggregate for InvocationState {
    /// Events of another invocation than the one requested first are ignored, and so is
    /// anything after the terminal event. Use [`InvocationState::replay`] on a shared subject.
    fn apply(&mut self, event: &Event) {
        let Some(event_id) = invocation_id_of(event) else {
            return;
        };
        if let Event::InvocationRequested(requested) = event {
            if self.request.is_none() {
                self.request = Some(requested.clone());
                self.status = if requested.started {
                    InvocationStatus::Running
                } else {
                    InvocationStatus::Ready { approved_by: None }
                };
            }
            return;
        }
        let ours = self
            .request
            .as_ref()
            .is_some_and(|request| request.invocation_id == event_id);
        if !ours || self.status.is_terminal() {
            return;
        }
        self.status = match event {
            Event::InvocationRejected(e) => InvocationStatus::Rejected {
                reason_code: e.reason_code.clone(),
            },
            Event::InvocationAwaitingApproval(e) => InvocationStatus::AwaitingApproval {
                expires_at: e
                    .approval_expires_at
                    .as_ref()
                    .map_or(SystemTime::UNIX_EPOCH, from_timestamp),
            },
            Event::InvocationApproved(e) => InvocationStatus::Ready {
                approved_by: Some(e.approved_by.clone()),
            },
            Event::InvocationDenied(_) => InvocationStatus::Denied,
            Event::InvocationExpired(_) => InvocationStatus::Expired,
            Event::InvocationStarted(_) => InvocationStatus::Running,
            Event::InvocationCompleted(e) => InvocationStatus::Completed {
                is_error: e.is_error,
            },
            Event::InvocationFailed(e) => InvocationStatus::Failed {
                error_code: e.error_code.clone(),
            },
            _ => return,
        };
    }
}

/// What the invoker found for the tool name the AI used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTool {
    pub server_id: ServerId,
    pub tool: ToolName,
    pub server_enabled: bool,
    /// Whether the user's connection to the server can be used.
    pub connected: bool,
    /// The connection's authorization no longer works (the user must reconnect).
    pub connection_auth_error: bool,
    /// The user's setting for the tool.
    pub tool_state: ToolState,
}

/// A tool call request, with the facts the invoker resolved for it.
#[derive(Debug, Clone)]
pub struct InvocationRequest {
    pub user_id: UserId,
    /// The name the AI used (`<slug>__<tool>`), as it sent it; recorded (cut to 256
    /// characters) even when it names no tool.
    pub exposed_tool_name: String,
    /// Tool arguments as JSON text (the invoker caps their size).
    pub arguments_json: String,
    /// SHA-256 (lowercase hex) and size of `arguments_json`: always recorded.
    pub arguments_sha256: String,
    pub arguments_size_bytes: u64,
    /// Record the arguments themselves (payload capture). Without it, an invocation that waits
    /// for approval keeps them outside the log (the invoker's vault) until the user decides.
    pub capture_arguments: bool,
    /// `None`: the exposed name names no tool of this user.
    pub resolved: Option<ResolvedTool>,
    /// How long a *Needs approval* invocation waits for the user.
    pub approval_timeout: Duration,
    /// The user already has as many requests waiting for their approval as the invoker
    /// allows: one more that would wait is rejected (`too_many_pending_approvals`), so that a
    /// runaway orchestrator cannot bury the user's approvals (and the vault, which keeps
    /// their arguments) under requests.
    pub approvals_full: bool,
    /// The call's deadline the orchestrator asked for (`None`: the default), recorded for
    /// the approved call.
    pub deadline: Option<Duration>,
    /// The orchestrator's conversation id, recorded for the audit (cut to 256 characters).
    pub conversation_id: String,
}

#[derive(Debug, Clone)]
pub enum InvocationCommand {
    Request(InvocationRequest),
    Approve {
        by: UserId,
    },
    /// `by` refuses the request; `withdrawn`: the orchestrator acting for `by` no longer
    /// wants it (the conversation moved on) — a decision all the same, made once.
    Deny {
        by: UserId,
        reason: String,
        withdrawn: bool,
    },
    /// The approval deadline passed.
    Expire,
    /// The invoker is about to call the MCP server.
    Start,
    /// The MCP server answered (`is_error`: MCP `isError`, the tool reported a failure).
    Complete {
        is_error: bool,
        duration_ms: u64,
        result_size_bytes: u64,
        result_sha256: String,
        truncated: bool,
        /// The result envelope, when payload capture is on; empty otherwise.
        result_json: String,
        /// Without capture, the process that holds the result (see the event).
        result_held_by: String,
    },
    /// The call could not be made or did not return a result.
    Fail {
        error_code: String,
        message: String,
        duration_ms: u64,
    },
}

const MAX_RECORDED_EXPOSED_NAME_CHARS: usize = 256;

/// Decides a command for invocation `id` at time `now`.
pub fn decide(
    state: &InvocationState,
    id: &InvocationId,
    command: InvocationCommand,
    now: SystemTime,
) -> Result<Vec<Event>, DomainError> {
    let invocation_id = || id.as_str().to_owned();
    if let InvocationCommand::Request(request) = command {
        return request_invocation(state, invocation_id(), request, now);
    }
    let Some(request) = &state.request else {
        return Err(DomainError::InvocationNotFound);
    };
    if state.status.is_terminal() {
        return Err(match (&command, &state.status) {
            // A decision that came too late, or after the one that counted: said as such,
            // not as the orchestrator's reuse of a finished id.
            (InvocationCommand::Approve { by } | InvocationCommand::Deny { by, .. }, _)
                if by.as_str() != request.user_id =>
            {
                DomainError::ApprovalNotYours
            }
            (
                InvocationCommand::Approve { .. } | InvocationCommand::Deny { .. },
                InvocationStatus::Expired,
            ) => DomainError::ApprovalExpired,
            (InvocationCommand::Approve { .. } | InvocationCommand::Deny { .. }, _) => {
                DomainError::InvocationNotAwaitingApproval
            }
            _ => DomainError::InvocationFinished,
        });
    }
    match command {
        InvocationCommand::Request(_) => Ok(vec![]), // handled above
        InvocationCommand::Approve { by } => {
            if by.as_str() != request.user_id {
                return Err(DomainError::ApprovalNotYours);
            }
            match &state.status {
                InvocationStatus::AwaitingApproval { expires_at } => {
                    if now >= *expires_at {
                        return Err(DomainError::ApprovalExpired);
                    }
                    Ok(vec![Event::InvocationApproved(pb::InvocationApproved {
                        invocation_id: invocation_id(),
                        approved_by: by.as_str().to_owned(),
                    })])
                }
                // A replayed approval.
                InvocationStatus::Ready {
                    approved_by: Some(approver),
                } if approver == by.as_str() => Ok(vec![]),
                _ => Err(DomainError::InvocationNotAwaitingApproval),
            }
        }
        InvocationCommand::Deny {
            by,
            reason,
            withdrawn,
        } => {
            if by.as_str() != request.user_id {
                return Err(DomainError::ApprovalNotYours);
            }
            match &state.status {
                InvocationStatus::AwaitingApproval { .. } => {
                    Ok(vec![Event::InvocationDenied(pb::InvocationDenied {
                        invocation_id: invocation_id(),
                        denied_by: by.as_str().to_owned(),
                        reason,
                        withdrawn,
                    })])
                }
                _ => Err(DomainError::InvocationNotAwaitingApproval),
            }
        }
        InvocationCommand::Expire => match &state.status {
            InvocationStatus::AwaitingApproval { expires_at } if now >= *expires_at => {
                Ok(vec![Event::InvocationExpired(pb::InvocationExpired {
                    invocation_id: invocation_id(),
                })])
            }
            InvocationStatus::AwaitingApproval { .. } => Err(DomainError::ApprovalNotExpired),
            _ => Err(DomainError::InvocationNotAwaitingApproval),
        },
        InvocationCommand::Start => match &state.status {
            InvocationStatus::Ready { .. } => {
                Ok(vec![Event::InvocationStarted(pb::InvocationStarted {
                    invocation_id: invocation_id(),
                })])
            }
            InvocationStatus::AwaitingApproval { .. } => {
                Err(DomainError::InvocationAwaitingApproval)
            }
            _ => Err(DomainError::InvocationAlreadyStarted),
        },
        InvocationCommand::Complete {
            is_error,
            duration_ms,
            result_size_bytes,
            result_sha256,
            truncated,
            result_json,
            result_held_by,
        } => match &state.status {
            InvocationStatus::Running => {
                Ok(vec![Event::InvocationCompleted(pb::InvocationCompleted {
                    invocation_id: invocation_id(),
                    is_error,
                    duration_ms,
                    result_size_bytes,
                    result_sha256,
                    truncated,
                    result_json,
                    result_held_by,
                })])
            }
            _ => Err(DomainError::InvocationNotStarted),
        },
        InvocationCommand::Fail {
            error_code,
            message,
            duration_ms,
        } => Ok(vec![Event::InvocationFailed(pb::InvocationFailed {
            invocation_id: invocation_id(),
            error_code,
            message,
            duration_ms,
        })]),
    }
}

/// Why no approval could let a request through now, and why an approved call is not made:
/// the server, the user's setting for the tool and their connection, as they are at the
/// call (not at the request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server was disabled or deleted.
    ServerDisabled,
    /// The user's setting for the tool is Blocked.
    Blocked,
    /// The user has no connection to the server.
    Disconnected,
    /// The server no longer offers the user the tool.
    NotOffered,
}

impl Refusal {
    /// The outcome's reason code.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::ServerDisabled => "server_disabled",
            Refusal::Blocked => "tool_blocked",
            Refusal::Disconnected => "not_connected",
            Refusal::NotOffered => "unknown_tool",
        }
    }
}

/// What is in force for a call of one tool of one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InForce {
    /// The server exists and is enabled.
    pub server_enabled: bool,
    /// The user's setting for the tool; `None`: the tool is not offered to the user (not
    /// connected, or the server no longer lists it).
    pub tool_state: Option<ToolState>,
    /// The user is connected to the server.
    pub connected: bool,
}

/// Why what is in force refuses a call a request asked for earlier (`None`: it may go
/// ahead). A tool set to Always allow or Needs approval is callable once approved: the
/// approval is the user's answer to Needs approval.
pub fn refusal(in_force: InForce) -> Option<Refusal> {
    if !in_force.server_enabled {
        return Some(Refusal::ServerDisabled);
    }
    match (in_force.tool_state, in_force.connected) {
        (Some(ToolState::Blocked), _) => Some(Refusal::Blocked),
        (Some(_), _) => None,
        (None, false) => Some(Refusal::Disconnected),
        (None, true) => Some(Refusal::NotOffered),
    }
}

/// Whether a request repeats the recorded one: same user, exposed tool name and arguments
/// (by digest when both have one; the arguments themselves may not have been recorded) —
/// what the caller sent. Not what the name resolved to: a retry after the server was deleted
/// or its tools changed, or one that reaches a process whose read models are a moment behind,
/// is the same request, and gets the recorded outcome.
fn same_request(recorded: &pb::InvocationRequested, request: &pb::InvocationRequested) -> bool {
    let same_arguments =
        if recorded.arguments_sha256.is_empty() || request.arguments_sha256.is_empty() {
            recorded.arguments_json == request.arguments_json
        } else {
            recorded.arguments_sha256 == request.arguments_sha256
                && recorded.arguments_size_bytes == request.arguments_size_bytes
        };
    same_arguments
        && recorded.invocation_id == request.invocation_id
        && recorded.user_id == request.user_id
        && recorded.exposed_tool_name == request.exposed_tool_name
}

fn request_invocation(
    state: &InvocationState,
    invocation_id: String,
    request: InvocationRequest,
    now: SystemTime,
) -> Result<Vec<Event>, DomainError> {
    let exposed_tool_name =
        if request.exposed_tool_name.chars().count() > MAX_RECORDED_EXPOSED_NAME_CHARS {
            request
                .exposed_tool_name
                .chars()
                .take(MAX_RECORDED_EXPOSED_NAME_CHARS)
                .collect()
        } else {
            request.exposed_tool_name
        };
    let needs_approval = request
        .resolved
        .as_ref()
        .is_some_and(|tool| tool.tool_state == ToolState::NeedsApproval);
    let mut requested = pb::InvocationRequested {
        invocation_id,
        user_id: request.user_id.as_str().to_owned(),
        server_id: request
            .resolved
            .as_ref()
            .map(|r| r.server_id.to_string())
            .unwrap_or_default(),
        tool_name: request
            .resolved
            .as_ref()
            .map(|r| r.tool.as_str().to_owned())
            .unwrap_or_default(),
        exposed_tool_name,
        conversation_id: request
            .conversation_id
            .chars()
            .take(MAX_RECORDED_EXPOSED_NAME_CHARS)
            .collect(),
        arguments_json: request.arguments_json,
        arguments_sha256: request.arguments_sha256,
        arguments_size_bytes: request.arguments_size_bytes,
        started: false,
        deadline_ms: request
            .deadline
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    };
    if let Some(recorded) = &state.request {
        return if same_request(recorded, &requested) {
            Ok(vec![])
        } else {
            Err(DomainError::InvocationIdReused)
        };
    }

    let rejection = match &request.resolved {
        None => Some(DomainError::UnknownTool),
        Some(tool) if !tool.server_enabled => Some(DomainError::ServerDisabled),
        Some(tool) if tool.connection_auth_error => Some(DomainError::ConnectionAuthError),
        Some(tool) if !tool.connected => Some(DomainError::NotConnected),
        Some(tool) if tool.tool_state == ToolState::Blocked => Some(DomainError::ToolBlocked),
        Some(_) if needs_approval && request.approvals_full => {
            Some(DomainError::TooManyPendingApprovals)
        }
        Some(_) => None,
    };
    // An allowed request is called at once: it records its start too, so that the claim
    // is the one append before the call (see the proto's `started`).
    requested.started = rejection.is_none() && !needs_approval;
    // Without payload capture the log keeps only the arguments' digest and size, also while
    // an invocation waits for approval: the invoker keeps those arguments in the vault until
    // the user decides (the audit log must not hold payloads nobody chose to capture).
    if !request.capture_arguments {
        requested.arguments_json.clear();
    }
    // Checked before anything is recorded, so a bad time-out records nothing.
    let approval_expires_at = if rejection.is_none() && needs_approval {
        if request.approval_timeout.is_zero() {
            return Err(DomainError::ApprovalTimeoutInvalid);
        }
        Some(
            now.checked_add(request.approval_timeout)
                .ok_or(DomainError::ApprovalTimeoutInvalid)?,
        )
    } else {
        None
    };

    let invocation_id = requested.invocation_id.clone();
    let mut events = Vec::with_capacity(2);
    events.push(Event::InvocationRequested(requested));
    if let Some(reason) = rejection {
        events.push(Event::InvocationRejected(pb::InvocationRejected {
            invocation_id,
            reason_code: reason.code().to_owned(),
            message: reason.to_string(),
        }));
    } else if let Some(expires_at) = approval_expires_at {
        events.push(Event::InvocationAwaitingApproval(
            pb::InvocationAwaitingApproval {
                invocation_id,
                approval_expires_at: Some(to_timestamp(expires_at)),
            },
        ));
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::testing::Scenario;

    const INVOCATION: &str = "0190f3c4-a8b2-7c3d-9e1f-00000000000a";
    const SERVER: &str = "0190f3c4-a8b2-7c3d-9e1f-0123456789ab";

    fn id() -> InvocationId {
        InvocationId::parse(INVOCATION).unwrap()
    }

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn alice() -> UserId {
        UserId::parse("alice@example.com").unwrap()
    }

    fn resolved(tool_state: ToolState) -> ResolvedTool {
        ResolvedTool {
            server_id: ServerId::parse(SERVER).unwrap(),
            tool: ToolName::parse("create_issue").unwrap(),
            server_enabled: true,
            connected: true,
            connection_auth_error: false,
            tool_state,
        }
    }

    fn request_with(resolved: Option<ResolvedTool>) -> InvocationCommand {
        InvocationCommand::Request(InvocationRequest {
            user_id: alice(),
            exposed_tool_name: "github__create_issue".into(),
            arguments_json: r#"{"title":"Bug"}"#.into(),
            arguments_sha256: String::new(),
            arguments_size_bytes: 15,
            capture_arguments: true,
            resolved,
            approval_timeout: Duration::from_secs(300),
            approvals_full: false,
            deadline: Some(Duration::from_secs(5)),
            conversation_id: "conv_1".into(),
        })
    }

    fn request(tool_state: ToolState) -> InvocationCommand {
        request_with(Some(resolved(tool_state)))
    }

    fn requested() -> Event {
        Event::InvocationRequested(pb::InvocationRequested {
            invocation_id: INVOCATION.into(),
            user_id: "alice@example.com".into(),
            server_id: SERVER.into(),
            tool_name: "create_issue".into(),
            exposed_tool_name: "github__create_issue".into(),
            arguments_json: r#"{"title":"Bug"}"#.into(),
            arguments_sha256: String::new(),
            arguments_size_bytes: 15,
            started: false,
            // The deadline the orchestrator asked for, kept for an approved call.
            deadline_ms: 5_000,
            conversation_id: "conv_1".into(),
        })
    }

    /// An allowed request, started with it.
    fn requested_and_started() -> Event {
        match requested() {
            Event::InvocationRequested(requested) => {
                Event::InvocationRequested(pb::InvocationRequested {
                    started: true,
                    ..requested
                })
            }
            _ => unreachable!(),
        }
    }

    fn rejected(error: DomainError) -> Event {
        Event::InvocationRejected(pb::InvocationRejected {
            invocation_id: INVOCATION.into(),
            reason_code: error.code().into(),
            message: error.to_string(),
        })
    }

    fn awaiting(expires: u64) -> Event {
        Event::InvocationAwaitingApproval(pb::InvocationAwaitingApproval {
            invocation_id: INVOCATION.into(),
            approval_expires_at: Some(to_timestamp(at(expires))),
        })
    }

    fn approved() -> Event {
        Event::InvocationApproved(pb::InvocationApproved {
            invocation_id: INVOCATION.into(),
            approved_by: "alice@example.com".into(),
        })
    }

    fn started() -> Event {
        Event::InvocationStarted(pb::InvocationStarted {
            invocation_id: INVOCATION.into(),
        })
    }

    fn completed() -> Event {
        Event::InvocationCompleted(pb::InvocationCompleted {
            invocation_id: INVOCATION.into(),
            is_error: false,
            duration_ms: 120,
            result_size_bytes: 512,
            result_sha256: "ab".repeat(32),
            truncated: false,
            result_json: String::new(),
            result_held_by: String::new(),
        })
    }

    fn complete() -> InvocationCommand {
        InvocationCommand::Complete {
            is_error: false,
            duration_ms: 120,
            result_size_bytes: 512,
            result_sha256: "ab".repeat(32),
            truncated: false,
            result_json: String::new(),
            result_held_by: String::new(),
        }
    }

    fn fail() -> InvocationCommand {
        InvocationCommand::Fail {
            error_code: "mcp_timeout".into(),
            message: "the server did not answer in 30 s".into(),
            duration_ms: 30_000,
        }
    }

    fn failed() -> Event {
        Event::InvocationFailed(pb::InvocationFailed {
            invocation_id: INVOCATION.into(),
            error_code: "mcp_timeout".into(),
            message: "the server did not answer in 30 s".into(),
            duration_ms: 30_000,
        })
    }

    fn decide_at(
        seconds: u64,
        command: InvocationCommand,
    ) -> impl FnOnce(&InvocationState) -> Result<Vec<Event>, DomainError> {
        move |state| decide(state, &id(), command, at(seconds))
    }

    #[test]
    fn an_always_allowed_tool_starts_with_its_request() {
        let state = Scenario::<InvocationState>::given([])
            .when(decide_at(1_000, request(ToolState::AlwaysAllow)))
            .then([requested_and_started()]);
        assert_eq!(state.status(), &InvocationStatus::Running);
        Scenario::<InvocationState>::given([requested_and_started()])
            .when(decide_at(1_001, InvocationCommand::Start))
            .then_error("invocation_already_started");
        Scenario::<InvocationState>::given([requested_and_started()])
            .when(decide_at(1_002, complete()))
            .then([completed()]);
    }

    #[test]
    fn a_retry_is_the_same_request_whatever_its_name_resolves_to_now() {
        // The server was deleted since (the name resolves to nothing), or the retry reached
        // a process whose read models lag: still the request recorded, not a reuse.
        Scenario::<InvocationState>::given([requested_and_started(), completed()])
            .when(decide_at(1_005, request_with(None)))
            .then([]);
        let InvocationCommand::Request(mut other_arguments) = request(ToolState::AlwaysAllow)
        else {
            unreachable!()
        };
        other_arguments.arguments_json = r#"{"title":"Other"}"#.into();
        other_arguments.arguments_size_bytes = 17;
        Scenario::<InvocationState>::given([requested_and_started(), completed()])
            .when(decide_at(
                1_005,
                InvocationCommand::Request(other_arguments),
            ))
            .then_error("invocation_id_reused");
    }

    #[test]
    fn an_allowed_request_of_an_earlier_version_is_ready_and_starts_once() {
        // Recorded before requests recorded their start: ready, then `InvocationStarted`.
        let state = Scenario::<InvocationState>::given([requested()])
            .when(decide_at(1_001, InvocationCommand::Start))
            .then([started()]);
        assert_eq!(state.status(), &InvocationStatus::Running);
    }

    #[test]
    fn a_connection_with_an_auth_error_rejects_invocations() {
        let tool = ResolvedTool {
            connection_auth_error: true,
            ..resolved(ToolState::AlwaysAllow)
        };
        Scenario::<InvocationState>::given([])
            .when(decide_at(1_000, request_with(Some(tool))))
            .then([requested(), rejected(DomainError::ConnectionAuthError)]);
    }

    #[test]
    fn arguments_are_recorded_only_when_captured() {
        let without_capture = |state: ToolState| {
            let InvocationCommand::Request(mut request) = request(state) else {
                unreachable!()
            };
            request.capture_arguments = false;
            request.arguments_sha256 = "cd".repeat(32);
            InvocationCommand::Request(request)
        };
        let recorded = |state: ToolState| {
            let (events, _) = Scenario::<InvocationState>::given([])
                .when(decide_at(1_000, without_capture(state)))
                .then_events();
            match events.first() {
                Some(Event::InvocationRequested(r)) => r.clone(),
                other => panic!("{other:?}"),
            }
        };
        let allowed = recorded(ToolState::AlwaysAllow);
        assert_eq!(allowed.arguments_json, "");
        assert_eq!(allowed.arguments_sha256, "cd".repeat(32));
        assert_eq!(allowed.arguments_size_bytes, 15);
        assert_eq!(recorded(ToolState::Blocked).arguments_json, "");
        let awaiting = recorded(ToolState::NeedsApproval);
        assert_eq!(awaiting.arguments_json, "");
        assert_eq!(awaiting.arguments_sha256, "cd".repeat(32));
        // A repeat is recognised by the digest, though the arguments were not recorded.
        let history = vec![Event::InvocationRequested(allowed)];
        Scenario::<InvocationState>::given(history)
            .when(decide_at(1_001, without_capture(ToolState::AlwaysAllow)))
            .then_nothing();
    }

    /// A user whose approvals are full gets no more requests to decide: one that would wait
    /// is rejected; an allowed one is not held up by the approvals.
    #[test]
    fn a_request_that_would_wait_is_rejected_while_the_users_approvals_are_full() {
        let with_approvals_full = |state| {
            let InvocationCommand::Request(mut request) = request(state) else {
                unreachable!("a request")
            };
            request.approvals_full = true;
            InvocationCommand::Request(request)
        };
        Scenario::<InvocationState>::given([])
            .when(decide_at(
                1_000,
                with_approvals_full(ToolState::NeedsApproval),
            ))
            .then([requested(), rejected(DomainError::TooManyPendingApprovals)]);
        let mut started = requested();
        if let Event::InvocationRequested(requested) = &mut started {
            requested.started = true;
        }
        Scenario::<InvocationState>::given([])
            .when(decide_at(
                1_000,
                with_approvals_full(ToolState::AlwaysAllow),
            ))
            .then([started]);
    }

    /// What is in force at the call decides, the server first.
    #[test]
    fn a_call_asked_for_earlier_is_refused_by_what_is_in_force_now() {
        let in_force = |server_enabled, tool_state, connected| InForce {
            server_enabled,
            tool_state,
            connected,
        };
        for (facts, refused) in [
            (
                in_force(false, Some(ToolState::AlwaysAllow), true),
                Some(Refusal::ServerDisabled),
            ),
            (
                in_force(true, Some(ToolState::Blocked), true),
                Some(Refusal::Blocked),
            ),
            (in_force(true, None, false), Some(Refusal::Disconnected)),
            (in_force(true, None, true), Some(Refusal::NotOffered)),
            (in_force(true, Some(ToolState::NeedsApproval), true), None),
            (in_force(true, Some(ToolState::AlwaysAllow), true), None),
        ] {
            assert_eq!(refusal(facts), refused, "{facts:?}");
        }
        assert_eq!(Refusal::Blocked.code(), DomainError::ToolBlocked.code());
        assert_eq!(
            Refusal::Disconnected.code(),
            DomainError::NotConnected.code()
        );
        assert_eq!(Refusal::NotOffered.code(), DomainError::UnknownTool.code());
        assert_eq!(
            Refusal::ServerDisabled.code(),
            DomainError::ServerDisabled.code()
        );
    }

    #[test]
    fn blocked_tool_is_rejected() {
        Scenario::<InvocationState>::given([])
            .when(decide_at(1_000, request(ToolState::Blocked)))
            .then([requested(), rejected(DomainError::ToolBlocked)]);
    }

    #[test]
    fn disabled_server_rejects_invocations() {
        let tool = ResolvedTool {
            server_enabled: false,
            ..resolved(ToolState::AlwaysAllow)
        };
        let state = Scenario::<InvocationState>::given([])
            .when(decide_at(1_000, request_with(Some(tool))))
            .then([requested(), rejected(DomainError::ServerDisabled)]);
        assert!(state.status().is_terminal());
    }

    #[test]
    fn invocation_without_a_connection_is_rejected() {
        let tool = ResolvedTool {
            connected: false,
            ..resolved(ToolState::AlwaysAllow)
        };
        Scenario::<InvocationState>::given([])
            .when(decide_at(1_000, request_with(Some(tool))))
            .then([requested(), rejected(DomainError::NotConnected)]);
    }

    #[test]
    fn unknown_tool_is_rejected_and_the_name_the_ai_used_is_recorded() {
        let unknown = Event::InvocationRequested(pb::InvocationRequested {
            server_id: String::new(),
            tool_name: String::new(),
            ..match requested() {
                Event::InvocationRequested(r) => r,
                _ => unreachable!(),
            }
        });
        Scenario::<InvocationState>::given([])
            .when(decide_at(1_000, request_with(None)))
            .then([unknown, rejected(DomainError::UnknownTool)]);
    }

    #[test]
    fn needs_approval_tool_waits_for_the_user_until_the_timeout() {
        let state = Scenario::<InvocationState>::given([])
            .when(decide_at(1_000, request(ToolState::NeedsApproval)))
            .then([requested(), awaiting(1_300)]);
        assert_eq!(
            state.status(),
            &InvocationStatus::AwaitingApproval {
                expires_at: at(1_300)
            }
        );
    }

    #[test]
    fn approval_timeout_must_be_usable() {
        let InvocationCommand::Request(mut zero) = request(ToolState::NeedsApproval) else {
            unreachable!()
        };
        zero.approval_timeout = Duration::ZERO;
        Scenario::<InvocationState>::given([])
            .when(decide_at(1_000, InvocationCommand::Request(zero)))
            .then_error("approval_timeout_invalid");
        let InvocationCommand::Request(mut huge) = request(ToolState::NeedsApproval) else {
            unreachable!()
        };
        huge.approval_timeout = Duration::MAX;
        Scenario::<InvocationState>::given([])
            .when(decide_at(1_000, InvocationCommand::Request(huge)))
            .then_error("approval_timeout_invalid");
    }

    #[test]
    fn the_user_approves_and_the_invocation_becomes_ready() {
        let state = Scenario::<InvocationState>::given([requested(), awaiting(1_300)])
            .when(decide_at(1_100, InvocationCommand::Approve { by: alice() }))
            .then([approved()]);
        assert_eq!(
            state.status(),
            &InvocationStatus::Ready {
                approved_by: Some("alice@example.com".into())
            }
        );
        Scenario::<InvocationState>::given([requested(), awaiting(1_300), approved()])
            .when(decide_at(1_101, InvocationCommand::Start))
            .then([started()]);
    }

    #[test]
    fn replayed_approval_records_nothing() {
        Scenario::<InvocationState>::given([requested(), awaiting(1_300), approved()])
            .when(decide_at(1_101, InvocationCommand::Approve { by: alice() }))
            .then_nothing();
    }

    #[test]
    fn only_the_invocations_user_can_approve_or_deny() {
        let mallory = UserId::parse("mallory@example.com").unwrap();
        Scenario::<InvocationState>::given([requested(), awaiting(1_300)])
            .when(decide_at(
                1_100,
                InvocationCommand::Approve {
                    by: mallory.clone(),
                },
            ))
            .then_error("approval_not_yours");
        Scenario::<InvocationState>::given([requested(), awaiting(1_300)])
            .when(decide_at(
                1_100,
                InvocationCommand::Deny {
                    by: mallory,
                    reason: String::new(),
                    withdrawn: false,
                },
            ))
            .then_error("approval_not_yours");
    }

    #[test]
    fn approval_after_the_deadline_is_refused() {
        Scenario::<InvocationState>::given([requested(), awaiting(1_300)])
            .when(decide_at(1_300, InvocationCommand::Approve { by: alice() }))
            .then_error("approval_expired");
    }

    #[test]
    fn only_an_awaiting_invocation_can_be_approved() {
        Scenario::<InvocationState>::given([requested()])
            .when(decide_at(1_100, InvocationCommand::Approve { by: alice() }))
            .then_error("invocation_not_awaiting_approval");
        Scenario::<InvocationState>::given([])
            .when(decide_at(1_100, InvocationCommand::Approve { by: alice() }))
            .then_error("invocation_not_found");
    }

    #[test]
    fn the_user_denies_and_the_invocation_ends() {
        let state = Scenario::<InvocationState>::given([requested(), awaiting(1_300)])
            .when(decide_at(
                1_100,
                InvocationCommand::Deny {
                    by: alice(),
                    reason: "not now".into(),
                    withdrawn: false,
                },
            ))
            .then([Event::InvocationDenied(pb::InvocationDenied {
                invocation_id: INVOCATION.into(),
                denied_by: "alice@example.com".into(),
                reason: "not now".into(),
                withdrawn: false,
            })]);
        assert_eq!(state.status(), &InvocationStatus::Denied);
    }

    #[test]
    fn the_orchestrator_withdraws_a_request_once_and_only_while_it_waits() {
        let withdraw = || InvocationCommand::Deny {
            by: alice(),
            reason: String::new(),
            withdrawn: true,
        };
        let state = Scenario::<InvocationState>::given([requested(), awaiting(1_300)])
            .when(decide_at(1_100, withdraw()))
            .then([Event::InvocationDenied(pb::InvocationDenied {
                invocation_id: INVOCATION.into(),
                denied_by: "alice@example.com".into(),
                reason: String::new(),
                withdrawn: true,
            })]);
        assert_eq!(state.status(), &InvocationStatus::Denied);
        let withdrawn = Event::InvocationDenied(pb::InvocationDenied {
            invocation_id: INVOCATION.into(),
            denied_by: "alice@example.com".into(),
            reason: String::new(),
            withdrawn: true,
        });
        Scenario::<InvocationState>::given([requested(), awaiting(1_300), withdrawn])
            .when(decide_at(1_100, withdraw()))
            .then_error("invocation_not_awaiting_approval");
        // Nothing to withdraw from an allowed request: it is called already.
        Scenario::<InvocationState>::given([requested()])
            .when(decide_at(1_100, withdraw()))
            .then_error("invocation_not_awaiting_approval");
    }

    #[test]
    fn an_unanswered_approval_expires_only_after_its_deadline() {
        Scenario::<InvocationState>::given([requested(), awaiting(1_300)])
            .when(decide_at(1_299, InvocationCommand::Expire))
            .then_error("approval_not_expired");
        let state = Scenario::<InvocationState>::given([requested(), awaiting(1_300)])
            .when(decide_at(1_300, InvocationCommand::Expire))
            .then([Event::InvocationExpired(pb::InvocationExpired {
                invocation_id: INVOCATION.into(),
            })]);
        assert_eq!(state.status(), &InvocationStatus::Expired);
        Scenario::<InvocationState>::given([requested()])
            .when(decide_at(1_300, InvocationCommand::Expire))
            .then_error("invocation_not_awaiting_approval");
    }

    #[test]
    fn an_invocation_awaiting_approval_cannot_start() {
        Scenario::<InvocationState>::given([requested(), awaiting(1_300)])
            .when(decide_at(1_100, InvocationCommand::Start))
            .then_error("invocation_awaiting_approval");
    }

    #[test]
    fn an_invocation_starts_at_most_once() {
        Scenario::<InvocationState>::given([requested()])
            .when(decide_at(1_001, InvocationCommand::Start))
            .then([started()]);
        Scenario::<InvocationState>::given([requested(), started()])
            .when(decide_at(1_002, InvocationCommand::Start))
            .then_error("invocation_already_started");
    }

    #[test]
    fn a_started_invocation_completes_with_exactly_one_terminal_event() {
        let state = Scenario::<InvocationState>::given([requested(), started()])
            .when(decide_at(1_002, complete()))
            .then([completed()]);
        assert_eq!(
            state.status(),
            &InvocationStatus::Completed { is_error: false }
        );
        for command in [complete(), fail(), InvocationCommand::Start] {
            Scenario::<InvocationState>::given([requested(), started(), completed()])
                .when(decide_at(1_003, command))
                .then_error("invocation_finished");
        }
    }

    #[test]
    fn a_result_cannot_be_recorded_before_the_start() {
        Scenario::<InvocationState>::given([requested()])
            .when(decide_at(1_001, complete()))
            .then_error("invocation_not_started");
    }

    #[test]
    fn a_started_invocation_can_fail() {
        let state = Scenario::<InvocationState>::given([requested(), started()])
            .when(decide_at(1_031, fail()))
            .then([failed()]);
        assert!(state.status().is_terminal());
    }

    #[test]
    fn an_invocation_can_fail_before_it_starts() {
        Scenario::<InvocationState>::given([requested()])
            .when(decide_at(1_001, fail()))
            .then([failed()]);
        Scenario::<InvocationState>::given([requested(), awaiting(1_300)])
            .when(decide_at(1_001, fail()))
            .then([failed()]);
    }

    #[test]
    fn every_command_after_a_terminal_event_is_refused() {
        let terminal_histories = [
            vec![requested(), rejected(DomainError::ToolBlocked)],
            vec![requested(), awaiting(1_300), {
                Event::InvocationExpired(pb::InvocationExpired {
                    invocation_id: INVOCATION.into(),
                })
            }],
            vec![requested(), started(), failed()],
        ];
        for (history, too_late_decision) in terminal_histories.into_iter().zip([
            "invocation_not_awaiting_approval",
            // The approval lost to its expiry: the window closed, which is what it says.
            "approval_expired",
            "invocation_not_awaiting_approval",
        ]) {
            for command in [
                InvocationCommand::Expire,
                InvocationCommand::Start,
                complete(),
                fail(),
            ] {
                Scenario::<InvocationState>::given(history.clone())
                    .when(decide_at(2_000, command))
                    .then_error("invocation_finished");
            }
            for decision in [
                InvocationCommand::Approve { by: alice() },
                InvocationCommand::Deny {
                    by: alice(),
                    reason: String::new(),
                    withdrawn: false,
                },
            ] {
                Scenario::<InvocationState>::given(history.clone())
                    .when(decide_at(2_000, decision))
                    .then_error(too_late_decision);
            }
            let bob = UserId::parse("bob@example.com").unwrap();
            Scenario::<InvocationState>::given(history.clone())
                .when(decide_at(2_000, InvocationCommand::Approve { by: bob }))
                .then_error("approval_not_yours");
        }
    }

    #[test]
    fn replayed_request_records_nothing_and_a_reused_id_is_refused() {
        for history in [
            vec![requested()],
            vec![requested_and_started()],
            vec![requested(), started(), completed()],
        ] {
            Scenario::<InvocationState>::given(history)
                .when(decide_at(1_001, request(ToolState::AlwaysAllow)))
                .then_nothing();
        }
        let InvocationCommand::Request(mut other) = request(ToolState::AlwaysAllow) else {
            unreachable!()
        };
        other.arguments_json = r#"{"title":"Other"}"#.into();
        Scenario::<InvocationState>::given([requested()])
            .when(decide_at(1_001, InvocationCommand::Request(other)))
            .then_error("invocation_id_reused");
    }

    #[test]
    fn replay_picks_one_invocation_out_of_a_shared_subject() {
        let other = "0190f3c4-a8b2-7c3d-9e1f-00000000000b";
        let other_requested = Event::InvocationRequested(pb::InvocationRequested {
            invocation_id: other.into(),
            ..match requested() {
                Event::InvocationRequested(r) => r,
                _ => unreachable!(),
            }
        });
        let other_started = Event::InvocationStarted(pb::InvocationStarted {
            invocation_id: other.into(),
        });
        let stream = [other_requested, requested(), other_started, started()];
        let state = InvocationState::replay(&id(), &stream);
        assert_eq!(state.status(), &InvocationStatus::Running);
        assert_eq!(
            state.request().map(|r| r.invocation_id.as_str()),
            Some(INVOCATION)
        );
        // A plain fold keeps the first invocation and ignores the others' events.
        let plain = InvocationState::from_events(&stream[1..]);
        assert_eq!(plain.status(), &InvocationStatus::Running);
        assert_eq!(invocation_id_of(&started()), Some(INVOCATION));
        assert_eq!(subject(&alice()), "invocation.alice_40example_2Ecom");
    }

    #[test]
    fn what_an_event_settles_has_one_id_per_user_invocation_and_kind() {
        use std::collections::HashSet;
        let bob = UserId::parse("bob@example.com").unwrap();
        let other = InvocationId::parse("toolu_other").unwrap();
        let mut ids = HashSet::new();
        for user in [&alice(), &bob] {
            for invocation in [&id(), &other] {
                for settles in [Settles::Claim, Settles::Decision, Settles::Outcome] {
                    let event_id = settling_event_id(user, invocation, settles);
                    // The same every time, whoever derives it.
                    assert_eq!(event_id, settling_event_id(user, invocation, settles));
                    let parsed = uuid::Uuid::parse_str(&event_id).expect("a UUID");
                    assert_eq!(parsed.get_version_num(), 8);
                    ids.insert(event_id);
                }
            }
        }
        assert_eq!(
            ids.len(),
            12,
            "distinct across users, invocations and kinds"
        );
        assert_eq!(Settles::of(&requested()), Some(Settles::Claim));
        assert_eq!(Settles::of(&started()), None);
    }

    #[test]
    fn a_very_long_tool_name_or_conversation_id_is_recorded_cut() {
        let command = InvocationCommand::Request(InvocationRequest {
            user_id: alice(),
            exposed_tool_name: "x".repeat(10_000),
            arguments_json: "{}".into(),
            arguments_sha256: String::new(),
            arguments_size_bytes: 2,
            capture_arguments: false,
            resolved: None,
            approval_timeout: Duration::from_secs(300),
            approvals_full: false,
            deadline: None,
            conversation_id: "c".repeat(10_000),
        });
        let (events, _) = Scenario::<InvocationState>::given([])
            .when(decide_at(1_000, command))
            .then_events();
        let Some(Event::InvocationRequested(requested)) = events.first() else {
            panic!("{events:?}")
        };
        assert_eq!(requested.exposed_tool_name.len(), 256);
        assert_eq!(requested.conversation_id.len(), 256);
    }
}
