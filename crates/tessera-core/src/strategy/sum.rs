//! A round's results folded one at a time into a running example-weighted sum, so that a
//! strategy whose aggregate is a weighted mean (FedAvg, FedProx, FedAvgM, FedAdagrad,
//! FedAdam, FedYogi) never holds a round's updates: the caller adds each update as it
//! arrives and drops it.
//!
//! Determinism: f32 addition is not associative, so results are added in increasing node
//! order (the sum refuses anything else) and the same results always give the same bits,
//! whether they were held together or streamed, and whatever order they arrived in.

use super::{FitResult, StrategyError};
use crate::aggregate::{divide_into, scaled_add_into};
use std::collections::BTreeMap;

use crate::tensor::{Tensor, TensorError, Tensors};

/// `sum_k n_k * u_k` over the results added so far (f32, node order), with their example
/// count and nodes. Built by the caller ([`FitSum::new`], [`FitSum::add`]) and handed to
/// [`super::Strategy::aggregate_sum`].
#[derive(Clone, Debug)]
pub struct FitSum {
    round: u32,
    threads: usize,
    sum: Tensors,
    examples: u64,
    nodes: Vec<String>,
}

impl FitSum {
    /// An empty sum for `round`, with the layout of `current` (the model the round started
    /// from), or of the first update added when `current` is empty. `threads`: how many
    /// threads each addition may use.
    pub fn new(round: u32, current: &Tensors, threads: usize) -> FitSum {
        FitSum { round, threads: threads.max(1), sum: zeros_like(current), examples: 0, nodes: Vec::new() }
    }

    /// The sum of `results`, added in node order.
    pub fn of(round: u32, current: &Tensors, results: &[FitResult], threads: usize) -> Result<FitSum, StrategyError> {
        let mut sorted: Vec<&FitResult> = results.iter().collect();
        sorted.sort_by(|a, b| a.node.cmp(&b.node));
        Self::of_sorted(round, current, &sorted, threads)
    }

    /// The sum of results already in node order.
    pub(super) fn of_sorted(
        round: u32,
        current: &Tensors,
        sorted: &[&FitResult],
        threads: usize,
    ) -> Result<FitSum, StrategyError> {
        let mut sum = FitSum::new(round, current, threads);
        for r in sorted {
            sum.add(&r.node, &r.update, r.num_examples)?;
        }
        Ok(sum)
    }

    /// Adds participant `node`'s model, trained on `num_examples` examples. Refuses a node
    /// not after the last one added ([`StrategyError::DuplicateNode`] for the same node,
    /// [`StrategyError::Aggregation`] out of order), a layout other than the sum's
    /// ([`StrategyError::Layout`]), a non-finite value ([`StrategyError::NonFinite`]) and an
    /// example count past `u64` ([`StrategyError::Examples`]). On error nothing is added.
    pub fn add(&mut self, node: &str, update: &Tensors, num_examples: u64) -> Result<(), StrategyError> {
        let round = self.round;
        self.check_next(node)?;
        if self.nodes.is_empty() && self.sum.0.is_empty() {
            self.sum = zeros_like(update);
        }
        self.sum.check_same_layout(update).map_err(|error| StrategyError::Layout {
            round,
            node: node.into(),
            error,
        })?;
        super::check_finite(round, node, update)?;
        self.examples = self.examples.checked_add(num_examples).ok_or_else(|| StrategyError::Examples {
            round,
            message: "the example counts add up to more than 2^64".into(),
        })?;
        for (name, t) in self.sum.0.iter_mut() {
            scaled_add_into(&mut t.data, &update.0[name].data, num_examples as f32, self.threads);
        }
        self.nodes.push(node.into());
        Ok(())
    }

    /// An empty sum for `round` over float tensors of these shapes (a model's layout), for
    /// updates added part by part ([`FitSum::add_part`]).
    pub fn zeros(round: u32, shapes: &BTreeMap<String, Vec<usize>>, threads: usize) -> FitSum {
        let sum = Tensors(shapes.iter().map(|(n, s)| (n.clone(), Tensor::zeros(s))).collect());
        FitSum { round, threads: threads.max(1), sum, examples: 0, nodes: Vec::new() }
    }

    /// Checks that participant `node` may be added next: after the last one added, in node
    /// order ([`StrategyError::DuplicateNode`] for the same node,
    /// [`StrategyError::Aggregation`] out of order).
    pub fn check_next(&self, node: &str) -> Result<(), StrategyError> {
        let Some(last) = self.nodes.last() else { return Ok(()) };
        if node == last {
            return Err(StrategyError::DuplicateNode { round: self.round, node: node.into() });
        }
        if node < last.as_str() {
            return Err(StrategyError::Aggregation {
                round: self.round,
                strategy: "fit sum".into(),
                message: format!("results are added in node order, and {node:?} comes before {last:?}"),
            });
        }
        Ok(())
    }

    /// Adds `num_examples × values` into elements `offset..offset + values.len()` of tensor
    /// `name`: a part of participant `node`'s update, for updates too large to hold whole
    /// (read from a stream, a chunk at a time). Each element takes the same operation as in
    /// [`FitSum::add`], so a sum built from parts has the same bits. Once every part of the
    /// update is added, [`FitSum::count`] records the participant.
    ///
    /// Refuses an unknown tensor or a range past its end ([`StrategyError::Layout`]) and a
    /// non-finite value ([`StrategyError::NonFinite`], with its index in the tensor). The
    /// parts added before stay in the sum: on an error the caller drops the sum (fails the
    /// round), as a participant's half-added update cannot be taken out again.
    pub fn add_part(
        &mut self,
        node: &str,
        name: &str,
        offset: usize,
        values: &[f32],
        num_examples: u64,
    ) -> Result<(), StrategyError> {
        let round = self.round;
        let layout =
            |what: String| StrategyError::Layout { round, node: node.into(), error: TensorError::Mismatch(what) };
        let t = self.sum.0.get_mut(name).ok_or_else(|| layout(format!("tensor {name:?} is not in the model")))?;
        let end = offset.checked_add(values.len()).filter(|e| *e <= t.data.len()).ok_or_else(|| {
            layout(format!("{} values from {offset} in tensor {name:?}, which has {}", values.len(), t.data.len()))
        })?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(StrategyError::NonFinite {
                round,
                node: node.into(),
                tensor: name.into(),
                index: offset + i,
                value: values[i].to_string(),
            });
        }
        scaled_add_into(&mut t.data[offset..end], values, num_examples as f32, self.threads);
        Ok(())
    }

    /// Records participant `node`, every part of whose update [`FitSum::add_part`] added,
    /// trained on `num_examples` examples. The refusals of [`FitSum::check_next`], and an
    /// example count past `u64` ([`StrategyError::Examples`]).
    pub fn count(&mut self, node: &str, num_examples: u64) -> Result<(), StrategyError> {
        self.check_next(node)?;
        self.examples = self.examples.checked_add(num_examples).ok_or_else(|| StrategyError::Examples {
            round: self.round,
            message: "the example counts add up to more than 2^64".into(),
        })?;
        self.nodes.push(node.into());
        Ok(())
    }

    /// Results added.
    pub fn results(&self) -> usize {
        self.nodes.len()
    }

    /// Examples over all results added.
    pub fn examples(&self) -> u64 {
        self.examples
    }

    /// The nodes added, in order.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// The example-weighted mean, `sum_k n_k * u_k / sum_k n_k` (FedAvg, McMahan et al.,
    /// 2017; Flower's `aggregate`). Refuses zero examples in all ([`StrategyError::Examples`]),
    /// an empty sum ([`StrategyError::TooFewResults`]) and a sum past the f32 range (huge
    /// example counts times huge values; [`StrategyError::Aggregation`]).
    pub fn mean(mut self) -> Result<Tensors, StrategyError> {
        let round = self.round;
        if self.nodes.is_empty() {
            return Err(StrategyError::TooFewResults { round, results: 0, min: 1 });
        }
        if self.examples == 0 {
            return Err(StrategyError::Examples { round, message: "the results hold zero examples in all".into() });
        }
        for t in self.sum.0.values_mut() {
            divide_into(&mut t.data, self.examples as f32, self.threads);
        }
        super::check_output(round, "fedavg", &self.sum)?;
        Ok(self.sum)
    }
}

/// Zeros with the layout of `t`.
pub(super) fn zeros_like(t: &Tensors) -> Tensors {
    Tensors(t.0.iter().map(|(n, x)| (n.clone(), Tensor::zeros(&x.shape))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(v: Vec<f32>) -> Tensors {
        let mut t = Tensors::default();
        t.0.insert("p".into(), Tensor { shape: vec![v.len()], data: v });
        t
    }

    fn result(node: &str, v: Vec<f32>, n: u64) -> FitResult {
        FitResult { node: node.into(), update: one(v), num_examples: n }
    }

    #[test]
    fn the_mean_weights_by_examples() {
        let rs = [result("a", vec![1.0, 2.0, 3.0], 1), result("b", vec![3.0, 6.0, 9.0], 3)];
        // (1*a + 3*b) / 4.
        let s = FitSum::of(1, &Tensors::default(), &rs, 1).unwrap();
        assert_eq!((s.results(), s.examples(), s.nodes()), (2, 4, &["a".to_string(), "b".to_string()][..]));
        assert_eq!(s.mean().unwrap().0["p"].data, vec![2.5, 5.0, 7.5]);
    }

    #[test]
    fn any_arrival_order_gives_the_same_bits() {
        let rs: Vec<FitResult> = (0..9)
            .map(|k| result(&format!("n{k}"), (0..5).map(|i| 0.1 + (i * 7 + k) as f32 * 0.013).collect(), 3 + k as u64))
            .collect();
        let mut backwards = rs.clone();
        backwards.reverse();
        let a = FitSum::of(1, &Tensors::default(), &rs, 1).unwrap().mean().unwrap();
        let b = FitSum::of(1, &Tensors::default(), &backwards, 1).unwrap().mean().unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn a_sum_of_parts_has_the_bits_of_the_whole() {
        let rs: Vec<FitResult> = (0..3)
            .map(|k| result(&format!("n{k}"), (0..7).map(|i| 0.1 + (i * 5 + k) as f32 * 0.37).collect(), 2 + k as u64))
            .collect();
        let whole = FitSum::of(1, &Tensors::default(), &rs, 1).unwrap().mean().unwrap();
        let mut parts = FitSum::zeros(1, &BTreeMap::from([("p".to_string(), vec![7])]), 1);
        for r in &rs {
            parts.check_next(&r.node).unwrap();
            let v = &r.update.0["p"].data;
            parts.add_part(&r.node, "p", 0, &v[..3], r.num_examples).unwrap();
            parts.add_part(&r.node, "p", 3, &v[3..], r.num_examples).unwrap();
            parts.count(&r.node, r.num_examples).unwrap();
        }
        assert_eq!((parts.results(), parts.examples()), (3, 9));
        assert_eq!(parts.mean().unwrap(), whole);
    }

    #[test]
    fn parts_out_of_place_are_refused() {
        let mut s = FitSum::zeros(2, &BTreeMap::from([("p".to_string(), vec![4])]), 1);
        assert!(matches!(s.add_part("a", "q", 0, &[1.0], 1), Err(StrategyError::Layout { .. })));
        assert!(matches!(s.add_part("a", "p", 3, &[1.0, 1.0], 1), Err(StrategyError::Layout { .. })));
        assert!(matches!(s.add_part("a", "p", usize::MAX, &[1.0], 1), Err(StrategyError::Layout { .. })));
        let e = s.add_part("a", "p", 2, &[1.0, f32::INFINITY], 1).unwrap_err();
        assert!(matches!(e, StrategyError::NonFinite { index: 3, .. }), "{e}");
        s.count("b", 1).unwrap();
        assert!(matches!(s.check_next("b"), Err(StrategyError::DuplicateNode { .. })));
        assert!(matches!(s.count("a", 1), Err(StrategyError::Aggregation { .. })));
        assert!(matches!(s.count("c", u64::MAX), Err(StrategyError::Examples { .. })));
    }

    #[test]
    fn refusals_add_nothing() {
        let mut s = FitSum::new(3, &one(vec![0.0, 0.0]), 1);
        s.add("b", &one(vec![1.0, 1.0]), 2).unwrap();
        assert!(matches!(s.add("b", &one(vec![1.0, 1.0]), 1), Err(StrategyError::DuplicateNode { round: 3, .. })));
        let e = s.add("a", &one(vec![1.0, 1.0]), 1).unwrap_err();
        assert!(e.to_string().contains("node order"), "{e}");
        assert!(matches!(s.add("c", &one(vec![1.0]), 1), Err(StrategyError::Layout { .. })));
        assert!(matches!(s.add("c", &one(vec![1.0, f32::NAN]), 1), Err(StrategyError::NonFinite { index: 1, .. })));
        assert!(matches!(s.add("c", &one(vec![1.0, 1.0]), u64::MAX), Err(StrategyError::Examples { .. })));
        assert_eq!((s.results(), s.examples()), (1, 2));
        assert_eq!(s.mean().unwrap().0["p"].data, vec![1.0, 1.0]);
        let zero = FitSum::of(1, &Tensors::default(), &[result("a", vec![1.0], 0)], 1).unwrap();
        assert!(matches!(zero.mean(), Err(StrategyError::Examples { .. })));
        assert!(matches!(FitSum::new(1, &Tensors::default(), 1).mean(), Err(StrategyError::TooFewResults { .. })));
        // Finite values times a huge example count overflow f32: refused, not saved as inf.
        let huge = FitSum::of(1, &Tensors::default(), &[result("a", vec![1e30], 1 << 62)], 1).unwrap();
        assert!(matches!(huge.mean(), Err(StrategyError::Aggregation { .. })));
    }
}
