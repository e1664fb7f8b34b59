//! Tessera's WebAssembly runtime: runs module components with wasmtime, sandboxed, with a
//! time limit and a memory limit per run.
//!
//! A module is a WebAssembly component implementing the `tessera:module` world
//! (`wit/tessera.wit`): it exports `run(config, inputs) -> result<outputs, string>` and
//! imports the task context (its node's datasets, read-only; the run's world state; a log).
//! It gets WASI's standard streams (captured: stdout is a run's log, up to 1 MiB each), a
//! scratch folder of its own at `/scratch` when its manifest declares disk space
//! (`needs.storage`; read-write, one per run or instance, removed with it), the datasets
//! its task may read at `/datasets/<name>` (read-only), and nothing else: no other files, no sockets (TCP, UDP and name lookups are refused), no
//! environment. A dataset is mounted by a hard link to its file in a folder made for the
//! run beside the scratch folder, so it must be on the same file system as the runtime's
//! scratch root ([`WasmRuntime::with_scratch_root`]); one that is not is still read through
//! the context imports (`local.dataset-read`), and the run's log says so.
//!
//! Limits: the time limit uses epoch interruption (a ticker thread advances the engine's
//! epoch every [`TICK`]); the memory limit is enforced by a resource limiter on every
//! linear-memory growth. A run that breaches either is stopped with
//! [`RuntimeError::TimeLimit`] or [`RuntimeError::MemoryLimit`]; its store is thrown away
//! and the runtime carries on with the next run.
//!
//! Instances: a run gets a fresh instance, unless its module allows reuse (`reuse:
//! session`) and an instance an earlier run with the same reuse scope (for a node: the
//! same session and account), node and dataset files left idle is at hand (see [`warm`]);
//! an actor's replica ([`WasmInstance`]) keeps one instance for its life.
//!
//! This is the only crate that knows wasmtime.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tessera_core::{Digest, Reuse, RuntimeKind};
use tessera_ports::{Invocation, LogLevel, ModuleImage, Outputs, Runtime, RuntimeError, TaskContext};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, Trap, UpdateDeadline};
use wasmtime_wasi::WasiCtx;

mod host;
mod pipe;
pub mod warm;

use host::{Host, MemoryLimiter, Parked};
use pipe::RunPipe;
use warm::{Live, Pipes, WarmKey, WarmPool};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "module",
    });
}

/// How often the epoch advances; the time limit's resolution.
pub const TICK: Duration = Duration::from_millis(10);

/// Limits for each run.
#[derive(Clone, Debug)]
pub struct WasmLimits {
    /// Linear memory a run may hold, in bytes. An instance reused between runs
    /// (`reuse: session`) keeps what earlier runs grew, so one holding more than half of
    /// this is not reused.
    pub max_memory: u64,
    /// Wall time a run may take.
    pub max_time: Duration,
    /// Total size of a run's outputs, in bytes; it also bounds the data a module hands
    /// the node in one host call (a world value, a log line). Past it the run ends with
    /// [`RuntimeError::OutputLimit`] (the gateway's `limit`).
    pub max_output_bytes: u64,
}

impl Default for WasmLimits {
    fn default() -> Self {
        WasmLimits { max_memory: 1 << 30, max_time: Duration::from_secs(300), max_output_bytes: 256 << 20 }
    }
}

/// Whether a module's runs get a `/scratch` folder: it declares disk space
/// (`needs.storage`).
fn wants_scratch(module: &ModuleImage) -> bool {
    module.manifest.needs.storage.0 > 0
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the WebAssembly runtime: {0}")]
pub struct StartError(String);

struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Inner {
    engine: Engine,
    linker: Linker<Host>,
    compiled: Mutex<HashMap<Digest, bindings::ModulePre<Host>>>,
    /// Held while compiling, so nodes sharing this runtime that start the same module at
    /// once compile it once (the compiler uses every core by itself).
    compiling: Mutex<()>,
    limits: WasmLimits,
    /// Where runs' `/scratch` and `/datasets` folders are made.
    scratch_root: std::path::PathBuf,
    /// `/datasets` views by the files they link, and when each was made: read-only, so
    /// runs share them for [`VIEW_TTL`].
    views: Mutex<HashMap<Vec<DatasetKey>, View>>,
    /// Instances idle between runs of modules that allow reuse.
    warm: Arc<Mutex<WarmPool>>,
    _ticker: Ticker,
}

/// A shared `/datasets` view and when it was made.
type View = (std::time::Instant, Arc<tempfile::TempDir>);

/// Dataset views kept at most (each a folder of hard links).
const VIEWS: usize = 64;

/// How long runs share a dataset view before a new one is made: short, so a replaced or
/// withdrawn file is let go of within a minute and no view sits idle long enough for a
/// temporary-files cleaner to remove it from under the runtime.
const VIEW_TTL: Duration = Duration::from_secs(60);

/// A dataset as a view links it: its name, its file, and the file's identity and
/// modification (a file replaced or rewritten gets a new view).
#[derive(Clone, PartialEq, Eq, Hash)]
struct DatasetKey {
    name: String,
    file: std::path::PathBuf,
    stamp: Option<(u64, u64, std::time::SystemTime)>,
}

/// Runs WebAssembly modules.
#[derive(Clone)]
pub struct WasmRuntime {
    inner: Arc<Inner>,
}

impl WasmRuntime {
    /// A runtime with the given per-run limits.
    pub fn new(limits: WasmLimits) -> Result<Self, StartError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.max_wasm_stack(2 << 20);
        let engine = Engine::new(&config).map_err(|e| StartError(e.to_string()))?;
        let mut linker: Linker<Host> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| StartError(e.to_string()))?;
        bindings::Module::add_to_linker::<Host, HasSelf<Host>>(&mut linker, |h| h)
            .map_err(|e| StartError(e.to_string()))?;

        let stop = Arc::new(AtomicBool::new(false));
        let weak = engine.weak();
        let flag = stop.clone();
        let warm = Arc::new(Mutex::new(WarmPool::default()));
        let pool = Arc::downgrade(&warm);
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                let mut ticks = 0u32;
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    match weak.upgrade() {
                        Some(e) => e.increment_epoch(),
                        None => break,
                    }
                    ticks = ticks.wrapping_add(1);
                    // About once a second: let go of instances idle too long, on a thread
                    // of their own (dropping a store unmaps its memory and removes its
                    // scratch folder: never a delay to the ticks every time limit needs).
                    if ticks.is_multiple_of(100)
                        && let Some(pool) = pool.upgrade()
                    {
                        let gone = pool.lock().unwrap_or_else(|p| p.into_inner()).expire();
                        if !gone.is_empty()
                            && let Err(e) =
                                std::thread::Builder::new().name("wasm-expire".into()).spawn(move || drop(gone))
                        {
                            tracing::warn!("cannot start a thread to drop idle instances: {e}");
                        }
                    }
                }
            })
            .map_err(|e| StartError(e.to_string()))?;
        Ok(WasmRuntime {
            inner: Arc::new(Inner {
                engine,
                linker,
                compiled: Mutex::new(HashMap::new()),
                compiling: Mutex::new(()),
                limits,
                scratch_root: std::env::temp_dir(),
                views: Mutex::new(HashMap::new()),
                warm,
                _ticker: Ticker { stop },
            }),
        })
    }

    /// Makes runs' `/scratch` and `/datasets` folders under `dir` (default: the system's
    /// temporary folder). Put it on the file system the node's datasets are on: they are
    /// mounted by hard links. Call it on a new runtime, before it is cloned (a clone keeps
    /// the folder it had).
    #[must_use]
    pub fn with_scratch_root(mut self, dir: std::path::PathBuf) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.scratch_root = dir,
            None => tracing::warn!("the WebAssembly runtime is shared already: its scratch root stays"),
        }
        self
    }

    /// The limits each run gets.
    pub fn limits(&self) -> &WasmLimits {
        &self.inner.limits
    }

    /// Compiles a component (or takes it from the cache).
    fn prepare(&self, module: &ModuleImage) -> Result<bindings::ModulePre<Host>, RuntimeError> {
        let cached = || self.inner.compiled.lock().unwrap_or_else(|p| p.into_inner()).get(&module.digest).cloned();
        if let Some(pre) = cached() {
            return Ok(pre);
        }
        let _one_at_a_time = self.inner.compiling.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pre) = cached() {
            return Ok(pre);
        }
        let path = module.entry_path();
        let bytes =
            std::fs::read(&path).map_err(|e| RuntimeError::Load(format!("cannot read {}: {e}", path.display())))?;
        let pre = self.compile(&bytes)?;
        self.inner.compiled.lock().unwrap_or_else(|p| p.into_inner()).insert(module.digest, pre.clone());
        Ok(pre)
    }

    fn compile(&self, bytes: &[u8]) -> Result<bindings::ModulePre<Host>, RuntimeError> {
        let component = Component::new(&self.inner.engine, bytes)
            .map_err(|e| RuntimeError::Load(format!("not a valid WebAssembly component: {e:#}")))?;
        let pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .map_err(|e| RuntimeError::Load(format!("the component's imports cannot be satisfied: {e:#}")))?;
        bindings::ModulePre::new(pre)
            .map_err(|e| RuntimeError::Load(format!("the component does not export the tessera:module world: {e:#}")))
    }

    /// The dataset files the task of `ctx` may read, by name, each with its file's identity
    /// and modification: what its `/datasets` view links.
    fn dataset_keys(ctx: &Arc<dyn TaskContext>) -> Vec<DatasetKey> {
        let mut key: Vec<DatasetKey> = Vec::new();
        for name in ctx.datasets() {
            let Some(file) = ctx.dataset_file(&name) else { continue };
            // Dataset names are identifiers (the node checks them): no separators.
            if name.contains(['/', '\\']) || name.starts_with('.') {
                continue;
            }
            let stamp = std::fs::metadata(&file).ok().and_then(|m| {
                use std::os::unix::fs::MetadataExt;
                Some((m.dev(), m.ino(), m.modified().ok()?))
            });
            key.push(DatasetKey { name, file, stamp });
        }
        key
    }

    /// A folder holding a hard link to each dataset file in `key` (the task's, from
    /// [`Self::dataset_keys`]), named by the dataset: what a run sees at `/datasets`. A
    /// dataset whose file cannot be linked (another file system) is left out, and the
    /// task's log says so. Runs reading the same files share one view (it is mounted
    /// read-only).
    fn dataset_view(
        &self,
        ctx: &Arc<dyn TaskContext>,
        key: Vec<DatasetKey>,
    ) -> Result<Arc<tempfile::TempDir>, RuntimeError> {
        if let Some((made, view)) = self.inner.views.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && made.elapsed() < VIEW_TTL
        {
            return Ok(view.clone());
        }
        let view = tempfile::Builder::new()
            .prefix("tessera-wasm-datasets-")
            .tempdir_in(&self.inner.scratch_root)
            .map_err(|e| RuntimeError::Load(format!("cannot make the datasets folder: {e}")))?;
        let mut complete = true;
        for k in &key {
            if let Err(e) = std::fs::hard_link(&k.file, view.path().join(&k.name)) {
                complete = false;
                ctx.log(
                    LogLevel::Warn,
                    &format!(
                        "dataset {} is not mounted at /datasets/{} ({e}); read it with local.dataset-read",
                        k.name, k.name
                    ),
                );
            }
        }
        let view = Arc::new(view);
        // A view missing a dataset is not shared: the next run tries again (and logs why).
        if complete && key.iter().all(|k| k.stamp.is_some()) {
            let mut views = self.inner.views.lock().unwrap_or_else(|p| p.into_inner());
            views.retain(|_, (made, _)| made.elapsed() < VIEW_TTL);
            if views.len() >= VIEWS {
                views.clear();
            }
            views.insert(key, (std::time::Instant::now(), view.clone()));
        }
        Ok(view)
    }

    /// A fresh store for one run, or for the lifetime of an instance, with its task's
    /// datasets (`datasets`, from [`Self::dataset_keys`]) at `/datasets` and, when
    /// `scratch`, a scratch folder of its own at `/scratch`. Standard output is kept when
    /// `stdout` (a run's log), else dropped.
    fn store(
        &self,
        ctx: &Arc<dyn TaskContext>,
        rt: tokio::runtime::Handle,
        datasets: Vec<DatasetKey>,
        stdout: bool,
        scratch: bool,
    ) -> Result<(Store<Host>, Pipes), RuntimeError> {
        let pipes = Pipes { stdout: stdout.then(|| RunPipe::new(1 << 20)), stderr: RunPipe::new(1 << 20) };
        // A new folder for every instance: a reused one would carry its birth time and the
        // time it was given back from one task to the next, a channel between tenants.
        // (An instance reused between the tasks of one session keeps its folder: they are
        // one tenant's.) Made only for modules that declare disk space: making and
        // removing it is a large part of what a small run costs.
        let scratch = scratch
            .then(|| {
                tempfile::Builder::new()
                    .prefix("tessera-wasm-scratch-")
                    .tempdir_in(&self.inner.scratch_root)
                    .map_err(|e| RuntimeError::Load(format!("cannot make a scratch folder: {e}")))
            })
            .transpose()?;
        let view = self.dataset_view(ctx, datasets)?;
        let mut builder = WasiCtx::builder();
        match &pipes.stdout {
            Some(out) => builder.stdout(out.clone()),
            None => builder.stdout(wasmtime_wasi::p2::pipe::SinkOutputStream),
        };
        if let Some(scratch) = &scratch {
            builder
                .preopened_dir(scratch.path(), "/scratch", wasmtime_wasi::FsPerms::ReadWrite)
                .map_err(|e| RuntimeError::Load(format!("cannot open the scratch folder: {e:#}")))?;
        }
        builder
            .preopened_dir(view.path(), "/datasets", wasmtime_wasi::FsPerms::ReadOnly)
            .map_err(|e| RuntimeError::Load(format!("cannot open the datasets folder: {e:#}")))?;
        // Refused anyway by the default address check; said outright.
        builder.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
        let wasi = builder.stderr(pipes.stderr.clone()).build();
        let host = Host {
            _scratch: (scratch, view),
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter { max: self.inner.limits.max_memory, total: 0, hit: false },
            ctx: ctx.clone(),
            rt,
        };
        let mut store = Store::new(&self.inner.engine, host);
        store.limiter(|h| &mut h.limiter);
        // The data a module may hand the node in one call (its outputs, a world value):
        // the output limit, plus room for names and framing.
        let fuel = self.inner.limits.max_output_bytes.saturating_add(1 << 20);
        store.set_hostcall_fuel(usize::try_from(fuel).unwrap_or(usize::MAX));
        Ok((store, pipes))
    }

    /// A new instance of `pre` in a new store (see [`Self::store`]), its start-up under
    /// the time limit.
    #[allow(clippy::too_many_arguments)]
    fn instantiate(
        &self,
        pre: &bindings::ModulePre<Host>,
        ctx: &Arc<dyn TaskContext>,
        rt: tokio::runtime::Handle,
        datasets: Vec<DatasetKey>,
        stdout: bool,
        scratch: bool,
        abandoned: &Arc<AtomicBool>,
    ) -> Result<Live, RuntimeError> {
        let (mut store, pipes) = self.store(ctx, rt, datasets, stdout, scratch)?;
        let limit = self.inner.limits.max_time;
        arm(&mut store, ticks_of(limit), abandoned.clone());
        match pre.instantiate(&mut store) {
            Ok(module) => Ok(Live { store, module, pipes }),
            Err(e) => Err(self
                .outcome(&store, &pipes, Err(e), limit)
                .err()
                .unwrap_or_else(|| RuntimeError::Trap("instantiation failed".into()))),
        }
    }

    /// One call of `run` on an instantiated module, with the time limit armed, for the
    /// task of `ctx`. Also says whether the instance may take another call: only when the
    /// call returned (a trap, a time or memory limit, or a host call refused midway
    /// leaves its state unknown).
    fn invoke(
        &self,
        live: &mut Live,
        ctx: &Arc<dyn TaskContext>,
        rt: tokio::runtime::Handle,
        invocation: Invocation,
        abandoned: &Arc<AtomicBool>,
    ) -> (Result<Outputs, RuntimeError>, bool) {
        let Live { store, module, pipes } = live;
        // What an earlier call left in the pipes is not this call's.
        if let Some(out) = &pipes.stdout {
            out.take();
        }
        pipes.stderr.take();
        let host = store.data_mut();
        host.ctx = ctx.clone();
        host.rt = rt;
        let limits = &self.inner.limits;
        let limit = invocation.timeout.map_or(limits.max_time, |t| t.min(limits.max_time));
        arm(store, ticks_of(limit), abandoned.clone());
        let config = invocation.config.to_string();
        let inputs: Vec<bindings::Blob> =
            invocation.inputs.into_iter().map(|(name, data)| bindings::Blob { name, data: data.to_vec() }).collect();
        let result = module.call_run(&mut *store, &config, &inputs);
        let returned = result.is_ok();
        let outcome = self.outcome(store, pipes, result, limit);
        if let Some(out) = &pipes.stdout {
            let out = out.take();
            let out = String::from_utf8_lossy(&out);
            if !out.trim().is_empty() {
                ctx.log(LogLevel::Info, out.trim_end());
            }
        }
        (outcome, returned)
    }

    fn outcome(
        &self,
        store: &Store<Host>,
        pipes: &Pipes,
        result: wasmtime::Result<Result<Vec<bindings::Blob>, String>>,
        time_limit: Duration,
    ) -> Result<Outputs, RuntimeError> {
        let limits = &self.inner.limits;
        match result {
            Ok(Ok(outputs)) => {
                let total: u64 = outputs.iter().map(|b| b.data.len() as u64).sum();
                if total > limits.max_output_bytes {
                    return Err(RuntimeError::OutputLimit { limit_bytes: limits.max_output_bytes });
                }
                Ok(outputs.into_iter().map(|b| (b.name, Bytes::from(b.data))).collect())
            }
            Ok(Err(message)) => Err(RuntimeError::Module(message)),
            Err(err) => {
                if store.data().limiter.hit {
                    return Err(RuntimeError::MemoryLimit { limit_bytes: limits.max_memory });
                }
                if err.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                    return Err(RuntimeError::TimeLimit {
                        limit_ms: u64::try_from(time_limit.as_millis()).unwrap_or(u64::MAX),
                    });
                }
                // wasmtime bounds the data a guest hands the host in one call ("hostcall
                // fuel"), which the store sets from the output limit.
                if format!("{err:#}").contains("fuel allocated for hostcalls has been exhausted") {
                    return Err(RuntimeError::OutputLimit { limit_bytes: limits.max_output_bytes });
                }
                let stderr = String::from_utf8_lossy(&pipes.stderr.contents()).into_owned();
                let tail: String =
                    stderr.trim().chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect();
                let mut msg = format!("{err}");
                if let Some(t) = err.downcast_ref::<Trap>() {
                    msg = format!("{t}");
                }
                if !tail.is_empty() {
                    msg = format!("{msg}; stderr: {tail}");
                }
                Err(RuntimeError::Trap(msg))
            }
        }
    }

    /// One run of `module` for the task of `ctx`: when the module allows reuse, in an idle
    /// instance an earlier run with the same key ([`WarmKey`]: module, node, reuse scope,
    /// dataset files, `/scratch`) left, if one is at hand; else in a new one. An instance
    /// whose call returned is kept idle for the next run with its key (see [`warm`]), and
    /// dropped otherwise.
    fn run_blocking(
        &self,
        module: &ModuleImage,
        invocation: Invocation,
        ctx: &Arc<dyn TaskContext>,
        rt: tokio::runtime::Handle,
        abandoned: &Arc<AtomicBool>,
    ) -> Result<Outputs, RuntimeError> {
        let datasets = Self::dataset_keys(ctx);
        let key = match (module.manifest.reuse, ctx.reuse_scope()) {
            (Reuse::Session, Some(scope)) => Some(WarmKey {
                module: module.digest,
                node: ctx.node().to_owned(),
                scope: scope.to_owned(),
                datasets: datasets.clone(),
                scratch: wants_scratch(module),
            }),
            _ => None,
        };
        let idle = key.as_ref().and_then(|k| self.inner.warm.lock().unwrap_or_else(|p| p.into_inner()).take(k));
        let mut live = match idle {
            Some(live) => live,
            None => {
                let pre = self.prepare(module)?;
                self.instantiate(&pre, ctx, rt.clone(), datasets, true, wants_scratch(module), abandoned)?
            }
        };
        let (result, intact) = self.invoke(&mut live, ctx, rt, invocation, abandoned);
        // Linear memory never shrinks, and the memory limit counts what every run of an
        // instance grew: one that holds more than half the limit is not kept, so a run in
        // a reused instance always has at least half the limit left to grow.
        let roomy = live.store.data().limiter.total <= self.inner.limits.max_memory / 2;
        if let Some(key) = key
            && intact
            && roomy
        {
            // Idle, it holds nothing of the task it ran: no log, no world state.
            live.store.data_mut().ctx = Arc::new(Parked);
            let gone = self.inner.warm.lock().unwrap_or_else(|p| p.into_inner()).put(key, live);
            drop(gone);
        }
        result
    }

    /// How many instances are idle, kept for later runs of modules that allow reuse.
    pub fn idle_instances(&self) -> usize {
        self.inner.warm.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Linear memory the idle instances hold, in bytes.
    pub fn idle_memory(&self) -> u64 {
        self.inner.warm.lock().unwrap_or_else(|p| p.into_inner()).bytes()
    }

    /// Checks that bytes are a loadable Tessera module component, without running it.
    pub fn validate(&self, wasm: &[u8]) -> Result<(), RuntimeError> {
        self.compile(wasm).map(|_| ())
    }
}

/// A module instantiated once, keeping its memory (its state) from call to call: an actor's
/// replica. A call that traps or breaks a limit poisons it; the actor starts a new one.
pub struct WasmInstance {
    runtime: WasmRuntime,
    ctx: Arc<dyn TaskContext>,
    live: Option<Live>,
}

#[async_trait]
impl tessera_ports::Instance for WasmInstance {
    async fn call(&mut self, invocation: Invocation) -> Result<Outputs, RuntimeError> {
        let mut live = self
            .live
            .take()
            .ok_or_else(|| RuntimeError::Trap("the instance stopped after an earlier failure".into()))?;
        let runtime = self.runtime.clone();
        let ctx = self.ctx.clone();
        let rt = tokio::runtime::Handle::current();
        // A caller that goes away (a cancelled call, a dropped request) stops the run within
        // a tenth of a second instead of leaving it to burn its time limit.
        let guard = Abandon::default();
        let abandoned = guard.0.clone();
        let (result, back) = tokio::task::spawn_blocking(move || {
            let (result, intact) = runtime.invoke(&mut live, &ctx, rt, invocation, &abandoned);
            (result, intact.then_some(live))
        })
        .await
        .map_err(|e| RuntimeError::Trap(format!("the call's thread failed: {e}")))?;
        drop(guard);
        self.live = back;
        result
    }

    fn healthy(&self) -> bool {
        self.live.is_some()
    }
}

#[async_trait]
impl Runtime for WasmRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Wasm
    }

    async fn run(
        &self,
        module: &ModuleImage,
        invocation: Invocation,
        ctx: Arc<dyn TaskContext>,
    ) -> Result<Outputs, RuntimeError> {
        let this = self.clone();
        let module = module.clone();
        let rt = tokio::runtime::Handle::current();
        let guard = Abandon::default();
        let abandoned = guard.0.clone();
        let result = tokio::task::spawn_blocking(move || this.run_blocking(&module, invocation, &ctx, rt, &abandoned))
            .await
            .map_err(|e| RuntimeError::Trap(format!("the run's thread failed: {e}")))?;
        drop(guard);
        result
    }

    async fn start(
        &self,
        module: &ModuleImage,
        ctx: Arc<dyn TaskContext>,
    ) -> Result<Option<Box<dyn tessera_ports::Instance>>, RuntimeError> {
        let this = self.clone();
        let module = module.clone();
        let rt = tokio::runtime::Handle::current();
        let context = ctx.clone();
        let live = tokio::task::spawn_blocking(move || {
            let pre = this.prepare(&module)?;
            let datasets = Self::dataset_keys(&context);
            this.instantiate(&pre, &context, rt, datasets, false, wants_scratch(&module), &Arc::default())
        })
        .await
        .map_err(|e| RuntimeError::Trap(format!("the start's thread failed: {e}")))??;
        Ok(Some(Box::new(WasmInstance { runtime: self.clone(), ctx, live: Some(live) })))
    }
}

/// Set when the caller of a run went away (its future was dropped).
#[derive(Default)]
struct Abandon(Arc<AtomicBool>);

impl Drop for Abandon {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Epoch ticks in `limit` (at least one).
fn ticks_of(limit: Duration) -> u64 {
    u64::try_from(limit.as_millis() / TICK.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Ticks between checks of whether a run was abandoned.
const CHECK_TICKS: u64 = 10;

/// Arms a store's time limit: the run is interrupted after `ticks` epoch ticks, or at the
/// next check (every [`CHECK_TICKS`]) after `abandoned` is set.
fn arm(store: &mut Store<Host>, ticks: u64, abandoned: Arc<AtomicBool>) {
    let mut left = ticks;
    let step = left.clamp(1, CHECK_TICKS);
    left -= step;
    store.set_epoch_deadline(step);
    store.epoch_deadline_callback(move |_| {
        if left == 0 || abandoned.load(Ordering::Relaxed) {
            return Ok(UpdateDeadline::Interrupt);
        }
        let step = left.min(CHECK_TICKS);
        left -= step;
        Ok(UpdateDeadline::Continue(step))
    });
}
