//! The HTTP API end to end: the app on a free port over real HTTP, on both stores (JSONL file
//! and JetStream on a real nats-server).
mod audit;
mod connections;
mod errors;
mod invocations;
mod mcp;
mod openapi;
mod permissions;
mod servers;
mod servers_add;
mod stream;
mod support;
mod tools;
