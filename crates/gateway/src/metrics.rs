//! Prometheus metrics: requests by route and status, a latency histogram per route, events
//! appended by type, and each read model's position and lag (set when scraped); and the
//! invoker's (`invoker::InvokerMetrics`): calls to MCP servers by server and how they ended,
//! what waits (set when scraped).
use std::{fmt, sync::Arc};

use async_trait::async_trait;
use eventlog::{
    AggregateHistory, AppendOutcome, EventLog, EventLogError, EventStream, ExpectedVersion,
    LogKind, Subject, SubjectFilter, event_type_of,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use proto::v1::Envelope;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    method: &'static str,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventTypeLabels {
    r#type: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectionLabels {
    projection: &'static str,
    log: &'static str,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// The process's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

struct Inner {
    /// Locked to add the metrics of the services built after it (the invoker's) and when
    /// scraped.
    registry: std::sync::Mutex<Registry>,
    /// Requests that reached the API, and those answered (response head produced); their
    /// difference is the in-flight gauge. Kept as plain atomics too so that shutdown can report
    /// them.
    started: Counter,
    answered: Counter,
    in_flight: Gauge,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    events_appended: Family<EventTypeLabels, Counter>,
    projection_position: Family<ProjectionLabels, Gauge>,
    projection_lag: Family<ProjectionLabels, Gauge>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn latency_histogram() -> Histogram {
    // 100 µs to about 3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchboard");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let events_appended = Family::<EventTypeLabels, Counter>::default();
        let projection_position = Family::<ProjectionLabels, Gauge>::default();
        let projection_lag = Family::<ProjectionLabels, Gauge>::default();
        let in_flight = Gauge::default();
        registry.register(
            "http_requests_in_flight",
            "HTTP requests being answered now",
            in_flight.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests answered, by route, method and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request (to the response head), by route",
            latency.clone(),
        );
        registry.register(
            "events_appended",
            "Events this process appended to the event log, by type",
            events_appended.clone(),
        );
        registry.register(
            "projection_position",
            "Last log sequence each read model reflects",
            projection_position.clone(),
        );
        registry.register(
            "projection_lag",
            "Events in the log that a read model has not applied yet",
            projection_lag.clone(),
        );
        Metrics(Arc::new(Inner {
            registry: std::sync::Mutex::new(registry),
            started: Counter::default(),
            answered: Counter::default(),
            in_flight,
            requests,
            latency,
            events_appended,
            projection_position,
            projection_lag,
        }))
    }

    pub(crate) fn request_started(&self) {
        self.0.started.inc();
        self.0.in_flight.inc();
    }

    /// Requests that reached the API and requests answered, since start.
    pub fn request_counts(&self) -> (u64, u64) {
        (self.0.started.get(), self.0.answered.get())
    }

    pub(crate) fn observe_request(
        &self,
        route: &'static str,
        method: &'static str,
        status: u16,
        seconds: f64,
    ) {
        self.0.answered.inc();
        self.0.in_flight.dec();
        self.0
            .requests
            .get_or_create(&RequestLabels {
                route,
                method,
                status,
            })
            .inc();
        self.0
            .latency
            .get_or_create(&RouteLabels { route })
            .observe(seconds);
    }

    pub(crate) fn set_projection(
        &self,
        projection: &'static str,
        log: LogKind,
        position: u64,
        lag: u64,
    ) {
        let labels = ProjectionLabels {
            projection,
            log: log.as_str(),
        };
        self.0
            .projection_position
            .get_or_create(&labels)
            .set(i64::try_from(position).unwrap_or(i64::MAX));
        self.0
            .projection_lag
            .get_or_create(&labels)
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry())?;
        Ok(text)
    }

    /// Adds the invoker's metrics (the calls to MCP servers, what waits).
    pub(crate) fn register_invoker(&self, invoker: &invoker::Invoker) {
        invoker.metrics().register(&mut self.registry());
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while encoding leaves nothing half-changed to fear.
        self.0
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The event log, counting what is appended through it.
    pub fn metered(&self, log: Arc<dyn EventLog>) -> Arc<dyn EventLog> {
        Arc::new(MeteredLog {
            inner: log,
            metrics: self.clone(),
        })
    }
}

/// An event log that counts the events appended through it, by type.
#[derive(Debug)]
struct MeteredLog {
    inner: Arc<dyn EventLog>,
    metrics: Metrics,
}

#[async_trait]
impl EventLog for MeteredLog {
    async fn append(
        &self,
        subject: &Subject,
        expected: ExpectedVersion,
        events: &[Envelope],
    ) -> Result<AppendOutcome, EventLogError> {
        let outcome = self.inner.append(subject, expected, events).await?;
        if !outcome.duplicate {
            for event in events {
                let r#type = event_type_of(event).unwrap_or("unknown");
                self.metrics
                    .0
                    .events_appended
                    .get_or_create(&EventTypeLabels { r#type })
                    .inc();
            }
        }
        Ok(outcome)
    }

    async fn read_aggregate(&self, subject: &Subject) -> Result<AggregateHistory, EventLogError> {
        self.inner.read_aggregate(subject).await
    }

    async fn read_from(
        &self,
        log: LogKind,
        from: u64,
        filter: Option<&SubjectFilter>,
    ) -> Result<EventStream, EventLogError> {
        self.inner.read_from(log, from, filter).await
    }

    async fn subscribe(
        &self,
        log: LogKind,
        from: u64,
        filter: Option<&SubjectFilter>,
    ) -> Result<EventStream, EventLogError> {
        self.inner.subscribe(log, from, filter).await
    }

    async fn read_event(
        &self,
        log: LogKind,
        sequence: u64,
    ) -> Result<Option<eventlog::RecordedEvent>, EventLogError> {
        self.inner.read_event(log, sequence).await
    }

    async fn last_sequence(&self, log: LogKind) -> Result<u64, EventLogError> {
        self.inner.last_sequence(log).await
    }

    fn filters_where_stored(&self) -> bool {
        self.inner.filters_where_stored()
    }

    fn max_event_bytes(&self) -> Option<usize> {
        self.inner.max_event_bytes()
    }
}
