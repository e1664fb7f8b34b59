//! Tessera's ports: the traits every service is written against, and their in-process
//! implementations.
//!
//! - [`Bus`]: named queues with put/get and explicit acknowledgement (at-least-once).
//! - [`WorldState`]: a run's shared state: globals as key-value with compare-and-set, and
//!   results appended per key and selected per node.
//! - [`BlobStore`]: content-addressed bytes (model parameters, packages).
//! - [`Runtime`] and [`TaskContext`]: how module code runs and what it sees.
//! - [`PackageSource`]: where a node gets packages (the hub, in-process or over HTTP).
//!
//! The in-process implementations ([`MemoryBus`], [`MemoryWorld`], [`MemoryBlobStore`],
//! [`FsBlobStore`]) are the embedded default, not test doubles: a distributed
//! implementation (NATS JetStream) implements the same traits and passes the same
//! behaviour tests, which live in [`conformance`].
//!
//! This crate does not know HTTP, SQLite, NATS or wasmtime.

pub mod blob;
pub mod bus;
pub mod conformance;
pub mod runtime;
pub mod source;
pub mod world;

pub use blob::{BlobError, BlobStore, FsBlobStore, MemoryBlobStore};
pub use bus::{Bus, BusError, Delivery, MemoryBus};
pub use runtime::{ContextError, Invocation, LogLevel, ModuleImage, Outputs, Runtime, RuntimeError, TaskContext};
pub use source::{PackageSource, SourceError};
pub use world::{Entry, MemoryWorld, ResultEntry, WorldError, WorldState};
