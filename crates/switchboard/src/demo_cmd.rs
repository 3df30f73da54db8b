//! `switchboard up --demo`: the demo servers started in-process, the demo server added to the
//! server list once per data directory (as an admin would: discovery and dynamic registration
//! for real), and what to do next printed on standard output.
use std::time::Duration;

use anyhow::Context;
use gateway::AppState;

use crate::{configuration::Settings, token::SharedSecret};

/// How long the printed tokens are valid.
const TOKEN_TTL: Duration = Duration::from_secs(8 * 3600);
/// Who the printed tokens are for.
const DEMO_ADMIN: &str = "admin@example.com";
const DEMO_USER: &str = "alice@example.com";

/// Starts the demo servers; their state (ports, registered clients) lives in
/// `<data-dir>/demo`.
pub async fn start(settings: &Settings) -> anyhow::Result<demo::Demo> {
    demo::Demo::start(&settings.data_dir.join("demo"))
        .await
        .context("starting the demo servers")
}

/// Adds the demo server to the server list unless this data directory already has one from
/// the demo template, or had one (an admin who deleted it can add it again from the catalog).
/// A failure is logged: Switchboard keeps running without it.
pub async fn add_server_once(state: &AppState, demo: &demo::Demo) {
    let listed = state.read_models.servers.read(|directory| {
        directory
            .iter()
            .any(|server| server.catalog_entry_id == catalog::DEMO_TEMPLATE)
    });
    if listed || demo.server_added() {
        tracing::info!("the demo server was added on an earlier start; not adding it again");
        return;
    }
    let input = catalog::AddServerInput {
        name: demo::SERVER_NAME.to_owned(),
        template: Some(catalog::DEMO_TEMPLATE.to_owned()),
        description: Some("The demo issue tracker of `switchboard up --demo`".to_owned()),
        ..catalog::AddServerInput::default()
    };
    let context = service_kit::CommandContext::service("demo");
    match state.servers.add_server(&context, input).await {
        Ok((id, written)) => {
            state.settle(&written).await;
            if let Err(error) = demo.record_server_added() {
                tracing::warn!(%error, "the next start may try to add the demo server again");
            }
            tracing::info!(server = %id, "the demo server is added to the server list");
        }
        Err(error) => {
            tracing::error!(
                code = error.code(),
                "the demo server was not added: {error}"
            );
        }
    }
}

/// Prints the tokens to use and the next commands.
/// The options that point `audit replay` at the store `up` writes to. A NATS URL's
/// credentials are left out (it reads them from the same configuration or environment).
fn where_the_events_are(settings: &Settings) -> String {
    let store = settings.store();
    match store.nats_display() {
        Some(url) => format!("--nats {url} --nats-prefix {}", store.nats_prefix()),
        None => format!("--data-dir {}", settings.data_dir.display()),
    }
}

pub fn print_next_steps(
    settings: &Settings,
    secret: Option<&SharedSecret>,
    public_url: &str,
    demo: &demo::Demo,
) -> anyhow::Result<()> {
    let mut out = String::new();
    out.push_str(&format!(
        "\nSwitchboard is up with the demo at {public_url}\n\
         \x20 demo MCP server (issue tracker): {}\n\
         \x20 demo sign-in (OAuth):           {}\n\n",
        demo.mcp_url(),
        demo.issuer()
    ));
    match secret {
        Some(secret) => {
            let mint = |user: &str, role: &str| {
                gateway::auth::mint_token(
                    &secret.bytes,
                    &gateway::auth::TokenRequest {
                        user,
                        roles: &[role.to_owned()],
                        ttl: TOKEN_TTL,
                        issuer: settings.auth.issuer.as_deref(),
                        audience: settings.auth.audience.as_deref(),
                        roles_claim: &settings.auth.roles_claim,
                    },
                )
                .map_err(|e| anyhow::anyhow!(e))
            };
            out.push_str(&format!(
                "Tokens for the next 8 hours (as `switchboard token` mints them):\n\
                 \x20 # {DEMO_ADMIN}, admin: manages servers, reads the audit log\n\
                 \x20 export SWITCHBOARD_ADMIN_TOKEN={}\n\
                 \x20 # {DEMO_USER}, analyst: connects and calls tools\n\
                 \x20 export SWITCHBOARD_TOKEN={}\n\n",
                mint(DEMO_ADMIN, "admin")?,
                mint(DEMO_USER, "analyst")?,
            ));
        }
        None => out.push_str(
            "Tokens: this instance verifies tokens with a JWKS (auth.jwks_file); get them from \
             your identity provider and export SWITCHBOARD_TOKEN.\n\n",
        ),
    }
    out.push_str(&format!(
        "Next, in another terminal (with the exports above):\n\
         \x20 export SWITCHBOARD_URL={public_url}\n\
         \x20 switchboard servers                       # the demo server is listed\n\
         \x20 switchboard connect demo                  # open the URL: Allow, then Connect\n\
         \x20 switchboard tools --server demo           # four tools, every one Blocked\n\
         \x20 switchboard allow demo search_issues always\n\
         \x20 switchboard allow demo write_delete approval --category\n\
         \x20 switchboard invoke demo__search_issues '{{\"query\": \"export\"}}'\n\
         \x20 switchboard invoke demo__delete_issue '{{\"key\": \"DEMO-1\"}}'   # waits for approval\n\
         \x20 switchboard approvals                     # in a third terminal: what waits\n\
         \x20 switchboard approve <invocation id>      # --always: and from now on\n\
         \x20 switchboard history                       # what was done as you, by whom\n\
         \x20 switchboard {} audit replay --format table\n\n\
         Or point any MCP client (streamable HTTP) at {public_url}/mcp with the header\n\
         \x20 Authorization: Bearer $SWITCHBOARD_TOKEN   # the same tools, settings, approvals\n\
         (a client that shows forms asks you to approve right there).\n",
        where_the_events_are(settings)
    ));
    print!("{out}");
    use std::io::Write;
    std::io::stdout()
        .flush()
        .context("writing to standard output")
}
