//! An invocation requested: claimed once, then rejected, left waiting for approval, or called;
//! a duplicate joins the claimed one.

use std::time::Duration;

use domain::{Aggregate, Event};
use domain::{
    InvocationId, ToolState, UserId,
    invocation::{self, InvocationCommand, InvocationRequest, InvocationState, InvocationStatus},
};
use eventlog::{LogKind, Subject};
use proto::v1::Envelope;
use rmcp::model::JsonObject;
use service_kit::CommandContext;

use super::{
    FinishOnDrop, InvocationReport, InvokeRequest, Settled, Whereabouts, call::Run,
    invocation_subject, tools::Resolved,
};
use crate::{Invoker, InvokerError, pending_arguments, result::sha256_hex};

/// How long a duplicate waits beyond the deadline for the owner to record the outcome.
const RECORDING_GRACE: Duration = Duration::from_secs(5);

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

impl Invoker {
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
    pub(super) async fn until_the_store_answers<T, Attempt>(
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
}
