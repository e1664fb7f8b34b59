//! A node's HTTP gateway: the REST face of its actors, queues and blobs.
//!
//! `POST /api/v1/call` (also `/call`) calls a function of an actor by name, spawning it from
//! its module when it is not running and the gateway allows it, and forwarding the call to
//! the node that runs it when that is another node. `/api/v1/actors` launches (get-or-create),
//! lists and kills actors; `/api/v1/queues/{name}` puts, gets and counts messages of a queue
//! on the bus, bounded in messages and bytes; `/api/v1/blobs/{digest}` serves results too
//! large to inline. Errors are JSON `{"error": ..., "kind": ...}` with a status that says
//! what went wrong. `/openapi.json` documents every route; the router is built from the
//! same declarations, so the two cannot drift apart.
//!
//! Every request passes one authentication layer (the signature envelope, checked from the
//! headers before the body is read), and every route one authorization step
//! ([`authz`]): the signer's grant for the module (or queue), then the module's `access`
//! role; calls and their outputs belong to the key that made them.
//!
//! This crate is only the HTTP layer: actors live in `tessera_node::actors`, queues on the
//! bus port. It does not run modules or know any backend.

mod actors;
mod api;
pub mod authz;
mod blobs;
mod calls;
mod forward;
mod queues;

pub use api::{ApiError, Gateway, GatewayConfig, app, openapi};
pub use calls::check_call;
pub use tessera_core::wire::{CallOutput, CallRequest, CallResponse, LaunchRequest};
