//! The task context a node gives running code.

use std::collections::BTreeMap;
use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tessera_core::wire::Resources;
use tessera_ports::{ContextError, LogLevel, TaskContext, WorldState};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// A task's view of its node and run. World keys are scoped to the run:
/// `runs/<session>/globals/<key>` and `runs/<session>/results/<key>`.
pub struct NodeContext {
    pub(crate) node: String,
    pub(crate) session: String,
    pub(crate) task: String,
    pub(crate) datasets: Arc<BTreeMap<String, PathBuf>>,
    pub(crate) resources: Resources,
    pub(crate) world: Arc<dyn WorldState>,
}

fn ctx_err(e: impl std::fmt::Display) -> ContextError {
    ContextError(e.to_string())
}

impl NodeContext {
    fn dataset(&self, name: &str) -> Result<&PathBuf, ContextError> {
        self.datasets.get(name).ok_or_else(|| {
            ContextError(format!(
                "dataset {name:?} is not declared on node {} (it has: {})",
                self.node,
                self.datasets.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }
    fn globals_key(&self, key: &str) -> String {
        format!("runs/{}/globals/{key}", self.session)
    }
    fn results_key(&self, key: &str) -> String {
        format!("runs/{}/results/{key}", self.session)
    }
}

#[async_trait]
impl TaskContext for NodeContext {
    fn node(&self) -> &str {
        &self.node
    }
    fn datasets(&self) -> Vec<String> {
        self.datasets.keys().cloned().collect()
    }
    async fn dataset_size(&self, name: &str) -> Result<u64, ContextError> {
        let path = self.dataset(name)?;
        tokio::fs::metadata(path).await.map(|m| m.len()).map_err(|e| ctx_err(format!("dataset {name:?}: {e}")))
    }
    async fn dataset_read(&self, name: &str, offset: u64, len: u32) -> Result<Bytes, ContextError> {
        let path = self.dataset(name)?;
        let mut f = tokio::fs::File::open(path).await.map_err(|e| ctx_err(format!("dataset {name:?}: {e}")))?;
        f.seek(SeekFrom::Start(offset)).await.map_err(ctx_err)?;
        let mut buf = Vec::with_capacity(len as usize);
        f.take(u64::from(len)).read_to_end(&mut buf).await.map_err(ctx_err)?;
        Ok(Bytes::from(buf))
    }
    fn resources(&self) -> Resources {
        self.resources.clone()
    }
    async fn globals_get(&self, key: &str) -> Result<Option<Bytes>, ContextError> {
        Ok(self.world.get(&self.globals_key(key)).await.map_err(ctx_err)?.map(|e| e.value))
    }
    async fn globals_set(&self, key: &str, value: Bytes) -> Result<(), ContextError> {
        self.world.put(&self.globals_key(key), value).await.map(|_| ()).map_err(ctx_err)
    }
    async fn results_add(&self, key: &str, value: Bytes) -> Result<(), ContextError> {
        self.world.add_result(&self.results_key(key), &self.node, value).await.map_err(ctx_err)
    }
    async fn results_select(&self, key: &str) -> Result<Vec<(String, Bytes)>, ContextError> {
        let r = self.world.select_results(&self.results_key(key), None).await.map_err(ctx_err)?;
        Ok(r.into_iter().map(|r| (r.node, r.value)).collect())
    }
    fn log(&self, level: LogLevel, message: &str) {
        let (node, task) = (&self.node, &self.task);
        match level {
            LogLevel::Trace => tracing::trace!(node, task, "{message}"),
            LogLevel::Debug => tracing::debug!(node, task, "{message}"),
            LogLevel::Info => tracing::info!(node, task, "{message}"),
            LogLevel::Warn => tracing::warn!(node, task, "{message}"),
            LogLevel::Error => tracing::error!(node, task, "{message}"),
        }
    }
}
