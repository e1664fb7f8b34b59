//! Tessera's node agent: the program that sits next to the data.
//!
//! A node has an id, detected (or configured) [resources](resources::detect), datasets
//! declared by name in its config (their contents never leave the node), and runtimes.
//! It pulls packages by digest from a [`PackageSource`](tessera_ports::PackageSource) into
//! a [verified cache](cache::PackageCache), takes tasks from its queue on the bus, runs
//! them, stores their outputs in the blob store and replies.
//!
//! The node is written against the ports only: the same code runs embedded (in-process
//! bus, world and blobs) and distributed. It does not know HTTP, SQLite, NATS or wasmtime.

pub mod actors;
pub mod builtin;
pub mod cache;
pub mod context;
mod entries;
pub mod node;
pub mod policy;
pub mod resources;
pub mod secagg;
mod serve;
pub mod slots;

pub use actors::{ActorError, ActorInfo, ActorSpec, Actors, actor_name};
pub use builtin::BuiltinRuntime;
pub use cache::PackageCache;
pub use node::{Node, NodeConfig, NodeError, NodePorts, Stats, Usage, list_nodes, task_queue};
pub use policy::{Grant, NodePolicy, Quota};
