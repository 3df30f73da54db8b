//! The invoker's commands: list a user's tools, invoke one, look an invocation up, decide an
//! approval.
//!
//! - `tools`: the tools a user may use now, and what an exposed name resolves to;
//! - `invoke`: a request claimed once, then rejected, left waiting, or called; duplicates join;
//! - `call`: the upstream call within its deadline, withdrawable, and its outcome recorded;
//! - `approvals`: the pending approvals, the user's decisions, and what is in force then;
//! - `log`: an invocation's events written, found, read and waited on, and their report.
//!
//! **Where the events are.** A user's invocation events are on one subject,
//! `invocation.<user_key>`, appended with no expected version: one user's parallel
//! invocations never conflict, and the subjects stay as many as the users.
//!
//! **At most once.** What competing writers must not both record — the claim
//! (`InvocationRequested`), the approval decision, the outcome — each writer records under one
//! event id derived from the invocation (`domain::invocation::settling_event_id`). The log
//! stores an event id once and answers every later append of it with where it is; reading
//! it there, a writer sees by the envelope's `write_id` whether it is its own. So of any
//! number of requests with one id — retries, concurrent duplicates, other processes, after a
//! restart — exactly one is stored and only its request goes on; one decision is recorded;
//! the sweeper closing a stalled invocation and its owner never both record an outcome. The
//! log remembers event ids for its dedupe window; a request repeating an id after that finds
//! it in the open invocations read model, which knows every invocation open or finished within
//! the claim window (a setting, six hours by default), and is checked before the claim is
//! appended. A duplicate checks
//! that it is the same request (`invocation_id_reused` otherwise) and waits for the recorded
//! outcome.
//!
//! **Two appends per call.** An allowed request records its start (`started`), so an allowed
//! invocation is the claim, the call, and its outcome: one append before the call and one
//! after it.
//!
//! **No history on the hot path.** Invoking reads nothing from the log; loading an
//! invocation (a duplicate, a look-up, a decision) reads its user's subject from its request
//! on — what the user did meanwhile, not their history.

mod approvals;
mod call;
mod finish_on_drop;
mod invoke;
mod log;
mod tools;

use std::{sync::Arc, time::Duration};

use domain::{Aggregate, Event};
use domain::{
    InvocationId, UserId,
    invocation::{self, InvocationState},
    projections::Located,
};
use eventlog::Subject;
use rmcp::model::JsonObject;
use serde::Serialize;
use serde_json::Value;

use crate::{Invoker, InvokerError, ResultEnvelope, ResultServer};
use finish_on_drop::FinishOnDrop;

/// What happened to an invocation. `running` is not final: the call is under way (or the
/// invocation was allowed and is about to start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    Rejected,
    AwaitingApproval,
    Denied,
    Expired,
    Failed,
    Running,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Rejected => "rejected",
            Outcome::AwaitingApproval => "awaiting_approval",
            Outcome::Denied => "denied",
            Outcome::Expired => "expired",
            Outcome::Failed => "failed",
            Outcome::Running => "running",
        }
    }

    /// Whether the outcome is the invocation's last.
    pub fn is_final(self) -> bool {
        !matches!(self, Outcome::AwaitingApproval | Outcome::Running)
    }
}

/// An invocation's outcome as the orchestrator receives it.
#[derive(Debug, Clone, Serialize)]
pub struct InvocationReport {
    pub invocation_id: String,
    pub outcome: Outcome,
    /// Why it was rejected or failed: a stable code (`tool_blocked`, `unknown_tool`,
    /// `server_disabled`, `not_connected`, `auth_error`, `deadline_exceeded`,
    /// `server_unreachable`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A sentence about the reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The tool's answer (completed only), untrusted. Absent when this process no longer
    /// holds it and payloads are not captured: the events keep only its digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Arc<ResultEnvelope>>,
}

/// A tool call request from the orchestrator.
#[derive(Debug, Clone)]
pub struct InvokeRequest {
    pub invocation_id: InvocationId,
    pub user: UserId,
    /// The exposed name the AI used.
    pub tool: String,
    pub arguments: JsonObject,
    /// How long the call may take; `None`: the default.
    pub deadline: Option<Duration>,
    /// The orchestrator's conversation the call belongs to (recorded for the audit).
    pub conversation_id: Option<String>,
}

/// One of the tools a user may use now.
#[derive(Debug, Clone, Serialize)]
pub struct ToolListing {
    /// The exposed name: what the AI calls it by.
    pub name: String,
    /// Its name on the server.
    pub tool_name: String,
    pub server: ToolServer,
    pub title: String,
    pub description: String,
    pub input_schema: Value,
    pub output_schema: Option<Value>,
    pub annotations: Option<Value>,
    /// `always_allow` or `needs_approval`.
    pub state: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct ToolServer {
    pub id: String,
    pub name: String,
    /// The admin's description: context for the AI.
    pub description: String,
}

/// An invocation waiting for its user's decision.
#[derive(Debug, Clone)]
pub struct PendingApproval {
    pub invocation_id: String,
    /// The exposed name the AI used.
    pub tool: String,
    pub tool_name: String,
    /// What the user decides on beyond the name, as the server describes the tool now
    /// (`None` once it no longer offers it).
    pub tool_context: Option<PendingToolContext>,
    pub server: ResultServer,
    /// The arguments the user decides on.
    pub arguments: Value,
    /// The orchestrator's conversation the request came from (empty: none given).
    pub conversation_id: String,
    pub requested_at: std::time::SystemTime,
    pub expires_at: std::time::SystemTime,
}

/// The tool a pending approval would call, as its server describes it now.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingToolContext {
    pub title: String,
    pub description: String,
    /// `read_only` or `write_delete` (from the tool's annotations; see the tool settings).
    pub category: &'static str,
    /// The annotations in MCP's spelling (`destructiveHint`, …): the server's hints, never a
    /// reason to approve.
    pub annotations: Option<Value>,
    /// The tool's definition changed since the user last set it.
    pub changed: bool,
    /// The current definition's hash: a setting sent with it (`PUT …/tools/{tool}`) applies
    /// only to the definition the user saw.
    pub definition_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Approve,
    /// With the user's reason for the AI (empty: none), at most
    /// [`MAX_DENIAL_REASON_CHARS`] characters; the outcome's `message` carries it.
    Deny {
        reason: String,
    },
    /// The orchestrator, acting for the user, no longer wants the call (the conversation
    /// moved on): the request leaves the user's approvals, `denied` with `withdrawn`.
    Withdraw,
}

/// The longest reason a user may give a denial, in characters.
pub const MAX_DENIAL_REASON_CHARS: usize = 500;

/// Whether `c` may stand in a denial's reason, which the AI is told as text: anything but
/// control characters, line breaks and tabs aside.
pub(crate) fn fits_a_denial_reason(c: char) -> bool {
    !c.is_control() || c == '\n' || c == '\t'
}

/// What a denial keeps of a reason typed where it cannot be sent back to be corrected (a
/// form in the user's MCP client): trimmed, other control characters as spaces, cut to
/// [`MAX_DENIAL_REASON_CHARS`].
pub fn denial_reason_from(typed: &str) -> String {
    typed
        .trim()
        .chars()
        .map(|c| if fits_a_denial_reason(c) { c } else { ' ' })
        .take(MAX_DENIAL_REASON_CHARS)
        .collect()
}

/// How long a withdrawal waits for the cancelled call's outcome to be recorded.
pub const WITHDRAWAL_WAIT: Duration = Duration::from_secs(10);

/// Records `new` events of an invocation in its `events` and folds them into its `state`.
fn advance(state: &mut InvocationState, events: &mut Vec<Event>, new: Vec<Event>) {
    for event in &new {
        state.apply(event);
    }
    events.extend(new);
}

/// The result a completion event captured, if payloads were captured.
fn captured_result(completed: &proto::v1::InvocationCompleted) -> Option<Arc<ResultEnvelope>> {
    if completed.result_json.is_empty() {
        return None;
    }
    serde_json::from_str(&completed.result_json)
        .ok()
        .map(Arc::new)
}

/// Room kept under the store's largest event for what surrounds a captured payload: the
/// event's other fields, its envelope and a JetStream message's headers.
const EVENT_HEADROOM: usize = 8 * 1024;

/// Where an event that settles something for its invocation was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// This writer's event, at this sequence: it settled it.
    Ours(u64),
    /// A competitor's, at this sequence: it settled it first.
    Theirs(u64),
}

/// Where an invocation's events are: from its request; its terminal event, if finished.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Whereabouts {
    requested_sequence: u64,
    outcome_sequence: Option<u64>,
}

impl From<Located<'_>> for Whereabouts {
    fn from(located: Located<'_>) -> Self {
        Whereabouts {
            requested_sequence: located.requested_sequence(),
            outcome_sequence: match located {
                Located::Open(_) => None,
                Located::Finished(finished) => Some(finished.outcome_sequence),
            },
        }
    }
}

/// The subject of `user`'s invocation events.
pub fn invocation_subject(user: &UserId) -> Result<Subject, InvokerError> {
    Ok(Subject::parse(&invocation::subject(user))?)
}

impl Invoker {
    /// The most bytes of payload (captured arguments or a result) one event of the store
    /// can carry, if it has a limit.
    fn payload_limit(&self) -> Option<usize> {
        self.inner
            .log
            .max_event_bytes()
            .map(|max| max.saturating_sub(EVENT_HEADROOM))
    }

    /// A result's JSON as the store keeps it — captured in its completion event, or handed
    /// over in the vault (on JetStream a message on the log's server): whole, or, when one
    /// event or entry cannot hold it, cut to fit (flagged `truncated`) and `true`. Empty
    /// when not even an empty envelope fits.
    pub(crate) fn storable_result(&self, envelope: &ResultEnvelope) -> (String, bool) {
        let budget = self.payload_limit().unwrap_or(usize::MAX);
        envelope
            .render_within(budget, |envelope| {
                serde_json::to_string(envelope).unwrap_or_default()
            })
            .unwrap_or((String::new(), true))
    }

    pub(crate) fn now(&self) -> std::time::SystemTime {
        self.inner.envelopes.clock().now()
    }

    fn deadline(&self, asked: Option<Duration>) -> Result<Duration, InvokerError> {
        let settings = &self.inner.settings;
        match asked {
            None => Ok(settings.default_deadline.min(settings.max_deadline)),
            Some(d) if d.is_zero() || d > settings.max_deadline => {
                Err(InvokerError::DeadlineInvalid {
                    max_ms: u64::try_from(settings.max_deadline.as_millis()).unwrap_or(u64::MAX),
                })
            }
            Some(d) => Ok(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typed_reason_keeps_its_text_and_lines_and_fits_a_denial() {
        let typed = format!(
            "  Not in\u{7}this project.\n\tAsk Bob.{}  ",
            "x".repeat(600)
        );
        let kept = denial_reason_from(&typed);
        assert!(
            kept.starts_with("Not in this project.\n\tAsk Bob.x"),
            "{kept:?}"
        );
        assert_eq!(kept.chars().count(), MAX_DENIAL_REASON_CHARS);
        assert!(kept.chars().all(fits_a_denial_reason));
    }
}
