//! Why a run stops with an error.

use tessera_node::NodeError;
use tessera_ports::{BlobError, BusError, SourceError, WorldError};

/// Why a session stopped.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The session's config is wrong.
    #[error("session config: {0}")]
    Config(String),
    /// The worker package could not be resolved.
    #[error("worker module: {0}")]
    Module(#[from] SourceError),
    /// Not enough nodes.
    #[error("{0}")]
    Participants(String),
    /// A round ended with fewer updates than the minimum.
    #[error("round {round}: {got} update(s) arrived, the minimum is {min}; failures: {failures}")]
    RoundFailed {
        /// The round.
        round: u32,
        /// Updates that arrived.
        got: usize,
        /// The minimum.
        min: usize,
        /// Who failed and why.
        failures: String,
    },
    /// Updates could not be combined.
    #[error("aggregation: {0}")]
    Aggregate(String),
    /// The coordinator's own node failed (init or evaluation).
    #[error("coordinator node: {0}")]
    Node(#[from] NodeError),
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// World state failed.
    #[error(transparent)]
    World(#[from] WorldError),
    /// The blob store failed.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// No session has this id.
    #[error("no session {0} in world state")]
    Unknown(String),
    /// A swarm file was refused.
    #[error("{0}")]
    Spec(#[from] tessera_swarm::SpecError),
    /// A dataflow context failed.
    #[error(transparent)]
    Flow(#[from] tessera_dataflow::DataflowError),
    /// A task cannot be placed on the nodes there are.
    #[error("{0}")]
    Placement(#[from] tessera_swarm::PlacementError),
    /// A stage of a swarm ended with fewer successful nodes than its task needs.
    #[error("iteration {iteration}, task {task}: {got} node(s) succeeded, the minimum is {min}; failures: {failures}")]
    StageFailed {
        /// The iteration.
        iteration: u32,
        /// The task.
        task: String,
        /// Nodes that succeeded.
        got: usize,
        /// The minimum.
        min: usize,
        /// Who failed and why.
        failures: String,
    },
    /// Someone asked the run to stop (`tessera swarm stop`).
    #[error("the run was asked to stop")]
    Stopped,
}
