//! Adding a server: the template or URL, OAuth discovery, the OAuth client (pre-registered,
//! client ID metadata document, or dynamic registration) bound to the discovered issuer, the
//! client secret into the vault, and one atomic append of `ServerAdded` and
//! `ServerClientRegistered` — a crash leaves no server without its client.
use domain::{
    Aggregate, AuthorizationServer, CallbackKey, ClientId, DomainError, OAuthSettings,
    RegistrationMode, SecretRef, ServerDescription, ServerId, ServerName, ServerUrl, UrlPolicy,
    server::{AddServer, ClientRegistration, ServerCommand, ServerState, decide},
};
use mcp::{Discovered, DiscoveryError, RegistrationPlan};
use service_kit::{CommandContext, CommandError, Written, execute};
use url::Url;

use crate::{CUSTOM_TEMPLATE, ServerCommands, commands::subject_of};

/// Switchboard's own OAuth client settings.
#[derive(Debug, Clone)]
pub struct OAuthClientSettings {
    /// `<public_url>/oauth/callback`: the shared redirect URL, registered as is by a client ID
    /// metadata document, and with the authorization server's key appended
    /// ([`OAuthClientSettings::redirect_url_for`]) by every other client.
    pub redirect_url: String,
    /// The URL presented as client id where client ID metadata documents are supported
    /// (`oauth.client_metadata_url`, by default `<public_url>/oauth/client-metadata.json`).
    pub client_metadata_url: String,
    /// The client name given at dynamic registration.
    pub client_name: String,
}

impl OAuthClientSettings {
    /// The redirect URL registered for a client: the server's own (`<redirect_url>/<key>`), or
    /// the shared one without a key.
    pub fn redirect_url_for(&self, key: Option<&CallbackKey>) -> String {
        match key {
            Some(key) => format!("{}/{key}", self.redirect_url),
            None => self.redirect_url.clone(),
        }
    }

    /// The redirect URL a dynamically registered or pre-registered client of the
    /// authorization server `found` registers: its own.
    pub fn redirect_url_of(&self, found: &Discovered) -> String {
        self.redirect_url_for(Some(&callback_key_of(found)))
    }
}

/// The key of the authorization server `found` (see [`CallbackKey`]).
pub fn callback_key_of(found: &Discovered) -> CallbackKey {
    CallbackKey::for_authorization_server(&found.issuer, &found.token_endpoint)
}

/// What an admin asks for.
#[derive(Debug, Clone, Default)]
pub struct AddServerInput {
    pub name: String,
    /// A catalog template id; `custom` (or none) with `url`.
    pub template: Option<String>,
    pub url: Option<String>,
    pub description: Option<String>,
    /// A pre-registered client.
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
}

/// What an admin changes of a server: its name, its description, and (for a pre-registered
/// client only) its client id and secret. The URL never changes.
#[derive(Debug, Clone, Default)]
pub struct EditServerInput {
    pub name: Option<String>,
    pub description: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
}

/// Why a server was not added, discovered or changed. Each has a stable code.
#[derive(Debug, thiserror::Error)]
pub enum ServerChangeError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("there is no catalog template {0:?}; see GET /api/v1/catalog")]
    UnknownTemplate(String),
    #[error("give the server's URL (or choose a catalog template)")]
    UrlMissing,
    #[error("the {template} template fixes the URL; leave `url` out")]
    TemplateUrlFixed { template: String },
    #[error("a client secret needs its client id")]
    SecretWithoutClientId,
    #[error("client_secret {reason}")]
    ClientSecretInvalid { reason: &'static str },
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(
        "the authorization server offers no automatic registration: register Switchboard with the provider using the redirect URL {redirect_url}, then add the server again with its client_id (and client_secret)"
    )]
    ManualCredentialsRequired { redirect_url: String },
    #[error("dynamic client registration failed: {reason}")]
    RegistrationFailed { reason: String },
    #[error("the client secret could not be stored in the vault")]
    Vault(#[source] vault::VaultError),
    #[error(transparent)]
    Command(#[from] CommandError),
}

impl ServerChangeError {
    pub fn code(&self) -> &'static str {
        match self {
            ServerChangeError::Domain(error) => error.code(),
            ServerChangeError::UnknownTemplate(_) => "template_unknown",
            ServerChangeError::UrlMissing => "url_missing",
            ServerChangeError::TemplateUrlFixed { .. } => "template_url_fixed",
            ServerChangeError::SecretWithoutClientId => "client_id_missing",
            ServerChangeError::ClientSecretInvalid { .. } => "client_secret_invalid",
            ServerChangeError::Discovery(error) => error.code(),
            ServerChangeError::ManualCredentialsRequired { .. } => "manual_credentials_required",
            ServerChangeError::RegistrationFailed { .. } => "registration_failed",
            ServerChangeError::Vault(_) => "vault_unavailable",
            ServerChangeError::Command(CommandError::Domain(error)) => error.code(),
            ServerChangeError::Command(_) => "command_failed",
        }
    }

    /// Whether the change certainly recorded nothing: every refusal but a store failure whose
    /// append may have been stored.
    fn nothing_recorded(&self) -> bool {
        match self {
            ServerChangeError::Command(error) => error.nothing_stored(),
            _ => true,
        }
    }
}

/// Longest client secret accepted (providers' are well under 100 characters).
const MAX_CLIENT_SECRET_LEN: usize = 1024;

/// A client secret as an admin typed it, checked: a blank or garbled one would be stored and
/// fail every user's connection at the token endpoint, far from the admin's mistake.
fn checked_client_secret(secret: Option<String>) -> Result<Option<String>, ServerChangeError> {
    let Some(secret) = secret else {
        return Ok(None);
    };
    let reason = if secret.trim().is_empty() {
        "is empty"
    } else if secret.len() > MAX_CLIENT_SECRET_LEN {
        "is longer than 1,024 bytes"
    } else if secret.chars().any(char::is_control) {
        "holds control characters (a pasted line break?)"
    } else if secret.trim() != secret {
        "starts or ends with white space (pasted with it?)"
    } else {
        return Ok(Some(secret));
    };
    Err(ServerChangeError::ClientSecretInvalid { reason })
}

/// The template and URL an input names, checked.
struct Target {
    template: Option<String>,
    allowances: &'static [mcp::Allowance],
    /// How a pre-registered client of this provider authenticates, if the provider says.
    preregistered_auth_method: Option<&'static str>,
    url: ServerUrl,
    parsed: Url,
}

impl ServerCommands {
    /// The URL rule for `text`: https, and plain http to loopback when the outbound guard
    /// allows loopback or the URL names one of its exceptions (the demo servers).
    fn url_policy(&self, text: &str) -> UrlPolicy {
        let exception =
            url::Url::parse(text.trim()).is_ok_and(|url| self.outbound.is_exception(&url));
        UrlPolicy {
            allow_loopback_http: self.outbound.policy().allow_loopback || exception,
        }
    }

    fn target(&self, input: &AddServerInput) -> Result<Target, ServerChangeError> {
        let template = match input.template.as_deref() {
            None | Some(CUSTOM_TEMPLATE) => None,
            Some(id) => Some(
                self.catalog
                    .get(id)
                    .ok_or_else(|| ServerChangeError::UnknownTemplate(id.to_owned()))?,
            ),
        };
        let text = match (template, input.url.as_deref()) {
            (Some(template), Some(url)) if Some(url) != template.url.as_deref() => {
                return Err(ServerChangeError::TemplateUrlFixed {
                    template: template.id.to_owned(),
                });
            }
            (Some(template), _) => template.url.clone().ok_or(ServerChangeError::UrlMissing)?,
            (None, Some(url)) => url.to_owned(),
            (None, None) => return Err(ServerChangeError::UrlMissing),
        };
        let url = ServerUrl::parse(&text, self.url_policy(&text))?;
        let parsed = Url::parse(url.as_str()).map_err(|e| DomainError::UrlInvalid {
            reason: e.to_string(),
        })?;
        Ok(Target {
            template: template.map(|t| t.id.to_owned()),
            allowances: template.map_or(&[][..], |t| t.allowances),
            preregistered_auth_method: template.and_then(|t| t.preregistered_auth_method),
            url,
            parsed,
        })
    }

    /// OAuth discovery for a server an admin is about to add; changes nothing.
    pub async fn discover(&self, input: &AddServerInput) -> Result<Discovered, ServerChangeError> {
        let target = self.target(input)?;
        let (found, _) = mcp::discover(
            &self.outbound,
            &target.parsed,
            input.client_id.is_some(),
            target.allowances,
        )
        .await?;
        Ok(found)
    }

    /// Adds a server: discovery, its OAuth client, then `ServerAdded` and
    /// `ServerClientRegistered` in one append.
    pub async fn add_server(
        &self,
        context: &CommandContext,
        input: AddServerInput,
    ) -> Result<(ServerId, Written), ServerChangeError> {
        let name = ServerName::parse(&input.name)?;
        let description = ServerDescription::parse(input.description.as_deref().unwrap_or(""))?;
        if input.client_secret.is_some() && input.client_id.is_none() {
            return Err(ServerChangeError::SecretWithoutClientId);
        }
        let client_secret = checked_client_secret(input.client_secret.clone())?;
        let client_id = input
            .client_id
            .as_deref()
            .map(ClientId::parse)
            .transpose()?;
        let target = self.target(&input)?;
        // Fail fast on a taken name, before any request leaves; decide checks again.
        let slug = name.slug();
        if self
            .read_models
            .servers
            .read(|d| d.slug_owner(slug.as_str()).is_some())
        {
            return Err(DomainError::ServerNameTaken {
                slug: slug.as_str().to_owned(),
            }
            .into());
        }

        let (found, mut manager) = mcp::discover(
            &self.outbound,
            &target.parsed,
            client_id.is_some(),
            target.allowances,
        )
        .await?;
        let id = ServerId::new();
        let scopes: Vec<&str> = found.scopes.iter().map(String::as_str).collect();
        // The settings are checked before a client is registered or a secret stored, so that
        // a refusal leaves nothing behind (scopes the server advertises may be unusable).
        // Without a way to register, the admin needs the redirect URL before anything else.
        let planned_mode = match found.registration {
            RegistrationPlan::Preconfigured => RegistrationMode::Preconfigured,
            RegistrationPlan::ClientMetadataDocument => RegistrationMode::ClientMetadataDocument,
            RegistrationPlan::DynamicRegistration => RegistrationMode::DynamicRegistration,
            RegistrationPlan::ManualCredentialsRequired => {
                return Err(ServerChangeError::ManualCredentialsRequired {
                    redirect_url: self.oauth.redirect_url_of(&found),
                });
            }
        };
        let oauth = OAuthSettings::new(
            &found.scopes,
            planned_mode,
            client_id
                .as_ref()
                .filter(|_| planned_mode == RegistrationMode::Preconfigured)
                .map(ClientId::as_str),
        )?;
        // The name is claimed before a client is registered or anything recorded: of two
        // admins adding clashing names at once, one gets it (see `domain::server_name`).
        let slug = name.slug();
        self.claim_name(context, id, &name).await?;
        let result: Result<(ServerId, Written), ServerChangeError> = async {
            let (mode, client_id, secret) = match planned_mode {
                RegistrationMode::Preconfigured => (
                    RegistrationMode::Preconfigured,
                    client_id.ok_or(ServerChangeError::SecretWithoutClientId)?,
                    client_secret,
                ),
                RegistrationMode::ClientMetadataDocument => (
                    RegistrationMode::ClientMetadataDocument,
                    ClientId::parse(&self.oauth.client_metadata_url)?,
                    None,
                ),
                RegistrationMode::DynamicRegistration => {
                    let registered = manager
                        .register_client(
                            &self.oauth.client_name,
                            &self.oauth.redirect_url_of(&found),
                            &scopes,
                        )
                        .await
                        .map_err(|e| ServerChangeError::RegistrationFailed {
                            reason: e.to_string().chars().take(300).collect(),
                        })?;
                    (
                        RegistrationMode::DynamicRegistration,
                        ClientId::parse(&registered.client_id)?,
                        registered.client_secret,
                    )
                }
            };
            let auth_method = match target.preregistered_auth_method {
                Some(method) if mode == RegistrationMode::Preconfigured && secret.is_some() => method,
                _ => found.client_authentication_method(secret.is_some()),
            };
            let secret_ref = match secret {
                Some(secret) => Some(self.store_client_secret(id, secret).await?),
                None => None,
            };
            let stored_secret = secret_ref.as_ref().map(|r| r.as_str().to_owned());
            let add = AddServer {
                name,
                description,
                url: target.url,
                catalog_entry_id: target.template,
                oauth,
                enabled: true,
            };
            let added = self
                .record_added(
                    context,
                    id,
                    add,
                    &found,
                    mode,
                    client_id,
                    secret_ref,
                    auth_method,
                )
                .await;
            if let (Err(error), Some(stored)) = (&added, stored_secret) {
                // No event names it: it must not outlive the refusal. When the store failed
                // mid-append the event may name it, so it stays.
                self.forget_unreferenced_secret(&stored, error.nothing_recorded())
                    .await;
            }
            let written = added?;
            tracing::info!(server = %id, issuer = %found.issuer, mode = mode.as_str(), "server added");
            Ok((id, written))
        }
        .await;
        if let Err(error) = &result
            && error.nothing_recorded()
        {
            self.release_name(context, id, &slug).await;
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn record_added(
        &self,
        context: &CommandContext,
        id: ServerId,
        add: AddServer,
        found: &mcp::Discovered,
        mode: RegistrationMode,
        client_id: ClientId,
        secret_ref: Option<SecretRef>,
        auth_method: &str,
    ) -> Result<Written, ServerChangeError> {
        let endpoint = |url: &str| ServerUrl::parse(url, self.url_policy(url));
        let registration = ClientRegistration {
            registration_mode: mode,
            client_id: client_id.clone(),
            client_secret_ref: secret_ref,
            client_secret_expires_at: None,
            authorization_server: AuthorizationServer {
                issuer: found.issuer.clone(),
                authorization_endpoint: endpoint(&found.authorization_endpoint)?,
                token_endpoint: endpoint(&found.token_endpoint)?,
                revocation_endpoint: found
                    .revocation_endpoint
                    .as_deref()
                    .map(endpoint)
                    .transpose()?,
                registration_endpoint: found
                    .registration_endpoint
                    .as_deref()
                    .map(endpoint)
                    .transpose()?,
                scopes_supported: found.scopes_supported.clone(),
                code_challenge_methods_supported: found.code_challenge_methods_supported.clone(),
                authorization_response_iss_parameter_supported: found
                    .authorization_response_iss_parameter_supported,
                token_endpoint_auth_methods_supported: found
                    .token_endpoint_auth_methods_supported
                    .clone(),
            },
            resource: found.resource.clone(),
            token_endpoint_auth_method: auth_method.to_owned(),
            // A client ID metadata document is one document for every server, listing the
            // shared redirect URL; every other client is this authorization server's own.
            callback_key: (mode != RegistrationMode::ClientMetadataDocument)
                .then(|| callback_key_of(found)),
        };
        let directory = &self.read_models.servers;
        let written = execute::<ServerState, _>(
            self.log.as_ref(),
            &self.envelopes,
            &subject_of(id)?,
            context,
            |state| {
                directory.read(|directory| {
                    let mut events =
                        decide(state, id, ServerCommand::AddServer(add.clone()), directory)?;
                    let added = events.iter().fold(state.clone(), |s, e| s.evolve(e));
                    events.extend(decide(
                        &added,
                        id,
                        ServerCommand::RecordClientRegistration(Box::new(registration.clone())),
                        directory,
                    )?);
                    Ok(events)
                })
            },
        )
        .await?;
        Ok(written)
    }

    /// Edits a server: name and description, and the credentials of a pre-registered client,
    /// decided together and appended atomically. A new secret goes to a fresh vault entry, so
    /// that the recorded `ServerClientRegistered` names it (the replacement is in the audit
    /// log, the secret is not); the old entry is removed once the change is stored.
    pub async fn edit_server(
        &self,
        context: &CommandContext,
        id: ServerId,
        input: EditServerInput,
    ) -> Result<Written, ServerChangeError> {
        let name = input.name.as_deref().map(ServerName::parse).transpose()?;
        let description = input
            .description
            .as_deref()
            .map(ServerDescription::parse)
            .transpose()?;
        let client_id = input
            .client_id
            .as_deref()
            .map(ClientId::parse)
            .transpose()?;
        let client_secret = checked_client_secret(input.client_secret)?;
        let credentials = client_id.is_some() || client_secret.is_some();
        // A client added without a secret sends none; given one, it authenticates the way its
        // provider documents, else as its authorization server publishes (the domain decides).
        let auth_method_with_secret = self
            .read_models
            .servers
            .read(|d| d.get(id).map(|server| server.catalog_entry_id.clone()))
            .and_then(|template| self.catalog.get(&template))
            .and_then(|template| template.preregistered_auth_method);
        // A new name is claimed first, the old one given up once the change is stored.
        // (A server the directory does not show is refused below; it claims nothing.)
        let old_slug = self.current_slug(id);
        let renamed_to = name.as_ref().filter(|name| {
            old_slug
                .as_ref()
                .is_some_and(|old_slug| *old_slug != name.slug())
        });
        if let Some(name) = renamed_to {
            self.claim_name(context, id, name).await?;
        }
        let new_secret = match client_secret {
            Some(secret) => {
                let name = format!("server/{id}/client_secret/{}", uuid::Uuid::now_v7());
                Some(self.store_secret(name, secret).await?)
            }
            None => None,
        };
        let directory = &self.read_models.servers;
        let mut replaced_secret: Option<String> = None;
        let result = execute::<ServerState, _>(
            self.log.as_ref(),
            &self.envelopes,
            &subject_of(id)?,
            context,
            |state| {
                directory.read(|directory| {
                    let update = ServerCommand::UpdateServer(domain::server::UpdateServer {
                        name: name.clone(),
                        description: description.clone(),
                        oauth: None,
                    });
                    let mut events = decide(state, id, update, directory)?;
                    if credentials {
                        let updated = events.iter().fold(state.clone(), |s, e| s.evolve(e));
                        let replace = ServerCommand::ReplaceClientCredentials {
                            client_id: client_id.clone(),
                            client_secret_ref: new_secret.clone(),
                            auth_method_with_secret,
                        };
                        events.extend(decide(&updated, id, replace, directory)?);
                        replaced_secret = new_secret.as_ref().and(
                            state
                                .client_registration()
                                .map(|c| c.client_secret_ref.clone())
                                .filter(|r| !r.is_empty()),
                        );
                    }
                    Ok(events)
                })
            },
        )
        .await;
        // The entry no longer (or never) referenced by an event goes, and so does the claim
        // on the name no longer (or never) used.
        match &result {
            Ok(_) => {
                if let Some(name) = replaced_secret {
                    self.forget_secret(&name).await;
                }
                if let (Some(_), Some(old_slug)) = (renamed_to, &old_slug) {
                    self.release_name(context, id, old_slug).await;
                }
            }
            Err(error) => {
                if let Some(name) = new_secret {
                    self.forget_unreferenced_secret(name.as_str(), error.nothing_stored())
                        .await;
                }
                if let Some(name) = renamed_to
                    && error.nothing_stored()
                {
                    self.release_name(context, id, &name.slug()).await;
                }
            }
        }
        Ok(result?)
    }

    /// Removes the vault entry a failed change stored, unless the change may have been
    /// recorded after all (its events would name a secret that is gone); then it stays, and
    /// the log says so.
    async fn forget_unreferenced_secret(&self, name: &str, nothing_recorded: bool) {
        if nothing_recorded {
            self.forget_secret(name).await;
        } else {
            tracing::warn!(
                entry = name,
                "the event store failed mid-append; the client secret stays in the vault in case the change was stored"
            );
        }
    }

    async fn forget_secret(&self, name: &str) {
        let Ok(vault_name) = vault::SecretName::parse(name.to_owned()) else {
            return;
        };
        if let Err(error) = self.vault.delete(&vault_name).await {
            tracing::warn!(entry = name, %error, "an unreferenced client secret stays in the vault");
        }
    }

    /// The client secret goes to the vault; events carry only its vault name. The name is
    /// built from the server id, so it always fits the vault's 255 bytes.
    async fn store_client_secret(
        &self,
        id: ServerId,
        secret: String,
    ) -> Result<SecretRef, ServerChangeError> {
        self.store_secret(format!("server/{id}/client_secret"), secret)
            .await
    }

    async fn store_secret(
        &self,
        name: String,
        secret: String,
    ) -> Result<SecretRef, ServerChangeError> {
        let vault_name =
            vault::SecretName::parse(name.clone()).map_err(ServerChangeError::Vault)?;
        self.vault
            .put(&vault_name, &vault::Secret::from(secret))
            .await
            .map_err(ServerChangeError::Vault)?;
        Ok(SecretRef::parse(&name)?)
    }
}
