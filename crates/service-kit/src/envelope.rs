//! Envelopes: the event bodies `decide` returns, wrapped with who caused them and why.
use std::sync::Arc;

use domain::{Event, UserId};
use proto::v1::{Actor as ActorProto, Envelope, actor};
use uuid::Uuid;

use crate::Clock;

/// Who caused an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A signed-in user (or an orchestrator acting for one: then the user it named).
    User(UserId),
    /// One of Switchboard's own services reacting to something (e.g. `connection`).
    Service(&'static str),
}

/// Why a command runs: its actor, the request it belongs to, and what directly caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandContext {
    pub actor: Actor,
    /// Shared by every event one request causes: the HTTP request id, or the correlation id
    /// of the event a reaction handles.
    pub correlation_id: String,
    /// The event id (or request id) that directly caused the command; empty for a request.
    pub causation_id: String,
}

impl CommandContext {
    /// A command a user sent in request `request_id`.
    pub fn user(user: UserId, request_id: impl Into<String>) -> Self {
        let request_id = request_id.into();
        CommandContext {
            actor: Actor::User(user),
            causation_id: request_id.clone(),
            correlation_id: request_id,
        }
    }

    /// A service acting on its own (a token refresh, a health probe): a fresh correlation id.
    pub fn service(service: &'static str) -> Self {
        let id = uuid::Uuid::now_v7().to_string();
        CommandContext {
            actor: Actor::Service(service),
            causation_id: id.clone(),
            correlation_id: id,
        }
    }

    /// A service reacting to `cause`: the reaction's events share the cause's correlation id.
    pub fn reaction(service: &'static str, cause: &Envelope) -> Self {
        CommandContext {
            actor: Actor::Service(service),
            correlation_id: cause.correlation_id.clone(),
            causation_id: cause.event_id.clone(),
        }
    }
}

/// Builds envelopes with ids and times from one clock.
#[derive(Debug, Clone)]
pub struct EnvelopeBuilder {
    clock: Arc<dyn Clock>,
}

impl EnvelopeBuilder {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        EnvelopeBuilder { clock }
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// One envelope per event, all stamped with the same time (one decision, one instant).
    pub fn wrap(&self, context: &CommandContext, events: Vec<Event>) -> Vec<Envelope> {
        let occurred_at = domain::time::to_timestamp(self.clock.now());
        let actor = match &context.actor {
            Actor::User(user) => actor::Kind::UserId(user.as_str().to_owned()),
            Actor::Service(service) => actor::Kind::Service((*service).to_owned()),
        };
        events
            .into_iter()
            .map(|event| Envelope {
                event_id: Uuid::now_v7().hyphenated().to_string(),
                occurred_at: Some(occurred_at),
                actor: Some(ActorProto {
                    kind: Some(actor.clone()),
                }),
                correlation_id: context.correlation_id.clone(),
                causation_id: context.causation_id.clone(),
                schema_version: proto::SCHEMA_VERSION,
                write_id: String::new(),
                event: Some(event),
            })
            .collect()
    }
}
