//! Names: server names and their slugs, server descriptions, tool names, and the exposed tool
//! names the AI sees (`<slug>__<tool>`).
use std::collections::{BTreeMap, HashMap};

use crate::DomainError;

/// A server's display name: 1–24 characters, ASCII letters, digits, spaces, `_` and `-`,
/// trimmed. ASCII only so that its [`Slug`] is always a valid tool-name prefix.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ServerName(String);
string_newtype_impls!(ServerName);

impl ServerName {
    pub const MAX_CHARS: usize = 24;

    pub fn parse(text: &str) -> Result<ServerName, DomainError> {
        let name = text.trim();
        if name.is_empty() {
            return Err(DomainError::ServerNameEmpty {
                max: Self::MAX_CHARS,
            });
        }
        let length = name.chars().count();
        if length > Self::MAX_CHARS {
            return Err(DomainError::ServerNameTooLong {
                length,
                max: Self::MAX_CHARS,
            });
        }
        if let Some(character) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, ' ' | '_' | '-')))
        {
            return Err(DomainError::ServerNameInvalidCharacter { character });
        }
        if !name.chars().any(|c| c.is_ascii_alphanumeric()) {
            return Err(DomainError::ServerNameWithoutLettersOrDigits);
        }
        Ok(ServerName(name.to_owned()))
    }

    /// The tool prefix: `Production GitHub` → `production_github`.
    pub fn slug(&self) -> Slug {
        Slug::from_name(self)
    }
}

/// A server name's slug: lowercase, every run of spaces, `-` and `_` turned into one `_`,
/// none at either end. Unique across servers (so names are unique case-insensitively, after
/// slugging) and the prefix of the server's exposed tool names.
///
/// A slug never contains `__`, so `<slug>__<tool>` splits unambiguously at the first `__` and
/// two servers can never produce the same exposed name for the same tool name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slug(String);
string_newtype_impls!(Slug);

// A slug in a projection checkpoint reads back through `Slug::parse`, so a damaged one fails
// the snapshot (the projection then rebuilds) instead of yielding an invalid slug.
impl serde::Serialize for Slug {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Slug {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Slug::parse(&text).ok_or_else(|| serde::de::Error::custom("not a server slug"))
    }
}

impl Slug {
    /// Reads a slug as recorded in a server event: what [`Slug::from_name`] makes (1–24
    /// characters of `[a-z0-9_]`, no `_` at either end, never `__`); anything else is `None`.
    pub fn parse(text: &str) -> Option<Slug> {
        let well_formed = !text.is_empty()
            && text.len() <= ServerName::MAX_CHARS
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !text.starts_with('_')
            && !text.ends_with('_')
            && !text.contains("__");
        well_formed.then(|| Slug(text.to_owned()))
    }

    pub fn from_name(name: &ServerName) -> Slug {
        let mut slug = String::with_capacity(name.0.len());
        let mut pending_separator = false;
        for c in name.0.chars() {
            if matches!(c, ' ' | '-' | '_') {
                pending_separator = !slug.is_empty();
            } else {
                if pending_separator {
                    slug.push('_');
                    pending_separator = false;
                }
                slug.push(c.to_ascii_lowercase());
            }
        }
        Slug(slug)
    }
}

/// What the AI is told about a server: 0–1024 characters, line breaks and tabs allowed,
/// other control characters not, trimmed.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct ServerDescription(String);
string_newtype_impls!(ServerDescription);

impl ServerDescription {
    pub const MAX_CHARS: usize = 1024;

    pub fn parse(text: &str) -> Result<ServerDescription, DomainError> {
        let description = text.trim();
        let length = description.chars().count();
        if length > Self::MAX_CHARS {
            return Err(DomainError::ServerDescriptionTooLong {
                length,
                max: Self::MAX_CHARS,
            });
        }
        if description
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        {
            return Err(DomainError::ServerDescriptionInvalidCharacter);
        }
        Ok(ServerDescription(description.to_owned()))
    }
}

/// A tool's name as its MCP server reports it: 1–128 characters, no whitespace or control
/// characters. MCP recommends `[A-Za-z0-9_.-]`; others are accepted (and sanitised in the
/// exposed name) so that one oddly named tool does not make a server unusable.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ToolName(String);
string_newtype_impls!(ToolName);

impl ToolName {
    pub const MAX_CHARS: usize = 128;

    pub fn parse(text: &str) -> Result<ToolName, DomainError> {
        if text.is_empty() {
            return Err(DomainError::ToolNameEmpty);
        }
        let length = text.chars().count();
        if length > Self::MAX_CHARS {
            return Err(DomainError::ToolNameTooLong {
                length,
                max: Self::MAX_CHARS,
            });
        }
        if text.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(DomainError::ToolNameInvalidCharacter);
        }
        Ok(ToolName(text.to_owned()))
    }
}

/// The name a tool is offered to the AI under: `<slug>__<tool>`, always matching
/// `^[a-zA-Z0-9_-]{1,64}$` (what LLM APIs accept).
///
/// A name that does not fit as it is gets its other characters replaced by `_`, is cut to
/// leave room, and ends in `_` + 8 hex digits of SHA-256 of the original `<slug>__<tool>`, so
/// it stays stable across restarts and distinct from its neighbours.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExposedToolName(String);
string_newtype_impls!(ExposedToolName);

const SEPARATOR: &str = "__";
const HASH_SUFFIX_CHARS: usize = 1 + 8;

fn exposable(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

impl ExposedToolName {
    pub const MAX_CHARS: usize = 64;

    /// `<slug>__<tool>` if that is a valid exposed name, else its hashed form.
    pub fn for_tool(slug: &Slug, tool: &ToolName) -> ExposedToolName {
        let length = slug.0.len() + SEPARATOR.len() + tool.0.len();
        if length <= Self::MAX_CHARS && tool.0.chars().all(exposable) {
            let mut name = String::with_capacity(length);
            name.push_str(&slug.0);
            name.push_str(SEPARATOR);
            name.push_str(&tool.0);
            ExposedToolName(name)
        } else {
            Self::hashed(slug, tool, 0)
        }
    }

    /// The exposed name of a tool among names already given out: [`ExposedToolName::for_tool`],
    /// or, when `taken` says that name is in use, the hashed form (salted again on the
    /// astronomically rare clash of two hashed forms). Names given out one at a time in a fixed
    /// order (e.g. the order of a log) come out the same on every replay.
    pub fn for_tool_among(
        slug: &Slug,
        tool: &ToolName,
        taken: impl Fn(&str) -> bool,
    ) -> ExposedToolName {
        let mut exposed = Self::for_tool(slug, tool);
        let mut round = 0;
        while taken(exposed.as_str()) {
            exposed = Self::hashed(slug, tool, round);
            round += 1;
        }
        exposed
    }

    /// The hashed form: sanitised, cut to fit, `_` + 8 hex digits of a hash of the original.
    /// `round` > 0 salts the hash, for the (astronomically rare) clash of two hashed forms.
    fn hashed(slug: &Slug, tool: &ToolName, round: u32) -> ExposedToolName {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(slug.0.as_bytes());
        context.update(SEPARATOR.as_bytes());
        context.update(tool.0.as_bytes());
        if round > 0 {
            context.update(format!("#{round}").as_bytes());
        }
        let digest = context.finish();

        let mut name = String::with_capacity(Self::MAX_CHARS);
        let keep = Self::MAX_CHARS - HASH_SUFFIX_CHARS;
        let original = slug
            .0
            .chars()
            .chain(SEPARATOR.chars())
            .chain(tool.0.chars());
        for c in original.take(keep) {
            name.push(if exposable(c) { c } else { '_' });
        }
        name.push('_');
        crate::tools::push_hex(&mut name, digest.as_ref().get(..4).unwrap_or_default());
        ExposedToolName(name)
    }

    /// Whether `text` is shaped like an exposed name (`^[a-zA-Z0-9_-]{1,64}$`); says nothing
    /// about whether a tool has that name.
    pub fn is_well_formed(text: &str) -> bool {
        !text.is_empty() && text.len() <= Self::MAX_CHARS && text.chars().all(exposable)
    }
}

/// The exposed names of a set of tools (usually: every tool of every server a user is
/// connected to), with clashes resolved, and the way back from an exposed name to its tool.
///
/// Deterministic whatever the input order: tools are taken in (slug, tool) order, and when
/// two map to the same exposed name, the later one gets the hashed form. (Slugs never contain
/// `__`, so a clash needs a tool whose plain name looks like another's hashed form.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExposedToolMap {
    by_tool: BTreeMap<(Slug, ToolName), ExposedToolName>,
    by_exposed: HashMap<ExposedToolName, (Slug, ToolName)>,
}

impl ExposedToolMap {
    pub fn new<'a>(tools: impl IntoIterator<Item = (&'a Slug, &'a ToolName)>) -> ExposedToolMap {
        let mut sorted: Vec<(&Slug, &ToolName)> = tools.into_iter().collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut map = ExposedToolMap::default();
        for (slug, tool) in sorted {
            let exposed = ExposedToolName::for_tool_among(slug, tool, |name| {
                map.by_exposed
                    .contains_key(&ExposedToolName(name.to_owned()))
            });
            map.by_exposed
                .insert(exposed.clone(), (slug.clone(), tool.clone()));
            map.by_tool.insert((slug.clone(), tool.clone()), exposed);
        }
        map
    }

    /// The exposed name of a tool, if the tool is in the map.
    pub fn exposed_name(&self, slug: &Slug, tool: &ToolName) -> Option<&ExposedToolName> {
        // BTreeMap lookups need an owned key tuple; the map is small and this is not per call.
        self.by_tool.get(&(slug.clone(), tool.clone()))
    }

    /// The server slug and tool behind an exposed name the AI used.
    pub fn resolve(&self, exposed: &str) -> Option<(&Slug, &ToolName)> {
        self.by_exposed
            .get(&ExposedToolName(exposed.to_owned()))
            .map(|(slug, tool)| (slug, tool))
    }

    /// Every tool with its exposed name, in (slug, tool) order.
    pub fn iter(&self) -> impl Iterator<Item = (&Slug, &ToolName, &ExposedToolName)> {
        self.by_tool
            .iter()
            .map(|((slug, tool), exposed)| (slug, tool, exposed))
    }

    pub fn len(&self) -> usize {
        self.by_tool.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_tool.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slug(name: &str) -> Slug {
        ServerName::parse(name).unwrap().slug()
    }

    fn tool(name: &str) -> ToolName {
        ToolName::parse(name).unwrap()
    }

    #[test]
    fn server_name_rules() {
        assert_eq!(
            ServerName::parse("  Production GitHub ").unwrap().as_str(),
            "Production GitHub"
        );
        assert!(ServerName::parse(&"a".repeat(24)).is_ok());
        let code = |text: &str| ServerName::parse(text).map_err(|e| e.code()).err();
        assert_eq!(code(""), Some("server_name_empty"));
        assert_eq!(code("   "), Some("server_name_empty"));
        assert_eq!(code(&"a".repeat(25)), Some("server_name_too_long"));
        assert_eq!(code("Git.Hub"), Some("server_name_invalid_character"));
        assert_eq!(code("Jíra"), Some("server_name_invalid_character"));
        assert_eq!(code("a\tb"), Some("server_name_invalid_character"));
        assert_eq!(code("- _ -"), Some("server_name_without_letters_or_digits"));
    }

    #[test]
    fn slug_examples() {
        assert_eq!(slug("Production GitHub").as_str(), "production_github");
        assert_eq!(slug("GitHub").as_str(), "github");
        assert_eq!(slug("my-server").as_str(), "my_server");
        assert_eq!(slug("My  Server").as_str(), "my_server");
        assert_eq!(slug("My_-_Server").as_str(), "my_server");
        assert_eq!(slug("-Jira-").as_str(), "jira");
        assert_eq!(slug("_x_").as_str(), "x");
        assert_eq!(slug("Jira 2").as_str(), "jira_2");
    }

    #[test]
    fn slugs_compare_names_case_insensitively_after_slugging() {
        assert_eq!(slug("Production GitHub"), slug("production-github"));
        assert_eq!(slug("Production GitHub"), slug("PRODUCTION_GITHUB"));
        assert_ne!(slug("Production GitHub"), slug("ProductionGitHub"));
    }

    #[test]
    fn slugs_never_contain_double_underscores() {
        for name in ["a__b", "a _ b", "a- -b", "__a__", "a-_-_-b"] {
            let slug = slug(name);
            assert!(!slug.as_str().contains("__"), "{slug:?}");
            assert!(!slug.as_str().starts_with('_') && !slug.as_str().ends_with('_'));
        }
    }

    #[test]
    fn description_rules() {
        assert_eq!(
            ServerDescription::parse(" Issues\nand PRs\t ")
                .unwrap()
                .as_str(),
            "Issues\nand PRs"
        );
        assert!(ServerDescription::parse("").is_ok());
        assert!(ServerDescription::parse(&"x".repeat(1024)).is_ok());
        assert_eq!(
            ServerDescription::parse(&"x".repeat(1025)).map_err(|e| e.code()),
            Err("server_description_too_long")
        );
        assert_eq!(
            ServerDescription::parse("bell\u{7}").map_err(|e| e.code()),
            Err("server_description_invalid_character")
        );
    }

    #[test]
    fn tool_name_rules() {
        assert!(ToolName::parse("search_issues").is_ok());
        assert!(ToolName::parse("files.read-v2").is_ok());
        assert!(ToolName::parse("weird/näme").is_ok(), "lenient but safe");
        assert!(ToolName::parse(&"t".repeat(128)).is_ok());
        let code = |text: &str| ToolName::parse(text).map_err(|e| e.code()).err();
        assert_eq!(code(""), Some("tool_name_empty"));
        assert_eq!(code(&"t".repeat(129)), Some("tool_name_too_long"));
        assert_eq!(code("two words"), Some("tool_name_invalid_character"));
        assert_eq!(code("nl\n"), Some("tool_name_invalid_character"));
    }

    #[test]
    fn exposed_name_is_slug_double_underscore_tool_when_it_fits() {
        let name = ExposedToolName::for_tool(&slug("Production GitHub"), &tool("create_issue"));
        assert_eq!(name.as_str(), "production_github__create_issue");
    }

    #[test]
    fn exposed_names_always_match_the_llm_name_pattern() {
        let long = "t".repeat(128);
        let cases = [
            ("GitHub", "files.read"),
            ("GitHub", long.as_str()),
            (
                "Production GitHub 2024",
                "a-very-long-tool-name-that-does-not-fit-in-there",
            ),
            ("x", "日本語"),
            ("x", "a/b:c"),
            ("abcdefghijklmnopqrstuvwx", "y"),
        ];
        for (server, tool_name) in cases {
            let name = ExposedToolName::for_tool(&slug(server), &tool(tool_name));
            assert!(
                ExposedToolName::is_well_formed(name.as_str()),
                "{server} {tool_name} → {name:?}"
            );
            assert!(name.as_str().len() <= 64);
        }
    }

    #[test]
    fn exposed_name_that_does_not_fit_gets_a_stable_hash_suffix() {
        let a = ExposedToolName::for_tool(&slug("GitHub"), &tool("files.read"));
        let b = ExposedToolName::for_tool(&slug("GitHub"), &tool("files_read"));
        assert!(a.as_str().starts_with("github__files_read_"), "{a:?}");
        assert_eq!(a.as_str().len(), "github__files_read_".len() + 8);
        assert_eq!(b.as_str(), "github__files_read");
        assert_ne!(a, b, "sanitising alone would have made them clash");
        assert_eq!(
            a,
            ExposedToolName::for_tool(&slug("GitHub"), &tool("files.read")),
            "stable"
        );
        let long = ExposedToolName::for_tool(&slug("GitHub"), &tool(&"t".repeat(100)));
        assert_eq!(long.as_str().len(), 64);
    }

    #[test]
    fn recorded_slugs_read_back_and_malformed_ones_do_not() {
        for name in ["Production GitHub", "Jira 2", "x"] {
            let made = slug(name);
            assert_eq!(Slug::parse(made.as_str()), Some(made));
        }
        for text in ["", "Upper", "a__b", "_a", "a_", "a.b", &"a".repeat(25)] {
            assert_eq!(Slug::parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn a_name_already_given_out_makes_the_next_tool_take_the_hashed_form() {
        let github = slug("GitHub");
        let plain = ExposedToolName::for_tool_among(&github, &tool("search"), |_| false);
        assert_eq!(plain.as_str(), "github__search");
        let taken = ExposedToolName::for_tool_among(&github, &tool("search"), |name| {
            name == "github__search"
        });
        assert!(taken.as_str().starts_with("github__search_"), "{taken:?}");
        assert!(ExposedToolName::is_well_formed(taken.as_str()));
        let again = ExposedToolName::for_tool_among(&github, &tool("search"), |name| {
            name == "github__search" || name == taken.as_str()
        });
        assert_ne!(again, taken, "a taken hashed form is salted again");
        assert!(ExposedToolName::is_well_formed(again.as_str()));
    }

    #[test]
    fn clashing_exposed_names_give_the_later_tool_the_hash_suffix() {
        let github = slug("GitHub");
        let plain = tool("files_read");
        // A tool whose plain name equals another tool's hashed form.
        let hashed = ExposedToolName::for_tool(&github, &tool("files.read"));
        let hashed_tool = tool(hashed.as_str().trim_start_matches("github__"));
        let dotted = tool("files.read");
        let tools = [
            (&github, &hashed_tool),
            (&github, &dotted),
            (&github, &plain),
        ];

        let map = ExposedToolMap::new(tools);
        let reversed = ExposedToolMap::new(tools.iter().rev().copied());
        assert_eq!(map, reversed, "independent of input order");
        assert_eq!(map.len(), 3);
        let names: std::collections::HashSet<_> = map.iter().map(|(_, _, e)| e.clone()).collect();
        assert_eq!(names.len(), 3, "no two tools share an exposed name");
        for (slug, tool, exposed) in map.iter() {
            assert!(ExposedToolName::is_well_formed(exposed.as_str()));
            assert_eq!(map.resolve(exposed.as_str()), Some((slug, tool)));
            assert_eq!(map.exposed_name(slug, tool), Some(exposed));
        }
        assert_eq!(
            map.exposed_name(&github, &plain).map(|e| e.as_str()),
            Some("github__files_read")
        );
        assert_eq!(map.resolve("github__nope"), None);
    }
}
