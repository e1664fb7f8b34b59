//! A server optimiser's round (FedOpt's moments, FedAvgM's momentum) allocates the new model
//! and the round's mean, not copies of its state. Counted by the allocator, alone in its test binary.

use peakmem_alloc::{INSTRUMENTED_SYSTEM, PeakMemAlloc, PeakMemAllocTrait};
use tessera_core::strategy::{FitResult, Participation, from_config};
use tessera_core::tensor::{Tensor, Tensors};

#[global_allocator]
static GLOBAL: &PeakMemAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// Values of the model: 32 MiB of f32, in a large and a small tensor.
const PARAMS: usize = 8 << 20;

fn model(shift: f32) -> Tensors {
    let big = PARAMS - 1000;
    let mut t = Tensors::default();
    t.0.insert(
        "w".into(),
        Tensor { shape: vec![big], data: (0..big).map(|i| (i % 97) as f32 * 0.01 + shift).collect() },
    );
    t.0.insert("b".into(), Tensor { shape: vec![1000], data: vec![shift; 1000] });
    t
}

#[test]
fn a_server_step_holds_no_copy_of_its_state() {
    let bytes = PARAMS * 4;
    let participation = Participation { min_fit: 1, min_available: 1, ..Participation::default() };
    let momentum = serde_json::json!({"server_momentum": 0.9});
    for (name, params) in [
        ("fedadam", serde_json::Value::Null),
        ("fedyogi", serde_json::Value::Null),
        ("fedadagrad", serde_json::Value::Null),
        ("fedavgm", momentum),
    ] {
        let mut s = from_config(name, &params, participation.clone()).unwrap();
        let current = model(0.0);
        let results: Vec<FitResult> = (0..2)
            .map(|i| FitResult { node: format!("n{i}"), update: model(0.1 * (i + 1) as f32), num_examples: 10 })
            .collect();
        let next = s.aggregate_fit(1, &current, &results, &[]).unwrap();
        // The second round, with moments saved: what it allocates beyond what is held.
        // The counter starts again from zero here; nothing held before is freed until the
        // peak is read, so the peak is what the round allocates.
        GLOBAL.reset_peak_memory();
        let out = s.aggregate_fit(2, &next, &results, &[]).unwrap();
        let peak = GLOBAL.get_peak_memory();
        drop(out);
        // The mean and the new model (two models) and a step's scratch; copies of the state
        // would make it three (FedAvgM) or four (FedOpt).
        eprintln!("{name}: a round with saved state allocates {:.2} models at its peak", peak as f64 / bytes as f64);
        assert!(peak < bytes * 5 / 2, "{name}: a round allocated {peak} bytes at its peak, for a model of {bytes}");
    }
}
