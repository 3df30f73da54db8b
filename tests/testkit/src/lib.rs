//! Test support for Switchboard's integration tests: a real `nats-server` with JetStream on a free
//! loopback port and a throw-away store directory.
//!
//! - [`NatsServer::start`] gives a test its own server, which it may stop, kill and restart.
//! - [`TestCa`] is a throw-away certificate authority for real TLS on loopback;
//!   [`serve_https`] and [`serve_http`] run fixture servers (an axum router) on loopback.
//! - [`OAuthFixture`] is a fixture MCP server (`rmcp`, streamable HTTP) with its OAuth 2.1
//!   authorization server, following the specifications or a provider's departures;
//!   [`OAuthFixture::start`] gives its router and a [`FixtureHandle`] to steer and observe it.
//! - [`shared_nats`] gives every test of a test binary the same server; tests isolate themselves
//!   with [`unique_name`]s for streams, subjects and buckets.
//!
//! Every server is spawned from one long-lived thread with `PR_SET_PDEATHSIG = SIGKILL`, so no
//! nats-server outlives the test binary that started it, even when the binary is killed.

mod browser;
mod https;
mod mcp_fixture;
mod oauth;
pub use mcp_fixture::{
    EXPORT_ALL_BYTES, FixtureTool, McpEra, SlowCallEnd, TOOLS_PAGE_SIZE, ToolOutput,
};
pub use oauth::{
    AuthorizationRequestSeen, CODE_LIFETIME, ClientAuthMethod, DEFAULT_USER,
    FIRST_REGISTERED_CLIENT_ID, FIRST_REGISTERED_CLIENT_SECRET, FixtureHandle, McpRequestSeen,
    OAuthFixture, PRE_REGISTERED_CLIENT_ID, PRE_REGISTERED_CLIENT_SECRET, READ_SCOPE, Revocation,
    RevocationStyle, ScopeChallenge, TokenGate, TokenKind, TokenRequestSeen, WRITE_SCOPE,
};

/// Installs ring as the process's TLS crypto provider (Switchboard's choice; reqwest is built
/// without one). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A reqwest client builder for tests, with the crypto provider installed.
pub fn http_client() -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder()
}
mod tls;
pub use browser::{confirmation_answer, confirmation_fields, follow_callback, post_confirmation};
pub use https::{FixtureServer, serve_http, serve_https, serve_https_on};
pub use tls::{ServerCert, TestCa};

use std::collections::hash_map::RandomState;
use std::fs::{self, OpenOptions};
use std::hash::BuildHasher;
use std::io::{self, BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a start or restart may take before the test fails (generous: CI machines are slow).
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a graceful stop may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Fresh ports tried by [`NatsServer::start`] when another process took the free port first.
const START_ATTEMPTS: usize = 5;
/// Logged by nats-server once the client listener is up, which is after JetStream has started
/// (and recovered its streams from the store).
const READY_LINE: &str = "Server is ready";
const PORT_IN_USE: &str = "address already in use";
const LOG_FILE: &str = "nats-server.log";
const LOG_TAIL_LINES: usize = 40;
/// Oldest nats-server Switchboard supports (Debian's 2.9 breaks the KV client).
const MIN_VERSION: (u32, u32) = (2, 11);

/// A `nats-server` child process with JetStream, listening on `127.0.0.1:<port>`, with its store
/// and log in a temporary directory that is removed on drop.
#[derive(Debug)]
pub struct NatsServer {
    bin: PathBuf,
    port: u16,
    /// `None` once stopped or killed. Behind a mutex so `is_running(&self)` can reap the child.
    child: Mutex<Option<Child>>,
    store: PathBuf,
    log: PathBuf,
    /// Where the current run's output starts in the log, which every (re)start appends to.
    log_offset: u64,
    dir: TempDir,
}

/// Why a launched server did not become ready.
#[derive(Debug)]
enum NotReady {
    Spawn(io::Error),
    Exited(ExitStatus),
    Timeout,
}

impl NatsServer {
    /// Starts nats-server with JetStream on a free 127.0.0.1 port and a fresh temp store dir;
    /// returns once it accepts client connections and JetStream is ready.
    ///
    /// # Panics
    /// If nats-server cannot be found or does not become ready; the message carries its log tail.
    #[must_use]
    pub fn start() -> NatsServer {
        let bin = nats_server_bin();
        check_version(&bin);
        let dir = tempfile::Builder::new()
            .prefix("testkit-nats-")
            .tempdir()
            .unwrap_or_else(|e| panic!("testkit: cannot create a temp dir for nats-server: {e}"));
        let store = dir.path().join("store");
        fs::create_dir(&store).unwrap_or_else(|e| {
            panic!(
                "testkit: cannot create the store dir {}: {e}",
                store.display()
            )
        });
        let mut server = NatsServer {
            bin,
            port: 0,
            child: Mutex::new(None),
            store,
            log: dir.path().join(LOG_FILE),
            log_offset: 0,
            dir,
        };
        for attempt in 1..=START_ATTEMPTS {
            server.port = free_port();
            match server.launch(Instant::now() + READY_TIMEOUT) {
                Ok(()) => return server,
                // Another process took the port between our probe and the server's bind.
                Err(NotReady::Exited(_))
                    if attempt < START_ATTEMPTS && server.current_log().contains(PORT_IN_USE) => {}
                Err(not_ready) => panic!("{}", server.failure("start", &not_ready)),
            }
        }
        unreachable!("the last start attempt either returns or panics")
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The process id of the running server (benchmarks read its CPU time).
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child_slot().as_ref().map(Child::id)
    }

    /// The running server's resident memory in bytes, from `/proc` (0 if it does not run or
    /// the system has no `/proc`): what benchmarks report its memory by.
    #[must_use]
    pub fn resident_bytes(&self) -> u64 {
        let Some(pid) = self.pid() else {
            return 0;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    }

    /// The client port; the same across restarts.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (`-sd`); the same across restarts.
    #[must_use]
    pub fn store_dir(&self) -> &Path {
        &self.store
    }

    /// Stops the server gracefully (SIGTERM) and waits for it to exit; kills it if it takes longer
    /// than a few seconds. Does nothing if it is not running.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child_slot().take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            send_sigterm(&child);
            // A paused server would only act on the SIGTERM once resumed.
            send_signal(&child, libc::SIGCONT);
            let deadline = Instant::now() + STOP_TIMEOUT;
            let mut backoff = Duration::from_millis(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(100));
            }
        }
        kill_and_reap(&mut child);
    }

    /// Kills the server with SIGKILL and waits for it to exit, to simulate a crash. Does nothing if
    /// it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child_slot().take() {
            kill_and_reap(&mut child);
        }
    }

    /// Starts the server again on the same port with the same store dir (JetStream recovers its
    /// streams from it) and waits until it is ready. A running server is stopped gracefully first.
    ///
    /// # Panics
    /// If the server does not become ready; the message carries its log tail.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut backoff = Duration::from_millis(10);
        loop {
            match self.launch(deadline) {
                Ok(()) => return,
                // The old listener's port may not be free again yet: try again until the deadline.
                Err(NotReady::Exited(_))
                    if Instant::now() < deadline && self.current_log().contains(PORT_IN_USE) =>
                {
                    thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
                Err(not_ready) => panic!("{}", self.failure("restart", &not_ready)),
            }
        }
    }

    /// Freezes the server (SIGSTOP) without closing its connections: clients keep sending into
    /// their sockets and get no answer, as across a stalled network, until [`Self::resume`].
    /// The server then reads and handles everything sent meanwhile, in order — so a publish
    /// whose acknowledgement its client stopped waiting for is stored after all.
    pub fn pause(&self) {
        if let Some(child) = self.child_slot().as_ref() {
            send_signal(child, libc::SIGSTOP);
        }
    }

    /// Lets a [`Self::pause`]d server run again (SIGCONT). Does nothing to a running one.
    pub fn resume(&self) {
        if let Some(child) = self.child_slot().as_ref() {
            send_signal(child, libc::SIGCONT);
        }
    }

    /// Whether the server process is alive (it may have been stopped, killed or have crashed).
    #[must_use]
    pub fn is_running(&self) -> bool {
        self.child_slot()
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Spawns one nats-server on `self.port` and waits until it is ready or `deadline` passes.
    /// On failure no child is left running.
    fn launch(&mut self, deadline: Instant) -> Result<(), NotReady> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(NotReady::Spawn)?;
        self.log_offset = log.metadata().map_err(NotReady::Spawn)?.len();
        let mut command = Command::new(&self.bin);
        // No `-m`: the HTTP monitor stays off.
        command
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(NotReady::Spawn)?)
            .stderr(log);
        let child = spawn_tied_to_this_process(command).map_err(NotReady::Spawn)?;
        *self.child_slot() = Some(child);
        self.wait_until_ready(deadline)
    }

    /// Polls (with a short backoff, up to `deadline`) until the log says the server is ready and a
    /// client connection is greeted with an INFO that has JetStream enabled.
    fn wait_until_ready(&mut self, deadline: Instant) -> Result<(), NotReady> {
        let mut backoff = Duration::from_millis(5);
        loop {
            {
                let mut slot = self.child_slot();
                let exited = match slot.as_mut().map(Child::try_wait) {
                    Some(Ok(None)) => None,
                    Some(Ok(Some(status))) => Some(Err(NotReady::Exited(status))),
                    Some(Err(e)) => Some(Err(NotReady::Spawn(e))),
                    None => Some(Err(NotReady::Timeout)),
                };
                if let Some(result) = exited {
                    *slot = None;
                    return result;
                }
            }
            if self.current_log().contains(READY_LINE) && greets_with_jetstream(self.port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(NotReady::Timeout);
            }
            thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
    }

    fn child_slot(&self) -> MutexGuard<'_, Option<Child>> {
        self.child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The log output of the current (or last) run.
    fn current_log(&self) -> String {
        let bytes = fs::read(&self.log).unwrap_or_default();
        let start = usize::try_from(self.log_offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    fn failure(&self, what: &str, not_ready: &NotReady) -> String {
        let reason = match not_ready {
            NotReady::Spawn(e) => format!("could not be spawned: {e}"),
            NotReady::Exited(status) => format!("exited before it was ready ({status})"),
            NotReady::Timeout => format!("was not ready within {READY_TIMEOUT:?}"),
        };
        let log = self.current_log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        format!(
            "testkit: nats-server {what} failed: {} (port {}, store {}) {reason}\n\
             --- last lines of {} ---\n{tail}",
            self.bin.display(),
            self.port,
            self.store.display(),
            self.log.display(),
        )
    }

    /// Kills the server and removes its directory, for the shared server at process exit, where
    /// only `&self` is available and nothing may panic.
    fn clean_up_at_exit(&self) {
        if let Ok(mut slot) = self.child.try_lock()
            && let Some(mut child) = slot.take()
        {
            kill_and_reap(&mut child);
        }
        let _ = fs::remove_dir_all(self.dir.path());
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        // The `TempDir` field removes the store and the log.
    }
}

/// One server shared by all tests in a test binary, started on first use. Tests isolate
/// themselves with unique stream, subject and bucket names (see [`unique_name`]). It is killed and
/// its directory removed when the test binary exits.
///
/// # Panics
/// If the server cannot be started (see [`NatsServer::start`]).
pub fn shared_nats() -> &'static NatsServer {
    extern "C" fn clean_up_shared() {
        if let Some(server) = SHARED_NATS.get() {
            server.clean_up_at_exit();
        }
    }
    SHARED_NATS.get_or_init(|| {
        let server = NatsServer::start();
        call_at_exit(clean_up_shared);
        server
    })
}

static SHARED_NATS: OnceLock<NatsServer> = OnceLock::new();

/// The shared nats-server if something has started it (without starting it).
#[must_use]
pub fn shared_nats_if_started() -> Option<&'static NatsServer> {
    SHARED_NATS.get()
}

/// A unique short name for test isolation: `prefix`, then 8 hex digits random per process, then a
/// counter, e.g. `t3f9a1c2b0`. Usable in stream names, subjects and KV bucket names.
///
/// # Panics
/// If `prefix` has characters other than `[A-Za-z0-9_-]`.
#[must_use]
pub fn unique_name(prefix: &str) -> String {
    static PROCESS_TAG: OnceLock<u32> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    assert!(
        prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
        "testkit: unique_name prefix {prefix:?} must only use [A-Za-z0-9_-]"
    );
    let tag = *PROCESS_TAG.get_or_init(|| {
        // RandomState is seeded from the OS once per process; the low 32 bits are enough.
        let hash = RandomState::new().hash_one(std::process::id());
        u32::try_from(hash & u64::from(u32::MAX)).unwrap_or_default()
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{tag:08x}{n}")
}

/// Path of the nats-server binary: `$NATS_SERVER_BIN`, then `nats-server` on `PATH`, then
/// `<workspace root>/.tools/bin/nats-server`.
///
/// # Panics
/// If none is found (run `scripts/install-nats-server.sh`), or `$NATS_SERVER_BIN` is not a file.
#[must_use]
pub fn nats_server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "testkit: NATS_SERVER_BIN={} is not a file",
            bin.display()
        );
        return bin;
    }
    if let Some(bin) = find_on_path("nats-server") {
        return bin;
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/bin/nats-server");
    if local.is_file() {
        return local.canonicalize().unwrap_or(local);
    }
    panic!(
        "testkit: no nats-server found: run scripts/install-nats-server.sh (installs {}), \
         or put nats-server >= {}.{} on PATH, or set NATS_SERVER_BIN",
        local.display(),
        MIN_VERSION.0,
        MIN_VERSION.1,
    )
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Panics with a clear message if `bin` is older than [`MIN_VERSION`]; checked once per process.
fn check_version(bin: &Path) {
    static CHECKED: OnceLock<PathBuf> = OnceLock::new();
    if CHECKED.get().is_some_and(|checked| checked == bin) {
        return;
    }
    let output = Command::new(bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("testkit: cannot run {} --version: {e}", bin.display()));
    // "nats-server: v2.15.1"
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text.trim().rsplit('v').next().unwrap_or_default();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    if let (Some(Some(major)), Some(Some(minor))) = (parts.next(), parts.next()) {
        assert!(
            (major, minor) >= MIN_VERSION,
            "testkit: {} is nats-server {version}, Switchboard needs {}.{} or newer: run \
             scripts/install-nats-server.sh or set NATS_SERVER_BIN",
            bin.display(),
            MIN_VERSION.0,
            MIN_VERSION.1,
        );
    }
    let _ = CHECKED.set(bin.to_path_buf());
}

/// A port that was free a moment ago (another process may take it before nats-server binds it).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("testkit: cannot find a free port on 127.0.0.1: {e}"))
}

/// Whether a client connecting to `port` is greeted with an `INFO` that has JetStream enabled.
fn greets_with_jetstream(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    if stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .is_err()
    {
        return false;
    }
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok()
        && line.starts_with("INFO {")
        && line.contains("\"jetstream\":true")
}

fn kill_and_reap(child: &mut Child) {
    // Fails only if the child was already reaped, which `wait` then reports without blocking.
    let _ = child.kill();
    let _ = child.wait();
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `command` from the one spawner thread, which lives as long as the process, with
/// `PR_SET_PDEATHSIG = SIGKILL`. The death signal fires when the spawning *thread* exits, and
/// `cargo test` runs every test on a short-lived thread of its own, hence the dedicated thread.
fn spawn_tied_to_this_process(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("testkit-spawner".to_owned())
            .spawn(move || {
                // Never ends: the sender lives in a static.
                for (mut command, reply) in incoming {
                    let _ = reply.send(spawn_with_death_signal(&mut command));
                }
            })
            .unwrap_or_else(|e| panic!("testkit: cannot start the spawner thread: {e}"));
        requests
    });
    let gone = |_| io::Error::other("testkit: the spawner thread is gone");
    let (reply, response) = mpsc::channel();
    spawner.send((command, reply)).map_err(|_| gone(()))?;
    response.recv().map_err(|_| gone(()))?
}

#[allow(unsafe_code)]
fn spawn_with_death_signal(command: &mut Command) -> io::Result<Child> {
    let parent = libc::pid_t::try_from(std::process::id()).map_err(io::Error::other)?;
    // SAFETY: the closure runs in the forked child before exec, so it must be async-signal-safe:
    // it only calls prctl(2) and getppid(2) and builds io::Errors from an errno, which does not
    // allocate. prctl's second argument is passed as the unsigned long the kernel reads.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent died before prctl took effect: the signal will never come.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    command.spawn()
}

fn send_sigterm(child: &Child) {
    send_signal(child, libc::SIGTERM);
}

#[allow(unsafe_code)]
fn send_signal(child: &Child, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions. The pid is our own child, not reaped
    // yet, so it cannot have been reused by another process.
    unsafe {
        libc::kill(pid, signal);
    }
}

#[allow(unsafe_code)]
fn call_at_exit(function: extern "C" fn()) {
    // SAFETY: atexit(3) only records the function pointer; an `extern "C" fn` cannot unwind
    // into libc (a panic in it aborts), and ours does not panic.
    unsafe {
        libc::atexit(function);
    }
}
