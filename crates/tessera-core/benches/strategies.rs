//! The robust aggregation rules on 10 updates of 1,000,000 f32 (40 MB read), for the record.
//!
//! `cargo bench -p tessera-core --bench strategies`
//!
//! - `median`, `trimmed-mean` (beta 0.2): per-coordinate sorts of 10 values;
//! - `distances`: the 45 pairwise squared distances Krum and Bulyan start from;
//! - `krum` (f = 3): distances plus scores and the choice;
//! - `bulyan-mean` (f = 1): the closest-to-median mean over the 8 models Bulyan keeps;
//! - `fedavg`: the weighted sum, as a yardstick.
//!
//! Each with every core and with one. Throughput is the bytes of the updates read.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tessera_core::aggregate::weighted_sum_into;
use tessera_core::select::SplitMix64;
use tessera_core::strategy::{
    closest_to_median_mean_into, krum_select, median_into, pairwise_sq_distances, trimmed_mean_into,
};

const UPDATES: usize = 10;
const LEN: usize = 1_000_000;

fn updates() -> Vec<Vec<f32>> {
    let mut rng = SplitMix64::new(1);
    (0..UPDATES).map(|_| (0..LEN).map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32).collect()).collect()
}

fn bench(c: &mut Criterion) {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ups = updates();
    let refs: Vec<&[f32]> = ups.iter().map(|v| v.as_slice()).collect();
    let weights = vec![1.0 / UPDATES as f32; UPDATES];
    let mut out = vec![0.0f32; LEN];

    let mut g = c.benchmark_group("strategies/10x1M");
    g.sample_size(10);
    g.throughput(Throughput::Bytes((UPDATES * LEN * 4) as u64));
    let mut counts = vec![all];
    if all > 1 {
        counts.push(1);
    }
    for threads in counts {
        let t = if threads == 1 { "1-thread".to_string() } else { format!("{threads}-threads") };
        g.bench_function(format!("median/{t}"), |b| b.iter(|| median_into(&mut out, black_box(&refs), threads)));
        g.bench_function(format!("trimmed-mean/{t}"), |b| {
            b.iter(|| trimmed_mean_into(&mut out, black_box(&refs), 0.2, threads))
        });
        g.bench_function(format!("distances/{t}"), |b| {
            b.iter(|| black_box(pairwise_sq_distances(black_box(&refs), threads)))
        });
        g.bench_function(format!("krum/{t}"), |b| {
            b.iter(|| black_box(krum_select(&pairwise_sq_distances(black_box(&refs), threads), UPDATES, 3)))
        });
        g.bench_function(format!("bulyan-mean/{t}"), |b| {
            b.iter(|| closest_to_median_mean_into(&mut out, black_box(&refs[..8]), 6, threads))
        });
        g.bench_function(format!("fedavg/{t}"), |b| {
            b.iter(|| weighted_sum_into(&mut out, black_box(&refs), &weights, threads))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
