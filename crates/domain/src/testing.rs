//! Given/when/then for aggregates: given these recorded events, when this is decided, then
//! exactly these events are recorded (or this error is returned).
//!
//! ```
//! use domain::testing::Scenario;
//! use domain::server::{self, ServerCommand, ServerState};
//! use domain::{ServerDirectory, ServerId};
//!
//! let id = ServerId::new();
//! Scenario::<ServerState>::given([])
//!     .when(|state| server::decide(state, id, ServerCommand::EnableServer, &ServerDirectory::default()))
//!     .then_error("server_not_found");
//! ```
//!
//! Compiled for this crate's tests and, with the `testing` feature, for other crates' tests.
use std::fmt;

use proto::v1::envelope::Event;

use crate::{Aggregate, DomainError};

/// The state an aggregate is in after its recorded history.
#[derive(Debug)]
pub struct Scenario<S> {
    state: S,
}

impl<S: Aggregate + fmt::Debug> Scenario<S> {
    /// Folds `events` (the aggregate's history) into a fresh state.
    pub fn given(events: impl IntoIterator<Item = Event>) -> Scenario<S> {
        let mut state = S::default();
        for event in events {
            state.apply(&event);
        }
        Scenario { state }
    }

    /// The state before `when`, for assertions on `evolve` itself.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// Decides one command against the state (the closure calls the module's `decide` with
    /// whatever context it needs).
    pub fn when(self, decide: impl FnOnce(&S) -> Result<Vec<Event>, DomainError>) -> Outcome<S> {
        let result = decide(&self.state);
        Outcome {
            state: self.state,
            result,
        }
    }
}

/// What `when` decided, to be checked with one of the `then` methods.
#[derive(Debug)]
#[must_use = "an outcome checks nothing until one of its `then` methods is called"]
pub struct Outcome<S> {
    state: S,
    result: Result<Vec<Event>, DomainError>,
}

impl<S: Aggregate + fmt::Debug> Outcome<S> {
    /// Asserts that exactly `expected` were decided, in order, and returns the state after
    /// them (so a test can go on, or check what `evolve` made of them).
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = Event>) -> S {
        let expected: Vec<Event> = expected.into_iter().collect();
        match self.result {
            Ok(events) => {
                assert_eq!(
                    events, expected,
                    "decided events differ from the expected ones"
                );
                let mut state = self.state;
                for event in &events {
                    state.apply(event);
                }
                state
            }
            Err(error) => panic!(
                "expected events {expected:?}, but decide failed with `{}`: {error}",
                error.code()
            ),
        }
    }

    /// Asserts that nothing changed: no events, no error.
    #[track_caller]
    pub fn then_nothing(self) -> S {
        self.then([])
    }

    /// Asserts that decide refused with the machine code `code`, and returns the error.
    #[track_caller]
    pub fn then_error(self, code: &str) -> DomainError {
        match self.result {
            Ok(events) => panic!("expected error `{code}`, but decide returned {events:?}"),
            Err(error) => {
                assert_eq!(error.code(), code, "unexpected error: {error}");
                error
            }
        }
    }

    /// The decided events, for checks `then` cannot express; panics on an error.
    #[track_caller]
    pub fn then_events(self) -> (Vec<Event>, S) {
        match self.result {
            Ok(events) => {
                let mut state = self.state;
                for event in &events {
                    state.apply(event);
                }
                (events, state)
            }
            Err(error) => panic!("decide failed with `{}`: {error}", error.code()),
        }
    }
}
