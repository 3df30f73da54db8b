//! Tool-list notices: a listener per healthy connection, so a server's
//! `notifications/tools/list_changed` leads to a new discovery at once instead of at the next
//! periodic probe. The listener's session carries the user's token, which `rmcp` fixes per
//! session, so it is reopened before the token expires.
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use domain::{ServerId, UserId, connection::ConnectionStatus};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{ConnectionError, ConnectionService};

/// Shortest life of one listening session (a token about to expire is refreshed first).
const MIN_SESSION: Duration = Duration::from_secs(30);

impl ConnectionService {
    /// Keeps one listener per healthy connection of an enabled server until `shutdown`.
    pub async fn run_tool_list_listeners(&self, shutdown: CancellationToken) {
        let mut listeners: HashMap<(ServerId, String), JoinHandle<()>> = HashMap::new();
        loop {
            let wanted: Vec<(ServerId, String)> = self.inner.read_models.connections.read(|d| {
                d.iter()
                    .filter(|v| v.status == ConnectionStatus::Connected && v.tool_count.is_some())
                    .map(|v| (v.server_id, v.user_id.clone()))
                    .collect()
            });
            let wanted: std::collections::HashSet<(ServerId, String)> = wanted
                .into_iter()
                .filter(|(server, _)| {
                    self.inner
                        .read_models
                        .servers
                        .read(|d| d.get(*server).is_some_and(|s| s.enabled))
                })
                .collect();
            listeners.retain(|key, task| {
                let keep = wanted.contains(key) && !task.is_finished();
                if !keep {
                    task.abort();
                }
                keep
            });
            for key in wanted {
                if listeners.contains_key(&key) {
                    continue;
                }
                let Ok(user) = UserId::parse(&key.1) else {
                    continue;
                };
                let (service, stop) = (self.clone(), shutdown.child_token());
                let server = key.0;
                listeners.insert(
                    key,
                    tokio::spawn(async move {
                        service.listen_for_tool_changes(server, user, stop).await
                    }),
                );
            }
            // Connections come and go with events; a second is soon enough to follow them.
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        for (_, task) in listeners {
            task.abort();
        }
    }

    async fn listen_for_tool_changes(
        &self,
        server_id: ServerId,
        user: UserId,
        stop: CancellationToken,
    ) {
        let mut pause = self.inner.settings.unreachable_backoff;
        loop {
            let outcome = tokio::select! {
                () = stop.cancelled() => return,
                outcome = self.listen_once(server_id, &user) => outcome,
            };
            match outcome {
                Ok(noticed) => {
                    pause = self.inner.settings.unreachable_backoff;
                    if noticed {
                        if let Err(error) = self.probe(server_id, &user).await {
                            tracing::warn!(server = %server_id, code = error.code(), "discovery after a tool-list notice failed: {error}");
                        }
                        self.inner.notice_discoveries.send_modify(|n| *n += 1);
                    }
                }
                Err(error) => {
                    tracing::debug!(server = %server_id, code = error.code(), "tool-list listener ended: {error}");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(self.inner.settings.health_interval);
                }
            }
        }
    }

    /// One listening session: `true` when the server announced a change, `false` when the
    /// session was retired before its token expired.
    async fn listen_once(
        &self,
        server_id: ServerId,
        user: &UserId,
    ) -> Result<bool, ConnectionError> {
        let server = self.server_oauth(server_id, false).await?;
        let outbound = self.inner.outbound.clone();
        let url = server.url.clone();
        let session = self
            .with_token(server_id, user, |token| {
                let (outbound, url) = (outbound.clone(), url.clone());
                async move { mcp::McpSession::open(&outbound, &url, &token).await }
            })
            .await?;
        let lifetime = self
            .token_expires_at(server_id, user)
            .await?
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .map(|left| left.saturating_sub(self.inner.settings.refresh_ahead))
            .unwrap_or(self.inner.settings.health_interval)
            .clamp(
                MIN_SESSION,
                self.inner.settings.health_interval.max(MIN_SESSION),
            );
        let ready = &self.inner.listeners_ready;
        let result = tokio::select! {
            changed = session.tools_changed(|| ready.send_modify(|n| *n += 1)) => changed.map(|()| true),
            () = tokio::time::sleep(lifetime) => Ok(false),
        };
        session.close().await;
        Ok(result?)
    }
}
