//! Tessera's coordinator: runs federated learning sessions.
//!
//! A session picks participants each round among the registered nodes that hold the
//! session's dataset, sends each a task (the worker package by digest, the global model as
//! a blob), waits for replies until everyone answered or the round's time-out, aggregates
//! the updates with FedAvg weighted by example counts, evaluates the new global model on
//! the coordinator's held-out data, and records the session's state in world state after
//! every round. Model parameters travel as safetensors blobs; only digests travel on the
//! bus.
//!
//! The coordinator is written against the ports (bus, world state, blob store, package
//! source): the same code runs embedded and distributed. It does not know HTTP, SQLite,
//! NATS or wasmtime.

mod session;

pub use session::{
    Coordinator, DpConfig, DpSide, Hierarchy, Observer, Quiet, Region, SecAggSettings, SessionConfig, SessionError,
    SessionResult, SessionState, StrategySpec, new_session_id, reply_queue, state_key,
};
