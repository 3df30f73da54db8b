//! Every error a user (or a caller) can cause in the domain, each with a stable machine code
//! and a sentence that says what to do.
//!
//! The codes are listed once, in [`DomainError::code`]; the gateway, the NATS adapters and the
//! `InvocationRejected` event all use them as they are. A code, once published, never changes
//! meaning. Messages never echo a value that could hold a secret (URLs may carry credentials,
//! so they are never quoted back).

/// What the domain refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DomainError {
    // ---- ids -------------------------------------------------------------------------------
    #[error(
        "a server id is a UUID in its hyphenated form (e.g. 0190f3c4-…); check the id you sent"
    )]
    ServerIdInvalid,
    #[error(
        "an invocation id is 1 to 128 characters without control characters (e.g. the model's tool call id); use one per tool call"
    )]
    InvocationIdInvalid,
    #[error("the user id is empty; send the id of the signed-in user")]
    UserIdEmpty,
    #[error("a user id has at most {max} characters, this one has {length}")]
    UserIdTooLong { length: usize, max: usize },
    #[error(
        "a user id cannot contain control characters; send the id as the identity provider issued it"
    )]
    UserIdInvalidCharacter,
    #[error(
        "this is not a valid user key (the subject-safe form of a user id); encode the user id with UserKey"
    )]
    UserKeyInvalid,

    // ---- names -----------------------------------------------------------------------------
    #[error("the server name is empty; give the server a name of 1 to {max} characters")]
    ServerNameEmpty { max: usize },
    #[error(
        "a server name has at most {max} characters, this one has {length}; choose a shorter name"
    )]
    ServerNameTooLong { length: usize, max: usize },
    #[error(
        "a server name may contain only letters, digits, spaces, `_` and `-`; remove {character:?}"
    )]
    ServerNameInvalidCharacter { character: char },
    #[error("a server name needs at least one letter or digit")]
    ServerNameWithoutLettersOrDigits,
    #[error(
        "another server is already named {slug:?} (names are compared case-insensitively, after slugging); choose another name"
    )]
    ServerNameTaken { slug: String },
    #[error("a server description has at most {max} characters, this one has {length}; shorten it")]
    ServerDescriptionTooLong { length: usize, max: usize },
    #[error(
        "a server description cannot contain control characters other than line breaks and tabs"
    )]
    ServerDescriptionInvalidCharacter,
    #[error("the tool name is empty")]
    ToolNameEmpty,
    #[error("a tool name has at most {max} characters, this one has {length}")]
    ToolNameTooLong { length: usize, max: usize },
    #[error("a tool name cannot contain whitespace or control characters")]
    ToolNameInvalidCharacter,

    // ---- URLs ------------------------------------------------------------------------------
    #[error(
        "the URL could not be read ({reason}); enter a full URL such as https://mcp.example.com/mcp"
    )]
    UrlInvalid { reason: String },
    #[error("a URL has at most {max} characters, this one has {length}")]
    UrlTooLong { length: usize, max: usize },
    #[error(
        "only https:// URLs are accepted (plain http:// only for loopback hosts when the development escape hatch is on); use the server's https:// address"
    )]
    UrlNotHttps,
    #[error("the URL has no host; enter a full URL such as https://mcp.example.com/mcp")]
    UrlMissingHost,
    #[error(
        "the URL contains a user name or password; remove them (credentials belong in the OAuth settings, never in the URL)"
    )]
    UrlHasCredentials,
    #[error("the URL has a #fragment, which servers never see; remove it")]
    UrlHasFragment,

    // ---- tools and policy values -----------------------------------------------------------
    #[error("the tool state is missing; send blocked, needs_approval or always_allow")]
    ToolStateUnspecified,
    #[error("the tool category is missing; send read_only or write_delete")]
    ToolCategoryUnspecified,
    #[error(
        "the server listed the tool {tool:?} more than once; its tool list cannot be used until it is fixed"
    )]
    ToolDuplicate { tool: String },
    #[error(
        "the definition of tool {tool:?} has no definition hash; compute it with domain::tool_definition_hash"
    )]
    ToolDefinitionHashMissing { tool: String },
    #[error(
        "the server offers no tool {tool:?} to you now; list the server's tools and use one of their names"
    )]
    ToolNotFound { tool: String },
    #[error(
        "the definition of tool {tool:?} changed since you saw it (it is now {current}); look at the new definition and set the tool again"
    )]
    ToolDefinitionStale { tool: String, current: String },

    // ---- OAuth values ----------------------------------------------------------------------
    #[error(
        "an OAuth scope is a non-empty word of printable ASCII without spaces, quotes or backslashes; fix the scope list"
    )]
    OAuthScopeInvalid,
    #[error(
        "this registration mode needs the OAuth client id; enter the client id registered at the provider"
    )]
    ClientIdMissing,
    #[error("an OAuth client id has 1 to {max} printable characters; check the client id")]
    ClientIdInvalid { max: usize },
    #[error(
        "the OAuth registration mode is missing; choose dynamic, preconfigured or client_metadata_document"
    )]
    RegistrationModeUnspecified,
    #[error(
        "a secret reference is a vault entry name (letters, digits and `_ - = . /`), never the secret itself"
    )]
    SecretRefInvalid,
    #[error(
        "a token fingerprint is 16 to 64 lowercase hex digits; compute it with TokenFingerprint::of"
    )]
    TokenFingerprintInvalid,
    #[error(
        "an OAuth callback key is 1 to 80 lowercase letters, digits, `.` and `-`; use the redirect URL Switchboard gave for the server"
    )]
    CallbackKeyInvalid,

    // ---- server ----------------------------------------------------------------------------
    #[error(
        "a reason for disabling a server has at most {max} characters and no control characters"
    )]
    DisableReasonInvalid { max: usize },
    #[error(
        "only the credentials of a pre-registered client can be edited; this server's client was registered automatically"
    )]
    ClientCredentialsNotEditable,
    #[error(
        "a server's URL never changes after it is added (its connections, tokens and tool settings belong to that URL); add a new server for the other URL"
    )]
    ServerUrlImmutable,
    #[error("there is no such server; list the servers and use one of their ids")]
    ServerNotFound,
    #[error("the server has been deleted; add it again to use it")]
    ServerDeleted,
    #[error("a server with this id already exists; generate a new id for a new server")]
    ServerAlreadyExists,

    // ---- connection ------------------------------------------------------------------------
    #[error("the connection is not waiting for an authorization; start connecting again")]
    ConnectionNotAuthorizing,
    #[error("the authorization took too long and expired; start connecting again")]
    AuthorizationExpired,
    #[error(
        "you are already connected to this server; disconnect first to connect again (DELETE the connection, or `switchboard disconnect SERVER`)"
    )]
    AlreadyConnected,
    #[error("you are not connected to this server; connect to it first")]
    NotConnected,

    // ---- invocation ------------------------------------------------------------------------
    #[error("the server is disabled; ask an administrator to enable it")]
    ServerDisabled,
    #[error(
        "the user's authorization at this server no longer works; the user must connect to it again"
    )]
    ConnectionAuthError,
    #[error("the tool is unknown (not offered by a connected server); list the user's tools again")]
    UnknownTool,
    #[error(
        "the tool is blocked; the user can allow it in the console (Always allow or Needs approval)"
    )]
    ToolBlocked,
    #[error(
        "the user has too many requests waiting for their approval; ask again once they have decided (or the requests expired)"
    )]
    TooManyPendingApprovals,
    #[error(
        "there is no such invocation (open, or finished in the last six hours); check the invocation id, or find older ones in the audit log"
    )]
    InvocationNotFound,
    #[error(
        "this invocation id was already used for a different request; use a new id for every tool call"
    )]
    InvocationIdReused,
    #[error("the invocation is not waiting for approval")]
    InvocationNotAwaitingApproval,
    #[error("only the user the tool runs for can approve or deny this invocation")]
    ApprovalNotYours,
    #[error("the approval window has closed; ask the assistant to try again")]
    ApprovalExpired,
    #[error("the approval window is still open; expire the invocation only after its deadline")]
    ApprovalNotExpired,
    #[error("the approval time-out is out of range; use a time-out of a few minutes")]
    ApprovalTimeoutInvalid,
    #[error("the invocation is waiting for the user's approval; start it once approved")]
    InvocationAwaitingApproval,
    #[error("the invocation has already started; an invocation id runs at most once")]
    InvocationAlreadyStarted,
    #[error("the invocation has not started; start it before recording its result")]
    InvocationNotStarted,
    #[error("the invocation has already finished; use a new invocation id for a new call")]
    InvocationFinished,
}

impl DomainError {
    /// The stable machine code of this error, e.g. `server_name_too_long`.
    pub fn code(&self) -> &'static str {
        match self {
            DomainError::ServerIdInvalid => "server_id_invalid",
            DomainError::InvocationIdInvalid => "invocation_id_invalid",
            DomainError::UserIdEmpty => "user_id_empty",
            DomainError::UserIdTooLong { .. } => "user_id_too_long",
            DomainError::UserIdInvalidCharacter => "user_id_invalid_character",
            DomainError::UserKeyInvalid => "user_key_invalid",
            DomainError::ServerNameEmpty { .. } => "server_name_empty",
            DomainError::ServerNameTooLong { .. } => "server_name_too_long",
            DomainError::ServerNameInvalidCharacter { .. } => "server_name_invalid_character",
            DomainError::ServerNameWithoutLettersOrDigits => {
                "server_name_without_letters_or_digits"
            }
            DomainError::ServerNameTaken { .. } => "server_name_taken",
            DomainError::ServerDescriptionTooLong { .. } => "server_description_too_long",
            DomainError::ServerDescriptionInvalidCharacter => {
                "server_description_invalid_character"
            }
            DomainError::ToolNameEmpty => "tool_name_empty",
            DomainError::ToolNameTooLong { .. } => "tool_name_too_long",
            DomainError::ToolNameInvalidCharacter => "tool_name_invalid_character",
            DomainError::UrlInvalid { .. } => "url_invalid",
            DomainError::UrlTooLong { .. } => "url_too_long",
            DomainError::UrlNotHttps => "url_not_https",
            DomainError::UrlMissingHost => "url_missing_host",
            DomainError::UrlHasCredentials => "url_has_credentials",
            DomainError::UrlHasFragment => "url_has_fragment",
            DomainError::ToolStateUnspecified => "tool_state_unspecified",
            DomainError::ToolCategoryUnspecified => "tool_category_unspecified",
            DomainError::ToolDuplicate { .. } => "tool_duplicate",
            DomainError::ToolDefinitionHashMissing { .. } => "tool_definition_hash_missing",
            DomainError::ToolNotFound { .. } => "tool_not_found",
            DomainError::ToolDefinitionStale { .. } => "tool_definition_changed",
            DomainError::OAuthScopeInvalid => "oauth_scope_invalid",
            DomainError::ClientIdMissing => "client_id_missing",
            DomainError::ClientIdInvalid { .. } => "client_id_invalid",
            DomainError::RegistrationModeUnspecified => "registration_mode_unspecified",
            DomainError::SecretRefInvalid => "secret_ref_invalid",
            DomainError::TokenFingerprintInvalid => "token_fingerprint_invalid",
            DomainError::CallbackKeyInvalid => "callback_key_invalid",
            DomainError::ServerUrlImmutable => "server_url_immutable",
            DomainError::ClientCredentialsNotEditable => "client_credentials_not_editable",
            DomainError::DisableReasonInvalid { .. } => "disable_reason_invalid",
            DomainError::ServerNotFound => "server_not_found",
            DomainError::ServerDeleted => "server_deleted",
            DomainError::ServerAlreadyExists => "server_already_exists",
            DomainError::ConnectionNotAuthorizing => "connection_not_authorizing",
            DomainError::AuthorizationExpired => "authorization_expired",
            DomainError::AlreadyConnected => "already_connected",
            DomainError::NotConnected => "not_connected",
            DomainError::ServerDisabled => "server_disabled",
            DomainError::ConnectionAuthError => "auth_error",
            DomainError::UnknownTool => "unknown_tool",
            DomainError::ToolBlocked => "tool_blocked",
            DomainError::TooManyPendingApprovals => "too_many_pending_approvals",
            DomainError::InvocationNotFound => "invocation_not_found",
            DomainError::InvocationIdReused => "invocation_id_reused",
            DomainError::InvocationNotAwaitingApproval => "invocation_not_awaiting_approval",
            DomainError::ApprovalNotYours => "approval_not_yours",
            DomainError::ApprovalExpired => "approval_expired",
            DomainError::ApprovalNotExpired => "approval_not_expired",
            DomainError::ApprovalTimeoutInvalid => "approval_timeout_invalid",
            DomainError::InvocationAwaitingApproval => "invocation_awaiting_approval",
            DomainError::InvocationAlreadyStarted => "invocation_already_started",
            DomainError::InvocationNotStarted => "invocation_not_started",
            DomainError::InvocationFinished => "invocation_finished",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_snake_case_and_sentences_are_not_empty() {
        let samples = [
            DomainError::ServerNameTooLong {
                length: 30,
                max: 24,
            },
            DomainError::UrlNotHttps,
            DomainError::ToolBlocked,
            DomainError::ApprovalNotYours,
        ];
        for error in samples {
            let code = error.code();
            assert!(
                code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{code}"
            );
            assert!(!error.to_string().is_empty());
        }
    }
}
