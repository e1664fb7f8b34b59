//! What a module's process gets and leaves: a minimal environment with a scratch HOME,
//! and nothing it started outlives it (time-out, shutdown, its own exit, a drop).
#![cfg(target_os = "linux")]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tessera_ports::Instance;
use tessera_process::ProcessLimits;

const ESCAPE: &str = r#"
import os
import subprocess
import sys
import time
import tessera

class Escape(tessera.Task):
    def environment(self):
        home = os.environ.get("HOME", "")
        with open(os.path.join(home, "note"), "w") as f:
            f.write("scratch is writable")
        return {"env": dict(os.environ), "cwd": os.getcwd()}

    def leave_a_child(self, wait, detach=False):
        # Detached: a session (and process group) of its own, out of the module's group.
        p = subprocess.Popen(["sleep", "300"], start_new_session=detach)
        print("child-pid", p.pid, file=sys.stderr, flush=True)
        if wait:
            while True:
                time.sleep(0.1)
        return p.pid

    def exit_leaving_a_child(self):
        self.leave_a_child(False)
        os._exit(3)
"#;

/// True while `pid` runs (a zombie waiting to be reaped has ended).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Waits (without blocking the runtime, where the ending of a dropped instance runs) up
/// to 10 s for `pid` to end.
async fn gone_soon(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The runtime with the interpreter itself, not a wrapper script (such as pyenv's shims,
/// which set variables of their own).
fn runtime(limits: ProcessLimits) -> Python {
    let out = std::process::Command::new(python()).args(["-c", "import sys; print(sys.executable)"]).output().unwrap();
    let exe = std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let sdk = tempfile::tempdir().unwrap();
    tessera_process::ProcessRuntime::write_sdk(sdk.path()).unwrap();
    Python { runtime: tessera_process::ProcessRuntime::python(exe, sdk.path().to_owned(), limits), _sdk: sdk }
}

/// The pid the module logged as `child-pid N` (its stderr is read beside its replies:
/// waits up to 10 s for the line).
async fn logged_pid(ctx: &Ctx) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) =
            ctx.logs().iter().find_map(|(_, m)| m.strip_prefix("child-pid ").map(|p| p.trim().to_owned()))
        {
            return pid.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "the module logged its child");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_module_gets_a_minimal_environment_and_a_scratch_home() {
    let py = runtime(ProcessLimits::default());
    let m = py_module(ESCAPE);
    let mut inst = py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    let out = result_json(&inst.call(call("environment", json!([]), json!({}))).await);
    let env = out["env"].as_object().unwrap();
    let allowed = [
        "PATH",
        "LANG",
        "HOME",
        "TMPDIR",
        "PYTHONPATH",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
        "JOBLIB_MULTIPROCESSING",
        "TESSERA_PROTOCOL",
        "TESSERA_MODULE",
        "TESSERA_CLASS",
        "LC_CTYPE",
    ];
    let allowed: Vec<&str> = allowed.into_iter().chain(tessera_process::CHILD_ENV_KEPT.iter().copied()).collect();
    let extra: Vec<&String> = env.keys().filter(|k| !allowed.contains(&k.as_str())).collect();
    assert!(extra.is_empty(), "inherited from the node: {extra:?}");
    assert_eq!(env["PATH"], json!(tessera_process::CHILD_PATH));
    let home = env["HOME"].as_str().unwrap().to_owned();
    assert_ne!(Some(home.as_str()), std::env::var("HOME").ok().as_deref(), "not the node's home");
    assert!(Path::new(&home).join("note").is_file(), "the scratch home is the module's to write");
    inst.shutdown().await;
    assert!(!Path::new(&home).exists(), "the scratch folder goes with the process");
}

#[tokio::test]
async fn nothing_a_module_started_outlives_its_time_out() {
    let py = runtime(ProcessLimits { max_time: Duration::from_secs(2), ..ProcessLimits::default() });
    let m = py_module(ESCAPE);
    let ctx = Ctx::new();
    let mut inst = py.runtime.spawn(&m.image, ctx.clone()).await.unwrap();
    // A child in a session of its own: out of the process group, not out of the cgroup.
    let r = inst.call(call("leave_a_child", json!([]), json!({"wait": true, "detach": true}))).await;
    let e = r.unwrap_err().to_string();
    assert!(e.contains("time limit"), "{e}");
    let child = logged_pid(&ctx).await;
    assert!(gone_soon(child).await, "the module's child {child} survived the time-out");
    // The runtime serves the next instance.
    let mut next = py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    let out = next.call(call("environment", json!([]), json!({}))).await;
    assert!(out.is_ok());
}

#[tokio::test]
async fn nothing_a_module_started_outlives_its_shutdown() {
    let py = runtime(ProcessLimits::default());
    let m = py_module(ESCAPE);
    let ctx = Ctx::new();
    let mut inst = py.runtime.spawn(&m.image, ctx.clone()).await.unwrap();
    let r = inst.call(call("leave_a_child", json!([]), json!({"wait": false}))).await;
    let child = result_json(&r).as_u64().unwrap() as u32;
    assert_eq!(child, logged_pid(&ctx).await);
    assert!(alive(child));
    inst.shutdown().await;
    assert!(gone_soon(child).await, "the module's child {child} survived its shutdown");
}

#[tokio::test]
async fn nothing_a_module_started_outlives_its_own_exit() {
    let py = runtime(ProcessLimits::default());
    let m = py_module(ESCAPE);
    let ctx = Ctx::new();
    let mut inst = py.runtime.spawn(&m.image, ctx.clone()).await.unwrap();
    let r = inst.call(call("exit_leaving_a_child", json!([]), json!({}))).await;
    assert!(r.unwrap_err().to_string().contains("exited"));
    let child = logged_pid(&ctx).await;
    assert!(!inst.healthy());
    drop(inst);
    assert!(gone_soon(child).await, "the child {child} of a module that exited survived it");
}

#[tokio::test]
async fn nothing_a_module_started_outlives_a_drop() {
    let py = runtime(ProcessLimits::default());
    let m = py_module(ESCAPE);
    let mut inst = py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    let r = inst.call(call("leave_a_child", json!([]), json!({"wait": false, "detach": true}))).await;
    let child = result_json(&r).as_u64().unwrap() as u32;
    drop(inst);
    assert!(gone_soon(child).await, "the child {child} survived its instance being dropped");
}
