//! Switchboard's pure model: no IO, no clock, no async.
//!
//! - Validated newtypes ([`ServerName`], [`ServerUrl`], [`UserId`], [`UserKey`],
//!   [`ExposedToolName`], …): once a value has the type, it is valid.
//! - The aggregates, one module each: [`server`], [`connection`], [`tool_policy`],
//!   [`invocation`]. Each has a state (`Default` = no events, folded with
//!   [`Aggregate::apply`]), a command enum, and `decide(state, …, command, …) ->
//!   Result<Vec<Event>, DomainError>`, where `Event` is the proto event body
//!   (`proto::v1::envelope::Event`); services wrap the events in envelopes.
//! - [`projections`]: read models folded across aggregates (the server directory, the tool
//!   states with the exposed tool names).
//! - [`DomainError`]: every refusal, with a stable machine code.
//! - `testing` (tests, or the `testing` feature): the given/when/then helper.
//!
//! Time is always passed in (`now: SystemTime`); [`time`] converts to and from the protobuf
//! `Timestamp` events carry.
/// `as_str`, `Display`, `Debug` (`Name("text")`) and `AsRef<str>` for a `struct Name(String)`
/// newtype. Defined before the modules so that all of them can use it.
macro_rules! string_newtype_impls {
    ($name:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

mod aggregate;
pub mod connection;
pub mod connection_directory;
mod errors;
mod ids;
pub mod invocation;
mod names;
mod oauth;
pub mod projections;
pub mod server;
pub mod server_name;
mod server_url;
pub mod time;
pub mod tool_policy;
mod tools;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use aggregate::Aggregate;
pub use connection_directory::{ApiConnectionStatus, ConnectionDirectory, ConnectionView};
pub use errors::DomainError;
pub use ids::{InvocationId, ServerId, UserId, UserKey};
pub use names::{ExposedToolMap, ExposedToolName, ServerDescription, ServerName, Slug, ToolName};
pub use oauth::{
    AuthorizationServer, CallbackKey, ClientId, OAuthSettings, RegistrationMode, SecretRef,
    TokenFingerprint, client_authentication_method,
};
pub use projections::{
    CLAIM_WINDOW, OpenInvocation, OpenInvocations, OpenStatus, ServerDirectory, ToolStates,
    ToolView,
};
pub use server_url::{ServerUrl, UrlPolicy};
pub use tools::{ToolCategory, ToolState, tool_definition_hash};

/// The event bodies aggregates decide and fold (the `oneof` of the envelope).
pub use proto::v1::envelope::Event;
