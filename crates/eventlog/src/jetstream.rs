//! JetStream adapter (distributed deployment). Being written.
