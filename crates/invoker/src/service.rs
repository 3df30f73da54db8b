//! The invoker service: settings, what it is built on, and the MCP sessions it reuses.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use connection::ConnectionService;
use domain::{ServerId, UserId, projections::invocation_key};
use eventlog::EventLog;
use mcp::{McpCallError, McpSession, OutboundClient};
use rmcp::model::{CallToolResult, JsonObject};
use service_kit::{EnvelopeBuilder, ReadModels};
use url::Url;

use crate::ResultEnvelope;

/// The invoker's settings (`[invocations]` in the configuration).
#[derive(Debug, Clone)]
pub struct InvokerSettings {
    /// How long a *Needs approval* invocation waits for its user.
    pub approval_timeout: Duration,
    /// Largest result handed back (content and structured content as JSON); more is cut and
    /// flagged `truncated`.
    pub result_limit_bytes: usize,
    /// Record arguments and results in the invocation events (the audit then holds payloads).
    pub capture_payloads: bool,
    /// The time a call may take when the request names no deadline.
    pub default_deadline: Duration,
    /// The longest deadline a request may name.
    pub max_deadline: Duration,
    /// Largest arguments accepted, as JSON.
    pub max_arguments_bytes: usize,
    /// How often the sweeper looks for expired approvals and stalled calls.
    pub sweep_interval: Duration,
    /// Results kept in memory for repeated requests and status look-ups (the events hold
    /// only their digests unless payloads are captured).
    pub result_cache_entries: usize,
    /// An MCP session no call has used this long is closed (in the sessions era the
    /// server is told, `DELETE`): each holds a connection to its server, and in the
    /// sessions era a notification stream and the server's session state, so sessions
    /// kept for every user and server that ever called would add up without end.
    pub session_idle: Duration,
    /// Requests one user may have waiting for their approval at once; one more that would
    /// wait is rejected (`too_many_pending_approvals`) — a runaway orchestrator must not bury
    /// the user's approvals, or fill the vault with their arguments.
    pub max_pending_approvals: usize,
}

impl Default for InvokerSettings {
    fn default() -> Self {
        InvokerSettings {
            approval_timeout: Duration::from_secs(600),
            result_limit_bytes: 1024 * 1024,
            capture_payloads: false,
            default_deadline: Duration::from_secs(60),
            max_deadline: Duration::from_secs(600),
            max_arguments_bytes: 1024 * 1024,
            sweep_interval: Duration::from_secs(1),
            result_cache_entries: 1024,
            session_idle: Duration::from_secs(300),
            max_pending_approvals: 100,
        }
    }
}

impl InvokerSettings {
    /// An invocation allowed, approved or running longer than this without a change was left
    /// by a process that stopped: by then its call has timed out (the longest deadline) and
    /// the outcome's append had as long again, and 5 s, for its retries.
    pub fn stalled_after(&self) -> Duration {
        self.max_deadline * 2 + Duration::from_secs(5)
    }
}

/// The invoker. Cheap to clone.
#[derive(Clone)]
pub struct Invoker {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Invoker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invoker")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub log: Arc<dyn EventLog>,
    pub read_models: ReadModels,
    pub envelopes: EnvelopeBuilder,
    pub connections: ConnectionService,
    pub outbound: OutboundClient,
    pub settings: InvokerSettings,
    /// One MCP session per connection, with the token it was opened with (a transport's
    /// bearer token is fixed): reused while the token stays the same, so a session is opened
    /// once per connection and token, not per call (and in the server's remembered era, see
    /// `mcp::ProtocolEras`).
    pub sessions: Mutex<HashMap<(ServerId, UserId), SessionEntry>>,
    /// Recent results by (user, invocation id), for duplicates and status look-ups.
    pub results: Mutex<ResultCache>,
    /// Final outcomes of invocations that waited for approval, as this process records them
    /// (the NATS adapter publishes them on `<prefix>.invoke.result.<id>`).
    pub approval_outcomes: tokio::sync::broadcast::Sender<ApprovalOutcome>,
    /// The users' tool lists that changed, as this process's [`crate::ToolListWatch`] sees
    /// them (the NATS service announces them, the HTTP API streams them).
    pub tool_list_changes: tokio::sync::broadcast::Sender<crate::ToolListChange>,
    /// This process's id among the invokers sharing the log (random, taken at start):
    /// recorded on the completions whose results only its memory holds.
    pub instance: String,
    /// Where results held by other processes are fetched from (the NATS adapter sets it);
    /// without it, a look-up here of another process's call answers without its result.
    pub result_peers: std::sync::OnceLock<crate::nats::ResultPeers>,
    /// Cancelled when the process stops: waits for an outcome answer what they know at
    /// once, instead of holding the stop up for as long as they asked to wait.
    pub stopping: tokio_util::sync::CancellationToken,
    /// The calls this process is making or about to make (approved here), by
    /// [`invocation_key`], with how many registrations share each (two approvals of one
    /// request racing on this process): a withdrawal cancels one.
    pub calls: Mutex<HashMap<u128, (tokio_util::sync::CancellationToken, usize)>>,
    /// A seam for tests: where an approved call waits while a test holds it.
    pub approved_calls: ApprovedCallSeam,
    /// The calls' durations and what waits, for the process's Prometheus registry.
    pub metrics: crate::InvokerMetrics,
}

/// A seam for tests, between an approval's record and its call (where a withdrawal may come):
/// an approved call passes it at once, unless a test holds it
/// ([`Invoker::hold_approved_calls`]), and says it came ([`Invoker::approved_call_arrived`]).
#[derive(Debug, Default)]
pub struct ApprovedCallSeam {
    held: Arc<tokio::sync::RwLock<()>>,
    arrived: tokio::sync::Notify,
}

impl ApprovedCallSeam {
    pub(crate) async fn pass(&self) {
        self.arrived.notify_one();
        drop(self.held.read().await);
    }
}

/// A call registered in [`Inner::calls`] while it runs (or, approved here, until it does);
/// dropped, it leaves.
pub(crate) struct RunningCall {
    invoker: Invoker,
    key: u128,
    pub withdrawn: tokio_util::sync::CancellationToken,
}

impl Drop for RunningCall {
    fn drop(&mut self) {
        let mut calls = self.invoker.lock_calls();
        if let Some((_, registrations)) = calls.get_mut(&self.key) {
            *registrations -= 1;
            if *registrations == 0 {
                calls.remove(&self.key);
            }
        }
    }
}

/// The vault entry `<kind>/<32 hex digits of key>` of an invocation, by its
/// [`invocation_key`] (of its user and id: an id is the orchestrator's opaque text and need
/// not fit an entry name).
pub(crate) fn vault_entry(kind: &str, key: u128) -> vault::SecretName {
    vault::SecretName::parse(format!("{kind}/{key:032x}"))
        .expect("a kind and 32 hex digits make a valid entry name")
}

/// A random id for this process's invoker: 16 hex digits.
fn new_instance_id() -> String {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 8];
    // The system's random source failing leaves the time as the id: unique enough to tell
    // this process's completions from another's.
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = (nanos as u64).to_be_bytes();
    }
    crate::result::lower_hex(&bytes)
}

/// The final outcome of an invocation that waited for approval, and whose it is (ids are the
/// orchestrator's, unique per user).
#[derive(Debug, Clone)]
pub struct ApprovalOutcome {
    pub user: UserId,
    pub report: crate::InvocationReport,
}

pub(crate) struct CachedSession {
    token: String,
    session: McpSession,
}

/// A connection's session in [`Inner::sessions`], and how long its token is trusted.
pub(crate) struct SessionEntry {
    cached: Arc<CachedSession>,
    /// Until then the session's token is used without asking the connection service (a
    /// vault read and decryption per call otherwise); after it, the next call takes the
    /// token from the connection service again, which refreshes it ahead of its expiry, and
    /// when that is still this token, trusts it for another `TOKEN_REUSE`. On the invoker's
    /// clock (wall time, a seam for tests): a clock set back only keeps a token longer, and
    /// a token the server no longer takes gets its 401, then the connection service's token.
    trusted_until: SystemTime,
    /// When a call last took the session (the invoker's clock): idle too long, it is closed.
    last_used: SystemTime,
}

/// What a call goes out with, by where its token came from.
pub(crate) enum CallToken {
    /// The connection's session, while its token is trusted.
    Trusted(Arc<CachedSession>),
    /// The connection service's token, just now: what it hands out is current; with the
    /// server's URL, for a session opened with it.
    Vouched(String, Url),
}

/// How long a session's token is used without asking the connection service again.
const TOKEN_REUSE: Duration = Duration::from_secs(30);

/// A bounded map of recent results; the oldest go first.
///
/// Keyed by [`invocation_key`] of the user and invocation id: a result is remembered for
/// every completed call, and the key costs no allocation.
#[derive(Default)]
pub(crate) struct ResultCache {
    entries: HashMap<u128, Arc<ResultEnvelope>>,
    order: std::collections::VecDeque<u128>,
}

impl ResultCache {
    /// Keeps `result` (none when `limit` is 0); returns what it replaced and what it pushed
    /// out, for the caller to drop outside its lock (freeing a large result takes a while).
    /// `limit` is the same at every call: one result in means at most one out.
    pub fn insert(
        &mut self,
        key: u128,
        result: Arc<ResultEnvelope>,
        limit: usize,
    ) -> (Option<Arc<ResultEnvelope>>, Option<Arc<ResultEnvelope>>) {
        if limit == 0 {
            return (Some(result), None);
        }
        let replaced = self.entries.insert(key, result);
        if replaced.is_none() {
            self.order.push_back(key);
        }
        let evicted = if self.order.len() > limit {
            self.order
                .pop_front()
                .and_then(|old| self.entries.remove(&old))
        } else {
            None
        };
        (replaced, evicted)
    }

    pub fn get(&self, key: u128) -> Option<Arc<ResultEnvelope>> {
        self.entries.get(&key).cloned()
    }

    /// Every result held, newest first.
    pub fn newest_first(&self) -> Vec<(u128, Arc<ResultEnvelope>)> {
        self.order
            .iter()
            .rev()
            .filter_map(|key| Some((*key, self.entries.get(key)?.clone())))
            .collect()
    }
}

impl Invoker {
    pub fn new(
        log: Arc<dyn EventLog>,
        read_models: ReadModels,
        envelopes: EnvelopeBuilder,
        connections: ConnectionService,
        outbound: OutboundClient,
        settings: InvokerSettings,
    ) -> Self {
        Invoker {
            inner: Arc::new(Inner {
                log,
                read_models,
                envelopes,
                connections,
                outbound,
                settings,
                sessions: Mutex::new(HashMap::new()),
                results: Mutex::new(ResultCache::default()),
                approval_outcomes: tokio::sync::broadcast::Sender::new(1024),
                tool_list_changes: tokio::sync::broadcast::Sender::new(1024),
                instance: new_instance_id(),
                result_peers: std::sync::OnceLock::new(),
                stopping: tokio_util::sync::CancellationToken::new(),
                calls: Mutex::new(HashMap::new()),
                approved_calls: ApprovedCallSeam::default(),
                metrics: crate::InvokerMetrics::default(),
            }),
        }
    }

    /// Registers the call of the invocation `key` as made here, until the guard drops.
    pub(crate) fn running_call(&self, key: u128) -> RunningCall {
        let withdrawn = {
            let mut calls = self.lock_calls();
            let (withdrawn, registrations) = calls.entry(key).or_default();
            *registrations += 1;
            withdrawn.clone()
        };
        RunningCall {
            invoker: self.clone(),
            key,
            withdrawn,
        }
    }

    /// Cancels the call of the invocation `key` if this process is making it; says whether
    /// it was.
    pub(crate) fn cancel_call(&self, key: u128) -> bool {
        match self.lock_calls().get(&key) {
            Some((withdrawn, _)) => {
                withdrawn.cancel();
                true
            }
            None => false,
        }
    }

    fn lock_calls(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u128, (tokio_util::sync::CancellationToken, usize)>>
    {
        locked(&self.inner.calls)
    }

    /// The invoker's metrics, for the process's registry ([`crate::InvokerMetrics::register`]).
    pub fn metrics(&self) -> &crate::InvokerMetrics {
        &self.inner.metrics
    }

    /// Sets the metrics of what waits — approvals, open invocations, MCP sessions — to what
    /// is so now (when the metrics are scraped).
    pub fn update_metrics(&self) {
        let (pending, open) = self
            .inner
            .read_models
            .open_invocations
            .read(|open| (open.pending_approvals().count(), open.len()));
        self.inner.metrics.set_waiting(pending, open);
        self.inner
            .metrics
            .set_sessions_open(self.lock_sessions().len());
    }

    /// A seam for tests: until the guard drops, approved calls wait after their approval is
    /// recorded, before they fetch their arguments — where a withdrawal may come.
    #[doc(hidden)]
    pub async fn hold_approved_calls(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.inner.approved_calls.held.clone().write_owned().await
    }

    /// A seam for tests: returns once an approved call has come to where
    /// [`Self::hold_approved_calls`] holds it (one that came before counts, once).
    #[doc(hidden)]
    pub async fn approved_call_arrived(&self) {
        self.inner.approved_calls.arrived.notified().await;
    }

    /// The process is stopping: waits for an outcome, under way or asked for from now on,
    /// answer with what is known at once (the orchestrator asks again, elsewhere or after
    /// the restart).
    pub fn stop_waiting(&self) {
        self.inner.stopping.cancel();
    }

    /// Another instance over the same stores and settings, sharing nothing in memory: what a
    /// second process is to this one (tests of cross-process at-most-once use it).
    pub fn another_instance(&self) -> Invoker {
        self.another_instance_over(self.inner.log.clone())
    }

    /// [`Invoker::another_instance`] writing through `log` (the same store seen through a
    /// wrapper: tests make it refuse some writes to see what a failing store leaves behind).
    pub fn another_instance_over(&self, log: Arc<dyn EventLog>) -> Invoker {
        let inner = &self.inner;
        Invoker::new(
            log,
            inner.read_models.clone(),
            inner.envelopes.clone(),
            inner.connections.another_instance(),
            inner.outbound.clone(),
            inner.settings.clone(),
        )
    }

    /// The final outcomes of invocations that waited for approval, recorded by this process
    /// (approved and run, denied, expired). A receiver that falls behind loses the oldest.
    pub fn approval_outcomes(&self) -> tokio::sync::broadcast::Receiver<ApprovalOutcome> {
        self.inner.approval_outcomes.subscribe()
    }

    pub(crate) fn announce_approval_outcome(
        &self,
        user: &UserId,
        report: &crate::InvocationReport,
    ) {
        if report.outcome.is_final() {
            // No receiver is fine: nobody is listening.
            let _ = self.inner.approval_outcomes.send(ApprovalOutcome {
                user: user.clone(),
                report: report.clone(),
            });
        }
    }

    /// This process's id among the invokers sharing the log.
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    /// Where this process fetches results other processes hold; set once.
    pub(crate) fn set_result_peers(&self, peers: crate::nats::ResultPeers) {
        let _ = self.inner.result_peers.set(peers);
    }

    pub fn settings(&self) -> &InvokerSettings {
        &self.inner.settings
    }

    /// `tools/call` in the connection's session (opened on first use or after the token
    /// changed). A failed exchange drops the session, so the next call opens a fresh one
    /// (an answer that is a JSON-RPC error is not a failed exchange).
    pub(crate) async fn call_in_session(
        &self,
        server_id: ServerId,
        user: &UserId,
        token: CallToken,
        tool: &str,
        arguments: JsonObject,
    ) -> Result<CallToolResult, McpCallError> {
        // The sessions map's key is only needed off the trusted path: not built on it.
        let key = || (server_id, user.clone());
        let cached = match token {
            CallToken::Trusted(cached) => cached,
            CallToken::Vouched(token, url) => self.session_for(&key(), &url, token).await?,
        };
        let result = cached.session.call_tool(tool, arguments).await;
        // A JSON-RPC error answer, or a request for input, is an exchange that worked: the
        // session stays.
        if result.as_ref().is_err_and(|error| !error.is_an_answer()) {
            let key = key();
            let mut sessions = self.lock_sessions();
            if sessions
                .get(&key)
                .is_some_and(|current| Arc::ptr_eq(&current.cached, &cached))
            {
                sessions.remove(&key);
            }
        }
        result
    }

    /// The connection's session for a token the connection service just handed out: the
    /// cached one, trusted again, while it has that token; else a new one.
    async fn session_for(
        &self,
        key: &(ServerId, UserId),
        url: &Url,
        token: String,
    ) -> Result<Arc<CachedSession>, McpCallError> {
        let now = self.now();
        let trusted_until = now + TOKEN_REUSE;
        {
            let mut sessions = self.lock_sessions();
            if let Some(entry) = sessions
                .get_mut(key)
                .filter(|entry| entry.cached.token == token)
            {
                entry.trusted_until = trusted_until;
                entry.last_used = now;
                return Ok(entry.cached.clone());
            }
        }
        let session = McpSession::open(&self.inner.outbound, url, &token).await?;
        let cached = Arc::new(CachedSession { token, session });
        self.lock_sessions().insert(
            key.clone(),
            SessionEntry {
                cached: cached.clone(),
                trusted_until,
                last_used: now,
            },
        );
        Ok(cached)
    }

    /// The connection's session while its token may be used as is.
    pub(crate) fn trusted_session(
        &self,
        server_id: ServerId,
        user: &UserId,
    ) -> Option<Arc<CachedSession>> {
        let now = self.now();
        self.lock_sessions()
            .get_mut(&(server_id, user.clone()))
            .filter(|entry| now < entry.trusted_until)
            .map(|entry| {
                entry.last_used = now;
                entry.cached.clone()
            })
    }

    /// Closes the sessions no call has used for [`InvokerSettings::session_idle`]; returns
    /// how many. A call still holding one keeps it until it ends; a later call opens a new
    /// one.
    pub fn close_idle_sessions(&self) -> usize {
        let now = self.now();
        let idle = self.inner.settings.session_idle;
        let closed: Vec<SessionEntry> = self
            .lock_sessions()
            .extract_if(|_, entry| {
                now.duration_since(entry.last_used)
                    .is_ok_and(|unused| unused >= idle)
            })
            .map(|(_, entry)| entry)
            .collect();
        // Dropped outside the lock: the last reference to a session ends it (its worker
        // sends the `DELETE` of the sessions era).
        closed.len()
    }

    fn lock_sessions(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(ServerId, UserId), SessionEntry>> {
        locked(&self.inner.sessions)
    }

    /// Keeps the result of the invocation `key` ([`invocation_key`]).
    pub(crate) fn remember_result(&self, key: u128, result: Arc<ResultEnvelope>) {
        let limit = self.inner.settings.result_cache_entries;
        let evicted = locked(&self.inner.results).insert(key, result, limit);
        // Freed here, not under the lock every call takes.
        drop(evicted);
    }

    pub(crate) fn remembered_result(&self, user: &UserId, id: &str) -> Option<Arc<ResultEnvelope>> {
        locked(&self.inner.results).get(invocation_key(user.as_str(), id))
    }
}

/// `mutex` locked. A panic while it was held leaves what it guards as it was (each change
/// under these locks is one map operation): keep using it.
pub(crate) fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ResultServer;

    fn result(tool: &str) -> Arc<ResultEnvelope> {
        Arc::new(ResultEnvelope {
            untrusted: true,
            server: ResultServer {
                id: "srv".to_owned(),
                name: "Notion".to_owned(),
            },
            tool: tool.to_owned(),
            content: vec![],
            structured_content: None,
            is_error: false,
            truncated: false,
        })
    }

    fn tools(results: &[(u128, Arc<ResultEnvelope>)]) -> Vec<&str> {
        results.iter().map(|(_, r)| r.tool.as_str()).collect()
    }

    #[test]
    fn the_result_cache_keeps_the_newest_and_hands_back_what_it_lets_go() {
        let mut cache = ResultCache::default();
        assert!(matches!(cache.insert(1, result("a"), 2), (None, None)));
        assert!(matches!(cache.insert(2, result("b"), 2), (None, None)));
        // Full: the oldest goes, and comes back to be freed outside the lock.
        let (replaced, evicted) = cache.insert(3, result("c"), 2);
        assert!(replaced.is_none());
        assert_eq!(evicted.map(|r| r.tool.clone()).as_deref(), Some("a"));
        assert!(cache.get(1).is_none());
        assert_eq!(tools(&cache.newest_first()), ["c", "b"]);
        // The same key again: the old result comes back, nothing is pushed out.
        let (replaced, evicted) = cache.insert(3, result("c2"), 2);
        assert_eq!(replaced.map(|r| r.tool.clone()).as_deref(), Some("c"));
        assert!(evicted.is_none());
        assert_eq!(tools(&cache.newest_first()), ["c2", "b"]);
        // No room at all: nothing is kept.
        let mut none = ResultCache::default();
        let (kept_back, _) = none.insert(1, result("a"), 0);
        assert!(kept_back.is_some() && none.get(1).is_none());
    }
}
