//! The claim on a server name (subject `server.name.<slug>`): server names are unique by slug.
//!
//! The server directory answers whether a name is taken, but two admins adding (or renaming
//! to) clashing names at the same moment both find it free. So an add or a rename first claims
//! the slug on its own subject, append-only with an expected version: of two claims decided on
//! the same history, one is stored and the other conflicts, decides again and finds the name
//! held. The server is recorded after the claim; a delete, a rename or a failed add releases it.
//!
//! A claim outlives its purpose when the process dies between the claim and the server, or a
//! release fails: a claim whose server does not hold the name in the directory is void once
//! [`CLAIM_GRACE`] has passed since it was made (long enough for an add to record its server).
use std::time::{Duration, SystemTime};

use proto::v1::{self as pb, envelope::Event};

use crate::projections::ServerDirectory;
use crate::time::{from_optional_timestamp, to_timestamp};
use crate::{Aggregate, DomainError, ServerId, ServerName, Slug};

/// How long a claim stands without its server holding the name in the directory.
pub const CLAIM_GRACE: Duration = Duration::from_secs(60);

/// Who holds one slug, as its claim events say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameClaim {
    holder: Option<Holder>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Holder {
    server_id: String,
    claimed_at: SystemTime,
}

impl NameClaim {
    /// The server that claimed the name last and has not released it.
    pub fn holder(&self) -> Option<&str> {
        self.holder.as_ref().map(|h| h.server_id.as_str())
    }
}

impl Aggregate for NameClaim {
    fn apply(&mut self, event: &Event) {
        match event {
            Event::ServerNameClaimed(claimed) => {
                self.holder = Some(Holder {
                    server_id: claimed.server_id.clone(),
                    claimed_at: from_optional_timestamp(claimed.claimed_at.as_ref())
                        .unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
            Event::ServerNameReleased(released)
                if self.holder() == Some(released.server_id.as_str()) =>
            {
                self.holder = None;
            }
            _ => {}
        }
    }
}

/// What the catalog service asks of a name's claim.
#[derive(Debug, Clone)]
pub enum NameClaimCommand {
    /// `server_id` is about to take `name` (an add, or a rename).
    Claim {
        server_id: ServerId,
        name: ServerName,
        now: SystemTime,
    },
    /// `server_id` no longer uses the name `slug` stands for. Releasing a name another
    /// server holds records nothing.
    Release { server_id: ServerId, slug: Slug },
}

/// Decides a command for the claim on one slug (the command's). `directory` says which server holds the
/// name now.
pub fn decide(
    state: &NameClaim,
    command: NameClaimCommand,
    directory: &ServerDirectory,
) -> Result<Vec<Event>, DomainError> {
    match command {
        NameClaimCommand::Claim {
            server_id,
            name,
            now,
        } => {
            let slug = name.slug();
            let id = server_id.to_string();
            let taken = || {
                Err(DomainError::ServerNameTaken {
                    slug: slug.as_str().to_owned(),
                })
            };
            // A server holding the name in the directory (one added before names were
            // claimed, too) keeps it: nothing is claimed for a change that would be refused.
            if directory
                .slug_owner(slug.as_str())
                .is_some_and(|owner| owner != server_id)
            {
                return taken();
            }
            if let Some(holder) = &state.holder {
                if holder.server_id == id {
                    return Ok(vec![]);
                }
                let holds_it_in_the_directory = ServerId::parse(&holder.server_id)
                    .is_ok_and(|holder| directory.slug_owner(slug.as_str()) == Some(holder));
                let in_flight = now
                    .duration_since(holder.claimed_at)
                    .map_or(true, |age| age < CLAIM_GRACE);
                if holds_it_in_the_directory || in_flight {
                    return taken();
                }
            }
            Ok(vec![Event::ServerNameClaimed(pb::ServerNameClaimed {
                slug: slug.as_str().to_owned(),
                server_id: id,
                name: name.as_str().to_owned(),
                claimed_at: Some(to_timestamp(now)),
            })])
        }
        NameClaimCommand::Release { server_id, slug } => {
            let id = server_id.to_string();
            match &state.holder {
                Some(holder) if holder.server_id == id => {
                    Ok(vec![Event::ServerNameReleased(pb::ServerNameReleased {
                        slug: slug.as_str().to_owned(),
                        server_id: id,
                    })])
                }
                _ => Ok(vec![]),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Scenario;

    const HOLDER: &str = "0190f3c4-a8b2-7c3d-9e1f-0123456789ab";
    const OTHER: &str = "0190f3c4-a8b2-7c3d-9e1f-0123456789ac";

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
    }

    fn claimed(server: &str, seconds: u64) -> Event {
        Event::ServerNameClaimed(pb::ServerNameClaimed {
            slug: "github".into(),
            server_id: server.into(),
            name: "GitHub".into(),
            claimed_at: Some(to_timestamp(at(seconds))),
        })
    }

    fn claim(server: &str, seconds: u64) -> NameClaimCommand {
        NameClaimCommand::Claim {
            server_id: ServerId::parse(server).unwrap(),
            name: ServerName::parse("GitHub").unwrap(),
            now: at(seconds),
        }
    }

    fn release(server: &str) -> NameClaimCommand {
        NameClaimCommand::Release {
            server_id: ServerId::parse(server).unwrap(),
            slug: ServerName::parse("GitHub").unwrap().slug(),
        }
    }

    /// A directory where `server` holds the name.
    fn holding(server: &str) -> ServerDirectory {
        let mut directory = ServerDirectory::default();
        directory.apply_event(&Event::ServerAdded(pb::ServerAdded {
            server_id: server.into(),
            name: "GitHub".into(),
            slug: "github".into(),
            ..Default::default()
        }));
        directory
    }

    #[test]
    fn the_first_claim_wins_and_a_second_is_refused_while_the_first_is_in_flight() {
        let none = ServerDirectory::default();
        Scenario::<NameClaim>::given([])
            .when(|s| decide(s, claim(HOLDER, 0), &none))
            .then([claimed(HOLDER, 0)]);
        Scenario::<NameClaim>::given([claimed(HOLDER, 0)])
            .when(|s| decide(s, claim(OTHER, 59), &none))
            .then_error("server_name_taken");
        // Claiming again what one holds records nothing.
        Scenario::<NameClaim>::given([claimed(HOLDER, 0)])
            .when(|s| decide(s, claim(HOLDER, 5), &none))
            .then_nothing();
    }

    #[test]
    fn a_claim_whose_server_never_took_the_name_is_void_after_the_grace() {
        Scenario::<NameClaim>::given([claimed(HOLDER, 0)])
            .when(|s| decide(s, claim(OTHER, 60), &ServerDirectory::default()))
            .then([claimed(OTHER, 60)]);
        // A server holding the name in the directory keeps it however old its claim, or
        // without one (added before names were claimed).
        Scenario::<NameClaim>::given([claimed(HOLDER, 0)])
            .when(|s| decide(s, claim(OTHER, 86_400), &holding(HOLDER)))
            .then_error("server_name_taken");
        Scenario::<NameClaim>::given([])
            .when(|s| decide(s, claim(OTHER, 0), &holding(HOLDER)))
            .then_error("server_name_taken");
    }

    #[test]
    fn only_the_holder_releases_a_name() {
        let state = Scenario::<NameClaim>::given([claimed(HOLDER, 0)])
            .when(|s| decide(s, release(HOLDER), &ServerDirectory::default()))
            .then([Event::ServerNameReleased(pb::ServerNameReleased {
                slug: "github".into(),
                server_id: HOLDER.into(),
            })]);
        assert_eq!(state.holder(), None);
        Scenario::<NameClaim>::given([claimed(HOLDER, 0)])
            .when(|s| decide(s, release(OTHER), &ServerDirectory::default()))
            .then_nothing();
        // Released, it is free at once.
        Scenario::<NameClaim>::given([
            claimed(HOLDER, 0),
            Event::ServerNameReleased(pb::ServerNameReleased {
                slug: "github".into(),
                server_id: HOLDER.into(),
            }),
        ])
        .when(|s| decide(s, claim(OTHER, 1), &ServerDirectory::default()))
        .then([claimed(OTHER, 1)]);
    }
}
