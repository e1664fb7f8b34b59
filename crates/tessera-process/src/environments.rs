//! Python environments per module, built with `uv` (from PyPI, a configured index, or a
//! local wheelhouse) and shared between modules that resolve to the same set.
//!
//! A module's requirements are its `needs.libraries`, the lines of a `requirements.txt`
//! in its folder and the `project.dependencies` of a `pyproject.toml` there (PEP 621), each
//! a name and version specifiers (PEP 508's; URLs, paths and options are refused). When the node's own interpreter already meets them all,
//! the module runs with it. Otherwise the node resolves them once (`uv pip compile`) and
//! keeps the resolution under the digest of what was declared
//! (`<root>/resolved/<digest>.txt`), then builds an environment (`uv venv`, `uv pip sync`)
//! under the digest of the resolution (`<root>/<digest>/`), made in a temporary folder and
//! renamed into place whole. A second module declaring the same set reuses both without
//! running `uv`; a module declaring a different set that resolves to the same packages
//! shares the environment.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tessera_core::requirement::Requirement;
use tessera_ports::{ModuleImage, RuntimeError};

/// The `requirements.txt` a module folder may hold.
pub const REQUIREMENTS_FILE: &str = "requirements.txt";
/// The `pyproject.toml` a module folder may hold.
pub const PYPROJECT_FILE: &str = "pyproject.toml";
/// Largest `requirements.txt` or `pyproject.toml` read.
const MAX_REQUIREMENTS_BYTES: u64 = 64 << 10;

/// The text of `file` in a module folder, if there is one; `Err` when it is not a plain
/// file of at most [`MAX_REQUIREMENTS_BYTES`].
fn read_small(label: &str, root: &Path, file: &str) -> Result<Option<String>, RuntimeError> {
    let path = root.join(file);
    let Ok(meta) = std::fs::symlink_metadata(&path) else { return Ok(None) };
    if !meta.is_file() || meta.len() > MAX_REQUIREMENTS_BYTES {
        return Err(load(label, format!("{file} must be a file of at most {MAX_REQUIREMENTS_BYTES} bytes")));
    }
    std::fs::read_to_string(&path).map(Some).map_err(|e| load(label, format!("{file}: {e}")))
}

/// `project.dependencies` of a `pyproject.toml`.
fn pyproject_dependencies(label: &str, text: &str) -> Result<Vec<String>, RuntimeError> {
    let doc: toml::Table = toml::from_str(text).map_err(|e| load(label, format!("{PYPROJECT_FILE}: {e}")))?;
    let Some(deps) = doc.get("project").and_then(|p| p.get("dependencies")) else { return Ok(Vec::new()) };
    let deps = deps
        .as_array()
        .ok_or_else(|| load(label, format!("{PYPROJECT_FILE}: project.dependencies must be a list of strings")))?;
    deps.iter()
        .enumerate()
        .map(|(i, d)| {
            d.as_str()
                .map(str::to_owned)
                .ok_or_else(|| load(label, format!("{PYPROJECT_FILE}: project.dependencies[{i}] must be a string")))
        })
        .collect()
}

/// Builds and keeps module environments for one base interpreter.
#[derive(Debug)]
pub struct Environments {
    uv: PathBuf,
    root: PathBuf,
    base: PathBuf,
    find_links: Option<PathBuf>,
    /// One build at a time per environment.
    building: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    resolves: AtomicU64,
    builds: AtomicU64,
}

/// `uv` for a node: `TESSERA_UV`, else `uv` beside `interpreter` (a virtual environment
/// with uv installed), else `uv` on the `PATH`.
pub fn find_uv(interpreter: &Path) -> Option<PathBuf> {
    if let Some(uv) = std::env::var_os("TESSERA_UV").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(uv));
    }
    let beside = interpreter.parent().map(|d| d.join("uv")).filter(|p| p.is_file());
    beside.or_else(|| {
        std::env::var_os("PATH").iter().flat_map(std::env::split_paths).map(|d| d.join("uv")).find(|p| p.is_file())
    })
}

fn load(label: &str, what: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Load(format!("{label}: {what}"))
}

impl Environments {
    /// Environments under `root` for modules of `base` (the node's interpreter), built
    /// with `uv`; packages come from uv's index (PyPI unless `UV_INDEX_URL` and the like
    /// say otherwise) and, when given, the wheels in `find_links`.
    pub fn new(uv: PathBuf, root: PathBuf, base: PathBuf, find_links: Option<PathBuf>) -> Self {
        Environments {
            uv,
            root,
            base,
            find_links,
            building: Default::default(),
            resolves: AtomicU64::new(0),
            builds: AtomicU64::new(0),
        }
    }

    /// How many times requirements were resolved (`uv pip compile` ran).
    pub fn resolves(&self) -> u64 {
        self.resolves.load(Ordering::Relaxed)
    }

    /// How many environments were built.
    pub fn builds(&self) -> u64 {
        self.builds.load(Ordering::Relaxed)
    }

    /// A module's requirements: `needs.libraries`, its `requirements.txt` (comments and
    /// blank lines skipped) and its `pyproject.toml`'s `project.dependencies`, in canonical
    /// form, sorted. `Err` names the line or entry that is not a requirement.
    pub fn requirements(module: &ModuleImage) -> Result<Vec<Requirement>, RuntimeError> {
        let label = format!("{}@{}", module.manifest.name, module.manifest.version);
        let mut out = Vec::new();
        for lib in &module.manifest.needs.libraries {
            out.push(Requirement::parse(lib).map_err(|e| load(&label, format!("needs.libraries: {e}")))?);
        }
        if let Some(text) = read_small(&label, &module.root, REQUIREMENTS_FILE)? {
            for (n, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or_default().trim();
                if line.is_empty() {
                    continue;
                }
                out.push(
                    Requirement::parse(line)
                        .map_err(|e| load(&label, format!("{REQUIREMENTS_FILE} line {}: {e}", n + 1)))?,
                );
            }
        }
        if let Some(text) = read_small(&label, &module.root, PYPROJECT_FILE)? {
            for (i, dep) in pyproject_dependencies(&label, &text)?.iter().enumerate() {
                out.push(
                    Requirement::parse(dep)
                        .map_err(|e| load(&label, format!("{PYPROJECT_FILE} project.dependencies[{i}]: {e}")))?,
                );
            }
        }
        out.sort_by_key(ToString::to_string);
        out.dedup_by_key(|r| r.to_string());
        Ok(out)
    }

    /// The interpreter `module` runs with: the node's own when it meets the module's
    /// requirements (`offered`: its libraries, `name==version`), else the python of the
    /// module's environment, resolved and built if need be. `Err` (a load error, before
    /// any call) names what could not be met, in uv's words.
    ///
    /// Returns the python and, for an environment of its own, the environment's folder
    /// (what the module's sandbox opens beside the base interpreter's folders). Nothing
    /// of the module's environment runs on the node: `uv` installs wheels only
    /// (`--no-build`: no package's build code runs), with a minimal environment of its own.
    pub async fn interpreter(
        &self,
        module: &ModuleImage,
        offered: &[String],
    ) -> Result<(PathBuf, Option<PathBuf>), RuntimeError> {
        let label = format!("{}@{}", module.manifest.name, module.manifest.version);
        let reqs = Self::requirements(module)?;
        if reqs.iter().all(|r| r.met_by(offered)) {
            return Ok((self.base.clone(), None));
        }
        let declared: String = reqs.iter().map(|r| format!("{r}\n")).collect();
        let key =
            tessera_core::Digest::of(format!("{}\n{declared}", self.base.display()).as_bytes()).hex()[..32].to_owned();
        let lock = self.lock(&key).await;
        let _building = lock.lock().await;
        let resolved_dir = self.root.join("resolved");
        let resolved_file = resolved_dir.join(format!("{key}.txt"));
        let resolved = match std::fs::read_to_string(&resolved_file) {
            Ok(text) => text,
            Err(_) => {
                std::fs::create_dir_all(&resolved_dir).map_err(|e| load(&label, e))?;
                let input = tempfile::NamedTempFile::new_in(&resolved_dir).map_err(|e| load(&label, e))?;
                std::fs::write(input.path(), &declared).map_err(|e| load(&label, e))?;
                // A file of this resolution's own (nodes sharing a cache may resolve the
                // same set at once), renamed into place whole.
                let out = tempfile::NamedTempFile::new_in(&resolved_dir).map_err(|e| load(&label, e))?;
                self.resolves.fetch_add(1, Ordering::Relaxed);
                let mut cmd = self.uv_command();
                cmd.args(["pip", "compile", "--quiet", "--no-header", "--no-build", "--python"])
                    .arg(&self.base)
                    .arg(input.path())
                    .arg("-o")
                    .arg(out.path());
                self.run(&label, "resolving its requirements", cmd).await?;
                let text = std::fs::read_to_string(out.path()).map_err(|e| load(&label, e))?;
                out.persist(&resolved_file).map_err(|e| load(&label, e))?;
                text
            }
        };
        let env_key =
            tessera_core::Digest::of(format!("{}\n{resolved}", self.base.display()).as_bytes()).hex()[..32].to_owned();
        let env = self.root.join(&env_key);
        let python = env.join("bin").join("python");
        // One build per environment at a time, whatever set resolved to it.
        let env_lock = self.lock(&env_key).await;
        let _env_building = env_lock.lock().await;
        if python.exists() {
            return Ok((python, Some(env)));
        }
        let building = tempfile::Builder::new()
            .prefix(&format!(".{env_key}-"))
            .tempdir_in(&self.root)
            .map_err(|e| load(&label, e))?;
        let mut venv = self.uv_command();
        venv.args(["venv", "--quiet", "--python"]).arg(&self.base).arg(building.path());
        self.run(&label, "making its environment", venv).await?;
        let mut sync = self.uv_command();
        sync.args(["pip", "sync", "--quiet", "--no-build", "--python"])
            .arg(building.path().join("bin").join("python"))
            .arg(&resolved_file);
        self.run(&label, "installing its requirements", sync).await?;
        // Renamed into place whole (a python's prefix is found from where it is run).
        let made = building.keep();
        if let Err(e) = std::fs::rename(&made, &env) {
            let _ = std::fs::remove_dir_all(&made);
            if !python.exists() {
                return Err(load(&label, format!("cannot put its environment in place: {e}")));
            }
        }
        self.builds.fetch_add(1, Ordering::Relaxed);
        Ok((python, Some(env)))
    }

    async fn lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.building.lock().await.entry(key.to_owned()).or_default().clone()
    }

    /// `uv` with a minimal environment (its own settings, where the certificates and
    /// proxies are), no configuration files, in the environments' folder.
    fn uv_command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.uv);
        cmd.env_clear();
        for (k, v) in std::env::vars_os() {
            let name = k.to_string_lossy();
            let kept = name.starts_with("UV_")
                || matches!(
                    name.as_ref(),
                    "PATH" | "HOME" | "XDG_CACHE_HOME" | "SSL_CERT_FILE" | "SSL_CERT_DIR" | "LANG" | "TMPDIR"
                )
                || name.eq_ignore_ascii_case("http_proxy")
                || name.eq_ignore_ascii_case("https_proxy")
                || name.eq_ignore_ascii_case("no_proxy");
            if kept {
                cmd.env(k, v);
            }
        }
        let _ = std::fs::create_dir_all(&self.root);
        cmd.current_dir(&self.root).arg("--no-config");
        cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
        if let Some(dir) = &self.find_links {
            cmd.env("UV_FIND_LINKS", dir);
        }
        cmd
    }

    /// Runs a uv command (the node's own tool, not module code), failing with its stderr.
    async fn run(&self, label: &str, doing: &str, mut cmd: tokio::process::Command) -> Result<(), RuntimeError> {
        let out =
            cmd.output().await.map_err(|e| load(label, format!("{doing}: cannot run {}: {e}", self.uv.display())))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let why: String = stderr.trim().chars().take(4000).collect();
        Err(load(label, format!("its requirements cannot be met ({doing}): {why}")))
    }
}
