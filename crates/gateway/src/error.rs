//! Every error the API answers with: `{"error": {"code", "message", "request_id"}}`, and the one
//! place where each domain and service error becomes a status.
use std::borrow::Cow;

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use domain::DomainError;
use eventlog::EventLogError;
use serde::Serialize;
use service_kit::CommandError;

tokio::task_local! {
    /// The id of the request being answered, set by the request-context middleware so that an
    /// error built anywhere below it carries the id.
    pub(crate) static REQUEST_ID: std::sync::Arc<str>;
}

/// The request id of the request this task is answering.
pub(crate) fn current_request_id() -> std::sync::Arc<str> {
    REQUEST_ID
        .try_with(Clone::clone)
        .unwrap_or_else(|_| std::sync::Arc::from("-"))
}

/// An error answer. Internal failures carry their cause for the log, never for the caller.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: Cow<'static, str>,
    pub message: Cow<'static, str>,
    /// Logged with the request id when the status is a 5xx; never sent.
    internal: Option<String>,
}

/// The error body, as the OpenAPI document shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable machine code, e.g. `server_name_taken`.
    pub code: String,
    /// What went wrong and what to do, for a person.
    pub message: String,
    /// The id of the request (also the `x-request-id` header), for support and the log.
    pub request_id: String,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        ApiError {
            status,
            code: code.into(),
            message: message.into(),
            internal: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthenticated(message: impl Into<Cow<'static, str>>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn unavailable(message: impl Into<Cow<'static, str>>) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// A failure that is ours, not the caller's: the caller gets the request id, the log gets
    /// `cause`.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal".into(),
            message: "something went wrong on our side; quote the request id when reporting it"
                .into(),
            internal: Some(cause.to_string()),
        }
    }

    pub fn body(&self, request_id: &str) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.to_string(),
                request_id: request_id.to_owned(),
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = current_request_id();
        if let Some(cause) = &self.internal {
            tracing::error!(request_id = %request_id, cause = %cause, "internal error");
        }
        let body = serde_json::to_vec(&self.body(&request_id)).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Every domain refusal, by kind: the one place a domain code gets its status.
impl From<DomainError> for ApiError {
    fn from(error: DomainError) -> Self {
        use DomainError as E;
        let status = match &error {
            // `not_connected` is 404 as the connection routes answer it: nothing of the
            // caller's there.
            E::ServerNotFound
            | E::InvocationNotFound
            | E::ToolNotFound { .. }
            | E::NotConnected => StatusCode::NOT_FOUND,
            E::ServerNameTaken { .. }
            | E::ServerAlreadyExists
            | E::AlreadyConnected
            | E::ToolDefinitionStale { .. }
            | E::InvocationIdReused
            | E::InvocationNotAwaitingApproval
            | E::InvocationAwaitingApproval
            | E::InvocationAlreadyStarted
            | E::InvocationNotStarted
            | E::InvocationFinished
            | E::ConnectionNotAuthorizing => StatusCode::CONFLICT,
            E::ApprovalNotYours | E::ToolBlocked => StatusCode::FORBIDDEN,
            E::AuthorizationExpired | E::ApprovalExpired | E::ServerDeleted => StatusCode::GONE,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, error.code(), error.to_string())
    }
}

impl From<EventLogError> for ApiError {
    fn from(error: EventLogError) -> Self {
        match error {
            EventLogError::Conflict { .. } => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                "someone else changed this at the same time; reload and try again",
            ),
            EventLogError::Unavailable { .. } | EventLogError::Closed => {
                tracing::warn!(%error, "event store unavailable");
                ApiError::unavailable("the event store is unavailable; try again shortly")
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::Domain(error) => error.into(),
            CommandError::EventLog(error) => error.into(),
            error @ CommandError::TooManyConflicts { .. } => {
                ApiError::new(StatusCode::CONFLICT, "conflict", error.to_string())
            }
        }
    }
}

impl From<connection::ConnectionError> for ApiError {
    fn from(error: connection::ConnectionError) -> Self {
        use connection::ConnectionError as E;
        let status = match &error {
            E::Domain(_)
            | E::Command(_)
            | E::Vault(_)
            | E::CredentialStore { .. }
            | E::Internal { .. } => {
                return match error {
                    E::Domain(domain) => domain.into(),
                    E::Command(command) => command.into(),
                    E::Vault(cause) => ApiError::internal(format!("vault: {cause}")),
                    E::CredentialStore { reason } => {
                        ApiError::internal(format!("credential store: {reason}"))
                    }
                    E::Internal { reason } => ApiError::internal(reason),
                    _ => unreachable!("matched above"),
                };
            }
            E::ServerNotFound | E::NotConnected => StatusCode::NOT_FOUND,
            E::ServerDisabled | E::ServerNotRegistered | E::ReauthorizationRequired { .. } => {
                StatusCode::CONFLICT
            }
            E::StateInvalid | E::IssuerMismatch { .. } | E::AuthorizationDenied { .. } => {
                StatusCode::BAD_REQUEST
            }
            E::StateNotYours => StatusCode::FORBIDDEN,
            E::AuthorizationSuperseded | E::AnsweredBefore { .. } => StatusCode::CONFLICT,
            E::CallbackMismatch => StatusCode::BAD_REQUEST,
            E::TokenExchangeFailed { .. }
            | E::RefreshUnavailable { .. }
            | E::Upstream(_)
            | E::OAuthClient { .. } => StatusCode::BAD_GATEWAY,
        };
        ApiError::new(status, error.code(), error.to_string())
    }
}

impl From<catalog::ServerChangeError> for ApiError {
    fn from(error: catalog::ServerChangeError) -> Self {
        use catalog::ServerChangeError as E;
        use mcp::{DiscoveryError as D, OutboundError as O};
        let error = match error {
            E::Domain(domain) => return domain.into(),
            E::Command(command) => return command.into(),
            E::Vault(cause) => return ApiError::internal(format!("vault: {cause}")),
            other => other,
        };
        let status = match &error {
            // The server or its provider did not answer (or failed): not the caller's fault.
            E::Discovery(D::Outbound(
                O::Resolve { .. } | O::Timeout { .. } | O::Connect { .. } | O::Client(_),
            ))
            | E::Discovery(D::AuthorizationServersUnavailable | D::Failed { .. })
            | E::RegistrationFailed { .. } => StatusCode::BAD_GATEWAY,
            // Everything else is a rule the server or the request breaks.
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, error.code(), error.to_string())
    }
}

impl From<policy::PolicyError> for ApiError {
    fn from(error: policy::PolicyError) -> Self {
        match error {
            policy::PolicyError::Domain(domain) => domain.into(),
            policy::PolicyError::Command(command) => command.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rmcp` reports the vault failing under the tokens as a credential-store error whose
    /// words name the vault entry: the caller gets the request id, not those words.
    #[test]
    fn a_credential_store_failure_is_internal_and_says_nothing_of_the_vault() {
        let error = connection::ConnectionError::CredentialStore {
            reason: "vault entry `connection/0190f3c4/u_alice` could not be written: disk full"
                .to_owned(),
        };
        assert_eq!(error.code(), "internal");
        let api = ApiError::from(error);
        assert_eq!(api.status, StatusCode::INTERNAL_SERVER_ERROR);
        let body = api.body("req-1");
        assert_eq!(body.error.code, "internal");
        assert!(
            !body.error.message.contains("connection/"),
            "{}",
            body.error.message
        );
        assert!(
            !body.error.message.contains("disk full"),
            "{}",
            body.error.message
        );
        assert!(
            api.internal
                .as_deref()
                .is_some_and(|cause| cause.contains("disk full")),
            "the log keeps the cause"
        );
    }
}
