//! A FedAvg round's memory does not grow with its participants: the coordinator folds each
//! update into a running sum as it is fetched and drops it. Nor does a FedMedian round's
//! on a model read a window at a time. Counted by the allocator over
//! NATS (the blob store lives in nats-server, so this process holds the coordinator and
//! the nodes), alone in its test binary so nothing else allocates meanwhile.

use std::time::Duration;

use peakmem_alloc::{INSTRUMENTED_SYSTEM, PeakMemAlloc, PeakMemAllocTrait};
use tessera_cluster::{Cluster, ClusterConfig, digits};
use tessera_coordinator::{Quiet, SessionConfig};
use tessera_core::tensor::{Model, TensorLimits};
use tessera_nats::testing::NatsServer;
use tessera_wasm::WasmLimits;

#[global_allocator]
static GLOBAL: &PeakMemAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// Parameters of the generated model: 256 KiB of f32.
const PARAMS: usize = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fedavg_round_holds_no_update_per_participant() {
    let server = NatsServer::start();
    let home = tempfile::tempdir().unwrap();
    let backend = tessera_nats::backend(&server.url(), &tessera_nats::NatsOptions::default()).await.unwrap();
    let data = digits::prepare(&home.path().join("data"), 4, 0.2, 42).unwrap();
    let limits = WasmLimits { max_time: Duration::from_secs(60), ..WasmLimits::default() };
    let cluster = Cluster::start_on(ClusterConfig::digits(home.path(), &data, limits), backend).await.unwrap();
    // The test module's generated-model worker: `init` makes PARAMS zeros, `train` adds
    // 0.001 * (1 + seed % 7) to each and reports 1 + seed % 3 examples.
    let dir = home.path().join("modules").join("generated");
    let manifest = "name: fl.generated\nversion: 0.1.0\nkind: task\nruntime: wasm\nentry: module.wasm\n";
    tessera_modules::write_module_dir(&dir, manifest, tessera_modules::TEST_PROGRAMS_WASM).unwrap();
    cluster.publish_dir(&dir).unwrap();

    let mut peaks = Vec::new();
    for (session, per_node) in [("hundred", 25), ("thousand", 250)] {
        let mut cfg = SessionConfig::new("fl.generated");
        cfg.rounds = 2;
        cfg.clients_per_node = Some(per_node);
        cfg.min_participants = 4 * per_node;
        cfg.round_timeout_secs = 600.0;
        cfg.config = serde_json::json!({ "params": PARAMS });
        GLOBAL.reset_peak_memory();
        let r = cluster.coordinator().run(session, &cfg, &Quiet).await.unwrap();
        peaks.push(GLOBAL.get_peak_memory());
        assert!(r.reports.iter().all(|r| r.contributed.len() == 4 * per_node), "{session}: {:?}", r.reports);
        // Every participant's step went into the mean: each value moved by two steps of
        // 0.001 to 0.007.
        let model = Model::decode(&r.model, TensorLimits::default()).unwrap();
        let p = &model.floats.0["p"].data;
        assert_eq!(p.len(), PARAMS);
        assert!(p.iter().all(|v| *v == p[0] && (0.002..=0.014).contains(v)), "{session}: {}", p[0]);
    }
    let grew = peaks[1].saturating_sub(peaks[0]);
    // Holding a round's updates would add 900 x 256 KiB = 225 MiB (twice that with a copy).
    eprintln!("peak with 100 participants {} MiB, with 1,000 {} MiB", peaks[0] >> 20, peaks[1] >> 20);
    assert!(grew < 40 << 20, "1,000 participants took {} MiB more than 100", grew >> 20);

    // FedMedian needs every update at once; on a model read a window at a time (as a large
    // model's round is, here from a local copy of each update taken from the Object Store)
    // it holds a window of their values (8 MiB asked; at 1,000 participants the floor of
    // one block of 4 Ki values each, 15.6 MiB), not the round's updates.
    let mut peaks = Vec::new();
    for (session, per_node) in [("median-hundred", 25), ("median-thousand", 250)] {
        let mut cfg = SessionConfig::new("fl.generated");
        cfg.rounds = 1;
        cfg.clients_per_node = Some(per_node);
        cfg.min_participants = 4 * per_node;
        cfg.round_timeout_secs = 600.0;
        cfg.config = serde_json::json!({ "params": PARAMS });
        cfg.strategy = serde_json::from_value(serde_json::json!("fedmedian")).unwrap();
        let coordinator = cluster.coordinator().with_streaming_from(0).with_window_budget(8 << 20);
        GLOBAL.reset_peak_memory();
        let r = coordinator.run(session, &cfg, &Quiet).await.unwrap();
        peaks.push(GLOBAL.get_peak_memory());
        assert_eq!(r.reports[0].contributed.len(), 4 * per_node, "{session}");
        // The median of steps of 0.001 to 0.007.
        let model = Model::decode(&r.model, TensorLimits::default()).unwrap();
        let p = &model.floats.0["p"].data;
        assert!(p.iter().all(|v| *v == p[0] && (0.001..=0.007).contains(v)), "{session}: {}", p[0]);
    }
    let grew = peaks[1].saturating_sub(peaks[0]);
    eprintln!("FedMedian: peak with 100 participants {} MiB, with 1,000 {} MiB", peaks[0] >> 20, peaks[1] >> 20);
    assert!(grew < 40 << 20, "FedMedian: 1,000 participants took {} MiB more than 100", grew >> 20);
    cluster.stop().await;
}
