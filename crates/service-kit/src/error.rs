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
    /// The event store failed; the command may or may not have been written only if the error
    /// says the store was unavailable during the append (a retry with the same request is safe
    /// only for idempotent commands).
    #[error(transparent)]
    EventLog(#[from] EventLogError),
}
