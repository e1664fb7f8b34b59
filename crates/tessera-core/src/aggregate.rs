//! The arithmetic of federated aggregation, as free functions over slices.
//!
//! FedAvg folds one update at a time into a running sum ([`scaled_add_into`], through
//! [`crate::strategy::FitSum`]), so a caller can drop each update once it is added. [`weighted_sum_into`] sums updates held
//! together: each thread owns a contiguous slice of the output, small enough to stay in
//! cache, and streams every update through it once.

/// Output floats per cache block: 16 Ki floats = 64 KiB, which stays in L2 while every
/// update streams through it.
const BLOCK: usize = 16 * 1024;

/// Below this many multiply-adds a single thread is faster than spawning more.
const PARALLEL_THRESHOLD: usize = 1 << 20;

/// `out[i] = sum_k weights[k] * inputs[k][i]`, split across `threads` threads.
///
/// # Panics
/// When `inputs` and `weights` differ in length or an input is shorter than `out`.
pub fn weighted_sum_into(out: &mut [f32], inputs: &[&[f32]], weights: &[f32], threads: usize) {
    assert_eq!(inputs.len(), weights.len(), "one weight per input");
    for i in inputs {
        assert!(i.len() >= out.len(), "input shorter than output");
    }
    let n = out.len();
    let threads = threads.max(1);
    if threads == 1 || n * inputs.len() < PARALLEL_THRESHOLD {
        sum_range(out, 0, inputs, weights);
        return;
    }
    let per = n.div_ceil(threads).next_multiple_of(16);
    std::thread::scope(|s| {
        for (t, chunk) in out.chunks_mut(per).enumerate() {
            s.spawn(move || sum_range(chunk, t * per, inputs, weights));
        }
    });
}

fn sum_range(out: &mut [f32], offset: usize, inputs: &[&[f32]], weights: &[f32]) {
    for (b, block) in out.chunks_mut(BLOCK).enumerate() {
        let start = offset + b * BLOCK;
        let len = block.len();
        block.fill(0.0);
        // Four updates per pass over the block: a quarter of the output traffic.
        let mut k = 0;
        while k + 4 <= inputs.len() {
            let (a, b, c, d) = (
                &inputs[k][start..start + len],
                &inputs[k + 1][start..start + len],
                &inputs[k + 2][start..start + len],
                &inputs[k + 3][start..start + len],
            );
            let (wa, wb, wc, wd) = (weights[k], weights[k + 1], weights[k + 2], weights[k + 3]);
            for i in 0..len {
                block[i] += wa * a[i] + wb * b[i] + wc * c[i] + wd * d[i];
            }
            k += 4;
        }
        for (input, &w) in inputs[k..].iter().zip(&weights[k..]) {
            let src = &input[start..start + len];
            for (o, &x) in block.iter_mut().zip(src) {
                *o += w * x;
            }
        }
    }
}

/// The number of threads aggregation uses by default on this machine (given from outside,
/// since this crate does not probe the machine).
pub fn default_threads(available: usize) -> usize {
    available.clamp(1, 64)
}

/// `out[i] += w * x[i]`: one update folded into a running weighted sum, split across
/// `threads` threads for large tensors. Each value is computed the same way whatever the
/// number of threads.
///
/// # Panics
/// When `x` is shorter than `out`.
pub fn scaled_add_into(out: &mut [f32], x: &[f32], w: f32, threads: usize) {
    assert!(x.len() >= out.len(), "input shorter than output");
    let n = out.len();
    let threads = threads.max(1);
    if threads == 1 || n < PARALLEL_THRESHOLD {
        out.iter_mut().zip(x).for_each(|(o, &v)| *o += w * v);
        return;
    }
    let per = n.div_ceil(threads).next_multiple_of(16);
    std::thread::scope(|s| {
        for (chunk, src) in out.chunks_mut(per).zip(x.chunks(per)) {
            s.spawn(move || chunk.iter_mut().zip(src).for_each(|(o, &v)| *o += w * v));
        }
    });
}

/// `out[i] /= d`, split across `threads` threads for large tensors.
pub fn divide_into(out: &mut [f32], d: f32, threads: usize) {
    let threads = threads.max(1);
    if threads == 1 || out.len() < PARALLEL_THRESHOLD {
        out.iter_mut().for_each(|o| *o /= d);
        return;
    }
    let per = out.len().div_ceil(threads).next_multiple_of(16);
    std::thread::scope(|s| {
        for chunk in out.chunks_mut(per) {
            s.spawn(move || chunk.iter_mut().for_each(|o| *o /= d));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folding_is_the_same_with_threads() {
        let n = (1 << 20) + 3;
        let x: Vec<f32> = (0..n).map(|i| ((i * 7) % 13) as f32 * 0.1).collect();
        let mut one = vec![1.0f32; n];
        let mut four = vec![1.0f32; n];
        scaled_add_into(&mut one, &x, 3.0, 1);
        scaled_add_into(&mut four, &x, 3.0, 4);
        assert_eq!(one, four);
        divide_into(&mut one, 7.0, 1);
        divide_into(&mut four, 7.0, 4);
        assert_eq!(one, four);
        assert_eq!(one[1], (1.0 + 3.0 * x[1]) / 7.0);
    }

    #[test]
    fn threads_give_the_same_sum() {
        let n = 300_001;
        let inputs: Vec<Vec<f32>> =
            (0..7).map(|k| (0..n).map(|i| ((i * 31 + k * 17) % 101) as f32).collect()).collect();
        let refs: Vec<&[f32]> = inputs.iter().map(|v| v.as_slice()).collect();
        let w = [0.1, 0.2, 0.05, 0.15, 0.2, 0.1, 0.2];
        let mut single = vec![0.0; n];
        let mut multi = vec![7.0; n];
        weighted_sum_into(&mut single, &refs, &w, 1);
        weighted_sum_into(&mut multi, &refs, &w, 4);
        assert_eq!(single, multi);
        let i = 12345;
        let expect: f32 = (0..7).map(|k| w[k] * inputs[k][i]).sum();
        assert!((single[i] - expect).abs() < 1e-3);
    }
}
