//! The invoker's commands: list a user's tools, invoke one, look an invocation up, decide an
//! approval.
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
use std::{
    borrow::Cow,
    sync::Arc,
    time::{Duration, SystemTime},
};

use domain::{Aggregate, Event};
use domain::{
    ApiConnectionStatus, InvocationId, ServerId, ToolState, UserId,
    invocation::{
        self, InForce, InvocationCommand, InvocationRequest, InvocationState, InvocationStatus,
        Refusal, ResolvedTool, Settles, invocation_id_of,
    },
    projections::Located,
};
use eventlog::{EventLogError, ExpectedVersion, LogKind, Subject, SubjectFilter};
use futures_util::StreamExt;
use proto::v1::Envelope;
use rmcp::model::{CallToolResult, JsonObject};
use serde::Serialize;
use serde_json::Value;
use service_kit::CommandContext;
use url::Url;

use crate::{
    Invoker, InvokerError, ResultEnvelope, ResultServer, pending_arguments,
    result::sha256_hex,
    service::{CallToken, RunningCall},
};

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

/// How long a withdrawal waits for the cancelled call's outcome to be recorded.
pub const WITHDRAWAL_WAIT: Duration = Duration::from_secs(10);

/// Why a call ended without the server's answer.
enum CallCut {
    /// Its deadline passed.
    Deadline,
    /// The orchestrator withdrew it.
    Withdrawn,
    /// The orchestrator withdrew it before it went out (after its approval).
    WithdrawnFirst,
}

/// What resolving an exposed name found, beyond the domain's facts.
struct Resolved {
    tool: ResolvedTool,
    server_name: String,
    url: String,
}

/// One upstream call to make, by the invocation's owner.
struct Run {
    context: CommandContext,
    subject: Subject,
    /// The invocation's events so far that its report reads (outcomes and reasons: the
    /// request itself may be left out, `state` holds it).
    events: Vec<Event>,
    /// The invocation as `events` describe it (carried along and advanced event by event:
    /// replaying clones the whole request each time).
    state: InvocationState,
    user: UserId,
    id: InvocationId,
    server_id: ServerId,
    server_name: String,
    url: String,
    tool_name: String,
    arguments: JsonObject,
    deadline: Duration,
    /// The call's registration for withdrawals, when its approval made it here (before the
    /// approval was recorded, so that no withdrawal that sees the approval misses it).
    withdrawal: Option<RunningCall>,
}

/// An invocation's claim and what follows it, by the process that decided it.
struct Claim {
    context: CommandContext,
    subject: Subject,
    /// The claim (`InvocationRequested`): one envelope.
    claim: Vec<Envelope>,
    /// What the claim's winner appends after it (a rejection, a wait for approval).
    follow_up: Vec<Envelope>,
    /// The events a rejection's or a wait's report reads (none for a call).
    kept: Vec<Event>,
    state: InvocationState,
    /// The tool, when the invocation is allowed and called here.
    to_call: Option<Resolved>,
    user: UserId,
    id: InvocationId,
    arguments: JsonObject,
    deadline: Duration,
}

/// Whose claim an invocation id is.
enum Claimed {
    /// Ours: the invocation's report.
    Ours(InvocationReport),
    /// Another request's, stored at `requested_sequence`: the user and id come back with it
    /// for the wait on its outcome (moved into the claim, not copied for this rare case).
    Theirs {
        requested_sequence: u64,
        user: UserId,
        id: InvocationId,
    },
}

/// A user's decision on a pending approval, decided and about to be recorded.
struct RecordDecision {
    context: CommandContext,
    subject: Subject,
    user: UserId,
    id: InvocationId,
    known: Whereabouts,
    command: InvocationCommand,
    now: SystemTime,
    events: Vec<Event>,
    state: InvocationState,
    decided: Vec<Event>,
    /// An approval's call, registered for withdrawals before the approval is recorded.
    withdrawal: Option<RunningCall>,
}

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

/// How long a duplicate waits beyond the deadline for the owner to record the outcome.
const RECORDING_GRACE: Duration = Duration::from_secs(5);
/// Room kept under the store's largest event for what surrounds a captured payload: the
/// event's other fields, its envelope and a JetStream message's headers.
const EVENT_HEADROOM: usize = 8 * 1024;

/// How long a look-up waits for the open invocations read model to reach the log's end.
const INDEX_CATCH_UP: Duration = Duration::from_secs(5);

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

    /// The tools `user` may use now: server enabled, connection healthy, state Always allow
    /// or Needs approval. Sorted by exposed name.
    pub fn list_tools(&self, user: &UserId) -> Vec<ToolListing> {
        let models = &self.inner.read_models;
        let candidates: Vec<(ServerId, ToolListing)> = models.tool_states.read(|states| {
            states
                .all_tools_of(user)
                .filter(|view| view.state != ToolState::Blocked)
                .filter_map(|view| {
                    let parse = |text: &str| {
                        (!text.is_empty())
                            .then(|| serde_json::from_str::<Value>(text).ok())
                            .flatten()
                    };
                    Some((
                        view.server_id,
                        ToolListing {
                            name: view.exposed_name?.to_owned(),
                            tool_name: view.name.to_owned(),
                            server: ToolServer {
                                id: view.server_id.to_string(),
                                name: String::new(),
                                description: String::new(),
                            },
                            title: view.title.to_owned(),
                            description: view.description.to_owned(),
                            input_schema: parse(view.input_schema_json)
                                .unwrap_or_else(|| serde_json::json!({"type": "object"})),
                            output_schema: parse(view.output_schema_json),
                            annotations: parse(view.annotations_json),
                            state: view.state.as_str(),
                        },
                    ))
                })
                .collect()
        });
        let mut tools: Vec<ToolListing> = candidates
            .into_iter()
            .filter_map(|(server_id, mut listing)| {
                let (enabled, name, description) = models.servers.read(|d| {
                    d.get(server_id)
                        .map(|s| (s.enabled, s.name.clone(), s.description.clone()))
                })?;
                let healthy = models.connections.read(|c| {
                    c.get(server_id, user.as_str())
                        .is_some_and(|v| v.api_status(enabled) == ApiConnectionStatus::Healthy)
                });
                if !enabled || !healthy {
                    return None;
                }
                listing.server.name = name;
                listing.server.description = description;
                Some(listing)
            })
            .collect();
        tools.sort_by(|a, b| a.name.cmp(&b.name));
        tools
    }

    /// What the exposed name is for `user` now; `None`: no tool of any server. A tool of a
    /// server the user is not connected to (never, or no longer) resolves, unconnected: the
    /// orchestrator learns to have the user connect rather than that the tool does not exist.
    fn resolve(&self, user: &UserId, exposed: &str) -> Option<Resolved> {
        let models = &self.inner.read_models;
        // `None` for the state: a tool of a server the user is not connected to.
        let (server_id, tool, state) =
            models
                .tool_states
                .read(|states| match states.resolve_exposed(user, exposed) {
                    Some(view) => Some((view.server_id, view.name.to_owned(), Some(view.state))),
                    None => states
                        .exposed_tool(exposed)
                        .filter(|(server_id, _)| !states.is_connected(user, *server_id))
                        .map(|(server_id, tool)| (server_id, tool.to_owned(), None)),
                })?;
        let tool = domain::ToolName::parse(&tool).ok()?;
        let (enabled, server_name, url) = models.servers.read(|d| {
            d.get(server_id)
                .map(|s| (s.enabled, s.name.clone(), s.url.clone()))
        })?;
        let status = models.connections.read(|c| {
            c.get(server_id, user.as_str())
                .map(|v| v.api_status(enabled))
        });
        // An unreachable connection is tried: the last probe may be minutes old, and a
        // failed call says why.
        let connected = state.is_some()
            && matches!(
                status,
                Some(ApiConnectionStatus::Healthy | ApiConnectionStatus::Unreachable)
            );
        Some(Resolved {
            tool: ResolvedTool {
                server_id,
                tool,
                server_enabled: enabled,
                connected,
                connection_auth_error: status == Some(ApiConnectionStatus::AuthError),
                // Not connected is decided first; no setting applies without a connection.
                tool_state: state.unwrap_or(ToolState::Blocked),
            },
            server_name,
            url,
        })
    }

    /// Invokes a tool for a user: rejected, awaiting approval, or called and answered. A
    /// repeated request with the same id gets the recorded outcome (waiting for it while the
    /// first one runs) and never a second call.
    pub async fn invoke(
        &self,
        context: &CommandContext,
        request: InvokeRequest,
    ) -> Result<InvocationReport, InvokerError> {
        let settings = &self.inner.settings;
        let deadline = self.deadline(request.deadline)?;
        let arguments_json =
            serde_json::to_string(&request.arguments).unwrap_or_else(|_| "{}".to_owned());
        let arguments_size = arguments_json.len();
        if arguments_size > settings.max_arguments_bytes {
            return Err(InvokerError::ArgumentsTooLarge {
                size: arguments_size,
                max: settings.max_arguments_bytes,
            });
        }
        let id = request.invocation_id.clone();
        let subject = invocation_subject(&request.user)?;
        let resolved = self.resolve(&request.user, &request.tool);
        // What a duplicate of this request is checked against: the arguments' digest and
        // size tell it apart (`invocation_id_reused`), so it leaves out the arguments' JSON,
        // which may be large and is not copied for it.
        let duplicate = InvocationRequest {
            user_id: request.user.clone(),
            exposed_tool_name: request.tool.clone(),
            arguments_sha256: sha256_hex(arguments_json.as_bytes()),
            arguments_size_bytes: arguments_json.len() as u64,
            arguments_json: String::new(),
            capture_arguments: settings.capture_payloads,
            resolved: resolved.as_ref().map(|r| r.tool.clone()),
            approval_timeout: settings.approval_timeout,
            // Counted only for a request that would wait (an allowed call's hot path reads
            // no approvals); from the read model, so requests racing at the limit may pass
            // it by a few — a bound on a flood, not an exact quota.
            approvals_full: resolved
                .as_ref()
                .is_some_and(|r| r.tool.tool_state == ToolState::NeedsApproval)
                && self.inner.read_models.open_invocations.read(|open| {
                    open.pending_approval_count(request.user.as_str())
                        >= settings.max_pending_approvals
                }),
            deadline: request.deadline,
            conversation_id: request.conversation_id.clone().unwrap_or_default(),
        };
        let command = InvocationCommand::Request(InvocationRequest {
            arguments_json,
            ..duplicate.clone()
        });
        let duplicate = InvocationCommand::Request(duplicate);
        let now = self.now();
        let events = invocation::decide(&InvocationState::default(), &id, command, now)?;
        let limit = deadline + RECORDING_GRACE;
        // Known already — past the log's dedupe window too: never claimed again.
        if let Some(known) = self.whereabouts_now(&request.user, &id) {
            return self.join(&request.user, &id, duplicate, known, limit).await;
        }
        let state = InvocationState::from_events(events.iter());
        // Captured arguments must fit the request's event: refused up front, with the
        // limit, rather than failing at the store after the request was checked. (Kept
        // for an approval instead, they are sealed in the vault, whose entry has no event
        // around it; a vault that refuses them fails the invocation, `arguments_not_kept`.)
        if settings.capture_payloads
            && let Some(max) = self.payload_limit()
            && arguments_size > max
        {
            return Err(InvokerError::ArgumentsTooLarge {
                size: arguments_size,
                max,
            });
        }
        // Allowed and resolved: called here, once the claim is ours.
        let to_call = resolved.filter(|_| matches!(state.status(), InvocationStatus::Running));
        // A call's report needs none of these events (the state holds the request; the
        // outcome comes later); a rejection's or a wait's report reads them.
        let kept = if to_call.is_some() {
            Vec::new()
        } else {
            events.clone()
        };
        let mut envelopes = self.envelopes(context, &request.user, &id, events);
        // Rejected or awaiting approval: only the claim's winner writes what follows it.
        let follow_up = envelopes.split_off(1);
        let claim = Claim {
            context: context.clone(),
            subject,
            claim: envelopes,
            follow_up,
            kept,
            state,
            to_call,
            user: request.user,
            id,
            arguments: request.arguments,
            deadline,
        };
        // From the claim on, the invocation is seen through even if its caller goes away (a
        // closed HTTP request): a claim without its follow-up would leave the invocation
        // open, a pending approval unlisted, until the sweeper closed it.
        let this = self.clone();
        let claimed = FinishOnDrop::new(async move { this.claim_and_follow(claim).await }).await?;
        match claimed {
            Claimed::Ours(report) => Ok(report),
            Claimed::Theirs {
                requested_sequence,
                user,
                id,
            } => {
                let known = Whereabouts {
                    requested_sequence,
                    outcome_sequence: None,
                };
                self.join(&user, &id, duplicate, known, limit).await
            }
        }
    }

    /// Appends an invocation's claim and, when it is ours, what follows it: the rejection or
    /// the wait for approval, or the call.
    async fn claim_and_follow(&self, claim: Claim) -> Result<Claimed, InvokerError> {
        let Claim {
            context,
            subject,
            claim,
            follow_up,
            kept,
            state,
            to_call,
            user,
            id,
            arguments,
            deadline,
        } = claim;
        let claimed_at = match self.append_settling(&subject, &claim[0]).await {
            Ok(Settled::Ours(sequence)) => sequence,
            Ok(Settled::Theirs(requested_sequence)) => {
                return Ok(Claimed::Theirs {
                    requested_sequence,
                    user,
                    id,
                });
            }
            Err(InvokerError::EventLog(error)) if !error.nothing_stored() => {
                // The store may have taken the claim and lost its answer: left alone, such a
                // claim (started, as an allowed one is) would look like a call under way
                // until the sweeper's limit for stalled calls, and a retry would wait on it.
                self.close_unconfirmed_claim_later(context, subject, claim[0].clone(), user, id);
                return Err(error.into());
            }
            Err(error) => return Err(error),
        };
        let awaiting = matches!(state.status(), InvocationStatus::AwaitingApproval { .. });
        if awaiting
            && state
                .request()
                .is_some_and(pending_arguments::kept_in_vault)
        {
            // Kept before the wait is recorded: a listed approval always has its arguments.
            let arguments_json =
                serde_json::to_string(&arguments).unwrap_or_else(|_| "{}".to_owned());
            if let Err(error) = self
                .keep_pending_arguments(&user, &id, &arguments_json)
                .await
            {
                tracing::warn!(%error, "could not keep the arguments of an invocation awaiting approval");
                let claimed = kept.into_iter().take(1).collect();
                return self
                    .record_failure(
                        &context,
                        &subject,
                        &user,
                        &id,
                        claimed,
                        "arguments_not_kept",
                        "the arguments could not be kept in the vault for the approval; the \
                         server was not called",
                    )
                    .await
                    .map(Claimed::Ours);
            }
        }
        if !follow_up.is_empty() && self.append_all(&subject, &follow_up).await?.is_none() {
            // Closed by the sweeper meanwhile (this process stalled for minutes).
            self.forget_pending_arguments(&user, &id, state.request())
                .await;
            return self
                .status(&user, &id, Duration::ZERO)
                .await
                .map(Claimed::Ours);
        }
        let report = match to_call {
            Some(resolved) => {
                self.run(Run {
                    context,
                    subject,
                    events: kept,
                    state,
                    user,
                    id,
                    server_id: resolved.tool.server_id,
                    server_name: resolved.server_name,
                    url: resolved.url,
                    tool_name: resolved.tool.tool.as_str().to_owned(),
                    arguments,
                    deadline,
                    withdrawal: None,
                })
                .await?
            }
            None if awaiting => {
                // The wait is not a contested write: the sweeper may have closed a claim this
                // process was slow to follow up (an event after the outcome counts for
                // nothing). What is recorded is the answer; a person decides on it, so one
                // read more costs nothing that matters.
                let known = Whereabouts {
                    requested_sequence: claimed_at,
                    outcome_sequence: None,
                };
                let (recorded, _) = self.load(&user, &id, known).await?;
                let recorded_state = InvocationState::replay(&id, &recorded);
                // Closed before anyone approved it: its arguments are not needed. (Approved
                // already, the approving process takes them.)
                let approved = recorded
                    .iter()
                    .any(|event| matches!(event, Event::InvocationApproved(_)));
                if recorded_state.status().is_terminal() && !approved {
                    self.forget_pending_arguments(&user, &id, state.request())
                        .await;
                }
                self.report_of(&recorded_state, &user, &id, &recorded, None)
            }
            None => self.report_of(&state, &user, &id, &kept, None),
        };
        Ok(Claimed::Ours(report))
    }

    /// After an append of `claim` that may or may not have been stored, in a task of its
    /// own: once the store answers again, a claim that was stored and is this request's is
    /// closed as failed (`claim_unconfirmed`; the server was not called, and the caller was
    /// told of an error). A claim that was not stored leaves nothing to do: a retry claims
    /// afresh. Gives up after the sweeper's limit for stalled calls (the sweeper closes it).
    fn close_unconfirmed_claim_later(
        &self,
        context: CommandContext,
        subject: Subject,
        claim: Envelope,
        user: UserId,
        id: InvocationId,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            let closing = this
                .until_the_store_answers(|| {
                    this.close_unconfirmed_claim(&context, &subject, &claim, &user, &id)
                })
                .await;
            if let Err(error) = closing {
                tracing::warn!(%error, invocation = id.as_str(), "could not settle an unconfirmed claim; the sweeper will");
            }
        });
    }

    /// `attempt` again, with pauses from 250 ms doubling to 30 s, while it fails in a way
    /// that may have stored something (the store did not answer), for at most the sweeper's
    /// limit for stalled calls; then, or on any other outcome, what it came to.
    async fn until_the_store_answers<T, Attempt>(
        &self,
        mut attempt: impl FnMut() -> Attempt,
    ) -> Result<T, InvokerError>
    where
        Attempt: std::future::Future<Output = Result<T, InvokerError>>,
    {
        let give_up = tokio::time::Instant::now() + self.inner.settings.stalled_after();
        let mut pause = Duration::from_millis(250);
        loop {
            match attempt().await {
                Err(InvokerError::EventLog(error))
                    if !error.nothing_stored()
                        && tokio::time::Instant::now() + pause <= give_up =>
                {
                    tracing::debug!(%error, "the event store did not answer; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(30));
                }
                outcome => return outcome,
            }
        }
    }

    async fn close_unconfirmed_claim(
        &self,
        context: &CommandContext,
        subject: &Subject,
        claim: &Envelope,
        user: &UserId,
        id: &InvocationId,
    ) -> Result<(), InvokerError> {
        let Some(known) = self.whereabouts(user, id).await? else {
            return Ok(());
        };
        if known.outcome_sequence.is_some() {
            return Ok(());
        }
        let stored = self
            .inner
            .log
            .read_event(LogKind::Invocations, known.requested_sequence)
            .await?;
        if stored.is_none_or(|stored| stored.envelope.write_id != claim.write_id) {
            // Another request's claim (it went on after this one failed).
            return Ok(());
        }
        let claimed: Vec<Event> = claim.event.iter().cloned().collect();
        let state = InvocationState::replay(id, &claimed);
        let failed = invocation::decide(
            &state,
            id,
            InvocationCommand::Fail {
                error_code: "claim_unconfirmed".to_owned(),
                message: "the event store did not confirm the request in time, and the caller \
                          was told it failed; the server was not called"
                    .to_owned(),
                duration_ms: 0,
            },
            self.now(),
        )?;
        let envelopes = self.envelopes(context, user, id, failed);
        // `None`: closed meanwhile by someone else (the sweeper).
        self.append_all(subject, &envelopes).await?;
        Ok(())
    }

    /// A request whose id is claimed already: the same request gets the recorded outcome
    /// (waiting up to `limit` for it); another request under that id is refused.
    async fn join(
        &self,
        user: &UserId,
        id: &InvocationId,
        command: InvocationCommand,
        known: Whereabouts,
        limit: Duration,
    ) -> Result<InvocationReport, InvokerError> {
        let (events, seen) = self.load(user, id, known).await?;
        let state = InvocationState::replay(id, &events);
        invocation::decide(&state, id, command, self.now())?;
        self.await_outcome(user, id, seen, events, limit, false)
            .await
    }

    /// The current outcome of `user`'s invocation `id`; with `wait`, waits up to that long
    /// for a final one (through an approval too).
    pub async fn status(
        &self,
        user: &UserId,
        id: &InvocationId,
        wait: Duration,
    ) -> Result<InvocationReport, InvokerError> {
        let Some(known) = self.whereabouts(user, id).await? else {
            return Err(domain::DomainError::InvocationNotFound.into());
        };
        let (events, seen) = self.load(user, id, known).await?;
        self.await_outcome(user, id, seen, events, wait, true).await
    }

    /// The server and the tool (its name on the server) of `user`'s invocation `id`, while it
    /// waits for their decision; `None` otherwise (unknown, someone else's, decided, closed).
    pub fn awaiting_approval_on(
        &self,
        user: &UserId,
        id: &InvocationId,
    ) -> Option<(ServerId, String)> {
        self.inner.read_models.open_invocations.read(|open| {
            open.get(user.as_str(), id.as_str())
                .filter(|open| matches!(open.status, domain::OpenStatus::AwaitingApproval { .. }))
                .and_then(|open| {
                    let server = ServerId::parse(&open.server_id).ok()?;
                    Some((server, open.tool_name.clone()))
                })
        })
    }

    /// The user's invocations waiting for their decision, oldest first, with the arguments
    /// they decide on (`null` when the vault no longer has them: approving then fails the
    /// invocation without a call).
    pub async fn pending_approvals(&self, user: &UserId) -> Vec<PendingApproval> {
        let models = &self.inner.read_models;
        let pending: Vec<domain::OpenInvocation> = models.open_invocations.read(|open| {
            open.pending_approvals_of(user.as_str())
                .into_iter()
                .cloned()
                .collect()
        });
        // Read from the vault and the log together, not one round trip after another: the
        // arguments, and the conversation the request names (only its event holds it).
        let read = futures_util::future::join_all(pending.iter().map(|open| async move {
            let arguments = match self.read_pending_arguments(open).await {
                Ok(json) => serde_json::from_str(&json).unwrap_or(Value::Null),
                Err(error) => {
                    tracing::warn!(%error, "a pending approval's arguments are unavailable");
                    Value::Null
                }
            };
            let conversation_id = match self
                .inner
                .log
                .read_event(LogKind::Invocations, open.requested_sequence)
                .await
            {
                Ok(Some(stored)) => match stored.envelope.event {
                    Some(Event::InvocationRequested(requested))
                        if requested.invocation_id == open.invocation_id =>
                    {
                        requested.conversation_id
                    }
                    _ => String::new(),
                },
                Ok(None) => String::new(),
                Err(error) => {
                    tracing::warn!(%error, "a pending approval's request could not be read");
                    String::new()
                }
            };
            (arguments, conversation_id)
        }))
        .await;
        let mut approvals = Vec::with_capacity(pending.len());
        for (open, (arguments, conversation_id)) in pending.into_iter().zip(read) {
            let server_id = ServerId::parse(&open.server_id).ok();
            let server_name = server_id
                .and_then(|server_id| {
                    models
                        .servers
                        .read(|d| d.get(server_id).map(|s| s.name.clone()))
                })
                .unwrap_or_default();
            let tool_context = server_id.and_then(|server_id| {
                models.tool_states.read(|states| {
                    states
                        .tool(user, server_id, &open.tool_name)
                        .map(|view| PendingToolContext {
                            title: view.title.to_owned(),
                            description: view.description.to_owned(),
                            category: view.category.as_str(),
                            annotations: (!view.annotations_json.is_empty())
                                .then(|| serde_json::from_str(view.annotations_json).ok())
                                .flatten(),
                            changed: view.changed,
                            definition_hash: view.definition_hash.to_owned(),
                        })
                })
            });
            approvals.push(PendingApproval {
                tool_context,
                requested_at: open.requested_at(),
                expires_at: open.approval_expires_at().unwrap_or(open.requested_at()),
                invocation_id: open.invocation_id,
                tool: open.exposed_tool_name,
                tool_name: open.tool_name,
                server: ResultServer {
                    id: open.server_id,
                    name: server_name,
                },
                arguments,
                conversation_id,
            });
        }
        approvals
    }

    /// The user approves or denies their invocation `id`. Only the invocation's own user
    /// decides (the subject is theirs: another user's id is not found); a decision is final
    /// and recorded once. An approval runs the call here and answers with its outcome.
    pub async fn decide_approval(
        &self,
        context: &CommandContext,
        user: &UserId,
        id: &InvocationId,
        decision: Decision,
    ) -> Result<InvocationReport, InvokerError> {
        let subject = invocation_subject(user)?;
        // Another user's id is looked for among their own invocations: not found.
        let Some(known) = self.whereabouts(user, id).await? else {
            return Err(domain::DomainError::InvocationNotFound.into());
        };
        let command = match decision {
            Decision::Approve => InvocationCommand::Approve { by: user.clone() },
            Decision::Deny { reason } => {
                // Told to the AI as the outcome's message: text, line breaks allowed.
                let reason = reason.trim();
                if reason.chars().count() > MAX_DENIAL_REASON_CHARS
                    || reason
                        .chars()
                        .any(|c| c.is_control() && c != '\n' && c != '\t')
                {
                    return Err(InvokerError::ReasonInvalid {
                        max: MAX_DENIAL_REASON_CHARS,
                    });
                }
                InvocationCommand::Deny {
                    by: user.clone(),
                    reason: reason.to_owned(),
                    withdrawn: false,
                }
            }
            Decision::Withdraw => InvocationCommand::Deny {
                by: user.clone(),
                reason: String::new(),
                withdrawn: true,
            },
        };
        let now = self.now();
        let (events, _) = self.load(user, id, known).await?;
        let state = InvocationState::replay(id, &events);
        let decided = invocation::decide(&state, id, command.clone(), now)?;
        if decided.is_empty() {
            // Decided so already: the answer is where it stands.
            return Ok(self.report(user, id, &events));
        }
        // An approval's call is registered for withdrawals before the approval is recorded:
        // a withdrawal that finds the invocation approved (here or over NATS from another
        // process) then finds the call too, even before it goes out.
        let withdrawal = matches!(command, InvocationCommand::Approve { .. }).then(|| {
            self.running_call(domain::projections::invocation_key(
                user.as_str(),
                id.as_str(),
            ))
        });
        let decision = RecordDecision {
            context: context.clone(),
            subject,
            user: user.clone(),
            id: id.clone(),
            known,
            command,
            now,
            events,
            state,
            decided,
            withdrawal,
        };
        // From the decision on, seen through even if the caller goes away: the approved call
        // made and its outcome recorded and announced.
        let this = self.clone();
        let whose = user.clone();
        FinishOnDrop::new(async move {
            let report = this.record_decision_and_run(decision).await?;
            this.announce_approval_outcome(&whose, &report);
            Ok(report)
        })
        .await
    }

    /// The orchestrator no longer wants `user`'s invocation `id` (the user stopped the
    /// conversation): one waiting for approval is withdrawn (`denied`, `withdrawn`, the
    /// invocation's one decision); one whose call runs has it cancelled wherever it runs —
    /// its future dropped, so `rmcp` cancels it at the server — and fails `withdrawn`,
    /// unless it finished first. Answers with the outcome then (waiting up to
    /// [`WITHDRAWAL_WAIT`] for a running call's). A finished invocation is
    /// `invocation_finished`.
    pub async fn withdraw(
        &self,
        context: &CommandContext,
        user: &UserId,
        id: &InvocationId,
    ) -> Result<InvocationReport, InvokerError> {
        let now = self.status(user, id, Duration::ZERO).await?;
        match now.outcome {
            Outcome::AwaitingApproval => {
                match self
                    .decide_approval(context, user, id, Decision::Withdraw)
                    .await
                {
                    // Approved meanwhile: its call runs, and is cancelled below.
                    Err(InvokerError::Domain(
                        domain::DomainError::InvocationNotAwaitingApproval,
                    )) => {}
                    decided => return decided,
                }
            }
            Outcome::Running => {}
            _ => return Err(domain::DomainError::InvocationFinished.into()),
        }
        let key = domain::projections::invocation_key(user.as_str(), id.as_str());
        if !self.cancel_call(key)
            && let Some(peers) = self.inner.result_peers.get()
        {
            peers.withdraw_call(user, id).await;
        }
        self.status(user, id, WITHDRAWAL_WAIT).await
    }

    /// Why no approval could let a request of `user` to call `tool` on the server with id
    /// `server` through now (the domain's rule on what this process's read models hold);
    /// `None`: an approval would call it.
    pub(crate) fn refusal_of_pending(
        &self,
        user: &UserId,
        server: &str,
        tool: &str,
    ) -> Option<Refusal> {
        let Ok(server) = ServerId::parse(server) else {
            return Some(Refusal::ServerDisabled);
        };
        let server_enabled = self
            .inner
            .read_models
            .servers
            .read(|d| d.get(server).is_some_and(|s| s.enabled));
        invocation::refusal(self.in_force(user, server, tool, server_enabled))
    }

    /// What this process's read models hold in force for a call of `tool` on `server` for
    /// `user`.
    pub(crate) fn in_force(
        &self,
        user: &UserId,
        server: ServerId,
        tool: &str,
        server_enabled: bool,
    ) -> InForce {
        let (tool_state, connected) = self.inner.read_models.tool_states.read(|states| {
            (
                states.state_of(user, server, tool),
                states.is_connected(user, server),
            )
        });
        InForce {
            server_enabled,
            tool_state,
            connected,
        }
    }

    async fn record_decision_and_run(
        &self,
        decision: RecordDecision,
    ) -> Result<InvocationReport, InvokerError> {
        let envelope = self
            .envelopes(
                &decision.context,
                &decision.user,
                &decision.id,
                decision.decided.clone(),
            )
            .into_iter()
            .next();
        let Some(envelope) = envelope else {
            return Ok(self.report(&decision.user, &decision.id, &decision.events));
        };
        match self.append_settling(&decision.subject, &envelope).await {
            Ok(settled) => self.follow_decision(decision, settled).await,
            Err(InvokerError::EventLog(error)) if !error.nothing_stored() => {
                // The store may have taken the decision and lost its answer, or may take it
                // yet: the user is told of the error, and the decision is seen through once
                // the store answers — else an approval stored without its call would look
                // like a call under way until the sweeper's limit.
                self.follow_unconfirmed_decision_later(decision, envelope);
                Err(error.into())
            }
            Err(error) => Err(error),
        }
    }

    /// After an append of a decision's `envelope` that may or may not have been stored, in a
    /// task of its own: the same append again (stored once, whoever's attempt stored it)
    /// until the store answers, then what follows the decision — the approved call — with
    /// its outcome announced. Gives up after the sweeper's limit for stalled calls.
    fn follow_unconfirmed_decision_later(&self, decision: RecordDecision, envelope: Envelope) {
        let this = self.clone();
        tokio::spawn(async move {
            let recorded = this
                .until_the_store_answers(|| this.append_settling(&decision.subject, &envelope))
                .await;
            let settled = match recorded {
                Ok(settled) => settled,
                Err(error) => {
                    tracing::warn!(%error, invocation = decision.id.as_str(), "could not record an unconfirmed decision; the sweeper will close the invocation");
                    return;
                }
            };
            let user = decision.user.clone();
            match this.follow_decision(decision, settled).await {
                Ok(report) => this.announce_approval_outcome(&user, &report),
                Err(error) => {
                    tracing::warn!(%error, "could not see an unconfirmed decision through");
                }
            }
        });
    }

    /// What follows a decision's append: the report of a decision made first elsewhere, or
    /// of a denial; the approved call, made here.
    async fn follow_decision(
        &self,
        decision: RecordDecision,
        settled: Settled,
    ) -> Result<InvocationReport, InvokerError> {
        let RecordDecision {
            context,
            subject,
            user,
            id,
            known,
            command,
            now,
            mut events,
            mut state,
            decided,
            withdrawal,
        } = decision;
        let approve = matches!(command, InvocationCommand::Approve { .. });
        let (user, id) = (&user, &id);
        if let Settled::Theirs(_) = settled {
            // Decided first elsewhere (the user's other tab, the sweeper's expiry): what the
            // rules say to deciding again, on what is recorded now.
            let (events, _) = self.load(user, id, known).await?;
            let state = InvocationState::replay(id, &events);
            invocation::decide(&state, id, command, now)?;
            return Ok(self.report(user, id, &events));
        }
        advance(&mut state, &mut events, decided);
        let Some(request) = state.request().cloned() else {
            return Ok(self.report(user, id, &events));
        };
        if !approve || !matches!(state.status(), InvocationStatus::Ready { .. }) {
            self.forget_pending_arguments(user, id, Some(&request))
                .await;
            return Ok(self.report(user, id, &events));
        }
        self.inner.approved_calls.pass().await;
        let arguments = match self.take_pending_arguments(user, id, &request).await {
            Ok(json) => serde_json::from_str::<JsonObject>(&json).unwrap_or_default(),
            Err(unavailable) => {
                tracing::warn!(error = %unavailable, "an approved invocation's arguments are unavailable");
                return self
                    .record_failure(
                        &context,
                        &subject,
                        user,
                        id,
                        events,
                        "arguments_unavailable",
                        &format!("{unavailable}; the server was not called"),
                    )
                    .await;
            }
        };
        // What is in force now decides, as for any call: a server disabled or deleted, a
        // tool blocked, or a connection removed while the request waited is never called
        // (an approval given to a stale request must not undo a block).
        let server = ServerId::parse(&request.server_id)
            .ok()
            .and_then(|server_id| {
                self.inner.read_models.servers.read(|d| {
                    d.get(server_id)
                        .map(|s| (server_id, s.enabled, s.name.clone(), s.url.clone()))
                })
            });
        let refusal = match &server {
            Some((server_id, enabled, _, _)) => {
                invocation::refusal(self.in_force(user, *server_id, &request.tool_name, *enabled))
            }
            None => Some(Refusal::ServerDisabled),
        };
        let (Some((server_id, _, server_name, url)), None) = (server, refusal) else {
            let refusal = refusal.unwrap_or(Refusal::ServerDisabled);
            let message = crate::reactions::refused(refusal, "before the approved call");
            return self
                .record_failure(
                    &context,
                    &subject,
                    user,
                    id,
                    events,
                    refusal.code(),
                    &message,
                )
                .await;
        };
        self.run(Run {
            context,
            subject,
            events,
            state,
            user: user.clone(),
            id: id.clone(),
            server_id,
            server_name,
            url,
            tool_name: request.tool_name,
            arguments,
            deadline: self.recorded_deadline(request.deadline_ms),
            withdrawal,
        })
        .await
    }

    /// The deadline a request recorded (`0`: the default), within today's longest.
    fn recorded_deadline(&self, deadline_ms: u64) -> Duration {
        let settings = &self.inner.settings;
        let asked = match deadline_ms {
            0 => settings.default_deadline,
            ms => Duration::from_millis(ms),
        };
        asked.min(settings.max_deadline)
    }

    #[allow(clippy::too_many_arguments)]
    async fn record_failure(
        &self,
        context: &CommandContext,
        subject: &Subject,
        user: &UserId,
        id: &InvocationId,
        mut events: Vec<Event>,
        code: &str,
        message: &str,
    ) -> Result<InvocationReport, InvokerError> {
        let state = InvocationState::replay(id, &events);
        let failed = invocation::decide(
            &state,
            id,
            InvocationCommand::Fail {
                error_code: code.to_owned(),
                message: message.to_owned(),
                duration_ms: 0,
            },
            self.now(),
        )?;
        let envelopes = self.envelopes(context, user, id, failed.clone());
        if self.append_all(subject, &envelopes).await?.is_none() {
            return self.status(user, id, Duration::ZERO).await;
        }
        events.extend(failed);
        Ok(self.report(user, id, &events))
    }

    async fn run(&self, run: Run) -> Result<InvocationReport, InvokerError> {
        let Run {
            context,
            subject,
            mut events,
            mut state,
            user,
            id,
            server_id,
            server_name,
            url,
            tool_name,
            arguments,
            deadline,
            withdrawal,
        } = run;
        // An approved invocation is started here. Its `InvocationStarted` is appended while
        // the call goes out, not before it: the right to call was settled by the approval
        // (the one `InvocationApproved` append that succeeded), so nobody else can start it
        // and waiting for the append would only add its latency to the call. `Started` still
        // precedes the outcome in the log. (An allowed invocation's request recorded its
        // start already: its claim is the one append before the call.)
        // Withdrawn while it runs, the call's future is dropped: `rmcp` then cancels it at
        // the server. Withdrawn between its approval and here, it is neither started nor
        // made.
        let key = domain::projections::invocation_key(user.as_str(), id.as_str());
        let running = withdrawal.unwrap_or_else(|| self.running_call(key));
        let withdrawn_first = running.withdrawn.is_cancelled();
        let started = match state.status() {
            InvocationStatus::Running => Vec::new(),
            _ if withdrawn_first => Vec::new(),
            _ => invocation::decide(&state, &id, InvocationCommand::Start, self.now())?,
        };
        let envelopes = self.envelopes(&context, &user, &id, started.clone());
        let began = tokio::time::Instant::now();
        let calling = async {
            if withdrawn_first {
                return (Err(CallCut::WithdrawnFirst), Duration::ZERO);
            }
            let answer = tokio::select! {
                // A withdrawal already made when this is first polled wins before the call
                // is sent.
                biased;
                () = running.withdrawn.cancelled() => Err(CallCut::Withdrawn),
                answer = tokio::time::timeout(
                    deadline,
                    self.call(server_id, &user, &url, &tool_name, arguments),
                ) => answer.map_err(|_| CallCut::Deadline),
            };
            (answer, began.elapsed())
        };
        let appending = async {
            if envelopes.is_empty() {
                return Ok(());
            }
            self.inner
                .log
                .append(&subject, ExpectedVersion::Any, &envelopes)
                .await
                .map(drop)
        };
        let (appended, (answer, took)) = tokio::join!(appending, calling);
        drop(running);
        if let Err(error) = appended {
            // The call was made: its outcome is what must be recorded, with or without the
            // start before it in the log (the outcome closes the invocation either way).
            tracing::warn!(
                %error,
                invocation = id.as_str(),
                "could not record an approved invocation's start; recording its outcome"
            );
        }
        advance(&mut state, &mut events, started);
        let duration_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        let called = !matches!(answer, Err(CallCut::WithdrawnFirst));
        let mut built = None;
        let command = match answer {
            Ok(Ok(result)) => {
                let server = ResultServer {
                    id: server_id.to_string(),
                    name: server_name,
                };
                let limit = self.inner.settings.result_limit_bytes;
                let (envelope, digest) = ResultEnvelope::build(server, tool_name, result, limit);
                let envelope = Arc::new(envelope);
                let (result_json, result_held_by) = if self.inner.settings.capture_payloads {
                    // Cut, this process holds the whole result: look-ups elsewhere ask it
                    // first.
                    match self.storable_result(&envelope) {
                        (captured, false) => (captured, String::new()),
                        (cut, true) => (cut, self.inner.instance.clone()),
                    }
                } else {
                    (String::new(), self.inner.instance.clone())
                };
                // Before the event: whoever sees `InvocationCompleted` here finds the result.
                self.remember_result(key, envelope.clone());
                built = Some(envelope.clone());
                InvocationCommand::Complete {
                    is_error: envelope.is_error,
                    duration_ms,
                    result_size_bytes: digest.size_bytes,
                    result_sha256: digest.sha256,
                    truncated: envelope.truncated,
                    result_json,
                    result_held_by,
                }
            }
            Ok(Err((error_code, message))) => InvocationCommand::Fail {
                error_code,
                message,
                duration_ms,
            },
            Err(CallCut::Deadline) => InvocationCommand::Fail {
                error_code: "deadline_exceeded".to_owned(),
                message: format!(
                    "the tool did not answer within the deadline of {} ms",
                    deadline.as_millis()
                ),
                duration_ms,
            },
            Err(CallCut::Withdrawn) => InvocationCommand::Fail {
                error_code: "withdrawn".to_owned(),
                message: "the orchestrator withdrew the call while it ran; the server was told \
                          to cancel it"
                    .to_owned(),
                duration_ms,
            },
            Err(CallCut::WithdrawnFirst) => InvocationCommand::Fail {
                error_code: "withdrawn".to_owned(),
                message: "the orchestrator withdrew the call after its approval, before it went \
                          out; the server was not called"
                    .to_owned(),
                duration_ms,
            },
        };
        if called {
            // How the call ended, as its outcome says it.
            let ended: Cow<'static, str> = match &command {
                InvocationCommand::Complete { is_error: true, .. } => "tool_error".into(),
                InvocationCommand::Fail { error_code, .. } => error_code.clone().into(),
                _ => "completed".into(),
            };
            self.inner.metrics.observe_call(server_id, ended, took);
        }
        let finished = invocation::decide(&state, &id, command, self.now())?;
        let envelopes = self.envelopes(&context, &user, &id, finished.clone());
        // The outcome must be recorded: retry what the store could not take (an append is
        // idempotent per event id, so a retry after a lost acknowledgement writes once, and
        // finds its own event).
        let mut attempt: u32 = 0;
        loop {
            match self.append_all(&subject, &envelopes).await {
                Ok(Some(_)) => break,
                Ok(None) => {
                    // Only the sweeper closes a running invocation, and only long after its
                    // deadline: what it recorded stands.
                    tracing::warn!(
                        invocation = id.as_str(),
                        "an invocation was closed by someone else while it ran"
                    );
                    return self.status(&user, &id, Duration::ZERO).await;
                }
                Err(InvokerError::EventLog(
                    error @ (EventLogError::Unavailable { .. } | EventLogError::Closed),
                )) if attempt < 5 => {
                    attempt += 1;
                    tracing::warn!(%error, attempt, "recording an invocation's outcome; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
                Err(error) => return Err(error),
            }
        }
        advance(&mut state, &mut events, finished);
        Ok(self.report_of(&state, &user, &id, &events, built))
    }

    /// `tools/call` with the user's token (refreshed once after a 401), in the connection's
    /// session. A failure is a code and a sentence for the `failed` outcome.
    async fn call(
        &self,
        server_id: ServerId,
        user: &UserId,
        url: &str,
        tool: &str,
        arguments: JsonObject,
    ) -> Result<CallToolResult, (String, String)> {
        // A trusted session is open already (a server's URL never changes): the URL is
        // only parsed for a new one.
        if let Some(session) = self.trusted_session(server_id, user) {
            match self
                .call_in_session(
                    server_id,
                    user,
                    CallToken::Trusted(session),
                    tool,
                    arguments.clone(),
                )
                .await
            {
                // Refused (expired or revoked meanwhile; the server ran nothing): the
                // connection service's token, refreshed once after another 401.
                Err(mcp::McpCallError::Unauthorized { .. }) => {}
                other => {
                    return other.map_err(|error| (error.code().to_owned(), error.to_string()));
                }
            }
        }
        let url = Url::parse(url).map_err(|_| {
            (
                "server_url_invalid".to_owned(),
                "the server's URL cannot be used".to_owned(),
            )
        })?;
        self.inner
            .connections
            .with_token(server_id, user, |token| {
                let (this, url, user, tool, arguments) = (
                    self.clone(),
                    url.clone(),
                    user.clone(),
                    tool.to_owned(),
                    arguments.clone(),
                );
                async move {
                    this.call_in_session(
                        server_id,
                        &user,
                        CallToken::Vouched(token, url),
                        &tool,
                        arguments,
                    )
                    .await
                }
            })
            .await
            .map_err(|error| {
                let code = match &error {
                    connection::ConnectionError::ReauthorizationRequired { .. } => "auth_error",
                    other => other.code(),
                };
                (code.to_owned(), error.to_string())
            })
    }

    /// The report of the invocation as `events` describe it.
    pub(crate) fn report(
        &self,
        user: &UserId,
        id: &InvocationId,
        events: &[Event],
    ) -> InvocationReport {
        let state = InvocationState::from_events(events.iter());
        self.report_of(&state, user, id, events, None)
    }

    /// [`Invoker::report`] for `state`, the invocation as `events` describe it, and its
    /// `result` where the caller has it at hand (else a completed one's is looked up).
    fn report_of(
        &self,
        state: &InvocationState,
        user: &UserId,
        id: &InvocationId,
        events: &[Event],
        result: Option<Arc<ResultEnvelope>>,
    ) -> InvocationReport {
        let mut report = InvocationReport {
            invocation_id: id.as_str().to_owned(),
            outcome: Outcome::Running,
            reason: None,
            message: None,
            result: None,
        };
        for event in events {
            match event {
                Event::InvocationRejected(e) => {
                    report.reason = Some(e.reason_code.clone());
                    report.message = Some(e.message.clone());
                }
                Event::InvocationFailed(e) => {
                    report.reason = Some(e.error_code.clone());
                    report.message = Some(e.message.clone());
                }
                Event::InvocationDenied(e) if e.withdrawn => {
                    report.reason = Some("withdrawn".to_owned());
                    report.message =
                        Some("the orchestrator withdrew the request before a decision".to_owned());
                }
                Event::InvocationDenied(e) => {
                    report.reason = Some("denied_by_user".to_owned());
                    report.message = (!e.reason.is_empty()).then(|| e.reason.clone());
                }
                Event::InvocationExpired(_) => {
                    report.reason = Some("approval_expired".to_owned());
                }
                // Captured whole. (Cut to fit the event, it names the process holding the
                // whole result: that one is asked first.)
                Event::InvocationCompleted(e)
                    if e.result_held_by.is_empty() && result.is_none() =>
                {
                    report.result = captured_result(e);
                }
                _ => {}
            }
        }
        report.outcome = match state.status() {
            InvocationStatus::NotRequested
            | InvocationStatus::Ready { .. }
            | InvocationStatus::Running => Outcome::Running,
            InvocationStatus::AwaitingApproval { .. } => Outcome::AwaitingApproval,
            InvocationStatus::Rejected { .. } => Outcome::Rejected,
            InvocationStatus::Denied => Outcome::Denied,
            InvocationStatus::Expired => Outcome::Expired,
            InvocationStatus::Completed { .. } => Outcome::Completed,
            InvocationStatus::Failed { .. } => Outcome::Failed,
        };
        if report.outcome == Outcome::Completed && report.result.is_none() {
            report.result = result.or_else(|| self.remembered_result(user, id.as_str()));
        }
        report
    }
    /// Envelopes for `user`'s invocation `id`: each event that settles something carries the
    /// event id every competing writer derives, and a `write_id` of its own.
    pub(crate) fn envelopes(
        &self,
        context: &CommandContext,
        user: &UserId,
        id: &InvocationId,
        events: Vec<Event>,
    ) -> Vec<Envelope> {
        let mut envelopes = self.inner.envelopes.wrap(context, events);
        for envelope in &mut envelopes {
            if let Some(settles) = envelope.event.as_ref().and_then(Settles::of) {
                envelope.write_id = std::mem::replace(
                    &mut envelope.event_id,
                    invocation::settling_event_id(user, id, settles),
                );
            }
        }
        envelopes
    }

    /// Appends an envelope from [`Invoker::envelopes`] that settles something: stored once
    /// per invocation whoever writes it, so this finds out whose is stored.
    async fn append_settling(
        &self,
        subject: &Subject,
        envelope: &Envelope,
    ) -> Result<Settled, InvokerError> {
        let log = &self.inner.log;
        let appended = log
            .append(
                subject,
                ExpectedVersion::Any,
                std::slice::from_ref(envelope),
            )
            .await?;
        if !appended.duplicate {
            return Ok(Settled::Ours(appended.last_sequence));
        }
        // Stored before: by an earlier attempt of this very write (a lost acknowledgement),
        // or by a competitor.
        let stored = log
            .read_event(LogKind::Invocations, appended.last_sequence)
            .await?;
        Ok(match stored {
            Some(stored)
                if stored.envelope.event_id == envelope.event_id
                    && stored.envelope.write_id == envelope.write_id =>
            {
                Settled::Ours(appended.last_sequence)
            }
            _ => Settled::Theirs(appended.last_sequence),
        })
    }

    /// Appends `envelopes` one by one, in order (one event a write: a batch costs
    /// milliseconds on JetStream): the last one's sequence, or `None` when one that settles
    /// something was settled by a competitor first, and nothing after it was written.
    pub(crate) async fn append_all(
        &self,
        subject: &Subject,
        envelopes: &[Envelope],
    ) -> Result<Option<u64>, InvokerError> {
        let mut last = None;
        for envelope in envelopes {
            if envelope.write_id.is_empty() {
                let appended = self
                    .inner
                    .log
                    .append(
                        subject,
                        ExpectedVersion::Any,
                        std::slice::from_ref(envelope),
                    )
                    .await?;
                last = Some(appended.last_sequence);
            } else {
                match self.append_settling(subject, envelope).await? {
                    Settled::Ours(sequence) => last = Some(sequence),
                    Settled::Theirs(_) => return Ok(None),
                }
            }
        }
        Ok(last)
    }

    /// Where `user`'s invocation `id` is, as this process's read model knows it now.
    pub(crate) fn whereabouts_now(&self, user: &UserId, id: &InvocationId) -> Option<Whereabouts> {
        self.inner.read_models.open_invocations.read(|open| {
            open.locate(user.as_str(), id.as_str())
                .map(Whereabouts::from)
        })
    }

    /// Where `user`'s invocation `id` is, once the read model has everything the log held
    /// when asked (the invocation may have been requested on another process a moment ago).
    async fn whereabouts(
        &self,
        user: &UserId,
        id: &InvocationId,
    ) -> Result<Option<Whereabouts>, InvokerError> {
        let end = self.inner.log.last_sequence(LogKind::Invocations).await?;
        let models = &self.inner.read_models;
        if !models
            .wait_for_position(LogKind::Invocations, end, INDEX_CATCH_UP)
            .await
        {
            return Err(EventLogError::Unavailable {
                reason: "the open invocations read model is behind the log; try again".to_owned(),
            }
            .into());
        }
        Ok(self.whereabouts_now(user, id))
    }

    /// The invocation's events as recorded, and the last sequence read: a finished one's
    /// request and outcome (two point reads), an open one's events from its request on.
    pub(crate) async fn load(
        &self,
        user: &UserId,
        id: &InvocationId,
        known: Whereabouts,
    ) -> Result<(Vec<Event>, u64), InvokerError> {
        let log = &self.inner.log;
        if let Some(outcome_sequence) = known.outcome_sequence {
            let mut events = Vec::with_capacity(2);
            for sequence in [known.requested_sequence, outcome_sequence] {
                if let Some(event) = log
                    .read_event(LogKind::Invocations, sequence)
                    .await?
                    .and_then(|recorded| recorded.envelope.event)
                {
                    events.push(event);
                }
            }
            return Ok((events, outcome_sequence));
        }
        let subject = invocation_subject(user)?;
        let filter = SubjectFilter::exact(&subject);
        let mut stream = log
            .read_from(
                LogKind::Invocations,
                known.requested_sequence,
                Some(&filter),
            )
            .await?;
        let mut events = Vec::new();
        let mut seen = known.requested_sequence.saturating_sub(1);
        while let Some(recorded) = stream.next().await {
            let recorded = match recorded {
                Ok(recorded) => recorded,
                Err(EventLogError::Corrupt { .. }) => continue,
                Err(error) => return Err(error.into()),
            };
            seen = recorded.sequence;
            if let Some(event) = recorded.envelope.event
                && invocation_id_of(&event) == Some(id.as_str())
            {
                events.push(event);
            }
        }
        Ok((events, seen))
    }

    /// The outcome once it is final (or, unless `through_approval`, awaiting approval), or
    /// as it is after `limit`. Follows the user's subject after `seen` for this invocation's
    /// events.
    #[allow(clippy::too_many_arguments)]
    async fn await_outcome(
        &self,
        user: &UserId,
        id: &InvocationId,
        seen: u64,
        mut events: Vec<Event>,
        limit: Duration,
        through_approval: bool,
    ) -> Result<InvocationReport, InvokerError> {
        let settled = |report: &InvocationReport| {
            report.outcome.is_final()
                || (report.outcome == Outcome::AwaitingApproval && !through_approval)
        };
        let mut report = self.report(user, id, &events);
        let stopping = &self.inner.stopping;
        if !(settled(&report) || limit.is_zero() || stopping.is_cancelled()) {
            let until = tokio::time::Instant::now() + limit;
            let subject = invocation_subject(user)?;
            let filter = SubjectFilter::exact(&subject);
            let mut stream = self
                .inner
                .log
                .subscribe(LogKind::Invocations, seen + 1, Some(&filter))
                .await?;
            loop {
                let next = tokio::select! {
                    () = stopping.cancelled() => break,
                    next = tokio::time::timeout_at(until, stream.next()) => next,
                };
                match next {
                    Err(_) | Ok(None) => break,
                    Ok(Some(Ok(recorded))) => {
                        if let Some(event) = recorded.envelope.event
                            && invocation_id_of(&event) == Some(id.as_str())
                        {
                            events.push(event);
                            report = self.report(user, id, &events);
                            if settled(&report) {
                                break;
                            }
                        }
                    }
                    Ok(Some(Err(EventLogError::Corrupt { .. }))) => {}
                    Ok(Some(Err(error))) => return Err(error.into()),
                }
            }
        }
        if report.outcome == Outcome::Completed && report.result.is_none() {
            report.result = match self.result_from_holder(user, id, &events).await {
                Some(whole) => Some(whole),
                // The holder gone: what the log captured of it, cut.
                None => events.iter().rev().find_map(|event| match event {
                    Event::InvocationCompleted(e) => captured_result(e),
                    _ => None,
                }),
            };
        }
        Ok(report)
    }

    /// A completed invocation's result that another process holds in memory (it made the
    /// call, and payloads are not captured), fetched from it, or handed over in the vault
    /// when it stopped; `None` when neither has it.
    async fn result_from_holder(
        &self,
        user: &UserId,
        id: &InvocationId,
        events: &[Event],
    ) -> Option<Arc<ResultEnvelope>> {
        let holder = events.iter().rev().find_map(|event| match event {
            Event::InvocationCompleted(completed) => Some(completed.result_held_by.as_str()),
            _ => None,
        })?;
        if holder.is_empty() || holder == self.inner.instance {
            return None;
        }
        let fetched = match self.inner.result_peers.get() {
            Some(peers) => peers.fetch(holder, user, id.as_str()).await,
            None => None,
        };
        // The holder stopped (or this process cannot ask it): what it handed over.
        let fetched = match fetched {
            Some(result) => Some(result),
            None => self.handed_over_result(user, id).await,
        };
        if let Some(result) = &fetched {
            // Kept here too: the next look-up need not ask again.
            let key = domain::projections::invocation_key(user.as_str(), id.as_str());
            self.remember_result(key, result.clone());
        }
        fetched
    }
}

/// Work that is polled where it is awaited and, if dropped before it is done, finishes in a
/// task of its own (its output then goes nowhere): what an invocation's caller starts (a
/// claim, a decision, a call) is seen through whether or not the caller waits for it.
/// (Spawning it up front would cost a task hand-over each way on every call, to guard
/// against what rarely happens.)
struct FinishOnDrop<T: Send + 'static>(
    Option<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>>,
);

impl<T: Send + 'static> FinishOnDrop<T> {
    fn new(work: impl std::future::Future<Output = T> + Send + 'static) -> Self {
        FinishOnDrop(Some(Box::pin(work)))
    }
}

impl<T: Send + 'static> std::future::Future for FinishOnDrop<T> {
    type Output = T;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let Some(future) = self.0.as_mut() else {
            // Polled again after it finished (a caller's bug): nothing more, as
            // `futures::future::Fuse` does.
            return std::task::Poll::Pending;
        };
        let output = std::task::ready!(future.as_mut().poll(cx));
        self.0 = None;
        std::task::Poll::Ready(output)
    }
}

impl<T: Send + 'static> Drop for FinishOnDrop<T> {
    fn drop(&mut self) {
        if let Some(future) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(future);
                }
                // No runtime: the process is shutting down, and the sweeper of the next
                // start records the invocation as interrupted.
                Err(_) => tracing::warn!("an invocation was dropped mid-way outside a runtime"),
            }
        }
    }
}
