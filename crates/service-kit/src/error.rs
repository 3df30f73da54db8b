use domain::DomainError;
use eventlog::EventLogError;

/// Why a command did not go through.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The domain refused the command; nothing was written.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// Other writers kept changing the aggregate between load and append; nothing was written.
    #[error("{subject} changed {attempts} times while this command was being decided; try again")]
    TooManyConflicts { subject: String, attempts: u32 },
    /// The event store failed; whether the command was written depends on the error (see
    /// [`CommandError::nothing_stored`]; a retry with the same request is safe only for
    /// idempotent commands).
    #[error(transparent)]
    EventLog(#[from] EventLogError),
}

impl CommandError {
    /// Whether the command certainly wrote nothing (see [`EventLogError::nothing_stored`]).
    pub fn nothing_stored(&self) -> bool {
        match self {
            CommandError::Domain(_) | CommandError::TooManyConflicts { .. } => true,
            CommandError::EventLog(error) => error.nothing_stored(),
        }
    }
}
