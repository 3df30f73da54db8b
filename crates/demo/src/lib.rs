//! What `switchboard up --demo` starts inside its own process, on loopback: a demo OAuth 2.1
//! authorization server and a demo MCP server (a small in-memory issue tracker), so that
//! someone trying Switchboard reaches a real tool call with nothing else installed.
//!
//! - **The authorization server** (`http://127.0.0.1:<auth port>`): RFC 8414 metadata,
//!   authorization code with PKCE S256 (RFC 7636), dynamic registration (RFC 7591), refresh
//!   with rotation (a rotated-out refresh token used again revokes its grant), revocation
//!   (RFC 7009), `iss` on the authorization response (RFC 9207), `resource` checked (RFC
//!   8707). `/authorize` shows a sign-in page with an Allow and a Deny button.
//! - **The MCP server** (`http://127.0.0.1:<mcp port>/mcp`): `rmcp`'s streamable HTTP server
//!   (stateless) behind a bearer-token check against the tokens the authorization server
//!   issued; RFC 9728 protected-resource metadata; tools `search_issues` (read-only),
//!   `create_issue`, `delete_issue` (destructive) and `export_all` (an answer larger than
//!   Switchboard's 1 MiB result cap). `GET /demo/stats` reports tool calls per tool and the
//!   revocations the authorization server accepted (never a token).
//!
//! Plain HTTP, not HTTPS: both servers listen on 127.0.0.1 only, so nothing leaves the
//! machine, and the person trying the demo opens the sign-in page in a browser without a
//! certificate warning. Switchboard's outbound guard admits exactly these two socket
//! addresses (see `docs/architecture.md`, "Demo").
//!
//! Every secret the authorization server issues (codes, access and refresh tokens, client
//! secrets) starts with [`SECRET_PREFIX`], so that a scan of logs or files can find any that
//! leaked. What must outlive a restart (the two ports, so the server URL and endpoints
//! Switchboard stored stay valid, and the registered clients, with secrets only as SHA-256)
//! is kept in `demo.json` in the state directory; tokens live in memory only, so after a
//! restart users connect again.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Serialize;
use tokio::{net::TcpListener, task::JoinHandle};

mod auth;
mod state;
mod tracker;

pub use state::{Revocation, Stats};

/// How every secret the demo authorization server issues begins.
pub const SECRET_PREFIX: &str = "sbdemo_";
/// The catalog template id of the demo server.
pub const TEMPLATE_ID: &str = "demo";
/// The name the demo server is added under.
pub const SERVER_NAME: &str = "Demo";
/// The scopes the demo knows: reading, and changing issues.
pub const SCOPES: [&str; 2] = ["issues:read", "issues:write"];
/// The file, in the state directory, that keeps the ports and registered clients.
pub const STATE_FILE: &str = "demo.json";

/// Why the demo did not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot read the demo state {path}: {reason}")]
    ReadState { path: PathBuf, reason: String },
    #[error("cannot write the demo state {path}: {reason}")]
    WriteState { path: PathBuf, reason: String },
    #[error(
        "cannot listen on 127.0.0.1:{port} for the demo {which}: {reason}. The demo server \
         Switchboard stored uses this port; stop what holds it (another `up --demo` on this \
         data directory?)"
    )]
    Bind {
        which: &'static str,
        port: u16,
        reason: String,
    },
}

/// The running demo servers. Dropping it stops them.
#[derive(Debug)]
pub struct Demo {
    auth_address: SocketAddr,
    mcp_address: SocketAddr,
    shared: Arc<state::Shared>,
    tasks: Vec<JoinHandle<()>>,
}

/// What `demo.json` keeps between starts.
#[derive(Debug, Default, Clone, Serialize, serde::Deserialize)]
pub(crate) struct Persisted {
    pub(crate) auth_port: u16,
    pub(crate) mcp_port: u16,
    /// The demo server was once added to Switchboard's server list (`up --demo` adds it on the
    /// first start only; an admin who deleted it can add it again from the catalog).
    #[serde(default)]
    pub(crate) server_added: bool,
    #[serde(default)]
    pub(crate) clients: std::collections::BTreeMap<String, state::Client>,
}

impl Demo {
    /// Starts both servers on 127.0.0.1: on the ports `state_dir/demo.json` names, or (first
    /// start) on free ports, which are then saved there.
    pub async fn start(state_dir: &Path) -> Result<Demo, DemoError> {
        let path = state_dir.join(STATE_FILE);
        let persisted = match std::fs::read(&path) {
            Ok(bytes) => Some(serde_json::from_slice::<Persisted>(&bytes).map_err(|e| {
                DemoError::ReadState {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(DemoError::ReadState {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        let (auth_port, mcp_port) = persisted
            .as_ref()
            .map_or((0, 0), |p| (p.auth_port, p.mcp_port));
        let auth_listener = bind("authorization server", auth_port).await?;
        let mcp_listener = bind("MCP server", mcp_port).await?;
        let local = |listener: &TcpListener, which| {
            listener.local_addr().map_err(|e| DemoError::Bind {
                which,
                port: 0,
                reason: e.to_string(),
            })
        };
        let auth_address = local(&auth_listener, "authorization server")?;
        let mcp_address = local(&mcp_listener, "MCP server")?;
        let mut persisted = persisted.unwrap_or_default();
        persisted.auth_port = auth_address.port();
        persisted.mcp_port = mcp_address.port();
        state::save(&path, &persisted)?;

        let shared = Arc::new(state::Shared::new(
            format!("http://{auth_address}"),
            format!("http://{mcp_address}"),
            path,
            persisted,
        ));
        let tasks = vec![
            serve(auth_listener, auth::router(shared.clone())),
            serve(mcp_listener, tracker::router(shared.clone())),
        ];
        tracing::info!(
            authorization_server = %shared.issuer,
            mcp_server = %shared.resource,
            "demo servers started on loopback"
        );
        Ok(Demo {
            auth_address,
            mcp_address,
            shared,
            tasks,
        })
    }

    /// The authorization server's issuer, `http://127.0.0.1:<port>`.
    pub fn issuer(&self) -> &str {
        &self.shared.issuer
    }

    /// The MCP endpoint, `http://127.0.0.1:<port>/mcp`: the demo server's URL.
    pub fn mcp_url(&self) -> &str {
        &self.shared.resource
    }

    /// The two socket addresses the outbound guard must admit, and only these.
    pub fn addresses(&self) -> [SocketAddr; 2] {
        [self.auth_address, self.mcp_address]
    }

    /// Tool calls per tool and the revocations seen so far (what `GET /demo/stats` shows).
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Whether the demo server was once added to the server list of this data directory.
    pub fn server_added(&self) -> bool {
        self.shared.state().persisted.server_added
    }

    /// Records that the demo server was added to the server list.
    pub fn record_server_added(&self) -> Result<(), DemoError> {
        let mut state = self.shared.state();
        state.persisted.server_added = true;
        self.shared.save(&state.persisted)
    }

    /// Stops both servers.
    pub async fn stop(mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn bind(which: &'static str, port: u16) -> Result<TcpListener, DemoError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .await
        .map_err(|e| DemoError::Bind {
            which,
            port,
            reason: e.to_string(),
        })
}

fn serve(listener: TcpListener, router: axum::Router) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "a demo server stopped");
        }
    })
}
