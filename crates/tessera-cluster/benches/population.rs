//! Ten thousand participants per round, sampled from a population of a hundred thousand,
//! in one process.
//!
//! `cargo bench -p tessera-cluster --bench population`
//!
//! Four nodes host 25,000 simulated participants each (`clients_per_node`), each a device
//! of FedProx's Synthetic(0.5, 0.5) that generates its own rows when sampled (20 + a
//! log-normal(2, 1) count, at most 100), so the population costs nothing to hold;
//! `participant_ratio: 0.1` samples 10,000 a round, every one training the WebAssembly
//! softmax worker (60 features, 10 classes) for one epoch. Reported: the mean wall time of
//! the steady rounds (all but the first, which also compiles the worker) with where the
//! coordinator's time went, and the process's peak heap (the allocator's count).

use std::time::Duration;

use peakmem_alloc::{INSTRUMENTED_SYSTEM, PeakMemAlloc, PeakMemAllocTrait};
use tessera_cluster::{Cluster, ClusterConfig};
use tessera_coordinator::{Quiet, SessionConfig};
use tessera_wasm::WasmLimits;

#[global_allocator]
static GLOBAL: &PeakMemAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

const ROUNDS: u32 = 4;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let home = tempfile::tempdir().unwrap();
        let spec = serde_json::json!({
            "alpha": 0.5, "beta": 0.5, "seed": 1,
            "min_samples": 20, "lognormal_mu": 2.0, "lognormal_sigma": 1.0, "max_samples": 100,
        });
        let limits = WasmLimits { max_time: Duration::from_secs(60), ..WasmLimits::default() };
        let cluster = Cluster::start(ClusterConfig::synthetic(home.path(), 4, &spec, limits).unwrap()).await.unwrap();
        let dir = home.path().join("modules").join("fl.softmax.worker");
        tessera_modules::write_softmax_worker(&dir).unwrap();
        cluster.publish_dir(&dir).unwrap();
        let mut cfg = SessionConfig::new("fl.softmax.worker");
        cfg.rounds = ROUNDS;
        cfg.dataset = "synthetic".into();
        cfg.clients_per_node = Some(25_000);
        cfg.participant_ratio = 0.1;
        cfg.min_participants = 10_000;
        cfg.round_timeout_secs = 600.0;
        cfg.config = serde_json::json!({"features": 60, "classes": 10, "lr": 0.01, "batch_size": 10});
        GLOBAL.reset_peak_memory();
        let r = cluster.coordinator().run("population", &cfg, &Quiet).await.unwrap();
        let peak = GLOBAL.get_peak_memory();
        for report in &r.reports {
            assert_eq!(report.contributed.len(), 10_000, "{:?}", report.failures.first());
        }
        let steady = &r.reports[1..];
        let n = steady.len() as f64;
        let mean = |f: &dyn Fn(&tessera_core::wire::RoundReport) -> f64| steady.iter().map(f).sum::<f64>() / n;
        println!("10,000 of 100,000 participants per round, rounds 2 to {ROUNDS}, means");
        println!("| round | dispatch | waiting | transfer | aggregation | examples | peak heap |");
        println!("|---|---|---|---|---|---|---|");
        println!(
            "| {:.2} s | {:.0} ms | {:.2} s | {:.0} ms | {:.0} ms | {:.0} | {:.0} MiB |",
            mean(&|r| r.seconds),
            mean(&|r| r.timings.dispatch) * 1e3,
            mean(&|r| r.timings.waiting),
            mean(&|r| r.timings.transfer) * 1e3,
            mean(&|r| r.timings.aggregation) * 1e3,
            mean(&|r| r.examples as f64),
            peak as f64 / (1 << 20) as f64,
        );
        cluster.stop().await;
    });
}
