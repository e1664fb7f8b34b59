//! Tessera's coordinator: runs federated learning sessions and swarms of user-written
//! tasks on one engine.
//!
//! A run is a loop of iterations ([`engine`]). A federated session's iteration is a
//! round: participants picked by the strategy among the nodes holding the dataset train
//! the global model, the built-in strategy aggregates (with differential privacy, secure or
//! hierarchical aggregation when asked), the coordinator evaluates, and the round limit is
//! the scheduler ([`fl`]). A swarm's iteration runs its flow of stages, each a module
//! placed on nodes by its task's method and the module's `needs`, and its scheduler's
//! answer ends the run ([`swarm`]). Both dispatch and collect through the same code, keep
//! their state at `sessions/<id>` after every iteration, and can be listed, stopped and
//! resumed alike ([`state`]). Model parameters and outputs travel as blobs; only digests
//! travel on the bus.
//!
//! The coordinator is written against the ports (bus, world state, blob store, package
//! source): the same code runs embedded and distributed. It does not know HTTP, SQLite,
//! NATS or wasmtime, and it does not parse swarm specs (`tessera-swarm` does).

mod config;
pub mod dataflow;
mod dispatch;
mod engine;
mod error;
mod evaluation;
mod fedbuff;
mod fl;
mod fold;
mod hierarchy;
pub mod logs;
mod placement;
mod retention;
mod scratch;
mod secure;
pub mod state;
mod streamed;
pub mod swarm;
mod windowed;

pub use config::{DpConfig, DpSide, Hierarchy, Region, SecAggSettings, SessionConfig, StrategySpec, SwarmFile};
pub use dispatch::reply_queue;
pub use engine::{Coordinator, Observer, Quiet};
pub use error::SessionError;
pub use fedbuff::FedBuffConfig;
pub use state::{
    Ending, REPORT_BLOCK, RunRecord, RunSummary, SessionResult, SessionState, new_session_id, state_key, stop_key,
};
pub use streamed::STREAM_FROM;
pub use swarm::{IterationReport, StageReport, SwarmResult, SwarmState};
pub use windowed::WINDOW_BUDGET;
