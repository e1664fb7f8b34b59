//! Prestarted instances (what Ray's worker pool does with `prestart`): after a module's
//! instance starts, the runtime starts one more in the background, contained the same
//! way, and keeps it until the module's next start takes it or it has been idle too long.
//! A warm start is then the time to hand over a process that already said `hello`.
//!
//! A spare has imported its module but not run `setup()` (that happens at its first call),
//! and serves no task until it is taken: until then its context answers every request
//! with an error and drops its log lines.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tessera_core::Digest;
use tessera_core::wire::Resources;
use tessera_ports::{ContextError, LogLevel, TaskContext};

use crate::ProcessInstance;

/// Modules with a spare at once; the longest idle goes first past it.
const MAX_SPARES: usize = 16;

/// Which spare fits a start: the module's digest, the class it runs, and the needs it
/// was started under (JSON: a task may carry more than the manifest declares, and a spare
/// started with less memory or fewer libraries does not fit it).
pub(crate) type Key = (Digest, Option<String>, String);

/// A task context that can be handed to a task after its process started.
pub(crate) struct SwapCtx {
    node: String,
    inner: RwLock<Arc<dyn TaskContext>>,
}

impl SwapCtx {
    /// A context serving no task yet, on node `node`.
    pub(crate) fn idle(node: &str) -> Arc<SwapCtx> {
        Arc::new(SwapCtx { node: node.to_owned(), inner: RwLock::new(Arc::new(Idle)) })
    }

    /// Hands the process to the task of `ctx`.
    pub(crate) fn set(&self, ctx: Arc<dyn TaskContext>) {
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = ctx;
    }

    fn current(&self) -> Arc<dyn TaskContext> {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[async_trait]
impl TaskContext for SwapCtx {
    fn node(&self) -> &str {
        &self.node
    }
    fn datasets(&self) -> Vec<String> {
        self.current().datasets()
    }
    async fn dataset_size(&self, name: &str) -> Result<u64, ContextError> {
        self.current().dataset_size(name).await
    }
    async fn dataset_read(&self, name: &str, offset: u64, len: u32) -> Result<Bytes, ContextError> {
        self.current().dataset_read(name, offset, len).await
    }
    fn dataset_file(&self, name: &str) -> Option<std::path::PathBuf> {
        self.current().dataset_file(name)
    }
    fn resources(&self) -> Resources {
        self.current().resources()
    }
    async fn globals_get(&self, key: &str) -> Result<Option<Bytes>, ContextError> {
        self.current().globals_get(key).await
    }
    async fn globals_set(&self, key: &str, value: Bytes) -> Result<(), ContextError> {
        self.current().globals_set(key, value).await
    }
    async fn results_add(&self, key: &str, value: Bytes) -> Result<(), ContextError> {
        self.current().results_add(key, value).await
    }
    async fn results_select(&self, key: &str) -> Result<Vec<(String, Bytes)>, ContextError> {
        self.current().results_select(key).await
    }
    fn log(&self, level: LogLevel, message: &str) {
        self.current().log(level, message);
    }
}

/// The context of a spare no task has taken.
struct Idle;

fn not_yet() -> ContextError {
    ContextError("this module process serves no task yet (it was started ahead of one)".into())
}

#[async_trait]
impl TaskContext for Idle {
    fn node(&self) -> &str {
        ""
    }
    fn datasets(&self) -> Vec<String> {
        Vec::new()
    }
    async fn dataset_size(&self, _: &str) -> Result<u64, ContextError> {
        Err(not_yet())
    }
    async fn dataset_read(&self, _: &str, _: u64, _: u32) -> Result<Bytes, ContextError> {
        Err(not_yet())
    }
    fn resources(&self) -> Resources {
        Resources::default()
    }
    async fn globals_get(&self, _: &str) -> Result<Option<Bytes>, ContextError> {
        Err(not_yet())
    }
    async fn globals_set(&self, _: &str, _: Bytes) -> Result<(), ContextError> {
        Err(not_yet())
    }
    async fn results_add(&self, _: &str, _: Bytes) -> Result<(), ContextError> {
        Err(not_yet())
    }
    async fn results_select(&self, _: &str) -> Result<Vec<(String, Bytes)>, ContextError> {
        Err(not_yet())
    }
    fn log(&self, _: LogLevel, message: &str) {
        tracing::debug!(target: "tessera_process::spare", "{message}");
    }
}

/// The spares of one runtime.
pub(crate) struct Spares {
    idle: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    ready: HashMap<Key, (u64, ProcessInstance, Arc<SwapCtx>)>,
    /// Spares being started.
    pending: std::collections::HashSet<Key>,
}

impl std::fmt::Debug for Spares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spares").field("idle", &self.idle).field("ready", &self.ready()).finish()
    }
}

impl Spares {
    pub(crate) fn new(idle: Duration) -> Self {
        Spares { idle, inner: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many spares are ready.
    pub(crate) fn ready(&self) -> usize {
        self.lock().ready.len()
    }

    /// Whether to start a spare for `key`: not when one is ready or being started (then
    /// it is marked as being started).
    pub(crate) fn begin(&self, key: &Key) -> bool {
        let mut inner = self.lock();
        if inner.ready.contains_key(key) || inner.pending.contains(key) {
            return false;
        }
        inner.pending.insert(key.clone());
        true
    }

    /// A spare for `key` could not be started.
    pub(crate) fn abandon(&self, key: &Key) {
        self.lock().pending.remove(key);
    }

    /// The spare for `key`, if one is ready.
    pub(crate) fn take(&self, key: &Key) -> Option<(ProcessInstance, Arc<SwapCtx>)> {
        self.lock().ready.remove(key).map(|(_, inst, ctx)| (inst, ctx))
    }

    /// Keeps `inst` as the spare for `key` (replacing an older one), until taken or idle
    /// for the runtime's idle time.
    pub(crate) fn put(self: &Arc<Self>, key: Key, inst: ProcessInstance, ctx: Arc<SwapCtx>) {
        let dropped;
        let generation;
        {
            let mut inner = self.lock();
            inner.pending.remove(&key);
            inner.next += 1;
            generation = inner.next;
            let mut out = inner.ready.insert(key.clone(), (generation, inst, ctx)).map(|(_, i, _)| i);
            if out.is_none() && inner.ready.len() > MAX_SPARES {
                let oldest = inner.ready.iter().min_by_key(|(_, (g, _, _))| *g).map(|(k, _)| k.clone());
                out = oldest.and_then(|k| inner.ready.remove(&k)).map(|(_, i, _)| i);
            }
            dropped = out;
        }
        // Ended outside the lock (dropping an instance shuts it down in the background).
        drop(dropped);
        let spares = Arc::downgrade(self);
        let idle = self.idle;
        tokio::spawn(async move {
            tokio::time::sleep(idle).await;
            let Some(spares) = spares.upgrade() else { return };
            let expired = {
                let mut inner = spares.lock();
                match inner.ready.get(&key) {
                    Some((g, _, _)) if *g == generation => inner.ready.remove(&key),
                    _ => None,
                }
            };
            if let Some((_, inst, _)) = expired {
                inst.shutdown().await;
            }
        });
    }
}
