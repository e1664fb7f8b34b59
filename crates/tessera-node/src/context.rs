//! The task context a node gives running code.

use std::collections::BTreeMap;
use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tessera_core::wire::{Resources, WorldScope};
use tessera_ports::{ContextError, LogLevel, TaskContext, WorldState, retry_transient};

/// How long a module's world-state call waits out backend failures (a restarting server, a
/// cluster electing a new leader after losing one) before it fails.
const PATIENCE: Duration = Duration::from_secs(30);
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// A task's view of its node and run. World keys are scoped to the run:
/// `runs/<session>/globals/<key>` and `runs/<session>/results/<key>`, or, for a swarm
/// task, to its iteration: `runs/<session>/<scope>/globals/<key>` and
/// `runs/<session>/<scope>/results/<key>`, its own writes to globals staged under
/// `runs/<session>/<scope>/staged/<task id>/<key>` until the coordinator merges them.
pub struct NodeContext {
    pub(crate) node: String,
    pub(crate) session: String,
    pub(crate) task: String,
    pub(crate) datasets: Arc<BTreeMap<String, PathBuf>>,
    pub(crate) resources: Resources,
    pub(crate) world: Arc<dyn WorldState>,
    pub(crate) scope: Option<WorldScope>,
    pub(crate) logs: Option<Arc<TaskLog>>,
    /// The session and the account the task runs for (`<session> <account>`): the scope
    /// within which runtimes may share an instance between tasks.
    pub(crate) reuse: Option<String>,
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
    fn base(&self) -> String {
        match &self.scope {
            Some(s) => format!("runs/{}/{}", self.session, s.scope),
            None => format!("runs/{}", self.session),
        }
    }
    fn globals_key(&self, key: &str) -> String {
        format!("{}/globals/{key}", self.base())
    }
    /// In a swarm iteration, where this task's writes to globals go until the coordinator
    /// takes them: only a task that succeeded has its writes merged into the iteration's
    /// globals, so a task that failed, timed out or was retried elsewhere changes nothing.
    fn staged_key(&self, key: &str) -> Option<String> {
        self.scope.as_ref().map(|_| format!("{}/staged/{}/globals/{key}", self.base(), self.task))
    }
    /// Likewise for results: staged under the task's id (in the results store), with a
    /// marker in globals under the same path so the coordinator can list them.
    fn staged_results_key(&self, key: &str) -> Option<String> {
        self.scope.as_ref().map(|_| format!("{}/staged/{}/results/{key}", self.base(), self.task))
    }
    fn results_key(&self, key: &str) -> String {
        format!("{}/results/{key}", self.base())
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
    fn dataset_file(&self, name: &str) -> Option<PathBuf> {
        self.datasets.get(name).cloned()
    }
    fn reuse_scope(&self) -> Option<&str> {
        self.reuse.as_deref()
    }
    fn resources(&self) -> Resources {
        self.resources.clone()
    }
    /// A global: in a swarm iteration, what this task set, else the iteration's.
    async fn globals_get(&self, key: &str) -> Result<Option<Bytes>, ContextError> {
        if let Some(staged) = self.staged_key(key)
            && let Some(e) =
                retry_transient("reading a global", PATIENCE, || self.world.get(&staged)).await.map_err(ctx_err)?
        {
            return Ok(Some(e.value));
        }
        let key = self.globals_key(key);
        Ok(retry_transient("reading a global", PATIENCE, || self.world.get(&key))
            .await
            .map_err(ctx_err)?
            .map(|e| e.value))
    }
    async fn globals_set(&self, key: &str, value: Bytes) -> Result<(), ContextError> {
        let key = self.staged_key(key).unwrap_or_else(|| self.globals_key(key));
        retry_transient("writing a global", PATIENCE, || self.world.put(&key, value.clone()))
            .await
            .map(|_| ())
            .map_err(ctx_err)
    }
    async fn results_add(&self, key: &str, value: Bytes) -> Result<(), ContextError> {
        match self.staged_results_key(key) {
            Some(staged) => {
                retry_transient("adding a result", PATIENCE, || {
                    self.world.add_result(&staged, &self.node, value.clone())
                })
                .await
                .map_err(ctx_err)?;
                retry_transient("adding a result", PATIENCE, || self.world.put(&staged, Bytes::new()))
                    .await
                    .map(|_| ())
                    .map_err(ctx_err)
            }
            None => {
                let key = self.results_key(key);
                retry_transient("adding a result", PATIENCE, || self.world.add_result(&key, &self.node, value.clone()))
                    .await
                    .map_err(ctx_err)
            }
        }
    }
    /// Every node's results under `key`. In a swarm iteration: those of the tasks that
    /// succeeded in earlier stages (the coordinator merges a task's results only when it
    /// succeeded, so a task that failed, died or ran twice is never counted) and this
    /// task's own; one per node (the last it added), sorted by node.
    async fn results_select(&self, key: &str) -> Result<Vec<(String, Bytes)>, ContextError> {
        let rkey = self.results_key(key);
        let mut r = retry_transient("reading results", PATIENCE, || self.world.select_results(&rkey, None))
            .await
            .map_err(ctx_err)?;
        let Some(scope) = &self.scope else {
            return Ok(r.into_iter().map(|r| (r.node, r.value)).collect());
        };
        if let Some(own) = self.staged_results_key(key) {
            r.extend(
                retry_transient("reading results", PATIENCE, || self.world.select_results(&own, None))
                    .await
                    .map_err(ctx_err)?,
            );
        }
        let mut last: BTreeMap<String, Bytes> = BTreeMap::new();
        for e in r {
            if scope.peers.as_ref().is_none_or(|p| p.contains(&e.node)) {
                last.insert(e.node, e.value);
            }
        }
        Ok(last.into_iter().collect())
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
        if let Some(logs) = &self.logs {
            logs.push(level, message);
        }
    }
}

/// Most bytes of log lines kept per task (world state values are at most 1 MiB).
pub const TASK_LOG_BYTES: usize = 512 * 1024;

/// How often a running task's log is written out.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// One line of a task's log, as stored.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LogLine {
    /// Milliseconds since the Unix epoch.
    pub t: u64,
    /// `trace`, `debug`, `info`, `warn` or `error`.
    pub level: String,
    /// The message.
    pub msg: String,
}

/// What a task wrote with `self.log` (or the WebAssembly log), kept in world state under
/// `runs/<session>/logs/<task id>` as JSON lines, written out every second while the task
/// runs and when it ends: `tessera swarm logs` reads it, per node and iteration.
pub struct TaskLog {
    key: String,
    world: Arc<dyn WorldState>,
    inner: Mutex<LogInner>,
    /// Held while writing, so an older copy never lands after a newer one.
    writing: tokio::sync::Mutex<()>,
}

struct LogInner {
    text: String,
    truncated: bool,
    dirty: bool,
    last_flush: Instant,
}

/// The world key of a task's log.
pub fn log_key(session: &str, task_id: &str) -> String {
    format!("runs/{session}/logs/{task_id}")
}

impl TaskLog {
    pub(crate) fn new(session: &str, task_id: &str, world: Arc<dyn WorldState>) -> Option<Arc<TaskLog>> {
        let key = log_key(session, task_id);
        tessera_core::name::check_key("log key", &key).ok()?;
        Some(Arc::new(TaskLog {
            key,
            world,
            inner: Mutex::new(LogInner {
                text: String::new(),
                truncated: false,
                dirty: false,
                last_flush: Instant::now(),
            }),
            writing: tokio::sync::Mutex::new(()),
        }))
    }

    fn push(self: &Arc<Self>, level: LogLevel, message: &str) {
        let level = format!("{level:?}").to_lowercase();
        let line = LogLine { t: tessera_identity::now_ms(), level, msg: message.chars().take(8192).collect() };
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.truncated {
            return;
        }
        let mut text = serde_json::to_string(&line).unwrap_or_default();
        text.push('\n');
        if g.text.len() + text.len() > TASK_LOG_BYTES {
            g.truncated = true;
            let note =
                LogLine { t: line.t, level: "warn".into(), msg: "[the rest of this task's log was dropped]".into() };
            g.text.push_str(&serde_json::to_string(&note).unwrap_or_default());
            g.text.push('\n');
        } else {
            g.text.push_str(&text);
        }
        g.dirty = true;
        if g.last_flush.elapsed() >= FLUSH_EVERY
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            g.last_flush = Instant::now();
            drop(g);
            let me = self.clone();
            rt.spawn(async move { me.flush().await });
        }
    }

    /// Writes the log out if anything was added since the last time.
    pub(crate) async fn flush(&self) {
        let _writing = self.writing.lock().await;
        let text = {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if !g.dirty {
                return;
            }
            g.dirty = false;
            g.last_flush = Instant::now();
            g.text.clone()
        };
        if let Err(e) = self.world.put(&self.key, Bytes::from(text)).await {
            tracing::debug!(key = %self.key, "writing a task's log: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_ports::MemoryWorld;

    fn ctx(world: Arc<dyn WorldState>, node: &str, scope: Option<WorldScope>) -> NodeContext {
        NodeContext {
            node: node.into(),
            session: "s-1".into(),
            task: "t".into(),
            datasets: Arc::new(BTreeMap::new()),
            resources: Resources::default(),
            world,
            scope,
            logs: None,
            reuse: None,
        }
    }

    #[tokio::test]
    async fn a_swarm_task_writes_are_staged_under_its_task_id() {
        let world: Arc<dyn WorldState> = Arc::new(MemoryWorld::new());
        let scope = WorldScope { scope: "i1.a0".into(), peers: None };
        let task = |node: &str, id: &str| {
            let mut c = ctx(world.clone(), node, Some(scope.clone()));
            c.task = id.into();
            c
        };
        // What the coordinator merged from tasks that succeeded: one per node, the last.
        for (node, v) in [("b", "1"), ("a", "2"), ("b", "3")] {
            world.add_result("runs/s-1/i1.a0/results/w", node, Bytes::from(v)).await.unwrap();
        }
        let worker = task("c", "s-1.i1.a0.worker.c");
        worker.results_add("w", Bytes::from("4")).await.unwrap();
        // Staged under the task id, with a marker the coordinator lists.
        let staged = world.select_results("runs/s-1/i1.a0/staged/s-1.i1.a0.worker.c/results/w", None).await.unwrap();
        assert_eq!(staged.len(), 1);
        assert!(world.keys("runs/s-1/i1.a0/staged/s-1.i1.a0.worker.c/results/").await.unwrap().len() == 1);
        // The task sees its own; another task sees only what was merged.
        let own = worker.results_select("w").await.unwrap();
        assert_eq!(own.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        let other = task("d", "s-1.i1.a0.aggregator.d").results_select("w").await.unwrap();
        assert_eq!(other, [("a".to_owned(), Bytes::from("2")), ("b".to_owned(), Bytes::from("3"))]);
        // Another iteration's scope sees nothing of this one.
        let next = WorldScope { scope: "i2.a0".into(), peers: None };
        assert!(ctx(world.clone(), "agg", Some(next)).results_select("w").await.unwrap().is_empty());
        // A peer list, when given, restricts what select returns.
        let only_a = WorldScope { scope: "i1.a0".into(), peers: Some(vec!["a".into()]) };
        assert_eq!(ctx(world.clone(), "d", Some(only_a)).results_select("w").await.unwrap().len(), 1);
        // Outside swarms, every result in arrival order, written directly.
        let plain = ctx(world.clone(), "a", None);
        plain.results_add("w", Bytes::from("x")).await.unwrap();
        plain.results_add("w", Bytes::from("y")).await.unwrap();
        assert_eq!(plain.results_select("w").await.unwrap().len(), 2);
        // Globals likewise: staged for the coordinator; the task reads its own.
        world.put("runs/s-1/i1.a0/globals/g", Bytes::from("0")).await.unwrap();
        worker.globals_set("g", Bytes::from("1")).await.unwrap();
        assert_eq!(worker.globals_get("g").await.unwrap(), Some(Bytes::from("1")));
        assert_eq!(
            world.get("runs/s-1/i1.a0/staged/s-1.i1.a0.worker.c/globals/g").await.unwrap().unwrap().value,
            Bytes::from("1")
        );
        assert_eq!(task("d", "s-1.i1.a0.aggregator.d").globals_get("g").await.unwrap(), Some(Bytes::from("0")));
        plain.globals_set("g", Bytes::from("2")).await.unwrap();
        assert_eq!(world.get("runs/s-1/globals/g").await.unwrap().unwrap().value, Bytes::from("2"));
    }

    #[tokio::test]
    async fn task_logs_are_kept_and_bounded() {
        let world: Arc<dyn WorldState> = Arc::new(MemoryWorld::new());
        let log = TaskLog::new("s-1", "s-1.i1.a0.worker.n1", world.clone()).unwrap();
        let mut c = ctx(world.clone(), "n1", None);
        c.logs = Some(log.clone());
        c.log(LogLevel::Info, "hello");
        log.flush().await;
        let e = world.get(&log_key("s-1", "s-1.i1.a0.worker.n1")).await.unwrap().unwrap();
        let line: LogLine =
            serde_json::from_str(std::str::from_utf8(&e.value).unwrap().lines().next().unwrap()).unwrap();
        assert_eq!((line.level.as_str(), line.msg.as_str()), ("info", "hello"));
        let big = "x".repeat(8000);
        for _ in 0..200 {
            c.log(LogLevel::Warn, &big);
        }
        log.flush().await;
        let e = world.get(&log_key("s-1", "s-1.i1.a0.worker.n1")).await.unwrap().unwrap();
        assert!(e.value.len() <= TASK_LOG_BYTES + 200, "{}", e.value.len());
        assert!(std::str::from_utf8(&e.value).unwrap().contains("was dropped"));
        assert!(TaskLog::new("s-1", "../x", world).is_none());
    }
}
