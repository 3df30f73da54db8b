//! Revocation: RFC 7009, GitHub's REST API and Slack's `auth.revoke`. Every request that
//! reaches one is recorded as a [`Revocation`].
use std::sync::Arc;

use axum::{
    Json,
    extract::Request,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{
    ClientAuthMethod, Revocation, RevocationStyle, Shared, TokenKind,
    authorization::parse_params,
    state::State,
    token::{OAuthError, Presented},
};

const MAX_BODY: usize = 64 * 1024;

impl State {
    /// Which kind of token this is, and its grant.
    fn find_token(&self, token: &str) -> Option<(TokenKind, usize)> {
        if let Some(access) = self.access_tokens.get(token) {
            return Some((TokenKind::Access, access.grant));
        }
        self.refresh_tokens
            .get(token)
            .map(|grant| (TokenKind::Refresh, *grant))
    }

    /// Revokes one access token, or a refresh token's whole grant (RFC 7009 §2.1).
    fn revoke_token(&mut self, token: &str, kind: TokenKind, grant: usize) {
        match kind {
            TokenKind::Access => {
                if let Some(access) = self.access_tokens.get_mut(token) {
                    access.dead = true;
                }
            }
            TokenKind::Refresh => self.revoke_grant(grant),
        }
    }
}

/// `POST /revoke` (RFC 7009).
pub(crate) async fn rfc7009(shared: Arc<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let form = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => parse_params(&body),
        Err(_) => Err("the body is unreadable".to_owned()),
    };
    let form = match form {
        Ok(form) => form,
        Err(e) => return OAuthError::new("invalid_request", e).into_response(),
    };
    let presented = match Presented::read(
        &parts.headers,
        &form,
        shared.config.reject_client_id_beside_basic,
    ) {
        Ok(presented) => presented,
        Err(e) => return e.into_response(),
    };
    let mut state = shared.state();
    let token = form.get("token").cloned();
    let found = token.as_deref().and_then(|token| state.find_token(token));
    let authenticated = presented.authenticate(&state, false);
    let mut record = Revocation {
        token: token.clone().unwrap_or_default(),
        token_type_hint: form.get("token_type_hint").cloned(),
        style: RevocationStyle::Rfc7009,
        client_auth: presented.method,
        client_id: presented.client_id.clone(),
        kind: found.map(|(kind, _)| kind),
        accepted: false,
    };
    let refused_kind =
        state.refuse_refresh_token_revocation && matches!(found, Some((TokenKind::Refresh, _)));
    let answer = match (authenticated, token) {
        (Err(e), _) => e.into_response(),
        (Ok(_), None) => OAuthError::new("invalid_request", "token is missing").into_response(),
        (Ok(_), Some(_)) if refused_kind => OAuthError::new(
            "unsupported_token_type",
            "this server does not revoke refresh tokens",
        )
        .into_response(),
        (Ok(client_id), Some(token)) => {
            record.accepted = true;
            if let Some((kind, grant)) = found
                && state
                    .grants
                    .get(grant)
                    .is_some_and(|g| g.client_id == client_id)
            {
                state.revoke_token(&token, kind, grant);
            }
            // Unknown tokens, and other clients' tokens, are answered alike (§2.2).
            StatusCode::OK.into_response()
        }
    };
    state.revocations.push(record);
    answer
}

fn github_message(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"message": message}))).into_response()
}

/// `DELETE /applications/{client_id}/token` (`whole_grant`: `/grant`), GitHub's REST API.
pub(crate) async fn github(shared: Arc<Shared>, request: Request, whole_grant: bool) -> Response {
    let (parts, body) = request.into_parts();
    let path_client = parts
        .uri
        .path()
        .split('/')
        .nth(2)
        .unwrap_or_default()
        .to_owned();
    let body: Value = axum::body::to_bytes(body, MAX_BODY)
        .await
        .ok()
        .and_then(|body| serde_json::from_slice(&body).ok())
        .unwrap_or(Value::Null);
    let token = body["access_token"].as_str().map(str::to_owned);
    let presented = Presented::read(&parts.headers, &Default::default(), false).ok();
    let mut state = shared.state();
    let found = token.as_deref().and_then(|token| state.find_token(token));
    let mut record = Revocation {
        token: token.clone().unwrap_or_default(),
        token_type_hint: None,
        style: RevocationStyle::GitHubApi,
        client_auth: presented
            .as_ref()
            .map_or(ClientAuthMethod::None, |p| p.method),
        client_id: presented.as_ref().and_then(|p| p.client_id.clone()),
        kind: found.map(|(kind, _)| kind),
        accepted: false,
    };
    let authenticated = presented
        .as_ref()
        .filter(|p| {
            p.method == ClientAuthMethod::ClientSecretBasic
                && p.client_id.as_deref() == Some(path_client.as_str())
        })
        .map(|p| p.authenticate_any_method(&state));
    let answer = match (authenticated, token, found) {
        (None | Some(Err(_)), _, _) => github_message(StatusCode::UNAUTHORIZED, "Bad credentials"),
        (Some(Ok(_)), None, _) => {
            github_message(StatusCode::UNPROCESSABLE_ENTITY, "Validation Failed")
        }
        (Some(Ok(client_id)), Some(token), Some((TokenKind::Access, grant)))
            if state
                .grants
                .get(grant)
                .is_some_and(|g| g.client_id == client_id) =>
        {
            record.accepted = true;
            if whole_grant {
                state.revoke_grant(grant);
            } else {
                state.revoke_token(&token, TokenKind::Access, grant);
            }
            StatusCode::NO_CONTENT.into_response()
        }
        (Some(Ok(_)), Some(_), _) => github_message(StatusCode::NOT_FOUND, "Not Found"),
    };
    state.revocations.push(record);
    answer
}

/// `POST /api/auth.revoke`, Slack's: the token as the bearer, or form `token`.
pub(crate) async fn slack(shared: Arc<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let form = axum::body::to_bytes(body, MAX_BODY)
        .await
        .ok()
        .and_then(|body| parse_params(&body).ok())
        .unwrap_or_default();
    let token = bearer(&parts.headers).or_else(|| form.get("token").cloned());
    let mut state = shared.state();
    let found = token.as_deref().and_then(|token| state.find_token(token));
    let live = found.is_some_and(|(_, grant)| state.grants.get(grant).is_some_and(|g| !g.revoked));
    state.revocations.push(Revocation {
        token: token.clone().unwrap_or_default(),
        token_type_hint: None,
        style: RevocationStyle::SlackAuthRevoke,
        client_auth: ClientAuthMethod::None,
        client_id: None,
        kind: found.map(|(kind, _)| kind),
        accepted: live,
    });
    match (found, live) {
        (Some((_, grant)), true) => {
            state.revoke_grant(grant);
            Json(json!({"ok": true, "revoked": true})).into_response()
        }
        _ => Json(json!({"ok": false, "error": "invalid_auth"})).into_response(),
    }
}

/// The token of an `Authorization: Bearer` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
        .filter(|token| !token.is_empty())
}
