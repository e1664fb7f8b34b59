//! The arithmetic of federated aggregation, as free functions over slices.
//!
//! The hot loop is [`weighted_sum_into`]: each thread owns a contiguous slice of the output,
//! small enough to stay in cache, and streams every update through it once, so the whole
//! aggregation reads each input byte exactly once.

use crate::tensor::{Tensor, TensorError, Tensors};

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

/// FedAvg: the average of updates weighted by their example counts.
pub fn fedavg(updates: &[(&Tensors, u64)], threads: usize) -> Result<Tensors, TensorError> {
    let Some((first, _)) = updates.first() else {
        return Err(TensorError::Mismatch("no updates to aggregate".into()));
    };
    for (u, _) in &updates[1..] {
        first.check_same_layout(u)?;
    }
    let total: u64 = updates.iter().map(|(_, n)| *n).sum();
    if total == 0 {
        return Err(TensorError::Mismatch("the updates hold zero examples in all".into()));
    }
    let weights: Vec<f32> = updates.iter().map(|(_, n)| (*n as f64 / total as f64) as f32).collect();
    let mut out = Tensors::default();
    for (name, t) in &first.0 {
        let inputs: Vec<&[f32]> = updates.iter().map(|(u, _)| u.0[name].data.as_slice()).collect();
        let mut data = vec![0.0f32; t.data.len()];
        weighted_sum_into(&mut data, &inputs, &weights, threads);
        out.0.insert(name.clone(), Tensor { shape: t.shape.clone(), data });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(v: Vec<f32>) -> Tensors {
        let mut t = Tensors::default();
        t.0.insert("p".into(), Tensor { shape: vec![v.len()], data: v });
        t
    }

    #[test]
    fn fedavg_weights_by_examples() {
        let a = one(vec![1.0, 2.0, 3.0]);
        let b = one(vec![3.0, 6.0, 9.0]);
        // 1 example against 3: (1*a + 3*b) / 4.
        let avg = fedavg(&[(&a, 1), (&b, 3)], 1).unwrap();
        assert_eq!(avg.0["p"].data, vec![2.5, 5.0, 7.5]);
    }

    #[test]
    fn fedavg_refuses_mismatches() {
        let a = one(vec![1.0, 2.0]);
        let b = one(vec![1.0, 2.0, 3.0]);
        assert!(fedavg(&[(&a, 1), (&b, 1)], 1).is_err());
        assert!(fedavg(&[], 1).is_err());
        assert!(fedavg(&[(&a, 0)], 1).is_err());
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
