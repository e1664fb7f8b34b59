//! Byzantine-robust strategies: FedMedian, FedTrimmedAvg, Krum / Multi-Krum and Bulyan.

use serde::{Deserialize, Serialize};

use super::avg::{common_strategy_methods, params_json, stateless_restore};
use super::math::{
    add_pairwise_sq_distances, bulyan_select, closest_to_median_mean_into, krum_select, median_into, multi_krum_select,
    trimmed_mean_into,
};
use super::{
    Common, FitFailure, FitPlan, FitResult, Participation, Strategy, StrategyError, check_param, encode_state,
    fedavg_of,
};
use crate::tensor::{Tensor, Tensors};

/// Applies a per-coordinate rule to every tensor of the (checked) results.
fn per_tensor(results: &[&FitResult], mut f: impl FnMut(&mut [f32], &[&[f32]])) -> Tensors {
    let first = &results[0].update;
    let mut out = Tensors::default();
    for (name, t) in &first.0 {
        let inputs: Vec<&[f32]> = results.iter().map(|r| r.update.0[name].data.as_slice()).collect();
        let mut data = vec![0.0f32; t.data.len()];
        f(&mut data, &inputs);
        out.0.insert(name.clone(), Tensor { shape: t.shape.clone(), data });
    }
    out
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

    fn aggregate_fit(
        &mut self,
        round: u32,
        current: &Tensors,
        results: &[FitResult],
        failures: &[FitFailure],
    ) -> Result<Tensors, StrategyError> {
        let sorted = self.common.check(round, current, results, failures)?;
        let threads = self.common.threads;
        Ok(per_tensor(&sorted, |out, inputs| median_into(out, inputs, threads)))
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

    fn aggregate_fit(
        &mut self,
        round: u32,
        current: &Tensors,
        results: &[FitResult],
        failures: &[FitFailure],
    ) -> Result<Tensors, StrategyError> {
        let sorted = self.common.check(round, current, results, failures)?;
        let (threads, beta) = (self.common.threads, self.params.beta);
        Ok(per_tensor(&sorted, |out, inputs| trimmed_mean_into(out, inputs, beta, threads)))
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

    fn aggregate_fit(
        &mut self,
        round: u32,
        current: &Tensors,
        results: &[FitResult],
        failures: &[FitFailure],
    ) -> Result<Tensors, StrategyError> {
        let sorted = self.common.check(round, current, results, failures)?;
        let n = sorted.len();
        let (f, keep) = (self.params.num_malicious_clients, self.params.num_clients_to_keep);
        if keep > n {
            return Err(StrategyError::Aggregation {
                round,
                strategy: self.name().into(),
                message: format!("num_clients_to_keep = {keep}, but only {n} result(s) arrived"),
            });
        }
        let d = model_distances(&sorted, self.common.threads);
        if keep == 0 {
            return Ok(sorted[krum_select(&d, n, f)].update.clone());
        }
        let best: Vec<&FitResult> = multi_krum_select(&d, n, f, keep).into_iter().map(|i| sorted[i]).collect();
        fedavg_of(round, &best, self.common.threads)
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

    fn aggregate_fit(
        &mut self,
        round: u32,
        current: &Tensors,
        results: &[FitResult],
        failures: &[FitFailure],
    ) -> Result<Tensors, StrategyError> {
        let sorted = self.common.check(round, current, results, failures)?;
        let (n, f) = (sorted.len(), self.params.num_malicious_clients);
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
        let threads = self.common.threads;
        let d = model_distances(&sorted, threads);
        let picked: Vec<&FitResult> = bulyan_select(&d, n, f).into_iter().map(|i| sorted[i]).collect();
        let beta = picked.len() - 2 * f;
        Ok(per_tensor(&picked, |out, inputs| closest_to_median_mean_into(out, inputs, beta, threads)))
    }

    fn state(&self) -> Vec<u8> {
        encode_state(self.name(), params_json(&self.params), None, &Tensors::default())
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), StrategyError> {
        stateless_restore(self.name(), params_json(&self.params), state)
    }
}
