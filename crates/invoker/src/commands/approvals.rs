//! The user's decisions: pending approvals listed, approved, denied or withdrawn, and checked
//! against the settings in force before the approved call.

use std::time::{Duration, SystemTime};

use domain::Event;
use domain::{
    InvocationId, ServerId, UserId,
    invocation::{self, InForce, InvocationCommand, InvocationState, InvocationStatus, Refusal},
};
use eventlog::{LogKind, Subject};
use proto::v1::Envelope;
use rmcp::model::JsonObject;
use serde_json::Value;
use service_kit::CommandContext;

use super::{
    Decision, FinishOnDrop, InvocationReport, MAX_DENIAL_REASON_CHARS, Outcome, PendingApproval,
    PendingToolContext, Settled, WITHDRAWAL_WAIT, Whereabouts, advance, call::Run,
    fits_a_denial_reason, invocation_subject,
};
use crate::{Invoker, InvokerError, ResultServer, service::RunningCall};

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

impl Invoker {
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
        self.pending_approvals_among(user, None).await
    }

    /// The user's invocation `id`, as [`Self::pending_approvals`] lists it, while it waits
    /// for their decision (reading only its own arguments and request).
    pub async fn pending_approval(
        &self,
        user: &UserId,
        id: &InvocationId,
    ) -> Option<PendingApproval> {
        self.pending_approvals_among(user, Some(id)).await.pop()
    }

    /// The user's waiting invocations, or the one named `only`.
    async fn pending_approvals_among(
        &self,
        user: &UserId,
        only: Option<&InvocationId>,
    ) -> Vec<PendingApproval> {
        let models = &self.inner.read_models;
        let pending: Vec<domain::OpenInvocation> = models.open_invocations.read(|open| {
            open.pending_approvals_of(user.as_str())
                .into_iter()
                .filter(|open| only.is_none_or(|id| open.invocation_id == id.as_str()))
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
                    || !reason.chars().all(fits_a_denial_reason)
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
}
