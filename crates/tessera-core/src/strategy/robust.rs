//! Byzantine-robust strategies: FedMedian, FedTrimmedAvg, Krum / Multi-Krum and Bulyan.
//!
//! Each is a [`CoordinateRule`]: an optional choice among the participants made from the
//! pairwise squared distances of their whole models, then a rule applied coordinate by
//! coordinate. [`Strategy::aggregate_fit`] runs the rule over updates held whole, tensor
//! by tensor; a caller whose updates are too large to hold at once runs the same rule over
//! windows of coordinates read from where the updates are stored, with the same bits as
//! long as it cuts each tensor at multiples of
//! [`DISTANCE_BLOCK`](super::DISTANCE_BLOCK) elements and visits the tensors in name
//! order.

use serde::{Deserialize, Serialize};

use super::avg::{common_strategy_methods, params_json, stateless_restore};
use super::math::{
    add_pairwise_sq_distances, bulyan_select, closest_to_median_mean_into, krum_select, median_into, multi_krum_select,
    trimmed_mean_into,
};
use super::{
    Common, FitFailure, FitPlan, FitResult, Participation, Strategy, StrategyError, check_output, check_param,
    encode_state,
};
use crate::aggregate::{divide_into, scaled_add_into};
use crate::tensor::{Tensor, Tensors};

/// An aggregate computed coordinate by coordinate over the participants' models, in node
/// order, after an optional choice among them (see the module's documentation). Made by
/// [`Strategy::coordinate_rule`] for one round.
///
/// A caller runs it in three steps: when [`CoordinateRule::needs_distances`], it adds
/// every participant's values, a window at a time, into an `n * n` matrix with
/// [`add_pairwise_sq_distances`] (tensors in name order, windows cut at multiples of
/// [`DISTANCE_BLOCK`](super::DISTANCE_BLOCK) elements from each tensor's start);
/// [`CoordinateRule::select`] then names the participants whose values the rule reads;
/// [`CoordinateRule::apply`] writes each window of the aggregate from those participants'
/// values of that window.
pub trait CoordinateRule: Send {
    /// Whether [`CoordinateRule::select`] reads the pairwise squared distances.
    fn needs_distances(&self) -> bool;

    /// The participants (indices in node order) whose values [`CoordinateRule::apply`]
    /// reads, in the order it reads them. `distances` is the `n * n` matrix of squared
    /// distances between whole models (row-major, f64) when the rule needs it, else empty.
    fn select(&mut self, distances: &[f64]) -> Vec<usize>;

    /// Writes `out[j]` (f32) from `inputs[k][j]`, one input per selected participant in the
    /// order [`CoordinateRule::select`] gave. Each input is at least as long as `out`.
    fn apply(&self, out: &mut [f32], inputs: &[&[f32]]);
}

/// A [per-coordinate](Strategy::per_coordinate) strategy's `aggregate_fit` (its rule over
/// the results held whole) and `per_coordinate`.
macro_rules! by_rule_methods {
    () => {
        fn aggregate_fit(
            &mut self,
            round: u32,
            current: &Tensors,
            results: &[FitResult],
            failures: &[FitFailure],
        ) -> Result<Tensors, StrategyError> {
            self.common.aggregate_by_rule(self, round, current, results, failures)
        }

        fn per_coordinate(&self) -> bool {
            true
        }
    };
}

impl Common {
    /// [`Strategy::aggregate_fit`] of a [per-coordinate](Strategy::per_coordinate)
    /// strategy: the common checks, then its rule over the results held whole.
    fn aggregate_by_rule(
        &self,
        strategy: &dyn Strategy,
        round: u32,
        current: &Tensors,
        results: &[FitResult],
        failures: &[FitFailure],
    ) -> Result<Tensors, StrategyError> {
        let sorted = self.check(round, current, results, failures)?;
        let examples: Vec<u64> = sorted.iter().map(|r| r.num_examples).collect();
        let rule = strategy.coordinate_rule(round, &examples, failures)?;
        held_aggregate(round, strategy.name(), rule, &sorted, self.threads)
    }
}

/// Runs `rule` over results held whole (checked, in node order), tensor by tensor.
fn held_aggregate(
    round: u32,
    strategy: &str,
    mut rule: Box<dyn CoordinateRule>,
    sorted: &[&FitResult],
    threads: usize,
) -> Result<Tensors, StrategyError> {
    let distances = if rule.needs_distances() { model_distances(sorted, threads) } else { Vec::new() };
    let chosen = rule.select(&distances);
    if chosen.is_empty() || chosen.iter().any(|&i| i >= sorted.len()) {
        return Err(StrategyError::Aggregation {
            round,
            strategy: strategy.into(),
            message: format!("the rule chose {chosen:?} of {} results", sorted.len()),
        });
    }
    let picked: Vec<&FitResult> = chosen.into_iter().map(|i| sorted[i]).collect();
    let first = &picked[0].update;
    let mut out = Tensors::default();
    for (name, t) in &first.0 {
        let inputs: Vec<&[f32]> = picked.iter().map(|r| r.update.0[name].data.as_slice()).collect();
        let mut data = vec![0.0f32; t.data.len()];
        rule.apply(&mut data, &inputs);
        out.0.insert(name.clone(), Tensor { shape: t.shape.clone(), data });
    }
    check_output(round, strategy, &out)?;
    Ok(out)
}

/// The `n * n` squared distances between the (checked) results' whole models.
fn model_distances(results: &[&FitResult], threads: usize) -> Vec<f64> {
    let n = results.len();
    let mut d = vec![0.0f64; n * n];
    for name in results[0].update.0.keys() {
        let inputs: Vec<&[f32]> = results.iter().map(|r| r.update.0[name].data.as_slice()).collect();
        add_pairwise_sq_distances(&mut d, &inputs, threads);
    }
    d
}

/// Every participant, in node order.
fn everyone(n: usize) -> Vec<usize> {
    (0..n).collect()
}

/// The coordinate-wise median of every participant's values.
struct MedianRule {
    n: usize,
    threads: usize,
}

impl CoordinateRule for MedianRule {
    fn needs_distances(&self) -> bool {
        false
    }
    fn select(&mut self, _: &[f64]) -> Vec<usize> {
        everyone(self.n)
    }
    fn apply(&self, out: &mut [f32], inputs: &[&[f32]]) {
        median_into(out, inputs, self.threads);
    }
}

/// The coordinate-wise trimmed mean of every participant's values.
struct TrimmedMeanRule {
    n: usize,
    beta: f64,
    threads: usize,
}

impl CoordinateRule for TrimmedMeanRule {
    fn needs_distances(&self) -> bool {
        false
    }
    fn select(&mut self, _: &[f64]) -> Vec<usize> {
        everyone(self.n)
    }
    fn apply(&self, out: &mut [f32], inputs: &[&[f32]]) {
        trimmed_mean_into(out, inputs, self.beta, self.threads);
    }
}

/// Krum's single model (`keep == 0`), or Multi-Krum's example-weighted mean of the `keep`
/// best, summed in node order as FedAvg sums ([`super::FitSum`]).
struct KrumRule {
    examples: Vec<u64>,
    malicious: usize,
    keep: usize,
    /// The example counts of the selected participants, in the order `apply` reads them.
    weights: Vec<u64>,
    threads: usize,
}

impl CoordinateRule for KrumRule {
    fn needs_distances(&self) -> bool {
        true
    }
    fn select(&mut self, distances: &[f64]) -> Vec<usize> {
        let n = self.examples.len();
        let picked = if self.keep == 0 {
            vec![krum_select(distances, n, self.malicious)]
        } else {
            let mut best = multi_krum_select(distances, n, self.malicious, self.keep);
            best.sort_unstable();
            best
        };
        self.weights = picked.iter().map(|&i| self.examples[i]).collect();
        picked
    }
    fn apply(&self, out: &mut [f32], inputs: &[&[f32]]) {
        if self.keep == 0 {
            out.copy_from_slice(&inputs[0][..out.len()]);
            return;
        }
        out.fill(0.0);
        for (x, &w) in inputs.iter().zip(&self.weights) {
            scaled_add_into(out, x, w as f32, self.threads);
        }
        divide_into(out, self.weights.iter().sum::<u64>() as f32, self.threads);
    }
}

/// Bulyan: repeated Krum picks `n - 2f` models, then per coordinate the mean of the
/// `beta = theta - 2f` values closest to their median.
struct BulyanRule {
    n: usize,
    malicious: usize,
    beta: usize,
    threads: usize,
}

impl CoordinateRule for BulyanRule {
    fn needs_distances(&self) -> bool {
        true
    }
    fn select(&mut self, distances: &[f64]) -> Vec<usize> {
        let picked = bulyan_select(distances, self.n, self.malicious);
        self.beta = picked.len() - 2 * self.malicious;
        picked
    }
    fn apply(&self, out: &mut [f32], inputs: &[&[f32]]) {
        closest_to_median_mean_into(out, inputs, self.beta, self.threads);
    }
}

/// FedMedian (Yin et al., 2018): the coordinate-wise median of the participants' models,
/// unweighted (Flower's `FedMedian` with `aggregate_median`).
#[derive(Clone, Debug)]
pub struct FedMedian {
    common: Common,
}

impl FedMedian {
    /// FedMedian with these participation settings.
    pub fn new(participation: Participation) -> Self {
        FedMedian { common: Common::new(participation) }
    }
}

impl Strategy for FedMedian {
    fn name(&self) -> &str {
        "fedmedian"
    }

    common_strategy_methods!();

    by_rule_methods!();

    fn coordinate_rule(
        &self,
        round: u32,
        examples: &[u64],
        failures: &[FitFailure],
    ) -> Result<Box<dyn CoordinateRule>, StrategyError> {
        self.common.check_counts(round, examples, failures)?;
        Ok(Box::new(MedianRule { n: examples.len(), threads: self.common.threads }))
    }

    fn state(&self) -> Vec<u8> {
        encode_state(self.name(), serde_json::json!({}), None, &Tensors::default())
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), StrategyError> {
        stateless_restore(self.name(), serde_json::json!({}), state)
    }
}

/// FedTrimmedAvg's hyper-parameters, with Flower's defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FedTrimmedAvgParams {
    /// Fraction cut from each end of every coordinate's sorted values, in `[0, 0.5)` (default
    /// 0.2).
    pub beta: f64,
}

impl Default for FedTrimmedAvgParams {
    fn default() -> Self {
        FedTrimmedAvgParams { beta: 0.2 }
    }
}

/// FedTrimmedAvg (Yin et al., 2018): per coordinate, cut `floor(beta * n)` values from each
/// end and average the rest, unweighted (Flower's `FedTrimmedAvg` with `aggregate_trimmed_avg`).
#[derive(Clone, Debug)]
pub struct FedTrimmedAvg {
    params: FedTrimmedAvgParams,
    common: Common,
}

impl FedTrimmedAvg {
    /// FedTrimmedAvg with these parameters; refuses `beta` outside `[0, 0.5)`.
    pub fn new(params: FedTrimmedAvgParams, participation: Participation) -> Result<Self, StrategyError> {
        let b = params.beta;
        check_param("fedtrimmedavg", "beta", b, (0.0..0.5).contains(&b), "in [0, 0.5)")?;
        Ok(FedTrimmedAvg { params, common: Common::new(participation) })
    }

    /// The parameters.
    pub fn params(&self) -> &FedTrimmedAvgParams {
        &self.params
    }
}

impl Strategy for FedTrimmedAvg {
    fn name(&self) -> &str {
        "fedtrimmedavg"
    }

    common_strategy_methods!();

    by_rule_methods!();

    fn coordinate_rule(
        &self,
        round: u32,
        examples: &[u64],
        failures: &[FitFailure],
    ) -> Result<Box<dyn CoordinateRule>, StrategyError> {
        self.common.check_counts(round, examples, failures)?;
        let (n, beta, threads) = (examples.len(), self.params.beta, self.common.threads);
        Ok(Box::new(TrimmedMeanRule { n, beta, threads }))
    }

    fn state(&self) -> Vec<u8> {
        encode_state(self.name(), params_json(&self.params), None, &Tensors::default())
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), StrategyError> {
        stateless_restore(self.name(), params_json(&self.params), state)
    }
}

/// Krum's hyper-parameters, with Flower's defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KrumParams {
    /// Assumed number of malicious participants `f` (default 0): each score sums the squared
    /// distances to the `n - f - 2` nearest others.
    pub num_malicious_clients: usize,
    /// 0 (default): Krum, the single best model. Above 0: Multi-Krum, the example-weighted
    /// FedAvg of that many best models.
    pub num_clients_to_keep: usize,
}

/// Krum and Multi-Krum (Blanchard et al., 2017), as Flower's `Krum` with `aggregate_krum`.
#[derive(Clone, Debug)]
pub struct Krum {
    params: KrumParams,
    common: Common,
}

impl Krum {
    /// Krum with these parameters.
    pub fn new(params: KrumParams, participation: Participation) -> Self {
        Krum { params, common: Common::new(participation) }
    }

    /// The parameters.
    pub fn params(&self) -> &KrumParams {
        &self.params
    }
}

impl Strategy for Krum {
    fn name(&self) -> &str {
        "krum"
    }

    common_strategy_methods!();

    by_rule_methods!();

    fn coordinate_rule(
        &self,
        round: u32,
        examples: &[u64],
        failures: &[FitFailure],
    ) -> Result<Box<dyn CoordinateRule>, StrategyError> {
        self.common.check_counts(round, examples, failures)?;
        let n = examples.len();
        let (f, keep) = (self.params.num_malicious_clients, self.params.num_clients_to_keep);
        if keep > n {
            return Err(StrategyError::Aggregation {
                round,
                strategy: self.name().into(),
                message: format!("num_clients_to_keep = {keep}, but only {n} result(s) arrived"),
            });
        }
        Ok(Box::new(KrumRule {
            examples: examples.to_vec(),
            malicious: f,
            keep,
            weights: Vec::new(),
            threads: self.common.threads,
        }))
    }

    fn state(&self) -> Vec<u8> {
        encode_state(self.name(), params_json(&self.params), None, &Tensors::default())
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), StrategyError> {
        stateless_restore(self.name(), params_json(&self.params), state)
    }
}

/// Bulyan's hyper-parameters, with Flower's defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BulyanParams {
    /// Assumed number of malicious participants `f` (default 0); Bulyan needs `n >= 4f + 3`
    /// results.
    pub num_malicious_clients: usize,
    /// Passed by Flower to its inner `aggregate_krum`; only 0 (Krum picking one model) works
    /// there, so only 0 is accepted.
    pub to_keep: usize,
}

/// Bulyan (El Mhamdi et al., 2018), as Flower's `Bulyan` with Krum as the first rule: pick
/// `theta = n - 2f` models by repeated Krum, then per coordinate average the
/// `beta = theta - 2f` values closest to their median. Unweighted.
#[derive(Clone, Debug)]
pub struct Bulyan {
    params: BulyanParams,
    common: Common,
}

impl Bulyan {
    /// Bulyan with these parameters; refuses `to_keep` other than 0.
    pub fn new(params: BulyanParams, participation: Participation) -> Result<Self, StrategyError> {
        if params.to_keep != 0 {
            return Err(StrategyError::Params {
                strategy: "bulyan".into(),
                message: format!(
                    "to_keep = {}: Bulyan's inner Krum must return one of the models, so only 0 works",
                    params.to_keep
                ),
            });
        }
        Ok(Bulyan { params, common: Common::new(participation) })
    }

    /// The parameters.
    pub fn params(&self) -> &BulyanParams {
        &self.params
    }
}

impl Strategy for Bulyan {
    fn name(&self) -> &str {
        "bulyan"
    }

    common_strategy_methods!();

    by_rule_methods!();

    fn coordinate_rule(
        &self,
        round: u32,
        examples: &[u64],
        failures: &[FitFailure],
    ) -> Result<Box<dyn CoordinateRule>, StrategyError> {
        self.common.check_counts(round, examples, failures)?;
        let (n, f) = (examples.len(), self.params.num_malicious_clients);
        if n < 4 * f + 3 {
            return Err(StrategyError::Aggregation {
                round,
                strategy: self.name().into(),
                message: format!(
                    "{n} result(s), but Bulyan with num_malicious_clients = {f} needs at least 4f + 3 = {}",
                    4 * f + 3
                ),
            });
        }
        Ok(Box::new(BulyanRule { n, malicious: f, beta: 0, threads: self.common.threads }))
    }

    fn state(&self) -> Vec<u8> {
        encode_state(self.name(), params_json(&self.params), None, &Tensors::default())
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), StrategyError> {
        stateless_restore(self.name(), params_json(&self.params), state)
    }
}
