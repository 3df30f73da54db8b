//! The open invocations: every invocation without its terminal event yet, folded from the
//! invocations log. What the invocation path needs to keep in memory and nothing more — a
//! finished invocation leaves the map, so its size is the number of invocations in flight
//! or waiting for a user, however long the history.
//!
//! It answers a user's pending approvals (with the tool and arguments they decide on), and
//! tells the invoker's sweeper which approvals passed their deadline and which calls were
//! left running by a process that stopped.
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::v1::{Envelope, envelope::Event};
use serde::{Deserialize, Serialize};

use crate::invocation::invocation_id_of;
use crate::time::from_timestamp;

/// Where an open invocation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpenStatus {
    /// Requested and allowed; not started yet.
    Ready,
    /// Waiting for its user until `expires_at_ms` (milliseconds since the epoch).
    AwaitingApproval { expires_at_ms: u64 },
    /// Approved by its user; not started yet.
    Approved,
    /// The call to the server began.
    Running,
}

/// One open invocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenInvocation {
    pub invocation_id: String,
    pub user_id: String,
    pub server_id: String,
    pub tool_name: String,
    pub exposed_tool_name: String,
    /// Recorded for invocations awaiting approval (and with payload capture); else empty.
    pub arguments_json: String,
    pub requested_at_ms: u64,
    /// When the status last changed.
    pub since_ms: u64,
    pub status: OpenStatus,
}

impl OpenInvocation {
    pub fn requested_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.requested_at_ms)
    }

    pub fn approval_expires_at(&self) -> Option<SystemTime> {
        match self.status {
            OpenStatus::AwaitingApproval { expires_at_ms } => {
                Some(UNIX_EPOCH + Duration::from_millis(expires_at_ms))
            }
            _ => None,
        }
    }
}

/// The projection: open invocations by user and invocation id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenInvocations {
    /// Key: `(user id, invocation id)`; ids are unique per user.
    #[serde(with = "pairs")]
    open: HashMap<(String, String), OpenInvocation>,
}

fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl OpenInvocations {
    /// Folds one invocation event in; `user` is the user of the event's subject (later
    /// events carry only the invocation id, and ids are unique per user only). Events of
    /// invocations not open here are ignored.
    pub fn apply(&mut self, envelope: &Envelope, user: &str) {
        let Some(event) = &envelope.event else {
            return;
        };
        let Some(id) = invocation_id_of(event) else {
            return;
        };
        let at = envelope
            .occurred_at
            .as_ref()
            .map_or(0, |t| millis(from_timestamp(t)));
        if let Event::InvocationRequested(requested) = event {
            let key = (requested.user_id.clone(), requested.invocation_id.clone());
            if self.open.contains_key(&key) {
                return;
            }
            self.open.insert(
                key,
                OpenInvocation {
                    invocation_id: requested.invocation_id.clone(),
                    user_id: requested.user_id.clone(),
                    server_id: requested.server_id.clone(),
                    tool_name: requested.tool_name.clone(),
                    exposed_tool_name: requested.exposed_tool_name.clone(),
                    arguments_json: requested.arguments_json.clone(),
                    requested_at_ms: at,
                    since_ms: at,
                    status: if requested.started {
                        OpenStatus::Running
                    } else {
                        OpenStatus::Ready
                    },
                },
            );
            return;
        }
        let key = (user.to_owned(), id.to_owned());
        let terminal = matches!(
            event,
            Event::InvocationRejected(_)
                | Event::InvocationDenied(_)
                | Event::InvocationExpired(_)
                | Event::InvocationCompleted(_)
                | Event::InvocationFailed(_)
        );
        if terminal {
            self.open.remove(&key);
            return;
        }
        let Some(open) = self.open.get_mut(&key) else {
            return;
        };
        open.since_ms = at;
        open.status = match event {
            Event::InvocationAwaitingApproval(e) => OpenStatus::AwaitingApproval {
                expires_at_ms: e
                    .approval_expires_at
                    .as_ref()
                    .map_or(0, |t| millis(from_timestamp(t))),
            },
            Event::InvocationApproved(_) => OpenStatus::Approved,
            Event::InvocationStarted(_) => OpenStatus::Running,
            _ => open.status,
        };
    }

    pub fn get(&self, user: &str, invocation_id: &str) -> Option<&OpenInvocation> {
        self.open.get(&(user.to_owned(), invocation_id.to_owned()))
    }

    /// The user's invocations waiting for their approval, oldest first.
    pub fn pending_approvals_of(&self, user: &str) -> Vec<&OpenInvocation> {
        let mut pending: Vec<&OpenInvocation> = self
            .open
            .values()
            .filter(|o| o.user_id == user && o.approval_expires_at().is_some())
            .collect();
        pending.sort_by(|a, b| {
            (a.requested_at_ms, &a.invocation_id).cmp(&(b.requested_at_ms, &b.invocation_id))
        });
        pending
    }

    /// Approvals whose deadline has passed at `now`.
    pub fn expired_approvals(&self, now: SystemTime) -> Vec<&OpenInvocation> {
        self.open
            .values()
            .filter(|o| o.approval_expires_at().is_some_and(|at| at <= now))
            .collect()
    }

    /// Invocations allowed, approved or running whose status has not changed for `stale`:
    /// the process that was running them stopped.
    pub fn stalled(&self, now: SystemTime, stale: Duration) -> Vec<&OpenInvocation> {
        let limit =
            millis(now).saturating_sub(u64::try_from(stale.as_millis()).unwrap_or(u64::MAX));
        self.open
            .values()
            .filter(|o| o.approval_expires_at().is_none() && o.since_ms <= limit)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

/// The map as a list of entries in snapshots (JSON keys must be strings).
mod pairs {
    use std::collections::HashMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::OpenInvocation;

    pub fn serialize<S: Serializer>(
        map: &HashMap<(String, String), OpenInvocation>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let entries: Vec<&OpenInvocation> = map.values().collect();
        entries.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<HashMap<(String, String), OpenInvocation>, D::Error> {
        let entries = Vec::<OpenInvocation>::deserialize(deserializer)?;
        Ok(entries
            .into_iter()
            .map(|o| ((o.user_id.clone(), o.invocation_id.clone()), o))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use proto::v1 as pb;

    use super::*;
    use crate::time::to_timestamp;

    fn envelope(event: Event, at_ms: u64) -> Envelope {
        Envelope {
            occurred_at: Some(to_timestamp(UNIX_EPOCH + Duration::from_millis(at_ms))),
            event: Some(event),
            ..Envelope::default()
        }
    }

    fn requested(user: &str, id: &str) -> Event {
        Event::InvocationRequested(pb::InvocationRequested {
            invocation_id: id.into(),
            user_id: user.into(),
            server_id: "s".into(),
            tool_name: "create_issue".into(),
            exposed_tool_name: "x__create_issue".into(),
            arguments_json: "{}".into(),
            ..Default::default()
        })
    }

    #[test]
    fn pending_approvals_expire_and_finished_invocations_leave() {
        let mut open = OpenInvocations::default();
        open.apply(&envelope(requested("alice", "a1"), 1_000), "alice");
        open.apply(
            &envelope(
                Event::InvocationAwaitingApproval(pb::InvocationAwaitingApproval {
                    invocation_id: "a1".into(),
                    approval_expires_at: Some(to_timestamp(
                        UNIX_EPOCH + Duration::from_millis(5_000),
                    )),
                }),
                1_000,
            ),
            "alice",
        );
        open.apply(&envelope(requested("bob", "a1"), 1_100), "bob");
        assert_eq!(open.pending_approvals_of("alice").len(), 1);
        assert!(open.pending_approvals_of("bob").is_empty());
        assert!(
            open.expired_approvals(UNIX_EPOCH + Duration::from_millis(4_999))
                .is_empty()
        );
        assert_eq!(
            open.expired_approvals(UNIX_EPOCH + Duration::from_millis(5_000))
                .len(),
            1
        );
        let stalled = open.stalled(
            UNIX_EPOCH + Duration::from_millis(3_000),
            Duration::from_secs(1),
        );
        assert_eq!(stalled.len(), 1);
        assert_eq!(stalled[0].user_id, "bob");

        let snapshot = serde_json::to_string(&open).unwrap();
        let mut restored: OpenInvocations = serde_json::from_str(&snapshot).unwrap();
        restored.apply(
            &envelope(
                Event::InvocationExpired(pb::InvocationExpired {
                    invocation_id: "a1".into(),
                }),
                5_000,
            ),
            "alice",
        );
        assert!(restored.get("alice", "a1").is_none());
        assert!(restored.get("bob", "a1").is_some(), "bob's a1 stays open");
        assert_eq!(restored.len(), 1);
    }

    #[test]
    fn an_allowed_request_is_open_as_running_until_its_outcome() {
        let mut open = OpenInvocations::default();
        let started = match requested("carol", "c1") {
            Event::InvocationRequested(request) => {
                Event::InvocationRequested(pb::InvocationRequested {
                    started: true,
                    ..request
                })
            }
            _ => unreachable!(),
        };
        open.apply(&envelope(started, 1_000), "carol");
        assert_eq!(
            open.get("carol", "c1").map(|o| o.status),
            Some(OpenStatus::Running)
        );
        // Left by a stopped process: the sweeper finds it.
        assert_eq!(
            open.stalled(
                UNIX_EPOCH + Duration::from_millis(3_000),
                Duration::from_secs(1)
            )
            .len(),
            1
        );
        open.apply(
            &envelope(
                Event::InvocationCompleted(pb::InvocationCompleted {
                    invocation_id: "c1".into(),
                    ..Default::default()
                }),
                1_200,
            ),
            "carol",
        );
        assert!(open.is_empty());
    }
}
