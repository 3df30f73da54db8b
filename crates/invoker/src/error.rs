//! The invoker's errors, each with a stable code the API maps to a status. An invocation
//! that ran and failed is not an error: it is a `failed` outcome.
use domain::DomainError;
use eventlog::EventLogError;
use service_kit::CommandError;

#[derive(Debug, thiserror::Error)]
pub enum InvokerError {
    /// A rule refused the request (invalid id, reused id, not yours, not awaiting, …).
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("the arguments are {size} bytes of JSON; at most {max} bytes are accepted")]
    ArgumentsTooLarge { size: usize, max: usize },
    #[error("the deadline must be between 1 ms and {max_ms} ms")]
    DeadlineInvalid { max_ms: u64 },
    #[error("a denial's reason is at most {max} characters of text without control characters")]
    ReasonInvalid { max: usize },
    /// A list asked after a configuration position this process's read models did not reach
    /// in time.
    #[error(
        "this process has not caught up with configuration position {position} within {waited_secs} s; ask again"
    )]
    NotCaughtUp { position: u64, waited_secs: u64 },
    /// The command path failed (the event store, too many conflicts).
    #[error(transparent)]
    Command(CommandError),
    #[error(transparent)]
    EventLog(#[from] EventLogError),
}

impl From<CommandError> for InvokerError {
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::Domain(domain) => InvokerError::Domain(domain),
            CommandError::EventLog(log) => InvokerError::EventLog(log),
            other => InvokerError::Command(other),
        }
    }
}

impl InvokerError {
    /// The stable machine code.
    pub fn code(&self) -> &'static str {
        match self {
            InvokerError::Domain(error) => error.code(),
            InvokerError::ArgumentsTooLarge { .. } => "arguments_too_large",
            InvokerError::DeadlineInvalid { .. } => "deadline_invalid",
            InvokerError::ReasonInvalid { .. } => "reason_invalid",
            InvokerError::NotCaughtUp { .. } => "not_caught_up",
            InvokerError::Command(_) | InvokerError::EventLog(_) => "command_failed",
        }
    }
}
