//! What a module's process gets and leaves: a minimal environment with a scratch HOME,
//! and nothing it started outlives it (time-out, shutdown).

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
import time
import tessera

class Escape(tessera.Task):
    def environment(self):
        home = os.environ.get("HOME", "")
        with open(os.path.join(home, "note"), "w") as f:
            f.write("scratch is writable")
        return {"env": dict(os.environ), "cwd": os.getcwd()}

    def leave_a_child(self, pidfile, wait):
        p = subprocess.Popen(["sleep", "300"])
        with open(pidfile, "w") as f:
            f.write(str(p.pid))
        if wait:
            while True:
                time.sleep(0.1)
        return p.pid
"#;

/// True while `pid` runs (a zombie waiting to be reaped has ended).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

fn gone_soon(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn read_pid(file: &Path) -> u32 {
    std::fs::read_to_string(file).unwrap().trim().parse().unwrap()
}

#[tokio::test]
async fn a_module_gets_a_minimal_environment_and_a_scratch_home() {
    let py = python_runtime(ProcessLimits::default());
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
        "TESSERA_PROTOCOL",
        "TESSERA_MODULE",
        "TESSERA_CLASS",
        "LC_CTYPE",
    ];
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
    let py = python_runtime(ProcessLimits { max_time: Duration::from_secs(2), ..ProcessLimits::default() });
    let m = py_module(ESCAPE);
    let pidfile = m.dir.path().join("child.pid");
    let mut inst = py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    let r = inst.call(call("leave_a_child", json!([]), json!({"pidfile": pidfile, "wait": true}))).await;
    let e = r.unwrap_err().to_string();
    assert!(e.contains("time limit"), "{e}");
    let child = read_pid(&pidfile);
    assert!(gone_soon(child), "the module's child {child} survived the time-out");
    // The runtime serves the next instance.
    let mut next = py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    let out = next.call(call("environment", json!([]), json!({}))).await;
    assert!(out.is_ok());
}

#[tokio::test]
async fn nothing_a_module_started_outlives_its_shutdown() {
    let py = python_runtime(ProcessLimits::default());
    let m = py_module(ESCAPE);
    let pidfile = m.dir.path().join("child.pid");
    let mut inst = py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    let r = inst.call(call("leave_a_child", json!([]), json!({"pidfile": pidfile, "wait": false}))).await;
    let child = result_json(&r).as_u64().unwrap() as u32;
    assert_eq!(child, read_pid(&pidfile));
    assert!(alive(child));
    inst.shutdown().await;
    assert!(gone_soon(child), "the module's child {child} survived its shutdown");
}
