//! The upstream call: made once, within its deadline, withdrawable, and its outcome recorded.

use std::{borrow::Cow, sync::Arc, time::Duration};

use domain::Event;
use domain::{
    InvocationId, ServerId, UserId,
    invocation::{self, InvocationCommand, InvocationState, InvocationStatus},
};
use eventlog::{EventLogError, ExpectedVersion, Subject};
use rmcp::model::{CallToolResult, JsonObject};
use service_kit::CommandContext;
use url::Url;

use super::{InvocationReport, advance};
use crate::{
    Invoker, InvokerError, ResultEnvelope, ResultServer,
    service::{CallToken, RunningCall},
};

/// Why a call ended without the server's answer.
enum CallCut {
    /// Its deadline passed.
    Deadline,
    /// The orchestrator withdrew it.
    Withdrawn,
    /// The orchestrator withdrew it before it went out (after its approval).
    WithdrawnFirst,
}

/// One upstream call to make, by the invocation's owner.
pub(super) struct Run {
    pub(super) context: CommandContext,
    pub(super) subject: Subject,
    /// The invocation's events so far that its report reads (outcomes and reasons: the
    /// request itself may be left out, `state` holds it).
    pub(super) events: Vec<Event>,
    /// The invocation as `events` describe it (carried along and advanced event by event:
    /// replaying clones the whole request each time).
    pub(super) state: InvocationState,
    pub(super) user: UserId,
    pub(super) id: InvocationId,
    pub(super) server_id: ServerId,
    pub(super) server_name: String,
    pub(super) url: String,
    pub(super) tool_name: String,
    pub(super) arguments: JsonObject,
    pub(super) deadline: Duration,
    /// The call's registration for withdrawals, when its approval made it here (before the
    /// approval was recorded, so that no withdrawal that sees the approval misses it).
    pub(super) withdrawal: Option<RunningCall>,
}

impl Invoker {
    /// The deadline a request recorded (`0`: the default), within today's longest.
    pub(super) fn recorded_deadline(&self, deadline_ms: u64) -> Duration {
        let settings = &self.inner.settings;
        let asked = match deadline_ms {
            0 => settings.default_deadline,
            ms => Duration::from_millis(ms),
        };
        asked.min(settings.max_deadline)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn record_failure(
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

    pub(super) async fn run(&self, run: Run) -> Result<InvocationReport, InvokerError> {
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
}
