//! The invoker service: what the AI orchestrator talks to.
//!
//! - [`Invoker::list_tools`] → the tools a user may use now (server enabled, connection
//!   healthy, state Always allow or Needs approval), with the context the AI needs;
//! - [`Invoker::invoke`] → the user's settings enforced: Blocked (or an unknown tool, a
//!   disabled server, no usable connection) is `rejected`, Needs approval is
//!   `awaiting_approval`, Always allow calls the tool through `rmcp` with the user's token
//!   (refreshed once after a 401) within the deadline; the answer comes back untrusted
//!   ([`ResultEnvelope`]), cut to the size cap;
//! - [`Invoker::status`] → an invocation's outcome, optionally waiting for the final one;
//! - [`Invoker::pending_approvals`], [`Invoker::decide_approval`] → the user's decisions;
//! - [`Invoker::run_sweeper`] → expired approvals and invocations a stopped process left;
//! - [`ToolListWatch`], [`Invoker::tool_list_changes`] → the users whose usable tools changed;
//! - [`Invoker::metrics`] → the calls' durations and what waits, for Prometheus.
//!
//! At most one call to the MCP server per invocation id, and no serialisation of one user's
//! invocations: see `commands/mod.rs`.
mod commands;
mod error;
mod handover;
mod metrics;
pub mod nats;
mod pending_arguments;
mod reactions;
mod result;
mod service;
mod tools_changed;

pub use commands::{
    Decision, InvocationReport, InvokeRequest, MAX_DENIAL_REASON_CHARS, Outcome, PendingApproval,
    PendingToolContext, ToolListing, ToolServer, denial_reason_from, invocation_subject,
};
pub use error::InvokerError;
pub use metrics::InvokerMetrics;
pub use result::{ResultDigest, ResultEnvelope, ResultServer, sha256_hex};
pub use service::{ApprovalOutcome, Invoker, InvokerSettings};
pub use tools_changed::{
    NextToolListChange, ToolListChange, ToolListChanges, ToolListWatch, tools_changed_subject,
};
