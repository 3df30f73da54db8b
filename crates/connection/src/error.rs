//! The connection service's errors, each with a stable code the API maps to a status.
use domain::DomainError;
use rmcp::transport::auth::AuthError;
use service_kit::CommandError;

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("there is no server with this id")]
    ServerNotFound,
    #[error("the server is disabled; an admin has to enable it before anyone can connect")]
    ServerDisabled,
    #[error("the server has no OAuth client yet; an admin has to finish setting it up")]
    ServerNotRegistered,
    #[error("the authorization link is unknown, expired or already used; start connecting again")]
    StateInvalid,
    #[error("this authorization was started by another user")]
    StateNotYours,
    #[error(
        "this authorization is no longer the one the connection waits for (another one finished, or you disconnected); it was not used and nothing changed"
    )]
    AuthorizationSuperseded,
    #[error(
        "this authorization was answered already (the Connect button pressed twice?); the first answer: {first}"
    )]
    AnsweredBefore { first: String },
    #[error(
        "this authorization answer came back to another server's redirect URL, so it was not used: the authorization server that sent it is not the one the connection started with (an RFC 9700 mix-up), or its client is registered with the wrong redirect URL"
    )]
    CallbackMismatch,
    #[error(
        "the authorization answer came from {received}, not from the server's authorization server {expected}"
    )]
    IssuerMismatch { expected: String, received: String },
    #[error("the authorization server answered `{code}`{}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    AuthorizationDenied {
        code: String,
        description: Option<String>,
    },
    #[error("the authorization server did not issue tokens: {reason}")]
    TokenExchangeFailed { reason: String },
    #[error("you are not connected to this server")]
    NotConnected,
    #[error(
        "the server no longer accepts this connection's authorization ({reason}); connect again"
    )]
    ReauthorizationRequired { reason: String },
    #[error("the authorization server could not be reached to refresh the token: {reason}")]
    RefreshUnavailable { reason: String },
    #[error(transparent)]
    Upstream(#[from] mcp::McpCallError),
    #[error("the OAuth client for this server could not be set up: {reason}")]
    OAuthClient { reason: String },
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Command(CommandError),
    #[error("the vault failed: {0}")]
    Vault(#[from] vault::VaultError),
    /// `rmcp` could not read or write the tokens or the pending authorization in the vault:
    /// Switchboard's own failure, whose words (vault entry names, the backend's errors) are
    /// for the log, never for a browser or an API caller.
    #[error("the credential store failed: {reason}")]
    CredentialStore { reason: String },
    /// Switchboard's own failure elsewhere (a task that ended without its answer).
    #[error("internal failure: {reason}")]
    Internal { reason: String },
}

impl From<CommandError> for ConnectionError {
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::Domain(domain) => ConnectionError::Domain(domain),
            other => ConnectionError::Command(other),
        }
    }
}

impl ConnectionError {
    /// An `rmcp` OAuth error that has no more particular meaning where it happened: the
    /// credential store's are Switchboard's own, the rest are the OAuth client's (the
    /// provider's text, without control characters, cut short).
    pub(crate) fn from_oauth(error: AuthError) -> Self {
        match error {
            AuthError::CredentialStoreError(reason) => ConnectionError::CredentialStore { reason },
            other => ConnectionError::OAuthClient {
                reason: other
                    .to_string()
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(300)
                    .collect(),
            },
        }
    }

    /// Switchboard's own failure (its store, its vault, its tasks): the words are for the
    /// log, never for a browser or an API caller.
    pub fn is_internal(&self) -> bool {
        self.code() == "internal"
    }

    /// The stable machine code.
    pub fn code(&self) -> &'static str {
        match self {
            ConnectionError::ServerNotFound => "server_not_found",
            ConnectionError::ServerDisabled => "server_disabled",
            ConnectionError::ServerNotRegistered => "server_not_registered",
            ConnectionError::StateInvalid => "oauth_state_invalid",
            ConnectionError::StateNotYours => "oauth_state_not_yours",
            ConnectionError::AuthorizationSuperseded => "authorization_superseded",
            ConnectionError::AnsweredBefore { .. } => "authorization_answered",
            ConnectionError::CallbackMismatch => "oauth_callback_mismatch",
            ConnectionError::IssuerMismatch { .. } => "oauth_issuer_mismatch",
            ConnectionError::AuthorizationDenied { code, .. } if code == "access_denied" => {
                "authorization_denied"
            }
            ConnectionError::AuthorizationDenied { .. } => "authorization_failed",
            ConnectionError::TokenExchangeFailed { .. } => "token_exchange_failed",
            ConnectionError::NotConnected => "not_connected",
            ConnectionError::ReauthorizationRequired { .. } => "reauthorization_required",
            ConnectionError::RefreshUnavailable { .. } => "token_refresh_unavailable",
            ConnectionError::Upstream(error) => error.code(),
            ConnectionError::OAuthClient { .. } => "oauth_client_error",
            ConnectionError::Domain(error) => error.code(),
            ConnectionError::Command(_)
            | ConnectionError::Vault(_)
            | ConnectionError::CredentialStore { .. }
            | ConnectionError::Internal { .. } => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use rmcp::transport::auth::AuthError;

    use super::ConnectionError;

    #[test]
    fn the_credential_stores_failures_are_switchboards_own_not_the_oauth_clients() {
        let store = ConnectionError::from_oauth(AuthError::CredentialStoreError(
            "vault entry `connection/s/u` failed".to_owned(),
        ));
        assert!(
            matches!(store, ConnectionError::CredentialStore { .. }),
            "{store:?}"
        );
        assert_eq!(store.code(), "internal");
        let provider =
            ConnectionError::from_oauth(AuthError::InternalError("bad\u{7}metadata".to_owned()));
        assert_eq!(provider.code(), "oauth_client_error");
        assert!(
            !provider.to_string().contains('\u{7}'),
            "control characters are dropped"
        );
    }
}
