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
    node: String,
    /// The reuse scope it gives (`None`: its runs share nothing).
    scope: Option<String>,
}

impl Ctx {
    fn new() -> Arc<Self> {
        let mut datasets = BTreeMap::new();
        datasets.insert("digits".to_string(), Bytes::from_static(b"0123456789"));
        Arc::new(Ctx {
            datasets,
            files: BTreeMap::new(),
            world: MemoryWorld::new(),
            logs: Mutex::new(Vec::new()),
            node: "node-t".into(),
            scope: None,
        })
    }

    /// A context of `node` whose runs give the reuse scope `scope`, with the `digits`
    /// dataset backed by `file` when given.
    fn scoped(node: &str, scope: Option<&str>, file: Option<&std::path::Path>) -> Arc<Self> {
        let base = match file {
            Some(f) => Ctx::with_file(f),
            None => Ctx::new(),
        };
        let mut ctx = Arc::into_inner(base).unwrap();
        ctx.node = node.into();
        ctx.scope = scope.map(str::to_owned);
        Arc::new(ctx)
    }

    /// The `digits` dataset backed by `file`.
    fn with_file(file: &std::path::Path) -> Arc<Self> {
        let mut datasets = BTreeMap::new();
        datasets.insert("digits".to_string(), Bytes::from(std::fs::read(file).unwrap()));
        let files = [("digits".to_string(), file.to_owned())].into();
        Arc::new(Ctx {
            datasets,
            files,
            world: MemoryWorld::new(),
            logs: Mutex::new(Vec::new()),
            node: "node-t".into(),
            scope: None,
        })
    }
}

#[async_trait]
impl TaskContext for Ctx {
    fn node(&self) -> &str {
        &self.node
    }
    fn reuse_scope(&self) -> Option<&str> {
        self.scope.as_deref()
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

/// A runtime and the test programs with `reuse: session`, in a folder kept as long as it.
fn reusable() -> (tempfile::TempDir, WasmRuntime, ModuleImage) {
    let dir = tempfile::tempdir().unwrap();
    let img = image_with(dir.path(), tessera_modules::TEST_PROGRAMS_WASM, "reuse: session\n");
    (dir, runtime(), img)
}

/// The counter a `count` run of the test programs reads after adding one: 1 in a fresh
/// instance.
async fn count(rt: &WasmRuntime, img: &ModuleImage, ctx: &Arc<Ctx>) -> u64 {
    let out = rt.run(img, call(json!({"mode": "count"})), ctx.clone()).await.expect("count runs");
    std::str::from_utf8(&out[0].1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_is_reused_only_by_runs_of_its_module_node_scope_and_datasets() {
    let (dir, rt, reused) = reusable();
    let alice = Ctx::scoped("node-a", Some("s1 alice"), None);
    assert_eq!(count(&rt, &reused, &alice).await, 1);
    assert_eq!(count(&rt, &reused, &alice).await, 2, "the same scope runs in the instance it left");
    assert_eq!(count(&rt, &reused, &Ctx::scoped("node-a", Some("s1 alice"), None)).await, 3, "a new task, same scope");
    assert_eq!(rt.idle_instances(), 1);
    // Another account, another session, another node: an instance of its own each.
    assert_eq!(count(&rt, &reused, &Ctx::scoped("node-a", Some("s1 bob"), None)).await, 1);
    assert_eq!(count(&rt, &reused, &Ctx::scoped("node-a", Some("s2 alice"), None)).await, 1);
    assert_eq!(count(&rt, &reused, &Ctx::scoped("node-b", Some("s1 alice"), None)).await, 1);
    // Other datasets (here: the same name backed by another file): not shared either.
    let file = dir.path().join("digits.bin");
    std::fs::write(&file, b"other rows").unwrap();
    assert_eq!(count(&rt, &reused, &Ctx::scoped("node-a", Some("s1 alice"), Some(&file))).await, 1);
    // No scope: nothing shared, even for a module that allows it.
    let unscoped = Ctx::scoped("node-a", None, None);
    assert_eq!(count(&rt, &reused, &unscoped).await, 1);
    assert_eq!(count(&rt, &reused, &unscoped).await, 1);
    // A module that does not allow reuse gets a fresh instance every run.
    let dir2 = tempfile::tempdir().unwrap();
    let fresh = image(dir2.path(), tessera_modules::TEST_PROGRAMS_WASM);
    assert_eq!(count(&rt, &fresh, &alice).await, 1);
    assert_eq!(count(&rt, &fresh, &alice).await, 1);
    assert_eq!(count(&rt, &reused, &alice).await, 4, "the first instance is still there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_instance_that_traps_or_breaks_a_limit_is_dropped() {
    let (_dir, rt, img) = reusable();
    let ctx = Ctx::scoped("node-a", Some("s1 alice"), None);
    assert_eq!(count(&rt, &img, &ctx).await, 1);
    // A module's own error returns normally: its instance goes on.
    let e = rt.run(&img, call(json!({"mode": "fail"})), ctx.clone()).await.unwrap_err();
    assert!(matches!(e, RuntimeError::Module(_)), "{e:?}");
    assert_eq!(count(&rt, &img, &ctx).await, 2);
    // A trap leaves the instance in an unknown state: the next run gets a new one.
    let e = rt.run(&img, call(json!({"mode": "panic"})), ctx.clone()).await.unwrap_err();
    assert!(matches!(e, RuntimeError::Trap(_)), "{e:?}");
    assert_eq!(count(&rt, &img, &ctx).await, 1);
    let e = rt.run(&img, call(json!({"mode": "spin"})), ctx.clone()).await.unwrap_err();
    assert!(matches!(e, RuntimeError::TimeLimit { .. }), "{e:?}");
    assert_eq!(count(&rt, &img, &ctx).await, 1);
    let e = rt.run(&img, call(json!({"mode": "alloc", "bytes": 4u64 << 30})), ctx.clone()).await.unwrap_err();
    assert!(matches!(e, RuntimeError::MemoryLimit { .. }), "{e:?}");
    assert_eq!(count(&rt, &img, &ctx).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_run_of_a_reused_instance_has_its_own_output() {
    let (_dir, rt, img) = reusable();
    let ctx = Ctx::scoped("node-a", Some("s1 alice"), None);
    // Three quarters of the 1 MiB a run may print, three times: each run has the whole
    // allowance, and its log holds its own lines only.
    for run in 1..=3 {
        let out = rt.run(&img, call(json!({"mode": "print", "bytes": 12 * 65536})), ctx.clone()).await;
        assert!(out.is_ok(), "run {run}: {out:?}");
        let logs = ctx.logs.lock().unwrap();
        assert_eq!(logs.len(), run);
        assert_eq!(logs[run - 1].len(), 12 * 65536 - 1, "run {run} logged its own output once");
    }
    assert_eq!(rt.idle_instances(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_instances_are_bounded_in_number_and_memory() {
    let (_dir, rt, img) = reusable();
    for s in 0..tessera_wasm::warm::WARM_INSTANCES + 5 {
        let ctx = Ctx::scoped("node-a", Some(&format!("s{s} alice")), None);
        assert_eq!(count(&rt, &img, &ctx).await, 1);
    }
    assert_eq!(rt.idle_instances(), tessera_wasm::warm::WARM_INSTANCES);
    // The oldest went first: the newest scope still has its instance.
    let newest = Ctx::scoped("node-a", Some(&format!("s{} alice", tessera_wasm::warm::WARM_INSTANCES + 4)), None);
    assert_eq!(count(&rt, &img, &newest).await, 2);
    let oldest = Ctx::scoped("node-a", Some("s0 alice"), None);
    assert_eq!(count(&rt, &img, &oldest).await, 1);
    // Instances holding 64 MiB and more each (under half the runtime's 256 MiB limit): no
    // more than fit in WARM_BYTES stay idle, the oldest let go first.
    let before = rt.idle_memory();
    let big = tessera_wasm::warm::WARM_BYTES / (64 << 20);
    let mut one = 0;
    for s in 0..big + 2 {
        let ctx = Ctx::scoped("node-b", Some(&format!("s{s} alice")), None);
        assert_eq!(count(&rt, &img, &ctx).await, 1);
        rt.run(&img, call(json!({"mode": "alloc", "bytes": 64u64 << 20})), ctx).await.expect("64 MiB fits");
        if s == 0 {
            one = rt.idle_memory() - before;
            assert!(one >= 64 << 20, "the instance holds what it grew: {one}");
        }
        assert!(rt.idle_memory() <= tessera_wasm::warm::WARM_BYTES, "{} bytes idle", rt.idle_memory());
    }
    assert!(rt.idle_memory() + one > tessera_wasm::warm::WARM_BYTES, "the pool is full to within one instance");
    let last_big = Ctx::scoped("node-b", Some(&format!("s{} alice", big + 1)), None);
    assert_eq!(count(&rt, &img, &last_big).await, 2, "the newest large instance is kept");
    let first_big = Ctx::scoped("node-b", Some("s0 alice"), None);
    assert_eq!(count(&rt, &img, &first_big).await, 1, "the oldest large instance was let go");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_holding_more_than_half_the_memory_limit_is_not_reused() {
    let (_dir, rt, img) = reusable();
    let ctx = Ctx::scoped("node-a", Some("s1 alice"), None);
    assert_eq!(count(&rt, &img, &ctx).await, 1);
    // 128 MiB and the module's own heap: past half of the 256 MiB limit. Kept, the next run
    // could grow only what the earlier ones left it.
    rt.run(&img, call(json!({"mode": "alloc", "bytes": 128u64 << 20})), ctx.clone()).await.expect("128 MiB fits");
    assert_eq!(rt.idle_instances(), 0);
    assert_eq!(count(&rt, &img, &ctx).await, 1, "a fresh instance");
    let out = rt.run(&img, call(json!({"mode": "alloc", "bytes": 192u64 << 20})), ctx.clone()).await;
    assert!(out.is_ok(), "a fresh instance has the whole limit: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_file_replaced_at_its_path_gets_a_new_instance() {
    let (dir, rt, img) = reusable();
    let file = dir.path().join("digits.bin");
    std::fs::write(&file, b"first rows").unwrap();
    let ctx = Ctx::scoped("node-a", Some("s1 alice"), Some(&file));
    assert_eq!(count(&rt, &img, &ctx).await, 1);
    assert_eq!(count(&rt, &img, &ctx).await, 2);
    // Replaced the way data is published (a new file renamed over the old): an instance
    // that read the old rows must not serve the new ones.
    let next = dir.path().join("digits.next");
    std::fs::write(&next, b"other rows").unwrap();
    std::fs::rename(&next, &file).unwrap();
    assert_eq!(count(&rt, &img, &ctx).await, 1);
}

/// The softmax worker's evaluation of its zero model (which predicts class 0 for every
/// row) on `ctx`'s `digits` dataset: the accuracy, the share of rows labelled 0.
async fn zero_model_accuracy(rt: &WasmRuntime, img: &ModuleImage, ctx: &Arc<Ctx>) -> f64 {
    let config = |mode: &str| json!({"mode": mode, "features": 2, "classes": 2});
    let init = Invocation { config: config("init"), inputs: vec![], timeout: None };
    let model = rt.run(img, init, ctx.clone()).await.expect("init runs").remove(0).1;
    let evaluate = Invocation { config: config("evaluate"), inputs: vec![("model".into(), model)], timeout: None };
    let out = rt.run(img, evaluate, ctx.clone()).await.expect("evaluate runs");
    let metrics: serde_json::Value = serde_json::from_slice(&out[0].1).unwrap();
    metrics["accuracy"].as_f64().unwrap()
}

/// Four rows of two features labelled `label`, as the softmax worker reads them.
fn rows_labelled(label: f32) -> Vec<u8> {
    use tessera_core::tensor::{Tensor, Tensors};
    let x = Tensor { shape: vec![4, 2], data: vec![0.5; 8] };
    let y = Tensor { shape: vec![4], data: vec![label; 4] };
    Tensors([("x".to_string(), x), ("y".to_string(), y)].into()).encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_worker_reads_a_dataset_rewritten_in_place_afresh() {
    // The softmax worker (`reuse: session`) runs a session's tasks in one instance. Rows
    // rewritten in place with everything the runtime's reuse key sees kept (path, inode,
    // size, modification time) are still read afresh: what a module keeps between tasks
    // must not stand for its dataset.
    let dir = tempfile::tempdir().unwrap();
    let img = {
        std::fs::write(dir.path().join("module.wasm"), tessera_modules::FL_SOFTMAX_WORKER_WASM).unwrap();
        let manifest = Manifest::parse(tessera_modules::FL_SOFTMAX_WORKER_MANIFEST).unwrap();
        assert_eq!(manifest.reuse, tessera_core::manifest::Reuse::Session, "the worker is reused");
        ModuleImage {
            digest: Digest::of(tessera_modules::FL_SOFTMAX_WORKER_WASM),
            manifest,
            root: dir.path().to_owned(),
        }
    };
    let rt = runtime();
    let file = dir.path().join("digits.safetensors");
    std::fs::write(&file, rows_labelled(0.0)).unwrap();
    let ctx = Ctx::scoped("node-a", Some("s1 alice"), Some(&file));
    assert_eq!(zero_model_accuracy(&rt, &img, &ctx).await, 1.0);
    assert_eq!(rt.idle_instances(), 1, "the worker's instance waits for the session's next task");
    let relabelled = rows_labelled(1.0);
    let before = std::fs::metadata(&file).unwrap();
    assert_eq!(relabelled.len() as u64, before.len(), "the same size");
    std::fs::write(&file, relabelled).unwrap();
    std::fs::File::options().write(true).open(&file).unwrap().set_modified(before.modified().unwrap()).unwrap();
    let after = std::fs::metadata(&file).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((after.ino(), after.modified().unwrap()), (before.ino(), before.modified().unwrap()));
    assert_eq!(zero_model_accuracy(&rt, &img, &ctx).await, 0.0, "the rewritten rows");
    assert_eq!(rt.idle_instances(), 1, "in the reused instance");
}
