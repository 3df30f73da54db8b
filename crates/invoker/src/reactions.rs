//! What the invoker does on its own: closes approvals nobody answered in time, and closes
//! invocations a stopped process left allowed, approved or running (`interrupted`: such a
//! call may or may not have reached the server, and it is never made again).
//!
//! Every `up` runs the sweeper; two processes closing one invocation record it once (an
//! expiry is the invocation's one decision, an interruption its one outcome: the loser finds
//! its competitor's event stored and does nothing).
use std::time::Duration;

use domain::{
    DomainError, InvocationId, UserId,
    invocation::{self, InvocationCommand, InvocationState},
};
use eventlog::LogKind;
use service_kit::CommandContext;
use tokio_util::sync::CancellationToken;

use crate::{Invoker, InvokerError, commands::invocation_subject};

const SERVICE: &str = "invoker";

/// An open invocation by (user id, invocation id).
type OpenKey = (String, String);

impl Invoker {
    /// Sweeps every `sweep_interval` until `shutdown`.
    pub async fn run_sweeper(&self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(self.inner.settings.sweep_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            if let Err(error) = self.sweep_once().await {
                tracing::warn!(%error, "invocation sweep failed; trying again at the next tick");
            }
        }
    }

    /// One sweep: expires overdue approvals and closes stalled invocations. Returns how many
    /// invocations it closed.
    pub async fn sweep_once(&self) -> Result<usize, InvokerError> {
        let now = self.inner.envelopes.clock().now();
        let stalled_after = self.inner.settings.stalled_after();
        let (expired, stalled): (Vec<OpenKey>, Vec<OpenKey>) =
            self.inner.read_models.open_invocations.read(|open| {
                let key = |o: &domain::OpenInvocation| (o.user_id.clone(), o.invocation_id.clone());
                (
                    open.expired_approvals(now).into_iter().map(key).collect(),
                    open.stalled(now, stalled_after)
                        .into_iter()
                        .map(key)
                        .collect(),
                )
            });
        let mut closed = 0;
        for (user, id) in expired {
            if self.close(&user, &id, InvocationCommand::Expire).await? {
                closed += 1;
                if let (Ok(user), Ok(id)) = (UserId::parse(&user), InvocationId::parse(&id))
                    && let Ok(report) = self.status(&user, &id, Duration::ZERO).await
                {
                    self.announce_approval_outcome(&report);
                }
            }
        }
        for (user, id) in stalled {
            let command = InvocationCommand::Fail {
                error_code: "interrupted".to_owned(),
                message: "the process running this invocation stopped; the call may or may not have reached the server, and it is not repeated".to_owned(),
                duration_ms: 0,
            };
            if self.close(&user, &id, command).await? {
                closed += 1;
            }
        }
        Ok(closed)
    }

    /// Records `command` for one open invocation; `false` when it no longer applies (another
    /// process decided first).
    async fn close(
        &self,
        user: &str,
        id: &str,
        command: InvocationCommand,
    ) -> Result<bool, InvokerError> {
        let (Ok(user), Ok(id)) = (UserId::parse(user), InvocationId::parse(id)) else {
            return Ok(false);
        };
        let subject = invocation_subject(&user)?;
        // The sweep works from the read model: what it lists, it locates.
        let Some(known) = self.whereabouts_now(&user, &id) else {
            return Ok(false);
        };
        let (events, _) = self.load(&user, &id, known).await?;
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
            ) => return Ok(false),
            Err(error) => return Err(error.into()),
        };
        let envelopes = self.envelopes(&CommandContext::service(SERVICE), &user, &id, decided);
        // `None`: another process (or the owner) settled it first.
        let Some(sequence) = self.append_all(&subject, &envelopes).await? else {
            return Ok(false);
        };
        // The projection shows it before the next sweep looks again.
        self.inner
            .read_models
            .wait_for_position(LogKind::Invocations, sequence, Duration::from_secs(5))
            .await;
        Ok(true)
    }
}
