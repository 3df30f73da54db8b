//! The middleware every request passes: a request id and a tracing span, metrics, errors in
//! the API's shape, and the permission check against the route table.
use std::{sync::Arc, time::Instant};

use axum::{
    extract::{MatchedPath, Request, State},
    http::{HeaderName, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use tracing::Instrument;

use crate::{Access, ApiError, AppState, auth::Resource, error::REQUEST_ID};

pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A request id a client sent is kept when it is short printable ASCII (it ends up in logs
/// and in answers); otherwise a new one (UUIDv7) is made.
fn request_id_from(request: &Request) -> Arc<str> {
    request
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map(Arc::from)
        .unwrap_or_else(new_request_id)
}

/// A UUIDv7 without a system call per request: the time, then random bits drawn once per
/// process mixed with a counter, so ids are unique within the process and unguessable across
/// processes.
fn new_request_id() -> Arc<str> {
    use std::sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    };
    static SEED: OnceLock<[u8; 10]> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = SEED.get_or_init(|| {
        let random = uuid::Uuid::now_v7();
        let mut seed = [0u8; 10];
        seed.copy_from_slice(&random.as_bytes()[6..16]);
        seed
    });
    let mut bits = *seed;
    let count = COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    for (bit, byte) in bits[2..].iter_mut().zip(count) {
        *bit ^= byte;
    }
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let id = uuid::Builder::from_unix_timestamp_millis(millis, &bits).into_uuid();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    Arc::from(&*id.hyphenated().encode_lower(&mut text))
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

pub(crate) async fn request_context(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    state.metrics.request_started();
    let request_id = request_id_from(&request);
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |path| state.route_label(path.as_str()));
    let span = tracing::info_span!("request", method, route, request_id = %request_id);
    let mut response = REQUEST_ID
        .scope(request_id.clone(), async {
            let response = next.run(request).await;
            in_api_shape(response)
        })
        .instrument(span.clone())
        .await;
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(X_REQUEST_ID.clone(), value);
    }
    let status = response.status();
    state.metrics.observe_request(
        route,
        method,
        status.as_u16(),
        started.elapsed().as_secs_f64(),
    );
    span.in_scope(|| {
        tracing::debug!(
            status = status.as_u16(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "answered"
        )
    });
    response
}

/// Error answers that did not come from an [`ApiError`] (axum's own 405, a body-limit refusal
/// before any extractor ran) are rewritten into the API's error shape.
fn in_api_shape(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| {
            // JSON errors are in shape already; an HTML page (the OAuth callback's) is meant
            // for a person's browser.
            value.as_bytes().starts_with(b"application/json")
                || value.as_bytes().starts_with(b"text/html")
        });
    if is_json {
        return response;
    }
    let error = match status {
        StatusCode::METHOD_NOT_ALLOWED => ApiError::new(
            status,
            "method_not_allowed",
            "this route does not take that method; see /openapi.json",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => crate::extract::body_rejection(status, String::new()),
        StatusCode::NOT_FOUND => {
            ApiError::not_found("not_found", "no such route; see /openapi.json")
        }
        status if status.is_server_error() => {
            ApiError::internal(format!("unshaped {status} answer"))
        }
        status => ApiError::new(
            status,
            "bad_request",
            status
                .canonical_reason()
                .unwrap_or("the request was refused"),
        ),
    };
    let allow = response.headers().get(header::ALLOW).cloned();
    let mut shaped = error.into_response();
    if let Some(allow) = allow {
        shaped.headers_mut().insert(header::ALLOW, allow);
    }
    shaped
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such route; see /openapi.json")
}

/// Checks the caller against the route's declared access and hands the [`Caller`] to the
/// handler. A path the table knows with a method it does not falls through to axum's 405; a
/// route the table does not know at all is refused (fail closed: a route added without its
/// row is not public).
pub(crate) async fn authorize(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let access = match request.extensions().get::<MatchedPath>() {
        // No route matched: the fallback's 404.
        None => None,
        Some(path) => state
            .access(request.method(), path.as_str())
            .map_err(|()| {
                ApiError::internal(format!(
                    "the route {} has no row in the permission table",
                    path.as_str()
                ))
            })?,
    };
    let (required, resource) = match access {
        None | Some((Access::Public, _)) => return Ok(next.run(request).await),
        Some((Access::SignedIn, resource)) => (&[][..], resource),
        Some((Access::AnyOf(permissions), resource)) => (permissions, resource),
    };
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|value| {
            value
                .to_str()
                .map_err(|_| ApiError::unauthenticated("the Authorization header is not ASCII"))
        })
        .transpose()?;
    let caller = match state.auth.authenticate_for(resource, authorization) {
        Ok(caller) => caller,
        // An MCP client learns from the challenge where to find how to sign in.
        Err(refused) if resource == Resource::McpEndpoint => {
            let mut response = refused.into_response();
            if let Ok(challenge) =
                HeaderValue::from_str(&crate::routes::mcp::challenge(&state.settings.public_url))
            {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, challenge);
            }
            return Ok(response);
        }
        Err(refused) => return Err(refused),
    };
    if !required.is_empty() && !required.iter().any(|p| caller.may(*p)) {
        let needed: Vec<&str> = required.iter().map(|p| p.as_str()).collect();
        return Err(ApiError::forbidden(format!(
            "this needs the {} permission, which your roles do not grant; ask an admin",
            needed.join(" or ")
        )));
    }
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}
