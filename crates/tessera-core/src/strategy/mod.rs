//! Aggregation strategies in the spirit of Flower 1.x (`flwr.server.strategy`): who takes part
//! in a round, what they are told, and how their models become the next global model.
//!
//! A [`Strategy`] is pure: participants are drawn from a seed passed in, results are passed in,
//! and the server-side state (momentum, moments, round counter) can be taken out as bytes with
//! [`Strategy::state`] and put back with [`Strategy::restore`], so a session resumes after a
//! crash with bit-identical models.
//!
//! The formulas follow Flower's `aggregate.py` and its strategy classes; the arithmetic lives in
//! [`math`] as free functions over slices. Unlike Flower, a strategy refuses bad rounds with an
//! error rather than returning nothing: too many failures, too few results, updates whose layout
//! differs from the model, non-finite values, no examples at all.
//!
//! ```
//! use tessera_core::strategy::{from_config, Participation};
//!
//! let s = from_config("fedprox", &serde_json::json!({"proximal_mu": 0.1}), Participation::default()).unwrap();
//! let nodes: Vec<String> = (0..4).map(|i| format!("node-{i}")).collect();
//! let plan = s.configure_fit(1, &nodes, 7).unwrap();
//! assert_eq!(plan.participants.len(), 4);
//! assert_eq!(plan.config["proximal_mu"], 0.1);
//! ```

mod avg;
mod buffer;
pub mod math;
mod opt;
mod robust;
mod step;
mod sum;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::select::select_participants;
use crate::tensor::{TensorError, TensorLimits, Tensors};

pub use avg::{FedAvg, FedAvgM, FedAvgMParams, FedProx, FedProxParams};
pub use buffer::{FedBuffBuffer, staleness_weight};
pub use math::{
    DISTANCE_BLOCK, OptRule, adagrad_step, adam_eta_norm, adam_step, add_pairwise_sq_distances, bulyan_select,
    closest_to_median_mean_into, krum_scores, krum_select, median_into, momentum_step, multi_krum_select, opt_step,
    pairwise_sq_distances, trimmed_mean_into, yogi_step,
};
pub use opt::{FedAdagradParams, FedAdamParams, FedOpt, FedOptParams, FedYogiParams};
pub use robust::{
    Bulyan, BulyanParams, CoordinateRule, FedMedian, FedTrimmedAvg, FedTrimmedAvgParams, Krum, KrumParams,
};
pub use sum::FitSum;

/// The strategies [`from_config`] knows, by name.
pub const STRATEGIES: &[&str] = &[
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedadagrad",
    "fedadam",
    "fedyogi",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "bulyan",
];

/// Why a strategy refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StrategyError {
    /// No strategy has this name.
    #[error("unknown strategy {name:?}; known strategies: {}", STRATEGIES.join(", "))]
    UnknownStrategy {
        /// The name asked for.
        name: String,
    },
    /// The hyper-parameters are unknown, missing or out of range.
    #[error("invalid parameters for strategy {strategy:?}: {message}")]
    Params {
        /// The strategy.
        strategy: String,
        /// What is wrong (for unknown fields, serde lists the known ones).
        message: String,
    },
    /// The participation settings are out of range.
    #[error("invalid participation settings: {0}")]
    Participation(String),
    /// Fewer nodes are available than the round needs.
    #[error("{available} node(s) available, but {what} needs at least {min}")]
    TooFewAvailable {
        /// Distinct nodes available.
        available: usize,
        /// The number needed.
        min: usize,
        /// What needs them ("the session", "the sample").
        what: &'static str,
    },
    /// More participants failed than the policy accepts.
    #[error("round {round}: {failures} failure(s) against {results} result(s): {policy}")]
    TooManyFailures {
        /// The round.
        round: u32,
        /// Failures reported.
        failures: usize,
        /// Results received.
        results: usize,
        /// The policy broken.
        policy: String,
    },
    /// Fewer results than the minimum.
    #[error("round {round}: {results} result(s), but the strategy needs at least {min}")]
    TooFewResults {
        /// The round.
        round: u32,
        /// Results received.
        results: usize,
        /// The minimum.
        min: usize,
    },
    /// The same node sent two results.
    #[error("round {round}: node {node:?} sent more than one result")]
    DuplicateNode {
        /// The round.
        round: u32,
        /// The node.
        node: String,
    },
    /// An update's tensors do not line up with the model's.
    #[error("round {round}: the update from node {node:?} does not match the model: {error}")]
    Layout {
        /// The round.
        round: u32,
        /// The node.
        node: String,
        /// The mismatch.
        error: TensorError,
    },
    /// An update holds NaN or an infinity.
    #[error(
        "round {round}: the update from node {node:?} holds a non-finite value ({value}) in tensor {tensor:?} at index {index}"
    )]
    NonFinite {
        /// The round.
        round: u32,
        /// The node.
        node: String,
        /// The tensor.
        tensor: String,
        /// Position in the tensor's data.
        index: usize,
        /// The value, as text.
        value: String,
    },
    /// The results hold no examples at all, or more than fit in a `u64`.
    #[error("round {round}: {message}")]
    Examples {
        /// The round.
        round: u32,
        /// What is wrong.
        message: String,
    },
    /// The strategy cannot aggregate this round for a reason of its own (a Byzantine rule's
    /// assumption, a missing model, a non-finite result).
    #[error("round {round}: {strategy}: {message}")]
    Aggregation {
        /// The round.
        round: u32,
        /// The strategy.
        strategy: String,
        /// What is wrong.
        message: String,
    },
    /// A stateful strategy was asked to aggregate a round it has already passed.
    #[error("round {round}: {strategy} has already aggregated round {last}; rounds must increase")]
    RoundOrder {
        /// The round asked for.
        round: u32,
        /// The last round aggregated.
        last: u32,
        /// The strategy.
        strategy: String,
    },
    /// Saved state that cannot be restored into this strategy.
    #[error("cannot restore {strategy} state: {message}")]
    State {
        /// The strategy.
        strategy: String,
        /// What is wrong.
        message: String,
    },
}

/// Who takes part in rounds and how many failures a round survives: Flower's `fraction_fit`,
/// `min_fit_clients`, ... with Flower's defaults, plus a failure ratio.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Participation {
    /// Fraction of the available nodes asked to train (Flower: `fraction_fit`, default 1.0).
    pub fraction_fit: f64,
    /// Fewest nodes asked to train, and fewest results aggregated (Flower: `min_fit_clients`,
    /// default 2).
    pub min_fit: usize,
    /// Fewest nodes that must be available before a round starts (Flower:
    /// `min_available_clients`, default 2).
    pub min_available: usize,
    /// Fraction of the available nodes asked to evaluate; 0 turns federated evaluation off
    /// (Flower: `fraction_evaluate`, default 1.0).
    pub fraction_evaluate: f64,
    /// Fewest nodes asked to evaluate (Flower: `min_evaluate_clients`, default 2).
    pub min_evaluate: usize,
    /// Whether a round with failures is aggregated at all (Flower: `accept_failures`, default
    /// true).
    pub accept_failures: bool,
    /// Largest share of failures, `failures / (results + failures)`, a round may have (default
    /// 1.0: any).
    pub max_failure_ratio: f64,
}

impl Default for Participation {
    fn default() -> Self {
        Participation {
            fraction_fit: 1.0,
            min_fit: 2,
            min_available: 2,
            fraction_evaluate: 1.0,
            min_evaluate: 2,
            accept_failures: true,
            max_failure_ratio: 1.0,
        }
    }
}

impl Participation {
    /// Checks the ranges: fractions and the failure ratio in `[0, 1]`.
    pub fn validate(&self) -> Result<(), StrategyError> {
        for (name, v) in [
            ("fraction_fit", self.fraction_fit),
            ("fraction_evaluate", self.fraction_evaluate),
            ("max_failure_ratio", self.max_failure_ratio),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(StrategyError::Participation(format!("{name} = {v} must be in [0, 1]")));
            }
        }
        Ok(())
    }

    /// How many of `available` nodes a round samples, as Flower: `max(floor(available *
    /// fraction), min)`.
    fn sample_size(available: usize, fraction: f64, min: usize) -> usize {
        ((available as f64 * fraction) as usize).max(min)
    }

    /// Draws `fraction` of the available nodes (at least `min`), refusing when fewer than
    /// `min_available` are there or the sample would not fit.
    fn sample(&self, available: &[String], fraction: f64, min: usize, seed: u64) -> Result<Vec<String>, StrategyError> {
        self.validate()?;
        let mut pool = available.to_vec();
        pool.sort();
        pool.dedup();
        if pool.len() < self.min_available {
            return Err(StrategyError::TooFewAvailable {
                available: pool.len(),
                min: self.min_available,
                what: "the session (min_available)",
            });
        }
        let k = Self::sample_size(pool.len(), fraction, min);
        if k > pool.len() || k == 0 {
            return Err(StrategyError::TooFewAvailable { available: pool.len(), min: k.max(1), what: "the sample" });
        }
        // `select_participants` takes max(ceil(ratio * n), min): with the smallest positive
        // ratio and `min = k` it draws exactly `k`, by the project's one seeded shuffle.
        select_participants(&pool, f64::MIN_POSITIVE, k, seed).map_err(|e| StrategyError::Participation(e.to_string()))
    }
}

/// What a round's training looks like: who trains and the configuration merged into each
/// worker's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FitPlan {
    /// The nodes asked to train, sorted.
    pub participants: Vec<String>,
    /// Merged into the worker configuration: `{}` for most strategies, `{"proximal_mu": mu}`
    /// for FedProx.
    pub config: serde_json::Value,
}

/// One participant's answer to a round: its new model (Flower's `FitRes.parameters`) and the
/// number of examples it trained on.
#[derive(Clone, Debug, PartialEq)]
pub struct FitResult {
    /// The node.
    pub node: String,
    /// The participant's new model (not a difference).
    pub update: Tensors,
    /// Examples it trained on; the weight in FedAvg and Multi-Krum.
    pub num_examples: u64,
}

/// A participant that did not answer a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FitFailure {
    /// The node.
    pub node: String,
    /// What went wrong.
    pub error: String,
}

/// An aggregation strategy: participant selection, worker configuration, aggregation of models
/// and of evaluation results, and its server-side state. Pure: no I/O, no clock, no randomness
/// beyond the seeds passed in.
pub trait Strategy: Send + Sync {
    /// The strategy's name, as [`from_config`] knows it.
    fn name(&self) -> &str;

    /// The participation settings.
    fn participation(&self) -> &Participation;

    /// Sets how many threads aggregation may use (default 1).
    fn set_threads(&mut self, threads: usize);

    /// Picks the round's trainers from `available` (deduplicated), reproducibly from `seed`, and
    /// says what to add to their configuration. Refuses when fewer than `min_available` nodes
    /// are available.
    fn configure_fit(&self, round: u32, available: &[String], seed: u64) -> Result<FitPlan, StrategyError>;

    /// Picks the round's evaluators; empty when `fraction_evaluate` is 0.
    fn configure_evaluate(&self, round: u32, available: &[String], seed: u64) -> Result<Vec<String>, StrategyError>;

    /// The next global model from the participants' models. `current` is the model the round
    /// started from (Flower's current or initial parameters). Refuses when failures break the
    /// policy, results are fewer than `min_fit`, a node answered twice, layouts differ, a value
    /// is not finite or there are no examples. Results are taken in node order, so the outcome
    /// does not depend on the order they arrived in. On error the state is unchanged.
    fn aggregate_fit(
        &mut self,
        round: u32,
        current: &Tensors,
        results: &[FitResult],
        failures: &[FitFailure],
    ) -> Result<Tensors, StrategyError>;

    /// Whether the aggregate depends on a round's results only through their example-weighted
    /// sum ([`FitSum`]): then a caller may fold each update in as it arrives and call
    /// [`Strategy::aggregate_sum`], holding no update longer than it takes to add it. True
    /// for FedAvg, FedProx, FedAvgM and FedOpt; the order statistics (median, trimmed mean,
    /// Krum, Bulyan) need every update at once.
    fn takes_sum(&self) -> bool {
        false
    }

    /// Whether [`Strategy::aggregate_sum`] reads the values of the model the round started
    /// from (`current`): FedAvgM's and FedOpt's server step do; FedAvg's and FedProx's mean
    /// does not, so a caller summing a model too large to hold twice may pass an empty
    /// `current` to those.
    fn reads_current(&self) -> bool {
        true
    }

    /// The next global model from a round's results folded into `sum` (in node order). The
    /// same refusals as [`Strategy::aggregate_fit`], the failure policy and `min_fit`
    /// counted on the sum's results; a strategy that needs every update refuses
    /// ([`StrategyError::Aggregation`]). On error the state is unchanged.
    fn aggregate_sum(
        &mut self,
        round: u32,
        current: &Tensors,
        sum: FitSum,
        failures: &[FitFailure],
    ) -> Result<Tensors, StrategyError> {
        let _ = (current, sum, failures);
        Err(StrategyError::Aggregation {
            round,
            strategy: self.name().into(),
            message: "this strategy needs every update, not their sum".into(),
        })
    }

    /// Whether the aggregate is computed coordinate by coordinate
    /// ([`Strategy::coordinate_rule`]): the order statistics FedMedian, FedTrimmedAvg,
    /// Krum and Bulyan.
    fn per_coordinate(&self) -> bool {
        false
    }

    /// The round's [`CoordinateRule`] for results with these example counts (in node order)
    /// and these failures, for a caller that reads updates a window of coordinates at a time
    /// rather than holding them ([`Strategy::aggregate_fit`] runs the same rule over updates
    /// held whole). Refuses what [`Strategy::aggregate_fit`] refuses on counts alone: the
    /// failure policy, `min_fit`, zero examples, and the strategy's own needs (Krum's
    /// `num_clients_to_keep` at most `n`, Bulyan's `n >= 4f + 3`); a strategy that is not
    /// [per coordinate](Strategy::per_coordinate) refuses ([`StrategyError::Aggregation`]).
    fn coordinate_rule(
        &self,
        round: u32,
        examples: &[u64],
        failures: &[FitFailure],
    ) -> Result<Box<dyn CoordinateRule>, StrategyError> {
        let _ = (examples, failures);
        Err(StrategyError::Aggregation {
            round,
            strategy: self.name().into(),
            message: "this strategy's aggregate is not computed coordinate by coordinate".into(),
        })
    }

    /// Example-weighted average loss and accuracy of `(num_examples, loss, accuracy)` results;
    /// the accuracy averages the results that report one. `None` without results or examples.
    fn aggregate_evaluate(&self, results: &[(u64, f64, Option<f64>)]) -> Option<(f64, Option<f64>)> {
        weighted_evaluate(results)
    }

    /// The server-side state as bytes (see [`Strategy::restore`]).
    fn state(&self) -> Vec<u8>;

    /// Puts back state taken by [`Strategy::state`] from a strategy of the same name and
    /// parameters. On error the strategy is unchanged.
    fn restore(&mut self, state: &[u8]) -> Result<(), StrategyError>;
}

/// Builds a strategy by name from its hyper-parameters (a JSON object, or null for the
/// defaults). Unknown names and unknown or invalid parameters are refused with the list of
/// what exists.
pub fn from_config(
    name: &str,
    params: &serde_json::Value,
    participation: Participation,
) -> Result<Box<dyn Strategy>, StrategyError> {
    participation.validate()?;
    Ok(match name {
        "fedavg" => {
            parse_params::<NoParams>(name, params)?;
            Box::new(FedAvg::new(participation))
        }
        "fedavgm" => Box::new(FedAvgM::new(parse_params(name, params)?, participation)?),
        "fedprox" => Box::new(FedProx::new(parse_params(name, params)?, participation)?),
        "fedadagrad" => Box::new(FedOpt::new(FedOptParams::Adagrad(parse_params(name, params)?), participation)?),
        "fedadam" => Box::new(FedOpt::new(FedOptParams::Adam(parse_params(name, params)?), participation)?),
        "fedyogi" => Box::new(FedOpt::new(FedOptParams::Yogi(parse_params(name, params)?), participation)?),
        "fedmedian" => {
            parse_params::<NoParams>(name, params)?;
            Box::new(FedMedian::new(participation))
        }
        "fedtrimmedavg" => Box::new(FedTrimmedAvg::new(parse_params(name, params)?, participation)?),
        "krum" => Box::new(Krum::new(parse_params(name, params)?, participation)),
        "bulyan" => Box::new(Bulyan::new(parse_params(name, params)?, participation)?),
        _ => return Err(StrategyError::UnknownStrategy { name: name.to_string() }),
    })
}

/// The parameters of a strategy that has none.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

fn parse_params<T: DeserializeOwned>(strategy: &str, params: &serde_json::Value) -> Result<T, StrategyError> {
    let value = if params.is_null() { serde_json::Value::Object(Default::default()) } else { params.clone() };
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message =
            if path.is_empty() || path == "." { e.inner().to_string() } else { format!("{path}: {}", e.inner()) };
        StrategyError::Params { strategy: strategy.into(), message }
    })
}

/// Refuses a non-finite value or one outside `ok`.
fn check_param(strategy: &str, name: &str, v: f64, ok: bool, range: &str) -> Result<(), StrategyError> {
    if v.is_finite() && ok {
        Ok(())
    } else {
        Err(StrategyError::Params { strategy: strategy.into(), message: format!("{name} = {v} must be {range}") })
    }
}

fn weighted_evaluate(results: &[(u64, f64, Option<f64>)]) -> Option<(f64, Option<f64>)> {
    let total: f64 = results.iter().map(|r| r.0 as f64).sum();
    if results.is_empty() || total == 0.0 {
        return None;
    }
    let loss = results.iter().map(|&(n, l, _)| n as f64 * l).sum::<f64>() / total;
    let with_acc: Vec<(f64, f64)> = results.iter().filter_map(|&(n, _, a)| a.map(|a| (n as f64, a))).collect();
    let acc_total: f64 = with_acc.iter().map(|r| r.0).sum();
    let acc = (acc_total > 0.0).then(|| with_acc.iter().map(|(n, a)| n * a).sum::<f64>() / acc_total);
    Some((loss, acc))
}

/// What every strategy holds: its participation settings and thread count.
#[derive(Clone, Debug)]
struct Common {
    participation: Participation,
    threads: usize,
}

impl Common {
    fn new(participation: Participation) -> Self {
        Common { participation, threads: 1 }
    }

    fn configure_fit(
        &self,
        available: &[String],
        seed: u64,
        config: serde_json::Value,
    ) -> Result<FitPlan, StrategyError> {
        let p = &self.participation;
        let participants = p.sample(available, p.fraction_fit, p.min_fit, seed)?;
        Ok(FitPlan { participants, config })
    }

    fn configure_evaluate(&self, available: &[String], seed: u64) -> Result<Vec<String>, StrategyError> {
        let p = &self.participation;
        if p.fraction_evaluate == 0.0 {
            return Ok(Vec::new());
        }
        p.sample(available, p.fraction_evaluate, p.min_evaluate, seed)
    }

    /// The failure policy and `min_fit`, for `results` results and these failures.
    fn check_policy(&self, round: u32, results: usize, failures: &[FitFailure]) -> Result<(), StrategyError> {
        let p = &self.participation;
        let (nr, nf) = (results, failures.len());
        let too_many = |policy: String| StrategyError::TooManyFailures { round, failures: nf, results: nr, policy };
        if !p.accept_failures && nf > 0 {
            let who: Vec<&str> = failures.iter().take(5).map(|f| f.node.as_str()).collect();
            return Err(too_many(format!("accept_failures is false (failed: {})", who.join(", "))));
        }
        if nf > 0 && nf as f64 / (nr + nf) as f64 > p.max_failure_ratio {
            return Err(too_many(format!("more than max_failure_ratio = {} of the participants", p.max_failure_ratio)));
        }
        let min = p.min_fit.max(1);
        if nr < min {
            return Err(StrategyError::TooFewResults { round, results: nr, min });
        }
        Ok(())
    }

    /// For a strategy that [takes a sum](Strategy::takes_sum): the policy checks, then the
    /// results folded in node order.
    fn sum_of(
        &self,
        round: u32,
        current: &Tensors,
        results: &[FitResult],
        failures: &[FitFailure],
    ) -> Result<FitSum, StrategyError> {
        self.check_policy(round, results.len(), failures)?;
        FitSum::of(round, current, results, self.threads)
    }

    /// The checks every strategy makes before aggregating; returns the results in node order.
    fn check<'a>(
        &self,
        round: u32,
        current: &Tensors,
        results: &'a [FitResult],
        failures: &[FitFailure],
    ) -> Result<Vec<&'a FitResult>, StrategyError> {
        self.check_policy(round, results.len(), failures)?;
        let mut sorted: Vec<&FitResult> = results.iter().collect();
        sorted.sort_by(|a, b| a.node.cmp(&b.node));
        for w in sorted.windows(2) {
            if w[0].node == w[1].node {
                return Err(StrategyError::DuplicateNode { round, node: w[0].node.clone() });
            }
        }
        let reference = if current.0.is_empty() { &sorted[0].update } else { current };
        for r in &sorted {
            reference.check_same_layout(&r.update).map_err(|error| StrategyError::Layout {
                round,
                node: r.node.clone(),
                error,
            })?;
        }
        for r in &sorted {
            check_finite(round, &r.node, &r.update)?;
        }
        check_examples(round, sorted.iter().map(|r| r.num_examples))?;
        Ok(sorted)
    }

    /// The checks of [`Common::check`] that need only the results' example counts: the
    /// failure policy, `min_fit`, and a total that is above zero and fits in `u64`.
    fn check_counts(&self, round: u32, examples: &[u64], failures: &[FitFailure]) -> Result<(), StrategyError> {
        self.check_policy(round, examples.len(), failures)?;
        check_examples(round, examples.iter().copied())
    }
}

/// Refuses example counts that add up to zero or past `u64` ([`StrategyError::Examples`]).
fn check_examples(round: u32, examples: impl Iterator<Item = u64>) -> Result<(), StrategyError> {
    let mut total = 0u64;
    for n in examples {
        total = total.checked_add(n).ok_or_else(|| StrategyError::Examples {
            round,
            message: "the example counts add up to more than 2^64".into(),
        })?;
    }
    if total == 0 {
        return Err(StrategyError::Examples { round, message: "the results hold zero examples in all".into() });
    }
    Ok(())
}

/// Refuses node `node`'s update when it holds NaN or an infinity
/// ([`StrategyError::NonFinite`], naming the first).
fn check_finite(round: u32, node: &str, update: &Tensors) -> Result<(), StrategyError> {
    for (name, t) in &update.0 {
        if let Some(index) = t.data.iter().position(|x| !x.is_finite()) {
            return Err(StrategyError::NonFinite {
                round,
                node: node.into(),
                tensor: name.clone(),
                index,
                value: t.data[index].to_string(),
            });
        }
    }
    Ok(())
}

/// Refuses a non-finite aggregate (it can only come from values near the f32 range's ends).
fn check_output(round: u32, strategy: &str, out: &Tensors) -> Result<(), StrategyError> {
    for (name, t) in &out.0 {
        if let Some(i) = t.data.iter().position(|x| !x.is_finite()) {
            return Err(StrategyError::Aggregation {
                round,
                strategy: strategy.into(),
                message: format!("the aggregate holds a non-finite value in tensor {name:?} at index {i}"),
            });
        }
    }
    Ok(())
}

/// The JSON header of saved state.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateHeader {
    strategy: String,
    params: serde_json::Value,
    last_round: Option<u32>,
}

const STATE_MAGIC: &[u8; 8] = b"TSTRAT01";

/// State bytes: magic, the JSON header's length (u32 LE), the header, then the tensors as
/// safetensors (names prefixed by their role, e.g. `m/` and `v/`).
fn encode_state(strategy: &str, params: serde_json::Value, last_round: Option<u32>, tensors: &Tensors) -> Vec<u8> {
    let header = StateHeader { strategy: strategy.into(), params, last_round };
    let json = serde_json::to_vec(&header).expect("a JSON value always serialises");
    let mut out = Vec::with_capacity(12 + json.len());
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&tensors.encode());
    out
}

/// Decodes state bytes, checking they belong to `strategy` with `params`.
fn decode_state(
    strategy: &str,
    params: &serde_json::Value,
    bytes: &[u8],
) -> Result<(Option<u32>, Tensors), StrategyError> {
    let err = |message: String| StrategyError::State { strategy: strategy.into(), message };
    let rest =
        bytes.strip_prefix(STATE_MAGIC.as_slice()).ok_or_else(|| err("not strategy state (bad magic)".into()))?;
    if rest.len() < 4 {
        return Err(err("truncated header".into()));
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let rest = &rest[4..];
    if len > rest.len() {
        return Err(err("truncated header".into()));
    }
    let header: StateHeader = serde_json::from_slice(&rest[..len]).map_err(|e| err(format!("bad header: {e}")))?;
    if header.strategy != strategy {
        return Err(err(format!("the state belongs to strategy {:?}", header.strategy)));
    }
    if &header.params != params {
        return Err(err(format!("the state was saved with parameters {}, not {}", header.params, params)));
    }
    let tensors = Tensors::decode(&rest[len..], TensorLimits::default()).map_err(|e| err(e.to_string()))?;
    for (name, t) in &tensors.0 {
        if t.data.iter().any(|x| !x.is_finite()) {
            return Err(err(format!("tensor {name:?} holds a non-finite value")));
        }
    }
    Ok((header.last_round, tensors))
}

/// Splits saved tensors named `role/name` into one set per role, refusing unknown roles.
fn split_roles(strategy: &str, tensors: Tensors, roles: &[&str]) -> Result<Vec<Option<Tensors>>, StrategyError> {
    let mut out: Vec<Option<Tensors>> = vec![None; roles.len()];
    for (name, t) in tensors.0 {
        let (role, inner) = name.split_once('/').ok_or_else(|| StrategyError::State {
            strategy: strategy.into(),
            message: format!("unexpected tensor {name:?}"),
        })?;
        let k = roles.iter().position(|r| *r == role).ok_or_else(|| StrategyError::State {
            strategy: strategy.into(),
            message: format!("unexpected tensor {name:?}"),
        })?;
        out[k].get_or_insert_with(Tensors::default).0.insert(inner.to_string(), t);
    }
    Ok(out)
}

/// Joins tensor sets into one, naming each `role/name`.
fn join_roles(sets: &[(&str, Option<&Tensors>)]) -> Tensors {
    let mut out = Tensors::default();
    for (role, set) in sets {
        if let Some(set) = set {
            for (name, t) in &set.0 {
                out.0.insert(format!("{role}/{name}"), t.clone());
            }
        }
    }
    out
}

/// Refuses a round at or before the last one aggregated.
fn check_round(strategy: &str, round: u32, last: Option<u32>) -> Result<(), StrategyError> {
    match last {
        Some(last) if round <= last => Err(StrategyError::RoundOrder { round, last, strategy: strategy.into() }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn sampling_follows_flower_counts() {
        let p = Participation { fraction_fit: 0.5, min_fit: 2, ..Participation::default() };
        let s = FedAvg::new(p);
        let plan = s.configure_fit(1, &nodes(7), 3).unwrap();
        assert_eq!(plan.participants.len(), 3, "floor(7 * 0.5) = 3");
        assert_eq!(plan, s.configure_fit(1, &nodes(7), 3).unwrap(), "seeded");
        assert_eq!(plan.config, serde_json::json!({}));
        assert_eq!(s.configure_fit(1, &nodes(3), 3).unwrap().participants.len(), 2, "min_fit");
        let err = s.configure_fit(1, &nodes(1), 3).unwrap_err();
        assert!(err.to_string().contains("1 node(s) available"), "{err}");
        let mut dup = nodes(2);
        dup.extend(nodes(2));
        assert_eq!(s.configure_fit(1, &dup, 1).unwrap().participants, nodes(2));
        // min_fit above what is there.
        let s = FedAvg::new(Participation { min_fit: 5, min_available: 2, ..Participation::default() });
        assert!(matches!(s.configure_fit(1, &nodes(3), 1), Err(StrategyError::TooFewAvailable { min: 5, .. })));
    }

    #[test]
    fn evaluation_sampling() {
        let s = FedAvg::new(Participation { fraction_evaluate: 0.0, ..Participation::default() });
        assert!(s.configure_evaluate(1, &nodes(5), 1).unwrap().is_empty());
        let s = FedAvg::new(Participation::default());
        assert_eq!(s.configure_evaluate(1, &nodes(5), 1).unwrap(), nodes(5));
    }

    #[test]
    fn participation_parses_with_defaults() {
        let p: Participation = serde_json::from_value(serde_json::json!({"fraction_fit": 0.3})).unwrap();
        assert_eq!(p, Participation { fraction_fit: 0.3, ..Participation::default() });
        assert!(serde_json::from_value::<Participation>(serde_json::json!({"fraction": 0.3})).is_err());
        let bad = Participation { fraction_fit: 1.5, ..Participation::default() };
        assert!(from_config("fedavg", &serde_json::Value::Null, bad).is_err());
    }

    #[test]
    fn evaluate_is_example_weighted() {
        let s = FedAvg::new(Participation::default());
        let (loss, acc) = s.aggregate_evaluate(&[(1, 1.0, Some(0.5)), (3, 2.0, None)]).unwrap();
        assert_eq!(loss, 1.75);
        assert_eq!(acc, Some(0.5));
        let (_, acc) = s.aggregate_evaluate(&[(1, 1.0, Some(0.5)), (3, 2.0, Some(1.0))]).unwrap();
        assert_eq!(acc, Some(0.875));
        assert_eq!(s.aggregate_evaluate(&[(1, 1.0, None)]).unwrap().1, None);
        assert_eq!(s.aggregate_evaluate(&[]), None);
        assert_eq!(s.aggregate_evaluate(&[(0, 1.0, None)]), None);
    }

    #[test]
    fn unknown_names_and_params_are_listed() {
        let e = from_config("fedsgd", &serde_json::Value::Null, Participation::default()).err().unwrap();
        let msg = e.to_string();
        assert!(msg.contains("fedsgd") && msg.contains("fedadam") && msg.contains("bulyan"), "{msg}");
        let e = from_config("fedadam", &serde_json::json!({"lr": 1}), Participation::default()).err().unwrap();
        let msg = e.to_string();
        assert!(msg.contains("lr") && msg.contains("beta_1") && msg.contains("tau"), "{msg}");
        let e = from_config("fedavg", &serde_json::json!({"x": 1}), Participation::default()).err().unwrap();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = from_config("fedprox", &serde_json::json!({}), Participation::default()).err().unwrap();
        assert!(e.to_string().contains("proximal_mu"), "{e}");
        for name in STRATEGIES {
            let params =
                if *name == "fedprox" { serde_json::json!({"proximal_mu": 0.0}) } else { serde_json::Value::Null };
            let s = from_config(name, &params, Participation::default()).unwrap();
            assert_eq!(s.name(), *name);
        }
    }

    #[test]
    fn state_bytes_are_checked() {
        let mut s = FedAvg::new(Participation::default());
        let bytes = s.state();
        s.restore(&bytes).unwrap();
        assert!(s.restore(&bytes[..bytes.len() - 1]).is_err());
        assert!(s.restore(b"garbage").is_err());
        let mut m = FedMedian::new(Participation::default());
        let e = m.restore(&bytes).unwrap_err();
        assert!(e.to_string().contains("belongs to strategy \"fedavg\""), "{e}");
    }
}
