//! Shared helpers: building envelopes and opening each adapter on a fresh store.
use std::{any::Any, sync::Arc};

use eventlog::EventLog;
use proto::v1::{Envelope, ServerEnabled, envelope::Event};

/// An adapter under test, with whatever keeps its store alive (temp dir, prefix).
pub struct TestLog {
    pub log: Arc<dyn EventLog>,
    pub _guard: Box<dyn Any + Send>,
}

/// A small event for `server_id` with a fresh UUIDv7 id.
pub fn event(server_id: &str) -> Envelope {
    Envelope {
        event_id: uuid::Uuid::now_v7().to_string(),
        occurred_at: Some(proto::Timestamp {
            seconds: 1_764_000_000,
            nanos: 0,
        }),
        actor: None,
        correlation_id: String::new(),
        causation_id: String::new(),
        schema_version: proto::SCHEMA_VERSION,
        write_id: String::new(),
        event: Some(Event::ServerEnabled(ServerEnabled {
            server_id: server_id.to_owned(),
        })),
    }
}

pub fn subject(value: &str) -> eventlog::Subject {
    eventlog::Subject::parse(value).expect("valid subject")
}

/// The calling thread's `/proc` directory (`/proc/<pid>/task/<tid>`), where Linux has one.
pub fn this_thread_dir() -> Option<std::path::PathBuf> {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .map(|tail| std::path::Path::new("/proc").join(tail))
}
