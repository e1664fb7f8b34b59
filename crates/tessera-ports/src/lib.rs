//! Tessera's ports: the traits every service is written against, and their in-process
//! implementations.
//!
//! - [`Bus`]: named queues with put/get and explicit acknowledgement (at-least-once).
//! - [`WorldState`]: a run's shared state: globals as key-value with compare-and-set, and
//!   results appended per key and selected per node.
//! - [`BlobStore`]: content-addressed bytes (model parameters, packages).
//! - [`Runtime`] and [`TaskContext`]: how module code runs and what it sees.
//! - [`Membership`]: who is there: nodes announce themselves with a time-to-live.
//! - [`PackageSource`]: where a node gets packages (the hub, in-process or over HTTP).
//! - [`sink`]: a file written from a stream of chunks, hashed on the way, on a thread of its own.
//! - [`metrics`]: the process's Prometheus metrics, their names, and `/metrics`'s text.
//!
//! The in-process implementations ([`MemoryBus`], [`MemoryWorld`], [`MemoryBlobStore`],
//! [`FsBlobStore`], [`MemoryMembership`]) are the embedded default, not test doubles: a distributed
//! implementation (NATS JetStream) implements the same traits and passes the same
//! behaviour tests, which live in [`conformance`].
//!
//! This crate does not know SQLite, NATS or wasmtime, nor HTTP but for the `axum` feature's
//! `/metrics` handler and request-measuring middleware.

pub mod blob;
pub mod bus;
pub mod conformance;
pub mod membership;
pub mod metrics;
pub mod retry;
pub mod runtime;
pub mod sink;
pub mod source;
pub mod world;

pub use blob::{BlobError, BlobReader, BlobStore, BlobView, FsBlobStore, MemoryBlobStore, Verified, read_ref};
pub use bus::{Bus, BusError, Delivery, MemoryBus, Put, QueueBound, Subscription};
pub use membership::{Membership, MemoryMembership};
pub use retry::{Transient, retry_transient};
pub use runtime::{
    ContextError, Instance, Invocation, LogLevel, ModuleImage, Outputs, Runtime, RuntimeError, Stateless, TaskContext,
};
pub use source::{PackageSource, SourceError};
pub use world::{Entry, MemoryWorld, ResultEntry, WorldError, WorldState};

use std::sync::Arc;
use std::time::Duration;

/// The shared services a node or coordinator talks through: one backend, embedded or
/// distributed.
#[derive(Clone)]
pub struct Backend {
    /// Queues.
    pub bus: Arc<dyn Bus>,
    /// Run state.
    pub world: Arc<dyn WorldState>,
    /// Bytes by digest.
    pub blobs: Arc<dyn BlobStore>,
    /// Node registrations.
    pub members: Arc<dyn Membership>,
}

impl Backend {
    /// Everything in this process; members last `ttl` unless refreshed.
    pub fn in_process(ttl: Duration) -> Self {
        Backend {
            bus: Arc::new(MemoryBus::new()),
            world: Arc::new(MemoryWorld::new()),
            blobs: Arc::new(MemoryBlobStore::new()),
            members: Arc::new(MemoryMembership::new(ttl)),
        }
    }
}
