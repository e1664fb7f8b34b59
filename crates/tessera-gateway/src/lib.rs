//! A node's HTTP gateway: the REST face of its actors, queues and blobs.
//!
//! `POST /api/v1/call` (also `/call`) calls a function of an actor by name, spawning it from
//! its module when it is not running and the gateway allows it, and forwarding the call to
//! the node that runs it when that is another node. `/api/v1/actors` launches (get-or-create),
//! lists and kills actors; `/api/v1/queues/{name}` puts, gets and counts messages of a bounded
//! queue on the bus; `/api/v1/blobs/{digest}` serves results too large to inline. Errors are
//! JSON `{"error": ..., "kind": ...}` with a status that says what went wrong.
//!
//! This crate is only the HTTP layer: actors live in `tessera_node::actors`, queues on the
//! bus port. It does not run modules or know any backend.

mod api;

pub use api::{Gateway, GatewayConfig, app};
pub use tessera_core::wire::{CallOutput, CallRequest, CallResponse, LaunchRequest};
