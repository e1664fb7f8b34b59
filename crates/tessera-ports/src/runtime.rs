//! How module code runs ([`Runtime`]) and what it sees while it runs ([`TaskContext`]).

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::Value;
use tessera_core::manifest::Manifest;
use tessera_core::wire::Resources;
use tessera_core::{Digest, RuntimeKind};

/// A verified, unpacked package ready to run.
#[derive(Clone, Debug)]
pub struct ModuleImage {
    /// The package digest.
    pub digest: Digest,
    /// Its manifest.
    pub manifest: Manifest,
    /// The folder it was unpacked into (read-only by convention).
    pub root: PathBuf,
}

impl ModuleImage {
    /// The path of the entry file.
    pub fn entry_path(&self) -> PathBuf {
        self.root.join(&self.manifest.entry)
    }
}

/// One run of a module: its config and named inputs.
#[derive(Clone, Debug, Default)]
pub struct Invocation {
    /// The config (the module's default merged with overrides).
    pub config: Value,
    /// Named inputs.
    pub inputs: Vec<(String, Bytes)>,
    /// A time limit for this run shorter than the runtime's own, if any (a call's
    /// time-out): the runtime stops the run then.
    pub timeout: Option<std::time::Duration>,
}

/// Named outputs of a run.
pub type Outputs = Vec<(String, Bytes)>;

/// Why a run failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// The module could not be loaded (bad wasm, missing export, unknown builtin).
    #[error("cannot load module: {0}")]
    Load(String),
    /// The run took longer than its time limit and was stopped.
    #[error("stopped: the run exceeded its time limit of {limit_ms} ms")]
    TimeLimit {
        /// The limit.
        limit_ms: u64,
    },
    /// The run tried to use more memory than its limit and was stopped.
    #[error("stopped: the run exceeded its memory limit of {limit_bytes} bytes")]
    MemoryLimit {
        /// The limit.
        limit_bytes: u64,
    },
    /// The run gave more output (or passed more data to the node in one call) than its
    /// limit allows; its outputs were refused.
    #[error("stopped: the run's output exceeded its limit of {limit_bytes} bytes")]
    OutputLimit {
        /// The limit.
        limit_bytes: u64,
    },
    /// The module trapped (a crash: panic, out-of-bounds access, unreachable).
    #[error("module crashed: {0}")]
    Trap(String),
    /// The module ran and returned an error.
    #[error("module failed: {0}")]
    Module(String),
    /// The node does not offer this runtime.
    #[error("this node has no {0} runtime")]
    Unsupported(RuntimeKind),
    /// The instance had stopped before the call reached it (its process was killed from
    /// outside): the call had no effect, and a new instance may take it.
    #[error("the instance had stopped before the call: {0}")]
    Gone(String),
}

/// Log levels for module logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    /// Very detailed.
    Trace,
    /// Detailed.
    Debug,
    /// Normal.
    Info,
    /// Something odd.
    Warn,
    /// Something failed.
    Error,
}

/// Why a context call failed (reported to the module, which may carry on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ContextError(pub String);

/// What running code sees: its node's datasets (read-only), resources, the run's world
/// state, and a log.
#[async_trait]
pub trait TaskContext: Send + Sync {
    /// The node running the task.
    fn node(&self) -> &str;
    /// Names of the datasets this task may read.
    fn datasets(&self) -> Vec<String>;
    /// Size of a dataset in bytes.
    async fn dataset_size(&self, name: &str) -> Result<u64, ContextError>;
    /// Reads up to `len` bytes of a dataset from `offset`.
    async fn dataset_read(&self, name: &str, offset: u64, len: u32) -> Result<Bytes, ContextError>;
    /// The file behind a dataset this task may read, for runtimes that mount datasets
    /// read-only (WebAssembly's `/datasets/<name>`); `None` when it has none or may not.
    fn dataset_file(&self, _name: &str) -> Option<std::path::PathBuf> {
        None
    }
    /// The node's resources.
    fn resources(&self) -> Resources;
    /// Reads a run global.
    async fn globals_get(&self, key: &str) -> Result<Option<Bytes>, ContextError>;
    /// Writes a run global.
    async fn globals_set(&self, key: &str, value: Bytes) -> Result<(), ContextError>;
    /// Adds a result under `key` for this node.
    async fn results_add(&self, key: &str, value: Bytes) -> Result<(), ContextError>;
    /// Results under `key` from every node, as (node, value).
    async fn results_select(&self, key: &str) -> Result<Vec<(String, Bytes)>, ContextError>;
    /// Writes a log line attributed to the task.
    fn log(&self, level: LogLevel, message: &str);
    /// Who the task runs for, as far as sharing an instance goes: runs whose contexts give
    /// equal scopes (and the same node and datasets) may share an instance of a module
    /// that allows it (`reuse: session` in its manifest). `None` (the default): this
    /// task's runs share nothing. A node gives the task's session and the account that
    /// signed it, so two accounts never share an instance (it counts every unsigned task
    /// as one account, `unsigned`: a node that takes them already gives any unsigned sender
    /// the session's world state and all its datasets).
    fn reuse_scope(&self) -> Option<&str> {
        None
    }
}

/// Runs modules of one runtime kind.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Which runtime this is.
    fn kind(&self) -> RuntimeKind;
    /// Runs a module once.
    async fn run(
        &self,
        module: &ModuleImage,
        invocation: Invocation,
        ctx: Arc<dyn TaskContext>,
    ) -> Result<Outputs, RuntimeError>;
    /// Starts a module as a long-lived instance that keeps its state between calls (an
    /// actor's replica). `None`: this runtime has no such instances, and each call is a
    /// fresh run.
    async fn start(
        &self,
        _module: &ModuleImage,
        _ctx: Arc<dyn TaskContext>,
    ) -> Result<Option<Box<dyn Instance>>, RuntimeError> {
        Ok(None)
    }
    /// The libraries this runtime offers modules, `name==version` (for the `python`
    /// runtime, the interpreter's installed distributions); matched against modules'
    /// `needs.libraries` when tasks are placed. Called once, when a node starts.
    fn libraries(&self) -> Vec<String> {
        Vec::new()
    }
    /// Whether this runtime installs what a module's `needs.libraries` asks for that it
    /// does not offer (the `python` runtime with per-module environments): such a node
    /// is placed whatever libraries a module needs, and refuses at launch what cannot be
    /// installed.
    fn installs_libraries(&self) -> bool {
        false
    }
}

/// A started module: one replica of an actor. Calls run one at a time.
#[async_trait]
pub trait Instance: Send {
    /// Runs one call.
    async fn call(&mut self, invocation: Invocation) -> Result<Outputs, RuntimeError>;
    /// False once the instance cannot take more calls (it crashed or broke a limit): the
    /// caller starts a new one.
    fn healthy(&self) -> bool {
        true
    }
}

/// An instance whose every call is a fresh run (for runtimes without long-lived
/// instances).
pub struct Stateless {
    /// The runtime.
    pub runtime: Arc<dyn Runtime>,
    /// The module.
    pub module: ModuleImage,
    /// What runs see.
    pub ctx: Arc<dyn TaskContext>,
}

#[async_trait]
impl Instance for Stateless {
    async fn call(&mut self, invocation: Invocation) -> Result<Outputs, RuntimeError> {
        self.runtime.run(&self.module, invocation, self.ctx.clone()).await
    }
}
