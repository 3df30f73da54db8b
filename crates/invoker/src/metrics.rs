//! The invoker's Prometheus metrics, registered by whoever serves them (the gateway's
//! `/metrics`): how long each call to an MCP server took and how it ended, by server — the
//! one place that sees every call, whether the orchestrator asked over HTTP or NATS — and,
//! set when scraped, what waits: approvals, open invocations, MCP sessions.
use std::{borrow::Cow, time::Duration};

use domain::ServerId;
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// A server's id as a label value, written when scraped (a call allocates nothing for it).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
struct ServerLabel(ServerId);

impl EncodeLabelValue for ServerLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        write!(encoder, "{}", self.0)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    server: ServerLabel,
    /// `completed`, `tool_error` (MCP `isError`), or the failure's code (`deadline_exceeded`,
    /// `withdrawn`, `mcp_network_error`, …: Switchboard's own codes, a small fixed set).
    result: Cow<'static, str>,
}

type CallHistograms = Family<CallLabels, Histogram, fn() -> Histogram>;

fn call_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The invoker's metrics. Cheap to clone (the handles share their values).
#[derive(Debug, Clone)]
pub struct InvokerMetrics {
    calls: CallHistograms,
    approvals_pending: Gauge,
    invocations_open: Gauge,
    sessions_open: Gauge,
}

impl Default for InvokerMetrics {
    fn default() -> Self {
        InvokerMetrics {
            calls: Family::new_with_constructor(call_histogram),
            approvals_pending: Gauge::default(),
            invocations_open: Gauge::default(),
            sessions_open: Gauge::default(),
        }
    }
}

impl InvokerMetrics {
    /// Adds the invoker's metrics to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mcp_call_duration_seconds",
            "Time a call to an MCP server took, by server and how it ended",
            self.calls.clone(),
        );
        registry.register(
            "approvals_pending",
            "Invocations waiting for their user's approval",
            self.approvals_pending.clone(),
        );
        registry.register(
            "invocations_open",
            "Invocations without their final outcome: waiting for approval, approved or running",
            self.invocations_open.clone(),
        );
        registry.register(
            "mcp_sessions_open",
            "MCP client sessions this process keeps for reuse",
            self.sessions_open.clone(),
        );
    }

    pub(crate) fn observe_call(&self, server: ServerId, result: Cow<'static, str>, took: Duration) {
        self.calls
            .get_or_create(&CallLabels {
                server: ServerLabel(server),
                result,
            })
            .observe(took.as_secs_f64());
    }

    pub(crate) fn set_waiting(&self, approvals_pending: usize, invocations_open: usize) {
        self.approvals_pending.set(gauge_value(approvals_pending));
        self.invocations_open.set(gauge_value(invocations_open));
    }

    pub(crate) fn set_sessions_open(&self, sessions: usize) {
        self.sessions_open.set(gauge_value(sessions));
    }
}

fn gauge_value(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}
