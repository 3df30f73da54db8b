//! The tool-state projection: per user and server, each tool the server offers the user now
//! with its effective state, category, definition and `changed` flag; whether the user is
//! connected; and the exposed-name map (`<slug>__<tool>`). The policy routes read it, and the
//! invocation path asks it for every call, so a look-up allocates nothing and costs a few hash
//! probes.
//!
//! Memory layout (a million settings must fit well inside 256 MiB): user ids, tool names and
//! definition hashes are interned once and referred to by `u32`; a tool definition (title,
//! description, category) is stored once per server, tool and definition hash, however many
//! users see it; per user and server there is one sorted vector of 16-byte [`Slot`]s, one per
//! tool offered or set. A look-up is: user id → the user's servers (one hash probe into a
//! map whose entries hold them inline), server id → index (a small map), a scan of the user's
//! few servers, tool name → index, binary search: about five cache lines in all.
//!
//! What it folds: server events (slugs), connection events of each user (connected from
//! `ConnectionEstablished` until `ConnectionDisconnected`; the tool list of the latest
//! `ToolsDiscovered`) and policy events (settings). The effective state never trusts a
//! setting made for another definition than the current one: each discovery is applied to the
//! settings as the policy service's reaction to it records them, ahead of that reaction — an
//! *Always allow* setting whose definition changed reads as *Needs approval*, flagged
//! `changed`, and a tool the discovery lacks loses its setting (it comes back Blocked), even
//! before the policy service has recorded `ToolDefinitionChanged` or
//! `ToolPermissionsCleared` for it.
use std::collections::HashMap;

use proto::v1::{Envelope, envelope::Event};
use serde::{Deserialize, Serialize};

use crate::{ExposedToolName, ServerId, Slug, ToolCategory, ToolName, ToolState, UserId};

/// "None" in a `u32` reference.
const NONE: u32 = u32::MAX;

/// Strings by index and indices by string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Interner {
    strings: Vec<Box<str>>,
    index: HashMap<Box<str>, u32>,
}

impl Interner {
    fn from_strings(strings: Vec<Box<str>>) -> Self {
        let index = strings
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as u32))
            .collect();
        Interner { strings, index }
    }

    fn get(&self, text: &str) -> Option<u32> {
        self.index.get(text).copied()
    }

    fn intern(&mut self, text: &str) -> u32 {
        if let Some(i) = self.index.get(text) {
            return *i;
        }
        let i = self.strings.len() as u32;
        self.strings.push(text.into());
        self.index.insert(text.into(), i);
        i
    }

    fn text(&self, i: u32) -> &str {
        self.strings.get(i as usize).map_or("", |s| s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ServerEntry {
    id: ServerId,
    /// Unknown until the server's `ServerAdded` is folded (or after a malformed one).
    slug: Option<Slug>,
    deleted: bool,
    /// Every tool name ever discovered on the server (for renaming its exposed names).
    tools: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Definition {
    server: u32,
    name: u32,
    hash: u32,
    read_only: bool,
    title: Box<str>,
    description: Box<str>,
    /// JSON text of the input and output schemas and of the annotations as MCP spells them
    /// (`readOnlyHint`, …), for the orchestrator's tool list. Stored once per definition.
    #[serde(default)]
    input_schema: Box<str>,
    #[serde(default)]
    output_schema: Box<str>,
    #[serde(default)]
    annotations: Box<str>,
}

/// One tool of one user's server: offered now (`definition`), set (`setting_hash`), or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    name: u32,
    /// The definition the server offers the user now; `NONE`: not offered now.
    definition: u32,
    /// The definition the user's setting was made for; `NONE`: no setting (Blocked).
    setting_hash: u32,
    /// The setting's state (`ToolState` as `state_code`).
    state: u8,
    changed: bool,
}

impl Slot {
    fn new(name: u32) -> Self {
        Slot {
            name,
            definition: NONE,
            setting_hash: NONE,
            state: state_code(ToolState::Blocked),
            changed: false,
        }
    }

    fn is_empty(&self) -> bool {
        self.definition == NONE && self.setting_hash == NONE
    }
}

// A slot is a JSON array in checkpoints: a million of them as objects would triple the size.
impl Serialize for Slot {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let flags = self.state | (u8::from(self.changed) << 4);
        (self.name, self.definition, self.setting_hash, flags).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Slot {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (name, definition, setting_hash, flags) =
            <(u32, u32, u32, u8)>::deserialize(deserializer)?;
        Ok(Slot {
            name,
            definition,
            setting_hash,
            state: flags & 0x0f,
            changed: flags & 0x10 != 0,
        })
    }
}

fn state_code(state: ToolState) -> u8 {
    match state {
        ToolState::Blocked => 0,
        ToolState::NeedsApproval => 1,
        ToolState::AlwaysAllow => 2,
    }
}

fn state_of_code(code: u8) -> ToolState {
    match code {
        1 => ToolState::NeedsApproval,
        2 => ToolState::AlwaysAllow,
        _ => ToolState::Blocked,
    }
}

/// A tool's annotations as MCP spells them, as JSON text (empty without annotations).
fn annotations_json(annotations: Option<&proto::v1::ToolAnnotations>) -> String {
    let Some(a) = annotations else {
        return String::new();
    };
    let mut map = serde_json::Map::new();
    let mut hint = |name: &str, value: Option<bool>| {
        if let Some(value) = value {
            map.insert(name.to_owned(), serde_json::Value::Bool(value));
        }
    };
    hint("readOnlyHint", a.read_only_hint);
    hint("destructiveHint", a.destructive_hint);
    hint("idempotentHint", a.idempotent_hint);
    hint("openWorldHint", a.open_world_hint);
    if !a.title.is_empty() {
        map.insert(
            "title".to_owned(),
            serde_json::Value::String(a.title.clone()),
        );
    }
    serde_json::Value::Object(map).to_string()
}

/// One user's tools of one server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct UserServer {
    connected: bool,
    /// Sorted by `name`.
    slots: Vec<Slot>,
    /// The log position of the last discovery folded (0: none, or folded without positions).
    /// The policy service's observation of an older one is already folded in.
    #[serde(default)]
    discovered_at: u64,
}

impl UserServer {
    fn slot(&self, name: u32) -> Option<&Slot> {
        self.slots
            .binary_search_by_key(&name, |slot| slot.name)
            .ok()
            .and_then(|i| self.slots.get(i))
    }

    fn slot_mut(&mut self, name: u32) -> &mut Slot {
        let i = match self.slots.binary_search_by_key(&name, |slot| slot.name) {
            Ok(i) => i,
            Err(i) => {
                self.slots.insert(i, Slot::new(name));
                i
            }
        };
        &mut self.slots[i]
    }
}

/// One user's servers: (server index, that server's tools for the user).
type UserServers = Vec<(u32, UserServer)>;

/// One tool as a user sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolView<'a> {
    pub server_id: ServerId,
    /// The tool's name on its server.
    pub name: &'a str,
    /// `<slug>__<tool>`, unique; `None` while the server's slug is unknown.
    pub exposed_name: Option<&'a str>,
    pub title: &'a str,
    pub description: &'a str,
    /// The input schema as JSON text (as discovered).
    pub input_schema_json: &'a str,
    /// The output schema as JSON text; empty when the tool has none.
    pub output_schema_json: &'a str,
    /// The annotations as JSON text in MCP's spelling; empty when the tool has none. Hints
    /// for the AI, never a reason to allow a tool.
    pub annotations_json: &'a str,
    pub category: ToolCategory,
    /// The effective state (see the module docs).
    pub state: ToolState,
    /// The current definition's hash.
    pub definition_hash: &'a str,
    /// The definition changed since the user set the tool, and the user has not set it since.
    pub changed: bool,
}

/// The projection. Serialisable as a checkpoint; see the module docs.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ToolStates {
    /// Each user's servers (by server index), inline in the map's entry: a look-up's first
    /// probe lands on them.
    users: HashMap<Box<str>, UserServers>,
    tool_names: Interner,
    hashes: Interner,
    servers: Vec<ServerEntry>,
    server_index: HashMap<ServerId, u32>,
    definitions: Vec<Definition>,
    definition_index: HashMap<(u32, u32, u32), u32>,
    exposed: HashMap<Box<str>, (u32, u32)>,
    exposed_of: HashMap<(u32, u32), Box<str>>,
}

impl std::fmt::Debug for ToolStates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolStates")
            .field("users", &self.users.len())
            .field("servers", &self.servers.len())
            .field("definitions", &self.definitions.len())
            .field("slots", &self.slot_count())
            .finish_non_exhaustive()
    }
}

impl ToolStates {
    /// Folds in the event at `sequence` in the configuration log; events it does not use are
    /// ignored.
    pub fn apply(&mut self, envelope: &Envelope, sequence: u64) {
        if let Some(event) = &envelope.event {
            self.apply_event(event, sequence);
        }
    }

    /// [`ToolStates::apply`] for a bare event.
    pub fn apply_event(&mut self, event: &Event, sequence: u64) {
        match event {
            Event::ServerAdded(added) => {
                let slug = Slug::parse(&added.slug)
                    .or_else(|| crate::ServerName::parse(&added.name).ok().map(|n| n.slug()));
                if let Some(server) = self.server_mut_or_new(&added.server_id) {
                    self.servers[server as usize].deleted = false;
                    self.set_slug(server, slug);
                }
            }
            Event::ServerUpdated(updated) => {
                let Some(slug) = updated.slug.as_deref() else {
                    return;
                };
                if let Some(server) = self.server(&updated.server_id) {
                    self.set_slug(server, Slug::parse(slug));
                }
            }
            Event::ServerDeleted(deleted) => {
                if let Some(server) = self.server(&deleted.server_id) {
                    self.delete_server(server);
                }
            }
            Event::ConnectionEstablished(e) => {
                if let Some(pair) = self.pair_or_new(&e.user_id, &e.server_id) {
                    pair.connected = true;
                }
            }
            Event::ConnectionDisconnected(e) => {
                if let Some(pair) = self.pair_or_new(&e.user_id, &e.server_id) {
                    pair.connected = false;
                    for slot in &mut pair.slots {
                        slot.definition = NONE;
                    }
                    pair.slots.retain(|slot| !slot.is_empty());
                }
            }
            Event::ToolsDiscovered(e) => self.discovered(e, sequence),
            Event::ToolPermissionSet(e) => self.set(
                &e.user_id,
                &e.server_id,
                &e.tool_name,
                &e.definition_hash,
                e.state,
                false,
            ),
            Event::ToolDefinitionChanged(e) => {
                if self.observes_an_older_discovery(&e.user_id, &e.server_id, e.observed_position) {
                    return;
                }
                self.set(
                    &e.user_id,
                    &e.server_id,
                    &e.tool_name,
                    &e.definition_hash,
                    e.state,
                    true,
                );
            }
            Event::ToolPermissionsCleared(e) => {
                if self.observes_an_older_discovery(&e.user_id, &e.server_id, e.observed_position) {
                    return;
                }
                let names: Vec<u32> = e
                    .tool_names
                    .iter()
                    .filter_map(|name| self.tool_names.get(name))
                    .collect();
                let Some(pair) = self.pair_or_new(&e.user_id, &e.server_id) else {
                    return;
                };
                for name in names {
                    if let Ok(i) = pair.slots.binary_search_by_key(&name, |slot| slot.name) {
                        let slot = &mut pair.slots[i];
                        slot.setting_hash = NONE;
                        slot.state = state_code(ToolState::Blocked);
                        slot.changed = false;
                    }
                }
                pair.slots.retain(|slot| !slot.is_empty());
            }
            _ => {}
        }
    }

    /// Whether an observation of the discovery at `observed_position` comes after a later
    /// discovery of the same user and server was folded. Each discovery is folded into the
    /// settings as the policy service's observation of it records them, so the observation
    /// is in already; applied now it would set a tool as that older list had it (a tool gone
    /// and back would read Needs approval until the next observation clears it).
    fn observes_an_older_discovery(
        &self,
        user: &str,
        server: &str,
        observed_position: u64,
    ) -> bool {
        if observed_position == 0 {
            return false; // recorded before observations carried their discovery's position
        }
        let Some(server) = self.server(server) else {
            return false;
        };
        self.users
            .get(user)
            .and_then(|pairs| pairs.iter().find(|(s, _)| *s == server))
            .is_some_and(|(_, pair)| observed_position < pair.discovered_at)
    }

    fn server(&self, id: &str) -> Option<u32> {
        let id = ServerId::parse(id).ok()?;
        self.server_index.get(&id).copied()
    }

    /// The server's index, made on first sight (policy or connection events may name a server
    /// whose `ServerAdded` this projection has not folded, e.g. after a damaged record).
    fn server_mut_or_new(&mut self, id: &str) -> Option<u32> {
        let id = ServerId::parse(id).ok()?;
        if let Some(i) = self.server_index.get(&id) {
            return Some(*i);
        }
        let i = self.servers.len() as u32;
        self.servers.push(ServerEntry {
            id,
            slug: None,
            deleted: false,
            tools: Vec::new(),
        });
        self.server_index.insert(id, i);
        Some(i)
    }

    fn pair_or_new(&mut self, user: &str, server: &str) -> Option<&mut UserServer> {
        if user.is_empty() {
            return None;
        }
        let server = self.server_mut_or_new(server)?;
        if self.servers[server as usize].deleted {
            return None;
        }
        if !self.users.contains_key(user) {
            self.users.insert(user.into(), Vec::new());
        }
        let pairs = self.users.get_mut(user)?;
        let i = match pairs.iter().position(|(s, _)| *s == server) {
            Some(i) => i,
            None => {
                pairs.push((server, UserServer::default()));
                pairs.len() - 1
            }
        };
        pairs.get_mut(i).map(|(_, pair)| pair)
    }

    fn set(
        &mut self,
        user: &str,
        server: &str,
        tool: &str,
        definition_hash: &str,
        state: i32,
        changed: bool,
    ) {
        let name = self.tool_names.intern(tool);
        let hash = self.hashes.intern(definition_hash);
        let Some(pair) = self.pair_or_new(user, server) else {
            return;
        };
        let slot = pair.slot_mut(name);
        slot.setting_hash = hash;
        slot.state = state_code(ToolState::from_event(state));
        slot.changed = changed;
    }

    fn discovered(&mut self, e: &proto::v1::ToolsDiscovered, sequence: u64) {
        let Some(server) = self.server_mut_or_new(&e.server_id) else {
            return;
        };
        if e.user_id.is_empty() || self.servers[server as usize].deleted {
            return;
        }
        let mut offered = Vec::with_capacity(e.tools.len());
        for tool in &e.tools {
            let name = self.tool_names.intern(&tool.name);
            let hash = self.hashes.intern(&tool.definition_hash);
            let definition = match self.definition_index.get(&(server, name, hash)) {
                Some(definition) => *definition,
                None => {
                    let definition = self.definitions.len() as u32;
                    self.definitions.push(Definition {
                        server,
                        name,
                        hash,
                        read_only: ToolCategory::of(tool) == ToolCategory::ReadOnly,
                        title: tool.title.as_str().into(),
                        description: tool.description.as_str().into(),
                        input_schema: tool.input_schema_json.as_str().into(),
                        output_schema: tool.output_schema_json.as_str().into(),
                        annotations: annotations_json(tool.annotations.as_ref()).into(),
                    });
                    self.definition_index
                        .insert((server, name, hash), definition);
                    definition
                }
            };
            offered.push((name, definition, hash, tool.definition_hash.is_empty()));
            if !self.exposed_of.contains_key(&(server, name)) {
                let entry = &mut self.servers[server as usize];
                if !entry.tools.contains(&name) {
                    entry.tools.push(name);
                }
                self.give_exposed_name(server, name);
            }
        }
        let Some(pair) = self.pair_or_new(&e.user_id, &e.server_id) else {
            return;
        };
        pair.discovered_at = pair.discovered_at.max(sequence);
        // The settings follow this discovery as the policy service's reaction to it records
        // them (`tool_policy`'s `ObserveDefinitions`), ahead of that reaction, which may
        // lag: a setting for another definition drops from Always allow to Needs approval,
        // flagged changed, and a tool this list lacks loses its setting, so that it starts
        // Blocked if it comes back.
        for slot in &mut pair.slots {
            slot.definition = NONE;
        }
        for (name, definition, hash, hash_missing) in offered {
            let slot = pair.slot_mut(name);
            slot.definition = definition;
            if slot.setting_hash != NONE && slot.setting_hash != hash && !hash_missing {
                if state_of_code(slot.state) == ToolState::AlwaysAllow {
                    slot.state = state_code(ToolState::NeedsApproval);
                }
                slot.setting_hash = hash;
                slot.changed = true;
            }
        }
        for slot in &mut pair.slots {
            if slot.definition == NONE {
                slot.setting_hash = NONE;
                slot.state = state_code(ToolState::Blocked);
                slot.changed = false;
            }
        }
        pair.slots.retain(|slot| !slot.is_empty());
    }

    fn give_exposed_name(&mut self, server: u32, name: u32) {
        let Some(slug) = self.servers[server as usize].slug.clone() else {
            return;
        };
        let Ok(tool) = ToolName::parse(self.tool_names.text(name)) else {
            return;
        };
        let exposed = ExposedToolName::for_tool_among(&slug, &tool, |candidate| {
            self.exposed.contains_key(candidate)
        });
        let exposed: Box<str> = exposed.as_str().into();
        self.exposed.insert(exposed.clone(), (server, name));
        self.exposed_of.insert((server, name), exposed);
    }

    fn release_exposed_names(&mut self, server: u32) {
        for name in &self.servers[server as usize].tools {
            if let Some(exposed) = self.exposed_of.remove(&(server, *name)) {
                self.exposed.remove(&exposed);
            }
        }
    }

    /// A new slug renames every exposed name of the server, given out again in tool name
    /// order.
    fn set_slug(&mut self, server: u32, slug: Option<Slug>) {
        if self.servers[server as usize].slug == slug {
            return;
        }
        self.release_exposed_names(server);
        self.servers[server as usize].slug = slug;
        let mut names = self.servers[server as usize].tools.clone();
        names.sort_by(|a, b| self.tool_names.text(*a).cmp(self.tool_names.text(*b)));
        for name in names {
            self.give_exposed_name(server, name);
        }
    }

    /// A deleted server offers nothing to anyone and its names are free again.
    fn delete_server(&mut self, server: u32) {
        self.release_exposed_names(server);
        let entry = &mut self.servers[server as usize];
        entry.deleted = true;
        entry.tools.clear();
        for pairs in self.users.values_mut() {
            pairs.retain(|(s, _)| *s != server);
        }
    }

    fn pair(&self, user: &UserId, server: ServerId) -> Option<(u32, &UserServer)> {
        let pairs = self.users.get(user.as_str())?;
        let server = *self.server_index.get(&server)?;
        pairs
            .iter()
            .find(|(s, _)| *s == server)
            .map(|(s, pair)| (*s, pair))
    }

    /// The effective state and `changed` flag of a slot offered with `definition`.
    fn effective(slot: &Slot, definition: &Definition) -> (ToolState, bool) {
        if slot.setting_hash == NONE {
            return (ToolState::Blocked, false);
        }
        let state = state_of_code(slot.state);
        if slot.setting_hash != definition.hash && state != ToolState::Blocked {
            // Set for another definition than the one offered now (the policy service has
            // not recorded the change yet): never more than Needs approval.
            (ToolState::NeedsApproval, true)
        } else {
            (state, slot.changed)
        }
    }

    fn view<'a>(&'a self, server: u32, pair: &UserServer, slot: &Slot) -> Option<ToolView<'a>> {
        if !pair.connected {
            return None;
        }
        let definition = self.definitions.get(slot.definition as usize)?;
        let (state, changed) = Self::effective(slot, definition);
        Some(ToolView {
            server_id: self.servers.get(server as usize)?.id,
            name: self.tool_names.text(slot.name),
            exposed_name: self
                .exposed_of
                .get(&(server, slot.name))
                .map(|name| &**name),
            title: &definition.title,
            description: &definition.description,
            input_schema_json: &definition.input_schema,
            output_schema_json: &definition.output_schema,
            annotations_json: &definition.annotations,
            category: if definition.read_only {
                ToolCategory::ReadOnly
            } else {
                ToolCategory::Write
            },
            state,
            definition_hash: self.hashes.text(definition.hash),
            changed,
        })
    }

    /// The effective state of one tool of `user` on `server`; `None` when the user is not
    /// connected to the server or it does not offer them the tool now. The invocation path's
    /// question: no allocation, a few hash probes.
    pub fn state_of(&self, user: &UserId, server: ServerId, tool: &str) -> Option<ToolState> {
        let (_, pair) = self.pair(user, server)?;
        if !pair.connected {
            return None;
        }
        let slot = pair.slot(self.tool_names.get(tool)?)?;
        let definition = self.definitions.get(slot.definition as usize)?;
        Some(Self::effective(slot, definition).0)
    }

    /// One tool of `user` on `server`, as [`ToolStates::state_of`] finds it.
    pub fn tool(&self, user: &UserId, server: ServerId, tool: &str) -> Option<ToolView<'_>> {
        let (server, pair) = self.pair(user, server)?;
        let name = self.tool_names.get(tool)?;
        self.view(server, pair, pair.slot(name)?)
    }

    /// Every tool `server` offers `user` now (in no particular order); nothing unless the user
    /// is connected.
    pub fn tools_of(
        &self,
        user: &UserId,
        server: ServerId,
    ) -> impl Iterator<Item = ToolView<'_>> + '_ {
        self.pair(user, server)
            .into_iter()
            .flat_map(move |(server, pair)| {
                pair.slots
                    .iter()
                    .filter_map(move |slot| self.view(server, pair, slot))
            })
    }

    /// Every tool of every server `user` is connected to.
    pub fn all_tools_of(&self, user: &UserId) -> impl Iterator<Item = ToolView<'_>> + '_ {
        self.users
            .get(user.as_str())
            .into_iter()
            .flatten()
            .flat_map(move |(server, pair)| {
                pair.slots
                    .iter()
                    .filter_map(move |slot| self.view(*server, pair, slot))
            })
    }

    /// The tool behind an exposed name, if it is one of `user`'s tools now.
    pub fn resolve_exposed(&self, user: &UserId, exposed_name: &str) -> Option<ToolView<'_>> {
        let (server, name) = *self.exposed.get(exposed_name)?;
        let (_, pair) = self
            .users
            .get(user.as_str())?
            .iter()
            .find(|(s, _)| *s == server)?;
        self.view(server, pair, pair.slot(name)?)
    }

    /// The server and tool an exposed name stands for, whoever it is offered to: what a user
    /// without a connection to that server asked for (a server that was deleted names none).
    pub fn exposed_tool(&self, exposed_name: &str) -> Option<(ServerId, &str)> {
        let (server, name) = *self.exposed.get(exposed_name)?;
        let entry = self.servers.get(server as usize)?;
        (!entry.deleted).then(|| (entry.id, self.tool_names.text(name)))
    }

    /// Whether `user` is connected to `server` (from `ConnectionEstablished` until
    /// `ConnectionDisconnected`).
    pub fn is_connected(&self, user: &UserId, server: ServerId) -> bool {
        self.pair(user, server)
            .is_some_and(|(_, pair)| pair.connected)
    }

    /// How many (user, server, tool) entries the projection holds: tools offered or set.
    pub fn slot_count(&self) -> usize {
        self.users
            .values()
            .flatten()
            .map(|(_, pair)| pair.slots.len())
            .sum()
    }
}

/// The checkpoint form: the interned tables as lists (their indexes are rebuilt on load).
#[derive(Serialize)]
struct SnapshotRef<'a> {
    users: Vec<(&'a str, &'a [(u32, UserServer)])>,
    tool_names: &'a [Box<str>],
    hashes: &'a [Box<str>],
    servers: &'a [ServerEntry],
    definitions: &'a [Definition],
    exposed: Vec<(u32, u32, &'a str)>,
}

#[derive(Deserialize)]
struct Snapshot {
    users: Vec<(Box<str>, UserServers)>,
    tool_names: Vec<Box<str>>,
    hashes: Vec<Box<str>>,
    servers: Vec<ServerEntry>,
    definitions: Vec<Definition>,
    exposed: Vec<(u32, u32, Box<str>)>,
}

impl Serialize for ToolStates {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut exposed: Vec<(u32, u32, &str)> = self
            .exposed_of
            .iter()
            .map(|((server, name), exposed)| (*server, *name, &**exposed))
            .collect();
        exposed.sort_unstable();
        SnapshotRef {
            users: self
                .users
                .iter()
                .map(|(user, pairs)| (&**user, pairs.as_slice()))
                .collect(),
            tool_names: &self.tool_names.strings,
            hashes: &self.hashes.strings,
            servers: &self.servers,
            definitions: &self.definitions,
            exposed,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ToolStates {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let snapshot = Snapshot::deserialize(deserializer)?;
        let users = snapshot.users.into_iter().collect();
        let server_index = snapshot
            .servers
            .iter()
            .enumerate()
            .map(|(i, server)| (server.id, i as u32))
            .collect();
        let definition_index = snapshot
            .definitions
            .iter()
            .enumerate()
            .map(|(i, d)| ((d.server, d.name, d.hash), i as u32))
            .collect();
        let mut exposed = HashMap::with_capacity(snapshot.exposed.len());
        let mut exposed_of = HashMap::with_capacity(snapshot.exposed.len());
        for (server, name, text) in snapshot.exposed {
            exposed.insert(text.clone(), (server, name));
            exposed_of.insert((server, name), text);
        }
        Ok(ToolStates {
            users,
            tool_names: Interner::from_strings(snapshot.tool_names),
            hashes: Interner::from_strings(snapshot.hashes),
            servers: snapshot.servers,
            server_index,
            definitions: snapshot.definitions,
            definition_index,
            exposed,
            exposed_of,
        })
    }
}

#[cfg(test)]
mod tests {
    use proto::v1 as pb;

    use super::*;

    const SERVER: &str = "0190f3c4-a8b2-7c3d-9e1f-0123456789ab";
    const OTHER_SERVER: &str = "0190f3c4-a8b2-7c3d-9e1f-0123456789ac";

    fn server() -> ServerId {
        ServerId::parse(SERVER).unwrap()
    }

    fn user(id: &str) -> UserId {
        UserId::parse(id).unwrap()
    }

    fn added(id: &str, name: &str) -> Event {
        Event::ServerAdded(pb::ServerAdded {
            server_id: id.into(),
            name: name.into(),
            slug: crate::ServerName::parse(name)
                .unwrap()
                .slug()
                .as_str()
                .into(),
            enabled: true,
            ..Default::default()
        })
    }

    fn established(user: &str, server: &str) -> Event {
        Event::ConnectionEstablished(pb::ConnectionEstablished {
            server_id: server.into(),
            user_id: user.into(),
            ..Default::default()
        })
    }

    fn tool(name: &str, hash: &str, read_only: bool) -> pb::ToolDefinition {
        pb::ToolDefinition {
            name: name.into(),
            title: format!("{name} title"),
            description: format!("{name} description"),
            annotations: Some(pb::ToolAnnotations {
                read_only_hint: Some(read_only),
                ..Default::default()
            }),
            definition_hash: hash.into(),
            ..Default::default()
        }
    }

    fn discovered(user: &str, server: &str, tools: Vec<pb::ToolDefinition>) -> Event {
        Event::ToolsDiscovered(pb::ToolsDiscovered {
            server_id: server.into(),
            user_id: user.into(),
            tools,
            ..Default::default()
        })
    }

    fn permission(user: &str, tool: &str, state: ToolState, hash: &str) -> Event {
        Event::ToolPermissionSet(pb::ToolPermissionSet {
            user_id: user.into(),
            server_id: SERVER.into(),
            tool_name: tool.into(),
            state: state.to_proto() as i32,
            definition_hash: hash.into(),
            ..Default::default()
        })
    }

    /// The events folded at positions 1, 2, …
    fn states(events: impl IntoIterator<Item = Event>) -> ToolStates {
        let mut states = ToolStates::default();
        for (event, sequence) in events.into_iter().zip(1..) {
            states.apply_event(&event, sequence);
        }
        states
    }

    fn connected_alice() -> Vec<Event> {
        vec![
            added(SERVER, "GitHub"),
            established("alice", SERVER),
            discovered(
                "alice",
                SERVER,
                vec![tool("search", "s1", true), tool("delete_repo", "d1", false)],
            ),
        ]
    }

    #[test]
    fn every_offered_tool_starts_blocked_with_its_definition_and_exposed_name() {
        let states = states(connected_alice());
        let alice = user("alice");
        assert!(states.is_connected(&alice, server()));
        let search = states.tool(&alice, server(), "search").expect("search");
        assert_eq!(
            search,
            ToolView {
                server_id: server(),
                name: "search",
                exposed_name: Some("github__search"),
                title: "search title",
                description: "search description",
                input_schema_json: search.input_schema_json,
                output_schema_json: search.output_schema_json,
                annotations_json: search.annotations_json,
                category: ToolCategory::ReadOnly,
                state: ToolState::Blocked,
                definition_hash: "s1",
                changed: false,
            }
        );
        assert_eq!(
            states
                .tool(&alice, server(), "delete_repo")
                .map(|t| t.category),
            Some(ToolCategory::Write)
        );
        assert_eq!(states.tools_of(&alice, server()).count(), 2);
        assert_eq!(states.state_of(&alice, server(), "unknown"), None);
    }

    #[test]
    fn settings_are_per_user() {
        let mut events = connected_alice();
        events.extend([
            established("bob", SERVER),
            discovered("bob", SERVER, vec![tool("search", "s1", true)]),
            permission("alice", "search", ToolState::AlwaysAllow, "s1"),
        ]);
        let states = states(events);
        assert_eq!(
            states.state_of(&user("alice"), server(), "search"),
            Some(ToolState::AlwaysAllow)
        );
        assert_eq!(
            states.state_of(&user("bob"), server(), "search"),
            Some(ToolState::Blocked)
        );
        assert_eq!(states.state_of(&user("carol"), server(), "search"), None);
    }

    #[test]
    fn a_setting_for_another_definition_never_reads_as_always_allow() {
        let mut events = connected_alice();
        events.extend([
            permission("alice", "search", ToolState::AlwaysAllow, "s1"),
            discovered("alice", SERVER, vec![tool("search", "s2", true)]),
        ]);
        let mut states = states(events);
        let alice = user("alice");
        let view = states.tool(&alice, server(), "search").expect("search");
        assert_eq!(
            (view.state, view.changed, view.definition_hash),
            (ToolState::NeedsApproval, true, "s2")
        );
        // The policy service records the change: same answer.
        states.apply_event(
            &Event::ToolDefinitionChanged(pb::ToolDefinitionChanged {
                user_id: "alice".into(),
                server_id: SERVER.into(),
                tool_name: "search".into(),
                previous_definition_hash: "s1".into(),
                definition_hash: "s2".into(),
                previous_state: pb::ToolState::AlwaysAllow as i32,
                state: pb::ToolState::NeedsApproval as i32,
                observed_position: 5,
            }),
            6,
        );
        let view = states.tool(&alice, server(), "search").expect("search");
        assert_eq!((view.state, view.changed), (ToolState::NeedsApproval, true));
        // The user sets it again: the flag goes.
        states.apply_event(
            &permission("alice", "search", ToolState::AlwaysAllow, "s2"),
            7,
        );
        let view = states.tool(&alice, server(), "search").expect("search");
        assert_eq!((view.state, view.changed), (ToolState::AlwaysAllow, false));
    }

    #[test]
    fn nothing_is_offered_while_disconnected_and_settings_return_with_the_connection() {
        let mut events = connected_alice();
        events.extend([
            permission("alice", "search", ToolState::AlwaysAllow, "s1"),
            Event::ConnectionDisconnected(pb::ConnectionDisconnected {
                server_id: SERVER.into(),
                user_id: "alice".into(),
                ..Default::default()
            }),
        ]);
        let mut states = states(events);
        let alice = user("alice");
        assert!(!states.is_connected(&alice, server()));
        assert_eq!(states.tools_of(&alice, server()).count(), 0);
        assert_eq!(states.resolve_exposed(&alice, "github__search"), None);
        // The name still says which server and tool it is, for telling her to connect.
        assert_eq!(
            states.exposed_tool("github__search"),
            Some((server(), "search"))
        );
        assert_eq!(states.exposed_tool("github__nothing"), None);
        for event in [
            established("alice", SERVER),
            discovered("alice", SERVER, vec![tool("search", "s1", true)]),
        ] {
            states.apply_event(&event, 9);
        }
        assert_eq!(
            states.state_of(&alice, server(), "search"),
            Some(ToolState::AlwaysAllow)
        );
    }

    #[test]
    fn a_removed_tool_disappears_and_comes_back_blocked_once_its_setting_is_cleared() {
        let mut events = connected_alice();
        events.extend([
            permission("alice", "search", ToolState::AlwaysAllow, "s1"),
            discovered("alice", SERVER, vec![tool("delete_repo", "d1", false)]),
        ]);
        let mut states = states(events);
        let alice = user("alice");
        assert_eq!(states.state_of(&alice, server(), "search"), None);
        states.apply_event(
            &Event::ToolPermissionsCleared(pb::ToolPermissionsCleared {
                user_id: "alice".into(),
                server_id: SERVER.into(),
                tool_names: vec!["search".into()],
                ..Default::default()
            }),
            10,
        );
        states.apply_event(
            &discovered(
                "alice",
                SERVER,
                vec![tool("search", "s1", true), tool("delete_repo", "d1", false)],
            ),
            11,
        );
        assert_eq!(
            states.state_of(&alice, server(), "search"),
            Some(ToolState::Blocked)
        );
    }

    /// The policy service's reaction to the discoveries may lag behind both (a restart, a
    /// failing store): the projection does not wait for it.
    #[test]
    fn a_tool_gone_and_back_or_a_definition_changed_and_back_does_not_return_to_always_allow() {
        let mut events = connected_alice();
        events.extend([
            permission("alice", "search", ToolState::AlwaysAllow, "s1"),
            permission("alice", "delete_repo", ToolState::AlwaysAllow, "d1"),
            discovered("alice", SERVER, vec![tool("delete_repo", "d2", false)]),
            discovered(
                "alice",
                SERVER,
                vec![tool("search", "s1", true), tool("delete_repo", "d1", false)],
            ),
        ]);
        let states = states(events);
        let alice = user("alice");
        assert_eq!(
            states.state_of(&alice, server(), "search"),
            Some(ToolState::Blocked),
            "gone and back: Blocked"
        );
        let view = states
            .tool(&alice, server(), "delete_repo")
            .expect("offered");
        assert_eq!(
            (view.state, view.changed, view.definition_hash),
            (ToolState::NeedsApproval, true, "d1"),
            "changed and changed back: Needs approval until the user sets it again"
        );
    }

    /// The policy service's observations arrive after the discoveries they observed, and a
    /// lagging one after a later discovery: that one is folded in already.
    #[test]
    fn an_observation_of_an_older_discovery_takes_no_tool_back_to_that_list() {
        let mut events = connected_alice();
        events.extend([
            permission("alice", "search", ToolState::AlwaysAllow, "s1"), // 4
            discovered("alice", SERVER, vec![tool("search", "s2", true)]), // 5
            discovered("alice", SERVER, vec![tool("delete_repo", "d1", false)]), // 6
            discovered("alice", SERVER, vec![tool("search", "s2", true)]), // 7
            Event::ToolDefinitionChanged(pb::ToolDefinitionChanged {
                user_id: "alice".into(),
                server_id: SERVER.into(),
                tool_name: "search".into(),
                previous_definition_hash: "s1".into(),
                definition_hash: "s2".into(),
                previous_state: pb::ToolState::AlwaysAllow as i32,
                state: pb::ToolState::NeedsApproval as i32,
                observed_position: 5,
            }), // 8
        ]);
        let mut states = states(events);
        let alice = user("alice");
        assert_eq!(
            states.state_of(&alice, server(), "search"),
            Some(ToolState::Blocked),
            "gone at 6 and back at 7: Blocked, whatever the observation of 5 says"
        );
        states.apply_event(
            &Event::ToolPermissionsCleared(pb::ToolPermissionsCleared {
                user_id: "alice".into(),
                server_id: SERVER.into(),
                tool_names: vec!["search".into()],
                observed_position: 6,
                ..Default::default()
            }),
            9,
        );
        states.apply_event(
            &permission("alice", "search", ToolState::AlwaysAllow, "s2"),
            10,
        );
        assert_eq!(
            states.state_of(&alice, server(), "search"),
            Some(ToolState::AlwaysAllow)
        );
        // An observation of the latest discovery is folded as before.
        states.apply_event(
            &Event::ToolDefinitionChanged(pb::ToolDefinitionChanged {
                user_id: "alice".into(),
                server_id: SERVER.into(),
                tool_name: "search".into(),
                previous_definition_hash: "s2".into(),
                definition_hash: "s2".into(),
                previous_state: pb::ToolState::AlwaysAllow as i32,
                state: pb::ToolState::NeedsApproval as i32,
                observed_position: 7,
            }),
            11,
        );
        let view = states.tool(&alice, server(), "search").expect("search");
        assert_eq!((view.state, view.changed), (ToolState::NeedsApproval, true));
    }

    #[test]
    fn exposed_names_are_unique_resolve_per_user_and_follow_renames_and_deletes() {
        let mut events = connected_alice();
        events.extend([
            added(OTHER_SERVER, "Jira"),
            established("alice", OTHER_SERVER),
            // `files.read` hashes to `jira__files_read_<hash>`; `files_read` is plain.
            discovered(
                "alice",
                OTHER_SERVER,
                vec![
                    tool("files.read", "f1", true),
                    tool("files_read", "f2", true),
                    tool(&"t".repeat(100), "t1", true),
                ],
            ),
        ]);
        let mut states = states(events);
        let alice = user("alice");
        let names: Vec<String> = states
            .all_tools_of(&alice)
            .map(|t| t.exposed_name.expect("named").to_owned())
            .collect();
        assert_eq!(names.len(), 5);
        let unique: std::collections::HashSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), 5, "{names:?}");
        for name in &names {
            assert!(ExposedToolName::is_well_formed(name), "{name}");
            let resolved = states.resolve_exposed(&alice, name).expect("resolves");
            assert_eq!(resolved.exposed_name, Some(name.as_str()));
        }
        let jira = ServerId::parse(OTHER_SERVER).unwrap();
        assert_eq!(
            states
                .resolve_exposed(&alice, "jira__files_read")
                .map(|t| (t.server_id, t.name)),
            Some((jira, "files_read"))
        );
        assert_eq!(
            states.resolve_exposed(&user("bob"), "jira__files_read"),
            None
        );

        states.apply_event(
            &Event::ServerUpdated(pb::ServerUpdated {
                server_id: OTHER_SERVER.into(),
                slug: Some("tracker".into()),
                ..Default::default()
            }),
            20,
        );
        assert_eq!(states.resolve_exposed(&alice, "jira__files_read"), None);
        assert_eq!(
            states
                .resolve_exposed(&alice, "tracker__files_read")
                .map(|t| t.name),
            Some("files_read")
        );
        states.apply_event(
            &Event::ServerDeleted(pb::ServerDeleted {
                server_id: OTHER_SERVER.into(),
                ..Default::default()
            }),
            21,
        );
        assert_eq!(states.resolve_exposed(&alice, "tracker__files_read"), None);
        assert_eq!(states.tools_of(&alice, jira).count(), 0);
        assert_eq!(states.all_tools_of(&alice).count(), 2);
    }

    #[test]
    fn a_snapshot_restores_the_same_projection() {
        let mut events = connected_alice();
        events.extend([
            permission("alice", "search", ToolState::AlwaysAllow, "s1"),
            Event::ToolDefinitionChanged(pb::ToolDefinitionChanged {
                user_id: "alice".into(),
                server_id: SERVER.into(),
                tool_name: "delete_repo".into(),
                definition_hash: "d1".into(),
                state: pb::ToolState::NeedsApproval as i32,
                ..Default::default()
            }),
        ]);
        let states = states(events);
        let snapshot = serde_json::to_vec(&states).expect("encodes");
        let restored: ToolStates = serde_json::from_slice(&snapshot).expect("decodes");
        assert_eq!(restored, states);
        let view = restored
            .tool(&user("alice"), server(), "delete_repo")
            .expect("tool");
        assert_eq!((view.state, view.changed), (ToolState::NeedsApproval, true));
    }
}
