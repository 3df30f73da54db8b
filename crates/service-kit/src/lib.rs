//! What every Switchboard service is built from, so the four services look alike:
//!
//! - [`Clock`]: the injectable source of `now` (the domain never reads a clock);
//! - [`CommandContext`] and [`EnvelopeBuilder`]: who caused an event and why, wrapped around
//!   the event bodies `decide` returns (UUIDv7 id, `occurred_at`, actor, correlation and
//!   causation ids, schema version);
//! - [`execute`]: the command path — load the aggregate, decide, append with the loaded
//!   version, and on a conflict reload and decide again, a bounded number of times;
//! - [`ReadModels`]: the projections the API reads, kept by the projection runner, with
//!   [`ReadModels::wait_for`] for read-your-writes;
//! - [`audit`]: reading the audit history, for the CLI and the API alike.
pub mod audit;
mod clock;
mod envelope;
mod error;
mod execute;
mod read_models;

pub use clock::{Clock, ManualClock, SystemClock};
pub use envelope::{Actor, CommandContext, EnvelopeBuilder};
pub use error::CommandError;
pub use execute::{MAX_CONFLICT_RETRIES, Written, execute, execute_with_history};
pub use read_models::{
    ProjectionStatus, ReadModelSettings, ReadModels, connection_directory_spec,
    open_invocations_spec, server_directory_spec, tool_states_spec,
};
