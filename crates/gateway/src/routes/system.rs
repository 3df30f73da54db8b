//! Liveness, readiness, metrics and the OpenAPI document: public, for load balancers,
//! Prometheus and API tools.
use std::time::Duration;

use axum::{
    http::{HeaderValue, Method, header},
    response::{IntoResponse, Response},
};
use eventlog::LogKind;
use serde::Serialize;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{Access, ApiError, AppState, RouteSpec};

pub const ROUTES: &[RouteSpec] = &[
    RouteSpec::new(Method::GET, "/healthz", Access::Public),
    RouteSpec::new(Method::GET, "/readyz", Access::Public),
    RouteSpec::new(Method::GET, "/metrics", Access::Public),
    RouteSpec::new(Method::GET, "/openapi.json", Access::Public),
];

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`
    pub status: &'static str,
}

/// The process answers.
#[utoipa::path(get, path = "/healthz", tag = "system",
    responses((status = 200, description = "Alive", body = Health)))]
async fn healthz() -> axum::Json<Health> {
    axum::Json(Health { status: "ok" })
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready`
    pub status: &'static str,
    /// Each read model and the log position it reflects.
    pub projections: Vec<ProjectionReadiness>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProjectionReadiness {
    pub name: &'static str,
    pub log: &'static str,
    pub position: u64,
}

/// How long readiness waits for a read model to reach the end of its log.
const CATCH_UP_WAIT: Duration = Duration::from_secs(1);

/// The stores answer and every read model has caught up with its log.
#[utoipa::path(get, path = "/readyz", tag = "system",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Not ready, with the reason", body = crate::ErrorBody),
    ))]
async fn readyz(state: axum::extract::State<AppState>) -> Result<axum::Json<Readiness>, ApiError> {
    let not_ready = |reason: String| {
        ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            reason,
        )
    };
    for log in LogKind::ALL {
        let end = state.log.last_sequence(log).await.map_err(|e| {
            // The cause (paths, the store's own words) is for the log, not for a public
            // probe.
            tracing::warn!("readiness: the {log} event log does not answer: {e}");
            not_ready(format!(
                "the {log} event log does not answer; Switchboard's log says why"
            ))
        })?;
        if !state
            .read_models
            .wait_for_position(log, end, CATCH_UP_WAIT)
            .await
        {
            return Err(not_ready(format!(
                "the read models of the {log} log have not caught up with position {end}"
            )));
        }
    }
    let projections = state
        .read_models
        .statuses()
        .into_iter()
        .map(|status| ProjectionReadiness {
            name: status.name,
            log: status.log.as_str(),
            position: status.position,
        })
        .collect();
    Ok(axum::Json(Readiness {
        status: "ready",
        projections,
    }))
}

/// Prometheus metrics (OpenMetrics text).
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "Metrics", content_type = "application/openmetrics-text")))]
async fn metrics(state: axum::extract::State<AppState>) -> Result<Response, ApiError> {
    for status in state.read_models.statuses() {
        // A log that does not answer leaves the lag as it was; readiness reports the outage.
        if let Ok(end) = state.log.last_sequence(status.log).await {
            state.metrics.set_projection(
                status.name,
                status.log,
                status.position,
                end.saturating_sub(status.position),
            );
        }
    }
    state.invoker.update_metrics();
    let text = state.metrics.encode().map_err(ApiError::internal)?;
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(response)
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "system",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi_json() -> Response {
    let mut response = crate::openapi::document_json().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
