//! The routes, one module per capability, and the one permission table every route declares
//! its access in. The authorization middleware and the permission test read the same table.
use axum::http::Method;
use utoipa_axum::router::OpenApiRouter;

use crate::{AppState, Permission};

pub mod audit;
pub mod connections;
pub mod invocations;
pub mod mcp;
pub mod me;
pub mod oauth;
pub mod servers;
pub mod stream;
pub mod system;
pub mod tools;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, signed in or not (health, metrics, the OpenAPI document, OAuth redirects).
    Public,
    /// Any signed-in caller.
    SignedIn,
    /// A signed-in caller with at least one of these permissions. What a caller sees through
    /// the route (only their own resources, unless a permission says otherwise) is the
    /// handler's business.
    AnyOf(&'static [Permission]),
}

/// One route: method, path (axum syntax, as `MatchedPath` reports it), access, and the
/// protected resource it belongs to (which tokens open it, and how a refusal says where to
/// sign in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
    pub resource: crate::Resource,
}

impl RouteSpec {
    /// A route of the API.
    pub const fn new(method: Method, path: &'static str, access: Access) -> Self {
        Self::of(crate::Resource::Api, method, path, access)
    }

    /// A route of `resource`.
    pub const fn of(
        resource: crate::Resource,
        method: Method,
        path: &'static str,
        access: Access,
    ) -> Self {
        RouteSpec {
            method,
            path,
            access,
            resource,
        }
    }
}

/// A server id from a path, or the 400 that says why it is not one.
pub(crate) fn server_id(text: &str) -> Result<domain::ServerId, crate::ApiError> {
    domain::ServerId::parse(text).map_err(|e| crate::ApiError::bad_request(e.code(), e.to_string()))
}

/// A time as the API writes it: RFC 3339, UTC, milliseconds. Times beyond what RFC 3339 can
/// write (years 0000 to 9999; an expiry a provider set absurdly far off) are written as the
/// latest (earliest) it can, never a panic (chrono's `From<SystemTime>` panics on them) nor
/// chrono's `+262143-…`, which no RFC 3339 parser reads.
pub(crate) fn rfc3339(time: std::time::SystemTime) -> String {
    use chrono::{DateTime, Utc};
    let written = match time.duration_since(std::time::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs())
            .ok()
            .and_then(|secs| DateTime::<Utc>::from_timestamp(secs, after.subsec_nanos()))
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
        Err(before) => i64::try_from(before.duration().as_secs())
            .ok()
            .and_then(|secs| {
                DateTime::<Utc>::from_timestamp(-secs, 0)?.checked_sub_signed(
                    chrono::TimeDelta::nanoseconds(i64::from(before.duration().subsec_nanos())),
                )
            })
            .unwrap_or(DateTime::<Utc>::MIN_UTC),
    };
    // 0000-01-01T00:00:00.000Z and 9999-12-31T23:59:59.999Z.
    let earliest = DateTime::<Utc>::from_timestamp(-62_167_219_200, 0).unwrap_or_default();
    let latest = DateTime::<Utc>::from_timestamp(253_402_300_799, 999_000_000).unwrap_or_default();
    written
        .clamp(earliest, latest)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Every route the API serves, with its access. A capability adds its module's table here.
pub fn table() -> Vec<RouteSpec> {
    [
        system::ROUTES,
        me::ROUTES,
        servers::ROUTES,
        tools::ROUTES,
        connections::ROUTES,
        invocations::ROUTES,
        mcp::ROUTES,
        oauth::ROUTES,
        audit::ROUTES,
        stream::ROUTES,
    ]
    .concat()
}

/// Every capability's routes, with their OpenAPI entries.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(system::router())
        .merge(me::router())
        .merge(servers::router())
        .merge(tools::router())
        .merge(connections::router())
        .merge(invocations::router())
        .merge(mcp::router())
        .merge(oauth::router())
        .merge(audit::router())
        .merge(stream::router())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::rfc3339;

    #[test]
    fn times_are_written_in_utc_with_milliseconds() {
        let time = UNIX_EPOCH + Duration::from_millis(1_764_936_000_123);
        assert_eq!(rfc3339(time), "2025-12-05T12:00:00.123Z");
        let before = UNIX_EPOCH - Duration::from_millis(1_500);
        assert_eq!(rfc3339(before), "1969-12-31T23:59:58.500Z");
    }

    #[test]
    fn a_time_too_far_off_for_rfc_3339_is_written_as_the_latest_not_a_panic() {
        // A provider's `expires_in` of 8.3e12 seconds: past year 262,143.
        let far = SystemTime::now() + Duration::from_secs(8_300_000_000_000);
        assert_eq!(rfc3339(far), "9999-12-31T23:59:59.999Z");
        // Past year 9999 and within chrono's range: still the latest RFC 3339 writes.
        let year_20000 = UNIX_EPOCH + Duration::from_secs(569_000_000_000);
        assert_eq!(rfc3339(year_20000), "9999-12-31T23:59:59.999Z");
        let long_ago = UNIX_EPOCH - Duration::from_secs(100_000_000_000);
        assert_eq!(rfc3339(long_ago), "0000-01-01T00:00:00.000Z");
        for written in [rfc3339(far), rfc3339(long_ago)] {
            assert!(
                chrono::DateTime::parse_from_rfc3339(&written).is_ok(),
                "{written}"
            );
        }
    }
}
