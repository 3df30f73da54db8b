//! What the connection service does on its own: disconnect every user of a deleted server,
//! probe connections (health and tool discovery) with back-off and jitter, and sweep expired
//! OAuth `state` entries from the vault.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use domain::{ServerId, UserId, connection::ConnectionStatus};
use eventlog::{
    AggregateKind, LogKind, SubjectFilter,
    projection::{Checkpoint, CheckpointStore},
};
use futures_util::StreamExt as _;
use proto::v1::envelope::Event;
use service_kit::CommandContext;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{ConnectionError, ConnectionService, ProbeOutcome};

/// The checkpoint of the server-deleted reaction.
pub const SERVER_DELETED_REACTION: &str = "connection_server_deleted_v1";

/// Called after each connection a cascade disconnected (a test seam: a test stops the
/// reaction there to prove a restart finishes the cascade).
pub type CascadeHook =
    Arc<dyn Fn(ServerId, &UserId) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

impl ConnectionService {
    /// Disconnects every connection of a deleted server (revoking tokens where the provider
    /// allows). Idempotent: connections already disconnected are skipped.
    pub async fn disconnect_server(
        &self,
        context: &CommandContext,
        server_id: ServerId,
        hook: Option<&CascadeHook>,
    ) -> Result<usize, ConnectionError> {
        let users: Vec<String> = self
            .inner
            .read_models
            .connections
            .read(|d| d.of_server(server_id).map(|v| v.user_id.clone()).collect());
        let mut disconnected = 0;
        for user in users {
            let Ok(user) = UserId::parse(&user) else {
                continue;
            };
            match self
                .disconnect(context, &user, server_id, "the server was deleted")
                .await
            {
                Ok(_) | Err(ConnectionError::NotConnected) => disconnected += 1,
                Err(error) => return Err(error),
            }
            if let Some(hook) = hook {
                hook(server_id, &user).await;
            }
        }
        // The server's client secret was kept for these revocations; now it can go.
        if let Ok(server) = self.server_oauth(server_id, true).await
            && !server.registration.client_secret_ref.is_empty()
            && let Ok(name) =
                vault::SecretName::parse(server.registration.client_secret_ref.clone())
        {
            self.inner.vault.delete(&name).await?;
        }
        Ok(disconnected)
    }

    /// Removes expired entries (abandoned OAuth `state`s, stale refresh leases) from the vault;
    /// returns how many. The file store has nothing else that drops them; on JetStream KV
    /// their time-to-live does it too.
    pub async fn sweep_expired_states(&self) -> Result<usize, ConnectionError> {
        Ok(self.inner.vault.remove_expired().await?)
    }

    /// Follows the server events from the reaction's checkpoint and disconnects every user of
    /// each deleted server; the checkpoint moves past an event only once its cascade finished,
    /// so a restart halfway through finishes it. Returns when `shutdown` is cancelled.
    pub async fn run_server_deleted_reaction(
        &self,
        checkpoints: Arc<dyn CheckpointStore>,
        shutdown: CancellationToken,
        hook: Option<CascadeHook>,
    ) -> Result<(), ConnectionError> {
        let internal = |e: eventlog::EventLogError| ConnectionError::Command(e.into());
        let from = checkpoints
            .load(SERVER_DELETED_REACTION)
            .await
            .map_err(internal)?
            .map_or(0, |c| c.position);
        let filter = SubjectFilter::kind(AggregateKind::Server);
        let mut events = self
            .inner
            .log
            .subscribe(LogKind::Config, from + 1, Some(&filter))
            .await
            .map_err(internal)?;
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                event = events.next() => event,
            };
            let Some(event) = event else {
                return Ok(());
            };
            let event = event.map_err(internal)?;
            if let Some(Event::ServerDeleted(deleted)) = &event.envelope.event
                && let Ok(server_id) = ServerId::parse(&deleted.server_id)
            {
                // The connection directory must show every connection written before the
                // deletion.
                self.inner
                    .read_models
                    .wait_for_position(LogKind::Config, event.sequence, Duration::from_secs(30))
                    .await;
                let context = CommandContext::reaction("connection", &event.envelope);
                let mut pause = Duration::from_millis(200);
                loop {
                    match self
                        .disconnect_server(&context, server_id, hook.as_ref())
                        .await
                    {
                        Ok(count) => {
                            tracing::info!(server = %server_id, connections = count, "disconnected every user of a deleted server");
                            break;
                        }
                        Err(error) => {
                            tracing::warn!(server = %server_id, code = error.code(), "disconnecting a deleted server's users failed; retrying: {error}");
                            tokio::select! {
                                () = shutdown.cancelled() => return Ok(()),
                                () = tokio::time::sleep(pause) => {}
                            }
                            pause = (pause * 2).min(Duration::from_secs(30));
                        }
                    }
                }
            }
            checkpoints
                .save(
                    SERVER_DELETED_REACTION,
                    &Checkpoint {
                        position: event.sequence,
                        snapshot: bytes_null(),
                    },
                )
                .await
                .map_err(internal)?;
        }
    }

    /// Probes every connection that holds tokens, each on its own schedule: healthy ones
    /// every `health_interval` ± 20 %, unreachable ones after a back-off that doubles from
    /// `unreachable_backoff`, with jitter, so many connections to one server do not probe in
    /// step. Also sweeps expired OAuth `state` entries from the vault every few minutes.
    /// Returns when `shutdown` is cancelled.
    pub async fn run_health_monitor(&self, shutdown: CancellationToken) {
        let settings = self.inner.settings.clone();
        let mut schedule: HashMap<(ServerId, String), (Instant, u32)> = HashMap::new();
        let mut next_sweep = Instant::now() + Duration::from_secs(60);
        let tick = Duration::from_secs(1).min(settings.unreachable_backoff);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(tick) => {}
            }
            let now = Instant::now();
            if now >= next_sweep {
                next_sweep = now + Duration::from_secs(300);
                match self.sweep_expired_states().await {
                    Ok(0) => {}
                    Ok(removed) => tracing::debug!(removed, "swept expired vault entries"),
                    Err(error) => tracing::warn!("sweeping expired vault entries failed: {error}"),
                }
            }
            let candidates: Vec<(ServerId, String, ConnectionStatus)> =
                self.inner.read_models.connections.read(|d| {
                    d.iter()
                        .filter(|v| {
                            matches!(
                                v.status,
                                ConnectionStatus::Connected | ConnectionStatus::Unreachable
                            )
                        })
                        .map(|v| (v.server_id, v.user_id.clone(), v.status))
                        .collect()
                });
            let enabled = |id: ServerId| {
                self.inner
                    .read_models
                    .servers
                    .read(|d| d.get(id).is_some_and(|s| s.enabled))
            };
            let live: std::collections::HashSet<(ServerId, String)> =
                candidates.iter().map(|(s, u, _)| (*s, u.clone())).collect();
            schedule.retain(|key, _| live.contains(key));
            let mut due = Vec::new();
            for (server_id, user, status) in candidates {
                if !enabled(server_id) {
                    continue;
                }
                let key = (server_id, user.clone());
                let entry = schedule.entry(key.clone()).or_insert_with(|| {
                    // A connection seen for the first time is probed within one interval.
                    (now + jittered(settings.health_interval, 0.0, 1.0), 0)
                });
                if status == ConnectionStatus::Unreachable && entry.1 == 0 {
                    entry.0 = entry
                        .0
                        .min(now + jittered(settings.unreachable_backoff, 0.8, 1.2));
                }
                if entry.0 <= now {
                    due.push(key);
                }
            }
            let results: Vec<((ServerId, String), Result<ProbeOutcome, ConnectionError>)> =
                futures_util::stream::iter(due)
                    .map(|(server_id, user)| async move {
                        let outcome = match UserId::parse(&user) {
                            Ok(parsed) => self.probe(server_id, &parsed).await,
                            Err(error) => Err(error.into()),
                        };
                        ((server_id, user), outcome)
                    })
                    .buffer_unordered(settings.probe_concurrency.max(1))
                    .collect()
                    .await;
            let now = Instant::now();
            for (key, outcome) in results {
                let entry = schedule.entry(key).or_insert((now, 0));
                match outcome {
                    Ok(ProbeOutcome::Healthy) => {
                        *entry = (now + jittered(settings.health_interval, 0.8, 1.2), 0);
                    }
                    Ok(ProbeOutcome::Unreachable) | Err(_) => {
                        let failures = entry.1.saturating_add(1);
                        let backoff = settings
                            .unreachable_backoff
                            .saturating_mul(1 << failures.min(10))
                            .min(settings.health_interval);
                        *entry = (now + jittered(backoff, 0.5, 1.0), failures);
                    }
                    // Nothing to probe until the user reconnects.
                    Ok(ProbeOutcome::AuthError) => {
                        *entry = (now + settings.health_interval, 0);
                    }
                }
            }
        }
    }
}

fn bytes_null() -> bytes::Bytes {
    bytes::Bytes::from_static(b"null")
}

/// `base` scaled by a random factor in `[low, high)`.
fn jittered(base: Duration, low: f64, high: f64) -> Duration {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 4];
    let unit = match SystemRandom::new().fill(&mut bytes) {
        Ok(()) => f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX),
        Err(_) => 0.5,
    };
    base.mul_f64(low + (high - low) * unit)
}
