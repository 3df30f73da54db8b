//! The NATS service adapter: the orchestrator's protocol on `<prefix>.tools.list`,
//! `<prefix>.invoke`, `<prefix>.invoke.status` and `<prefix>.invoke.withdraw`, as the
//! `switchboard-invoker` service (discoverable through `$SRV`) in a queue group, so every
//! running copy shares the work.
//! Requests are protobuf, or proto3 JSON with `Content-Type: application/json`; the reply
//! uses the request's encoding. Each process also answers other processes' requests for the
//! results it holds on `<prefix>.internal.result.<its instance id>` (core NATS, protobuf), and
//! asks them there (see `InvocationCompleted.result_held_by`). Nothing else lives here: the
//! commands are in `commands/`.
use std::{sync::Arc, time::Duration};

use async_nats::service::{Service, ServiceExt, endpoint::Endpoint};
use bytes::Bytes;
use domain::{InvocationId, UserId};
use futures_util::{FutureExt, StreamExt};
use proto::{Message as _, v1 as pb};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use service_kit::CommandContext;
use tokio_util::sync::CancellationToken;

use crate::{InvocationReport, InvokeRequest, Invoker, InvokerError, ResultEnvelope};

pub const SERVICE_NAME: &str = "switchboard-invoker";
pub const QUEUE_GROUP: &str = "switchboard-invoker";
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Room kept under the server's `max_payload` for a message's headers and framing.
const REPLY_HEADROOM: usize = 4 * 1024;
/// The most a result fetched from another process may take (its JSON text): far above any
/// result cap in use, a bound on what one look-up may hold in memory.
const MAX_HELD_RESULT_BYTES: u64 = 64 * 1024 * 1024;

/// The service with its endpoints subscribed: requests sent after [`NatsService::start`]
/// returns are answered once [`NatsService::run`] runs.
pub struct NatsService {
    invoker: Invoker,
    client: async_nats::Client,
    prefix: String,
    approval_outcomes: tokio::sync::broadcast::Receiver<crate::ApprovalOutcome>,
    /// Answers `$SRV` discovery (`PING`, `INFO`, `STATS`) until the service stops taking
    /// requests.
    service: Option<Service>,
    tools: Endpoint,
    invoke: Endpoint,
    status: Endpoint,
    withdraw: Endpoint,
    /// Other processes asking for a result this one holds (`<prefix>.internal.result.<id>`).
    result_requests: async_nats::Subscriber,
    /// Withdrawn calls, for whichever process makes them (`<prefix>.internal.withdraw`).
    withdrawals: async_nats::Subscriber,
    /// The users' tool lists that changed since the start, announced on
    /// `<prefix>.tools.changed`.
    tool_list_changes: crate::ToolListChanges,
}

impl std::fmt::Debug for NatsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsService").finish_non_exhaustive()
    }
}

impl NatsService {
    /// Registers the service and its endpoints under `prefix` (the deployment's NATS prefix,
    /// `sb` by default). The tool-list changes a [`crate::ToolListWatch`] sees from now on
    /// are announced once it runs.
    pub async fn start(
        invoker: Invoker,
        client: &async_nats::Client,
        prefix: &str,
    ) -> Result<NatsService, async_nats::Error> {
        let service = client
            .service_builder()
            .description("Switchboard: a user's usable tools and tool invocations")
            .queue_group(QUEUE_GROUP)
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await?;
        let tools = service.endpoint(format!("{prefix}.tools.list")).await?;
        let invoke = service.endpoint(format!("{prefix}.invoke")).await?;
        let status = service.endpoint(format!("{prefix}.invoke.status")).await?;
        let withdraw = service
            .endpoint(format!("{prefix}.invoke.withdraw"))
            .await?;
        let result_requests = client
            .subscribe(result_subject(prefix, invoker.instance()))
            .await?;
        let withdrawals = client.subscribe(withdrawal_subject(prefix)).await?;
        let tool_list_changes = invoker.tool_list_changes().await?;
        invoker.set_result_peers(ResultPeers {
            client: client.clone(),
            prefix: prefix.to_owned(),
        });
        Ok(NatsService {
            result_requests,
            withdrawals,
            approval_outcomes: invoker.approval_outcomes(),
            invoker,
            client: client.clone(),
            prefix: prefix.to_owned(),
            service: Some(service),
            tools,
            invoke,
            status,
            withdraw,
            tool_list_changes,
        })
    }

    /// This instance's id in `$SRV` discovery (`$SRV.PING.switchboard-invoker.<id>`);
    /// `None` once it stopped taking requests.
    pub async fn service_id(&self) -> Option<String> {
        Some(self.service.as_ref()?.info().await.id)
    }

    /// Answers requests, each in a task of its own (one slow tool call never holds up the
    /// others), until `stop.taking_requests` is cancelled; then stops as
    /// [`Stop`] says.
    pub async fn run(mut self, stop: Stop) {
        let mut handlers = tokio::task::JoinSet::new();
        loop {
            let (request, kind) = tokio::select! {
                () = stop.taking_requests.cancelled() => break,
                Some(_) = handlers.join_next(), if !handlers.is_empty() => continue,
                outcome = self.approval_outcomes.recv() => {
                    self.approval_outcome(outcome).await;
                    continue;
                }
                // Announced while requests are taken: an orchestrator told of a change asks
                // here.
                Some(change) = self.tool_list_changes.next() => {
                    self.announce_tool_list_change(change).await;
                    continue;
                }
                Some(asked) = self.result_requests.next() => {
                    self.spawn_result_answer(&mut handlers, asked);
                    continue;
                }
                Some(withdrawn) = self.withdrawals.next() => {
                    self.cancel_withdrawn(&withdrawn);
                    continue;
                }
                Some(request) = self.tools.next() => (request, Kind::Tools),
                Some(request) = self.invoke.next() => (request, Kind::Invoke),
                Some(request) = self.status.next() => (request, Kind::Status),
                Some(request) = self.withdraw.next() => (request, Kind::Withdraw),
                else => break,
            };
            self.spawn_answer(&mut handlers, request, kind);
        }
        self.drain(handlers, stop).await;
    }

    /// Answers one orchestrator request in a task of its own.
    fn spawn_answer(
        &self,
        handlers: &mut tokio::task::JoinSet<()>,
        request: async_nats::service::Request,
        kind: Kind,
    ) {
        // The largest message the server takes now: a reply over it is never delivered, so
        // a result too large for it is cut to fit. (The client keeps it current, across
        // reconnections to a server with another limit.)
        let (invoker, max_payload) = (self.invoker.clone(), self.client.max_payload());
        handlers.spawn(async move {
            let json = is_json(&request.message);
            let payload = &request.message.payload;
            let reply = match kind {
                Kind::Tools => tools_list(&invoker, payload, json, max_payload).await,
                Kind::Invoke => {
                    encode_answer(invoke(&invoker, payload, json).await, json, max_payload)
                }
                Kind::Status => {
                    encode_answer(status(&invoker, payload, json).await, json, max_payload)
                }
                Kind::Withdraw => {
                    encode_answer(withdraw(&invoker, payload, json).await, json, max_payload)
                }
            };
            let mut headers = async_nats::HeaderMap::new();
            if json {
                headers.insert("Content-Type", "application/json");
            }
            if let Err(error) = request.respond_with_headers(Ok(reply), headers).await {
                tracing::warn!(%error, "could not answer an orchestrator request");
            }
        });
    }

    /// After the service stopped taking requests: lets those in flight finish, publishes
    /// approval outcomes and answers look-ups of the results held here until nothing else
    /// in the process can finish an invocation, all within the grace period.
    async fn drain(mut self, mut handlers: tokio::task::JoinSet<()>, stop: Stop) {
        let deadline = tokio::time::Instant::now() + stop.grace;
        let mut pending = Vec::new();
        for (kind, endpoint) in [
            (Kind::Tools, &mut self.tools),
            (Kind::Invoke, &mut self.invoke),
            (Kind::Status, &mut self.status),
            (Kind::Withdraw, &mut self.withdraw),
        ] {
            if let Err(error) = endpoint.stop().await {
                tracing::warn!(%error, "could not unsubscribe an orchestrator endpoint");
            }
            // What arrived before the unsubscription is still answered here (the stream,
            // closed, hands out what it holds and then ends).
            while let Some(Some(request)) = endpoint.next().now_or_never() {
                pending.push((request, kind));
            }
        }
        for (request, kind) in pending {
            self.spawn_answer(&mut handlers, request, kind);
        }
        // Discovery no longer lists this instance: it takes no new requests.
        if let Some(service) = self.service.take()
            && let Err(error) = service.stop().await
        {
            tracing::warn!(%error, "could not stop answering service discovery");
        }
        // A round trip to the server (a request nobody answers) after the unsubscriptions:
        // it handles a connection's messages in order, so from its answer on, the queue
        // group's other members get every new request. (A request it routed here in
        // between is lost and times out at its orchestrator: `async_nats` endpoints have no
        // drain.)
        let barrier = format!(
            "{}.internal.barrier.{}",
            self.prefix,
            self.invoker.instance()
        );
        match tokio::time::timeout_at(deadline, self.client.request(barrier, Bytes::new())).await {
            Ok(Err(error)) if error.kind() == async_nats::RequestErrorKind::NoResponders => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not confirm the orchestrator endpoints' unsubscription");
            }
            Ok(Ok(_)) | Err(_) => {
                tracing::warn!("could not confirm the orchestrator endpoints' unsubscription");
            }
        }
        tracing::info!(
            in_flight = handlers.len(),
            "stopped taking orchestrator requests; letting those in flight finish"
        );
        let grace = tokio::time::sleep_until(deadline);
        tokio::pin!(grace);
        while !(handlers.is_empty() && stop.others_done.is_cancelled()) {
            tokio::select! {
                () = &mut grace => {
                    tracing::warn!(
                        cut_off = handlers.len(),
                        grace_secs = stop.grace.as_secs(),
                        "orchestrator requests still running after the grace period were cut off"
                    );
                    break;
                }
                () = stop.others_done.cancelled(), if !stop.others_done.is_cancelled() => {}
                Some(_) = handlers.join_next(), if !handlers.is_empty() => {}
                outcome = self.approval_outcomes.recv() => self.approval_outcome(outcome).await,
                Some(asked) = self.result_requests.next() => {
                    self.spawn_result_answer(&mut handlers, asked);
                }
                Some(withdrawn) = self.withdrawals.next() => self.cancel_withdrawn(&withdrawn),
            }
        }
    }

    async fn approval_outcome(
        &self,
        outcome: Result<crate::ApprovalOutcome, tokio::sync::broadcast::error::RecvError>,
    ) {
        match outcome {
            Ok(outcome) => self.publish_result(outcome).await,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "approval outcomes not published (too many at once)");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
        }
    }

    /// Announces a user's changed tool list on `<prefix>.tools.changed` (protobuf
    /// `ToolsChanged`).
    async fn announce_tool_list_change(&self, change: crate::NextToolListChange) {
        let change = match change {
            crate::NextToolListChange::Changed(change) => change,
            crate::NextToolListChange::Missed(missed) => {
                tracing::warn!(missed, "tool-list changes not announced (too many at once)");
                return;
            }
        };
        let announcement = pb::ToolsChanged {
            user_id: change.user.as_str().to_owned(),
            config_position: change.config_position,
        };
        let subject = crate::tools_changed_subject(&self.prefix);
        if let Err(error) = self
            .client
            .publish(subject, announcement.encode_to_vec().into())
            .await
        {
            tracing::warn!(%error, "could not announce a changed tool list");
        }
    }

    /// Another process withdrew a call: cancelled if this one makes it.
    fn cancel_withdrawn(&self, withdrawn: &async_nats::Message) {
        if let Ok(request) = pb::InvokeWithdrawRequest::decode(withdrawn.payload.clone()) {
            let key = domain::projections::invocation_key(&request.user_id, &request.invocation_id);
            self.invoker.cancel_call(key);
        }
    }

    /// Off the loop: a result can be a megabyte to serialise.
    fn spawn_result_answer(
        &self,
        handlers: &mut tokio::task::JoinSet<()>,
        asked: async_nats::Message,
    ) {
        let (invoker, client) = (self.invoker.clone(), self.client.clone());
        handlers.spawn(answer_result_request(
            invoker,
            client,
            asked,
            self.client.max_payload(),
        ));
    }
}

/// How a [`NatsService`] stops: at `taking_requests` it unsubscribes its endpoints (new
/// requests go to the queue group's other members) and lets the requests in flight finish;
/// until `others_done` it also publishes approval outcomes (an approval given over HTTP
/// may still be calling its tool) and answers look-ups of the results held here — at most
/// for `grace` in all. A process that stopped sooner would close its log under invocations
/// that had called their tool, leaving them open and their orchestrators without a reply.
#[derive(Debug, Clone)]
pub struct Stop {
    pub taking_requests: CancellationToken,
    pub others_done: CancellationToken,
    pub grace: Duration,
}

impl Stop {
    /// Stops taking requests at `shutdown`, with nothing else to wait for, within 10 s.
    #[must_use]
    pub fn at(shutdown: CancellationToken) -> Stop {
        Stop {
            others_done: shutdown.clone(),
            taking_requests: shutdown,
            grace: Duration::from_secs(10),
        }
    }
}

impl NatsService {
    /// Publishes the final outcome of an invocation that waited for approval on
    /// `<prefix>.invoke.result.<invocation id>` (protobuf `InvocationReply`). An id that is not
    /// one subject token (`[A-Za-z0-9_-]`) is published under its subject token (32 hex
    /// digits of its SHA-256) instead.
    async fn publish_result(&self, outcome: crate::ApprovalOutcome) {
        let crate::ApprovalOutcome { user, report } = outcome;
        let id = report.invocation_id.clone();
        let token = if !id.is_empty()
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            id
        } else {
            match InvocationId::parse(&id) {
                Ok(id) => id.subject_token(),
                Err(_) => return,
            }
        };
        let subject = format!("{}.invoke.result.{token}", self.prefix);
        let payload = encode_report(&report, &user, false, self.client.max_payload());
        if let Err(error) = self.client.publish(subject, payload).await {
            tracing::warn!(%error, "could not publish an approval outcome");
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Tools,
    Invoke,
    Status,
    Withdraw,
}

fn is_json(message: &async_nats::Message) -> bool {
    message
        .headers
        .as_ref()
        .and_then(|headers| headers.get("Content-Type"))
        .is_some_and(|value| value.as_str().starts_with("application/json"))
}

/// Answers another process asking for a result this one holds: the part of its JSON text
/// from the offset asked for that fits one message, and the text's length (0 when the
/// result is no longer, or never was, here).
async fn answer_result_request(
    invoker: Invoker,
    client: async_nats::Client,
    asked: async_nats::Message,
    max_payload: usize,
) {
    let Some(reply_to) = asked.reply else {
        return;
    };
    let held = pb::HeldResultRequest::decode(asked.payload)
        .ok()
        .and_then(|request| {
            let user = UserId::parse(&request.user_id).ok()?;
            let result = invoker.remembered_result(&user, &request.invocation_id)?;
            // Serialised again for each part: a result takes one or two, and keeping the
            // text between requests would double what the cache holds.
            let text = serde_json::to_vec(&*result).ok()?;
            let start = usize::try_from(request.offset)
                .ok()
                .filter(|&start| start < text.len())?;
            let end = text
                .len()
                .min(start + max_payload.saturating_sub(REPLY_HEADROOM).max(1));
            Some(pb::HeldResultPart {
                part: text[start..end].to_vec(),
                total_bytes: text.len() as u64,
            })
        })
        .unwrap_or_default();
    if let Err(error) = client
        .publish(reply_to, Bytes::from(held.encode_to_vec()))
        .await
    {
        tracing::warn!(%error, "could not answer a request for a held result");
    }
}

/// Where the process `instance` answers requests for the results it holds.
fn result_subject(prefix: &str, instance: &str) -> String {
    format!("{prefix}.internal.result.{instance}")
}

/// Where withdrawn calls are announced to every process.
fn withdrawal_subject(prefix: &str) -> String {
    format!("{prefix}.internal.withdraw")
}

/// How long a look-up waits for the process holding a result: a live one answers from
/// memory within milliseconds; a stopped one has no subscriber, and NATS says so at once.
const RESULT_FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Fetches results other processes hold in memory (see `InvocationCompleted.result_held_by`),
/// over NATS.
pub(crate) struct ResultPeers {
    client: async_nats::Client,
    prefix: String,
}

impl ResultPeers {
    /// Asks every process to cancel the call of `user`'s invocation `id` if it is making
    /// it (core NATS, to all: the one making it is not recorded until it finishes).
    pub(crate) async fn withdraw_call(&self, user: &UserId, id: &InvocationId) {
        let request = pb::InvokeWithdrawRequest {
            invocation_id: id.as_str().to_owned(),
            user_id: user.as_str().to_owned(),
        };
        let subject = withdrawal_subject(&self.prefix);
        if let Err(error) = self
            .client
            .publish(subject, request.encode_to_vec().into())
            .await
        {
            tracing::warn!(%error, "could not ask the other processes to cancel a withdrawn call");
        }
    }

    /// The result `holder` keeps for `user`'s invocation `id`, if it answers and still has it.
    pub(crate) async fn fetch(
        &self,
        holder: &str,
        user: &UserId,
        id: &str,
    ) -> Option<Arc<ResultEnvelope>> {
        // The id comes from the log: only what this build writes (hex) makes a subject
        // token, never a wildcard or a dotted path.
        if holder.is_empty() || holder.len() > 32 || !holder.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return None;
        }
        let subject = result_subject(&self.prefix, holder);
        let mut text = Vec::new();
        let mut total = None;
        // Part by part: a result can be larger than one message.
        loop {
            let request = pb::HeldResultRequest {
                invocation_id: id.to_owned(),
                user_id: user.as_str().to_owned(),
                offset: text.len() as u64,
            };
            let asked = self
                .client
                .request(subject.clone(), Bytes::from(request.encode_to_vec()));
            let reply = match tokio::time::timeout(RESULT_FETCH_TIMEOUT, asked).await {
                Ok(Ok(reply)) => reply,
                Ok(Err(error)) => {
                    tracing::debug!(%error, holder, "the process holding a result did not answer");
                    return None;
                }
                Err(_) => return None,
            };
            let held = pb::HeldResultPart::decode(reply.payload).ok()?;
            // Not held (any more: evicted between two parts), or parts that do not add up.
            if held.part.is_empty()
                || held.total_bytes > MAX_HELD_RESULT_BYTES
                || *total.get_or_insert(held.total_bytes) != held.total_bytes
            {
                return None;
            }
            text.extend_from_slice(&held.part);
            match (text.len() as u64).cmp(&held.total_bytes) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal => break,
                std::cmp::Ordering::Greater => return None,
            }
        }
        serde_json::from_slice::<ResultEnvelope>(&text)
            .ok()
            .map(Arc::new)
    }
}

fn decode<T: proto::Message + Default + DeserializeOwned>(
    payload: &[u8],
    json: bool,
) -> Result<T, pb::OrchestratorError> {
    let decoded = if json {
        serde_json::from_slice(payload).map_err(|e| e.to_string())
    } else {
        T::decode(payload).map_err(|e| e.to_string())
    };
    decoded.map_err(|reason| pb::OrchestratorError {
        code: "invalid_request".to_owned(),
        message: format!("the request could not be read: {reason}"),
    })
}

fn encode<T: proto::Message + Serialize>(reply: &T, json: bool) -> Bytes {
    if json {
        Bytes::from(serde_json::to_vec(reply).unwrap_or_default())
    } else {
        Bytes::from(reply.encode_to_vec())
    }
}

fn refusal(error: &InvokerError) -> pb::OrchestratorError {
    let message = match error {
        // Internals stay in the log.
        InvokerError::Command(_) | InvokerError::EventLog(_) => {
            tracing::error!(%error, "an orchestrator request failed");
            "the event store failed; try again".to_owned()
        }
        other => other.to_string(),
    };
    pb::OrchestratorError {
        code: error.code().to_owned(),
        message,
    }
}

fn bad(code: &str, message: String) -> pb::OrchestratorError {
    pb::OrchestratorError {
        code: code.to_owned(),
        message,
    }
}

fn to_struct(value: Option<Value>) -> Option<pbjson_types::Struct> {
    value
        .filter(Value::is_object)
        .and_then(|v| serde_json::from_value(v).ok())
}

fn user_of(text: &str) -> Result<UserId, pb::OrchestratorError> {
    UserId::parse(text).map_err(|e| bad(e.code(), e.to_string()))
}

fn id_of(text: &str) -> Result<InvocationId, pb::OrchestratorError> {
    InvocationId::parse(text).map_err(|e| bad(e.code(), e.to_string()))
}

async fn tools_list(invoker: &Invoker, payload: &[u8], json: bool, max_payload: usize) -> Bytes {
    let asked = decode::<pb::ToolsListRequest>(payload, json)
        .and_then(|request| Ok((user_of(&request.user_id)?, request.after_config_position)));
    let asked = match asked {
        Ok((user, after)) => match invoker.caught_up_with(after).await {
            Ok(()) => Ok(user),
            Err(error) => Err(refusal(&error)),
        },
        Err(error) => Err(error),
    };
    let reply = match asked {
        Ok(user) => pb::ToolsListReply {
            tools: invoker
                .list_tools(&user)
                .into_iter()
                .map(|t| pb::UsableTool {
                    name: t.name,
                    tool_name: t.tool_name,
                    server: Some(pb::UsableToolServer {
                        id: t.server.id,
                        name: t.server.name,
                        description: t.server.description,
                    }),
                    title: t.title,
                    description: t.description,
                    input_schema: to_struct(Some(t.input_schema)),
                    output_schema: to_struct(t.output_schema),
                    annotations: to_struct(t.annotations),
                    state: t.state.to_owned(),
                })
                .collect(),
            error: None,
        },
        Err(error) => pb::ToolsListReply {
            tools: vec![],
            error: Some(error),
        },
    };
    encode_tools(&reply, json, max_payload)
}

/// The tools list, or, when it does not fit one message of at most `max_payload` bytes, a
/// refusal that says so.
fn encode_tools(reply: &pb::ToolsListReply, json: bool, max_payload: usize) -> Bytes {
    let encoded = encode(reply, json);
    if encoded.len() <= max_payload.saturating_sub(REPLY_HEADROOM) {
        return encoded;
    }
    // No tool can be left out of the list (the AI would not know it has it), and a reply
    // over the limit never arrives: say so instead of leaving the orchestrator waiting.
    let too_large = pb::ToolsListReply {
        tools: vec![],
        error: Some(bad(
            "reply_too_large",
            format!(
                "the {} tools take {} bytes, more than a message on this NATS server may \
                 hold ({max_payload} bytes); raise the server's max_payload, or list them \
                 with GET /api/v1/tools",
                reply.tools.len(),
                encoded.len()
            ),
        )),
    };
    encode(&too_large, json)
}

/// The reply to an invocation request or look-up: the invocation's report (and the user it
/// runs for), or the refusal of the request.
type Answer = Result<(InvocationReport, UserId), pb::InvocationReply>;

fn encode_answer(answer: Answer, json: bool, max_payload: usize) -> Bytes {
    match answer {
        Ok((report, user)) => encode_report(&report, &user, json, max_payload),
        Err(refusal) => encode(&refusal, json),
    }
}

/// `report`'s reply, encoded to fit one message of at most `max_payload` bytes: the reply
/// holds the result twice (a Struct and JSON text), so a result near the size cap is over
/// the server's default limit, and a reply over it never arrives — the orchestrator would
/// wait for its time-out and learn nothing. Such a result is cut until the reply fits and
/// flagged `truncated`, as the size cap cuts (the whole result stays available over HTTP).
fn encode_report(
    report: &InvocationReport,
    user: &UserId,
    json: bool,
    max_payload: usize,
) -> Bytes {
    let budget = max_payload.saturating_sub(REPLY_HEADROOM);
    let Some(result) = report.result.as_deref() else {
        return encode(&reply_of(report, None, user), json);
    };
    if let Some((fits, _)) = result.render_within(budget, |result| {
        encode(&reply_of(report, Some(result), user), json)
    }) {
        return fits;
    }
    let mut without = reply_of(report, None, user);
    without.message = format!(
        "the result does not fit in a message on this NATS server ({max_payload} bytes); \
         GET /api/v1/invocations/{} has it",
        report.invocation_id
    );
    encode(&without, json)
}

fn reply_of(
    report: &InvocationReport,
    result: Option<&ResultEnvelope>,
    user: &UserId,
) -> pb::InvocationReply {
    // The JSON text is the result exactly, as HTTP writes it; the Struct cannot hold an
    // integer beyond 2^53 (`pbjson` refuses it), and then is absent rather than rounded.
    let result = result.and_then(|r| serde_json::to_value(r).ok());
    let result_json = result.as_ref().map(Value::to_string).unwrap_or_default();
    pb::InvocationReply {
        invocation_id: report.invocation_id.clone(),
        outcome: report.outcome.as_str().to_owned(),
        reason: report.reason.clone().unwrap_or_default(),
        message: report.message.clone().unwrap_or_default(),
        result: to_struct(result),
        error: None,
        result_json,
        user_id: user.as_str().to_owned(),
    }
}

/// Arguments from a `Struct`, which holds every number as a double: a whole number within
/// 2^53 goes on as an integer (`5`, not `5.0`), as the orchestrator's JSON had it — a server
/// with typed arguments refuses `5.0` for an integer.
fn integral_numbers(value: Value) -> Value {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    match value {
        Value::Number(number) => match number.as_f64() {
            Some(float) if float.fract() == 0.0 && float.abs() <= EXACT => {
                // Within 2^53 the cast is exact.
                Value::Number((float as i64).into())
            }
            _ => Value::Number(number),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(integral_numbers).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(key, value)| (key, integral_numbers(value)))
                .collect(),
        ),
        other => other,
    }
}

fn failed_reply(invocation_id: String, error: pb::OrchestratorError) -> pb::InvocationReply {
    pb::InvocationReply {
        invocation_id,
        error: Some(error),
        ..pb::InvocationReply::default()
    }
}

async fn invoke(invoker: &Invoker, payload: &[u8], json: bool) -> Answer {
    let request = match decode::<pb::InvokeRequest>(payload, json) {
        Ok(request) => request,
        Err(error) => return Err(failed_reply(String::new(), error)),
    };
    let echo = request.invocation_id.clone();
    let parsed = (|| {
        let not_an_object = || {
            bad(
                "arguments_invalid",
                "the arguments must be a JSON object".to_owned(),
            )
        };
        if !request.arguments_json.is_empty() && request.arguments.is_some() {
            return Err(bad(
                "arguments_invalid",
                "send the arguments once: `arguments` or `arguments_json`, not both".to_owned(),
            ));
        }
        let arguments = if !request.arguments_json.is_empty() {
            match serde_json::from_str(&request.arguments_json) {
                Ok(Value::Object(map)) => map,
                Ok(_) => return Err(not_an_object()),
                Err(error) => {
                    return Err(bad(
                        "arguments_invalid",
                        format!("`arguments_json` is not JSON: {error}"),
                    ));
                }
            }
        } else {
            match request.arguments.map(serde_json::to_value) {
                None => serde_json::Map::new(),
                Some(Ok(value @ Value::Object(_))) => match integral_numbers(value) {
                    Value::Object(map) => map,
                    _ => return Err(not_an_object()),
                },
                Some(_) => return Err(not_an_object()),
            }
        };
        Ok(InvokeRequest {
            invocation_id: id_of(&request.invocation_id)?,
            user: user_of(&request.user_id)?,
            tool: request.tool,
            arguments,
            deadline: (request.deadline_ms > 0).then(|| Duration::from_millis(request.deadline_ms)),
            conversation_id: Some(request.conversation_id).filter(|c| !c.is_empty()),
        })
    })();
    let request = parsed.map_err(|error| failed_reply(echo.clone(), error))?;
    let user = request.user.clone();
    match invoker
        .invoke(&CommandContext::service("orchestrator"), request)
        .await
    {
        Ok(report) => Ok((report, user)),
        Err(error) => Err(failed_reply(echo, refusal(&error))),
    }
}

async fn status(invoker: &Invoker, payload: &[u8], json: bool) -> Answer {
    let request = decode::<pb::InvokeStatusRequest>(payload, json)
        .map_err(|error| failed_reply(String::new(), error))?;
    let echo = request.invocation_id;
    let (user, id) =
        addressed(&request.user_id, &echo).map_err(|error| failed_reply(echo.clone(), error))?;
    let wait = Duration::from_millis(request.wait_ms).min(MAX_WAIT);
    match invoker.status(&user, &id, wait).await {
        Ok(report) => Ok((report, user)),
        Err(error) => Err(failed_reply(echo, refusal(&error))),
    }
}

async fn withdraw(invoker: &Invoker, payload: &[u8], json: bool) -> Answer {
    let request = decode::<pb::InvokeWithdrawRequest>(payload, json)
        .map_err(|error| failed_reply(String::new(), error))?;
    let echo = request.invocation_id;
    let (user, id) =
        addressed(&request.user_id, &echo).map_err(|error| failed_reply(echo.clone(), error))?;
    let context = CommandContext::service("orchestrator");
    match invoker.withdraw(&context, &user, &id).await {
        Ok(report) => Ok((report, user)),
        Err(error) => Err(failed_reply(echo, refusal(&error))),
    }
}

/// The user and invocation a request names.
fn addressed(
    user_id: &str,
    invocation_id: &str,
) -> Result<(UserId, InvocationId), pb::OrchestratorError> {
    Ok((user_of(user_id)?, id_of(invocation_id)?))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{Outcome, result::ResultServer};

    fn completed(text: &str, structured: Option<Value>) -> InvocationReport {
        InvocationReport {
            invocation_id: "call_1".to_owned(),
            outcome: Outcome::Completed,
            reason: None,
            message: None,
            result: Some(Arc::new(ResultEnvelope {
                untrusted: true,
                server: ResultServer {
                    id: "srv".to_owned(),
                    name: "Notion".to_owned(),
                },
                tool: "export_all".to_owned(),
                content: vec![json!({"type": "text", "text": text})],
                structured_content: structured,
                is_error: false,
                truncated: false,
            })),
        }
    }

    fn decoded(bytes: &Bytes, json: bool) -> pb::InvocationReply {
        if json {
            serde_json::from_slice(bytes).expect("JSON reply")
        } else {
            pb::InvocationReply::decode(bytes.clone()).expect("protobuf reply")
        }
    }

    fn alice() -> UserId {
        UserId::parse("alice@example.com").expect("user")
    }

    #[test]
    fn a_reply_that_fits_keeps_its_result_whole() {
        let report = completed("all of it", Some(json!({"rows": 3})));
        for json in [false, true] {
            let reply = decoded(&encode_report(&report, &alice(), json, 64 * 1024), json);
            let result: Value = serde_json::from_str(&reply.result_json).expect("JSON");
            assert_eq!(result["content"][0]["text"], "all of it");
            assert_eq!(result["structured_content"]["rows"], 3);
            assert_eq!(result["truncated"], false);
            assert!(reply.result.is_some());
        }
    }

    #[test]
    fn a_result_too_large_for_one_message_is_cut_until_the_reply_fits() {
        // Quotes and non-ASCII text grow the JSON reply faster than the content.
        let text = "\"é\\".repeat(60_000);
        let report = completed(&text, Some(json!({"rows": 3})));
        let max_payload = 64 * 1024;
        for json in [false, true] {
            let bytes = encode_report(&report, &alice(), json, max_payload);
            assert!(
                bytes.len() <= max_payload - REPLY_HEADROOM,
                "{}",
                bytes.len()
            );
            let reply = decoded(&bytes, json);
            assert_eq!(reply.outcome, "completed");
            let result: Value = serde_json::from_str(&reply.result_json).expect("JSON");
            assert_eq!(result["truncated"], true);
            assert_eq!(result["untrusted"], true);
            let kept = result["content"][0]["text"].as_str().expect("text");
            assert!(text.starts_with(kept));
            // Cut to fit, not emptied: the reply holds it twice, in JSON the second copy
            // escaped twice.
            assert!(kept.len() > 8 * 1024, "{json}: {}", kept.len());
            assert!(bytes.len() > max_payload / 2, "{json}: {}", bytes.len());
            assert!(reply.result.is_some());
        }
    }

    #[test]
    fn a_message_too_small_for_any_result_answers_without_it_and_says_where_it_is() {
        let report = completed(&"x".repeat(10_000), None);
        let reply = decoded(
            &encode_report(&report, &alice(), false, REPLY_HEADROOM + 100),
            false,
        );
        assert_eq!(reply.outcome, "completed");
        assert!(reply.result_json.is_empty() && reply.result.is_none());
        assert!(
            reply.message.contains("GET /api/v1/invocations/call_1"),
            "{}",
            reply.message
        );
    }

    #[test]
    fn a_tools_list_too_large_for_one_message_is_refused_with_a_reason() {
        let tool = pb::UsableTool {
            name: "notion__search".to_owned(),
            description: "d".repeat(10_000),
            ..pb::UsableTool::default()
        };
        let reply = pb::ToolsListReply {
            tools: vec![tool; 10],
            error: None,
        };
        let fits: pb::ToolsListReply =
            serde_json::from_slice(&encode_tools(&reply, true, 1024 * 1024)).expect("JSON");
        assert_eq!(fits.tools.len(), 10);
        let refused = pb::ToolsListReply::decode(encode_tools(&reply, false, 64 * 1024))
            .expect("protobuf reply");
        assert!(refused.tools.is_empty());
        let error = refused.error.expect("a refusal");
        assert_eq!(error.code, "reply_too_large");
        assert!(error.message.contains("10 tools"), "{}", error.message);
    }
}
