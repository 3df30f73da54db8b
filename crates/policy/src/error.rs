use domain::DomainError;
use service_kit::CommandError;

/// Why a policy command did not go through.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A rule refused it (unknown tool, stale definition, not connected, …); nothing written.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// The command path failed (conflicts, the event store).
    #[error(transparent)]
    Command(#[from] CommandError),
}

impl PolicyError {
    /// The stable machine code: the domain's code for a refusal, `command_failed` otherwise.
    pub fn code(&self) -> &'static str {
        match self {
            PolicyError::Domain(error) | PolicyError::Command(CommandError::Domain(error)) => {
                error.code()
            }
            PolicyError::Command(_) => "command_failed",
        }
    }
}
