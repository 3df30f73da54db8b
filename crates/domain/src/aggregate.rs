//! What every aggregate state has in common: it starts as `Default` (no events) and folds
//! recorded events in, one at a time, without IO.
//!
//! `decide` is a free function per aggregate module, because the facts it needs besides the
//! state differ (the server directory, the time, the invocation's policy decision).
use proto::v1::envelope::Event;

/// An aggregate state, rebuilt by folding its events.
pub trait Aggregate: Default {
    /// Folds one recorded event in. Pure and total: events of other aggregates are ignored.
    fn apply(&mut self, event: &Event);

    /// `apply`, by value.
    fn evolve(mut self, event: &Event) -> Self
    where
        Self: Sized,
    {
        self.apply(event);
        self
    }

    /// The state after `events`, from nothing.
    fn from_events<'a>(events: impl IntoIterator<Item = &'a Event>) -> Self
    where
        Self: Sized,
    {
        let mut state = Self::default();
        for event in events {
            state.apply(event);
        }
        state
    }
}
