//! The catalog: the five provider templates and Custom MCP Server.
//!
//! Each provider template carries its provider profile: the named allowances for where that
//! provider's OAuth departs from the MCP specification (public reports as of 2026). An
//! allowance applies only to servers added from its template; Custom MCP Server has none and
//! is held to the specification.
use serde::Serialize;

pub use mcp::Allowance;

/// The id of the Custom MCP Server tile (the admin gives the URL).
pub const CUSTOM_TEMPLATE: &str = "custom";

/// The id of the demo issue tracker's tile, in the catalog of `switchboard up --demo` only.
pub const DEMO_TEMPLATE: &str = "demo";

/// One tile of the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Template {
    pub id: &'static str,
    pub name: &'static str,
    /// The MCP endpoint; `None` for Custom MCP Server (the admin gives it).
    pub url: Option<String>,
    /// What the server's tools cover, for the console.
    pub description: &'static str,
    /// Where the provider departs from the specification; empty for Custom.
    pub allowances: &'static [Allowance],
    /// Where tokens are revoked when the provider does not do RFC 7009 (GitHub's REST API,
    /// Slack's `auth.revoke`); `None`: the authorization server's `revocation_endpoint`.
    pub revocation_api: Option<RevocationApi>,
    /// How a client registered with the provider by hand authenticates at its token
    /// endpoint, when the provider documents one way (GitHub and PagerDuty take the client
    /// secret in the request body); `None`: as the authorization server's metadata says.
    pub preregistered_auth_method: Option<&'static str>,
}

/// A provider's own token revocation API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationApi {
    /// `DELETE <base>applications/{client_id}/token` (GitHub).
    GitHubApplications { base: String },
    /// `POST <url>` with the token as bearer (Slack's `auth.revoke`).
    SlackAuthRevoke { url: String },
}

/// The templates an admin can add servers from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    templates: Vec<Template>,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog::standard()
    }
}

impl Catalog {
    /// The catalog users get: the providers' real endpoints.
    pub fn standard() -> Self {
        use Allowance::*;
        let template = |id, name, url: &str, description, allowances| Template {
            id,
            name,
            url: Some(url.to_owned()),
            description,
            allowances,
            revocation_api: None,
            preregistered_auth_method: None,
        };
        Catalog {
            templates: vec![
                template(
                    "atlassian",
                    "Atlassian",
                    "https://mcp.atlassian.com/v1/mcp",
                    "Jira, Confluence and Compass tools",
                    &[
                        NoProtectedResourceMetadata,
                        IssuerOnAnotherHost,
                        RegistrationDropsScope,
                        ExactRedirectUriMatch,
                    ],
                ),
                Template {
                    revocation_api: Some(RevocationApi::GitHubApplications {
                        base: "https://api.github.com/".to_owned(),
                    }),
                    preregistered_auth_method: Some("client_secret_post"),
                    ..template(
                        "github",
                        "GitHub",
                        "https://api.githubcopilot.com/mcp",
                        "Repository, issue, pull request and Actions tools",
                        &[NoDynamicRegistration, PathIssuer, RevocationThroughRestApi],
                    )
                },
                template(
                    "notion",
                    "Notion",
                    "https://mcp.notion.com/mcp",
                    "Page, database and workspace tools",
                    &[PublicClientRegistration, OverlappingRefreshTokens],
                ),
                Template {
                    preregistered_auth_method: Some("client_secret_post"),
                    ..template(
                        "pagerduty",
                        "PagerDuty",
                        "https://mcp.pagerduty.com/mcp",
                        "Incident, service and schedule tools",
                        &[
                            OpenIdConnectDiscoveryOnly,
                            PathIssuer,
                            NoDynamicRegistration,
                            SecretOnRefresh,
                        ],
                    )
                },
                Template {
                    revocation_api: Some(RevocationApi::SlackAuthRevoke {
                        url: "https://slack.com/api/auth.revoke".to_owned(),
                    }),
                    ..template(
                        "slack",
                        "Slack",
                        "https://mcp.slack.com/mcp",
                        "Message, channel, canvas and user tools",
                        &[
                            RedirectedWellKnown,
                            NoDynamicRegistration,
                            RevocationThroughAuthRevoke,
                        ],
                    )
                },
                Template {
                    id: CUSTOM_TEMPLATE,
                    name: "Custom MCP Server",
                    url: None,
                    description: "Any remote MCP server by its https:// URL, held to the MCP specification",
                    allowances: &[],
                    revocation_api: None,
                    preregistered_auth_method: None,
                },
            ],
        }
    }

    /// The standard catalog with some templates pointed elsewhere: how tests point a template
    /// at its fixture (the template's revocation API moves to the same origin). Not reachable from configuration, so users cannot repoint a provider.
    pub fn with_urls<'a>(overrides: impl IntoIterator<Item = (&'a str, String)>) -> Self {
        let mut catalog = Catalog::standard();
        for (id, url) in overrides {
            if let Some(template) = catalog
                .templates
                .iter_mut()
                .find(|t| t.id == id && t.url.is_some())
            {
                // The provider's revocation API moves with it, to the fixture's origin.
                let origin = url::Url::parse(&url)
                    .map(|u| u.origin().ascii_serialization())
                    .unwrap_or_default();
                template.revocation_api = match template.revocation_api.take() {
                    Some(RevocationApi::GitHubApplications { .. }) => {
                        Some(RevocationApi::GitHubApplications {
                            base: format!("{origin}/"),
                        })
                    }
                    Some(RevocationApi::SlackAuthRevoke { .. }) => {
                        Some(RevocationApi::SlackAuthRevoke {
                            url: format!("{origin}/api/auth.revoke"),
                        })
                    }
                    None => None,
                };
                template.url = Some(url);
            }
        }
        catalog
    }

    /// The standard catalog and, before Custom, the tile of the demo issue tracker that
    /// `switchboard up --demo` serves at `url` (held to the MCP specification, no allowances).
    pub fn with_demo(url: String) -> Self {
        let mut catalog = Catalog::standard();
        let demo = Template {
            id: DEMO_TEMPLATE,
            name: "Demo issue tracker",
            url: Some(url),
            description: "The in-process demo of `switchboard up --demo`: search, create and delete issues, and an oversized export",
            allowances: &[],
            revocation_api: None,
            preregistered_auth_method: None,
        };
        let custom = catalog
            .templates
            .iter()
            .position(|t| t.id == CUSTOM_TEMPLATE)
            .unwrap_or(catalog.templates.len());
        catalog.templates.insert(custom, demo);
        catalog
    }

    pub fn templates(&self) -> &[Template] {
        &self.templates
    }

    pub fn get(&self, id: &str) -> Option<&Template> {
        self.templates.iter().find(|t| t.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_catalog_adds_the_demo_tile_before_custom_without_allowances() {
        let catalog = Catalog::with_demo("http://127.0.0.1:4000/mcp".to_owned());
        let ids: Vec<&str> = catalog.templates().iter().map(|t| t.id).collect();
        assert_eq!(ids[ids.len() - 2..], [DEMO_TEMPLATE, CUSTOM_TEMPLATE]);
        let demo = catalog.get(DEMO_TEMPLATE).expect("the demo tile");
        assert_eq!(demo.url.as_deref(), Some("http://127.0.0.1:4000/mcp"));
        assert!(demo.allowances.is_empty());
        assert!(Catalog::standard().get(DEMO_TEMPLATE).is_none());
    }

    #[test]
    fn the_catalog_has_five_providers_and_custom() {
        let catalog = Catalog::standard();
        let ids: Vec<&str> = catalog.templates().iter().map(|t| t.id).collect();
        assert_eq!(
            ids,
            [
                "atlassian",
                "github",
                "notion",
                "pagerduty",
                "slack",
                "custom"
            ]
        );
        for template in catalog.templates() {
            match template.id {
                CUSTOM_TEMPLATE => {
                    assert!(template.url.is_none());
                    assert!(template.allowances.is_empty(), "Custom is strict");
                }
                _ => {
                    let url = template.url.as_deref().expect("provider URL");
                    assert!(url.starts_with("https://"), "{url}");
                    assert!(!template.allowances.is_empty());
                }
            }
        }
        assert_eq!(
            catalog.get("github").and_then(|t| t.url.as_deref()),
            Some("https://api.githubcopilot.com/mcp")
        );
    }

    #[test]
    fn tests_repoint_provider_templates_but_never_give_custom_a_url() {
        let catalog = Catalog::with_urls([
            ("notion", "https://notion.test:8443/mcp".to_owned()),
            ("custom", "https://evil.test/".to_owned()),
        ]);
        assert_eq!(
            catalog.get("notion").and_then(|t| t.url.as_deref()),
            Some("https://notion.test:8443/mcp")
        );
        assert_eq!(catalog.get("custom").and_then(|t| t.url.as_deref()), None);
    }
}
