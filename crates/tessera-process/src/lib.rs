//! Tessera's process runtimes: module code running in a child process that speaks the
//! Tessera frame protocol (`docs/protocol.md`) over its stdin and stdout.
//!
//! - [`ProcessRuntime::python`] (`runtime: python`): the child is
//!   `<interpreter> -u -m tessera.host <entry.py>`, with the Python SDK (embedded in this
//!   crate, see [`ProcessRuntime::write_sdk`]) first on `PYTHONPATH`. Any `python3` works;
//!   numpy is needed only by modules that use tensors.
//! - [`ProcessRuntime::process`] (`runtime: process`): the child is the module's entry
//!   file itself, an executable in any language.
//!
//! A child starts with a `hello` (its functions and state hooks), then answers `call`s
//! one at a time, asking the node for its [`TaskContext`] (datasets, world state, logs)
//! while a call runs; its stderr goes to the task's log. [`Runtime::start`] keeps the
//! child alive between calls (an actor's replica, whose state lives in the process);
//! [`Runtime::run`] starts one, makes one call and shuts it down. Every call has a time
//! limit, and every frame and output a size limit; a child that breaks the protocol,
//! exits, or runs out of time is killed and its instance reports itself unhealthy.
//!
//! Every child is contained by the node's [`Sandbox`] (see [`sandbox`]): Landlock
//! file-system rules (its code, its interpreter's environment and system libraries
//! read-only, a scratch folder of its own writable), no sockets unless its policy grants
//! the network, and a cgroup bounding its memory, processes and CPU, whose processes all
//! die with it. On a machine without those kernel features the node says what is missing
//! ([`Sandbox::check`], `tessera node doctor`).

pub mod environments;
pub mod frame;
mod instance;
mod prestart;
pub mod sandbox;
mod sdk;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tessera_core::RuntimeKind;
use tessera_ports::{Instance, Invocation, ModuleImage, Outputs, Runtime, RuntimeError, TaskContext};
use tokio::io::BufReader;
use tokio::process::Command;

pub use environments::Environments;
pub use frame::{BlobKind, FrameError, PROTOCOL_VERSION};
pub use instance::ProcessInstance;
pub use sandbox::{Protection, Sandbox, SandboxPolicy, Support, Unenforceable};
pub use sdk::{SDK_FILES, SdkError, cached_sdk, sdk_version};

/// A bare program name (`python3`) as the node's PATH finds it; anything else, or a name
/// PATH does not find, as it is.
fn on_path(program: &Path) -> PathBuf {
    if program.components().count() != 1 {
        return program.to_owned();
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && is_executable(&m)))
        .unwrap_or_else(|| program.to_owned())
}

/// Variables of the node's environment a child keeps: where libraries and certificates
/// are, which GPUs it may use, thread counts, the time zone. Nothing else is passed on.
pub const CHILD_ENV_KEPT: &[&str] = &[
    "LD_LIBRARY_PATH",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "TZ",
];

/// The `PATH` a child gets.
pub const CHILD_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Limits applied to every child.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessLimits {
    /// Wall time a call may take (a call's own, shorter time-out wins).
    pub max_time: Duration,
    /// Total size of a call's outputs.
    pub max_output_bytes: u64,
    /// Largest frame (header, any blob, all blobs together) accepted from a child.
    pub max_message_bytes: u64,
    /// Time a child has to send its `hello`.
    pub start_timeout: Duration,
    /// Bytes a child may write to its log (stderr, and `print()` in Python) while it
    /// starts or during one call; past it the child is killed and the call fails.
    pub max_log_bytes: u64,
}

impl Default for ProcessLimits {
    fn default() -> Self {
        ProcessLimits {
            max_time: Duration::from_secs(300),
            max_output_bytes: 64 << 20,
            max_message_bytes: 256 << 20,
            start_timeout: Duration::from_secs(30),
            max_log_bytes: 16 << 20,
        }
    }
}

#[derive(Clone, Debug)]
enum Mode {
    Python { interpreter: PathBuf, sdk_dir: PathBuf },
    Process,
}

/// The `python` and `process` runtimes (see the crate documentation).
#[derive(Clone, Debug)]
pub struct ProcessRuntime {
    mode: Mode,
    limits: ProcessLimits,
    /// The interpreter's libraries, listed once.
    libraries: std::sync::OnceLock<Vec<String>>,
    /// The node's interpreter's folders, found once (it is the node's own, trusted; a
    /// module's environment is never run on the node).
    interpreter_dirs: Arc<std::sync::OnceLock<Vec<PathBuf>>>,
    /// Environments per module, when the node builds them.
    environments: Option<Arc<Environments>>,
    /// Instances started ahead of the next start of their module, when on.
    spares: Option<Arc<prestart::Spares>>,
    /// How children are contained.
    sandbox: Arc<Sandbox>,
}

/// The sandbox runtimes get unless given one: the default policy on this machine.
fn default_sandbox() -> Arc<Sandbox> {
    static DEFAULT: std::sync::OnceLock<Arc<Sandbox>> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(|| Arc::new(Sandbox::new(SandboxPolicy::default()))).clone()
}

/// The function a call's config names (`config.function`, else `"run"`).
pub(crate) fn function_of(config: &Value) -> String {
    config.get("function").and_then(Value::as_str).unwrap_or("run").to_owned()
}

/// The Python interpreter modules run with: `TESSERA_PYTHON` (a relative path with a
/// directory in it is taken from the current directory), else `python3` on the `PATH`.
pub fn default_interpreter() -> PathBuf {
    std::env::var_os("TESSERA_PYTHON")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .map(|p| {
            if p.is_relative() && p.components().count() > 1 {
                std::env::current_dir().map(|d| d.join(&p)).unwrap_or(p)
            } else {
                p
            }
        })
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// The distributions installed for `interpreter`, `name==version` with names normalised
/// as PEP 503 says (lower case, runs of `-_.` as one `-`); empty when the interpreter does
/// not start (the node then offers no libraries, and modules that need some are not placed
/// on it).
pub fn python_libraries(interpreter: &Path) -> Vec<String> {
    const LIST: &str = "import importlib.metadata as m\nfor d in m.distributions():\n    n = d.metadata['Name']\n    if n: print(n + '==' + d.version)\n";
    let out = std::process::Command::new(interpreter)
        .args(["-I", "-c", LIST])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    let Ok(out) = out.inspect_err(|e| tracing::warn!("listing {}'s libraries: {e}", interpreter.display())) else {
        return Vec::new();
    };
    let mut libs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (name, version) = l.split_once("==")?;
            Some(format!("{}=={}", normalize_distribution(name), version.trim()))
        })
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

pub use tessera_core::manifest::normalize_distribution;

impl ProcessRuntime {
    /// The `python` runtime: runs `interpreter -u -m tessera.host <entry>` with `sdk_dir`
    /// (a folder holding the `tessera` package, see [`ProcessRuntime::write_sdk`]) first
    /// on `PYTHONPATH`.
    pub fn python(interpreter: PathBuf, sdk_dir: PathBuf, limits: ProcessLimits) -> Self {
        // Looked up on the node's PATH, once: children get a fixed PATH of their own.
        let interpreter = on_path(&interpreter);
        Self::with_mode(Mode::Python { interpreter, sdk_dir }, limits)
    }

    fn with_mode(mode: Mode, limits: ProcessLimits) -> Self {
        ProcessRuntime {
            mode,
            limits,
            libraries: Default::default(),
            interpreter_dirs: Default::default(),
            environments: None,
            spares: None,
            sandbox: default_sandbox(),
        }
    }

    /// The `python` runtime with the interpreter from `TESSERA_PYTHON` (else `python3` on
    /// the `PATH`) and the embedded SDK written once under
    /// `cache_dir/python-sdk/<sdk version>`. A relative `TESSERA_PYTHON` with a directory in
    /// it (`target/venv/bin/python`) is taken from the current directory (module processes
    /// run in their module's folder); a bare name is looked up on the `PATH`.
    ///
    /// When `uv` is found ([`environments::find_uv`]), modules whose requirements the
    /// interpreter does not meet get environments of their own under
    /// `cache_dir/python-envs`, with the wheels in `TESSERA_WHEELHOUSE` (a folder) offered
    /// beside the index.
    pub fn python_default(cache_dir: &Path, limits: ProcessLimits) -> Result<Self, SdkError> {
        let sdk_dir = sdk::cached_sdk(cache_dir)?;
        let runtime = Self::python(default_interpreter(), sdk_dir, limits);
        let Mode::Python { interpreter, .. } = &runtime.mode else { return Ok(runtime) };
        Ok(match environments::find_uv(interpreter) {
            Some(uv) => {
                let wheels = std::env::var_os("TESSERA_WHEELHOUSE").filter(|v| !v.is_empty()).map(PathBuf::from);
                let envs = Environments::new(uv, cache_dir.join("python-envs"), interpreter.clone(), wheels);
                runtime.with_environments(Arc::new(envs))
            }
            None => runtime,
        })
    }

    /// The `process` runtime: runs the module's entry file, which must be executable.
    pub fn process(limits: ProcessLimits) -> Self {
        Self::with_mode(Mode::Process, limits)
    }

    /// The same runtime, containing its children with `sandbox` (by default, every
    /// protection this machine supports, with the default [`SandboxPolicy`]).
    #[must_use]
    pub fn with_sandbox(mut self, sandbox: Arc<Sandbox>) -> Self {
        self.sandbox = sandbox;
        self
    }

    /// The sandbox.
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// The same runtime, running each Python module whose requirements the interpreter
    /// does not meet in an environment of its own from `environments`.
    #[must_use]
    pub fn with_environments(mut self, environments: Arc<Environments>) -> Self {
        self.environments = Some(environments);
        self
    }

    /// The same runtime, starting one instance of a module ahead of its next start each
    /// time one starts (see [`prestart`](crate::prestart)): the next start takes it
    /// ready, having said `hello`. A spare not taken within `idle` is shut down.
    #[must_use]
    pub fn with_prestart(mut self, idle: Duration) -> Self {
        self.spares = Some(Arc::new(prestart::Spares::new(idle)));
        self
    }

    /// How many prestarted instances are ready.
    pub fn prestarted(&self) -> usize {
        self.spares.as_ref().map_or(0, |s| s.ready())
    }

    /// An instance of `module` for the task of `ctx`: a prestarted one when ready, else a
    /// new one; either way, with prestarting on, another is started for the next start.
    async fn instance(
        &self,
        module: &ModuleImage,
        ctx: Arc<dyn TaskContext>,
        class: Option<&str>,
    ) -> Result<ProcessInstance, RuntimeError> {
        let Some(spares) = &self.spares else { return self.launch(module, ctx, class).await };
        let needs = serde_json::to_string(&module.manifest.needs).unwrap_or_default();
        let key: prestart::Key = (module.digest, class.map(str::to_owned), needs);
        let node = ctx.node().to_owned();
        let instance = match spares.take(&key) {
            Some((inst, swap)) if inst.healthy() && inst.exit_status().is_none() => {
                swap.set(ctx);
                inst
            }
            _ => self.launch(module, ctx, class).await?,
        };
        // The next one, unless one is ready or on its way (after a failed start, none).
        if spares.begin(&key) {
            let (this, spares, module) = (self.clone(), spares.clone(), module.clone());
            tokio::spawn(async move {
                let swap = prestart::SwapCtx::idle(&node);
                match this.launch(&module, swap.clone(), key.1.as_deref()).await {
                    Ok(inst) => spares.put(key, inst, swap),
                    Err(e) => {
                        spares.abandon(&key);
                        tracing::debug!("prestarting {}: {e}", module.manifest.name);
                    }
                }
            });
        }
        Ok(instance)
    }

    /// The environments, when the runtime builds them.
    pub fn environments(&self) -> Option<&Arc<Environments>> {
        self.environments.as_ref()
    }

    /// Writes the embedded Python SDK under `dir` (as `dir/tessera/*.py`): `dir` is then a
    /// `sdk_dir` for [`ProcessRuntime::python`].
    pub fn write_sdk(dir: &Path) -> Result<(), SdkError> {
        sdk::write_sdk(dir)
    }

    /// The limits.
    pub fn limits(&self) -> &ProcessLimits {
        &self.limits
    }

    /// The Python interpreter, for the `python` runtime.
    pub fn interpreter(&self) -> Option<&Path> {
        match &self.mode {
            Mode::Python { interpreter, .. } => Some(interpreter),
            Mode::Process => None,
        }
    }

    /// Starts a child for `module` and waits for its `hello`. `class` is passed to the
    /// child as `TESSERA_CLASS` (the Python SDK picks the `Task` subclass by it).
    async fn launch(
        &self,
        module: &ModuleImage,
        ctx: Arc<dyn TaskContext>,
        class: Option<&str>,
    ) -> Result<ProcessInstance, RuntimeError> {
        let label = format!("{}@{}", module.manifest.name, module.manifest.version);
        if module.manifest.runtime != self.kind() {
            return Err(RuntimeError::Load(format!(
                "{label} is a {} module; this is the {} runtime",
                module.manifest.runtime,
                self.kind()
            )));
        }
        let root = std::path::absolute(&module.root)
            .map_err(|e| RuntimeError::Load(format!("{label}: bad module folder {}: {e}", module.root.display())))?;
        let entry = root.join(&module.manifest.entry);
        let meta = std::fs::metadata(&entry)
            .map_err(|e| RuntimeError::Load(format!("{label}: entry file {}: {e}", entry.display())))?;
        if !meta.is_file() {
            return Err(RuntimeError::Load(format!("{label}: entry {} is not a file", entry.display())));
        }
        let mut env_dir = None;
        let mut cmd = match &self.mode {
            Mode::Python { interpreter, sdk_dir } => {
                let interpreter = match &self.environments {
                    Some(envs) => {
                        let (python, env) = envs.interpreter(module, &self.libraries()).await?;
                        env_dir = env;
                        python
                    }
                    None => interpreter.clone(),
                };
                let mut cmd = Command::new(&interpreter);
                cmd.arg("-u").arg("-m").arg("tessera.host").arg(&entry);
                // The SDK only: the node's own PYTHONPATH is not the module's to read.
                cmd.env("PYTHONPATH", sdk_dir);
                cmd
            }
            Mode::Process => {
                if !is_executable(&meta) {
                    return Err(RuntimeError::Load(format!(
                        "{label}: entry file {} is not executable",
                        module.manifest.entry
                    )));
                }
                Command::new(&entry)
            }
        };
        // A minimal environment: nothing of the node's (its secrets, TESSERA_PASSPHRASE,
        // cloud credentials...), a fixed PATH, and HOME and TMPDIR in a scratch folder of
        // this process's own, removed when it ends.
        let scratch = tempfile::Builder::new()
            .prefix("tessera-scratch-")
            .tempdir()
            .map_err(|e| RuntimeError::Load(format!("{label}: cannot make a scratch folder: {e}")))?;
        let python_path =
            cmd.as_std().get_envs().find(|(k, _)| *k == "PYTHONPATH").and_then(|(_, v)| v.map(ToOwned::to_owned));
        cmd.env_clear()
            .env("PATH", CHILD_PATH)
            .env("LANG", "C.UTF-8")
            .env("HOME", scratch.path())
            .env("TMPDIR", scratch.path());
        for key in CHILD_ENV_KEPT {
            if let Some(v) = std::env::var_os(key) {
                cmd.env(key, v);
            }
        }
        if let Some(p) = python_path {
            cmd.env("PYTHONPATH", p).env("PYTHONDONTWRITEBYTECODE", "1").env("PYTHONUNBUFFERED", "1");
            // The sandbox leaves no shared /dev/shm for process pools' semaphores: joblib
            // (scikit-learn's parallelism) is told so rather than finding out with a warning.
            cmd.env("JOBLIB_MULTIPROCESSING", "0");
        }
        // Its own process group: whatever it starts is ended with it.
        #[cfg(unix)]
        cmd.process_group(0);
        cmd.current_dir(&root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .env("TESSERA_PROTOCOL", PROTOCOL_VERSION.to_string())
            .env("TESSERA_MODULE", module.manifest.name.to_string());
        match class {
            Some(class) => cmd.env("TESSERA_CLASS", class),
            None => cmd.env_remove("TESSERA_CLASS"),
        };
        let name = module.manifest.name.to_string();
        if module.manifest.needs.network && !self.sandbox.policy().allows_network(&name) {
            return Err(RuntimeError::Load(format!(
                "{label} needs the network (needs.network) and this node's sandbox policy does not grant it \
                 (sandbox.network_modules)"
            )));
        }
        let plan = self.plan(module, &root, scratch.path(), env_dir);
        let program = cmd.as_std().get_program().to_owned();
        let (mut child, cgroup) = self.sandbox.spawn(cmd, plan).await.map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                " (a module process may run only its own files and the system's programs)"
            } else {
                ""
            };
            RuntimeError::Load(format!("{label}: cannot start {}: {e}{hint}", Path::new(&program).display()))
        })?;
        let pid = child.id();
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(RuntimeError::Load(format!("{label}: the child's standard streams are missing")));
        };
        let tail = instance::StderrTail::default();
        let stderr_task = instance::pump_stderr(stderr, ctx.clone(), tail.clone(), self.limits.max_log_bytes, pid);
        let mut instance = ProcessInstance {
            tree: Some(instance::Tree { pid, cgroup, _scratch: Some(scratch) }),
            label,
            child: Mutex::new(Some(child)),
            stdin: Some(stdin),
            stdout: BufReader::with_capacity(64 * 1024, stdout),
            pid,
            functions: Vec::new(),
            hooks: Vec::new(),
            ctx,
            limits: self.limits.clone(),
            tail,
            stderr_task: Some(stderr_task),
            broken: None,
            in_call: false,
            next_id: 1,
        };
        instance.handshake().await?;
        Ok(instance)
    }

    /// What a child of `module` may use: its folder (read-only), the node's interpreter's
    /// folders, the module's environment (`env`) and the SDK (read-only), its scratch
    /// folder; the network if it asks and the policy grants it; the memory and CPU it
    /// declares. The sandbox drops any folder holding a path it protects.
    fn plan(&self, module: &ModuleImage, root: &Path, scratch: &Path, env: Option<PathBuf>) -> sandbox::Plan {
        let mut read = vec![root.to_owned()];
        if let Mode::Python { sdk_dir, interpreter } = &self.mode {
            let base = self.interpreter_dirs.get_or_init(|| sandbox::interpreter_dirs(interpreter));
            read.extend(base.iter().cloned());
            read.extend(env);
            read.push(sdk_dir.clone());
        }
        let needs = &module.manifest.needs;
        sandbox::Plan {
            read,
            write: vec![scratch.to_owned()],
            network: needs.network,
            memory: (needs.memory.0 > 0).then_some(needs.memory.0),
            cpu: (needs.cpu > 0.0).then_some(needs.cpu),
        }
    }

    /// Starts `module` as a long-lived instance (what [`Runtime::start`] boxes), with its
    /// pid and the functions it exposes at hand.
    pub async fn spawn(
        &self,
        module: &ModuleImage,
        ctx: Arc<dyn TaskContext>,
    ) -> Result<ProcessInstance, RuntimeError> {
        let class = module.manifest.config.get("class").and_then(Value::as_str);
        self.instance(module, ctx, class).await
    }
}

#[cfg(unix)]
fn is_executable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_executable(_meta: &std::fs::Metadata) -> bool {
    true
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn kind(&self) -> RuntimeKind {
        match self.mode {
            Mode::Python { .. } => RuntimeKind::Python,
            Mode::Process => RuntimeKind::Process,
        }
    }

    fn installs_libraries(&self) -> bool {
        matches!(self.mode, Mode::Python { .. }) && self.environments.is_some()
    }

    fn libraries(&self) -> Vec<String> {
        match &self.mode {
            Mode::Python { interpreter, .. } => self.libraries.get_or_init(|| python_libraries(interpreter)).clone(),
            Mode::Process => Vec::new(),
        }
    }

    async fn run(
        &self,
        module: &ModuleImage,
        invocation: Invocation,
        ctx: Arc<dyn TaskContext>,
    ) -> Result<Outputs, RuntimeError> {
        let class = invocation
            .config
            .get("class")
            .or_else(|| module.manifest.config.get("class"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let mut instance = self.instance(module, ctx, class.as_deref()).await?;
        let function = function_of(&invocation.config);
        let result = instance.call_function(&function, invocation).await;
        instance.shutdown().await;
        result
    }

    async fn start(
        &self,
        module: &ModuleImage,
        ctx: Arc<dyn TaskContext>,
    ) -> Result<Option<Box<dyn Instance>>, RuntimeError> {
        Ok(Some(Box::new(self.spawn(module, ctx).await?)))
    }
}
