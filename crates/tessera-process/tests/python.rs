//! The python runtime with a real interpreter (`TESSERA_PYTHON`, else `python3`) and the
//! embedded SDK.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use serde_json::json;
use tessera_core::tensor::{Tensor, TensorLimits, Tensors};
use tessera_ports::{Instance, Invocation, LogLevel, Runtime, RuntimeError};
use tessera_process::{ProcessInstance, ProcessLimits};

const COUNTER: &str = r#"
import time
import tessera

class Counter(tessera.Task):
    def __init__(self):
        self.n = 0

    def add(self, k=1):
        self.n += k
        return self.n

    def combine(self, a, b, *, sep="-"):
        return f"{a}{sep}{b}"

    def typed(self, n: int, label: str = "x"):
        return [n, label]

    def fail(self, message):
        raise ValueError(message)

    def sleep(self, seconds):
        time.sleep(seconds)
        return "woke"

    def noisy(self):
        print("hello from print")
        self.log.warning("careful")
        return None

    def big(self, n):
        return b"x" * n

    def die(self, code):
        import os
        os._exit(code)

    def _private(self):
        return "hidden"

    @tessera.expose("shown")
    def _also_private(self):
        return "shown"
"#;

async fn counter() -> (Python, Module, ProcessInstance, std::sync::Arc<Ctx>) {
    let py = python_runtime(ProcessLimits::default());
    let m = py_module(COUNTER);
    let ctx = Ctx::new();
    let inst = py.runtime.spawn(&m.image, ctx.clone()).await.unwrap();
    (py, m, inst, ctx)
}

#[tokio::test]
async fn an_instance_keeps_its_state_across_calls() {
    let (_py, _m, mut inst, _ctx) = counter().await;
    assert_eq!(
        inst.functions(),
        ["add", "big", "combine", "die", "fail", "noisy", "shown", "sleep", "typed"].map(String::from)
    );
    assert!(inst.hooks().is_empty());
    let pid = inst.pid().unwrap();
    assert_eq!(result_json(&inst.call(call("add", json!([]), json!({"k": 2}))).await), json!(2));
    assert_eq!(result_json(&inst.call(call("add", json!([]), json!({}))).await), json!(3));
    assert_eq!(result_json(&inst.call(call("add", json!([5]), json!({}))).await), json!(8));
    assert_eq!(result_json(&inst.call(call("shown", json!([]), json!({}))).await), json!("shown"));
    assert!(inst.healthy());
    assert_eq!(inst.pid(), Some(pid));
}

#[tokio::test]
async fn args_and_kwargs_are_passed() {
    let (_py, _m, mut inst, _ctx) = counter().await;
    let r = inst.call(call("combine", json!(["a", "b"]), json!({"sep": "+"}))).await;
    assert_eq!(result_json(&r), json!("a+b"));
    let r = inst.call(call("combine", json!([1]), json!({"b": [2, 3]}))).await;
    assert_eq!(result_json(&r), json!("1-[2, 3]"));
}

#[tokio::test]
async fn an_exception_is_a_module_error_and_the_next_call_works() {
    let (_py, _m, mut inst, ctx) = counter().await;
    let msg = module_error(inst.call(call("fail", json!(["boom at 42"]), json!({}))).await);
    assert!(msg.contains("ValueError: boom at 42"), "{msg}");
    assert!(msg.contains("model.py") && msg.contains("in fail"), "{msg}");
    assert!(!msg.contains("host.py"), "the host's own frames are left out: {msg}");
    assert!(ctx.has_log(LogLevel::Warn, "Traceback"), "the whole traceback goes to the log");
    assert!(inst.healthy());
    assert_eq!(result_json(&inst.call(call("add", json!([]), json!({}))).await), json!(1));
}

#[tokio::test]
async fn an_unknown_function_is_named_with_the_exposed_ones() {
    let (_py, _m, mut inst, _ctx) = counter().await;
    let msg = module_error(inst.call(call("foo", json!([]), json!({}))).await);
    assert!(msg.contains(r#"unknown function "foo" (exposed: add, big, combine, die, fail"#), "{msg}");
    let msg = module_error(inst.call(call("_private", json!([]), json!({}))).await);
    assert!(msg.contains(r#"unknown function "_private""#), "{msg}");
    assert!(inst.healthy());
}

#[tokio::test]
async fn wrong_arguments_are_refused_before_the_call() {
    let (_py, _m, mut inst, _ctx) = counter().await;
    let msg = module_error(inst.call(call("add", json!([1, 2, 3]), json!({}))).await);
    assert!(msg.contains("bad arguments for add(k=1)") && msg.contains("too many positional arguments"), "{msg}");
    let msg = module_error(inst.call(call("combine", json!([]), json!({"nope": 1}))).await);
    assert!(msg.contains("bad arguments for combine"), "{msg}");
    let msg = module_error(inst.call(call("typed", json!(["seven"]), json!({}))).await);
    assert!(msg.contains("n must be int, not str"), "{msg}");
    let msg = module_error(inst.call(call("typed", json!([true]), json!({}))).await);
    assert!(msg.contains("n must be int, not bool"), "{msg}");
    let msg = module_error(inst.call(call("typed", json!([7]), json!({"label": 3}))).await);
    assert!(msg.contains("label must be str, not int"), "{msg}");
    // Nothing ran: the counter is untouched.
    assert_eq!(result_json(&inst.call(call("typed", json!([7]), json!({}))).await), json!([7, "x"]));
    assert_eq!(result_json(&inst.call(call("add", json!([]), json!({}))).await), json!(1));
}

#[tokio::test]
async fn a_time_out_kills_the_process() {
    let (_py, _m, mut inst, _ctx) = counter().await;
    let mut inv = call("sleep", json!([60]), json!({}));
    inv.timeout = Some(Duration::from_millis(300));
    let r = inst.call(inv).await;
    assert_eq!(r, Err(RuntimeError::TimeLimit { limit_ms: 300 }));
    assert!(!inst.healthy());
    let r = inst.call(call("add", json!([]), json!({}))).await;
    assert!(matches!(r, Err(RuntimeError::Trap(ref m)) if m.contains("time limit")), "{r:?}");
}

#[tokio::test]
async fn the_runtime_time_limit_applies_without_a_call_time_out() {
    let py = python_runtime(ProcessLimits { max_time: Duration::from_millis(400), ..ProcessLimits::default() });
    let m = py_module(COUNTER);
    let mut inst = py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    let mut inv = call("sleep", json!([60]), json!({}));
    inv.timeout = Some(Duration::from_secs(100));
    assert_eq!(inst.call(inv).await, Err(RuntimeError::TimeLimit { limit_ms: 400 }));
}

#[tokio::test]
async fn a_process_killed_from_outside_is_noticed() {
    let (_py, _m, mut inst, _ctx) = counter().await;
    assert_eq!(result_json(&inst.call(call("add", json!([]), json!({}))).await), json!(1));
    let pid = inst.pid().unwrap();
    let status = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(status.success());
    // The kernel reaps asynchronously: wait for it (bounded), then check.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while inst.healthy() {
        assert!(std::time::Instant::now() < deadline, "healthy() still true 30 s after kill -9");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Dead before the call reached it: `Gone` (the call had no effect; a new instance may
    // take it).
    let r = inst.call(call("add", json!([]), json!({}))).await;
    assert!(matches!(r, Err(RuntimeError::Gone(ref m)) if m.contains("process exited with signal: 9")), "{r:?}");
}

#[tokio::test]
async fn a_process_exiting_during_a_call_is_a_trap() {
    let (_py, _m, mut inst, _ctx) = counter().await;
    let r = inst.call(call("die", json!([3]), json!({}))).await;
    assert!(matches!(r, Err(RuntimeError::Trap(ref m)) if m.contains("process exited with exit status: 3")), "{r:?}");
    assert!(!inst.healthy());
}

#[tokio::test]
async fn print_goes_to_the_log_not_the_channel() {
    let (_py, _m, mut inst, ctx) = counter().await;
    assert_eq!(result_json(&inst.call(call("noisy", json!([]), json!({}))).await), json!(null));
    assert!(ctx.has_log(LogLevel::Warn, "careful"));
    // stderr is read by another task: wait for the line (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ctx.has_log(LogLevel::Info, "hello from print") {
        assert!(std::time::Instant::now() < deadline, "print() output never reached the log: {:?}", ctx.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(inst.healthy());
}

#[tokio::test]
async fn outputs_over_the_limit_are_refused() {
    let limits = ProcessLimits { max_output_bytes: 1000, max_message_bytes: 4096, ..ProcessLimits::default() };
    let py = python_runtime(limits);
    let m = py_module(COUNTER);
    let mut inst = py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    assert_eq!(inst.call(call("big", json!([1000]), json!({}))).await.unwrap()[0].1.len(), 1000);
    // Over the output limit but within a frame: read, refused, the instance carries on.
    let r = inst.call(call("big", json!([3000]), json!({}))).await;
    assert_eq!(r.unwrap_err(), RuntimeError::OutputLimit { limit_bytes: 1000 });
    assert!(inst.healthy());
    assert_eq!(result_json(&inst.call(call("add", json!([]), json!({}))).await), json!(1));
    // Over the frame limit too: the blob is not read, so the process is dropped.
    let r = inst.call(call("big", json!([10_000]), json!({}))).await;
    assert!(matches!(r, Err(RuntimeError::Trap(ref m)) if m.contains("protocol") && m.contains("exceeds")), "{r:?}");
    assert!(!inst.healthy());
}

#[tokio::test]
async fn the_task_context_round_trips() {
    let data = tempfile::NamedTempFile::new().unwrap();
    let content: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(data.path(), &content).unwrap();
    let code = r#"
import hashlib
import os
import tessera

class Probe(tessera.Task):
    def run(self):
        ds = self.local.dataset("data")
        whole = ds.bytes()
        part = ds.read(100, 5)
        try:
            self.local.dataset("missing").size
            missing = "no error"
        except tessera.ContextError as e:
            missing = str(e)
        g = self.world.globals
        g["plain"] = {"lr": 0.5}
        g["raw"] = b"\x00\x01"
        self.world.results.add("acc", 0.9)
        self.log.info("probing")
        # run() returns its named outputs: one, `result`.
        return {"result": {
            "datasets": self.local.datasets(),
            "size": ds.size,
            "sha": hashlib.sha256(whole).hexdigest(),
            "part": list(part),
            "missing": missing,
            "cpu": self.local.resources()["cpu"],
            "plain": g["plain"],
            "raw": list(g.get_bytes("raw")),
            "absent": g.get("absent", "default"),
            "results": self.world.results.select("acc"),
            "config": self.config.get("note"),
            "env": sorted(k for k in os.environ if k.startswith("TESSERA_")),
        }}
"#;
    let py = python_runtime(ProcessLimits::default());
    let m = py_module(code);
    let ctx = Ctx::with_dataset("data", data.path());
    let inv = Invocation { config: json!({"note": "hi"}), inputs: Vec::new(), timeout: None };
    let r = py.runtime.run(&m.image, inv, ctx.clone()).await;
    let v = result_json(&r);
    let sha = {
        // sha256 of the content, computed by the interpreter for comparison.
        let out = std::process::Command::new(python())
            .args(["-c", "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())"])
            .arg(data.path())
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(v["datasets"], json!(["data"]));
    assert_eq!(v["size"], json!(10_000));
    assert_eq!(v["sha"], json!(sha));
    assert_eq!(v["part"], json!(content[100..105]));
    assert!(v["missing"].as_str().unwrap().contains("no dataset \"missing\""), "{v}");
    assert_eq!(v["cpu"], json!(2.0));
    assert_eq!(v["plain"], json!({"lr": 0.5}));
    assert_eq!(v["raw"], json!([0, 1]));
    assert_eq!(v["absent"], json!("default"));
    assert_eq!(v["results"], json!([["node-z", "from z"], ["node-a", 0.9]]));
    assert_eq!(v["config"], json!("hi"));
    // The node's TESSERA_* variables (TESSERA_PYTHON when set, secrets) are not passed on.
    assert_eq!(v["env"], json!(["TESSERA_MODULE", "TESSERA_PROTOCOL"]));
    assert_eq!(ctx.globals.lock().unwrap().get("plain").unwrap().as_ref(), br#"{"lr": 0.5}"#);
    assert_eq!(ctx.globals.lock().unwrap().get("raw").unwrap().as_ref(), b"\x00\x01");
    assert!(ctx.has_log(LogLevel::Info, "probing"));
}

#[tokio::test]
async fn tensors_go_in_and_out() {
    require_numpy();
    let code = r#"
import numpy as np
import tessera

class Scaler(tessera.Task):
    def scale(self, x, factor: float):
        return x * factor

    def pair(self, weights):
        return {k: float(v.sum()) for k, v in sorted(weights.items())}

    def ints(self):
        return np.arange(6, dtype=np.int64).reshape(2, 3)

    def run(self):
        model = self.inputs["model"] * 2
        return {"model": model.astype(np.float32), "metrics": {"n": int(model.size), "mean": np.float32(model.mean())}}
"#;
    let py = python_runtime(ProcessLimits::default());
    let m = py_module(code);
    let mut inst = py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    let x = Tensors(
        [("data".to_string(), Tensor { shape: vec![2, 3], data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5] })]
            .into_iter()
            .collect(),
    );
    let mut inv = call("scale", json!([]), json!({"factor": 2}));
    inv.inputs = vec![("x".into(), Bytes::from(x.encode()))];
    let out = inst.call(inv).await.unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, "result");
    let y = Tensors::decode(&out[0].1, TensorLimits::default()).unwrap();
    let t = &y.0["data"];
    assert_eq!(t.shape, vec![2, 3]);
    assert_eq!(t.data, vec![2.0, 4.0, 6.0, 8.0, 10.0, 13.0]);

    // Several tensors in one input arrive as a dict.
    let two = Tensors(
        [("a".to_string(), Tensor::zeros(&[2])), ("b".to_string(), Tensor { shape: vec![3], data: vec![1.0; 3] })]
            .into_iter()
            .collect(),
    );
    let mut inv = call("pair", json!([]), json!({}));
    inv.inputs = vec![("weights".into(), Bytes::from(two.encode()))];
    assert_eq!(result_json(&inst.call(inv).await), json!({"a": 0.0, "b": 3.0}));

    // Non-F32 tensors are valid safetensors too.
    let out = inst.call(call("ints", json!([]), json!({}))).await.unwrap();
    let st = safetensors::SafeTensors::deserialize(&out[0].1).unwrap();
    let view = st.tensor("data").unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::I64);
    assert_eq!(view.shape(), [2, 3]);
    assert_eq!(&view.data()[8..16], &1i64.to_le_bytes());

    // run() with an input it does not name, returning a dict with a tensor: one output per key.
    let inv = Invocation { config: json!({}), inputs: vec![("model".into(), Bytes::from(x.encode()))], timeout: None };
    let out = inst.call(inv).await.unwrap();
    let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["model", "metrics"]);
    let model = Tensors::decode(&out[0].1, TensorLimits::default()).unwrap();
    assert_eq!(model.0["data"].data, vec![2.0, 4.0, 6.0, 8.0, 10.0, 13.0]);
    let metrics: serde_json::Value = serde_json::from_slice(&out[1].1).unwrap();
    assert_eq!(metrics, json!({"n": 6, "mean": 7.166666507720947}));
}

#[tokio::test]
async fn state_hooks_save_and_restore_local_state() {
    let code = r#"
import tessera

class Counter(tessera.Task):
    stateful = True

    def add(self, k=1):
        self.local.state["n"] = self.local.state.get("n", 0) + k
        return self.local.state["n"]
"#;
    let py = python_runtime(ProcessLimits::default());
    let m = py_module(code);
    let mut a = py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    assert_eq!(a.hooks(), ["save_state", "restore_state"].map(String::from));
    assert_eq!(a.functions(), ["add".to_string()]);
    for _ in 0..3 {
        a.call(call("add", json!([]), json!({}))).await.unwrap();
    }
    let saved = a.call(call("save_state", json!([]), json!({}))).await.unwrap();
    assert_eq!(saved.len(), 1);
    assert_eq!(saved[0].0, "state");
    drop(a);

    let mut b = py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    let mut restore = call("restore_state", json!([]), json!({}));
    restore.inputs = vec![("state".into(), saved[0].1.clone())];
    b.call(restore).await.unwrap();
    assert_eq!(result_json(&b.call(call("add", json!([]), json!({}))).await), json!(4));
    let msg = module_error(b.call(call("restore_state", json!([]), json!({}))).await);
    assert!(msg.contains(r#"needs an input named "state""#), "{msg}");

    // Custom hooks are used as they are; a class without hooks has none.
    let custom = r#"
import tessera

class Custom(tessera.Task):
    def __init__(self):
        self.value = b""

    def save_state(self):
        return b"custom:" + self.value

    def restore_state(self, state):
        self.value = state

    def get(self):
        return self.value.decode()
"#;
    let m2 = py_module(custom);
    let mut c = py.runtime.spawn(&m2.image, Ctx::new()).await.unwrap();
    assert_eq!(c.hooks(), ["save_state", "restore_state"].map(String::from));
    assert_eq!(c.functions(), ["get".to_string()]);
    let mut restore = call("restore_state", json!([]), json!({}));
    restore.inputs = vec![("state".into(), Bytes::from_static(b"abc"))];
    c.call(restore).await.unwrap();
    assert_eq!(result_json(&c.call(call("get", json!([]), json!({}))).await), json!("abc"));
    let saved = c.call(call("save_state", json!([]), json!({}))).await.unwrap();
    assert_eq!(saved[0].1.as_ref(), b"custom:abc");

    let (_py, _m, mut plain, _ctx) = counter().await;
    let msg = module_error(plain.call(call("save_state", json!([]), json!({}))).await);
    assert!(msg.contains(r#"unknown function "save_state""#), "{msg}");
}

#[tokio::test]
async fn setup_runs_once_before_the_first_call() {
    let code = r#"
import tessera

class Model(tessera.Task):
    def setup(self):
        self.calls = getattr(self, "calls", 0) + 1

    def setups(self):
        return self.calls
"#;
    let py = python_runtime(ProcessLimits::default());
    let m = py_module(code);
    let mut inst = py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    assert_eq!(inst.functions(), ["setups".to_string()]);
    assert_eq!(result_json(&inst.call(call("setups", json!([]), json!({}))).await), json!(1));
    assert_eq!(result_json(&inst.call(call("setups", json!([]), json!({}))).await), json!(1));
}

#[tokio::test]
async fn a_one_shot_run_calls_run_and_stops_the_process() {
    let code = r#"
import tessera

class Job(tessera.Task):
    def run(self):
        return {"result": {"answer": 42, "inputs": sorted(self.inputs)}}

    def other(self, x):
        return x + 1
"#;
    let py = python_runtime(ProcessLimits::default());
    let m = py_module(code);
    let inv =
        Invocation { config: json!({}), inputs: vec![("blob".into(), Bytes::from_static(b"raw"))], timeout: None };
    let r = py.runtime.run(&m.image, inv, Ctx::new()).await;
    assert_eq!(result_json(&r), json!({"answer": 42, "inputs": ["blob"]}));
    let r = py.runtime.run(&m.image, call("other", json!([1]), json!({})), Ctx::new()).await;
    assert_eq!(result_json(&r), json!(2));
    // start() gives a long-lived instance.
    let mut inst = py.runtime.start(&m.image, Ctx::new()).await.unwrap().expect("an instance");
    assert_eq!(result_json(&inst.call(call("other", json!([41]), json!({}))).await), json!(42));
}

#[tokio::test]
async fn modules_that_cannot_load_give_load_errors() {
    let py = python_runtime(ProcessLimits::default());
    let cases: &[(&str, &[&str])] = &[
        ("def broken(:\n", &["SyntaxError"]),
        ("import no_such_module_here\n", &["ModuleNotFoundError", "no_such_module_here"]),
        ("x = 1\n", &["defines no subclass of tessera.Task"]),
        (
            "import tessera\nclass A(tessera.Task): pass\nclass B(tessera.Task): pass\n",
            &["several Task subclasses (A, B)", "config.class"],
        ),
        (
            "import tessera\nclass A(tessera.Task):\n    def __init__(self):\n        raise RuntimeError('nope')\n",
            &["RuntimeError: nope"],
        ),
    ];
    for (code, wants) in cases {
        let m = py_module(code);
        let err = py.runtime.spawn(&m.image, Ctx::new()).await.unwrap_err();
        let RuntimeError::Load(msg) = &err else { panic!("expected a load error, got {err:?}") };
        assert!(msg.contains("process exited with exit status: 1"), "{msg}");
        assert!(!msg.contains("host.py"), "{msg}");
        for want in *wants {
            assert!(msg.contains(want), "{code:?}: {msg}");
        }
    }
    // The class is chosen by config.class.
    let code = "import tessera\nclass A(tessera.Task):\n    def who(self): return 'A'\nclass B(tessera.Task):\n    def who(self): return 'B'\n";
    let m = module("python", "model.py", &[("model.py", code, false)], "config:\n  class: B\n");
    let mut inst = py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    assert_eq!(result_json(&inst.call(call("who", json!([]), json!({}))).await), json!("B"));
    let r = py
        .runtime
        .run(
            &m.image,
            Invocation { config: json!({"class": "A", "function": "who"}), ..Default::default() },
            Ctx::new(),
        )
        .await;
    assert_eq!(result_json(&r), json!("A"));
    // A missing entry file, and an interpreter that does not exist.
    let mut gone = py_module("x = 1\n");
    gone.image.manifest.entry = "nope.py".into();
    let err = py.runtime.spawn(&gone.image, Ctx::new()).await.unwrap_err();
    assert!(matches!(err, RuntimeError::Load(ref m) if m.contains("nope.py")), "{err:?}");
    let bad =
        tessera_process::ProcessRuntime::python("/no/such/python".into(), "/tmp".into(), ProcessLimits::default());
    let err = bad.spawn(&py_module(COUNTER).image, Ctx::new()).await.unwrap_err();
    assert!(matches!(err, RuntimeError::Load(ref m) if m.contains("cannot start /no/such/python")), "{err:?}");
}

#[tokio::test]
async fn python_default_writes_the_sdk_once() {
    let cache = tempfile::tempdir().unwrap();
    let rt = tessera_process::ProcessRuntime::python_default(cache.path(), ProcessLimits::default()).unwrap();
    assert_eq!(rt.kind(), tessera_core::RuntimeKind::Python);
    let sdk = cache.path().join("python-sdk").join(tessera_process::sdk_version());
    assert!(sdk.join("tessera/host.py").is_file());
    if std::env::var_os("TESSERA_PYTHON").is_none() {
        assert_eq!(rt.interpreter().unwrap(), std::path::Path::new("python3"));
    }
    // It runs modules (with whatever interpreter the environment names).
    let rt = tessera_process::ProcessRuntime::python(python(), sdk, ProcessLimits::default());
    let m = py_module(COUNTER);
    let mut inst = rt.spawn(&m.image, Ctx::new()).await.unwrap();
    assert_eq!(result_json(&inst.call(call("add", json!([]), json!({}))).await), json!(1));
}
