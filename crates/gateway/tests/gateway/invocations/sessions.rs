//! MCP sessions with the servers: tokens refreshed once, protocol eras remembered, idle
//! sessions closed.
use super::*;

#[tokio::test]
async fn a_token_refused_in_a_reused_session_is_refreshed_once_and_the_call_goes_through() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "always_allow").await;
    it.completed("call_t1", "create_issue", json!({"title": "a"}))
        .await;
    // The server now refuses the token the session holds.
    it.setup.handle.expire_access_tokens();
    it.completed("call_t2", "create_issue", json!({"title": "b"}))
        .await;
    assert_eq!(it.setup.handle.token_requests_for("refresh_token"), 1);
    // The refused attempts never ran the tool.
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 2);
}

/// A session's token is used without asking the connection service for a while (no vault
/// read and decryption per call); then one call asks, and a token still current is trusted
/// again — not asked for on every call from then on.
#[tokio::test]
async fn a_sessions_token_still_current_is_trusted_again_after_one_check() {
    let clock = std::sync::Arc::new(service_kit::ManualClock::new(std::time::SystemTime::now()));
    // Atlassian's fixture speaks 2025-11-25 with sessions, which it counts.
    let it = connected_to_clocked(
        Store::Jsonl,
        OAuthFixture::atlassian(),
        "atlassian",
        settings(),
        Some(clock.clone()),
    )
    .await;
    it.set_state("create_issue", "always_allow").await;
    let invoke = |id: &'static str| {
        let it = &it;
        async move {
            it.completed(id, "create_issue", json!({"title": id})).await;
        }
    };
    invoke("trust_1").await;
    let opened = it.setup.handle.sessions_opened();
    // Past the trust: this call asks, gets the same token, and goes on in the same session.
    clock.advance(Duration::from_secs(31));
    invoke("trust_2").await;
    assert_eq!(it.setup.handle.sessions_opened(), opened);

    // The stored token replaced behind the invoker's back (a refresh on another process; the
    // server still takes the old one): a call that asked would take the new one, in a new
    // session.
    let connections = &it.setup.app.state.connections;
    let server = domain::ServerId::parse(&it.server_id).expect("server id");
    let alice = alice();
    let stale = connections
        .access_token(server, &alice)
        .await
        .expect("token");
    let fresh = connections
        .refresh(server, &alice, &stale)
        .await
        .expect("refresh");
    assert_ne!(fresh, stale);
    invoke("trust_3").await;
    assert_eq!(
        it.setup.handle.sessions_opened(),
        opened,
        "trusted again after trust_2's check: the session's token, without asking"
    );
    // Past the renewed trust, the next call asks and gets the new token.
    clock.advance(Duration::from_secs(31));
    invoke("trust_4").await;
    assert_eq!(it.setup.handle.sessions_opened(), opened + 1);
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 4);
}

#[tokio::test]
async fn a_servers_protocol_era_is_remembered_and_renegotiated_when_it_changed() {
    // Atlassian's fixture speaks 2025-11-25 with sessions: negotiating its era costs a
    // `server/discover` that fails before the `initialize`.
    let it = connected_to(
        Store::Jsonl,
        OAuthFixture::atlassian(),
        "atlassian",
        settings(),
    )
    .await;
    let invoke = |id: &'static str| {
        let it = &it;
        async move {
            it.completed(id, "create_issue", json!({"title": id})).await;
        }
    };
    let discovers = || {
        it.setup
            .handle
            .mcp_requests()
            .iter()
            .filter(|r| r.method.as_deref() == Some("server/discover"))
            .count()
    };
    let url = url::Url::parse(&it.setup.fixture_url).expect("URL");
    it.set_state("create_issue", "always_allow").await;
    invoke("call_era_1").await;
    // Every session so far (the connection's tool listing, the invoker's) after the first
    // one opened with `initialize` straight away.
    let opened = it.setup.handle.sessions_opened();
    assert!(opened >= 2, "{opened} sessions");
    assert_eq!(discovers(), 1);
    assert_eq!(
        it.setup.outbound.protocol_eras().get(&url),
        Some(mcp::ProtocolEra::Sessions)
    );
    // A refused token opens a new session after the refresh: no probe again.
    it.setup.handle.expire_access_tokens();
    invoke("call_era_2").await;
    assert_eq!(it.setup.handle.sessions_opened(), opened + 1);
    assert_eq!(discovers(), 1);

    // Remembered wrongly (as if the server had spoken 2026-07-28 and gone back): the next
    // session's discovery fails, and the era is negotiated again at once.
    it.setup.outbound.protocol_eras().remember(
        &url,
        mcp::ProtocolEra::Stateless(mcp::ProtocolVersion::V_2026_07_28),
    );
    it.setup.handle.expire_access_tokens();
    invoke("call_era_3").await;
    assert_eq!(it.setup.handle.sessions_opened(), opened + 2);
    assert_eq!(
        discovers(),
        3,
        "the remembered era's discovery, then the negotiation's"
    );
    assert_eq!(
        it.setup.outbound.protocol_eras().get(&url),
        Some(mcp::ProtocolEra::Sessions)
    );
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 3);
}

/// An MCP session no call has used for `session_idle` is closed — in the sessions era the
/// server is told (`DELETE` with the session's id) — and the next call opens another.
#[tokio::test]
async fn an_idle_session_is_closed_and_the_next_call_opens_another() {
    let idle = Duration::from_secs(600);
    let clock = std::sync::Arc::new(service_kit::ManualClock::new(std::time::SystemTime::now()));
    let it = connected_to_clocked(
        Store::Jsonl,
        OAuthFixture::atlassian(),
        "atlassian",
        invoker::InvokerSettings {
            session_idle: idle,
            ..settings()
        },
        Some(clock.clone()),
    )
    .await;
    it.set_state("search_issues", "always_allow").await;
    it.completed("call_before_idle", "search_issues", json!({"query": "x"}))
        .await;
    let handle = &it.setup.handle;
    let opened = handle.sessions_opened();
    let session = handle
        .mcp_requests()
        .into_iter()
        .rev()
        .find(|seen| seen.method.as_deref() == Some("tools/call"))
        .and_then(|seen| seen.session_id)
        .expect("the call went out in a session");
    let invoker = &it.setup.app.state.invoker;

    clock.advance(idle - Duration::from_secs(1));
    assert_eq!(invoker.close_idle_sessions(), 0, "used within the limit");
    clock.advance(Duration::from_secs(1));
    assert_eq!(invoker.close_idle_sessions(), 1);
    tokio::time::timeout(
        Duration::from_secs(10),
        handle.mcp_requests_where(1, |seen| {
            seen.http_method == "DELETE" && seen.session_id.as_deref() == Some(session.as_str())
        }),
    )
    .await
    .expect("the server was told the session ended");

    it.completed("call_after_idle", "search_issues", json!({"query": "y"}))
        .await;
    assert_eq!(handle.sessions_opened(), opened + 1);
}
