//! What the policy service does when other aggregates' events arrive: after every
//! `ToolsDiscovered`, it reconciles the user's settings for that server with the tools the
//! discovery lists; after a `ToolPermissionSet` decided on a view older than a discovery stored
//! before it, it observes that discovery again (the setting was for what the user saw).
//!
//! Idempotent and convergent: each discovery is observed with its own tool list, in the log's
//! order, and what it may change is limited to the tools nothing settled since (a setting the
//! user decided on a view that included it, an observation of it or of a later discovery), so
//! an old event seen again after a restart, or by a second process behind the first, takes no
//! setting back to an older list. Seeing an event twice records the change once: the second
//! decision finds the tools settled (or loses the expected-version race, and then does).
//!
//! Its progress is a checkpoint (the last log position handled), saved every
//! [`SAVE_EVERY_EVENTS`] events or [`SAVE_EVERY`] after the first unsaved one, and at
//! shutdown, so a restart resumes instead of reading the whole log again.
use std::{sync::Arc, time::Duration};

use domain::{
    Event, ServerId, UserId,
    tool_policy::{PolicyId, ToolPolicyCommand, ToolPolicyState, decide},
};
use eventlog::{
    AggregateKind, EventLog, EventLogError, LogKind, RecordedEvent, Subject,
    projection::{Checkpoint, CheckpointStore},
};
use futures_util::StreamExt;
use proto::v1::{Envelope, ToolPermissionSet, ToolsDiscovered};
use service_kit::{CommandContext, CommandError, EnvelopeBuilder, execute_with_history};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::commands::subject_of;

/// The checkpoint key of the reaction. Its snapshot is empty: the reaction keeps no state.
pub const REACTION_NAME: &str = "policy_definition_changes_v1";
/// The reaction's name as the actor of the events it records.
const SERVICE: &str = "policy";
const SAVE_EVERY_EVENTS: u64 = 1_000;
const SAVE_EVERY: Duration = Duration::from_secs(5);

/// The running reaction. Stops (saving its checkpoint) on [`DefinitionChanges::shutdown`];
/// dropping it stops it without saving.
#[derive(Debug)]
pub struct DefinitionChanges {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    position: watch::Receiver<u64>,
}

impl Drop for DefinitionChanges {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl DefinitionChanges {
    /// Resumes from the checkpoint (or the start of the log) and follows the configuration log
    /// in the background.
    pub async fn start(
        log: Arc<dyn EventLog>,
        checkpoints: Arc<dyn CheckpointStore>,
        envelopes: EnvelopeBuilder,
    ) -> Result<Self, EventLogError> {
        let mut position = checkpoints
            .load(REACTION_NAME)
            .await?
            .map_or(0, |checkpoint| checkpoint.position);
        let end = log.last_sequence(LogKind::Config).await?;
        if position > end {
            // A checkpoint of another log (the store was recreated): reacting again from the
            // start is safe, skipping would not be.
            tracing::warn!(
                checkpoint = position,
                log_end = end,
                "policy reaction checkpoint is ahead of the log; starting from the beginning"
            );
            position = 0;
        }
        let (sender, receiver) = watch::channel(position);
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            Follower {
                log,
                checkpoints,
                envelopes,
                position: sender,
                stop: stop.clone(),
                unsaved: 0,
            }
            .run(),
        );
        Ok(DefinitionChanges {
            stop,
            task: Some(task),
            position: receiver,
        })
    }

    /// The last configuration-log position the reaction has handled (its changes for the
    /// events up to there are stored).
    pub fn position(&self) -> u64 {
        *self.position.borrow()
    }

    /// Waits until the reaction has handled the configuration log up to `sequence`.
    pub async fn wait_for(&self, sequence: u64) {
        let mut position = self.position.clone();
        let _ = position.wait_for(|p| *p >= sequence).await;
    }

    /// Stops following the log and saves the checkpoint.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take()
            && let Err(error) = task.await
        {
            tracing::warn!(%error, "the policy reaction task failed");
        }
    }
}

struct Follower {
    log: Arc<dyn EventLog>,
    checkpoints: Arc<dyn CheckpointStore>,
    envelopes: EnvelopeBuilder,
    position: watch::Sender<u64>,
    stop: CancellationToken,
    unsaved: u64,
}

impl Follower {
    async fn run(mut self) {
        const FIRST_RETRY: Duration = Duration::from_millis(50);
        let mut retry = FIRST_RETRY;
        let mut save_by: Option<tokio::time::Instant> = None;
        loop {
            let from = *self.position.borrow() + 1;
            let mut events = tokio::select! {
                subscribed = self.log.subscribe(LogKind::Config, from, None) => match subscribed {
                    Ok(events) => events,
                    Err(EventLogError::Closed) => return self.save().await,
                    Err(error) => {
                        tracing::warn!(%error, "policy reaction cannot follow the log; retrying");
                        if self.pause(&mut retry).await {
                            return self.save().await;
                        }
                        continue;
                    }
                },
                () = self.stop.cancelled() => return self.save().await,
            };
            loop {
                let deadline = save_by;
                let next = tokio::select! {
                    next = events.next() => next,
                    () = self.stop.cancelled() => return self.save().await,
                    () = sleep_until(deadline), if deadline.is_some() => {
                        self.save().await;
                        save_by = None;
                        continue;
                    }
                };
                let event = match next {
                    Some(Ok(event)) => event,
                    Some(Err(EventLogError::Corrupt { location, reason })) => {
                        tracing::error!(%location, %reason, "policy reaction skips an unreadable event");
                        continue;
                    }
                    Some(Err(EventLogError::Closed)) => return self.save().await,
                    Some(Err(error)) => {
                        tracing::warn!(%error, "policy reaction lost the log; resuming");
                        break;
                    }
                    None => break,
                };
                if !self.handle(&event).await {
                    return self.save().await;
                }
                retry = FIRST_RETRY;
                self.position.send_replace(event.sequence);
                self.unsaved += 1;
                save_by.get_or_insert_with(|| tokio::time::Instant::now() + SAVE_EVERY);
                if self.unsaved >= SAVE_EVERY_EVENTS {
                    self.save().await;
                    save_by = None;
                }
            }
            if self.pause(&mut retry).await {
                return self.save().await;
            }
        }
    }

    /// Handles one event, retrying a failed store until it works or the reaction stops;
    /// returns `false` when it stopped first.
    async fn handle(&self, event: &RecordedEvent) -> bool {
        let mut retry = Duration::from_millis(50);
        loop {
            let handled = match &event.envelope.event {
                Some(Event::ToolsDiscovered(discovered)) => {
                    reconcile(
                        self.log.as_ref(),
                        &self.envelopes,
                        discovered,
                        event.sequence,
                        &event.envelope,
                    )
                    .await
                }
                Some(Event::ToolPermissionSet(set)) => {
                    recheck_setting(self.log.as_ref(), &self.envelopes, set, event.sequence).await
                }
                _ => return true,
            };
            match handled {
                Ok(()) => return true,
                Err(ReactionFailure::Ignored(reason)) => {
                    tracing::warn!(
                        sequence = event.sequence,
                        %reason,
                        "policy reaction ignores an event it cannot act on"
                    );
                    return true;
                }
                Err(ReactionFailure::Store(error)) => {
                    tracing::warn!(
                        sequence = event.sequence,
                        %error,
                        "policy reaction failed; retrying"
                    );
                    if self.pause(&mut retry).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Waits before a retry (doubling the wait up to 5 s); `true` when the reaction stops
    /// meanwhile.
    async fn pause(&self, retry: &mut Duration) -> bool {
        let wait = *retry;
        *retry = (*retry * 2).min(Duration::from_secs(5));
        tokio::select! {
            () = tokio::time::sleep(wait) => false,
            () = self.stop.cancelled() => true,
        }
    }

    async fn save(&mut self) {
        let checkpoint = Checkpoint {
            position: *self.position.borrow(),
            snapshot: bytes::Bytes::new(),
        };
        match self.checkpoints.save(REACTION_NAME, &checkpoint).await {
            Ok(()) => self.unsaved = 0,
            Err(error) => tracing::warn!(%error, "policy reaction checkpoint not saved"),
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

enum ReactionFailure {
    /// The event names no valid user or server (this version never writes one): retrying
    /// cannot help.
    Ignored(String),
    /// The store failed: retry.
    Store(CommandError),
}

impl From<EventLogError> for ReactionFailure {
    fn from(error: EventLogError) -> Self {
        ReactionFailure::Store(error.into())
    }
}

/// A setting decided on a view older than a discovery that was stored before the setting (a
/// console's request racing a discovery): that discovery was observed without it, so it is
/// observed again now — the setting was made for the definition the user saw, and a change
/// since is recorded as for any other setting. Reads the connection's history, which only a
/// setting with a discovery between its view and its append costs.
async fn recheck_setting(
    log: &dyn EventLog,
    envelopes: &EnvelopeBuilder,
    set: &ToolPermissionSet,
    set_at: u64,
) -> Result<(), ReactionFailure> {
    let decided_at = set.decided_at_position;
    if decided_at == 0 || decided_at + 1 >= set_at {
        return Ok(()); // an older event, or nothing was stored between its view and it
    }
    let user_id =
        UserId::parse(&set.user_id).map_err(|e| ReactionFailure::Ignored(e.to_string()))?;
    let server_id =
        ServerId::parse(&set.server_id).map_err(|e| ReactionFailure::Ignored(e.to_string()))?;
    let subject = Subject::for_aggregate(
        AggregateKind::Connection,
        &[&server_id.to_string(), user_id.key().as_str()],
    )
    .map_err(|e| ReactionFailure::Store(e.into()))?;
    let history = log.read_aggregate(&subject).await?;
    let missed =
        history
            .events
            .iter()
            .rev()
            .find_map(|recorded| match recorded.envelope.event.as_ref() {
                Some(Event::ToolsDiscovered(discovered))
                    if recorded.sequence > decided_at && recorded.sequence < set_at =>
                {
                    Some((discovered, recorded))
                }
                _ => None,
            });
    match missed {
        Some((discovered, recorded)) => {
            reconcile(
                log,
                envelopes,
                discovered,
                recorded.sequence,
                &recorded.envelope,
            )
            .await
        }
        None => Ok(()),
    }
}

/// Brings the settings of the discovery's user for its server in line with the tools it
/// lists, as of its position in the log (`discovered_at`): each discovery is observed, even
/// when a later one is stored already (a tool gone and back starts Blocked; a definition
/// changed and changed back needs approval again), and a setting made after it stands.
async fn reconcile(
    log: &dyn EventLog,
    envelopes: &EnvelopeBuilder,
    discovered: &ToolsDiscovered,
    discovered_at: u64,
    cause: &Envelope,
) -> Result<(), ReactionFailure> {
    let user_id =
        UserId::parse(&discovered.user_id).map_err(|e| ReactionFailure::Ignored(e.to_string()))?;
    let server_id = ServerId::parse(&discovered.server_id)
        .map_err(|e| ReactionFailure::Ignored(e.to_string()))?;
    let id = PolicyId { user_id, server_id };
    let subject = subject_of(&id).map_err(ReactionFailure::Store)?;
    let context = CommandContext::reaction(SERVICE, cause);
    // Which tools were settled since the discovery is read from the same history the decision
    // folds, and the append expects that history's version: a setting that lands in between
    // makes the append conflict, and the next attempt sees it.
    let written = execute_with_history::<ToolPolicyState, _>(
        log,
        envelopes,
        &subject,
        &context,
        |state, history| {
            let set_since = history
                .iter()
                .flat_map(|recorded| settled_since(recorded, discovered_at))
                .collect();
            decide(
                state,
                &id,
                ToolPolicyCommand::ObserveDefinitions {
                    current_tools: discovered.tools.clone(),
                    observed_position: discovered_at,
                    set_since,
                },
            )
        },
    )
    .await;
    match written {
        Ok(_) => Ok(()),
        Err(CommandError::Domain(error)) => Err(ReactionFailure::Ignored(error.to_string())),
        Err(error) => Err(ReactionFailure::Store(error)),
    }
}

/// The tools a policy event settled since the discovery at `discovered_at`: a user's setting
/// decided on a view that included it, or an observation of it or of a later discovery.
/// Events recorded before they carried those positions (0) count by their own place in the
/// log: an observation then always read the latest list, and a setting was decided on a view
/// at most as new as its append.
fn settled_since(recorded: &RecordedEvent, discovered_at: u64) -> Vec<String> {
    let since = |position: u64| {
        if position == 0 {
            recorded.sequence > discovered_at
        } else {
            position >= discovered_at
        }
    };
    match recorded.envelope.event.as_ref() {
        Some(Event::ToolPermissionSet(set)) if since(set.decided_at_position) => {
            vec![set.tool_name.clone()]
        }
        Some(Event::ToolDefinitionChanged(changed)) if since(changed.observed_position) => {
            vec![changed.tool_name.clone()]
        }
        Some(Event::ToolPermissionsCleared(cleared)) if since(cleared.observed_position) => {
            cleared.tool_names.clone()
        }
        _ => Vec::new(),
    }
}
