//! The FedOpt family (Reddi et al., 2021): FedAdagrad, FedAdam and FedYogi, a server optimiser
//! step on `delta = fedavg - current` with moments kept across rounds (Flower's `FedOpt`
//! subclasses).

use serde::{Deserialize, Serialize};

use super::avg::{common_strategy_methods, params_json};
use super::math::{OptRule, adam_eta_norm, opt_step};
use super::step::step_in_two_passes;
use super::sum::zeros_like;
use super::{
    Common, FitFailure, FitPlan, FitResult, FitSum, Participation, Strategy, StrategyError, check_output, check_param,
    check_round, decode_state, encode_state, join_roles, split_roles,
};
use crate::tensor::Tensors;

/// FedAdagrad's hyper-parameters, with Flower's defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FedAdagradParams {
    /// Server learning rate (default 0.1).
    pub eta: f64,
    /// Client learning rate (default 0.1); kept for Flower parity, not used by the server.
    pub eta_l: f64,
    /// Adaptivity (default 1e-9).
    pub tau: f64,
}

impl Default for FedAdagradParams {
    fn default() -> Self {
        FedAdagradParams { eta: 0.1, eta_l: 0.1, tau: 1e-9 }
    }
}

/// FedAdam's hyper-parameters, with Flower's defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FedAdamParams {
    /// Server learning rate (default 0.1).
    pub eta: f64,
    /// Client learning rate (default 0.1); kept for Flower parity, not used by the server.
    pub eta_l: f64,
    /// First-moment decay (default 0.9).
    pub beta_1: f64,
    /// Second-moment decay (default 0.99).
    pub beta_2: f64,
    /// Adaptivity (default 1e-9).
    pub tau: f64,
}

impl Default for FedAdamParams {
    fn default() -> Self {
        FedAdamParams { eta: 0.1, eta_l: 0.1, beta_1: 0.9, beta_2: 0.99, tau: 1e-9 }
    }
}

/// FedYogi's hyper-parameters, with Flower's defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FedYogiParams {
    /// Server learning rate (default 0.01).
    pub eta: f64,
    /// Client learning rate (default 0.0316); kept for Flower parity, not used by the server.
    pub eta_l: f64,
    /// First-moment decay (default 0.9).
    pub beta_1: f64,
    /// Second-moment decay (default 0.99).
    pub beta_2: f64,
    /// Adaptivity (default 1e-3).
    pub tau: f64,
}

impl Default for FedYogiParams {
    fn default() -> Self {
        FedYogiParams { eta: 0.01, eta_l: 0.0316, beta_1: 0.9, beta_2: 0.99, tau: 1e-3 }
    }
}

/// Which FedOpt strategy, with its hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum FedOptParams {
    /// FedAdagrad.
    Adagrad(FedAdagradParams),
    /// FedAdam.
    Adam(FedAdamParams),
    /// FedYogi.
    Yogi(FedYogiParams),
}

impl FedOptParams {
    /// The strategy's name.
    pub fn name(&self) -> &'static str {
        match self {
            FedOptParams::Adagrad(_) => "fedadagrad",
            FedOptParams::Adam(_) => "fedadam",
            FedOptParams::Yogi(_) => "fedyogi",
        }
    }

    fn to_json(&self) -> serde_json::Value {
        match self {
            FedOptParams::Adagrad(p) => params_json(p),
            FedOptParams::Adam(p) => params_json(p),
            FedOptParams::Yogi(p) => params_json(p),
        }
    }

    fn validate(&self) -> Result<(), StrategyError> {
        let name = self.name();
        let (eta, eta_l, tau, betas) = match self {
            FedOptParams::Adagrad(p) => (p.eta, p.eta_l, p.tau, None),
            FedOptParams::Adam(p) => (p.eta, p.eta_l, p.tau, Some((p.beta_1, p.beta_2))),
            FedOptParams::Yogi(p) => (p.eta, p.eta_l, p.tau, Some((p.beta_1, p.beta_2))),
        };
        check_param(name, "eta", eta, eta > 0.0, "above 0")?;
        check_param(name, "eta_l", eta_l, eta_l >= 0.0, "at least 0")?;
        check_param(name, "tau", tau, tau > 0.0, "above 0")?;
        if let Some((b1, b2)) = betas {
            check_param(name, "beta_1", b1, (0.0..1.0).contains(&b1), "in [0, 1)")?;
            check_param(name, "beta_2", b2, (0.0..1.0).contains(&b2), "in [0, 1)")?;
        }
        Ok(())
    }

    /// The per-coordinate rule for `round` (FedAdam's bias correction depends on it).
    fn rule(&self, round: u32) -> OptRule {
        match self {
            FedOptParams::Adagrad(p) => OptRule::Adagrad { eta: p.eta, tau: p.tau },
            FedOptParams::Adam(p) => OptRule::Adam {
                beta_1: p.beta_1,
                beta_2: p.beta_2,
                eta_norm: adam_eta_norm(p.eta, p.beta_1, p.beta_2, round),
                tau: p.tau,
            },
            FedOptParams::Yogi(p) => OptRule::Yogi { beta_1: p.beta_1, beta_2: p.beta_2, eta: p.eta, tau: p.tau },
        }
    }
}

/// FedAdagrad, FedAdam or FedYogi: FedAvg, then a server optimiser step from the current model
/// with first and second moments `m` and `v` kept across rounds (zeros before the first round,
/// as Flower).
#[derive(Clone, Debug)]
pub struct FedOpt {
    params: FedOptParams,
    common: Common,
    m: Option<Tensors>,
    v: Option<Tensors>,
    last_round: Option<u32>,
}

impl FedOpt {
    /// The strategy with these parameters; refuses `eta` or `tau` not above 0 and betas
    /// outside `[0, 1)`.
    pub fn new(params: FedOptParams, participation: Participation) -> Result<Self, StrategyError> {
        params.validate()?;
        Ok(FedOpt { params, common: Common::new(participation), m: None, v: None, last_round: None })
    }

    /// The parameters.
    pub fn params(&self) -> &FedOptParams {
        &self.params
    }
}

impl Strategy for FedOpt {
    fn name(&self) -> &str {
        self.params.name()
    }

    common_strategy_methods!();

    fn aggregate_fit(
        &mut self,
        round: u32,
        current: &Tensors,
        results: &[FitResult],
        failures: &[FitFailure],
    ) -> Result<Tensors, StrategyError> {
        check_round(self.params.name(), round, self.last_round)?;
        let sum = self.common.sum_of(round, current, results, failures)?;
        self.aggregate_sum(round, current, sum, failures)
    }

    fn takes_sum(&self) -> bool {
        true
    }

    fn aggregate_sum(
        &mut self,
        round: u32,
        current: &Tensors,
        sum: FitSum,
        failures: &[FitFailure],
    ) -> Result<Tensors, StrategyError> {
        let name = self.params.name();
        check_round(name, round, self.last_round)?;
        if current.0.is_empty() {
            return Err(StrategyError::Aggregation {
                round,
                strategy: name.into(),
                message: "needs the current model (Flower's initial_parameters)".into(),
            });
        }
        self.common.check_policy(round, sum.results(), failures)?;
        for saved in [&self.m, &self.v].into_iter().flatten() {
            current.check_same_layout(saved).map_err(|e| StrategyError::State {
                strategy: name.into(),
                message: format!("the saved moments do not match the model: {e}"),
            })?;
        }
        let avg = sum.mean()?;
        current.check_same_layout(&avg).map_err(|e| StrategyError::Aggregation {
            round,
            strategy: name.into(),
            message: format!("the round's mean does not match the model: {e}"),
        })?;
        let rule = self.params.rule(round);
        let threads = self.common.threads;
        let saved = self.m.is_some() && self.v.is_some();
        let mut m = self.m.take().unwrap_or_else(|| zeros_like(current));
        let mut v = self.v.take().unwrap_or_else(|| zeros_like(current));
        let stepped = step_in_two_passes(
            round,
            name,
            current,
            &avg,
            &mut [&mut m, &mut v],
            |w, avg, mv| {
                let [m, v] = mv else { unreachable!("two moments") };
                opt_step(rule, w, avg, m, v, threads);
            },
            |out| check_output(round, name, out),
        );
        if stepped.is_ok() || saved {
            (self.m, self.v) = (Some(m), Some(v));
        }
        let out = stepped?;
        self.last_round = Some(round);
        Ok(out)
    }

    fn state(&self) -> Vec<u8> {
        let tensors = join_roles(&[("m", self.m.as_ref()), ("v", self.v.as_ref())]);
        encode_state(self.name(), self.params.to_json(), self.last_round, &tensors)
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), StrategyError> {
        let name = self.params.name();
        let (last_round, tensors) = decode_state(name, &self.params.to_json(), state)?;
        let mut roles = split_roles(name, tensors, &["m", "v"])?;
        let (v, m) = (roles.pop().flatten(), roles.pop().flatten());
        match (&m, &v) {
            (None, None) => {}
            (Some(m), Some(v)) => m
                .check_same_layout(v)
                .map_err(|e| StrategyError::State { strategy: name.into(), message: format!("m and v differ: {e}") })?,
            _ => {
                return Err(StrategyError::State { strategy: name.into(), message: "only one of m and v".into() });
            }
        }
        self.m = m;
        self.v = v;
        self.last_round = last_round;
        Ok(())
    }
}
