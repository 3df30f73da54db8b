//! JSONL file adapter (embedded default). Being written.
