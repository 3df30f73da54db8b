//! Announcements of changed tool lists, for orchestrators that keep a user's tools between
//! turns: on `<prefix>.tools.changed` (protobuf `ToolsChanged`) whenever what
//! `<prefix>.tools.list` answers for a user has changed — the MCP server's
//! `notifications/tools/list_changed`, for Switchboard's list.
//!
//! It follows the configuration log, where every such change is an event: a setting
//! (`policy.<user key>.<server>`), a connection (`connection.<server>.<user key>`), a server
//! (`server.<id>`, which concerns every user connected to it). After each, once the read
//! models reflect it, the user's list is compared with the last one this process announced or
//! saw (by its SHA-256): only a different list is announced, so the events that change
//! nothing a list shows (a token refreshed, a probe that found the tools as they were) cost
//! the orchestrators nothing. Nothing is announced for the invocations log, which changes no
//! list.
use std::{collections::HashMap, time::Duration};

use domain::{ServerId, UserId, UserKey};
use eventlog::{LogKind, RecordedEvent};
use futures_util::StreamExt;
use proto::{Message as _, v1 as pb};
use tokio_util::sync::CancellationToken;

use crate::Invoker;

/// How long an announcement waits for the read models to reflect its event (they follow the
/// log within milliseconds; a stalled one is reported by readiness, not here).
const READ_MODEL_WAIT: Duration = Duration::from_secs(5);
/// The first pause before following the log again after it failed; doubles up to the last.
const RETRY_PAUSES: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(30));

/// The subject tool-list changes are announced on.
pub fn tools_changed_subject(prefix: &str) -> String {
    format!("{prefix}.tools.changed")
}

/// Announces changed tool lists until `stop`, after the events from position `from` of the
/// configuration log.
pub(crate) async fn announce(
    invoker: Invoker,
    client: async_nats::Client,
    prefix: String,
    mut from: u64,
    stop: CancellationToken,
) {
    let mut announcer = Announcer {
        invoker,
        client,
        subject: tools_changed_subject(&prefix),
        last_listed: HashMap::new(),
    };
    let log = announcer.invoker.inner.log.clone();
    let mut pause = RETRY_PAUSES.0;
    loop {
        match log.subscribe(LogKind::Config, from, None).await {
            Ok(mut events) => loop {
                let next = tokio::select! {
                    () = stop.cancelled() => return,
                    next = events.next() => next,
                };
                match next {
                    Some(Ok(event)) => {
                        from = event.sequence + 1;
                        pause = RETRY_PAUSES.0;
                        announcer.after(&event).await;
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "lost the configuration log; tool-list changes are announced again once it is back");
                        break;
                    }
                    None => break,
                }
            },
            Err(error) => {
                tracing::warn!(%error, "cannot follow the configuration log to announce tool-list changes");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(RETRY_PAUSES.1);
    }
}

struct Announcer {
    invoker: Invoker,
    client: async_nats::Client,
    subject: String,
    /// Each user's list as last announced or seen here: its SHA-256.
    last_listed: HashMap<UserId, [u8; 32]>,
}

impl Announcer {
    /// After `event`: announces each user it concerns whose list is not what it was.
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
                "the read models are behind the configuration log; announcing tool lists as they are"
            );
        }
        for user in users {
            let listed = list_digest(&self.invoker, &user);
            if self.last_listed.get(&user) == Some(&listed) {
                continue;
            }
            let announcement = pb::ToolsChanged {
                user_id: user.as_str().to_owned(),
                config_position: event.sequence,
            };
            match self
                .client
                .publish(self.subject.clone(), announcement.encode_to_vec().into())
                .await
            {
                Ok(()) => {
                    self.last_listed.insert(user, listed);
                }
                // Not remembered: the next change of the user's list is announced.
                Err(error) => tracing::warn!(%error, "could not announce a changed tool list"),
            }
        }
    }

    /// The users whose lists `event` may change (read from its subject). A server's event
    /// concerns every user connected to it: a deleted server's users are told by their
    /// connections' removal, which follows it.
    fn users_concerned(&self, event: &RecordedEvent) -> Vec<UserId> {
        let mut parts = event.subject.as_str().split('.');
        let user_of = |key: Option<&str>| key.and_then(|key| UserKey::decode(key).ok());
        match parts.next() {
            Some("policy") => user_of(parts.next()).into_iter().collect(),
            Some("connection") => user_of(parts.nth(1)).into_iter().collect(),
            Some("server") => {
                let Some(server) = parts.next().and_then(|id| ServerId::parse(id).ok()) else {
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
            _ => Vec::new(),
        }
    }
}

/// The SHA-256 of `user`'s list as `tools.list` answers it now.
fn list_digest(invoker: &Invoker, user: &UserId) -> [u8; 32] {
    let listed = serde_json::to_vec(&invoker.list_tools(user)).unwrap_or_default();
    let digest = ring::digest::digest(&ring::digest::SHA256, &listed);
    let mut bytes = [0; 32];
    bytes.copy_from_slice(digest.as_ref());
    bytes
}
