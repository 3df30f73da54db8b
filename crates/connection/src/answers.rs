//! A callback answered twice says the same thing twice.
//!
//! A person who clicks Connect twice on the confirmation page sends the same answer twice;
//! the browser abandons the first request and shows the second's page. The first spends the
//! `state`, so without more the second would report an unknown authorization — over a
//! connection that the first made. So, in this process, answers with one `state` take turns
//! ([`AnswerLocks`]), and each answer that spent its `state` leaves a short-lived note of
//! what it came to (`oauth_state_answered/<state>`, as long-lived as a `state`): a later
//! answer with that `state`, on any process, shows the same outcome instead. Across
//! processes answers do not take turns, so an answer also marks that it is at work
//! (`oauth_state_answering/<state>`, two minutes) before it may spend the `state`: a repeat
//! that finds the `state` spent and no outcome noted yet, but that mark, waits for the
//! outcome (up to [`FIRST_ANSWER_WAIT`]) instead of calling the authorization unknown.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use domain::ServerId;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedMutexGuard, watch};

use crate::ConnectionError;

/// How long an answer marks itself at work: longer than an exchange and a first discovery
/// take at their timeouts.
pub(crate) const ANSWERING_TTL: std::time::Duration = std::time::Duration::from_secs(120);

/// How long a repeated answer waits for the outcome of one at work on another process.
pub(crate) const FIRST_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// What an answer that spent its `state` came to, as the vault keeps it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct AnswerNote {
    pub server_id: ServerId,
    pub user_id: String,
    /// `None`: connected. Else the words of the failure, fit for the browser that holds the
    /// `state` (Switchboard's own failures are not described).
    pub failure: Option<String>,
}

impl AnswerNote {
    pub fn of(server_id: ServerId, user_id: &str, result: &Result<(), ConnectionError>) -> Self {
        let failure = result.as_ref().err().map(|error| {
            if error.is_internal() {
                "Switchboard failed on its side while finishing it".to_owned()
            } else {
                error.to_string()
            }
        });
        AnswerNote {
            server_id,
            user_id: user_id.to_owned(),
            failure,
        }
    }

    /// The outcome a repeated answer reports.
    pub fn result(&self) -> Result<(), ConnectionError> {
        match &self.failure {
            None => Ok(()),
            Some(first) => Err(ConnectionError::AnsweredBefore {
                first: first.clone(),
            }),
        }
    }
}

/// One answer at a time per `state` in this process.
#[derive(Default)]
pub(crate) struct AnswerLocks {
    held: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds a `state`'s turn; the last holder removes the entry.
pub(crate) struct AnswerTurn<'a> {
    locks: &'a AnswerLocks,
    state: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl AnswerLocks {
    /// Waits for the turn of `state`, counting in `waits` when another answer had it.
    pub async fn turn(&self, state: &str, waits: &watch::Sender<u64>) -> AnswerTurn<'_> {
        let lock = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(state.to_owned())
            .or_default()
            .clone();
        let guard = match lock.clone().try_lock_owned() {
            Ok(guard) => guard,
            Err(_) => {
                waits.send_modify(|n| *n += 1);
                lock.lock_owned().await
            }
        };
        AnswerTurn {
            locks: self,
            state: state.to_owned(),
            guard: Some(guard),
        }
    }
}

impl Drop for AnswerTurn<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        // The map's and this turn's: nobody else waits (waiters clone under the map's lock).
        if held
            .get(&self.state)
            .is_some_and(|lock| Arc::strong_count(lock) <= 2)
        {
            held.remove(&self.state);
        }
        drop(self.guard.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_with_one_state_take_turns_and_leave_nothing_behind() {
        let locks = AnswerLocks::default();
        let waits = watch::Sender::new(0);
        let first = locks.turn("abc", &waits).await;
        let other_state = locks.turn("xyz", &waits).await;
        assert_eq!(*waits.borrow(), 0, "another state does not wait");
        let mut counted = waits.subscribe();
        let second = async {
            let _turn = locks.turn("abc", &waits).await;
        };
        let release = async {
            counted.wait_for(|n| *n == 1).await.expect("counted");
            drop(first);
        };
        tokio::join!(second, release);
        drop(other_state);
        assert!(
            locks.held.lock().unwrap().is_empty(),
            "no entry outlives its turns"
        );
    }

    #[test]
    fn a_note_repeats_the_outcome_without_switchboards_own_failures() {
        let server = ServerId::new();
        let connected = AnswerNote::of(server, "alice@example.com", &Ok(()));
        assert!(connected.result().is_ok());
        let internal = AnswerNote::of(
            server,
            "alice@example.com",
            &Err(ConnectionError::CredentialStore {
                reason: "vault entry connection/x failed".to_owned(),
            }),
        );
        let repeated = internal.result().expect_err("a failure");
        assert_eq!(repeated.code(), "authorization_answered");
        assert!(!repeated.to_string().contains("vault entry"), "{repeated}");
        let denied = AnswerNote::of(
            server,
            "alice@example.com",
            &Err(ConnectionError::TokenExchangeFailed {
                reason: "invalid_grant".to_owned(),
            }),
        );
        assert!(
            denied
                .result()
                .expect_err("a failure")
                .to_string()
                .contains("invalid_grant")
        );
    }
}
