//! The orchestrator's protocol over HTTP: a user's usable tools, invocations and their
//! outcomes; and the user's approvals.
//!
//! Whose: a `view_and_connect` caller lists, invokes and looks up for themselves; an
//! `invoke_for_users` caller (the orchestrator) names the user (`?user=` or `"user"`).
//! Approvals are always the caller's own: only the user an invocation runs for decides it.
use std::time::Duration;

use axum::{extract::State, http::Method};
use domain::{InvocationId, ToolState, UserId};
use eventlog::LogKind;
use invoker::{Decision, InvocationReport, InvokeRequest};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use service_kit::CommandContext;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    Access, ApiError, ApiJson, ApiPath, ApiQuery, AppState, Caller, Permission, RouteSpec,
};

const OWN_OR_FOR_USERS: Access =
    Access::AnyOf(&[Permission::ViewAndConnect, Permission::InvokeForUsers]);
const OWN: Access = Access::AnyOf(&[Permission::ViewAndConnect]);

pub const ROUTES: &[RouteSpec] = &[
    RouteSpec::new(Method::GET, "/api/v1/tools", OWN_OR_FOR_USERS),
    RouteSpec::new(Method::POST, "/api/v1/invocations", OWN_OR_FOR_USERS),
    RouteSpec::new(Method::GET, "/api/v1/invocations/{id}", OWN_OR_FOR_USERS),
    RouteSpec::new(
        Method::POST,
        "/api/v1/invocations/{id}/withdraw",
        OWN_OR_FOR_USERS,
    ),
    RouteSpec::new(Method::GET, "/api/v1/approvals", OWN),
    RouteSpec::new(Method::POST, "/api/v1/approvals/{invocation_id}", OWN),
];

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_tools))
        .routes(routes!(invoke))
        .routes(routes!(invocation_status))
        .routes(routes!(withdraw_invocation))
        .routes(routes!(list_approvals))
        .routes(routes!(decide_approval))
}

/// The longest `wait` a status look-up may ask for, in seconds.
const MAX_WAIT_SECS: u64 = 60;

/// The user a request is for: the caller, or the named user for an `invoke_for_users`
/// caller. Naming another user without that permission is refused.
pub(crate) fn user_for(caller: &Caller, named: Option<&str>) -> Result<UserId, ApiError> {
    let Some(named) = named else {
        return Ok(caller.user.clone());
    };
    let user = UserId::parse(named).map_err(|e| ApiError::bad_request(e.code(), e.to_string()))?;
    if user != caller.user && !caller.may(Permission::InvokeForUsers) {
        return Err(ApiError::forbidden(
            "acting for another user needs the invoke_for_users permission",
        ));
    }
    Ok(user)
}

fn invocation_id(text: &str) -> Result<InvocationId, ApiError> {
    InvocationId::parse(text).map_err(|e| ApiError::bad_request(e.code(), e.to_string()))
}

impl From<invoker::InvokerError> for ApiError {
    fn from(error: invoker::InvokerError) -> Self {
        use invoker::InvokerError as E;
        match error {
            E::Domain(error) => error.into(),
            E::EventLog(error) => error.into(),
            E::Command(error) => error.into(),
            error @ (E::ArgumentsTooLarge { .. }
            | E::DeadlineInvalid { .. }
            | E::ReasonInvalid { .. }) => ApiError::bad_request(error.code(), error.to_string()),
            error @ E::NotCaughtUp { .. } => ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                error.code(),
                error.to_string(),
            ),
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UserQuery {
    /// The user (only for `invoke_for_users` callers; default: the caller).
    pub user: Option<String>,
}

/// The server a tool belongs to.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ToolServerItem {
    pub id: String,
    pub name: String,
    /// The admin's description of the server: context for the AI.
    pub description: String,
}

/// A tool the user may use now.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsableTool {
    /// The exposed name: what the AI calls the tool by.
    pub name: String,
    /// The tool's name on its server.
    pub tool_name: String,
    pub server: ToolServerItem,
    pub title: String,
    pub description: String,
    #[schema(value_type = Object)]
    pub input_schema: Value,
    #[schema(value_type = Option<Object>)]
    pub output_schema: Option<Value>,
    /// Hints for the AI (MCP's spelling); never a reason to allow a tool.
    #[schema(value_type = Option<Object>)]
    pub annotations: Option<Value>,
    /// `always_allow` or `needs_approval`.
    pub state: &'static str,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsableTools {
    /// By name.
    pub tools: Vec<UsableTool>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ToolsQuery {
    /// The user (only for `invoke_for_users` callers; default: the caller).
    pub user: Option<String>,
    /// A change's `config_position` (`GET /api/v1/tools/changes`): the list is answered once
    /// it shows that change (waiting at most 5 s, else 503 `not_caught_up`).
    pub after_config_position: Option<u64>,
}

/// The user's usable tools: server enabled, connection healthy, state Always allow or Needs
/// approval.
#[utoipa::path(get, path = "/api/v1/tools", tag = "invocations", security(("bearer" = [])),
    params(ToolsQuery),
    responses(
        (status = 200, description = "The tools the user may use now", body = UsableTools),
        (status = 403, description = "Naming another user needs invoke_for_users", body = crate::ErrorBody),
        (status = 503, description = "This process has not caught up with `after_config_position` in time; ask again", body = crate::ErrorBody),
    ))]
async fn list_tools(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<ToolsQuery>,
) -> Result<axum::Json<UsableTools>, ApiError> {
    let user = user_for(&caller, query.user.as_deref())?;
    state
        .invoker
        .caught_up_with(query.after_config_position.unwrap_or(0))
        .await?;
    let tools = state
        .invoker
        .list_tools(&user)
        .into_iter()
        .map(|t| UsableTool {
            name: t.name,
            tool_name: t.tool_name,
            server: ToolServerItem {
                id: t.server.id,
                name: t.server.name,
                description: t.server.description,
            },
            title: t.title,
            description: t.description,
            input_schema: t.input_schema,
            output_schema: t.output_schema,
            annotations: t.annotations,
            state: t.state,
        })
        .collect();
    Ok(axum::Json(UsableTools { tools }))
}

/// A tool call request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvocationRequest {
    /// Your id for the tool call (1–128 characters, e.g. the model's tool call id). One id
    /// gives one outcome and at most one call to the server: send it again to get the outcome.
    pub invocation_id: String,
    /// The tool's exposed name.
    pub tool: String,
    /// The tool's arguments (a JSON object).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub arguments: serde_json::Map<String, Value>,
    /// The user the call is for (only for `invoke_for_users` callers; default: the caller).
    pub user: Option<String>,
    /// How long the call may take, in milliseconds.
    pub deadline_ms: Option<u64>,
    /// Your conversation the call belongs to, recorded with the invocation for the audit.
    pub conversation_id: Option<String>,
}

/// An invocation's outcome.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InvocationOutcome {
    pub invocation_id: String,
    /// `completed`, `rejected`, `awaiting_approval`, `denied`, `expired`, `failed`, or
    /// `running` (not final: the call is under way).
    pub outcome: &'static str,
    /// Why it was rejected, denied, expired or failed: a stable code (`tool_blocked`,
    /// `unknown_tool`, `server_disabled`, `not_connected`, `auth_error`,
    /// `too_many_pending_approvals`, `deadline_exceeded`, `withdrawn`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What happened, in words: for a denial, the reason its user gave (if any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The tool's answer, untrusted: `{untrusted: true, server: {id, name}, tool, content,
    /// structured_content, is_error, truncated}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
}

impl InvocationOutcome {
    fn of(report: InvocationReport) -> Self {
        InvocationOutcome {
            invocation_id: report.invocation_id,
            outcome: report.outcome.as_str(),
            reason: report.reason,
            message: report.message,
            result: report.result.and_then(|r| serde_json::to_value(&*r).ok()),
        }
    }
}

/// Invokes a tool for a user. A rejected, awaiting, denied, expired or failed invocation is
/// still a 200: the outcome says what happened.
#[utoipa::path(post, path = "/api/v1/invocations", tag = "invocations", security(("bearer" = [])),
    request_body = InvocationRequest,
    responses(
        (status = 200, description = "The outcome", body = InvocationOutcome),
        (status = 400, description = "An invalid id, arguments or deadline", body = crate::ErrorBody),
        (status = 403, description = "Naming another user needs invoke_for_users", body = crate::ErrorBody),
        (status = 409, description = "The id was used for a different request", body = crate::ErrorBody),
    ))]
async fn invoke(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(request): ApiJson<InvocationRequest>,
) -> Result<axum::Json<InvocationOutcome>, ApiError> {
    let user = user_for(&caller, request.user.as_deref())?;
    let report = state
        .invoker
        .invoke(
            &state.command_context(&caller),
            InvokeRequest {
                invocation_id: invocation_id(&request.invocation_id)?,
                user,
                tool: request.tool,
                arguments: request.arguments,
                deadline: request.deadline_ms.map(Duration::from_millis),
                conversation_id: request.conversation_id,
            },
        )
        .await?;
    // An invocation that waits is listed among the user's approvals: a GET right after this
    // answer must find it there (read-your-writes). A call's answer needs no wait: its
    // status is looked up after the read model has caught up anyway.
    if report.outcome == invoker::Outcome::AwaitingApproval {
        settle_invocations(&state).await?;
    }
    Ok(axum::Json(InvocationOutcome::of(report)))
}

/// After the caller blocked tools of `server` or disconnected from it: their requests there
/// that wait for approval and that no approval could let through now are denied (the
/// caller's own doing), and leave their approvals before the answer.
pub(crate) async fn deny_pending_now_refused(
    state: &AppState,
    context: &CommandContext,
    user: &UserId,
    server: domain::ServerId,
) -> Result<(), ApiError> {
    let denied = state
        .invoker
        .deny_pending_now_refused(context, user, server)
        .await;
    settle_if_closed(state, denied).await
}

/// After an administrator disabled or deleted `server`: every user's requests on it that
/// wait for approval fail at once (`server_disabled`), and leave their approvals before the
/// answer. (Closing them is best effort: the change itself stands, and the sweeper closes
/// what the store did not take.)
pub(crate) async fn fail_pending_on_server_gone(
    state: &AppState,
    caller: &Caller,
    server: domain::ServerId,
) -> Result<(), ApiError> {
    let context = state.command_context(caller);
    let failed = state
        .invoker
        .fail_pending_on_server_gone(&context, server)
        .await;
    settle_if_closed(state, failed).await
}

/// After `closed` invocations were closed: the approvals list shows it before the answer.
async fn settle_if_closed(state: &AppState, closed: usize) -> Result<(), ApiError> {
    if closed > 0 {
        settle_invocations(state).await?;
    }
    Ok(())
}

/// Waits (bounded) until the invocations' read model holds everything the log holds now.
pub(crate) async fn settle_invocations(state: &AppState) -> Result<(), ApiError> {
    let end = state.log.last_sequence(LogKind::Invocations).await?;
    if !state
        .read_models
        .wait_for_position(
            LogKind::Invocations,
            end,
            state.settings.read_your_writes_timeout,
        )
        .await
    {
        tracing::warn!(
            position = end,
            "the invocations read model did not catch up in time"
        );
    }
    Ok(())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    /// The user the invocation is for (only for `invoke_for_users` callers).
    pub user: Option<String>,
    /// Seconds to wait for a final outcome (at most 60); default: answer at once.
    pub wait: Option<u64>,
}

/// An invocation's outcome, optionally waiting for the final one. Open invocations and those
/// finished in the last six hours are found; older ones are in the audit log.
#[utoipa::path(get, path = "/api/v1/invocations/{id}", tag = "invocations", security(("bearer" = [])),
    params(("id" = String, Path, description = "The invocation id"), StatusQuery),
    responses(
        (status = 200, description = "The outcome", body = InvocationOutcome),
        (status = 404, description = "No such invocation of the user (open, or finished in the last six hours)", body = crate::ErrorBody),
    ))]
async fn invocation_status(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<StatusQuery>,
) -> Result<axum::Json<InvocationOutcome>, ApiError> {
    let user = user_for(&caller, query.user.as_deref())?;
    let wait = Duration::from_secs(query.wait.unwrap_or(0).min(MAX_WAIT_SECS));
    let report = state
        .invoker
        .status(&user, &invocation_id(&id)?, wait)
        .await?;
    Ok(axum::Json(InvocationOutcome::of(report)))
}

/// Withdraws an invocation the orchestrator no longer wants (the user stopped the
/// conversation): one waiting for approval leaves the user's approvals and ends `denied`
/// with reason `withdrawn`; one whose call runs has it cancelled, at the server too, and ends
/// `failed` with reason `withdrawn` — unless it finished first, which the answer then says.
/// A finished invocation is refused (409).
#[utoipa::path(post, path = "/api/v1/invocations/{id}/withdraw", tag = "invocations", security(("bearer" = [])),
    params(("id" = String, Path, description = "The invocation id"), UserQuery),
    responses(
        (status = 200, description = "The outcome after the withdrawal", body = InvocationOutcome),
        (status = 404, description = "No such invocation of the user", body = crate::ErrorBody),
        (status = 409, description = "Finished already", body = crate::ErrorBody),
        (status = 410, description = "The approval window closed", body = crate::ErrorBody),
    ))]
async fn withdraw_invocation(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<UserQuery>,
) -> Result<axum::Json<InvocationOutcome>, ApiError> {
    let user = user_for(&caller, query.user.as_deref())?;
    let report = state
        .invoker
        .withdraw(&state.command_context(&caller), &user, &invocation_id(&id)?)
        .await?;
    // Withdrawn, it leaves the user's approvals: a GET right after must not list it.
    settle_invocations(&state).await?;
    Ok(axum::Json(InvocationOutcome::of(report)))
}

/// An invocation waiting for your decision.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApprovalItem {
    pub invocation_id: String,
    /// The exposed name the AI used.
    pub tool: String,
    /// The tool's name on its server.
    pub tool_name: String,
    /// The tool's title and description, as its server gives them now (absent once it no
    /// longer offers the tool).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `read_only` or `write_delete`, as in the tool settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<&'static str>,
    /// The server's hints (`destructiveHint`, `readOnlyHint`, …) in MCP's spelling: the
    /// server's words, never a reason to approve.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub annotations: Option<Value>,
    /// The tool's definition changed since you last set it: look before you approve.
    pub tool_changed: bool,
    /// The tool's current definition hash: send it with `PUT
    /// /api/v1/servers/{id}/tools/{tool}` (e.g. to make it Always allow after approving) so
    /// that the setting applies only to the definition you saw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub definition_hash: Option<String>,
    pub server: ToolServerRef,
    /// The arguments the AI asks to call the tool with.
    #[schema(value_type = Object)]
    pub arguments: Value,
    /// The orchestrator's conversation the request came from, when it named one.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub conversation_id: String,
    pub requested_at: String,
    /// Unanswered by then, the invocation expires.
    pub expires_at: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ToolServerRef {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApprovalList {
    /// Oldest first.
    pub approvals: Vec<ApprovalItem>,
}

/// Your invocations waiting for your approval.
#[utoipa::path(get, path = "/api/v1/approvals", tag = "invocations", security(("bearer" = [])),
    responses((status = 200, description = "Pending approvals", body = ApprovalList)))]
async fn list_approvals(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<ApprovalList>, ApiError> {
    let approvals = state
        .invoker
        .pending_approvals(&caller.user)
        .await
        .into_iter()
        .map(|p| ApprovalItem {
            invocation_id: p.invocation_id,
            tool: p.tool,
            tool_name: p.tool_name,
            title: p.tool_context.as_ref().map(|t| t.title.clone()),
            description: p.tool_context.as_ref().map(|t| t.description.clone()),
            category: p.tool_context.as_ref().map(|t| t.category),
            annotations: p.tool_context.as_ref().and_then(|t| t.annotations.clone()),
            tool_changed: p.tool_context.as_ref().is_some_and(|t| t.changed),
            definition_hash: p.tool_context.as_ref().map(|t| t.definition_hash.clone()),
            server: ToolServerRef {
                id: p.server.id,
                name: p.server.name,
            },
            arguments: p.arguments,
            conversation_id: p.conversation_id,
            requested_at: super::rfc3339(p.requested_at),
            expires_at: super::rfc3339(p.expires_at),
        })
        .collect();
    Ok(axum::Json(ApprovalList { approvals }))
}

/// Your decision on one invocation.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalDecision {
    /// `approve` or `deny`.
    pub decision: String,
    /// With `deny` only: why, for the AI (at most 500 characters); the invocation's outcome
    /// carries it as its `message`.
    pub reason: Option<String>,
    /// The decision stands for the tool's later requests too: `approve` sets the tool to
    /// `always_allow`, `deny` to `blocked` (which also denies your other requests of it that
    /// wait), as `PUT /api/v1/servers/{id}/tools/{tool}` would. The setting is made first: if
    /// it is refused, nothing is decided.
    #[serde(default)]
    pub always: bool,
    /// With `always` only: the tool's `definition_hash` as your approvals listed it. The
    /// setting is then refused (409, nothing decided) if the server has changed the tool
    /// since — you decided about what you saw.
    pub definition_hash: Option<String>,
}

/// Approves (the call runs now) or denies one of your invocations. Final: decided once.
/// With `always`, the tool's setting follows the decision for its later requests.
#[utoipa::path(post, path = "/api/v1/approvals/{invocation_id}", tag = "invocations", security(("bearer" = [])),
    params(("invocation_id" = String, Path, description = "The invocation id")),
    request_body = ApprovalDecision,
    responses(
        (status = 200, description = "The invocation's outcome after the decision", body = InvocationOutcome),
        (status = 400, description = "The decision is not approve or deny, its reason is not valid, or a definition_hash came without always", body = crate::ErrorBody),
        (status = 404, description = "No such invocation of yours", body = crate::ErrorBody),
        (status = 409, description = "Not waiting for approval (decided, or finished); or, with `always` and a `definition_hash`, the tool changed since you saw it", body = crate::ErrorBody),
        (status = 410, description = "The approval window closed", body = crate::ErrorBody),
    ))]
async fn decide_approval(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<ApprovalDecision>,
) -> Result<axum::Json<InvocationOutcome>, ApiError> {
    let decision = match (request.decision.as_str(), request.reason) {
        ("approve", None) => Decision::Approve,
        ("approve", Some(_)) => {
            return Err(ApiError::bad_request(
                "reason_invalid",
                "a reason goes with deny only",
            ));
        }
        ("deny", reason) => Decision::Deny {
            reason: reason.unwrap_or_default(),
        },
        _ => {
            return Err(ApiError::bad_request(
                "invalid_decision",
                "decision must be approve or deny",
            ));
        }
    };
    if request.definition_hash.is_some() && !request.always {
        return Err(ApiError::bad_request(
            "definition_hash_without_always",
            "a definition_hash goes with always only",
        ));
    }
    let id = invocation_id(&id)?;
    let context = state.command_context(&caller);
    let report = decide_as_user(
        &state,
        &context,
        &caller.user,
        &id,
        decision,
        request.always,
        request.definition_hash,
    )
    .await?;
    Ok(axum::Json(InvocationOutcome::of(report)))
}

/// Why a user's decision was not made, as the part that refused it said: a caller acting
/// on the kind of refusal (an MCP prompt asks again when the tool changed) matches
/// [`DecisionRefused::rule`]; the API answers it as an [`ApiError`].
#[derive(Debug)]
pub(crate) enum DecisionRefused {
    /// The tool's setting that `always` asked for.
    Setting(policy::PolicyError),
    /// The decision itself.
    Decision(invoker::InvokerError),
    /// What follows it: showing it in the approvals, denying what the new setting refuses.
    After(ApiError),
}

impl DecisionRefused {
    /// The domain's rule that refused it, if one did.
    pub(crate) fn rule(&self) -> Option<&domain::DomainError> {
        match self {
            DecisionRefused::Setting(policy::PolicyError::Domain(rule))
            | DecisionRefused::Setting(policy::PolicyError::Command(
                service_kit::CommandError::Domain(rule),
            ))
            | DecisionRefused::Decision(invoker::InvokerError::Domain(rule)) => Some(rule),
            _ => None,
        }
    }
}

impl From<DecisionRefused> for ApiError {
    fn from(refused: DecisionRefused) -> Self {
        match refused {
            DecisionRefused::Setting(error) => error.into(),
            DecisionRefused::Decision(error) => error.into(),
            DecisionRefused::After(error) => error,
        }
    }
}

/// `user`'s decision on their invocation `id`, wherever they make it (the approvals route,
/// an approval prompt in their MCP client). With `always` the tool's setting follows the
/// decision (`always_allow`, or `blocked`, which also denies their other requests of it that
/// wait), set first, so that a refused setting — the tool changed since the definition
/// `definition_hash` names — decides nothing. Answers once the approvals no longer list it.
pub(crate) async fn decide_as_user(
    state: &AppState,
    context: &CommandContext,
    user: &UserId,
    id: &InvocationId,
    decision: Decision,
    always: bool,
    definition_hash: Option<String>,
) -> Result<InvocationReport, DecisionRefused> {
    let blocks = matches!(decision, Decision::Deny { .. });
    // Set before the decision, so that a refused setting decides nothing. (An invocation not
    // waiting any more changes no setting: the decision below says why it cannot be made.)
    let waiting_on = always
        .then(|| state.invoker.awaiting_approval_on(user, id))
        .flatten();
    let remembered_on = match waiting_on {
        Some((server, tool)) => {
            let setting = if blocks {
                ToolState::Blocked
            } else {
                ToolState::AlwaysAllow
            };
            let written = state
                .policy
                .set_tool_state(context, user, server, &tool, setting, definition_hash)
                .await
                .map_err(DecisionRefused::Setting)?;
            state.settle(&written).await;
            Some(server)
        }
        None => None,
    };
    let report = state
        .invoker
        .decide_approval(context, user, id, decision)
        .await
        .map_err(DecisionRefused::Decision)?;
    // The decided invocation leaves the user's approvals: a GET right after must not list it.
    settle_invocations(state)
        .await
        .map_err(DecisionRefused::After)?;
    if blocks && let Some(server) = remembered_on {
        // The tool is blocked now: the user's other requests of it that wait are pointless.
        deny_pending_now_refused(state, context, user, server)
            .await
            .map_err(DecisionRefused::After)?;
    }
    Ok(report)
}
