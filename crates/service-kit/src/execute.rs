//! The command path: load → decide → append with the loaded version; on a conflict, reload and
//! decide again, a bounded number of times.
use domain::{Aggregate, DomainError, Event};
use eventlog::{EventLog, ExpectedVersion, LogKind, RecordedEvent, Subject};

use crate::{CommandContext, CommandError, EnvelopeBuilder};

/// How many times a command is decided again after another writer changed its aggregate.
pub const MAX_CONFLICT_RETRIES: u32 = 5;

/// What a command wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub log: LogKind,
    pub subject: Subject,
    /// The events as appended (empty: the command changed nothing, which is not an error).
    pub events: Vec<proto::v1::Envelope>,
    /// The aggregate's version after the command: the sequence of its last event. Wait for the
    /// read models to reach it before answering (read-your-writes).
    pub version: u64,
}

impl Written {
    pub fn changed_anything(&self) -> bool {
        !self.events.is_empty()
    }
}

/// Runs one command against the aggregate at `subject`: folds its events into `S`, asks
/// `decide` for the events to record and appends them with the version it loaded. `decide` is
/// called again on fresh state after a conflict, so it must be a pure function of the state
/// (and of facts it captured, such as `now`).
pub async fn execute<S, D>(
    log: &dyn EventLog,
    envelopes: &EnvelopeBuilder,
    subject: &Subject,
    context: &CommandContext,
    mut decide: D,
) -> Result<Written, CommandError>
where
    S: Aggregate,
    D: FnMut(&S) -> Result<Vec<Event>, DomainError>,
{
    execute_with_history::<S, _>(log, envelopes, subject, context, |state, _| decide(state)).await
}

/// [`execute`] for a decision that also needs the recorded events it was folded from (their
/// log positions, say): `decide` gets the state and those events of the same read, so what it
/// concludes from either holds for the version the append expects.
pub async fn execute_with_history<S, D>(
    log: &dyn EventLog,
    envelopes: &EnvelopeBuilder,
    subject: &Subject,
    context: &CommandContext,
    mut decide: D,
) -> Result<Written, CommandError>
where
    S: Aggregate,
    D: FnMut(&S, &[RecordedEvent]) -> Result<Vec<Event>, DomainError>,
{
    let mut attempts = 0;
    loop {
        let history = log.read_aggregate(subject).await?;
        let state = S::from_events(
            history
                .events
                .iter()
                .filter_map(|e| e.envelope.event.as_ref()),
        );
        let events = decide(&state, &history.events)?;
        if events.is_empty() {
            return Ok(Written {
                log: subject.log(),
                subject: subject.clone(),
                events: Vec::new(),
                version: history.version,
            });
        }
        let envelopes = envelopes.wrap(context, events);
        match log
            .append(
                subject,
                ExpectedVersion::from_loaded(history.version),
                &envelopes,
            )
            .await
        {
            Ok(outcome) => {
                return Ok(Written {
                    log: subject.log(),
                    subject: subject.clone(),
                    events: envelopes,
                    version: outcome.last_sequence,
                });
            }
            Err(error) if error.is_conflict() => {
                attempts += 1;
                if attempts > MAX_CONFLICT_RETRIES {
                    return Err(CommandError::TooManyConflicts {
                        subject: subject.as_str().to_owned(),
                        attempts,
                    });
                }
                tracing::debug!(
                    subject = subject.as_str(),
                    attempts,
                    "conflict; deciding again"
                );
            }
            Err(error) => return Err(error.into()),
        }
    }
}
