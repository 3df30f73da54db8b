//! Changed tool lists, for orchestrators that keep a user's tools between turns: whenever what
//! [`Invoker::list_tools`] answers for a user has changed — the MCP server's
//! `notifications/tools/list_changed`, for Switchboard's list. The NATS service announces
//! them on `<prefix>.tools.changed`, the HTTP API streams them (`GET /api/v1/tools/changes`).
//!
//! One watch a process follows the configuration log, where every such change is an event: a
//! setting (`policy.<user key>.<server>`), a connection (`connection.<server>.<user key>`), a
//! server (`server.<id>`, which concerns every user connected to it). After each, once the
//! read models reflect it, the user's list is compared with the last one seen (by its
//! SHA-256): only a different list is a change, so the events that change nothing a list
//! shows (a token refreshed, a blocked tool redefined) cost the orchestrators nothing. The
//! invocations log changes no list.
use std::{collections::HashMap, time::Duration};

use domain::{ServerId, UserId, UserKey};
use eventlog::{LogKind, RecordedEvent};
use futures_util::StreamExt;
use service_kit::audit::user_key_of;
use tokio_util::sync::CancellationToken;

use crate::{Invoker, InvokerError};

/// How long a change waits for the read models to reflect its event (they follow the log
/// within milliseconds; a stalled one is reported by readiness, not here).
const READ_MODEL_WAIT: Duration = Duration::from_secs(5);
/// The first pause before following the log again after it failed; doubles up to the last.
const RETRY_PAUSES: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(30));

/// How long a list asked after a configuration position waits for the read models to reach
/// it.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

/// The subject the NATS service announces tool-list changes on.
pub fn tools_changed_subject(prefix: &str) -> String {
    format!("{prefix}.tools.changed")
}

/// `user`'s list of usable tools changed with the configuration log's event at
/// `config_position`: a list asked after that position shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolListChange {
    pub user: UserId,
    pub config_position: u64,
}

/// The tool-list changes after one position of the configuration log, in the order the
/// watch sees them: [`Invoker::tool_list_changes`].
#[derive(Debug)]
pub struct ToolListChanges {
    receiver: tokio::sync::broadcast::Receiver<ToolListChange>,
    /// The configuration log's end when these were asked for: changes at or before it are
    /// not "from now on" (the watch may still be working through them).
    after: u64,
}

/// What [`ToolListChanges::next`] gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextToolListChange {
    Changed(ToolListChange),
    /// This many changes were missed (the receiver fell behind): list again.
    Missed(u64),
}

impl ToolListChanges {
    /// The next change; `None` once the invoker is gone.
    pub async fn next(&mut self) -> Option<NextToolListChange> {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match self.receiver.recv().await {
                Ok(change) if change.config_position > self.after => {
                    return Some(NextToolListChange::Changed(change));
                }
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => return Some(NextToolListChange::Missed(missed)),
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

impl Invoker {
    /// The users' tool lists that change from now on (after the configuration log's end as
    /// it is now), while a [`ToolListWatch`] runs. A receiver that falls behind loses the
    /// oldest, and learns that it did.
    pub async fn tool_list_changes(&self) -> Result<ToolListChanges, InvokerError> {
        // Subscribed before the end is read: no change after it is missed.
        let receiver = self.inner.tool_list_changes.subscribe();
        let after = self.inner.log.last_sequence(LogKind::Config).await?;
        Ok(ToolListChanges { receiver, after })
    }

    /// Once this process's read models reflect the configuration log up to `position` (a
    /// [`ToolListChange::config_position`]; 0: at once), so that a list answered next shows
    /// that change; refused if they do not within 5 s.
    pub async fn caught_up_with(&self, position: u64) -> Result<(), InvokerError> {
        if position == 0
            || self
                .inner
                .read_models
                .wait_for_position(LogKind::Config, position, CATCH_UP_WAIT)
                .await
        {
            return Ok(());
        }
        Err(InvokerError::NotCaughtUp {
            position,
            waited_secs: CATCH_UP_WAIT.as_secs(),
        })
    }
}

/// The process's watch over the users' tool lists (see the module); its changes reach every
/// receiver of [`Invoker::tool_list_changes`].
#[derive(Debug)]
pub struct ToolListWatch {
    invoker: Invoker,
    /// The configuration log's next position to look at.
    from: u64,
    /// Each user's list as last seen: its SHA-256.
    last_listed: HashMap<UserId, [u8; 32]>,
}

impl ToolListWatch {
    /// A watch of the changes after the configuration log's end as it is now.
    pub async fn start(invoker: &Invoker) -> Result<ToolListWatch, InvokerError> {
        let end = invoker.inner.log.last_sequence(LogKind::Config).await?;
        Ok(ToolListWatch {
            invoker: invoker.clone(),
            from: end + 1,
            last_listed: HashMap::new(),
        })
    }

    /// Watches until `stop`, following the log again after it failed.
    pub async fn run(mut self, stop: CancellationToken) {
        let log = self.invoker.inner.log.clone();
        let mut pause = RETRY_PAUSES.0;
        loop {
            match log.subscribe(LogKind::Config, self.from, None).await {
                Ok(mut events) => loop {
                    let next = tokio::select! {
                        () = stop.cancelled() => return,
                        next = events.next() => next,
                    };
                    match next {
                        Some(Ok(event)) => {
                            self.from = event.sequence + 1;
                            pause = RETRY_PAUSES.0;
                            self.after(&event).await;
                        }
                        Some(Err(error)) => {
                            tracing::warn!(%error, "lost the configuration log; tool-list changes are seen again once it is back");
                            break;
                        }
                        None => break,
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, "cannot follow the configuration log to see tool-list changes");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(RETRY_PAUSES.1);
        }
    }

    /// After `event`: a change for each user it concerns whose list is not what it was. (A
    /// user whose list this process has not seen yet counts as changed.)
    async fn after(&mut self, event: &RecordedEvent) {
        let users = self.users_concerned(event);
        if users.is_empty() {
            return;
        }
        let models = &self.invoker.inner.read_models;
        if !models
            .wait_for_position(LogKind::Config, event.sequence, READ_MODEL_WAIT)
            .await
        {
            tracing::warn!(
                position = event.sequence,
                "the read models are behind the configuration log; comparing tool lists as they are"
            );
        }
        for user in users {
            let listed = list_digest(&self.invoker, &user);
            if self.last_listed.get(&user) == Some(&listed) {
                continue;
            }
            self.last_listed.insert(user.clone(), listed);
            // No receiver is fine: nobody is listening.
            let _ = self.invoker.inner.tool_list_changes.send(ToolListChange {
                user,
                config_position: event.sequence,
            });
        }
    }

    /// The users whose lists `event` may change (read from its subject). A server's event
    /// concerns every user connected to it: a deleted server's users are told by their
    /// connections' removal, which follows it.
    fn users_concerned(&self, event: &RecordedEvent) -> Vec<UserId> {
        let subject = event.subject.as_str();
        // A setting's or a connection's subject names its user.
        if let Some(key) = user_key_of(subject) {
            return UserKey::decode(key).ok().into_iter().collect();
        }
        let Some(server) = subject
            .strip_prefix("server.")
            .and_then(|id| ServerId::parse(id).ok())
        else {
            return Vec::new();
        };
        self.invoker
            .inner
            .read_models
            .connections
            .read(|connections| {
                connections
                    .of_server(server)
                    .filter_map(|connection| UserId::parse(&connection.user_id).ok())
                    .collect()
            })
    }
}

/// The SHA-256 of `user`'s list as [`Invoker::list_tools`] answers it now.
fn list_digest(invoker: &Invoker, user: &UserId) -> [u8; 32] {
    let listed = serde_json::to_vec(&invoker.list_tools(user)).unwrap_or_default();
    let digest = ring::digest::digest(&ring::digest::SHA256, &listed);
    let mut bytes = [0; 32];
    bytes.copy_from_slice(digest.as_ref());
    bytes
}
