//! A round's updates taken one at a time, in participant order, as they are fetched:
//! checked against the global model's layout, clipped or checked for clipping under
//! differential privacy, then folded into the strategy's running sum ([`FitSum`]) and
//! dropped, or held for a strategy that needs every update (median, trimmed mean, Krum,
//! Bulyan). A round of FedAvg therefore holds a handful of updates at a time, however many
//! participants it has.
//!
//! Integer and boolean tensors (counters such as BatchNorm's `num_batches_tracked`) are not
//! averaged: the new model takes them whole from the participant with the most examples (on
//! a tie, the first in participant order), a count each participant reports itself. Under
//! differential privacy they are released from no participant: the model keeps its own.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tessera_core::privacy;
use tessera_core::strategy::{FitFailure, FitResult, FitSum, Strategy};
use tessera_core::tensor::{FixedTensor, FloatType, Model};
use tessera_core::wire::{Failure, WorkerMetrics};

use crate::fl::in_round;
use crate::{DpConfig, DpSide, SessionError};

/// Bytes of updates a round fetches and decodes at once (each in flight holds its blob and
/// its decoded values).
const COLLECT_BUDGET: usize = 256 << 20;

/// Most updates of a round fetched at once.
const COLLECT_CONCURRENCY: usize = 32;

/// How many updates of a model of `model_bytes` bytes a round fetches side by side: up to
/// [`COLLECT_CONCURRENCY`], fewer for large models so the window stays near
/// [`COLLECT_BUDGET`], at least one.
pub(crate) fn collect_window(model_bytes: usize) -> usize {
    (COLLECT_BUDGET / model_bytes.saturating_mul(2).max(1)).clamp(1, COLLECT_CONCURRENCY)
}

/// A participant's answer, fetched and decoded.
pub(crate) struct Update {
    pub(crate) node: String,
    pub(crate) model: Model,
    pub(crate) metrics: WorkerMetrics,
    pub(crate) seconds: f64,
}

/// What the round keeps of an update once it is folded in.
#[derive(Debug)]
pub(crate) struct Contribution {
    pub(crate) node: String,
    pub(crate) metrics: WorkerMetrics,
    pub(crate) seconds: f64,
}

/// A round's updates so far.
pub(crate) struct Fold<'a> {
    round: u32,
    base: &'a Model,
    dp: Option<&'a DpConfig>,
    sum: Option<FitSum>,
    held: Vec<FitResult>,
    /// The integer tensors of the participant with the most examples so far.
    fixed: Option<(u64, BTreeMap<String, FixedTensor>)>,
    /// The participants folded in, in order.
    pub(crate) usable: Vec<Contribution>,
    /// The participants that gave nothing usable.
    pub(crate) failures: Vec<Failure>,
    /// Time spent checking and adding updates.
    pub(crate) folding: Duration,
}

impl<'a> Fold<'a> {
    /// An empty fold for `round` of a model starting from `base`; it sums when the strategy
    /// [takes a sum](Strategy::takes_sum).
    pub(crate) fn new(
        round: u32,
        base: &'a Model,
        dp: Option<&'a DpConfig>,
        strategy: &dyn Strategy,
        threads: usize,
    ) -> Fold<'a> {
        Fold {
            round,
            base,
            dp,
            sum: strategy.takes_sum().then(|| FitSum::new(round, &base.floats, threads)),
            held: Vec::new(),
            fixed: None,
            usable: Vec::new(),
            failures: Vec::new(),
            folding: Duration::ZERO,
        }
    }

    /// Takes a participant's outcome, in participant order. An update that does not match
    /// the model, or is not clipped under client-side differential privacy, is a failure
    /// of its participant; a non-finite value or a participant out of order fails the round
    /// ([`SessionError::Aggregate`]), as the strategy would.
    pub(crate) fn take(&mut self, outcome: Result<Update, Failure>) -> Result<(), SessionError> {
        let started = Instant::now();
        let result = match outcome {
            Err(f) => {
                self.failures.push(f);
                Ok(())
            }
            Ok(u) => self.add(u),
        };
        self.folding += started.elapsed();
        result
    }

    fn add(&mut self, mut u: Update) -> Result<(), SessionError> {
        let refuse =
            |u: &Update, why: String| Failure { node: u.node.clone(), error: format!("update refused: {why}") };
        if let Err(e) = self.base.check_same_layout(&u.model) {
            self.failures.push(refuse(&u, e.to_string()));
            return Ok(());
        }
        if let Some(dp) = self.dp {
            let bound = dp.clipping_norm;
            let clipped = match dp.side {
                // DP-FedAvg with fixed clipping at the server (Andrew et al., 2021; Flower's
                // `DifferentialPrivacyServerSideFixedClipping`).
                DpSide::Server => privacy::clip_model_update(&self.base.floats, &mut u.model.floats, bound as f32)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                // The node clipped (tessera-node); a norm past the bound, beyond what
                // rounding to the model's types explains, is an update that was not. What
                // rounding added is clipped away here, so the bound holds exactly.
                DpSide::Client => match privacy::model_update_norm(&self.base.floats, &u.model.floats) {
                    Ok(norm) if norm <= bound * (1.0 + 1e-3) + rounding(&u.model) => {
                        privacy::clip_model_update(&self.base.floats, &mut u.model.floats, bound as f32)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    }
                    Ok(norm) => Err(format!("its norm {norm:.6} is above the clipping norm {bound}")),
                    Err(e) => Err(e.to_string()),
                },
            };
            if let Err(why) = clipped {
                self.failures.push(refuse(&u, why));
                return Ok(());
            }
        }
        let n = u.metrics.num_examples;
        let Update { node, model, metrics, seconds } = u;
        match &mut self.sum {
            Some(sum) => {
                sum.add(&node, &model.floats, n).map_err(|e| SessionError::Aggregate(in_round(self.round, &e)))?
            }
            None => self.held.push(FitResult { node: node.clone(), update: model.floats, num_examples: n }),
        }
        if self.dp.is_none() && !model.fixed.is_empty() && self.fixed.as_ref().is_none_or(|(best, _)| n > *best) {
            self.fixed = Some((n, model.fixed));
        }
        self.usable.push(Contribution { node, metrics, seconds });
        Ok(())
    }

    /// The strategy's aggregate of what was taken, as a model of the base's types with the
    /// integer tensors of the participant with the most examples; and the failures as the
    /// strategy sees them.
    pub(crate) fn aggregate(&mut self, strategy: &mut dyn Strategy) -> Result<Model, SessionError> {
        let round = self.round;
        let failed: Vec<FitFailure> =
            self.failures.iter().map(|f| FitFailure { node: f.node.clone(), error: f.error.clone() }).collect();
        let started = Instant::now();
        let floats = match self.sum.take() {
            Some(sum) => strategy.aggregate_sum(round, &self.base.floats, sum, &failed),
            None => strategy.aggregate_fit(round, &self.base.floats, &std::mem::take(&mut self.held), &failed),
        }
        .map_err(|e| SessionError::Aggregate(in_round(round, &e)))?;
        self.folding += started.elapsed();
        let mut model = self.base.with_floats(floats);
        if let Some((_, fixed)) = self.fixed.take() {
            model.fixed = fixed;
        }
        Ok(model)
    }
}

/// Refuses a new global model holding NaN or an infinity, or a value its type cannot
/// store (F16 holds magnitudes up to 65504: past it, a value would be written as an
/// infinity). Every round and step goes through it before its model is stored.
pub(crate) fn check_storable(round: u32, model: &Model) -> Result<(), SessionError> {
    for (name, t) in &model.floats.0 {
        let f16 = model.float_type(name) == FloatType::F16;
        if let Some(v) = t.data.iter().find(|v| !v.is_finite() || (f16 && v.abs() > 65504.0)) {
            let what = if v.is_finite() { "past what F16 stores" } else { "not a finite number" };
            return Err(SessionError::Aggregate(format!(
                "round {round}: the aggregate's tensor {name:?} holds {v}, {what}"
            )));
        }
    }
    Ok(())
}

/// The L2 norm rounding to a model's stored types may add to its values: half a unit in
/// the last place of each (2^-11 relative for F16, 2^-8 for BF16, 2^-24 for F32).
fn rounding(model: &Model) -> f64 {
    let mut sq = 0.0f64;
    for (name, t) in &model.floats.0 {
        let eps = match model.float_type(name) {
            FloatType::F16 => 2f64.powi(-11),
            FloatType::BF16 => 2f64.powi(-8),
            FloatType::F32 | FloatType::F64 => 2f64.powi(-24),
        };
        sq += t.data.iter().map(|v| (f64::from(v.abs()) * eps).powi(2)).sum::<f64>();
    }
    sq.sqrt()
}
