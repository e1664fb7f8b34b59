//! FedAvg aggregation against the machine's memory bandwidth, in the same run.
//!
//! `cargo bench -p tessera-core --bench aggregate`
//!
//! - `memory/copy`: copying 400 MB (what memcpy moves per second);
//! - `memory/read`: summing 400 MB, on one core and on all (the read bandwidth aggregation
//!   is bound by);
//! - `fedavg/100x1M`: FedAvg of 100 updates of 1,000,000 f32 (400 MB read), with every
//!   core and with one.
//!
//! Throughput is the bytes read (and, for copy, the bytes copied).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tessera_core::aggregate::weighted_sum_into;

const UPDATES: usize = 100;
const LEN: usize = 1_000_000;

fn updates() -> Vec<Vec<f32>> {
    (0..UPDATES).map(|k| (0..LEN).map(|i| ((i * 7 + k * 13) % 1000) as f32 * 1e-3).collect()).collect()
}

/// Sums a slice with several accumulators, so the adds do not serialise on one register.
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    for chunk in xs.chunks_exact(16) {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
    }
    acc.iter().sum()
}

fn bench(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ups = updates();
    let refs: Vec<&[f32]> = ups.iter().map(|v| v.as_slice()).collect();
    let weights = vec![1.0 / UPDATES as f32; UPDATES];
    let bytes = (UPDATES * LEN * 4) as u64;

    let mut g = c.benchmark_group("memory");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(bytes));
    let flat: Vec<f32> = ups.concat();
    let mut dst = vec![0.0f32; flat.len()];
    g.bench_function("copy", |b| b.iter(|| dst.copy_from_slice(black_box(&flat))));
    g.bench_function("read/1-thread", |b| b.iter(|| black_box(sum(black_box(&flat)))));
    g.bench_function(format!("read/{threads}-threads"), |b| {
        b.iter(|| {
            let per = flat.len().div_ceil(threads);
            std::thread::scope(|s| {
                let parts: Vec<_> = flat.chunks(per).map(|part| s.spawn(move || sum(part))).collect();
                black_box(parts.into_iter().map(|h| h.join().unwrap()).sum::<f32>())
            })
        })
    });
    drop(dst);
    drop(flat);
    g.finish();

    let mut g = c.benchmark_group("fedavg");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(bytes));
    let mut out = vec![0.0f32; LEN];
    g.bench_function(format!("100x1M/{threads}-threads"), |b| {
        b.iter(|| weighted_sum_into(&mut out, black_box(&refs), &weights, threads))
    });
    g.bench_function("100x1M/1-thread", |b| b.iter(|| weighted_sum_into(&mut out, black_box(&refs), &weights, 1)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
