//! Dataflows as DFFML describes them: **definitions** (typed kinds of values),
//! **operations** (module functions whose inputs and outputs are bound to definitions,
//! optionally run only when boolean conditions hold), wired by definition or explicitly,
//! read from flow files with errors naming the line ([`spec`]); and the **orchestrator**
//! that runs every parameter set of a context once, with conditions, locks and
//! validation ([`orchestrator`]); and the flow as a graph for people ([`graph`]).
//!
//! This crate is the vocabulary and the semantics. It does not reach nodes or modules
//! itself: operations run through an [`orchestrator::OperationNetwork`].

pub mod graph;
pub mod orchestrator;
pub mod spec;

pub use orchestrator::{ContextResult, DataflowError, Item, OperationNetwork, Orchestrator, ResultCache, cache_key};
pub use spec::{DataFlow, Definition, Operation, Origin, Output, Primitive, SpecError};
