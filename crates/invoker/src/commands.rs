//! The invoker's commands: list a user's tools, invoke one, look an invocation up, decide an
//! approval.
//!
//! **At most once.** Each invocation has its own subject, and its `InvocationRequested` is
//! appended with "no events yet": of any number of requests with one id — retries,
//! concurrent duplicates, other processes, after a restart — exactly one append succeeds,
//! and only its request goes on. An invocation that waits for approval is run by whoever
//! appends the one `InvocationApproved` (an expected-version append too). Every later event
//! is appended at the version its writer loaded, so the sweeper closing a stalled invocation
//! and its owner never both record an outcome. A duplicate loses the claim, checks that it is
//! the same request (`invocation_id_reused` otherwise) and waits for the recorded outcome.
//!
//! **Two appends per call.** An allowed request records its start (`started`), so an allowed
//! invocation is the claim, the call, and its outcome: one append before the call and one
//! after it.
//!
//! **No serialisation per user.** A user's parallel invocations are on different subjects:
//! their appends never conflict, and loading one reads its own few events.
use std::{sync::Arc, time::Duration};

use domain::{Aggregate, Event};
use domain::{
    ApiConnectionStatus, InvocationId, ServerId, ToolState, UserId,
    invocation::{
        self, InvocationCommand, InvocationRequest, InvocationState, InvocationStatus, ResolvedTool,
    },
};
use eventlog::{EventLogError, ExpectedVersion, LogKind, Subject, SubjectFilter};
use futures_util::StreamExt;
use rmcp::model::{CallToolResult, JsonObject};
use serde::Serialize;
use serde_json::Value;
use service_kit::CommandContext;
use url::Url;

use crate::{Invoker, InvokerError, ResultEnvelope, ResultServer, result::sha256_hex};

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
    pub server: ResultServer,
    /// The arguments the user decides on.
    pub arguments: Value,
    pub requested_at: std::time::SystemTime,
    pub expires_at: std::time::SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Approve,
    Deny,
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
    version: u64,
    events: Vec<Event>,
    user: UserId,
    id: InvocationId,
    server_id: ServerId,
    server_name: String,
    url: String,
    tool_name: String,
    arguments: JsonObject,
    deadline: Duration,
}

/// How long a duplicate waits beyond the deadline for the owner to record the outcome.
const RECORDING_GRACE: Duration = Duration::from_secs(5);

pub fn invocation_subject(user: &UserId, id: &InvocationId) -> Result<Subject, InvokerError> {
    Ok(Subject::parse(&invocation::subject(user, id))?)
}

fn events_of(history: &eventlog::AggregateHistory) -> Vec<Event> {
    history
        .events
        .iter()
        .filter_map(|e| e.envelope.event.clone())
        .collect()
}

impl Invoker {
    fn now(&self) -> std::time::SystemTime {
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
        if arguments_json.len() > settings.max_arguments_bytes {
            return Err(InvokerError::ArgumentsTooLarge {
                size: arguments_json.len(),
                max: settings.max_arguments_bytes,
            });
        }
        let id = request.invocation_id.clone();
        let subject = invocation_subject(&request.user, &id)?;
        let resolved = self.resolve(&request.user, &request.tool);
        let command = InvocationCommand::Request(InvocationRequest {
            user_id: request.user.clone(),
            exposed_tool_name: request.tool.clone(),
            arguments_sha256: sha256_hex(arguments_json.as_bytes()),
            arguments_size_bytes: arguments_json.len() as u64,
            arguments_json,
            capture_arguments: settings.capture_payloads,
            resolved: resolved.as_ref().map(|r| r.tool.clone()),
            approval_timeout: settings.approval_timeout,
        });
        let now = self.now();
        let events = invocation::decide(&InvocationState::default(), &id, command.clone(), now)?;
        let envelopes = self.inner.envelopes.wrap(context, events.clone());
        match self
            .inner
            .log
            .append(&subject, ExpectedVersion::NoEvents, &envelopes)
            .await
        {
            Ok(appended) => {
                let state = InvocationState::from_events(events.iter());
                match (state.status(), resolved) {
                    (InvocationStatus::Running, Some(resolved)) => {
                        self.run_to_completion(Run {
                            context: context.clone(),
                            subject,
                            version: appended.last_sequence,
                            events,
                            user: request.user,
                            id,
                            server_id: resolved.tool.server_id,
                            server_name: resolved.server_name,
                            url: resolved.url,
                            tool_name: resolved.tool.tool.as_str().to_owned(),
                            arguments: request.arguments,
                            deadline,
                        })
                        .await
                    }
                    _ => Ok(self.report(&request.user, &id, &events)),
                }
            }
            Err(error) if error.is_conflict() => {
                // The id is claimed already. Same request: its outcome; else refused.
                let history = self.inner.log.read_aggregate(&subject).await?;
                let events = events_of(&history);
                let state = InvocationState::from_events(events.iter());
                invocation::decide(&state, &id, command, now)?;
                self.await_outcome(
                    &request.user,
                    &id,
                    &subject,
                    history.version,
                    events,
                    deadline + RECORDING_GRACE,
                    false,
                )
                .await
            }
            Err(error) => Err(error.into()),
        }
    }

    /// The current outcome of `user`'s invocation `id`; with `wait`, waits up to that long
    /// for a final one (through an approval too).
    pub async fn status(
        &self,
        user: &UserId,
        id: &InvocationId,
        wait: Duration,
    ) -> Result<InvocationReport, InvokerError> {
        let subject = invocation_subject(user, id)?;
        let history = self.inner.log.read_aggregate(&subject).await?;
        if history.version == 0 {
            return Err(domain::DomainError::InvocationNotFound.into());
        }
        let events = events_of(&history);
        self.await_outcome(user, id, &subject, history.version, events, wait, true)
            .await
    }

    /// The user's invocations waiting for their decision, oldest first.
    pub fn pending_approvals(&self, user: &UserId) -> Vec<PendingApproval> {
        let models = &self.inner.read_models;
        let pending: Vec<PendingApproval> = models.open_invocations.read(|open| {
            open.pending_approvals_of(user.as_str())
                .into_iter()
                .map(|o| PendingApproval {
                    invocation_id: o.invocation_id.clone(),
                    tool: o.exposed_tool_name.clone(),
                    tool_name: o.tool_name.clone(),
                    server: ResultServer {
                        id: o.server_id.clone(),
                        name: String::new(),
                    },
                    arguments: serde_json::from_str(&o.arguments_json).unwrap_or(Value::Null),
                    requested_at: o.requested_at(),
                    expires_at: o.approval_expires_at().unwrap_or(o.requested_at()),
                })
                .collect()
        });
        pending
            .into_iter()
            .map(|mut p| {
                if let Ok(server_id) = ServerId::parse(&p.server.id) {
                    p.server.name = models
                        .servers
                        .read(|d| d.get(server_id).map(|s| s.name.clone()))
                        .unwrap_or_default();
                }
                p
            })
            .collect()
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
        let report = self.decide_and_run(context, user, id, decision).await?;
        self.announce_approval_outcome(&report);
        Ok(report)
    }

    async fn decide_and_run(
        &self,
        context: &CommandContext,
        user: &UserId,
        id: &InvocationId,
        decision: Decision,
    ) -> Result<InvocationReport, InvokerError> {
        let subject = invocation_subject(user, id)?;
        let now = self.now();
        let written = service_kit::execute::<InvocationState, _>(
            &*self.inner.log,
            &self.inner.envelopes,
            &subject,
            context,
            |state| {
                let command = match decision {
                    Decision::Approve => InvocationCommand::Approve { by: user.clone() },
                    Decision::Deny => InvocationCommand::Deny {
                        by: user.clone(),
                        reason: String::new(),
                    },
                };
                invocation::decide(state, id, command, now)
            },
        )
        .await?;
        let history = self.inner.log.read_aggregate(&subject).await?;
        let events = events_of(&history);
        let state = InvocationState::from_events(events.iter());
        let approved_now = decision == Decision::Approve && written.changed_anything();
        if !approved_now || !matches!(state.status(), InvocationStatus::Ready { .. }) {
            return Ok(self.report(user, id, &events));
        }
        let Some(request) = state.request().cloned() else {
            return Ok(self.report(user, id, &events));
        };
        let arguments: JsonObject =
            serde_json::from_str(&request.arguments_json).unwrap_or_default();
        let server = ServerId::parse(&request.server_id)
            .ok()
            .and_then(|server_id| {
                self.inner.read_models.servers.read(|d| {
                    d.get(server_id)
                        .map(|s| (server_id, s.enabled, s.name.clone(), s.url.clone()))
                })
            });
        let Some((server_id, true, server_name, url)) = server else {
            // The server was deleted or disabled while the user decided: never called.
            return self
                .record_failure(
                    context,
                    &subject,
                    history.version,
                    user,
                    id,
                    events,
                    "server_disabled",
                    "the server was disabled or deleted before the approved call",
                )
                .await;
        };
        self.run_to_completion(Run {
            context: context.clone(),
            subject,
            version: history.version,
            events,
            user: user.clone(),
            id: id.clone(),
            server_id,
            server_name,
            url,
            tool_name: request.tool_name,
            arguments,
            deadline: self.deadline(None)?,
        })
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn record_failure(
        &self,
        context: &CommandContext,
        subject: &Subject,
        version: u64,
        user: &UserId,
        id: &InvocationId,
        mut events: Vec<Event>,
        code: &str,
        message: &str,
    ) -> Result<InvocationReport, InvokerError> {
        let state = InvocationState::from_events(events.iter());
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
        let envelopes = self.inner.envelopes.wrap(context, failed.clone());
        match self
            .inner
            .log
            .append(subject, ExpectedVersion::At(version), &envelopes)
            .await
        {
            Ok(_) => {
                events.extend(failed);
                Ok(self.report(user, id, &events))
            }
            Err(error) if error.is_conflict() => self.status(user, id, Duration::ZERO).await,
            Err(error) => Err(error.into()),
        }
    }

    /// Runs the call in the caller's task, and — should the caller go away before it is
    /// done (a closed HTTP request) — in a task of its own from there on, so that a started
    /// invocation is never left without its outcome. (Spawning it up front cost a task
    /// hand-over each way on every call, to guard against what rarely happens.)
    async fn run_to_completion(&self, run: Run) -> Result<InvocationReport, InvokerError> {
        let this = self.clone();
        FinishOnDrop(Some(Box::pin(async move { this.run(run).await }))).await
    }

    async fn run(&self, run: Run) -> Result<InvocationReport, InvokerError> {
        let Run {
            context,
            subject,
            version,
            mut events,
            user,
            id,
            server_id,
            server_name,
            url,
            tool_name,
            arguments,
            deadline,
        } = run;
        let state = InvocationState::from_events(events.iter());
        // An approved invocation is started here. Its `InvocationStarted` is appended while
        // the call goes out, not before it: the right to call was settled by the approval
        // (the one `InvocationApproved` append that succeeded), so nobody else can start it
        // and waiting for the append would only add its latency to the call. `Started` still
        // precedes the outcome in the log. (An allowed invocation's request recorded its
        // start already: its claim is the one append before the call.)
        let started = match state.status() {
            InvocationStatus::Running => Vec::new(),
            _ => invocation::decide(&state, &id, InvocationCommand::Start, self.now())?,
        };
        let envelopes = self.inner.envelopes.wrap(&context, started.clone());
        let began = tokio::time::Instant::now();
        let calling = async {
            let answer = tokio::time::timeout(
                deadline,
                self.call(server_id, &user, &url, &tool_name, arguments),
            )
            .await;
            (answer, began.elapsed())
        };
        let appending = async {
            if envelopes.is_empty() {
                return Ok(version);
            }
            self.inner
                .log
                .append(&subject, ExpectedVersion::At(version), &envelopes)
                .await
                .map(|appended| appended.last_sequence)
        };
        let (appended, (answer, took)) = tokio::join!(appending, calling);
        let started_at = match appended {
            Ok(last_sequence) => last_sequence,
            Err(error) if error.is_conflict() => {
                // Only the sweeper writes here meanwhile, and only long after the deadline:
                // what it recorded stands.
                tracing::warn!(
                    invocation = id.as_str(),
                    "an invocation was closed by someone else while it ran"
                );
                return self.status(&user, &id, Duration::ZERO).await;
            }
            Err(error) => return Err(error.into()),
        };
        events.extend(started);
        let duration_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        let command = match answer {
            Ok(Ok(result)) => {
                let server = ResultServer {
                    id: server_id.to_string(),
                    name: server_name,
                };
                let limit = self.inner.settings.result_limit_bytes;
                let (envelope, digest) = ResultEnvelope::build(server, tool_name, result, limit);
                let envelope = Arc::new(envelope);
                let result_json = if self.inner.settings.capture_payloads {
                    serde_json::to_string(&*envelope).unwrap_or_default()
                } else {
                    String::new()
                };
                // Before the event: whoever sees `InvocationCompleted` here finds the result.
                self.remember_result(&user, id.as_str(), envelope.clone());
                InvocationCommand::Complete {
                    is_error: envelope.is_error,
                    duration_ms,
                    result_size_bytes: digest.size_bytes,
                    result_sha256: digest.sha256,
                    truncated: envelope.truncated,
                    result_json,
                }
            }
            Ok(Err((error_code, message))) => InvocationCommand::Fail {
                error_code,
                message,
                duration_ms,
            },
            Err(_) => InvocationCommand::Fail {
                error_code: "deadline_exceeded".to_owned(),
                message: format!(
                    "the tool did not answer within the deadline of {} ms",
                    deadline.as_millis()
                ),
                duration_ms,
            },
        };
        let state = InvocationState::from_events(events.iter());
        let finished = invocation::decide(&state, &id, command, self.now())?;
        let envelopes = self.inner.envelopes.wrap(&context, finished.clone());
        // The outcome must be recorded: retry what the store could not take (an append is
        // idempotent per event id, so a retry after a lost acknowledgement writes once).
        let mut attempt: u32 = 0;
        loop {
            match self
                .inner
                .log
                .append(&subject, ExpectedVersion::At(started_at), &envelopes)
                .await
            {
                Ok(_) => break,
                Err(error) if error.is_conflict() => {
                    return self.status(&user, &id, Duration::ZERO).await;
                }
                Err(error @ (EventLogError::Unavailable { .. } | EventLogError::Closed))
                    if attempt < 5 =>
                {
                    attempt += 1;
                    tracing::warn!(%error, attempt, "recording an invocation's outcome; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
                Err(error) => return Err(error.into()),
            }
        }
        events.extend(finished);
        Ok(self.report(&user, &id, &events))
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
        let url = Url::parse(url).map_err(|_| {
            (
                "server_url_invalid".to_owned(),
                "the server's URL cannot be used".to_owned(),
            )
        })?;
        if let Some(token) = self.reusable_token(server_id, user) {
            match self
                .call_in_session(server_id, user, &url, token, tool, arguments.clone())
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
                    this.call_in_session(server_id, &user, &url, token, &tool, arguments)
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
                Event::InvocationDenied(e) => {
                    report.reason = Some("denied_by_user".to_owned());
                    report.message = (!e.reason.is_empty()).then(|| e.reason.clone());
                }
                Event::InvocationExpired(_) => {
                    report.reason = Some("approval_expired".to_owned());
                }
                Event::InvocationCompleted(e) if !e.result_json.is_empty() => {
                    report.result = serde_json::from_str(&e.result_json).ok().map(Arc::new);
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
            report.result = self.remembered_result(user, id.as_str());
        }
        report
    }

    /// The outcome once it is final (or, unless `through_approval`, awaiting approval), or
    /// as it is after `limit`. Follows the invocation's own subject from `version`.
    #[allow(clippy::too_many_arguments)]
    async fn await_outcome(
        &self,
        user: &UserId,
        id: &InvocationId,
        subject: &Subject,
        version: u64,
        mut events: Vec<Event>,
        limit: Duration,
        through_approval: bool,
    ) -> Result<InvocationReport, InvokerError> {
        let settled = |report: &InvocationReport| {
            report.outcome.is_final()
                || (report.outcome == Outcome::AwaitingApproval && !through_approval)
        };
        let mut report = self.report(user, id, &events);
        if settled(&report) || limit.is_zero() {
            return Ok(report);
        }
        let until = tokio::time::Instant::now() + limit;
        let filter = SubjectFilter::exact(subject);
        let mut stream = self
            .inner
            .log
            .subscribe(LogKind::Invocations, version + 1, Some(&filter))
            .await?;
        loop {
            match tokio::time::timeout_at(until, stream.next()).await {
                Err(_) | Ok(None) => return Ok(report),
                Ok(Some(Ok(recorded))) => {
                    if let Some(event) = recorded.envelope.event {
                        events.push(event);
                        report = self.report(user, id, &events);
                        if settled(&report) {
                            return Ok(report);
                        }
                    }
                }
                Ok(Some(Err(EventLogError::Corrupt { .. }))) => {}
                Ok(Some(Err(error))) => return Err(error.into()),
            }
        }
    }
}

/// The run of one invocation, as `run_to_completion` awaits it.
type RunFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<InvocationReport, InvokerError>> + Send>,
>;

/// A run that is polled where it is awaited and, if dropped before it is done, finishes in a
/// task of its own (its report then goes nowhere).
struct FinishOnDrop(Option<RunFuture>);

impl std::future::Future for FinishOnDrop {
    type Output = Result<InvocationReport, InvokerError>;

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

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        if let Some(future) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(future);
                }
                // No runtime: the process is shutting down, and the sweeper of the next
                // start records the invocation as interrupted.
                Err(_) => tracing::warn!("an invocation was dropped mid-call outside a runtime"),
            }
        }
    }
}
