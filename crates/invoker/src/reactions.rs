//! What the invoker does on its own: closes approvals nobody answered in time, and closes
//! invocations a stopped process left open (`interrupted`): approved or running ones, whose
//! call may or may not have reached the server and is never made again, after twice the
//! longest deadline; claimed ones without what follows the claim, never called, after
//! [`UNSETTLED_AFTER`]; and fails requests waiting for approval that no approval could let
//! through any more (server disabled or deleted, tool blocked or withdrawn, connection
//! removed) once they have waited [`REFUSED_AFTER`]. The final outcome of an invocation that
//! waited for approval is announced, as the approving process announces it.
//!
//! Every `up` runs the sweeper; two processes closing one invocation record it once (an
//! expiry is the invocation's one decision, an interruption its one outcome: the loser finds
//! its competitor's event stored and does nothing).
use std::time::Duration;

use domain::{
    DomainError, Event, InvocationId, ServerId, UserId,
    invocation::{self, InvocationCommand, InvocationState, Refusal},
};
use eventlog::LogKind;
use service_kit::CommandContext;
use tokio_util::sync::CancellationToken;

use crate::{InvocationReport, Invoker, InvokerError, commands::invocation_subject};

const SERVICE: &str = "invoker";

/// How long a claimed invocation may go without what follows its claim (recorded at once
/// by the process that claimed it) before the sweeper closes it as never called.
const UNSETTLED_AFTER: Duration = Duration::from_secs(30);

/// How long a request must have waited for approval before the sweeper closes it as one
/// no approval could let through: the server and the settings it is checked against are
/// other logs', whose read models may be a moment behind this one's — a request made just
/// after its tool was unblocked, or its server enabled, elsewhere must not be taken for one
/// on a blocked tool or a disabled server.
const REFUSED_AFTER: Duration = Duration::from_secs(10);

/// An open invocation by (user id, invocation id).
type OpenKey = (String, String);

/// A request waiting for approval, as the sweeper weighs it.
struct Pending {
    key: OpenKey,
    server_id: String,
    tool_name: String,
}

/// Which requests waiting for approval [`Invoker::close_pending_refused`] weighs, and which
/// refusals close them how.
enum PendingScope<'a> {
    /// Every one that has waited [`REFUSED_AFTER`], for any refusal: failed.
    Settled,
    /// Those on a server an administrator just disabled or deleted here (this process's
    /// read model shows it), for that alone, however long they have waited: failed.
    OnServerGone(ServerId),
    /// The user's own on a server where they just blocked tools or removed their
    /// connection, for that: denied, as the user's own doing. (A tool the server withdrew
    /// is not the user's doing: left to the sweeper.)
    UserChanged { user: &'a UserId, server: ServerId },
}

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
        let sweeper = CommandContext::service(SERVICE);
        let mut closed = 0;
        for ((user, id), command) in closing {
            closed += usize::from(self.close_as(&sweeper, &user, &id, command).await?);
        }
        closed += self
            .close_pending_refused(&sweeper, PendingScope::Settled)
            .await?;
        Ok(closed)
    }

    /// After the user blocked tools of `server` or removed their connection to it: denies
    /// their requests on it that wait for approval and that no approval could now let
    /// through — the user's own doing, so recorded as their denial, with why — instead of
    /// leaving them listed, and their orchestrators waiting, until they expire. Returns how
    /// many it denied (one decided meanwhile stays as decided); a failure is logged, and the
    /// sweeper closes what is left.
    pub async fn deny_pending_now_refused(
        &self,
        context: &CommandContext,
        user: &UserId,
        server: ServerId,
    ) -> usize {
        self.close_pending_refused_or_log(context, PendingScope::UserChanged { user, server })
            .await
    }

    /// After an administrator disabled or deleted `server` (and this process's read model
    /// shows it): every user's requests on it that wait for approval, which no approval
    /// could let through any more, fail as `server_disabled` at once — off their users'
    /// approvals, their orchestrators told — instead of waiting until they expire. Returns
    /// how many it closed; a failure is logged. The sweeper closes them too, later, wherever
    /// the change was made.
    pub async fn fail_pending_on_server_gone(
        &self,
        context: &CommandContext,
        server: ServerId,
    ) -> usize {
        self.close_pending_refused_or_log(context, PendingScope::OnServerGone(server))
            .await
    }

    /// [`Self::close_pending_refused`] after a change: what the store did not take is logged
    /// (the change itself stands), and the sweeper closes it later.
    async fn close_pending_refused_or_log(
        &self,
        context: &CommandContext,
        scope: PendingScope<'_>,
    ) -> usize {
        match self.close_pending_refused(context, scope).await {
            Ok(closed) => closed,
            Err(error) => {
                tracing::warn!(%error, "could not close the requests waiting for approval that a change refuses; the sweeper will");
                0
            }
        }
    }

    /// Closes, saying why, the requests in `scope` that wait for approval and that no
    /// approval could let through now: server disabled or deleted, tool blocked or no longer
    /// offered, connection removed (an approval would only record the failure; the user
    /// would see the prompt, and the orchestrator wait, for nothing). Returns how many.
    async fn close_pending_refused(
        &self,
        context: &CommandContext,
        scope: PendingScope<'_>,
    ) -> Result<usize, InvokerError> {
        let now = self.inner.envelopes.clock().now();
        let server_text = match &scope {
            PendingScope::OnServerGone(server) | PendingScope::UserChanged { server, .. } => {
                server.to_string()
            }
            PendingScope::Settled => String::new(),
        };
        let in_scope = |o: &domain::OpenInvocation| match &scope {
            PendingScope::Settled => now
                .duration_since(o.since())
                .is_ok_and(|waited| waited >= REFUSED_AFTER),
            PendingScope::OnServerGone(_) => o.server_id == server_text,
            PendingScope::UserChanged { user, .. } => {
                o.user_id == user.as_str() && o.server_id == server_text
            }
        };
        let pending: Vec<Pending> = self.inner.read_models.open_invocations.read(|open| {
            open.pending_approvals()
                .filter(|o| in_scope(o))
                .map(|o| Pending {
                    key: (o.user_id.clone(), o.invocation_id.clone()),
                    server_id: o.server_id.clone(),
                    tool_name: o.tool_name.clone(),
                })
                .collect()
        });
        let mut closed = 0;
        for pending in pending {
            let Ok(user) = UserId::parse(&pending.key.0) else {
                continue;
            };
            let Some(refusal) =
                self.refusal_of_pending(&user, &pending.server_id, &pending.tool_name)
            else {
                continue;
            };
            let fail = |refusal: Refusal| InvocationCommand::Fail {
                error_code: refusal.code().to_owned(),
                message: refused(refusal, "while the request waited for approval"),
                duration_ms: 0,
            };
            let command = match (&scope, refusal) {
                (PendingScope::Settled, refusal) => fail(refusal),
                (PendingScope::OnServerGone(_), Refusal::ServerDisabled) => fail(refusal),
                (PendingScope::UserChanged { .. }, Refusal::Blocked | Refusal::Disconnected) => {
                    InvocationCommand::Deny {
                        reason: denied_by_the_change(refusal).to_owned(),
                        by: user,
                        withdrawn: false,
                    }
                }
                _ => continue,
            };
            let (user, id) = pending.key;
            closed += usize::from(self.close_as(context, &user, &id, command).await?);
        }
        Ok(closed)
    }

    /// [`Self::close`] on behalf of `context`, announcing the outcome of an invocation that
    /// waited for approval; whether it closed it.
    async fn close_as(
        &self,
        context: &CommandContext,
        user: &str,
        id: &str,
        command: InvocationCommand,
    ) -> Result<bool, InvokerError> {
        let Some((report, waited_for_approval)) = self.close(context, user, id, command).await?
        else {
            return Ok(false);
        };
        if waited_for_approval && let Ok(user) = UserId::parse(user) {
            self.announce_approval_outcome(&user, &report);
        }
        Ok(true)
    }

    /// Records `command` for one open invocation on behalf of `context`; returns the
    /// invocation's report and whether it waited for approval, or `None` when the command no
    /// longer applies (another process decided first).
    async fn close(
        &self,
        context: &CommandContext,
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
        let envelopes = self.envelopes(context, &user, &id, decided.clone());
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

/// Why a user's own change denied their request.
fn denied_by_the_change(refusal: Refusal) -> &'static str {
    match refusal {
        Refusal::Blocked => "the user blocked the tool while the request waited",
        _ => "the user removed the connection while the request waited",
    }
}

/// What a call that what is in force refused says, `when` it was refused (while the request
/// waited for approval, once approved before its call).
pub(crate) fn refused(refusal: Refusal, when: &str) -> String {
    let (what, not_called) = match refusal {
        Refusal::ServerDisabled => ("the server was disabled or deleted", "it was not called"),
        Refusal::Blocked => ("the tool was blocked", "the server was not called"),
        Refusal::Disconnected => ("the connection was removed", "the server was not called"),
        Refusal::NotOffered => ("the server stopped offering the tool", "it was not called"),
    };
    format!("{what} {when}; {not_called}")
}
