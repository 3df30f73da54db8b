//! One integration-test binary for the event store: the conformance suite runs against both
//! adapters (so they cannot drift apart), plus each adapter's own failure tests.
mod conformance;
mod jetstream;
mod jsonl;
mod jsonl_pacing;
mod jsonl_recovery;
mod jsonl_retention;
mod projection;
mod support;
