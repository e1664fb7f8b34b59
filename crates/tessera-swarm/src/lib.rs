//! Swarms as users write them: tasks (a module, its config, and where it runs: `all`,
//! `any` or `random` nodes, a `maximum`, GPU, labels, datasets, a version split), the flow
//! of stages between them each iteration, the scheduler that ends the run, and the world's
//! initial globals, read from YAML (or the JSON the Python SDK's `Swarm` writes) with
//! errors naming the line; and placement: which nodes can run a task (its module's `needs`
//! against node records) and which of them it runs on.
//!
//! This crate is the vocabulary and the decisions, with no I/O: it does not run anything,
//! talk to nodes or read files. The coordinator (`tessera-coordinator`) runs swarms.

pub mod flow;
pub mod placement;
pub mod spec;

pub use flow::Edge;
pub use placement::{ModuleFacts, PlacementError, Requirement};
pub use spec::{Inputs, Maximum, Method, SpecError, SwarmSpec, TaskSpec};
