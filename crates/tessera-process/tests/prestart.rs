//! Prestarted instances: the next start of a module takes a process that already said
//! hello, serving the new task's context; a spare not taken is shut down after its idle
//! time.
#![cfg(target_os = "linux")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tessera_ports::{Instance, LogLevel, Runtime};
use tessera_process::ProcessLimits;

const ACTOR: &str = r#"
import os, sys
import tessera

class Echo(tessera.Task):
    def whoami(self):
        print("serving from", os.getpid(), file=sys.stderr)
        self.world.globals["seen"] = b"yes"
        return os.getpid()
"#;

/// Waits up to 20 s for `n` spares.
async fn spares(rt: &tessera_process::ProcessRuntime, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while rt.prestarted() != n {
        assert!(Instant::now() < deadline, "{} spares, waited for {n}", rt.prestarted());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_start_takes_a_prestarted_process_with_the_new_tasks_context() {
    let mut py = python_runtime(ProcessLimits::default());
    py.runtime = py.runtime.with_prestart(Duration::from_secs(60));
    let m = py_module(ACTOR);
    let first_ctx = Ctx::new();
    let first = py.runtime.spawn(&m.image, first_ctx.clone()).await.unwrap();
    spares(&py.runtime, 1).await;
    let ctx = Ctx::new();
    let mut second = py.runtime.spawn(&m.image, ctx.clone()).await.unwrap();
    let pid = result_json(&second.call(call("whoami", json!([]), json!({}))).await).as_u64().unwrap();
    assert_eq!(Some(pid as u32), second.pid(), "the prestarted process");
    // The task's own context: its log and its world state, not the first task's.
    assert!(ctx.has_log(LogLevel::Info, &format!("serving from {pid}")), "{:?}", ctx.logs());
    assert!(ctx.globals.lock().unwrap().contains_key("seen"));
    assert!(first_ctx.globals.lock().unwrap().is_empty() && first_ctx.logs().is_empty());
    // And another spare for the start after.
    spares(&py.runtime, 1).await;
    let r = py.runtime.run(&m.image, call("whoami", json!([]), json!({})), Ctx::new()).await;
    assert!(result_json(&r).as_u64().is_some());
    first.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_spare_is_shut_down() {
    let mut py = python_runtime(ProcessLimits::default());
    py.runtime = py.runtime.with_prestart(Duration::from_millis(500));
    let m = py_module(ACTOR);
    let inst = py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    inst.shutdown().await;
    spares(&py.runtime, 1).await;
    spares(&py.runtime, 0).await;
    // Without prestarting, no spare ever.
    let plain = python_runtime(ProcessLimits::default());
    let inst = plain.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    let pid = u64::from(inst.pid().unwrap());
    inst.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(plain.runtime.prestarted(), 0);
    assert!(!alive(pid));
}
