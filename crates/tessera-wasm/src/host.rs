//! The host side of an instance's store: the task's context and what the `tessera:module`
//! world imports from it (datasets, world state, a log), WASI, the memory limiter; and the
//! context an idle instance holds between runs.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tessera_ports::{LogLevel, TaskContext};
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::tessera::module::{local, log as wlog, world_state};

/// Counts a store's linear memory against its limit.
pub(crate) struct MemoryLimiter {
    pub(crate) max: u64,
    pub(crate) total: u64,
    pub(crate) hit: bool,
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let grow = (desired - current) as u64;
        if self.total + grow > self.max {
            self.hit = true;
            return Err(wasmtime::format_err!("memory limit of {} bytes reached", self.max));
        }
        self.total += grow;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// What a store holds for its instance.
pub(crate) struct Host {
    /// The run's (or instance's) `/scratch`, removed with the store, and its share of a
    /// `/datasets` view.
    pub(crate) _scratch: (Option<tempfile::TempDir>, Arc<tempfile::TempDir>),
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    /// The task of the call running, or [`Parked`] while the instance is idle.
    pub(crate) ctx: Arc<dyn TaskContext>,
    pub(crate) rt: tokio::runtime::Handle,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Largest single dataset read a module may ask for.
const MAX_READ: u32 = 16 << 20;

impl local::Host for Host {
    fn node(&mut self) -> String {
        self.ctx.node().to_owned()
    }
    fn datasets(&mut self) -> Vec<String> {
        self.ctx.datasets()
    }
    fn dataset_size(&mut self, name: String) -> Result<u64, String> {
        // A dataset the context names a file for is read here, on the run's own thread, as
        // the node's context would (a fresh look at the path each call), without the
        // context's asynchronous file calls: a thread hand-off each.
        match self.ctx.dataset_file(&name) {
            Some(path) => std::fs::metadata(path).map(|m| m.len()).map_err(|e| format!("dataset {name:?}: {e}")),
            None => self.rt.block_on(self.ctx.dataset_size(&name)).map_err(|e| e.to_string()),
        }
    }
    fn dataset_read(&mut self, name: String, offset: u64, len: u32) -> Result<Vec<u8>, String> {
        use std::os::unix::fs::FileExt;
        let len = len.min(MAX_READ);
        let Some(path) = self.ctx.dataset_file(&name) else {
            return self
                .rt
                .block_on(self.ctx.dataset_read(&name, offset, len))
                .map(|b| b.to_vec())
                .map_err(|e| e.to_string());
        };
        let fail = |e: std::io::Error| format!("dataset {name:?}: {e}");
        let file = std::fs::File::open(path).map_err(fail)?;
        // Sized to what the file holds past `offset` (at most `len`), and read with
        // positioned reads: a read of a whole small file is one allocation and one system
        // call, and a huge `len` past the file's end allocates nothing. A file that shrank
        // meanwhile yields what it still holds.
        let left = file.metadata().map_err(fail)?.len().saturating_sub(offset).min(u64::from(len));
        let mut buf = vec![0u8; left as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(fail(e)),
            }
        }
        buf.truncate(filled);
        Ok(buf)
    }
    fn resources(&mut self) -> local::NodeResources {
        let r = self.ctx.resources();
        local::NodeResources { cpu: r.cpu, memory: r.memory.0, gpu: r.gpu, disk: r.disk.0 }
    }
}

impl world_state::Host for Host {
    fn globals_get(&mut self, key: String) -> Result<Option<Vec<u8>>, String> {
        self.rt.block_on(self.ctx.globals_get(&key)).map(|v| v.map(|b| b.to_vec())).map_err(|e| e.to_string())
    }
    fn globals_set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        self.rt.block_on(self.ctx.globals_set(&key, Bytes::from(value))).map_err(|e| e.to_string())
    }
    fn results_add(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        self.rt.block_on(self.ctx.results_add(&key, Bytes::from(value))).map_err(|e| e.to_string())
    }
    fn results_select(&mut self, key: String) -> Result<Vec<world_state::NodeResult>, String> {
        self.rt
            .block_on(self.ctx.results_select(&key))
            .map(|v| {
                v.into_iter().map(|(node, value)| world_state::NodeResult { node, value: value.to_vec() }).collect()
            })
            .map_err(|e| e.to_string())
    }
}

/// The context an idle instance holds between runs: it serves nothing (no instance runs
/// while idle), and holds nothing of the last task's.
pub(crate) struct Parked;

#[async_trait]
impl TaskContext for Parked {
    fn node(&self) -> &str {
        ""
    }
    fn datasets(&self) -> Vec<String> {
        Vec::new()
    }
    async fn dataset_size(&self, name: &str) -> Result<u64, tessera_ports::ContextError> {
        Err(parked(name))
    }
    async fn dataset_read(&self, name: &str, _: u64, _: u32) -> Result<Bytes, tessera_ports::ContextError> {
        Err(parked(name))
    }
    fn resources(&self) -> tessera_core::wire::Resources {
        tessera_core::wire::Resources::default()
    }
    async fn globals_get(&self, key: &str) -> Result<Option<Bytes>, tessera_ports::ContextError> {
        Err(parked(key))
    }
    async fn globals_set(&self, key: &str, _: Bytes) -> Result<(), tessera_ports::ContextError> {
        Err(parked(key))
    }
    async fn results_add(&self, key: &str, _: Bytes) -> Result<(), tessera_ports::ContextError> {
        Err(parked(key))
    }
    async fn results_select(&self, key: &str) -> Result<Vec<(String, Bytes)>, tessera_ports::ContextError> {
        Err(parked(key))
    }
    fn log(&self, _: LogLevel, _: &str) {}
}

fn parked(what: &str) -> tessera_ports::ContextError {
    tessera_ports::ContextError(format!("{what}: the instance is idle and serves no task"))
}

impl wlog::Host for Host {
    fn log(&mut self, level: wlog::Level, message: String) {
        let level = match level {
            wlog::Level::Trace => LogLevel::Trace,
            wlog::Level::Debug => LogLevel::Debug,
            wlog::Level::Info => LogLevel::Info,
            wlog::Level::Warn => LogLevel::Warn,
            wlog::Level::Error => LogLevel::Error,
        };
        let message: String = message.chars().take(8192).collect();
        self.ctx.log(level, &message);
    }
}

impl crate::bindings::tessera::module::types::Host for Host {}
