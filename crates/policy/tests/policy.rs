//! The policy service on both stores (a JSONL file and JetStream on a real nats-server): its
//! commands, the tool-state projection they are read back from, and the reaction to changed
//! tool definitions, with connections recorded through the domain's connection rules.
use std::{sync::Arc, time::Duration};

use domain::{
    ServerId, TokenFingerprint, ToolCategory, ToolState, UserId,
    connection::{ConnectionCommand, ConnectionId, ConnectionState},
    tool_definition_hash,
};
use eventlog::{
    AggregateKind, EventLog, ExpectedVersion, LogKind, Subject,
    jetstream::{JetStreamConfig, JetStreamLog},
    jsonl::{JsonlLog, JsonlOptions},
    projection::{CheckpointPolicy, CheckpointStore, FileCheckpointStore},
};
use policy::{DefinitionChanges, PolicyCommands};
use proto::v1::{self as pb, envelope::Event};
use service_kit::{CommandContext, EnvelopeBuilder, ReadModels, SystemClock, execute};

#[derive(Debug, Clone, Copy)]
enum Store {
    Jsonl,
    JetStream,
}

/// Every wait in these tests is bounded: a broken follower fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(10);

struct Harness {
    log: Arc<dyn EventLog>,
    checkpoints: Arc<dyn CheckpointStore>,
    envelopes: EnvelopeBuilder,
    read_models: ReadModels,
    commands: PolicyCommands,
    reaction: Option<DefinitionChanges>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(store: Store) -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, checkpoints): (Arc<dyn EventLog>, Arc<dyn CheckpointStore>) = match store {
            Store::Jsonl => (
                Arc::new(
                    JsonlLog::open(&dir.path().join("events"), JsonlOptions::default())
                        .await
                        .expect("open JSONL log"),
                ),
                Arc::new(
                    FileCheckpointStore::open(&dir.path().join("checkpoints"))
                        .expect("checkpoints"),
                ),
            ),
            Store::JetStream => {
                let client = async_nats::connect(testkit::shared_nats().url())
                    .await
                    .expect("connect to nats");
                let log = JetStreamLog::connect(
                    client,
                    JetStreamConfig {
                        prefix: testkit::unique_name("policy"),
                        ..JetStreamConfig::default()
                    },
                )
                .await
                .expect("open JetStream log");
                let checkpoints = log.checkpoint_store().await.expect("checkpoint bucket");
                (Arc::new(log), Arc::new(checkpoints))
            }
        };
        let envelopes = EnvelopeBuilder::new(Arc::new(SystemClock));
        let read_models = ReadModels::start(
            log.clone(),
            checkpoints.clone(),
            CheckpointPolicy::default(),
        )
        .await
        .expect("read models");
        let commands = PolicyCommands::new(log.clone(), envelopes.clone(), read_models.clone());
        let reaction =
            DefinitionChanges::start(log.clone(), checkpoints.clone(), envelopes.clone())
                .await
                .expect("reaction");
        Harness {
            log,
            checkpoints,
            envelopes,
            read_models,
            commands,
            reaction: Some(reaction),
            _dir: dir,
        }
    }

    fn reaction(&self) -> &DefinitionChanges {
        self.reaction.as_ref().expect("reaction running")
    }

    /// Waits until the reaction has handled everything stored so far and the read models
    /// show what it wrote.
    async fn settle(&self) {
        let end = self.log.last_sequence(LogKind::Config).await.expect("end");
        tokio::time::timeout(WAIT, self.reaction().wait_for(end))
            .await
            .expect("the reaction caught up");
        let end = self.log.last_sequence(LogKind::Config).await.expect("end");
        assert!(
            self.read_models
                .wait_for_position(LogKind::Config, end, WAIT)
                .await,
            "the read models caught up"
        );
    }

    async fn add_server(&self, name: &str) -> ServerId {
        let id = ServerId::new();
        let subject =
            Subject::for_aggregate(AggregateKind::Server, &[&id.to_string()]).expect("subject");
        let slug = domain::ServerName::parse(name).expect("name").slug();
        let added = Event::ServerAdded(pb::ServerAdded {
            server_id: id.to_string(),
            name: name.into(),
            slug: slug.as_str().into(),
            url: "https://mcp.example.com/mcp".into(),
            enabled: true,
            ..Default::default()
        });
        let context = CommandContext::user(user("admin@example.com"), "seed");
        self.log
            .append(
                &subject,
                ExpectedVersion::Any,
                &self.envelopes.wrap(&context, vec![added]),
            )
            .await
            .expect("append");
        self.settle().await;
        id
    }

    async fn connection(&self, user: &UserId, server: ServerId, command: ConnectionCommand) {
        let id = ConnectionId {
            server_id: server,
            user_id: user.clone(),
        };
        let subject = Subject::for_aggregate(
            AggregateKind::Connection,
            &[&server.to_string(), user.key().as_str()],
        )
        .expect("subject");
        let now = std::time::SystemTime::now();
        execute::<ConnectionState, _>(
            self.log.as_ref(),
            &self.envelopes,
            &subject,
            &CommandContext::reaction("connection", &pb::Envelope::default()),
            |state| domain::connection::decide(state, &id, command.clone(), now),
        )
        .await
        .expect("connection command");
        if self.reaction.is_some() {
            self.settle().await;
        }
    }

    /// The user connects to the server, which offers `tools`.
    async fn connect(&self, user: &UserId, server: ServerId, tools: &[pb::ToolDefinition]) {
        self.connection(
            user,
            server,
            ConnectionCommand::StartConnection {
                flow: "flow".to_owned(),
                requested_scopes: vec![],
                authorization_expires_at: std::time::SystemTime::now() + Duration::from_secs(600),
            },
        )
        .await;
        self.connection(
            user,
            server,
            ConnectionCommand::CompleteAuthorization {
                flow: "flow".to_owned(),
                granted_scopes: vec![],
                access_token_expires_at: None,
                token_fingerprint: TokenFingerprint::of(&format!("token of {user}")),
                has_refresh_token: false,
            },
        )
        .await;
        self.discover(user, server, tools).await;
    }

    async fn discover(&self, user: &UserId, server: ServerId, tools: &[pb::ToolDefinition]) {
        self.connection(
            user,
            server,
            ConnectionCommand::RecordDiscoveredTools {
                tools: tools.to_vec(),
            },
        )
        .await;
    }

    fn state(&self, user: &UserId, server: ServerId, tool: &str) -> Option<(ToolState, bool)> {
        self.read_models.tool_states.read(|states| {
            states
                .tool(user, server, tool)
                .map(|view| (view.state, view.changed))
        })
    }

    async fn set(
        &self,
        user: &UserId,
        server: ServerId,
        tool: &str,
        state: ToolState,
        hash: Option<&str>,
    ) -> Result<(), policy::PolicyError> {
        let written = self
            .commands
            .set_tool_state(
                &CommandContext::user(user.clone(), "request"),
                user,
                server,
                tool,
                state,
                hash.map(str::to_owned),
            )
            .await?;
        assert!(self.read_models.wait_for(&written, WAIT).await);
        Ok(())
    }

    /// Appends a policy event as some writer would (another version, a racing console).
    async fn record_policy_event(&self, user: &UserId, server: ServerId, event: Event) {
        let subject = Subject::for_aggregate(
            AggregateKind::Policy,
            &[user.key().as_str(), &server.to_string()],
        )
        .expect("subject");
        let context = CommandContext::user(user.clone(), "seed");
        self.log
            .append(
                &subject,
                ExpectedVersion::Any,
                &self.envelopes.wrap(&context, vec![event]),
            )
            .await
            .expect("append");
    }

    async fn config_end(&self) -> u64 {
        self.log.last_sequence(LogKind::Config).await.expect("end")
    }

    async fn events_of(&self, user: &UserId, server: ServerId) -> Vec<Event> {
        let subject = Subject::for_aggregate(
            AggregateKind::Policy,
            &[user.key().as_str(), &server.to_string()],
        )
        .expect("subject");
        self.log
            .read_aggregate(&subject)
            .await
            .expect("read")
            .events
            .into_iter()
            .filter_map(|event| event.envelope.event)
            .collect()
    }
}

fn user(id: &str) -> UserId {
    UserId::parse(id).expect("user id")
}

fn tool(name: &str, description: &str, read_only: Option<bool>) -> pb::ToolDefinition {
    let mut definition = pb::ToolDefinition {
        name: name.into(),
        title: format!("{name} title"),
        description: description.into(),
        input_schema_json: r#"{"type":"object"}"#.into(),
        annotations: read_only.map(|hint| pb::ToolAnnotations {
            read_only_hint: Some(hint),
            ..Default::default()
        }),
        ..Default::default()
    };
    definition.definition_hash = tool_definition_hash(&definition);
    definition
}

fn tools() -> Vec<pb::ToolDefinition> {
    vec![
        tool("search", "Searches issues", Some(true)),
        tool("get_issue", "Reads one issue", Some(true)),
        tool("create_issue", "Creates an issue", Some(false)),
        tool("delete_repo", "Deletes a repository", None),
    ]
}

async fn tools_start_blocked_and_change_per_tool_and_per_category(store: Store) {
    let h = Harness::start(store).await;
    let server = h.add_server("GitHub").await;
    let alice = user("alice@example.com");
    h.connect(&alice, server, &tools()).await;
    for definition in tools() {
        assert_eq!(
            h.state(&alice, server, &definition.name),
            Some((ToolState::Blocked, false)),
            "{} starts blocked",
            definition.name
        );
    }

    h.set(&alice, server, "search", ToolState::AlwaysAllow, None)
        .await
        .expect("set");
    assert_eq!(
        h.state(&alice, server, "search"),
        Some((ToolState::AlwaysAllow, false))
    );
    assert_eq!(
        h.state(&alice, server, "get_issue"),
        Some((ToolState::Blocked, false))
    );

    let written = h
        .commands
        .set_category_state(
            &CommandContext::user(alice.clone(), "request"),
            &alice,
            server,
            ToolCategory::Write,
            ToolState::NeedsApproval,
        )
        .await
        .expect("category");
    assert!(h.read_models.wait_for(&written, WAIT).await);
    for (name, state) in [
        ("search", ToolState::AlwaysAllow),
        ("get_issue", ToolState::Blocked),
        ("create_issue", ToolState::NeedsApproval),
        ("delete_repo", ToolState::NeedsApproval),
    ] {
        assert_eq!(
            h.state(&alice, server, name),
            Some((state, false)),
            "{name}"
        );
    }
    let types: Vec<&str> = h
        .events_of(&alice, server)
        .await
        .iter()
        .map(Event::type_name)
        .collect();
    assert_eq!(
        types,
        [
            "ToolPermissionSet",
            "CategoryPermissionSet",
            "ToolPermissionSet",
            "ToolPermissionSet"
        ]
    );

    // A tool that appears later starts blocked, whatever its category's last setting.
    let mut more = tools();
    more.push(tool("close_issue", "Closes an issue", Some(false)));
    h.discover(&alice, server, &more).await;
    assert_eq!(
        h.state(&alice, server, "close_issue"),
        Some((ToolState::Blocked, false))
    );

    // Unknown tools, and servers the user is not connected to, are refused.
    let error = h
        .set(&alice, server, "nope", ToolState::Blocked, None)
        .await
        .expect_err("unknown tool");
    assert_eq!(error.code(), "tool_not_found");
    let other = h.add_server("Jira").await;
    let error = h
        .set(&alice, other, "search", ToolState::Blocked, None)
        .await
        .expect_err("not connected");
    assert_eq!(error.code(), "not_connected");
    let error = h
        .set(&alice, ServerId::new(), "search", ToolState::Blocked, None)
        .await
        .expect_err("no such server");
    assert_eq!(error.code(), "server_not_found");
}

#[tokio::test]
async fn tools_start_blocked_and_change_per_tool_and_per_category_on_jsonl() {
    tools_start_blocked_and_change_per_tool_and_per_category(Store::Jsonl).await;
}

#[tokio::test]
async fn tools_start_blocked_and_change_per_tool_and_per_category_on_jetstream() {
    tools_start_blocked_and_change_per_tool_and_per_category(Store::JetStream).await;
}

async fn a_changed_definition_downgrades_always_allow_until_set_again(store: Store) {
    let h = Harness::start(store).await;
    let server = h.add_server("GitHub").await;
    let alice = user("alice@example.com");
    h.connect(&alice, server, &tools()).await;
    let old_hash = tools()[0].definition_hash.clone();
    h.set(
        &alice,
        server,
        "search",
        ToolState::AlwaysAllow,
        Some(&old_hash),
    )
    .await
    .expect("set");

    let mut redefined = tools();
    redefined[0] = tool("search", "Searches issues and deletes them", Some(true));
    let new_hash = redefined[0].definition_hash.clone();
    h.discover(&alice, server, &redefined).await;
    assert_eq!(
        h.state(&alice, server, "search"),
        Some((ToolState::NeedsApproval, true))
    );
    let events = h.events_of(&alice, server).await;
    let Some(Event::ToolDefinitionChanged(changed)) = events.last() else {
        panic!("the change is recorded: {events:?}");
    };
    assert_eq!(
        (
            changed.previous_definition_hash.as_str(),
            changed.definition_hash.as_str(),
            changed.previous_state,
            changed.state
        ),
        (
            old_hash.as_str(),
            new_hash.as_str(),
            pb::ToolState::AlwaysAllow as i32,
            pb::ToolState::NeedsApproval as i32
        )
    );

    // A console that still shows the old definition cannot allow it.
    let error = h
        .set(
            &alice,
            server,
            "search",
            ToolState::AlwaysAllow,
            Some(&old_hash),
        )
        .await
        .expect_err("stale");
    assert_eq!(error.code(), "tool_definition_changed");
    assert_eq!(
        h.state(&alice, server, "search"),
        Some((ToolState::NeedsApproval, true))
    );
    // Setting it again, even to the state it has, confirms the new definition.
    h.set(
        &alice,
        server,
        "search",
        ToolState::NeedsApproval,
        Some(&new_hash),
    )
    .await
    .expect("confirm");
    assert_eq!(
        h.state(&alice, server, "search"),
        Some((ToolState::NeedsApproval, false))
    );
}

#[tokio::test]
async fn a_changed_definition_downgrades_always_allow_until_set_again_on_jsonl() {
    a_changed_definition_downgrades_always_allow_until_set_again(Store::Jsonl).await;
}

#[tokio::test]
async fn a_changed_definition_downgrades_always_allow_until_set_again_on_jetstream() {
    a_changed_definition_downgrades_always_allow_until_set_again(Store::JetStream).await;
}

async fn a_removed_tool_keeps_no_setting_and_comes_back_blocked(store: Store) {
    let h = Harness::start(store).await;
    let server = h.add_server("GitHub").await;
    let alice = user("alice@example.com");
    h.connect(&alice, server, &tools()).await;
    h.set(&alice, server, "create_issue", ToolState::AlwaysAllow, None)
        .await
        .expect("set");
    let without: Vec<_> = tools()
        .into_iter()
        .filter(|t| t.name != "create_issue")
        .collect();
    h.discover(&alice, server, &without).await;
    assert_eq!(h.state(&alice, server, "create_issue"), None);
    let events = h.events_of(&alice, server).await;
    assert!(
        matches!(events.last(), Some(Event::ToolPermissionsCleared(c)) if c.tool_names == ["create_issue"]),
        "{events:?}"
    );
    h.discover(&alice, server, &tools()).await;
    assert_eq!(
        h.state(&alice, server, "create_issue"),
        Some((ToolState::Blocked, false))
    );
}

#[tokio::test]
async fn a_removed_tool_keeps_no_setting_and_comes_back_blocked_on_jsonl() {
    a_removed_tool_keeps_no_setting_and_comes_back_blocked(Store::Jsonl).await;
}

#[tokio::test]
async fn a_removed_tool_keeps_no_setting_and_comes_back_blocked_on_jetstream() {
    a_removed_tool_keeps_no_setting_and_comes_back_blocked(Store::JetStream).await;
}

async fn users_never_change_each_others_settings(store: Store) {
    let h = Harness::start(store).await;
    let server = h.add_server("GitHub").await;
    let (alice, bob) = (user("alice@example.com"), user("bob@example.com"));
    h.connect(&alice, server, &tools()).await;
    h.connect(&bob, server, &tools()).await;
    h.set(&alice, server, "search", ToolState::AlwaysAllow, None)
        .await
        .expect("set");
    assert_eq!(
        h.state(&bob, server, "search"),
        Some((ToolState::Blocked, false))
    );
    assert!(h.events_of(&bob, server).await.is_empty());
    // Bob's discovery of a changed definition touches only Bob's settings.
    let mut redefined = tools();
    redefined[0] = tool("search", "Searches everything", Some(true));
    h.discover(&bob, server, &redefined).await;
    assert_eq!(
        h.state(&alice, server, "search"),
        Some((ToolState::AlwaysAllow, false))
    );
    assert!(h.events_of(&bob, server).await.is_empty());
}

#[tokio::test]
async fn users_never_change_each_others_settings_on_jsonl() {
    users_never_change_each_others_settings(Store::Jsonl).await;
}

#[tokio::test]
async fn users_never_change_each_others_settings_on_jetstream() {
    users_never_change_each_others_settings(Store::JetStream).await;
}

fn count_changes(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::ToolDefinitionChanged(_)))
        .count()
}

async fn the_reaction_resumes_from_its_checkpoint_and_acts_once(store: Store) {
    let mut h = Harness::start(store).await;
    let server = h.add_server("GitHub").await;
    let alice = user("alice@example.com");
    h.connect(&alice, server, &tools()).await;
    h.set(&alice, server, "search", ToolState::AlwaysAllow, None)
        .await
        .expect("set");
    let mut redefined = tools();
    redefined[0] = tool("search", "Redefined once", Some(true));
    h.discover(&alice, server, &redefined).await;
    assert_eq!(count_changes(&h.events_of(&alice, server).await), 1);

    // Stopped, it saves where it got to; started again, it resumes there.
    let handled = h.reaction().position();
    h.reaction.take().expect("running").shutdown().await;
    let saved = h
        .checkpoints
        .load(policy::REACTION_NAME)
        .await
        .expect("load")
        .expect("a checkpoint");
    assert_eq!(saved.position, handled);
    let resumed =
        DefinitionChanges::start(h.log.clone(), h.checkpoints.clone(), h.envelopes.clone())
            .await
            .expect("restart");
    assert_eq!(resumed.position(), handled, "resumes from the checkpoint");
    h.reaction = Some(resumed);

    // Seeing every event again (a lost checkpoint) records nothing twice: each list is
    // compared with the settings as they are, and a setting made after a list stands.
    h.reaction.take().expect("running").shutdown().await;
    h.checkpoints
        .save(
            policy::REACTION_NAME,
            &eventlog::projection::Checkpoint {
                position: 0,
                snapshot: Default::default(),
            },
        )
        .await
        .expect("rewind");
    let replaying =
        DefinitionChanges::start(h.log.clone(), h.checkpoints.clone(), h.envelopes.clone())
            .await
            .expect("restart from zero");
    assert_eq!(replaying.position(), 0);
    h.reaction = Some(replaying);
    h.settle().await;
    assert_eq!(count_changes(&h.events_of(&alice, server).await), 1);
    assert_eq!(
        h.state(&alice, server, "search"),
        Some((ToolState::NeedsApproval, true))
    );
    // Two reactions at once (two processes) still act once.
    let second =
        DefinitionChanges::start(h.log.clone(), h.checkpoints.clone(), h.envelopes.clone())
            .await
            .expect("second reaction");
    redefined[0] = tool("search", "Redefined twice", Some(true));
    h.discover(&alice, server, &redefined).await;
    let end = h.log.last_sequence(LogKind::Config).await.expect("end");
    tokio::time::timeout(WAIT, second.wait_for(end))
        .await
        .expect("second caught up");
    h.settle().await;
    assert_eq!(count_changes(&h.events_of(&alice, server).await), 2);
}

/// The reaction stopped (a restart, a failing store) while a tool went and came back and
/// another one's definition changed and changed back: the projection does not wait for it,
/// and once it runs it records each change; a setting the user made meanwhile stands.
async fn a_late_reaction_observes_every_discovery(store: Store) {
    let mut h = Harness::start(store).await;
    let server = h.add_server("GitHub").await;
    let alice = user("alice@example.com");
    h.connect(&alice, server, &tools()).await;
    for name in ["search", "get_issue", "create_issue"] {
        h.set(&alice, server, name, ToolState::AlwaysAllow, None)
            .await
            .expect("set");
    }
    h.settle().await;
    h.reaction.take().expect("running").shutdown().await;

    let mut changed = tools();
    changed[1] = tool("get_issue", "Reads one issue, changed", Some(true));
    let without: Vec<pb::ToolDefinition> = changed
        .iter()
        .filter(|t| t.name != "search" && t.name != "create_issue")
        .cloned()
        .collect();
    h.discover(&alice, server, &without).await;
    h.discover(&alice, server, &tools()).await;
    let end = h.log.last_sequence(LogKind::Config).await.expect("end");
    assert!(
        h.read_models
            .wait_for_position(LogKind::Config, end, WAIT)
            .await
    );
    assert_eq!(
        h.state(&alice, server, "search"),
        Some((ToolState::Blocked, false)),
        "gone and back: Blocked, with the reaction stopped"
    );
    assert_eq!(
        h.state(&alice, server, "get_issue"),
        Some((ToolState::NeedsApproval, true)),
        "changed and back: needs approval"
    );
    // Meanwhile Alice allows `create_issue` again; the policy aggregate still holds her old
    // setting of it, but she saw Blocked, so it is recorded.
    h.set(&alice, server, "create_issue", ToolState::AlwaysAllow, None)
        .await
        .expect("set");
    assert_eq!(
        h.state(&alice, server, "create_issue"),
        Some((ToolState::AlwaysAllow, false))
    );

    h.reaction = Some(
        DefinitionChanges::start(h.log.clone(), h.checkpoints.clone(), h.envelopes.clone())
            .await
            .expect("restart"),
    );
    h.settle().await;
    let events = h.events_of(&alice, server).await;
    let cleared: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::ToolPermissionsCleared(c) => Some(c.tool_names.iter().map(String::as_str)),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(cleared, ["search"], "create_issue was set after: it stands");
    assert_eq!(
        count_changes(&events),
        2,
        "get_issue changed, and changed back"
    );
    // Each observation says which discovery it was, so an observer behind another (a second
    // process) does not take a setting back to an older list.
    let observed: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::ToolDefinitionChanged(c) => Some(c.observed_position),
            _ => None,
        })
        .collect();
    assert!(
        observed.len() == 2 && observed[0] > 0 && observed[0] < observed[1],
        "{observed:?}"
    );
    // An observer behind (a lost checkpoint, another process) sees both discoveries again:
    // it takes nothing back to the older list.
    h.reaction.take().expect("running").shutdown().await;
    h.checkpoints
        .save(
            policy::REACTION_NAME,
            &eventlog::projection::Checkpoint {
                position: 0,
                snapshot: Default::default(),
            },
        )
        .await
        .expect("rewind");
    h.reaction = Some(
        DefinitionChanges::start(h.log.clone(), h.checkpoints.clone(), h.envelopes.clone())
            .await
            .expect("restart from zero"),
    );
    h.settle().await;
    assert_eq!(
        h.events_of(&alice, server).await,
        events,
        "nothing recorded again"
    );
    assert_eq!(
        h.state(&alice, server, "search"),
        Some((ToolState::Blocked, false))
    );
    assert_eq!(
        h.state(&alice, server, "get_issue"),
        Some((ToolState::NeedsApproval, true))
    );
    assert_eq!(
        h.state(&alice, server, "create_issue"),
        Some((ToolState::AlwaysAllow, false))
    );
    // Allowing `search` again is recorded and shown.
    h.set(&alice, server, "search", ToolState::AlwaysAllow, None)
        .await
        .expect("set");
    assert_eq!(
        h.state(&alice, server, "search"),
        Some((ToolState::AlwaysAllow, false))
    );
}

/// A console decided on a view taken before a discovery that changed the tool, and its
/// setting was appended after that discovery: the setting is for the definition the user saw,
/// so the discovery's change is still recorded.
async fn a_setting_decided_before_a_discovery_does_not_stand_for_it(store: Store) {
    let h = Harness::start(store).await;
    let server = h.add_server("GitHub").await;
    let alice = user("alice@example.com");
    h.connect(&alice, server, &tools()).await;
    let seen = h.config_end().await;
    let mut redefined = tools();
    redefined[0] = tool("search", "Redefined", Some(true));
    h.discover(&alice, server, &redefined).await;
    assert_eq!(count_changes(&h.events_of(&alice, server).await), 0);
    h.record_policy_event(
        &alice,
        server,
        Event::ToolPermissionSet(pb::ToolPermissionSet {
            user_id: alice.as_str().into(),
            server_id: server.to_string(),
            tool_name: "search".into(),
            state: pb::ToolState::AlwaysAllow as i32,
            definition_hash: tools()[0].definition_hash.clone(),
            previous_state: pb::ToolState::Blocked as i32,
            decided_at_position: seen,
            ..Default::default()
        }),
    )
    .await;
    // The reaction observed the discovery before the setting was stored; it observes it again.
    h.settle().await;
    let events = h.events_of(&alice, server).await;
    assert!(
        events.iter().any(|e| matches!(e,
            Event::ToolDefinitionChanged(c)
                if c.tool_name == "search"
                    && c.definition_hash == redefined[0].definition_hash
                    && c.state == pb::ToolState::NeedsApproval as i32)),
        "{events:?}"
    );
    assert_eq!(
        h.state(&alice, server, "search"),
        Some((ToolState::NeedsApproval, true))
    );
    // A setting decided on a view that included the discovery stands.
    h.set(&alice, server, "search", ToolState::AlwaysAllow, None)
        .await
        .expect("set");
    h.settle().await;
    assert_eq!(
        h.state(&alice, server, "search"),
        Some((ToolState::AlwaysAllow, false))
    );
    assert_eq!(count_changes(&h.events_of(&alice, server).await), 1);
}

#[tokio::test]
async fn a_setting_decided_before_a_discovery_does_not_stand_for_it_on_jsonl() {
    a_setting_decided_before_a_discovery_does_not_stand_for_it(Store::Jsonl).await;
}

#[tokio::test]
async fn a_setting_decided_before_a_discovery_does_not_stand_for_it_on_jetstream() {
    a_setting_decided_before_a_discovery_does_not_stand_for_it(Store::JetStream).await;
}

/// A log written by a version whose observations did not record their discovery's position
/// (0), read again from the start by this one (a lost checkpoint): nothing is recorded twice.
async fn observations_of_an_older_version_are_not_made_again(store: Store) {
    let mut h = Harness::start(store).await;
    let server = h.add_server("GitHub").await;
    let alice = user("alice@example.com");
    h.reaction.take().expect("running").shutdown().await;
    h.connect(&alice, server, &tools()).await;
    let original = tools()[0].definition_hash.clone();
    h.record_policy_event(
        &alice,
        server,
        Event::ToolPermissionSet(pb::ToolPermissionSet {
            user_id: alice.as_str().into(),
            server_id: server.to_string(),
            tool_name: "search".into(),
            state: pb::ToolState::AlwaysAllow as i32,
            definition_hash: original.clone(),
            previous_state: pb::ToolState::Blocked as i32,
            ..Default::default()
        }),
    )
    .await;
    let mut redefined = tools();
    redefined[0] = tool("search", "Redefined", Some(true));
    let changed = redefined[0].definition_hash.clone();
    // The older version observed each discovery with the latest list, recording no position.
    for (list, previous, hash, previous_state) in [
        (&redefined, &original, &changed, pb::ToolState::AlwaysAllow),
        (&tools(), &changed, &original, pb::ToolState::NeedsApproval),
    ] {
        h.discover(&alice, server, list).await;
        h.record_policy_event(
            &alice,
            server,
            Event::ToolDefinitionChanged(pb::ToolDefinitionChanged {
                user_id: alice.as_str().into(),
                server_id: server.to_string(),
                tool_name: "search".into(),
                previous_definition_hash: previous.clone(),
                definition_hash: hash.clone(),
                previous_state: previous_state as i32,
                state: pb::ToolState::NeedsApproval as i32,
                observed_position: 0,
            }),
        )
        .await;
    }
    let before = h.events_of(&alice, server).await;
    assert_eq!(count_changes(&before), 2);
    // This version's reaction reads all of it (its checkpoint is from before the connection).
    h.reaction = Some(
        DefinitionChanges::start(h.log.clone(), h.checkpoints.clone(), h.envelopes.clone())
            .await
            .expect("restart"),
    );
    h.settle().await;
    assert_eq!(
        h.events_of(&alice, server).await,
        before,
        "nothing recorded again"
    );
    assert_eq!(
        h.state(&alice, server, "search"),
        Some((ToolState::NeedsApproval, true))
    );
}

#[tokio::test]
async fn observations_of_an_older_version_are_not_made_again_on_jsonl() {
    observations_of_an_older_version_are_not_made_again(Store::Jsonl).await;
}

#[tokio::test]
async fn observations_of_an_older_version_are_not_made_again_on_jetstream() {
    observations_of_an_older_version_are_not_made_again(Store::JetStream).await;
}

#[tokio::test]
async fn a_late_reaction_observes_every_discovery_on_jsonl() {
    a_late_reaction_observes_every_discovery(Store::Jsonl).await;
}

#[tokio::test]
async fn a_late_reaction_observes_every_discovery_on_jetstream() {
    a_late_reaction_observes_every_discovery(Store::JetStream).await;
}

#[tokio::test]
async fn the_reaction_resumes_from_its_checkpoint_and_acts_once_on_jsonl() {
    the_reaction_resumes_from_its_checkpoint_and_acts_once(Store::Jsonl).await;
}

#[tokio::test]
async fn the_reaction_resumes_from_its_checkpoint_and_acts_once_on_jetstream() {
    the_reaction_resumes_from_its_checkpoint_and_acts_once(Store::JetStream).await;
}
