//! Shared by the integration tests: a task context, module folders, runtimes.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::Value;
use tessera_core::wire::Resources;
use tessera_core::{ByteSize, Digest, Manifest};
use tessera_ports::{ContextError, Invocation, LogLevel, ModuleImage, Outputs, RuntimeError, TaskContext};
use tessera_process::{ProcessLimits, ProcessRuntime};

/// The interpreter under test: `TESSERA_PYTHON`, else `python3`.
pub fn python() -> PathBuf {
    std::env::var_os("TESSERA_PYTHON").filter(|p| !p.is_empty()).map(PathBuf::from).unwrap_or("python3".into())
}

/// Panics (does not skip) when the interpreter has no numpy.
pub fn require_numpy() {
    let py = python();
    let ok = std::process::Command::new(&py).args(["-c", "import numpy"]).output().is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} cannot import numpy: run scripts/test, or `source scripts/lib.sh && ensure_python_venv` and set \
         TESSERA_PYTHON=target/venv/bin/python (ensure_python_venv exports it)",
        py.display()
    );
}

/// A task context over files as datasets and an in-memory world state, recording logs.
#[derive(Default)]
pub struct Ctx {
    pub datasets: BTreeMap<String, PathBuf>,
    pub globals: Mutex<BTreeMap<String, Bytes>>,
    pub results: Mutex<Vec<(String, String, Bytes)>>,
    pub logs: Mutex<Vec<(LogLevel, String)>>,
}

impl Ctx {
    pub fn new() -> Arc<Ctx> {
        Arc::new(Ctx::default())
    }

    pub fn with_dataset(name: &str, path: &Path) -> Arc<Ctx> {
        let mut ctx = Ctx::default();
        ctx.datasets.insert(name.into(), path.to_owned());
        Arc::new(ctx)
    }

    pub fn logs(&self) -> Vec<(LogLevel, String)> {
        self.logs.lock().unwrap().clone()
    }

    pub fn has_log(&self, level: LogLevel, text: &str) -> bool {
        self.logs().iter().any(|(l, m)| *l == level && m.contains(text))
    }
}

#[async_trait]
impl TaskContext for Ctx {
    fn node(&self) -> &str {
        "node-a"
    }
    fn datasets(&self) -> Vec<String> {
        self.datasets.keys().cloned().collect()
    }
    async fn dataset_size(&self, name: &str) -> Result<u64, ContextError> {
        let path = self.datasets.get(name).ok_or_else(|| ContextError(format!("no dataset {name:?}")))?;
        Ok(std::fs::metadata(path).map_err(|e| ContextError(e.to_string()))?.len())
    }
    async fn dataset_read(&self, name: &str, offset: u64, len: u32) -> Result<Bytes, ContextError> {
        let path = self.datasets.get(name).ok_or_else(|| ContextError(format!("no dataset {name:?}")))?;
        let all = std::fs::read(path).map_err(|e| ContextError(e.to_string()))?;
        let start = (offset as usize).min(all.len());
        let end = (start + len as usize).min(all.len());
        Ok(Bytes::copy_from_slice(&all[start..end]))
    }
    fn resources(&self) -> Resources {
        Resources { cpu: 2.0, memory: ByteSize(1 << 30), gpu: 0, disk: ByteSize(5 << 30) }
    }
    async fn globals_get(&self, key: &str) -> Result<Option<Bytes>, ContextError> {
        Ok(self.globals.lock().unwrap().get(key).cloned())
    }
    async fn globals_set(&self, key: &str, value: Bytes) -> Result<(), ContextError> {
        self.globals.lock().unwrap().insert(key.into(), value);
        Ok(())
    }
    async fn results_add(&self, key: &str, value: Bytes) -> Result<(), ContextError> {
        self.results.lock().unwrap().push((key.into(), "node-a".into(), value));
        Ok(())
    }
    async fn results_select(&self, key: &str) -> Result<Vec<(String, Bytes)>, ContextError> {
        let mut out: Vec<(String, Bytes)> = vec![("node-z".into(), Bytes::from_static(b"\"from z\""))];
        out.extend(
            self.results.lock().unwrap().iter().filter(|(k, _, _)| k == key).map(|(_, n, v)| (n.clone(), v.clone())),
        );
        Ok(out)
    }
    fn log(&self, level: LogLevel, message: &str) {
        self.logs.lock().unwrap().push((level, message.to_owned()));
    }
}

/// A module folder: `module.yaml` plus files (name, text, executable).
pub struct Module {
    pub dir: tempfile::TempDir,
    pub image: ModuleImage,
}

pub fn module(runtime: &str, entry: &str, files: &[(&str, &str, bool)], extra_yaml: &str) -> Module {
    let dir = tempfile::tempdir().unwrap();
    let yaml =
        format!("name: test.proc\nversion: 0.1.0\nkind: model\nruntime: {runtime}\nentry: {entry}\n{extra_yaml}");
    std::fs::write(dir.path().join("module.yaml"), &yaml).unwrap();
    for (name, text, exec) in files {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        if *exec {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    let manifest = Manifest::parse(&yaml).unwrap();
    let image = ModuleImage { digest: Digest::of(yaml.as_bytes()), manifest, root: dir.path().to_owned() };
    Module { dir, image }
}

/// A Python module whose entry `model.py` holds `code`.
pub fn py_module(code: &str) -> Module {
    module("python", "model.py", &[("model.py", code, false)], "")
}

/// The python runtime with the embedded SDK written to a fresh folder.
pub struct Python {
    pub runtime: ProcessRuntime,
    pub _sdk: tempfile::TempDir,
}

pub fn python_runtime(limits: ProcessLimits) -> Python {
    let sdk = tempfile::tempdir().unwrap();
    ProcessRuntime::write_sdk(sdk.path()).unwrap();
    Python { runtime: ProcessRuntime::python(python(), sdk.path().to_owned(), limits), _sdk: sdk }
}

/// An invocation of `function` with JSON args and kwargs.
pub fn call(function: &str, args: Value, kwargs: Value) -> Invocation {
    Invocation {
        config: serde_json::json!({"function": function, "args": args, "kwargs": kwargs}),
        inputs: Vec::new(),
        timeout: None,
    }
}

/// The JSON value of the output named "result".
pub fn result_json(outputs: &Result<Outputs, RuntimeError>) -> Value {
    let outputs = outputs.as_ref().unwrap_or_else(|e| panic!("call failed: {e}"));
    let (_, bytes) = outputs.iter().find(|(n, _)| n == "result").expect("an output named result");
    serde_json::from_slice(bytes).unwrap()
}

/// The message of a `RuntimeError::Module`, panicking on anything else.
pub fn module_error(r: Result<Outputs, RuntimeError>) -> String {
    match r {
        Err(RuntimeError::Module(m)) => m,
        other => panic!("expected a module error, got {other:?}"),
    }
}
