//! FedAvg, FedProx and FedAvgM: the example-weighted average, optionally with server momentum.

use serde::{Deserialize, Serialize};

use super::math::momentum_step;
use super::step::step_in_two_passes;
use super::{
    Common, FitFailure, FitPlan, FitResult, FitSum, Participation, Strategy, StrategyError, check_output, check_param,
    check_round, decode_state, encode_state, join_roles, split_roles,
};
use crate::tensor::Tensors;

/// Implements the participation part of [`Strategy`] from a `common: Common` field:
/// `configure_fit` (with `$config` merged into every worker's config; nothing by default),
/// `configure_evaluate`, `participation` and `set_threads`.
macro_rules! common_strategy_methods {
    () => {
        common_strategy_methods!(|_s: &Self| serde_json::json!({}));
    };
    ($config:expr) => {
        fn participation(&self) -> &Participation {
            &self.common.participation
        }

        fn set_threads(&mut self, threads: usize) {
            self.common.threads = threads.max(1);
        }

        fn configure_fit(&self, _round: u32, available: &[String], seed: u64) -> Result<FitPlan, StrategyError> {
            self.common.configure_fit(available, seed, ($config)(self))
        }

        fn configure_evaluate(
            &self,
            _round: u32,
            available: &[String],
            seed: u64,
        ) -> Result<Vec<String>, StrategyError> {
            self.common.configure_evaluate(available, seed)
        }
    };
}
pub(super) use common_strategy_methods;

/// FedAvg (McMahan et al., 2017): the average of the participants' models weighted by their
/// example counts (Flower's `FedAvg` with `aggregate`).
#[derive(Clone, Debug)]
pub struct FedAvg {
    common: Common,
}

impl FedAvg {
    /// FedAvg with these participation settings.
    pub fn new(participation: Participation) -> Self {
        FedAvg { common: Common::new(participation) }
    }
}

impl Strategy for FedAvg {
    fn name(&self) -> &str {
        "fedavg"
    }

    common_strategy_methods!();

    fn aggregate_fit(
        &mut self,
        round: u32,
        current: &Tensors,
        results: &[FitResult],
        failures: &[FitFailure],
    ) -> Result<Tensors, StrategyError> {
        let sum = self.common.sum_of(round, current, results, failures)?;
        self.aggregate_sum(round, current, sum, failures)
    }

    fn takes_sum(&self) -> bool {
        true
    }

    fn reads_current(&self) -> bool {
        false
    }

    fn aggregate_sum(
        &mut self,
        round: u32,
        _current: &Tensors,
        sum: FitSum,
        failures: &[FitFailure],
    ) -> Result<Tensors, StrategyError> {
        self.common.check_policy(round, sum.results(), failures)?;
        sum.mean()
    }

    fn state(&self) -> Vec<u8> {
        encode_state(self.name(), serde_json::json!({}), None, &Tensors::default())
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), StrategyError> {
        stateless_restore(self.name(), serde_json::json!({}), state)
    }
}

/// Checks that `state` is the empty state of a stateless strategy.
pub(super) fn stateless_restore(name: &str, params: serde_json::Value, state: &[u8]) -> Result<(), StrategyError> {
    let (_, tensors) = decode_state(name, &params, state)?;
    if !tensors.0.is_empty() {
        return Err(StrategyError::State { strategy: name.into(), message: "unexpected tensors".into() });
    }
    Ok(())
}

/// FedProx's hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FedProxParams {
    /// Weight of the proximal term `mu/2 ||w - w_t||^2` the workers add to their loss; 0 is
    /// FedAvg. Required, at least 0.
    pub proximal_mu: f64,
}

/// FedProx (Li et al., 2020): FedAvg on the server; the workers are told `proximal_mu` in their
/// configuration and add the proximal term to their loss.
#[derive(Clone, Debug)]
pub struct FedProx {
    params: FedProxParams,
    common: Common,
}

impl FedProx {
    /// FedProx with these parameters; refuses a negative or non-finite `proximal_mu`.
    pub fn new(params: FedProxParams, participation: Participation) -> Result<Self, StrategyError> {
        let mu = params.proximal_mu;
        check_param("fedprox", "proximal_mu", mu, mu >= 0.0, "at least 0")?;
        Ok(FedProx { params, common: Common::new(participation) })
    }

    /// The parameters.
    pub fn params(&self) -> &FedProxParams {
        &self.params
    }
}

impl Strategy for FedProx {
    fn name(&self) -> &str {
        "fedprox"
    }

    // FedProx's proximal term goes to every worker.
    common_strategy_methods!(|s: &Self| serde_json::json!({"proximal_mu": s.params.proximal_mu}));

    fn aggregate_fit(
        &mut self,
        round: u32,
        current: &Tensors,
        results: &[FitResult],
        failures: &[FitFailure],
    ) -> Result<Tensors, StrategyError> {
        let sum = self.common.sum_of(round, current, results, failures)?;
        self.aggregate_sum(round, current, sum, failures)
    }

    fn takes_sum(&self) -> bool {
        true
    }

    fn reads_current(&self) -> bool {
        false
    }

    fn aggregate_sum(
        &mut self,
        round: u32,
        _current: &Tensors,
        sum: FitSum,
        failures: &[FitFailure],
    ) -> Result<Tensors, StrategyError> {
        self.common.check_policy(round, sum.results(), failures)?;
        sum.mean()
    }

    fn state(&self) -> Vec<u8> {
        encode_state(self.name(), params_json(&self.params), None, &Tensors::default())
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), StrategyError> {
        stateless_restore(self.name(), params_json(&self.params), state)
    }
}

pub(super) fn params_json<T: Serialize>(params: &T) -> serde_json::Value {
    serde_json::to_value(params).expect("parameters always serialise")
}

/// FedAvgM's hyper-parameters, with Flower's defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FedAvgMParams {
    /// Server learning rate (default 1.0), above 0.
    pub server_learning_rate: f64,
    /// Server momentum (default 0.0), at least 0.
    pub server_momentum: f64,
}

impl Default for FedAvgMParams {
    fn default() -> Self {
        FedAvgMParams { server_learning_rate: 1.0, server_momentum: 0.0 }
    }
}

/// FedAvgM (Hsu et al., 2019): FedAvg followed by a server SGD step with momentum on the
/// pseudo-gradient `current - fedavg` (Flower's `FedAvgM`). With the defaults it is FedAvg.
#[derive(Clone, Debug)]
pub struct FedAvgM {
    params: FedAvgMParams,
    common: Common,
    momentum: Option<Tensors>,
    last_round: Option<u32>,
}

impl FedAvgM {
    /// FedAvgM with these parameters; refuses a learning rate not above 0 or a negative
    /// momentum.
    pub fn new(params: FedAvgMParams, participation: Participation) -> Result<Self, StrategyError> {
        let (lr, mu) = (params.server_learning_rate, params.server_momentum);
        check_param("fedavgm", "server_learning_rate", lr, lr > 0.0, "above 0")?;
        check_param("fedavgm", "server_momentum", mu, mu >= 0.0, "at least 0")?;
        Ok(FedAvgM { params, common: Common::new(participation), momentum: None, last_round: None })
    }

    /// The parameters.
    pub fn params(&self) -> &FedAvgMParams {
        &self.params
    }

    /// Whether the server takes an optimiser step at all (as Flower's `server_opt`).
    fn server_opt(&self) -> bool {
        self.params.server_momentum != 0.0 || self.params.server_learning_rate != 1.0
    }
}

impl Strategy for FedAvgM {
    fn name(&self) -> &str {
        "fedavgm"
    }

    common_strategy_methods!();

    fn aggregate_fit(
        &mut self,
        round: u32,
        current: &Tensors,
        results: &[FitResult],
        failures: &[FitFailure],
    ) -> Result<Tensors, StrategyError> {
        check_round(self.name(), round, self.last_round)?;
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
        let name = self.name();
        check_round(name, round, self.last_round)?;
        self.common.check_policy(round, sum.results(), failures)?;
        let avg = sum.mean()?;
        if !self.server_opt() {
            self.last_round = Some(round);
            return Ok(avg);
        }
        if current.0.is_empty() {
            return Err(StrategyError::Aggregation {
                round,
                strategy: name.into(),
                message: "server-side optimisation needs the current model (Flower's initial_parameters)".into(),
            });
        }
        let use_momentum = self.params.server_momentum > 0.0;
        let first = self.momentum.is_none();
        if let Some(m) = &self.momentum
            && use_momentum
        {
            current.check_same_layout(m).map_err(|e| StrategyError::State {
                strategy: name.into(),
                message: format!("the momentum does not match the model: {e}"),
            })?;
        }
        current.check_same_layout(&avg).map_err(|e| StrategyError::Aggregation {
            round,
            strategy: name.into(),
            message: format!("the round's mean does not match the model: {e}"),
        })?;
        let (lr, beta, threads) = (self.params.server_learning_rate, self.params.server_momentum, self.common.threads);
        let step = |w: &mut [f32], avg: &[f32], mom: &mut [&mut [f32]]| {
            let mom = mom.first_mut().map(|m| &mut **m).unwrap_or_default();
            momentum_step(w, avg, mom, lr, beta, first, threads);
        };
        let label = name.to_owned();
        let accept = |out: &Tensors| check_output(round, &label, out);
        let out = if use_momentum {
            let mut momentum = self.momentum.take().unwrap_or_else(|| super::sum::zeros_like(current));
            let stepped = step_in_two_passes(round, &label, current, &avg, &mut [&mut momentum], step, accept);
            if stepped.is_ok() || !first {
                self.momentum = Some(momentum);
            }
            stepped?
        } else {
            step_in_two_passes(round, &label, current, &avg, &mut [], step, accept)?
        };
        self.last_round = Some(round);
        Ok(out)
    }

    fn state(&self) -> Vec<u8> {
        let tensors = join_roles(&[("momentum", self.momentum.as_ref())]);
        encode_state(self.name(), params_json(&self.params), self.last_round, &tensors)
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), StrategyError> {
        let name = self.name();
        let (last_round, tensors) = decode_state(name, &params_json(&self.params), state)?;
        let mut roles = split_roles(name, tensors, &["momentum"])?;
        self.momentum = roles.pop().flatten();
        self.last_round = last_round;
        Ok(())
    }
}
