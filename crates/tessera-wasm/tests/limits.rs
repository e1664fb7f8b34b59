//! The runtime runs real components, stops the ones that breach their limits, and carries
//! on with the next run.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::json;
use tessera_core::wire::Resources;
use tessera_core::{ByteSize, Digest, Manifest};
use tessera_ports::{
    ContextError, Invocation, LogLevel, MemoryWorld, ModuleImage, Runtime, RuntimeError, TaskContext, WorldState,
};
use tessera_wasm::{WasmLimits, WasmRuntime};

/// A task context over in-memory datasets and the in-process world state.
struct Ctx {
    datasets: BTreeMap<String, Bytes>,
    /// Files behind datasets, for mounting.
    files: BTreeMap<String, std::path::PathBuf>,
    world: MemoryWorld,
    logs: Mutex<Vec<String>>,
}

impl Ctx {
    fn new() -> Arc<Self> {
        let mut datasets = BTreeMap::new();
        datasets.insert("digits".to_string(), Bytes::from_static(b"0123456789"));
        Arc::new(Ctx { datasets, files: BTreeMap::new(), world: MemoryWorld::new(), logs: Mutex::new(Vec::new()) })
    }

    /// The `digits` dataset backed by `file`.
    fn with_file(file: &std::path::Path) -> Arc<Self> {
        let mut datasets = BTreeMap::new();
        datasets.insert("digits".to_string(), Bytes::from(std::fs::read(file).unwrap()));
        let files = [("digits".to_string(), file.to_owned())].into();
        Arc::new(Ctx { datasets, files, world: MemoryWorld::new(), logs: Mutex::new(Vec::new()) })
    }
}

#[async_trait]
impl TaskContext for Ctx {
    fn node(&self) -> &str {
        "node-t"
    }
    fn datasets(&self) -> Vec<String> {
        self.datasets.keys().cloned().collect()
    }
    // A dataset with a file is read by the runtime from the file, never through these.
    async fn dataset_size(&self, name: &str) -> Result<u64, ContextError> {
        if self.files.contains_key(name) {
            return Err(ContextError(format!("{name} has a file: read it")));
        }
        self.datasets.get(name).map(|d| d.len() as u64).ok_or_else(|| ContextError(format!("no dataset {name}")))
    }
    async fn dataset_read(&self, name: &str, offset: u64, len: u32) -> Result<Bytes, ContextError> {
        if self.files.contains_key(name) {
            return Err(ContextError(format!("{name} has a file: read it")));
        }
        let d = self.datasets.get(name).ok_or_else(|| ContextError(format!("no dataset {name}")))?;
        let start = (offset as usize).min(d.len());
        let end = (start + len as usize).min(d.len());
        Ok(d.slice(start..end))
    }
    fn dataset_file(&self, name: &str) -> Option<std::path::PathBuf> {
        self.files.get(name).cloned()
    }
    fn resources(&self) -> Resources {
        Resources { cpu: 2.0, memory: ByteSize(1 << 30), gpu: 0, disk: ByteSize(0) }
    }
    async fn globals_get(&self, key: &str) -> Result<Option<Bytes>, ContextError> {
        self.world.get(key).await.map(|e| e.map(|e| e.value)).map_err(|e| ContextError(e.to_string()))
    }
    async fn globals_set(&self, key: &str, value: Bytes) -> Result<(), ContextError> {
        self.world.put(key, value).await.map(|_| ()).map_err(|e| ContextError(e.to_string()))
    }
    async fn results_add(&self, key: &str, value: Bytes) -> Result<(), ContextError> {
        self.world.add_result(key, "node-t", value).await.map_err(|e| ContextError(e.to_string()))
    }
    async fn results_select(&self, key: &str) -> Result<Vec<(String, Bytes)>, ContextError> {
        let r = self.world.select_results(key, None).await.map_err(|e| ContextError(e.to_string()))?;
        Ok(r.into_iter().map(|r| (r.node, r.value)).collect())
    }
    fn log(&self, _level: LogLevel, message: &str) {
        self.logs.lock().unwrap().push(message.to_owned());
    }
}

fn image(dir: &std::path::Path, wasm: &[u8]) -> ModuleImage {
    image_with(dir, wasm, "")
}

/// An image whose manifest adds `more` (YAML lines).
fn image_with(dir: &std::path::Path, wasm: &[u8], more: &str) -> ModuleImage {
    std::fs::write(dir.join("module.wasm"), wasm).unwrap();
    let manifest = Manifest::parse(&format!(
        "name: test.programs\nversion: 0.1.0\nkind: task\nruntime: wasm\nentry: module.wasm\n{more}"
    ))
    .unwrap();
    ModuleImage { digest: Digest::of(wasm), manifest, root: dir.to_owned() }
}

fn runtime() -> WasmRuntime {
    WasmRuntime::new(WasmLimits {
        max_memory: 256 << 20,
        max_time: Duration::from_millis(1500),
        max_output_bytes: 4 << 20,
    })
    .unwrap()
}

fn call(mode: serde_json::Value) -> Invocation {
    Invocation { config: mode, inputs: vec![("x".into(), Bytes::from_static(b"payload"))], timeout: None }
}

async fn echo_still_works(rt: &WasmRuntime, img: &ModuleImage) {
    let out = rt.run(img, call(json!({"mode": "echo"})), Ctx::new()).await.expect("the next run works");
    assert_eq!(out, vec![("x".to_string(), Bytes::from_static(b"payload"))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_loops_forever_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let img = image(dir.path(), tessera_modules::TEST_PROGRAMS_WASM);
    let err = rt.run(&img, call(json!({"mode": "spin"})), Ctx::new()).await.unwrap_err();
    assert_eq!(err, RuntimeError::TimeLimit { limit_ms: 1500 });
    assert!(err.to_string().contains("time limit"));
    echo_still_works(&rt, &img).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_allocates_4_gib_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let img = image(dir.path(), tessera_modules::TEST_PROGRAMS_WASM);
    let err = rt.run(&img, call(json!({"mode": "alloc", "bytes": 4u64 << 30})), Ctx::new()).await.unwrap_err();
    assert_eq!(err, RuntimeError::MemoryLimit { limit_bytes: 256 << 20 });
    assert!(err.to_string().contains("memory limit"));
    echo_still_works(&rt, &img).await;
    // Within the limit, allocation works.
    let out = rt.run(&img, call(json!({"mode": "alloc", "bytes": 64u64 << 20})), Ctx::new()).await.unwrap();
    assert_eq!(out[0].0, "held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_and_failures_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let img = image(dir.path(), tessera_modules::TEST_PROGRAMS_WASM);
    let err = rt.run(&img, call(json!({"mode": "panic"})), Ctx::new()).await.unwrap_err();
    assert!(matches!(&err, RuntimeError::Trap(m) if m.contains("deliberate panic")), "{err}");
    let err = rt.run(&img, call(json!({"mode": "fail"})), Ctx::new()).await.unwrap_err();
    assert_eq!(err, RuntimeError::Module("deliberate failure".into()));
    let err = rt.run(&img, call(json!({"mode": "big-output", "bytes": 5u64 << 20})), Ctx::new()).await.unwrap_err();
    assert_eq!(err, RuntimeError::OutputLimit { limit_bytes: 4 << 20 });
    let err = rt.run(&img, call(json!({"nomode": 1})), Ctx::new()).await.unwrap_err();
    assert!(matches!(&err, RuntimeError::Module(m) if m.contains("mode")), "{err}");
    echo_still_works(&rt, &img).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_sees_its_task_context() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let img = image(dir.path(), tessera_modules::TEST_PROGRAMS_WASM);
    // A dataset the context reads for the module, and one whose file the runtime reads
    // itself (the test context refuses to read that one): the module sees the same bytes.
    let file = dir.path().join("digits.bin");
    std::fs::write(&file, b"0123456789").unwrap();
    for ctx in [Ctx::new(), Ctx::with_file(&file)] {
        a_module_sees(&rt, &img, ctx).await;
    }
}

async fn a_module_sees(rt: &WasmRuntime, img: &ModuleImage, ctx: Arc<Ctx>) {
    let out = rt.run(img, call(json!({"mode": "context", "dataset": "digits"})), ctx.clone()).await.unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out[0].1).unwrap();
    assert_eq!(report["node"], "node-t");
    assert_eq!(report["datasets"], json!(["digits"]));
    assert_eq!(report["size"], 10);
    assert_eq!(report["head"], "0123");
    assert_eq!(report["past_end"], 0);
    assert_eq!(report["tail"], "789");
    assert!(report["missing"].as_str().unwrap().contains("not-declared"));
    assert_eq!(report["cpu"], 2.0);
    assert_eq!(report["greeting"], "hello");
    assert_eq!(report["results"], json!(["node-t"]));
    assert!(report["bad_key"].as_str().unwrap().contains("invalid"), "{report}");
    assert!(ctx.logs.lock().unwrap().iter().any(|l| l.contains("context test starting")));
    // The module wrote through the context into the world state.
    assert_eq!(&ctx.world.get("greeting").await.unwrap().unwrap().value[..], b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_what_is_not_a_module() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    for bad in [&b"not wasm"[..], b"\0asm\x01\0\0\0", b""] {
        let img = image(dir.path(), bad);
        let err = rt.run(&img, call(json!({"mode": "echo"})), Ctx::new()).await.unwrap_err();
        assert!(matches!(err, RuntimeError::Load(_)), "{err}");
    }
    assert!(rt.validate(tessera_modules::TEST_PROGRAMS_WASM).is_ok());
    assert!(rt.validate(b"junk").is_err());
}

/// The output limit is the documented, configurable one: an output past wasmtime's default
/// bound on one host call (128 MiB) works under a larger limit, and one past the limit is
/// reported as the limit, not a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_output_limit_is_the_configured_one() {
    let dir = tempfile::tempdir().unwrap();
    let rt = WasmRuntime::new(WasmLimits {
        max_memory: 512 << 20,
        max_time: Duration::from_secs(60),
        max_output_bytes: 160 << 20,
    })
    .unwrap();
    let img = image(dir.path(), tessera_modules::TEST_PROGRAMS_WASM);
    let out = rt.run(&img, call(json!({"mode": "big-output", "bytes": 130u64 << 20})), Ctx::new()).await.unwrap();
    assert_eq!(out[0].1.len(), 130 << 20);
    drop(out);
    let err = rt.run(&img, call(json!({"mode": "big-output", "bytes": 170u64 << 20})), Ctx::new()).await.unwrap_err();
    assert_eq!(err, RuntimeError::OutputLimit { limit_bytes: 160 << 20 });
    echo_still_works(&rt, &img).await;
}

/// A run whose caller goes away (a cancelled call, a dropped request) stops at once instead
/// of running to its time limit: the work it would have finished never finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_caller_went_away_stops() {
    let dir = tempfile::tempdir().unwrap();
    let rt = WasmRuntime::new(WasmLimits {
        max_memory: 256 << 20,
        max_time: Duration::from_secs(60),
        max_output_bytes: 4 << 20,
    })
    .unwrap();
    let img = image(dir.path(), tessera_modules::TEST_PROGRAMS_WASM);
    let ctx = Ctx::new();
    // Not abandoned, the work finishes and leaves its result.
    rt.run(&img, call(json!({"mode": "work", "ms": 100})), ctx.clone()).await.unwrap();
    assert_eq!(ctx.results_select("work").await.unwrap().len(), 1);
    // Abandoned: a one-shot run, then a call on a long-lived instance.
    let (r, i, c) = (rt.clone(), img.clone(), ctx.clone());
    let run = tokio::spawn(async move { r.run(&i, call(json!({"mode": "work", "ms": 2500})), c).await });
    let mut inst = rt.start(&img, ctx.clone()).await.unwrap().unwrap();
    let on_instance = tokio::spawn(async move { inst.call(call(json!({"mode": "work", "ms": 2500}))).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    run.abort();
    on_instance.abort();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(ctx.results_select("work").await.unwrap().len(), 1, "the abandoned runs never finished their work");
}

/// Escape attempts from a component: each fails with its error at the caller, and the
/// next run works. (A component has no processes: fork bombs and children left behind
/// cannot be tried; memory and endless loops are tried above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escape_attempts_fail_and_the_next_run_works() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let img = image(dir.path(), tessera_modules::TEST_PROGRAMS_WASM);
    let node_home = tempfile::tempdir().unwrap();
    let key = node_home.path().join("nodes/node-a/keys/node.json");
    std::fs::create_dir_all(key.parent().unwrap()).unwrap();
    std::fs::write(&key, "secret").unwrap();
    let user_home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let outside = std::env::temp_dir().join(format!("tessera-wasm-escape-{}", std::process::id()));
    let attempts = [
        ("read-file", "/etc/passwd".to_owned()),
        ("read-file", key.display().to_string()),
        ("read-file", dir.path().join("module.wasm").display().to_string()),
        ("list-dir", user_home.clone()),
        ("list-dir", "/".into()),
        ("list-dir", node_home.path().display().to_string()),
        ("write-file", outside.display().to_string()),
        ("write-file", dir.path().join("planted").display().to_string()),
        ("write-file", "/scratch/../planted".into()),
    ];
    for (mode, path) in attempts {
        let r = rt.run(&img, call(json!({"mode": mode, "path": path})), Ctx::new()).await;
        assert!(matches!(&r, Err(RuntimeError::Module(m)) if m.contains(&path)), "{mode} {path}: {r:?}");
        echo_still_works(&rt, &img).await;
    }
    assert!(!outside.exists() && !dir.path().join("planted").exists());

    // A module that declares no disk space has no scratch folder.
    let r = rt.run(&img, call(json!({"mode": "write-file", "path": "/scratch/note"})), Ctx::new()).await;
    assert!(matches!(&r, Err(RuntimeError::Module(m)) if m.contains("/scratch/note")), "{r:?}");
    // One that does has a scratch folder, writable and its own: the next run starts with
    // an empty one.
    let img = image_with(dir.path(), tessera_modules::TEST_PROGRAMS_WASM, "needs:\n  storage: 1MiB\n");
    let out = rt.run(&img, call(json!({"mode": "write-file", "path": "/scratch/note"})), Ctx::new()).await.unwrap();
    assert_eq!(out[0].1.as_ref(), b"7");
    let r = rt.run(&img, call(json!({"mode": "read-file", "path": "/scratch/note"})), Ctx::new()).await;
    assert!(matches!(&r, Err(RuntimeError::Module(m)) if m.contains("/scratch/note")), "{r:?}");
    // Nor does a scratch folder lead out (to the scratch root, the system's temporary
    // folder here).
    let r = rt.run(&img, call(json!({"mode": "write-file", "path": "/scratch/../planted"})), Ctx::new()).await;
    assert!(matches!(&r, Err(RuntimeError::Module(m)) if m.contains("/scratch/../planted")), "{r:?}");
    assert!(!std::env::temp_dir().join("planted").exists());
    // An instance keeps its scratch folder across its calls, when it declares one.
    let mut inst = rt.start(&img, Ctx::new()).await.unwrap().unwrap();
    inst.call(call(json!({"mode": "write-file", "path": "/scratch/kept"}))).await.unwrap();
    let out = inst.call(call(json!({"mode": "read-file", "path": "/scratch/kept"}))).await.unwrap();
    assert_eq!(out[0].1.as_ref(), b"7", "the instance reads what it wrote");
    let plain = image_with(dir.path(), tessera_modules::TEST_PROGRAMS_WASM, "");
    let mut inst = rt.start(&plain, Ctx::new()).await.unwrap().unwrap();
    let r = inst.call(call(json!({"mode": "write-file", "path": "/scratch/kept"}))).await;
    assert!(matches!(&r, Err(RuntimeError::Module(m)) if m.contains("/scratch/kept")), "{r:?}");

    // No sockets.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let r = rt.run(&img, call(json!({"mode": "connect", "port": port})), Ctx::new()).await;
    assert!(matches!(&r, Err(RuntimeError::Module(m)) if m.contains("connect")), "{r:?}");
    assert!(listener.accept().is_err(), "nothing connected");
    echo_still_works(&rt, &img).await;

    // Gigabytes to stdout: the captured stream is bounded, and the run fails.
    let r = rt.run(&img, call(json!({"mode": "print", "bytes": 4u64 << 30})), Ctx::new()).await;
    assert!(r.is_err(), "{r:?}");
    echo_still_works(&rt, &img).await;
}

/// The task's datasets are at `/datasets/<name>`, read-only; nothing else is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datasets_are_mounted_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("digits.csv");
    std::fs::write(&file, "0,1,2,3,4\n5,6,7,8,9\n").unwrap();
    let rt = runtime().with_scratch_root(data.path().to_owned());
    let img = image(dir.path(), tessera_modules::TEST_PROGRAMS_WASM);
    let run = |mode: &str, path: &str, ctx: Arc<Ctx>| {
        let (rt, img) = (&rt, &img);
        let config = json!({"mode": mode, "path": path});
        async move { rt.run(img, call(config), ctx).await }
    };
    let out = run("read-file", "/datasets/digits", Ctx::with_file(&file)).await.unwrap();
    assert_eq!(out[0].1.as_ref(), b"20");
    let out = run("list-dir", "/datasets", Ctx::with_file(&file)).await.unwrap();
    assert_eq!(out[0].1.as_ref(), b"1");
    let r = run("write-file", "/datasets/digits", Ctx::with_file(&file)).await;
    assert!(matches!(&r, Err(RuntimeError::Module(m)) if m.contains("/datasets/digits")), "{r:?}");
    let r = run("write-file", "/datasets/planted", Ctx::with_file(&file)).await;
    assert!(matches!(&r, Err(RuntimeError::Module(m)) if m.contains("/datasets/planted")), "{r:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "0,1,2,3,4\n5,6,7,8,9\n");
    // A task without the dataset's file sees none.
    let out = run("list-dir", "/datasets", Ctx::new()).await.unwrap();
    assert_eq!(out[0].1.as_ref(), b"0");
    // Runs share a view of the same files; a file replaced under its name is what the
    // next run reads.
    let new = data.path().join("digits.new");
    std::fs::write(&new, "42\n").unwrap();
    std::fs::rename(&new, &file).unwrap();
    let out = run("read-file", "/datasets/digits", Ctx::with_file(&file)).await.unwrap();
    assert_eq!(out[0].1.as_ref(), b"3");
    // The runs' folders are reused while the runtime lives, and gone with it.
    drop(rt);
    let left: Vec<_> = std::fs::read_dir(data.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("digits.csv")]);
}
