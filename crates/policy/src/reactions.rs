//! What the policy service does when other aggregates' events arrive: after every
//! `ToolsDiscovered`, it reconciles the user's settings for that server with the tools the
//! server offers the user now.
//!
//! Idempotent and convergent: the reaction never trusts the tool list *in* the event (an old
//! event seen again after a restart would undo newer changes), but reads the connection's
//! current list — the latest `ToolsDiscovered` unless the user disconnected since — and asks
//! `tool_policy::decide` what that changes. Seeing an event twice, or two processes reacting
//! to the same event, records the change once: the second decision finds nothing to do (or
//! loses the expected-version race and then finds nothing to do).
//!
//! Its progress is a checkpoint (the last log position handled), saved every
//! [`SAVE_EVERY_EVENTS`] events or [`SAVE_EVERY`] after the first unsaved one, and at
//! shutdown, so a restart resumes instead of reading the whole log again.
use std::{sync::Arc, time::Duration};

use domain::{
    Aggregate, Event, ServerId, UserId,
    tool_policy::{PolicyId, ToolPolicyCommand, ToolPolicyState, decide},
};
use eventlog::{
    EventLog, EventLogError, LogKind, RecordedEvent,
    projection::{Checkpoint, CheckpointStore},
};
use futures_util::StreamExt;
use proto::v1::{Envelope, ToolsDiscovered};
use service_kit::{CommandContext, CommandError, EnvelopeBuilder, execute};
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
        let Some(Event::ToolsDiscovered(discovered)) = &event.envelope.event else {
            return true;
        };
        let mut retry = Duration::from_millis(50);
        loop {
            match reconcile(
                self.log.as_ref(),
                &self.envelopes,
                discovered,
                event.sequence,
                &event.envelope,
            )
            .await
            {
                Ok(()) => return true,
                Err(ReactionFailure::Ignored(reason)) => {
                    tracing::warn!(
                        sequence = event.sequence,
                        %reason,
                        "policy reaction ignores a ToolsDiscovered it cannot act on"
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
    // The settings as they are now, and which tools were settled since the discovery: set by
    // the user after it, or changed by the observation of it or of a later one (another
    // process's reaction may be ahead of this one). A setting that lands between this read
    // and the decision's own read differs from `read` and is left alone too.
    let history = log.read_aggregate(&subject).await?;
    let read = ToolPolicyState::from_events(
        history
            .events
            .iter()
            .filter_map(|recorded| recorded.envelope.event.as_ref()),
    );
    let set_after: Vec<String> = history
        .events
        .iter()
        .flat_map(|recorded| settled_since(recorded, discovered_at))
        .collect();
    let context = CommandContext::reaction(SERVICE, cause);
    let written = execute::<ToolPolicyState, _>(log, envelopes, &subject, &context, |state| {
        let mut set_since = set_after.clone();
        set_since.extend(
            state
                .settings()
                .filter(|(tool, setting)| read.setting(tool) != Some(*setting))
                .map(|(tool, _)| tool.to_owned()),
        );
        set_since.extend(
            read.settings()
                .filter(|(tool, _)| state.setting(tool).is_none())
                .map(|(tool, _)| tool.to_owned()),
        );
        decide(
            state,
            &id,
            ToolPolicyCommand::ObserveDefinitions {
                current_tools: discovered.tools.clone(),
                observed_position: discovered_at,
                set_since,
            },
        )
    })
    .await;
    match written {
        Ok(_) => Ok(()),
        Err(CommandError::Domain(error)) => Err(ReactionFailure::Ignored(error.to_string())),
        Err(error) => Err(ReactionFailure::Store(error)),
    }
}

/// The tools a policy event settled since the discovery at `discovered_at`: a user's setting
/// made after it, or an observation of it or of a later discovery. Observations recorded
/// before the position was (0) do not count: observing again changes nothing where the
/// definitions agree.
fn settled_since(recorded: &RecordedEvent, discovered_at: u64) -> Vec<String> {
    match recorded.envelope.event.as_ref() {
        Some(Event::ToolPermissionSet(set)) if recorded.sequence > discovered_at => {
            vec![set.tool_name.clone()]
        }
        Some(Event::ToolDefinitionChanged(changed))
            if changed.observed_position >= discovered_at =>
        {
            vec![changed.tool_name.clone()]
        }
        Some(Event::ToolPermissionsCleared(cleared))
            if cleared.observed_position >= discovered_at =>
        {
            cleared.tool_names.clone()
        }
        _ => Vec::new(),
    }
}
