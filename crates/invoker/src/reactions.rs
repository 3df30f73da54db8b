//! What the invoker does on its own: closes approvals nobody answered in time, and closes
//! invocations a stopped process left open (`interrupted`): approved or running ones, whose
//! call may or may not have reached the server and is never made again, after twice the
//! longest deadline; claimed ones without what follows the claim, never called, after
//! [`UNSETTLED_AFTER`]. The final outcome of an invocation that waited for approval is
//! announced, as the approving process announces it.
//!
//! Every `up` runs the sweeper; two processes closing one invocation record it once (an
//! expiry is the invocation's one decision, an interruption its one outcome: the loser finds
//! its competitor's event stored and does nothing).
use std::time::Duration;

use domain::{
    DomainError, Event, InvocationId, UserId,
    invocation::{self, InvocationCommand, InvocationState},
};
use eventlog::LogKind;
use service_kit::CommandContext;
use tokio_util::sync::CancellationToken;

use crate::{InvocationReport, Invoker, InvokerError, commands::invocation_subject};

const SERVICE: &str = "invoker";

/// How long a claimed invocation may go without what follows its claim (recorded at once
/// by the process that claimed it) before the sweeper closes it as never called.
const UNSETTLED_AFTER: Duration = Duration::from_secs(30);

/// An open invocation by (user id, invocation id).
type OpenKey = (String, String);

impl Invoker {
    /// Sweeps every `sweep_interval`, and closes idle MCP sessions every tenth of
    /// `session_idle` (at least every second), until `shutdown`.
    pub async fn run_sweeper(&self, shutdown: CancellationToken) {
        let settings = &self.inner.settings;
        let mut ticks = tokio::time::interval(settings.sweep_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut idle_checks =
            tokio::time::interval((settings.session_idle / 10).max(Duration::from_secs(1)));
        idle_checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = idle_checks.tick() => {
                    let closed = self.close_idle_sessions();
                    if closed > 0 {
                        tracing::debug!(closed, "closed idle MCP sessions");
                    }
                    continue;
                }
                _ = ticks.tick() => {}
            }
            if let Err(error) = self.sweep_once().await {
                tracing::warn!(%error, "invocation sweep failed; trying again at the next tick");
            }
        }
    }

    /// One sweep: expires overdue approvals and closes stalled invocations. Returns how many
    /// invocations it closed. The final outcome of each that waited for approval is
    /// announced (`sb.invoke.result.<id>`).
    pub async fn sweep_once(&self) -> Result<usize, InvokerError> {
        let now = self.inner.envelopes.clock().now();
        let stalled_after = self.inner.settings.stalled_after();
        let (expired, stalled, unsettled): (Vec<OpenKey>, Vec<OpenKey>, Vec<OpenKey>) =
            self.inner.read_models.open_invocations.read(|open| {
                let keys = |found: Vec<&domain::OpenInvocation>| {
                    found
                        .into_iter()
                        .map(|o| (o.user_id.clone(), o.invocation_id.clone()))
                        .collect()
                };
                (
                    keys(open.expired_approvals(now)),
                    keys(open.stalled(now, stalled_after)),
                    keys(open.unsettled(now, UNSETTLED_AFTER)),
                )
            });
        let interrupted = |message: &str| InvocationCommand::Fail {
            error_code: "interrupted".to_owned(),
            message: message.to_owned(),
            duration_ms: 0,
        };
        let closing = expired
            .into_iter()
            .map(|key| (key, InvocationCommand::Expire))
            .chain(stalled.into_iter().map(|key| {
                (
                    key,
                    interrupted(
                        "the process running this invocation stopped; the call may or may not \
                         have reached the server, and it is not repeated",
                    ),
                )
            }))
            .chain(unsettled.into_iter().map(|key| {
                (
                    key,
                    interrupted(
                        "the process handling this invocation stopped before it decided what \
                         to do with it; the server was not called",
                    ),
                )
            }));
        let mut closed = 0;
        for ((user, id), command) in closing {
            if let Some((report, waited_for_approval)) = self.close(&user, &id, command).await? {
                closed += 1;
                if waited_for_approval && let Ok(user) = UserId::parse(&user) {
                    self.announce_approval_outcome(&user, &report);
                }
            }
        }
        Ok(closed)
    }

    /// Records `command` for one open invocation; returns the invocation's report and
    /// whether it waited for approval, or `None` when the command no longer applies (another
    /// process decided first).
    async fn close(
        &self,
        user: &str,
        id: &str,
        command: InvocationCommand,
    ) -> Result<Option<(InvocationReport, bool)>, InvokerError> {
        let (Ok(user), Ok(id)) = (UserId::parse(user), InvocationId::parse(id)) else {
            return Ok(None);
        };
        let subject = invocation_subject(&user)?;
        // The sweep works from the read model: what it lists, it locates.
        let Some(known) = self.whereabouts_now(&user, &id) else {
            return Ok(None);
        };
        let (mut events, _) = self.load(&user, &id, known).await?;
        let state = InvocationState::replay(&id, &events);
        let now = self.inner.envelopes.clock().now();
        let decided = match invocation::decide(&state, &id, command, now) {
            Ok(decided) if !decided.is_empty() => decided,
            Ok(_)
            | Err(
                DomainError::InvocationFinished
                | DomainError::InvocationNotAwaitingApproval
                | DomainError::ApprovalNotExpired
                | DomainError::InvocationNotFound,
            ) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let envelopes = self.envelopes(
            &CommandContext::service(SERVICE),
            &user,
            &id,
            decided.clone(),
        );
        // `None`: another process (or the owner) settled it first.
        let Some(sequence) = self.append_all(&subject, &envelopes).await? else {
            return Ok(None);
        };
        // Closed, never to be called (again): its arguments, if the vault keeps them (the
        // approved call takes them; a process that stopped first may have left them), are
        // not needed any more.
        self.forget_pending_arguments(&user, &id, state.request())
            .await;
        events.extend(decided);
        let waited_for_approval = events.iter().any(|event| {
            matches!(event, Event::InvocationAwaitingApproval(awaiting)
                if awaiting.invocation_id == id.as_str())
        });
        // The projection shows it before the next sweep looks again.
        self.inner
            .read_models
            .wait_for_position(LogKind::Invocations, sequence, Duration::from_secs(5))
            .await;
        Ok(Some((
            self.report(&user, &id, &events),
            waited_for_approval,
        )))
    }
}
