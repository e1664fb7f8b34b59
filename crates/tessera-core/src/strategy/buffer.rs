//! FedBuff's buffer: buffered asynchronous aggregation (Nguyen et al., "Federated Learning
//! with Buffered Asynchronous Aggregation", AISTATS 2022, Algorithm 1; NVIDIA FLARE ships
//! the same scheme). Participants train on whatever global model they were sent; the server
//! adds each update's difference to the model it started from, weighted down by its
//! staleness, and after `K` of them takes one server step.
//!
//! The paper weighs the `K` buffered updates equally; here they are weighted by example
//! counts, as FedAvg does, so that a buffer of fresh updates from every participant gives
//! FedAvg's model exactly (equal when participants hold equal data):
//!
//! ```text
//! s(τ)  = (1 + τ)^(-a)                               staleness weight (paper: a = 1/2)
//! Δ̄     = Σ_i n_i · s(τ_i) · (y_i − x_{v_i}) / Σ_i n_i
//! x     ← x + η_g · Δ̄
//! ```
//!
//! where `y_i` is participant `i`'s model, trained on `n_i` examples from the global model
//! `x_{v_i}` of version `v_i`, `τ_i` the server steps taken since that version, and `η_g`
//! the server learning rate.

use crate::aggregate::scaled_add_into;
use crate::tensor::Tensors;

use super::{StrategyError, check_finite, check_output, sum::zeros_like};

/// The staleness weight `s(τ) = (1 + τ)^(-a)`: 1 for a fresh update, `1/√2` for one a step
/// old with the paper's `a = 1/2`. `a = 0` weighs every update alike.
pub fn staleness_weight(staleness: u32, exponent: f64) -> f64 {
    (1.0 + f64::from(staleness)).powf(-exponent)
}

/// Updates buffered for FedBuff's next server step (see the [module](self)).
#[derive(Debug, Clone)]
pub struct FedBuffBuffer {
    step: u32,
    exponent: f64,
    sum: Tensors,
    examples: u64,
    updates: usize,
    threads: usize,
}

impl FedBuffBuffer {
    /// An empty buffer for server step `step` of a model laid out as `model`; `exponent`
    /// is the staleness exponent `a`; `threads`: how many threads each addition may use.
    pub fn new(step: u32, model: &Tensors, exponent: f64, threads: usize) -> FedBuffBuffer {
        FedBuffBuffer { step, exponent, sum: zeros_like(model), examples: 0, updates: 0, threads: threads.max(1) }
    }

    /// Adds participant `node`'s `update`, trained on `num_examples` examples from `base`
    /// (the global model it was sent), `staleness` server steps old. Refuses an update or
    /// base laid out otherwise than the buffer ([`StrategyError::Layout`]), non-finite values
    /// ([`StrategyError::NonFinite`]) and example counts past `u64`
    /// ([`StrategyError::Examples`]); on error nothing is added.
    pub fn add(
        &mut self,
        node: &str,
        update: &Tensors,
        base: &Tensors,
        num_examples: u64,
        staleness: u32,
    ) -> Result<(), StrategyError> {
        let step = self.step;
        for t in [update, base] {
            self.sum.check_same_layout(t).map_err(|error| StrategyError::Layout {
                round: step,
                node: node.into(),
                error,
            })?;
        }
        check_finite(step, node, update)?;
        let examples = self.examples.checked_add(num_examples).ok_or_else(|| StrategyError::Examples {
            round: step,
            message: "the example counts add up to more than 2^64".into(),
        })?;
        let w = (num_examples as f64 * staleness_weight(staleness, self.exponent)) as f32;
        for (name, t) in self.sum.0.iter_mut() {
            scaled_add_into(&mut t.data, &update.0[name].data, w, self.threads);
            scaled_add_into(&mut t.data, &base.0[name].data, -w, self.threads);
        }
        self.examples = examples;
        self.updates += 1;
        Ok(())
    }

    /// Updates buffered.
    pub fn len(&self) -> usize {
        self.updates
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.updates == 0
    }

    /// Examples behind the buffered updates.
    pub fn examples(&self) -> u64 {
        self.examples
    }

    /// The server step: `current + server_lr · Δ̄`. Refuses an empty buffer
    /// ([`StrategyError::TooFewResults`]), zero examples in all ([`StrategyError::Examples`])
    /// and a non-finite result ([`StrategyError::Aggregation`]).
    pub fn apply(self, current: &Tensors, server_lr: f64) -> Result<Tensors, StrategyError> {
        let step = self.step;
        if self.updates == 0 {
            return Err(StrategyError::TooFewResults { round: step, results: 0, min: 1 });
        }
        if self.examples == 0 {
            return Err(StrategyError::Examples {
                round: step,
                message: "the updates hold zero examples in all".into(),
            });
        }
        let mut out = current.clone();
        out.check_same_layout(&self.sum).map_err(|error| StrategyError::Layout {
            round: step,
            node: "the global model".into(),
            error,
        })?;
        let scale = (server_lr / self.examples as f64) as f32;
        for (name, t) in out.0.iter_mut() {
            scaled_add_into(&mut t.data, &self.sum.0[name].data, scale, self.threads);
        }
        check_output(step, "fedbuff", &out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::FitSum;
    use crate::tensor::Tensor;

    fn one(v: Vec<f32>) -> Tensors {
        let mut t = Tensors::default();
        t.0.insert("p".into(), Tensor { shape: vec![v.len()], data: v });
        t
    }

    #[test]
    fn fresh_updates_from_everyone_give_fedavg() {
        let base = one(vec![1.0, -2.0, 0.5]);
        let ups = [(one(vec![2.0, -1.0, 0.0]), 3), (one(vec![0.0, 0.0, 1.0]), 1)];
        let mut b = FedBuffBuffer::new(1, &base, 0.5, 1);
        let mut s = FitSum::new(1, &base, 1);
        for (i, (u, n)) in ups.iter().enumerate() {
            b.add(&format!("n{i}"), u, &base, *n, 0).unwrap();
            s.add(&format!("n{i}"), u, *n).unwrap();
        }
        assert_eq!((b.len(), b.examples()), (2, 4));
        let fedbuff = b.apply(&base, 1.0).unwrap();
        let fedavg = s.mean().unwrap();
        for (x, y) in fedbuff.0["p"].data.iter().zip(&fedavg.0["p"].data) {
            assert!((x - y).abs() < 1e-6, "{x} against {y}");
        }
    }

    #[test]
    fn stale_updates_count_less_and_move_the_current_model() {
        assert_eq!(staleness_weight(0, 0.5), 1.0);
        assert!((staleness_weight(3, 0.5) - 0.5).abs() < 1e-12);
        assert_eq!(staleness_weight(7, 0.0), 1.0);
        // One update, two steps old, from a base of 0 to 1: Δ = 1 · (1+2)^-1 = 1/3,
        // added to the current model (10), at a server rate of 0.6.
        let mut b = FedBuffBuffer::new(4, &one(vec![0.0]), 1.0, 1);
        b.add("a", &one(vec![1.0]), &one(vec![0.0]), 5, 2).unwrap();
        let x = b.apply(&one(vec![10.0]), 0.6).unwrap();
        assert!((x.0["p"].data[0] - 10.2).abs() < 1e-5, "{:?}", x.0["p"].data);
    }

    #[test]
    fn refusals_add_nothing() {
        let z = one(vec![0.0, 0.0]);
        let mut b = FedBuffBuffer::new(2, &z, 0.5, 1);
        assert!(matches!(b.add("a", &one(vec![1.0]), &z, 1, 0), Err(StrategyError::Layout { .. })));
        assert!(matches!(b.add("a", &z, &one(vec![1.0]), 1, 0), Err(StrategyError::Layout { .. })));
        let e = b.add("a", &one(vec![1.0, f32::INFINITY]), &z, 1, 0).unwrap_err();
        assert!(matches!(e, StrategyError::NonFinite { index: 1, .. }), "{e}");
        b.add("a", &one(vec![1.0, 1.0]), &z, 2, 0).unwrap();
        assert!(matches!(b.add("b", &z, &z, u64::MAX, 0), Err(StrategyError::Examples { .. })));
        assert_eq!((b.len(), b.examples()), (1, 2));
        assert_eq!(b.clone().apply(&z, 1.0).unwrap().0["p"].data, vec![1.0, 1.0]);
        assert!(matches!(FedBuffBuffer::new(1, &z, 0.5, 1).apply(&z, 1.0), Err(StrategyError::TooFewResults { .. })));
        let mut zero = FedBuffBuffer::new(1, &z, 0.5, 1);
        zero.add("a", &z, &z, 0, 0).unwrap();
        assert!(matches!(zero.apply(&z, 1.0), Err(StrategyError::Examples { .. })));
        // A step past the f32 range is refused, not saved as inf.
        let mut huge = FedBuffBuffer::new(1, &z, 0.0, 1);
        huge.add("a", &one(vec![3e38, 0.0]), &one(vec![-3e38, 0.0]), 1, 0).unwrap();
        assert!(matches!(huge.apply(&z, 1.0), Err(StrategyError::Aggregation { .. })));
    }
}
