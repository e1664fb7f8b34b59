//! The arithmetic of the robust and adaptive strategies, as free functions over slices.
//!
//! Like [`crate::aggregate::weighted_sum_into`], each per-coordinate function splits its output
//! into one contiguous chunk per thread. The order statistics (median, trimmed mean, Bulyan) sort
//! [`LANES`] coordinates at once: a thread copies `inputs[k][i..i + LANES]` into row `k` of a small
//! scratch block it reuses for the whole chunk, and runs a sorting network over the rows, each
//! compare-exchange a branchless lane-wise min/max that the compiler turns into vector
//! instructions. Sorting ten values per coordinate this way costs no branch mispredictions.
//! Every output value is computed the same way whatever the number of threads, so results do not
//! depend on the machine.
//!
//! The inputs must be finite: the strategies refuse NaN and infinities before calling these
//! functions, and the order of NaN values here is unspecified.

/// Below this many values touched, one thread is faster than spawning more.
const PARALLEL_THRESHOLD: usize = 1 << 18;

/// Coordinates sorted together by the sorting network: one 64-byte cache line per input.
pub const LANES: usize = 16;

/// Up to this many inputs the sorting network is used; past it, per-coordinate sorts (a network
/// grows as `n log^2 n`).
const NETWORK_MAX: usize = 256;

/// Coordinates per block when computing pairwise distances: 4 Ki floats = 16 KiB per input,
/// so the inputs of a block stay in L2 while every pair streams through them. Each block's
/// pair sums are added into the matrix in block order, so inputs cut at multiples of it and
/// added part by part give the same distances, to the bit, as added whole.
pub const DISTANCE_BLOCK: usize = 4 * 1024;

/// Runs `f(chunk, offset)` over `out` split into one contiguous chunk per thread.
fn par_chunks<F>(out: &mut [f32], inputs: usize, threads: usize, f: F)
where
    F: Fn(&mut [f32], usize) + Sync,
{
    let n = out.len();
    let threads = threads.max(1);
    if threads == 1 || n.saturating_mul(inputs.max(1)) < PARALLEL_THRESHOLD {
        f(out, 0);
        return;
    }
    let per = n.div_ceil(threads).next_multiple_of(16);
    let f = &f;
    std::thread::scope(|s| {
        for (t, chunk) in out.chunks_mut(per).enumerate() {
            s.spawn(move || f(chunk, t * per));
        }
    });
}

fn check_inputs(out: &[f32], inputs: &[&[f32]]) {
    assert!(!inputs.is_empty(), "at least one input");
    for i in inputs {
        assert!(i.len() >= out.len(), "input shorter than output");
    }
}

/// Batcher's odd-even merge sort network for `n` values, as `(a, b)` pairs with `a < b`: after
/// `compare-exchange(a, b)` in order, the values are sorted. Built for the next power of two,
/// without the comparators that touch a position `>= n` (those positions would hold +inf, so
/// such comparators never swap).
pub fn sorting_network(n: usize) -> Vec<(usize, usize)> {
    let size = n.next_power_of_two();
    let mut net = Vec::new();
    let mut p = 1;
    while p < size {
        let mut k = p;
        while k >= 1 {
            let mut j = k % p;
            while j + k < size {
                for i in 0..k.min(size - j - k) {
                    let (a, b) = (i + j, i + j + k);
                    if a / (2 * p) == b / (2 * p) && b < n {
                        net.push((a, b));
                    }
                }
                j += 2 * k;
            }
            k /= 2;
        }
        p *= 2;
    }
    net
}

/// A block of `n` rows of [`LANES`] values: row `k` holds input `k` for `LANES` coordinates.
type Block = [[f32; LANES]];

/// Sorts every lane (column) of the block in place.
#[inline]
fn sort_block(block: &mut Block, net: &[(usize, usize)], scratch: &mut Vec<f32>) {
    if block.len() <= NETWORK_MAX {
        for &(a, b) in net {
            let (x, y) = (block[a], block[b]);
            let (mut lo, mut hi) = ([0.0f32; LANES], [0.0f32; LANES]);
            for l in 0..LANES {
                // Branchless: these are `minps` and `maxps`.
                lo[l] = if y[l] < x[l] { y[l] } else { x[l] };
                hi[l] = if y[l] < x[l] { x[l] } else { y[l] };
            }
            block[a] = lo;
            block[b] = hi;
        }
    } else {
        for l in 0..LANES {
            scratch.clear();
            scratch.extend(block.iter().map(|row| row[l]));
            scratch.sort_unstable_by(f32::total_cmp);
            for (row, &x) in block.iter_mut().zip(scratch.iter()) {
                row[l] = x;
            }
        }
    }
}

/// Runs `finish(sorted_block, out_lanes)` for every [`LANES`] coordinates of `out`: the block's
/// rows are the inputs at those coordinates, each column sorted ascending. Split across threads.
fn sorted_blocks<F>(out: &mut [f32], inputs: &[&[f32]], threads: usize, finish: F)
where
    F: Fn(&Block, &mut [f32]) + Sync,
{
    check_inputs(out, inputs);
    let n = inputs.len();
    let net = if n <= NETWORK_MAX { sorting_network(n) } else { Vec::new() };
    par_chunks(out, n, threads, |chunk, offset| {
        let mut block = vec![[0.0f32; LANES]; n];
        let mut scratch = Vec::new();
        for (b, lanes) in chunk.chunks_mut(LANES).enumerate() {
            let start = offset + b * LANES;
            let len = lanes.len();
            for (row, input) in block.iter_mut().zip(inputs) {
                row[..len].copy_from_slice(&input[start..start + len]);
            }
            sort_block(&mut block, &net, &mut scratch);
            finish(&block, lanes);
        }
    });
}

/// The median of column `l` of a sorted block, as numpy's `median`: the middle value, or the
/// mean of the two middle values (exact in f64).
#[inline]
fn block_median(block: &Block, l: usize) -> f64 {
    let (n, mid) = (block.len(), block.len() / 2);
    if n % 2 == 1 { f64::from(block[mid][l]) } else { (f64::from(block[mid - 1][l]) + f64::from(block[mid][l])) / 2.0 }
}

/// Coordinate-wise median: `out[i] = median_k inputs[k][i]` (unweighted, as Flower's
/// `aggregate_median`; an even count takes the mean of the two middle values).
///
/// # Panics
/// When `inputs` is empty or an input is shorter than `out`.
pub fn median_into(out: &mut [f32], inputs: &[&[f32]], threads: usize) {
    sorted_blocks(out, inputs, threads, |block, lanes| {
        for (l, o) in lanes.iter_mut().enumerate() {
            *o = block_median(block, l) as f32;
        }
    });
}

/// How many values [`trimmed_mean_into`] cuts from each end of `n`: `floor(beta * n)`, as
/// scipy's `trim_mean` and Flower's `_trim_mean`.
pub fn trim_count(n: usize, beta: f64) -> usize {
    (beta * n as f64) as usize
}

/// Coordinate-wise trimmed mean: per coordinate, sorts the `n` values, cuts `floor(beta * n)`
/// from each end and averages the rest in f64 (Flower's `aggregate_trimmed_avg`).
///
/// # Panics
/// When `beta` is outside `[0, 0.5)`, `inputs` is empty or an input is shorter than `out`.
pub fn trimmed_mean_into(out: &mut [f32], inputs: &[&[f32]], beta: f64, threads: usize) {
    assert!((0.0..0.5).contains(&beta), "beta must be in [0, 0.5)");
    let n = inputs.len();
    let lo = trim_count(n, beta);
    let keep = n - 2 * lo;
    sorted_blocks(out, inputs, threads, |block, lanes| {
        let mut sum = [0.0f64; LANES];
        for row in &block[lo..lo + keep] {
            for (s, &x) in sum.iter_mut().zip(row) {
                *s += f64::from(x);
            }
        }
        for (o, s) in lanes.iter_mut().zip(sum) {
            *o = (s / keep as f64) as f32;
        }
    });
}

/// Adds the squared Euclidean distances between every pair of inputs to `acc`, an `n * n`
/// row-major matrix (symmetric, diagonal untouched). Summed in f64 over fixed blocks, so the
/// result does not depend on `threads`. Call it once per tensor to get the distances between
/// whole models, as Flower's `_compute_distances` does on the concatenated layers.
///
/// # Panics
/// When `acc` is not `n * n` or the inputs differ in length.
pub fn add_pairwise_sq_distances(acc: &mut [f64], inputs: &[&[f32]], threads: usize) {
    let n = inputs.len();
    assert_eq!(acc.len(), n * n, "an n * n matrix");
    let Some(first) = inputs.first() else { return };
    let len = first.len();
    for i in inputs {
        assert_eq!(i.len(), len, "inputs of one length");
    }
    let pairs = n * n.saturating_sub(1) / 2;
    if pairs == 0 || len == 0 {
        return;
    }
    let blocks = len.div_ceil(DISTANCE_BLOCK);
    // One row of pair sums per block, summed in block order afterwards: the same numbers
    // whatever the split across threads.
    let mut partial = vec![0.0f64; blocks * pairs];
    let threads = threads.max(1);
    let work = |rows: &mut [f64], first_block: usize| {
        for (r, row) in rows.chunks_mut(pairs).enumerate() {
            let start = (first_block + r) * DISTANCE_BLOCK;
            let end = (start + DISTANCE_BLOCK).min(len);
            let mut p = 0;
            for a in 0..n {
                for b in a + 1..n {
                    row[p] = sq_distance(&inputs[a][start..end], &inputs[b][start..end]);
                    p += 1;
                }
            }
        }
    };
    if threads == 1 || len.saturating_mul(pairs) < PARALLEL_THRESHOLD {
        work(&mut partial, 0);
    } else {
        let per = blocks.div_ceil(threads);
        let work = &work;
        std::thread::scope(|s| {
            for (t, rows) in partial.chunks_mut(per * pairs).enumerate() {
                s.spawn(move || work(rows, t * per));
            }
        });
    }
    // Each block's sum goes into the matrix in block order: inputs cut at block boundaries
    // and added part by part give the same bits as added whole.
    for row in partial.chunks(pairs) {
        let mut p = 0;
        for a in 0..n {
            for b in a + 1..n {
                acc[a * n + b] += row[p];
                acc[b * n + a] += row[p];
                p += 1;
            }
        }
    }
}

/// The squared Euclidean distances between every pair of inputs, as an `n * n` row-major
/// matrix with a zero diagonal (see [`add_pairwise_sq_distances`]).
pub fn pairwise_sq_distances(inputs: &[&[f32]], threads: usize) -> Vec<f64> {
    let mut acc = vec![0.0; inputs.len() * inputs.len()];
    add_pairwise_sq_distances(&mut acc, inputs, threads);
    acc
}

/// `sum_i (a[i] - b[i])^2`: squares in f32 over runs of 64 values (16 lanes, so that it
/// vectorises), each run's lanes added into f64. Relative error below 1e-6.
#[inline]
fn sq_distance(a: &[f32], b: &[f32]) -> f64 {
    let mut total = [0.0f64; 16];
    let (ca, cb) = (a.chunks_exact(64), b.chunks_exact(64));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        let mut run = [0.0f32; 16];
        for (x, y) in x.chunks_exact(16).zip(y.chunks_exact(16)) {
            for l in 0..16 {
                let d = x[l] - y[l];
                run[l] += d * d;
            }
        }
        for (t, r) in total.iter_mut().zip(run) {
            *t += f64::from(r);
        }
    }
    let mut tail = 0.0;
    for (&x, &y) in ra.iter().zip(rb) {
        let d = f64::from(x) - f64::from(y);
        tail += d * d;
    }
    total.iter().sum::<f64>() + tail
}

/// Krum scores of the models `members` (indices into the `n * n` matrix `distances`): for each,
/// the sum of the squared distances to its `max(1, m - f - 2)` nearest other members, where `m`
/// is the number of members and `f` = `num_malicious` (Flower's `aggregate_krum`).
pub fn krum_scores_of(distances: &[f64], n: usize, members: &[usize], num_malicious: usize) -> Vec<f64> {
    assert_eq!(distances.len(), n * n, "an n * n matrix");
    let m = members.len();
    let closest = m.saturating_sub(num_malicious + 2).max(1).min(m.saturating_sub(1));
    let mut row = Vec::with_capacity(m);
    members
        .iter()
        .map(|&i| {
            row.clear();
            row.extend(members.iter().filter(|&&j| j != i).map(|&j| distances[i * n + j]));
            row.sort_unstable_by(f64::total_cmp);
            row[..closest].iter().sum()
        })
        .collect()
}

/// Krum scores of all `n` models (see [`krum_scores_of`]).
pub fn krum_scores(distances: &[f64], n: usize, num_malicious: usize) -> Vec<f64> {
    let all: Vec<usize> = (0..n).collect();
    krum_scores_of(distances, n, &all, num_malicious)
}

/// Krum: the index of the model with the lowest score (the first one on ties, as `argmin`).
///
/// # Panics
/// When `n` is zero.
pub fn krum_select(distances: &[f64], n: usize, num_malicious: usize) -> usize {
    assert!(n > 0, "at least one model");
    argmin(&krum_scores(distances, n, num_malicious))
}

/// Multi-Krum: the indices of the `to_keep` models with the lowest scores, best first (ties by
/// index).
///
/// # Panics
/// When `to_keep` is zero or more than `n`.
pub fn multi_krum_select(distances: &[f64], n: usize, num_malicious: usize, to_keep: usize) -> Vec<usize> {
    assert!(to_keep > 0 && to_keep <= n, "keep between 1 and n models");
    let scores = krum_scores(distances, n, num_malicious);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    order.truncate(to_keep);
    order
}

fn argmin(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x < v[best] {
            best = i;
        }
    }
    best
}

/// Bulyan's selection step with Krum as the inner rule (Flower's `aggregate_bulyan`): picks
/// `theta = n - 2f` models one by one, each time the Krum choice among those not yet picked.
/// Returns their indices in the order picked.
///
/// # Panics
/// When `n < 4f + 3` (Bulyan's assumption).
pub fn bulyan_select(distances: &[f64], n: usize, num_malicious: usize) -> Vec<usize> {
    assert!(n >= 4 * num_malicious + 3, "Bulyan needs n >= 4f + 3");
    let theta = n - 2 * num_malicious;
    let mut remaining: Vec<usize> = (0..n).collect();
    let mut picked = Vec::with_capacity(theta);
    for _ in 0..theta {
        let best = argmin(&krum_scores_of(distances, n, &remaining, num_malicious));
        picked.push(remaining.remove(best));
    }
    picked
}

/// Bulyan's aggregation step: per coordinate, the mean of the `beta` values closest to the
/// coordinate-wise median of the inputs (Flower's `_aggregate_n_closest_weights` around
/// `aggregate_median`). Of equally close values, the smaller is taken.
///
/// # Panics
/// When `beta` is zero or more than the number of inputs, or an input is shorter than `out`.
pub fn closest_to_median_mean_into(out: &mut [f32], inputs: &[&[f32]], beta: usize, threads: usize) {
    let n = inputs.len();
    assert!(beta > 0 && beta <= n, "beta between 1 and the number of inputs");
    sorted_blocks(out, inputs, threads, |block, lanes| {
        // The `beta` values nearest the median m are a run `start..start + beta` of the sorted
        // column. Sliding the run right by one (dropping x[s], taking x[s + beta]) helps exactly
        // when m - x[s] > x[s + beta] - m, a condition that holds for a prefix of s: so `start`
        // is the number of s for which it holds. Branchless, lane by lane.
        let mut med = [0.0f64; LANES];
        for (l, m) in med.iter_mut().enumerate() {
            *m = block_median(block, l);
        }
        let mut start = [0usize; LANES];
        for s in 0..n - beta {
            for l in 0..LANES {
                let (left, right) = (f64::from(block[s][l]), f64::from(block[s + beta][l]));
                start[l] += usize::from(med[l] - left > right - med[l]);
            }
        }
        let mut sum = [0.0f64; LANES];
        for (k, row) in block.iter().enumerate() {
            for l in 0..LANES {
                let inside = k >= start[l] && k < start[l] + beta;
                sum[l] += if inside { f64::from(row[l]) } else { 0.0 };
            }
        }
        for (o, s) in lanes.iter_mut().zip(sum) {
            *o = (s / beta as f64) as f32;
        }
    });
}

/// The server-side optimiser rules of Flower's FedOpt family, per coordinate, with
/// `delta = avg - w` (the FedAvg of the round minus the current model).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptRule {
    /// FedAdagrad: `m = delta`, `v = v + delta^2`, `w = w + eta * m / (sqrt(v) + tau)`.
    Adagrad {
        /// Server learning rate.
        eta: f64,
        /// Adaptivity.
        tau: f64,
    },
    /// FedAdam: `m = b1 m + (1 - b1) delta`, `v = b2 v + (1 - b2) delta^2`,
    /// `w = w + eta_norm * m / (sqrt(v) + tau)`, where the caller folds Flower's bias correction
    /// into `eta_norm`.
    Adam {
        /// First-moment decay.
        beta_1: f64,
        /// Second-moment decay.
        beta_2: f64,
        /// The learning rate with the bias correction applied.
        eta_norm: f64,
        /// Adaptivity.
        tau: f64,
    },
    /// FedYogi: `m` as Adam, `v = v - (1 - b2) delta^2 sign(v - delta^2)`,
    /// `w = w + eta * m / (sqrt(v) + tau)`.
    Yogi {
        /// First-moment decay.
        beta_1: f64,
        /// Second-moment decay.
        beta_2: f64,
        /// Server learning rate.
        eta: f64,
        /// Adaptivity.
        tau: f64,
    },
}

/// numpy's `sign`: zero for zero.
#[inline]
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// One server optimiser step, in place: `weights` holds the current model and receives the new
/// one, `m` and `v` hold the moments and receive the new ones; `avg` is the round's FedAvg.
/// Computed in f64 per value, stored as f32.
///
/// # Panics
/// When the slices differ in length.
pub fn opt_step(rule: OptRule, weights: &mut [f32], avg: &[f32], m: &mut [f32], v: &mut [f32], threads: usize) {
    let n = weights.len();
    assert!(avg.len() == n && m.len() == n && v.len() == n, "slices of one length");
    let kernel = |w: &mut [f32], avg: &[f32], m: &mut [f32], v: &mut [f32]| match rule {
        OptRule::Adagrad { eta, tau } => {
            for i in 0..w.len() {
                let (x, d) = (f64::from(w[i]), f64::from(avg[i]) - f64::from(w[i]));
                // Flower runs FedAdagrad through FedOpt's momentum with beta_1 = 0.
                let mt = 0.0 * f64::from(m[i]) + d;
                let vt = f64::from(v[i]) + d * d;
                m[i] = mt as f32;
                v[i] = vt as f32;
                w[i] = (x + eta * mt / (vt.sqrt() + tau)) as f32;
            }
        }
        OptRule::Adam { beta_1, beta_2, eta_norm, tau } => {
            for i in 0..w.len() {
                let (x, d) = (f64::from(w[i]), f64::from(avg[i]) - f64::from(w[i]));
                let mt = beta_1 * f64::from(m[i]) + (1.0 - beta_1) * d;
                let vt = beta_2 * f64::from(v[i]) + (1.0 - beta_2) * (d * d);
                m[i] = mt as f32;
                v[i] = vt as f32;
                w[i] = (x + eta_norm * mt / (vt.sqrt() + tau)) as f32;
            }
        }
        OptRule::Yogi { beta_1, beta_2, eta, tau } => {
            for i in 0..w.len() {
                let (x, d) = (f64::from(w[i]), f64::from(avg[i]) - f64::from(w[i]));
                let mt = beta_1 * f64::from(m[i]) + (1.0 - beta_1) * d;
                let (v0, d2) = (f64::from(v[i]), d * d);
                let vt = v0 - (1.0 - beta_2) * d2 * sign(v0 - d2);
                m[i] = mt as f32;
                v[i] = vt as f32;
                w[i] = (x + eta * mt / (vt.sqrt() + tau)) as f32;
            }
        }
    };
    let threads = threads.max(1);
    if threads == 1 || n.saturating_mul(4) < PARALLEL_THRESHOLD {
        kernel(weights, avg, m, v);
        return;
    }
    let per = n.div_ceil(threads).next_multiple_of(16);
    let kernel = &kernel;
    std::thread::scope(|s| {
        for (((w, a), m), v) in
            weights.chunks_mut(per).zip(avg.chunks(per)).zip(m.chunks_mut(per)).zip(v.chunks_mut(per))
        {
            s.spawn(move || kernel(w, a, m, v));
        }
    });
}

/// FedAdam's step (see [`OptRule::Adam`]); `eta_norm` carries Flower's bias correction, see
/// [`adam_eta_norm`].
#[allow(clippy::too_many_arguments)]
pub fn adam_step(
    weights: &mut [f32],
    avg: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    beta_1: f64,
    beta_2: f64,
    eta_norm: f64,
    tau: f64,
    threads: usize,
) {
    opt_step(OptRule::Adam { beta_1, beta_2, eta_norm, tau }, weights, avg, m, v, threads);
}

/// Flower 1.x FedAdam's bias-corrected learning rate for `server_round`:
/// `eta * sqrt(1 - beta_2^(round + 1)) / (1 - beta_1^(round + 1))`.
pub fn adam_eta_norm(eta: f64, beta_1: f64, beta_2: f64, server_round: u32) -> f64 {
    let t = f64::from(server_round) + 1.0;
    eta * (1.0 - beta_2.powf(t)).sqrt() / (1.0 - beta_1.powf(t))
}

/// FedYogi's step (see [`OptRule::Yogi`]).
#[allow(clippy::too_many_arguments)]
pub fn yogi_step(
    weights: &mut [f32],
    avg: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    beta_1: f64,
    beta_2: f64,
    eta: f64,
    tau: f64,
    threads: usize,
) {
    opt_step(OptRule::Yogi { beta_1, beta_2, eta, tau }, weights, avg, m, v, threads);
}

/// FedAdagrad's step (see [`OptRule::Adagrad`]).
pub fn adagrad_step(
    weights: &mut [f32],
    avg: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    eta: f64,
    tau: f64,
    threads: usize,
) {
    opt_step(OptRule::Adagrad { eta, tau }, weights, avg, m, v, threads);
}

/// FedAvgM's step, in place (Flower's `FedAvgM.aggregate_fit`): with the pseudo-gradient
/// `g = w - avg`, the momentum `momentum = g` on the first step and `server_momentum * momentum + g`
/// afterwards, and `w = w - server_learning_rate * momentum`. Pass an empty `momentum` when
/// `server_momentum` is zero: then `w = w - server_learning_rate * g`.
///
/// # Panics
/// When the slices differ in length (`momentum` may be empty).
pub fn momentum_step(
    weights: &mut [f32],
    avg: &[f32],
    momentum: &mut [f32],
    server_learning_rate: f64,
    server_momentum: f64,
    first: bool,
    threads: usize,
) {
    let n = weights.len();
    assert_eq!(avg.len(), n, "slices of one length");
    assert!(momentum.is_empty() || momentum.len() == n, "momentum empty or of the model's length");
    let lr = server_learning_rate;
    let kernel = |w: &mut [f32], avg: &[f32], mom: &mut [f32]| {
        if mom.is_empty() {
            for (w, &a) in w.iter_mut().zip(avg) {
                let g = f64::from(*w) - f64::from(a);
                *w = (f64::from(*w) - lr * g) as f32;
            }
        } else {
            for ((w, &a), m) in w.iter_mut().zip(avg).zip(mom.iter_mut()) {
                let g = f64::from(*w) - f64::from(a);
                let mt = if first { g } else { server_momentum * f64::from(*m) + g };
                *m = mt as f32;
                *w = (f64::from(*w) - lr * mt) as f32;
            }
        }
    };
    let threads = threads.max(1);
    if threads == 1 || n.saturating_mul(3) < PARALLEL_THRESHOLD {
        kernel(weights, avg, momentum);
        return;
    }
    let per = n.div_ceil(threads).next_multiple_of(16);
    let kernel = &kernel;
    std::thread::scope(|s| {
        let mut mom = momentum.chunks_mut(per);
        for (w, a) in weights.chunks_mut(per).zip(avg.chunks(per)) {
            let m = mom.next().unwrap_or_default();
            s.spawn(move || kernel(w, a, m));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(v: &[Vec<f32>]) -> Vec<&[f32]> {
        v.iter().map(|x| x.as_slice()).collect()
    }

    #[test]
    fn median_odd_and_even() {
        let ins = vec![vec![1.0, 10.0], vec![5.0, -2.0], vec![3.0, 4.0]];
        let mut out = vec![0.0; 2];
        median_into(&mut out, &refs(&ins), 1);
        assert_eq!(out, vec![3.0, 4.0]);
        let ins = vec![vec![1.0], vec![5.0], vec![3.0], vec![100.0]];
        let mut out = vec![0.0; 1];
        median_into(&mut out, &refs(&ins), 1);
        assert_eq!(out, vec![4.0], "mean of 3 and 5");
    }

    #[test]
    fn networks_sort_every_input() {
        // The 0-1 principle: a network sorts everything iff it sorts every 0/1 sequence.
        for n in 1..=14usize {
            let net = sorting_network(n);
            assert!(net.iter().all(|&(a, b)| a < b && b < n));
            for bits in 0u32..(1 << n) {
                let mut v: Vec<u32> = (0..n).map(|i| (bits >> i) & 1).collect();
                for &(a, b) in &net {
                    if v[a] > v[b] {
                        v.swap(a, b);
                    }
                }
                assert!(v.windows(2).all(|w| w[0] <= w[1]), "n = {n}, input {bits:b}");
            }
        }
        assert!(sorting_network(10).len() <= 35, "{}", sorting_network(10).len());
        // Larger n against the standard sort.
        for n in [17usize, 40, 100, 256, 300] {
            let ins: Vec<Vec<f32>> =
                (0..n).map(|k| (0..20).map(|i| ((k * 7919 + i * 104_729) % 1009) as f32).collect()).collect();
            let mut out = vec![0.0; 20];
            median_into(&mut out, &refs(&ins), 1);
            for (i, &o) in out.iter().enumerate() {
                let mut col: Vec<f32> = ins.iter().map(|x| x[i]).collect();
                col.sort_by(f32::total_cmp);
                let m = if n % 2 == 1 { col[n / 2] } else { (col[n / 2 - 1] + col[n / 2]) / 2.0 };
                assert_eq!(o, m, "n = {n}, coordinate {i}");
            }
        }
    }

    #[test]
    fn median_many_inputs() {
        for n in [31usize, 40, 257, 300] {
            let ins: Vec<Vec<f32>> = (0..n).map(|k| vec![((k * 17) % n) as f32]).collect();
            let mut out = vec![0.0; 1];
            median_into(&mut out, &refs(&ins), 1);
            let expect = if n % 2 == 1 { (n / 2) as f32 } else { (n as f32 - 1.0) / 2.0 };
            assert_eq!(out[0], expect, "n = {n}");
        }
    }

    #[test]
    fn trimmed_mean_cuts_both_ends() {
        // 5 values, beta 0.2: cut one from each end of [-100, 1, 2, 3, 100] -> mean(1, 2, 3).
        let ins = vec![vec![100.0], vec![1.0], vec![-100.0], vec![3.0], vec![2.0]];
        let mut out = vec![0.0; 1];
        trimmed_mean_into(&mut out, &refs(&ins), 0.2, 1);
        assert_eq!(out, vec![2.0]);
        // beta 0.1 with 5 values cuts nothing: the plain mean.
        trimmed_mean_into(&mut out, &refs(&ins), 0.1, 1);
        assert_eq!(out, vec![1.2]);
        assert_eq!(trim_count(10, 0.25), 2);
        // 30 values, beta 0.2: cut 6 from each end of 0..30 -> mean of 6..=23 = 14.5.
        let ins: Vec<Vec<f32>> = (0..30).map(|k| vec![((k * 7) % 30) as f32]).collect();
        trimmed_mean_into(&mut out, &refs(&ins), 0.2, 1);
        assert_eq!(out, vec![14.5]);
    }

    #[test]
    fn distances_and_krum_pick_the_honest_cluster() {
        // Four honest models near the origin, one far away.
        let ins = vec![vec![0.0, 0.0], vec![0.1, 0.0], vec![0.0, 0.2], vec![0.1, 0.1], vec![10.0, -10.0]];
        let d = pairwise_sq_distances(&refs(&ins), 1);
        assert_eq!(d[0], 0.0);
        assert!((d[1] - 0.01).abs() < 1e-8 && (d[5] - 0.01).abs() < 1e-8, "symmetric");
        assert!((d[4] - 200.0).abs() < 1e-9);
        // n = 5, f = 1: each score sums the squared distances to the 2 nearest others.
        // d01 = .01, d02 = .04, d03 = .02, d12 = .05, d13 = .01, d23 = .02.
        let scores = krum_scores(&d, 5, 1);
        let expect = [0.03, 0.02, 0.06, 0.03];
        for (s, e) in scores.iter().zip(expect) {
            assert!((s - e).abs() < 1e-7, "{scores:?}");
        }
        assert!(scores[4] > 100.0);
        assert_eq!(krum_select(&d, 5, 1), 1);
        assert_eq!(multi_krum_select(&d, 5, 1, 3), vec![1, 0, 3], "ties by index");
        // f = 0: the 3 nearest: .07, .07, .11, .05.
        assert_eq!(krum_select(&d, 5, 0), 3);
        let picked = bulyan_select(&d, 5, 0);
        assert_eq!(picked.len(), 5);
        assert_eq!(*picked.last().unwrap(), 4, "the outlier is picked last");
    }

    #[test]
    fn distances_do_not_depend_on_threads() {
        let n = 200_003;
        let ins: Vec<Vec<f32>> =
            (0..5).map(|k| (0..n).map(|i| ((i * 31 + k * 17) % 101) as f32 * 0.01).collect()).collect();
        let one = pairwise_sq_distances(&refs(&ins), 1);
        assert_eq!(one, pairwise_sq_distances(&refs(&ins), 2));
        assert_eq!(one, pairwise_sq_distances(&refs(&ins), 7));
        let exact: f64 = (0..n).map(|i| (f64::from(ins[0][i]) - f64::from(ins[3][i])).powi(2)).sum();
        assert!((one[3] - exact).abs() / exact < 1e-6, "f32 squares over short runs");
    }

    #[test]
    fn closest_to_median() {
        // Sorted [1, 2, 4, 8, 9]: median 4, the 3 closest are 2, 4 and... |1-4|=3, |8-4|=4 -> 1.
        let ins = vec![vec![9.0], vec![1.0], vec![4.0], vec![8.0], vec![2.0]];
        let mut out = vec![0.0; 1];
        closest_to_median_mean_into(&mut out, &refs(&ins), 3, 1);
        assert_eq!(out, vec![7.0 / 3.0]);
        closest_to_median_mean_into(&mut out, &refs(&ins), 1, 1);
        assert_eq!(out, vec![4.0]);
        closest_to_median_mean_into(&mut out, &refs(&ins), 5, 1);
        assert_eq!(out, vec![24.0 / 5.0]);
        // Even count [1, 2, 4, 8]: median 3; 2 closest are 2 and 4.
        let ins = vec![vec![8.0], vec![1.0], vec![4.0], vec![2.0]];
        closest_to_median_mean_into(&mut out, &refs(&ins), 2, 1);
        assert_eq!(out, vec![3.0]);
    }

    #[test]
    fn optimiser_steps_by_hand() {
        // One coordinate, w = 1, avg = 1.5: delta = 0.5.
        let (mut w, mut m, mut v) = (vec![1.0f32], vec![0.0f32], vec![0.0f32]);
        adagrad_step(&mut w, &[1.5], &mut m, &mut v, 0.1, 0.0, 1);
        // m = 0.5, v = 0.25, w = 1 + 0.1 * 0.5 / 0.5 = 1.1.
        assert_eq!((m[0], v[0]), (0.5, 0.25));
        assert!((w[0] - 1.1).abs() < 1e-7);
        let (mut w, mut m, mut v) = (vec![1.0f32], vec![0.0f32], vec![0.0f32]);
        adam_step(&mut w, &[1.5], &mut m, &mut v, 0.9, 0.99, 0.1, 0.0, 1);
        // m = 0.05, v = 0.0025, w = 1 + 0.1 * 0.05 / 0.05 = 1.1.
        assert!((m[0] - 0.05).abs() < 1e-8 && (v[0] - 0.0025).abs() < 1e-9);
        assert!((w[0] - 1.1).abs() < 1e-6);
        let (mut w, mut m, mut v) = (vec![1.0f32], vec![0.0f32], vec![0.0f32]);
        yogi_step(&mut w, &[1.5], &mut m, &mut v, 0.9, 0.99, 0.01, 0.0, 1);
        // v = 0 - 0.01 * 0.25 * sign(-0.25) = 0.0025, as Adam's first step.
        assert!((v[0] - 0.0025).abs() < 1e-9);
        assert!((w[0] - 1.01).abs() < 1e-6);
        // Flower's bias correction: round 1 -> eta * sqrt(1 - 0.99^2) / (1 - 0.9^2).
        let e = adam_eta_norm(0.1, 0.9, 0.99, 1);
        assert!((e - 0.1 * (1.0f64 - 0.9801).sqrt() / 0.19).abs() < 1e-15);
    }

    #[test]
    fn momentum_by_hand() {
        // w = 1, avg = 0.5: g = 0.5. First step: m = g, w = 1 - 1 * 0.5 = 0.5.
        let (mut w, mut m) = (vec![1.0f32], vec![0.0f32]);
        momentum_step(&mut w, &[0.5], &mut m, 1.0, 0.9, true, 1);
        assert_eq!((w[0], m[0]), (0.5, 0.5));
        // Second: g = 0.5 - 0.25 = 0.25, m = 0.9 * 0.5 + 0.25 = 0.7, w = 0.5 - 0.7 = -0.2.
        momentum_step(&mut w, &[0.25], &mut m, 1.0, 0.9, false, 1);
        assert!((m[0] - 0.7).abs() < 1e-7 && (w[0] + 0.2).abs() < 1e-7);
        let mut w = vec![1.0f32];
        momentum_step(&mut w, &[0.5], &mut [], 0.5, 0.0, true, 1);
        assert_eq!(w[0], 0.75);
    }

    #[test]
    fn threads_give_the_same_values() {
        let n = 100_001;
        let ins: Vec<Vec<f32>> = (0..7).map(|k| (0..n).map(|i| ((i * 13 + k * 29) % 97) as f32).collect()).collect();
        let r = refs(&ins);
        let (mut a, mut b) = (vec![0.0; n], vec![1.0; n]);
        median_into(&mut a, &r, 1);
        median_into(&mut b, &r, 3);
        assert_eq!(a, b);
        trimmed_mean_into(&mut a, &r, 0.2, 1);
        trimmed_mean_into(&mut b, &r, 0.2, 3);
        assert_eq!(a, b);
        closest_to_median_mean_into(&mut a, &r, 3, 1);
        closest_to_median_mean_into(&mut b, &r, 3, 3);
        assert_eq!(a, b);
        let (mut w1, mut m1, mut v1) = (ins[0].clone(), vec![0.0; n], vec![0.0; n]);
        let (mut w2, mut m2, mut v2) = (ins[0].clone(), vec![0.0; n], vec![0.0; n]);
        adam_step(&mut w1, &ins[1], &mut m1, &mut v1, 0.9, 0.99, 0.1, 1e-9, 1);
        adam_step(&mut w2, &ins[1], &mut m2, &mut v2, 0.9, 0.99, 0.1, 1e-9, 3);
        assert_eq!((w1, m1, v1), (w2, m2, v2));
    }

    /// Inputs of very different magnitudes cut at block boundaries and added part by part,
    /// with several threads or one, give the distances of the whole inputs to the bit.
    #[test]
    fn distances_added_in_parts_cut_at_blocks_are_the_whole_ones() {
        let len = 7 * DISTANCE_BLOCK + 123;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let ins: Vec<Vec<f32>> = (0..5)
            .map(|_| (0..len).map(|i| [1e-3f32, 1.0, 37.0][(i / DISTANCE_BLOCK) % 3] * next()).collect())
            .collect();
        let whole = pairwise_sq_distances(&refs(&ins), 1);
        for cuts in [vec![DISTANCE_BLOCK], vec![2 * DISTANCE_BLOCK, 3 * DISTANCE_BLOCK, 6 * DISTANCE_BLOCK]] {
            for threads in [1, 3] {
                let mut parts = vec![0.0f64; 25];
                let mut start = 0;
                for end in cuts.iter().copied().chain([len]) {
                    let piece: Vec<&[f32]> = ins.iter().map(|v| &v[start..end]).collect();
                    add_pairwise_sq_distances(&mut parts, &piece, threads);
                    start = end;
                }
                assert!(parts.iter().zip(&whole).all(|(a, b)| a.to_bits() == b.to_bits()), "{cuts:?}, {threads}");
            }
        }
    }
}
