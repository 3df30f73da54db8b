//! The open invocations: every invocation without its terminal event yet, folded from the
//! invocations log, and where each invocation finished in the last claim window
//! ([`CLAIM_WINDOW`] unless configured). What the
//! invocation path needs to keep in memory and nothing more: an open invocation is a few
//! hundred bytes, a finished one three numbers, so the size follows the invocations in flight
//! and the rate of finished ones, however long the history.
//!
//! It answers a user's pending approvals (with the tool and arguments they decide on), tells
//! the invoker's sweeper which approvals passed their deadline and which calls were left
//! running by a process that stopped, and finds an invocation's events in its user's subject
//! ([`OpenInvocations::locate`]) — which is also what upholds the claim on an invocation id
//! once the log's dedupe window has passed.
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::v1::{Envelope, envelope::Event};
use serde::{Deserialize, Serialize};

use crate::invocation::invocation_id_of;
use crate::time::from_timestamp;

/// How long a finished invocation stays known by default: a request repeating its id within
/// this is answered with its outcome and never runs again, and a look-up finds it. Retried
/// and duplicated tool calls arrive within seconds or minutes (a call's deadline is at most
/// ten); after six hours an id is taken to be new. The cost grows with it: a restart folds
/// this much of the invocations log again (about 3.6 µs an event on JetStream, 1.1 µs on
/// JSONL: `--bench startup`), and memory holds about 70 B per finished invocation. A
/// deployment whose orchestrators retry later sets its own ([`OpenInvocations::set_claim_window`]).
pub const CLAIM_WINDOW: Duration = Duration::from_secs(6 * 60 * 60);

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
    /// Recorded with payload capture (and by earlier builds for invocations awaiting
    /// approval); else empty: the invoker keeps an awaiting invocation's arguments in the
    /// vault, and checks them against the digest.
    pub arguments_json: String,
    #[serde(default)]
    pub arguments_sha256: String,
    /// Where its `InvocationRequested` is in the invocations log.
    pub requested_sequence: u64,
    pub requested_at_ms: u64,
    /// When the status last changed.
    pub since_ms: u64,
    pub status: OpenStatus,
}

impl OpenInvocation {
    pub fn requested_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.requested_at_ms)
    }

    /// When its status last changed.
    pub fn since(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.since_ms)
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

/// Where a finished invocation's events are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinishedInvocation {
    pub requested_sequence: u64,
    /// Its terminal event's.
    pub outcome_sequence: u64,
    finished_at_ms: u64,
}

/// What [`OpenInvocations::locate`] knows of an invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Located<'a> {
    Open(&'a OpenInvocation),
    Finished(FinishedInvocation),
}

impl Located<'_> {
    pub fn requested_sequence(&self) -> u64 {
        match self {
            Located::Open(open) => open.requested_sequence,
            Located::Finished(finished) => finished.requested_sequence,
        }
    }
}

/// The projection: open invocations by user and invocation id, and the finished ones of the
/// claim window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenInvocations {
    /// Key: [`invocation_key`] of the user id and invocation id (ids are unique per user),
    /// so that a look-up by the two strings allocates nothing.
    #[serde(with = "pairs")]
    open: HashMap<u128, OpenInvocation>,
    /// Not in snapshots: hours of finished invocations would make every checkpoint large.
    /// A restored projection folds the log again from [`OpenInvocations::replay_from`].
    #[serde(skip)]
    finished: Finished,
    /// `(start of an hour, first sequence seen in it)` from just before the claim window on:
    /// where to fold from to know the window's finished invocations again.
    anchors: VecDeque<(u64, u64)>,
    /// The claim window in milliseconds: a setting, not state, so not in snapshots (a
    /// restored projection is given it again).
    #[serde(skip, default = "default_claim_window_ms")]
    claim_window_ms: u64,
}

impl Default for OpenInvocations {
    fn default() -> Self {
        OpenInvocations {
            open: HashMap::new(),
            finished: Finished::default(),
            anchors: VecDeque::new(),
            claim_window_ms: default_claim_window_ms(),
        }
    }
}

fn default_claim_window_ms() -> u64 {
    millis_of(CLAIM_WINDOW)
}

/// The finished invocations of the claim window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Finished {
    /// Key: [`invocation_key`] of `(user id, invocation id)`: 16 bytes, not two strings.
    by_key: HashMap<u128, FinishedInvocation>,
    /// The keys in the order they finished, to forget them after the window.
    order: VecDeque<(u64, u128)>,
}

/// The key of an invocation, open or finished: 128 bits of the SHA-256 of its user and id
/// (ids are only unique per user), the same in every process and after every restart.
pub fn invocation_key(user: &str, invocation_id: &str) -> u128 {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(&(user.len() as u64).to_be_bytes());
    context.update(user.as_bytes());
    context.update(invocation_id.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&context.finish().as_ref()[..16]);
    u128::from_be_bytes(bytes)
}

fn millis_of(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl OpenInvocations {
    /// Folds one invocation event in, stored at `sequence`; `user` is the user of the event's
    /// subject (later events carry only the invocation id, and ids are unique per user only).
    /// Events of invocations not open here are ignored.
    pub fn apply(&mut self, envelope: &Envelope, user: &str, sequence: u64) {
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
        let window_start = at.saturating_sub(self.claim_window_ms);
        self.forget_finished_before(window_start);
        self.anchor(at, sequence, window_start);
        if let Event::InvocationRequested(requested) = event {
            let key = invocation_key(&requested.user_id, &requested.invocation_id);
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
                    arguments_sha256: requested.arguments_sha256.clone(),
                    requested_sequence: sequence,
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
        let key = invocation_key(user, id);
        let terminal = matches!(
            event,
            Event::InvocationRejected(_)
                | Event::InvocationDenied(_)
                | Event::InvocationExpired(_)
                | Event::InvocationCompleted(_)
                | Event::InvocationFailed(_)
        );
        if terminal {
            if let Some(open) = self.open.remove(&key) {
                self.finished.by_key.insert(
                    key,
                    FinishedInvocation {
                        requested_sequence: open.requested_sequence,
                        outcome_sequence: sequence,
                        finished_at_ms: at,
                    },
                );
                self.finished.order.push_back((at, key));
            }
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

    /// Sets how long finished invocations stay known (at least a second). Set it before the
    /// first event is folded: it decides what is kept from then on. A restored projection
    /// given a longer window than it was folded with knows the longer window fully once
    /// that much time has passed (its anchors reach back only as far as the old window).
    pub fn set_claim_window(&mut self, window: Duration) {
        self.claim_window_ms = millis_of(window).max(1_000);
    }

    /// How long finished invocations stay known.
    pub fn claim_window(&self) -> Duration {
        Duration::from_millis(self.claim_window_ms)
    }

    pub fn get(&self, user: &str, invocation_id: &str) -> Option<&OpenInvocation> {
        self.open.get(&invocation_key(user, invocation_id))
    }

    /// The user's invocation `invocation_id`, open or finished within the claim window.
    pub fn locate(&self, user: &str, invocation_id: &str) -> Option<Located<'_>> {
        let key = invocation_key(user, invocation_id);
        if let Some(open) = self.open.get(&key) {
            return Some(Located::Open(open));
        }
        self.finished
            .by_key
            .get(&key)
            .map(|finished| Located::Finished(*finished))
    }

    /// How many finished invocations are remembered.
    pub fn finished_len(&self) -> usize {
        self.finished.by_key.len()
    }

    /// Where a restored snapshot folds the log from again to know the finished invocations
    /// of the claim window (events it folded before change nothing else; 0: from the start).
    pub fn replay_from(&self) -> u64 {
        self.anchors.front().map_or(0, |&(_, sequence)| sequence)
    }

    fn anchor(&mut self, at: u64, sequence: u64, window_start: u64) {
        const HOUR_MS: u64 = 60 * 60 * 1000;
        let hour = at - at % HOUR_MS;
        if self.anchors.back().is_none_or(|&(last, _)| hour > last) {
            self.anchors.push_back((hour, sequence));
        }
        // Keep the last anchor at or before the window's start: folding from it covers it.
        while self
            .anchors
            .get(1)
            .is_some_and(|&(next, _)| next <= window_start)
        {
            self.anchors.pop_front();
        }
    }

    fn forget_finished_before(&mut self, limit_ms: u64) {
        let finished = &mut self.finished;
        while let Some(&(at, key)) = finished.order.front() {
            if at >= limit_ms {
                break;
            }
            finished.order.pop_front();
            // Unless it finished again since (an id reused after the window).
            if finished
                .by_key
                .get(&key)
                .is_some_and(|f| f.finished_at_ms == at)
            {
                finished.by_key.remove(&key);
            }
        }
    }

    /// The user's invocations waiting for their approval, oldest first.
    pub fn pending_approvals_of(&self, user: &str) -> Vec<&OpenInvocation> {
        let mut pending: Vec<&OpenInvocation> = self
            .pending_approvals()
            .filter(|o| o.user_id == user)
            .collect();
        pending.sort_by(|a, b| {
            (a.requested_at_ms, &a.invocation_id).cmp(&(b.requested_at_ms, &b.invocation_id))
        });
        pending
    }

    /// How many of `user`'s invocations wait for their approval.
    pub fn pending_approval_count(&self, user: &str) -> usize {
        self.pending_approvals()
            .filter(|o| o.user_id == user)
            .count()
    }

    /// Every user's invocations waiting for their approval, in no order.
    pub fn pending_approvals(&self) -> impl Iterator<Item = &OpenInvocation> {
        self.open
            .values()
            .filter(|o| o.approval_expires_at().is_some())
    }

    /// Approvals whose deadline has passed at `now`.
    pub fn expired_approvals(&self, now: SystemTime) -> Vec<&OpenInvocation> {
        self.open
            .values()
            .filter(|o| o.approval_expires_at().is_some_and(|at| at <= now))
            .collect()
    }

    /// Invocations approved or running whose status has not changed for `stale`: the process
    /// that was running them stopped (their call may have been made).
    pub fn stalled(&self, now: SystemTime, stale: Duration) -> Vec<&OpenInvocation> {
        self.unchanged_for(now, stale, |status| {
            matches!(status, OpenStatus::Approved | OpenStatus::Running)
        })
    }

    /// Invocations requested but neither rejected, started nor waiting for approval for
    /// `stale`: the process that claimed them stopped before it recorded what followed the
    /// claim (which it does at once), so their call was never made.
    pub fn unsettled(&self, now: SystemTime, stale: Duration) -> Vec<&OpenInvocation> {
        self.unchanged_for(now, stale, |status| status == OpenStatus::Ready)
    }

    /// The open invocations whose status `matches` and has not changed for `stale`.
    fn unchanged_for(
        &self,
        now: SystemTime,
        stale: Duration,
        matches: impl Fn(OpenStatus) -> bool,
    ) -> Vec<&OpenInvocation> {
        let limit = millis(now).saturating_sub(millis_of(stale));
        self.open
            .values()
            .filter(|o| matches(o.status) && o.since_ms <= limit)
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

    use super::{OpenInvocation, invocation_key};

    pub fn serialize<S: Serializer>(
        map: &HashMap<u128, OpenInvocation>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let entries: Vec<&OpenInvocation> = map.values().collect();
        entries.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<HashMap<u128, OpenInvocation>, D::Error> {
        let entries = Vec::<OpenInvocation>::deserialize(deserializer)?;
        Ok(entries
            .into_iter()
            .map(|o| (invocation_key(&o.user_id, &o.invocation_id), o))
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
            arguments_sha256: String::new(),
            ..Default::default()
        })
    }

    #[test]
    fn pending_approvals_expire_and_finished_invocations_leave() {
        let mut open = OpenInvocations::default();
        open.apply(&envelope(requested("alice", "a1"), 1_000), "alice", 1);
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
            5,
        );
        open.apply(&envelope(requested("bob", "a1"), 1_100), "bob", 2);
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
        // Bob's a1 was claimed and nothing followed: never called, not a stalled call.
        let later = UNIX_EPOCH + Duration::from_millis(3_000);
        assert!(open.stalled(later, Duration::from_secs(1)).is_empty());
        let unsettled = open.unsettled(later, Duration::from_secs(1));
        assert_eq!(unsettled.len(), 1);
        assert_eq!(unsettled[0].user_id, "bob");
        assert!(
            open.unsettled(later, Duration::from_secs(2)).is_empty(),
            "claimed 1.9 s before: not yet"
        );

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
            6,
        );
        assert!(restored.get("alice", "a1").is_none());
        assert!(restored.get("bob", "a1").is_some(), "bob's a1 stays open");
        assert_eq!(restored.len(), 1);
    }

    #[test]
    fn an_approved_invocation_left_unstarted_is_stalled_not_unsettled() {
        let mut open = OpenInvocations::default();
        open.apply(&envelope(requested("dan", "d1"), 1_000), "dan", 1);
        open.apply(
            &envelope(
                Event::InvocationApproved(pb::InvocationApproved {
                    invocation_id: "d1".into(),
                    approved_by: "dan".into(),
                }),
                1_100,
            ),
            "dan",
            2,
        );
        let later = UNIX_EPOCH + Duration::from_millis(3_000);
        // Its call goes out while its start is recorded: it may have been made.
        assert!(open.unsettled(later, Duration::from_secs(1)).is_empty());
        assert_eq!(open.stalled(later, Duration::from_secs(1)).len(), 1);
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
        open.apply(&envelope(started, 1_000), "carol", 4);
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
            7,
        );
        assert!(open.is_empty());
    }

    fn completed(id: &str) -> Event {
        Event::InvocationCompleted(pb::InvocationCompleted {
            invocation_id: id.into(),
            ..Default::default()
        })
    }

    #[test]
    fn a_finished_invocation_is_located_for_the_claim_window_and_then_forgotten() {
        let mut open = OpenInvocations::default();
        open.apply(&envelope(requested("dan", "d1"), 1_000), "dan", 10);
        assert_eq!(
            open.locate("dan", "d1").map(|l| l.requested_sequence()),
            Some(10)
        );
        open.apply(&envelope(completed("d1"), 1_500), "dan", 12);
        let finished = FinishedInvocation {
            requested_sequence: 10,
            outcome_sequence: 12,
            finished_at_ms: 1_500,
        };
        assert_eq!(open.locate("dan", "d1"), Some(Located::Finished(finished)));
        // Ids are per user: another user's d1 is not dan's.
        assert_eq!(open.locate("erin", "d1"), None);
        assert_eq!(open.locate("dan", "d2"), None);

        // Still known just inside the window; forgotten once an event is past it.
        let window = millis_of(CLAIM_WINDOW);
        open.apply(&envelope(requested("dan", "d2"), 1_500 + window), "dan", 20);
        assert!(open.locate("dan", "d1").is_some());
        open.apply(&envelope(completed("d2"), 1_501 + window), "dan", 21);
        assert_eq!(open.locate("dan", "d1"), None);
        assert_eq!(open.finished_len(), 1, "d2 is the one remembered");
        assert!(open.is_empty());
    }

    #[test]
    fn a_configured_claim_window_decides_how_long_a_finished_invocation_is_known() {
        const MINUTE: u64 = 60 * 1000;
        let mut open = OpenInvocations::default();
        open.set_claim_window(Duration::from_secs(10 * 60));
        assert_eq!(open.claim_window(), Duration::from_secs(600));
        open.apply(&envelope(requested("hal", "h1"), MINUTE), "hal", 1);
        open.apply(&envelope(completed("h1"), MINUTE), "hal", 2);
        open.apply(&envelope(requested("hal", "h2"), 11 * MINUTE), "hal", 3);
        assert!(
            open.locate("hal", "h1").is_some(),
            "just inside ten minutes"
        );
        open.apply(&envelope(completed("h2"), 11 * MINUTE + 1), "hal", 4);
        assert_eq!(
            open.locate("hal", "h1"),
            None,
            "ten minutes later: forgotten"
        );
        assert!(open.locate("hal", "h2").is_some());

        // A setting, not state: a snapshot does not carry it, the restored one is given it.
        let restored: OpenInvocations =
            serde_json::from_str(&serde_json::to_string(&open).unwrap()).unwrap();
        assert_eq!(restored.claim_window(), CLAIM_WINDOW);
        // Less than a second would forget an outcome before a retry could ask for it.
        open.set_claim_window(Duration::from_millis(5));
        assert_eq!(open.claim_window(), Duration::from_secs(1));
    }

    /// A snapshot leaves the finished invocations out (hours of them would make every
    /// checkpoint large) and says where to fold from to know them again; folding the events
    /// from there a second time changes nothing else.
    #[test]
    fn a_restored_snapshot_relearns_the_windows_finished_invocations_by_folding_again() {
        const HOUR: u64 = 60 * 60 * 1000;
        let window = millis_of(CLAIM_WINDOW);
        let mut log = Vec::new();
        let mut sequence = 0;
        let mut record = |log: &mut Vec<(Envelope, &'static str, u64)>, event, at, user| {
            sequence += 1;
            log.push((envelope(event, at), user, sequence));
        };
        // f0 finished a window and a half ago; f1 and f2 within the window; o1 is open.
        record(&mut log, requested("fay", "f0"), 10 * HOUR, "fay");
        record(&mut log, completed("f0"), 10 * HOUR + 1, "fay");
        record(
            &mut log,
            requested("fay", "f1"),
            10 * HOUR + window / 2 + 5,
            "fay",
        );
        record(&mut log, completed("f1"), 10 * HOUR + window / 2 + 6, "fay");
        record(
            &mut log,
            requested("fay", "o1"),
            10 * HOUR + window + HOUR,
            "fay",
        );
        record(
            &mut log,
            requested("gus", "f2"),
            10 * HOUR + window + 2 * HOUR,
            "gus",
        );
        record(
            &mut log,
            completed("f2"),
            10 * HOUR + window + 2 * HOUR + 1,
            "gus",
        );
        let mut live = OpenInvocations::default();
        for (envelope, user, sequence) in &log {
            live.apply(envelope, user, *sequence);
        }
        assert_eq!(live.finished_len(), 2, "f0 is past the window");

        let snapshot = serde_json::to_string(&live).unwrap();
        let mut restored: OpenInvocations = serde_json::from_str(&snapshot).unwrap();
        assert_eq!(restored.finished_len(), 0, "not in the snapshot");
        assert!(restored.locate("fay", "o1").is_some(), "open ones are");
        // The window starts at hour 12; the last anchor at or before it is hour 10's.
        let from = restored.replay_from();
        assert_eq!(from, 1);
        for (envelope, user, sequence) in log.iter().filter(|(_, _, s)| *s >= from) {
            restored.apply(envelope, user, *sequence);
        }
        assert_eq!(restored, live);
        assert_eq!(restored.locate("fay", "f1"), live.locate("fay", "f1"));
        assert_eq!(restored.locate("fay", "f0"), None);

        // A window later the anchors before the new window's start are gone but one.
        live.apply(
            &envelope(completed("o1"), 10 * HOUR + 2 * window + 3 * HOUR),
            "fay",
            8,
        );
        assert_eq!(
            live.replay_from(),
            6,
            "the last anchor at or before the new window's start"
        );
    }
}
