//! What the sandbox costs a Python actor: start and call latency with every protection
//! this machine offers (Landlock, seccomp, a cgroup) against none (`Sandbox::off`), in one
//! run, the settings taking turns.
//!
//! - cold start: the first instance of a fresh runtime (the sandboxed one also finds the
//!   interpreter's folders then), from spawn to the child's `hello`;
//! - warm start: later instances of the same module (median and 90th percentile); in the
//!   `prestarted` setting (sandboxed, `with_prestart`), each start takes the process
//!   started ahead of it, the bench waiting for it to be ready between starts;
//! - call: a call of a function returning a short string on a started instance (median
//!   and 99th percentile).
//!
//! `cargo bench -p tessera-process --bench sandbox [-- STARTS CALLS]` (defaults 30 and
//! 3000; needs `TESSERA_PYTHON`, which `scripts/test` makes). Prints one JSON line per
//! setting and round.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tessera_ports::Instance;
use tessera_process::{ProcessLimits, Sandbox, SandboxPolicy};

const ACTOR: &str = r#"
import tessera

class Echo(tessera.Task):
    def ping(self):
        return "pong"
"#;

fn quantile(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

async fn measure(label: &str, round: usize, sandbox: Arc<Sandbox>, prestart: bool, starts: usize, calls: usize) {
    let mut py = python_runtime(ProcessLimits::default());
    py.runtime = py.runtime.with_sandbox(sandbox);
    if prestart {
        py.runtime = py.runtime.with_prestart(Duration::from_secs(60));
    }
    let m = py_module(ACTOR);
    let t = Instant::now();
    let first = py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    let cold = t.elapsed();
    first.shutdown().await;
    let mut warm = Vec::new();
    for _ in 0..starts {
        while prestart && py.runtime.prestarted() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t = Instant::now();
        let inst = py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
        warm.push(t.elapsed());
        inst.shutdown().await;
    }
    let mut inst = py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    for _ in 0..50 {
        inst.call(call("ping", json!([]), json!({}))).await.unwrap();
    }
    let mut lat = Vec::new();
    for _ in 0..calls {
        let t = Instant::now();
        inst.call(call("ping", json!([]), json!({}))).await.unwrap();
        lat.push(t.elapsed());
    }
    inst.shutdown().await;
    println!(
        "{}",
        json!({
            "setting": label,
            "round": round,
            "cold_start_ms": cold.as_secs_f64() * 1000.0,
            "warm_start_ms_p50": quantile(&mut warm, 0.5),
            "warm_start_ms_p90": quantile(&mut warm, 0.9),
            "call_ms_p50": quantile(&mut lat, 0.5),
            "call_ms_p99": quantile(&mut lat, 0.99),
        })
    );
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let starts = args.first().copied().unwrap_or(30);
    let calls = args.get(1).copied().unwrap_or(3000);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let on = Arc::new(Sandbox::new(SandboxPolicy::default()));
        eprintln!("sandbox: {:?}", on.support().enforced());
        let off = Arc::new(Sandbox::off());
        for round in 0..2 {
            measure("unsandboxed", round, off.clone(), false, starts, calls).await;
            measure("sandboxed", round, on.clone(), false, starts, calls).await;
            measure("prestarted", round, on.clone(), true, starts, calls).await;
        }
    });
}
