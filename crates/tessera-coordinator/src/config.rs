//! The configuration of federated sessions (Flower's vocabulary: rounds, fractions,
//! minimums, strategies, differential privacy, secure and hierarchical aggregation), and
//! swarm files, which hold either such a session or a swarm of tasks.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tessera_core::PackageRef;
use tessera_core::name::check_ident;
use tessera_core::strategy::{self, Participation, Strategy, StrategyError};
use tessera_swarm::SwarmSpec;

use crate::SessionError;
use crate::fedbuff::FedBuffConfig;

/// A federated learning session, as written in a swarm file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// The worker package: `name[@version|@alias]` or a digest.
    pub module: String,
    /// Rounds to run.
    #[serde(default = "default_rounds")]
    pub rounds: u32,
    /// Fewest participants a round may aggregate.
    #[serde(default = "default_min")]
    pub min_participants: usize,
    /// Fraction of eligible nodes asked each round, in (0, 1].
    #[serde(default = "default_ratio")]
    pub participant_ratio: f64,
    /// Seconds a round waits for replies.
    #[serde(default = "default_timeout")]
    pub round_timeout_secs: f64,
    /// Fewest eligible nodes a round needs before it starts (default: `min_participants`).
    #[serde(default)]
    pub min_available_nodes: Option<usize>,
    /// Fraction of eligible nodes asked to evaluate each new model on their own data
    /// (federated evaluation); 0 (the default) evaluates only at the coordinator.
    #[serde(default)]
    pub fraction_evaluate: f64,
    /// Fewest nodes asked to evaluate when federated evaluation is on.
    #[serde(default = "default_min_evaluate")]
    pub min_evaluate: usize,
    /// Whether a round with failed or missing participants is aggregated at all.
    #[serde(default = "default_true")]
    pub accept_failures: bool,
    /// Largest share of a round's participants that may fail for it to be aggregated.
    #[serde(default = "default_max_failure_ratio")]
    pub max_failure_ratio: f64,
    /// Aggregation strategy: a name (`fedavg`, `fedavgm`, `fedprox`, `fedadagrad`, `fedadam`,
    /// `fedyogi`, `fedmedian`, `fedtrimmedavg`, `krum`, `bulyan`), or a mapping with `name`
    /// and the strategy's parameters (`{name: fedadam, eta: 0.01}`).
    #[serde(default)]
    pub strategy: StrategySpec,
    /// Hierarchical aggregation: region aggregators (nodes running `module`, the
    /// `fedavg-partial` builtin) sum their region's updates, and the coordinator combines
    /// their partial sums, so it never downloads a region's individual updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hierarchy: Option<Hierarchy>,
    /// Secure aggregation: participants mask their updates so the coordinator learns only
    /// their sum (FedAvg), even when some drop out mid-round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<SecAggSettings>,
    /// Asynchronous FL (FedBuff): no rounds; participants train continuously on the latest
    /// model and the coordinator takes a server step every `buffer_size` updates, weighted
    /// by staleness. `rounds` is then the most server steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fedbuff: Option<FedBuffConfig>,
    /// Simulation: each eligible node hosts this many participants (`<node>.c<j>`), each
    /// training on its share of the node's dataset (rows `i % clients_per_node == j`; the
    /// worker gets `partition` and `partitions` in its config). Strategies sample from all
    /// of them, so a few nodes simulate a thousand participants per round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients_per_node: Option<usize>,
    /// Keep every round's update blobs, the nodes' answer records and replaced models
    /// (for audit). By default they are removed once the round is saved, so the stores
    /// stay flat across rounds and a finished session keeps its final model, reports and
    /// lineage.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retain_updates: bool,
    /// Differential privacy: updates clipped to an L2 norm and Gaussian noise added to the
    /// aggregate, with the privacy spent reported every round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub differential_privacy: Option<DpConfig>,
    /// Dataset participants train on (nodes without it are not asked).
    #[serde(default = "default_dataset")]
    pub dataset: String,
    /// Dataset the coordinator's own node evaluates each global model on.
    #[serde(default)]
    pub eval_dataset: Option<String>,
    /// Config overrides for the worker, merged over its module's default config.
    #[serde(default = "empty")]
    pub config: Value,
    /// Seed for participant selection and worker shuffling.
    #[serde(default)]
    pub seed: u64,
    /// Name under which the final model is published to the hub (nothing is published
    /// when absent).
    #[serde(default)]
    pub publish_as: Option<String>,
    /// Worker packages for some nodes instead of `module` (`node-id: name@version`): a
    /// Python worker and WebAssembly workers in one session. They must speak the same
    /// worker protocol and give models of the same layout.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_modules: BTreeMap<String, String>,
}

fn default_rounds() -> u32 {
    20
}
fn default_min() -> usize {
    2
}
fn default_ratio() -> f64 {
    1.0
}
fn default_timeout() -> f64 {
    60.0
}
fn default_min_evaluate() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_max_failure_ratio() -> f64 {
    1.0
}

/// Differential privacy for a session (DP-FedAvg with fixed clipping, as Flower's
/// `DifferentialPrivacy{Server,Client}SideFixedClipping`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// z: the noise's standard deviation is `z · clipping_norm / participants` per coordinate.
    pub noise_multiplier: f64,
    /// C: the largest L2 norm of one participant's update (its difference to the global
    /// model).
    pub clipping_norm: f64,
    /// Who clips: `server` (the coordinator clips what arrives) or `client` (each node
    /// clips its own update before it leaves; the coordinator refuses an unclipped one).
    #[serde(default)]
    pub side: DpSide,
    /// δ of the (ε, δ) reported.
    #[serde(default = "default_delta")]
    pub delta: f64,
}

/// Where updates are clipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpSide {
    /// At the coordinator.
    #[default]
    Server,
    /// On each node, before the update leaves it.
    Client,
}

fn default_delta() -> f64 {
    1e-5
}

/// Regions and their aggregators.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hierarchy {
    /// The aggregator package (`runtime: builtin`, `entry: fedavg-partial`).
    pub module: String,
    /// Regions by name.
    pub regions: BTreeMap<String, Region>,
}

/// One region: its aggregator node and its participant nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// The node that sums the region's updates.
    pub aggregator: String,
    /// The region's participant nodes (participants elsewhere are summed by the
    /// coordinator itself).
    pub nodes: Vec<String>,
}

/// Secure aggregation settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggSettings {
    /// Weighted update values are clipped to `[-clip, clip]` before quantization.
    #[serde(default = "default_secagg_clip")]
    pub clip: f32,
    /// Quantization bits per value.
    #[serde(default = "default_scale_bits")]
    pub scale_bits: u32,
    /// Survivors needed to finish a round (default: a strict majority of the participants).
    #[serde(default)]
    pub threshold: Option<u16>,
    /// Example counts are divided by this before weighting, to keep values in range.
    #[serde(default = "default_weight_scale")]
    pub weight_scale: f64,
}

fn default_secagg_clip() -> f32 {
    8.0
}
fn default_scale_bits() -> u32 {
    16
}
fn default_weight_scale() -> f64 {
    1000.0
}

/// A strategy and its parameters, written as a name or as `{name: ..., <params>}`.
#[derive(Clone, Debug, PartialEq)]
pub struct StrategySpec {
    /// The strategy's name.
    pub name: String,
    /// Its parameters (a mapping; empty for the defaults).
    pub params: serde_json::Map<String, Value>,
}

impl Default for StrategySpec {
    fn default() -> Self {
        StrategySpec { name: "fedavg".into(), params: serde_json::Map::new() }
    }
}

impl StrategySpec {
    /// A strategy with its default parameters.
    pub fn named(name: &str) -> Self {
        StrategySpec { name: name.into(), params: serde_json::Map::new() }
    }
}

impl Serialize for StrategySpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.params.is_empty() {
            return s.serialize_str(&self.name);
        }
        let mut m = self.params.clone();
        m.insert("name".into(), Value::String(self.name.clone()));
        m.serialize(s)
    }
}

impl<'de> Deserialize<'de> for StrategySpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(name) => Ok(StrategySpec { name, params: serde_json::Map::new() }),
            Value::Object(mut m) => match m.remove("name") {
                Some(Value::String(name)) => Ok(StrategySpec { name, params: m }),
                _ => Err(D::Error::custom("a strategy mapping needs `name`")),
            },
            other => Err(D::Error::custom(format!("a strategy is a name or a mapping with `name`, not {other}"))),
        }
    }
}
fn default_dataset() -> String {
    "digits".into()
}
fn empty() -> Value {
    Value::Object(Default::default())
}

impl SessionConfig {
    /// Reads a swarm file (YAML). Errors name the field and the line.
    pub fn from_yaml(text: &str) -> Result<Self, SessionError> {
        let cfg: SessionConfig =
            serde_saphyr::from_str_with_options(text, tessera_core::yaml::options()).map_err(|e| {
                let msg = tessera_core::yaml::message(&e);
                match tessera_core::yaml::location(&e) {
                    Some((line, column)) => SessionError::Config(format!("line {line}, column {column}: {msg}")),
                    None => SessionError::Config(msg),
                }
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Who takes part in rounds, as the strategy sees it.
    pub fn participation(&self) -> Participation {
        Participation {
            fraction_fit: self.participant_ratio,
            min_fit: self.min_participants,
            min_available: self.min_available_nodes.unwrap_or(self.min_participants),
            fraction_evaluate: self.fraction_evaluate,
            min_evaluate: self.min_evaluate,
            accept_failures: self.accept_failures,
            max_failure_ratio: self.max_failure_ratio,
        }
    }

    /// The session's strategy, fresh.
    pub fn build_strategy(&self) -> Result<Box<dyn Strategy>, StrategyError> {
        strategy::from_config(&self.strategy.name, &Value::Object(self.strategy.params.clone()), self.participation())
    }

    /// A session of `module` with the defaults.
    pub fn new(module: impl Into<String>) -> Self {
        SessionConfig {
            module: module.into(),
            rounds: default_rounds(),
            min_participants: default_min(),
            participant_ratio: default_ratio(),
            round_timeout_secs: default_timeout(),
            min_available_nodes: None,
            fraction_evaluate: 0.0,
            min_evaluate: default_min_evaluate(),
            accept_failures: true,
            max_failure_ratio: default_max_failure_ratio(),
            strategy: StrategySpec::default(),
            differential_privacy: None,
            clients_per_node: None,
            retain_updates: false,
            secure_aggregation: None,
            fedbuff: None,
            hierarchy: None,
            dataset: default_dataset(),
            eval_dataset: None,
            config: empty(),
            seed: 0,
            publish_as: None,
            node_modules: BTreeMap::new(),
        }
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<PackageRef, SessionError> {
        let bad = |m: String| Err(SessionError::Config(m));
        let module: PackageRef = self.module.parse().map_err(|e| SessionError::Config(format!("module: {e}")))?;
        if self.rounds == 0 {
            return bad("rounds must be at least 1".into());
        }
        if self.min_participants == 0 {
            return bad("min_participants must be at least 1".into());
        }
        if !(self.participant_ratio > 0.0 && self.participant_ratio <= 1.0) {
            return bad(format!("participant_ratio {} must be in (0, 1]", self.participant_ratio));
        }
        if !(self.round_timeout_secs.is_finite() && self.round_timeout_secs > 0.0) {
            return bad("round_timeout_secs must be a positive number".into());
        }
        self.build_strategy().map_err(|e| SessionError::Config(format!("strategy: {e}")))?;
        if let Some(h) = &self.hierarchy {
            if !matches!(self.strategy.name.as_str(), "fedavg" | "fedprox") {
                return bad(format!(
                    "hierarchical aggregation sums updates: it works with fedavg or fedprox, not {}",
                    self.strategy.name
                ));
            }
            if self.secure_aggregation.is_some() || self.differential_privacy.is_some() {
                return bad(
                    "hierarchical aggregation cannot be combined with secure aggregation or differential privacy yet"
                        .into(),
                );
            }
            h.module.parse::<PackageRef>().map_err(|e| SessionError::Config(format!("hierarchy.module: {e}")))?;
            let mut seen = BTreeSet::new();
            let mut aggregators = BTreeSet::new();
            for (name, r) in &h.regions {
                check_ident("region name", name).map_err(|e| SessionError::Config(e.to_string()))?;
                check_ident("aggregator node", &r.aggregator).map_err(|e| SessionError::Config(e.to_string()))?;
                if !aggregators.insert(&r.aggregator) {
                    return bad(format!("node {} aggregates two regions", r.aggregator));
                }
                for n in &r.nodes {
                    if !seen.insert(n) {
                        return bad(format!("node {n} is in two regions"));
                    }
                }
            }
        }
        if let Some(sa) = &self.secure_aggregation {
            if !matches!(self.strategy.name.as_str(), "fedavg" | "fedprox") {
                return bad(format!(
                    "secure aggregation gives the sum only: it works with fedavg or fedprox, not {}",
                    self.strategy.name
                ));
            }
            if self.differential_privacy.is_some() {
                return bad("secure aggregation and differential privacy cannot be combined yet".into());
            }
            if !(sa.clip.is_finite() && sa.clip > 0.0 && (1..=31).contains(&sa.scale_bits)) {
                return bad("secure_aggregation: clip must be positive and scale_bits in 1..=31".into());
            }
            if !(sa.weight_scale.is_finite() && sa.weight_scale > 0.0) {
                return bad("secure_aggregation.weight_scale must be positive".into());
            }
        }
        if let Some(fb) = &self.fedbuff {
            fb.check(self).map_err(SessionError::Config)?;
        }
        if let Some(c) = self.clients_per_node
            && !(1..=100_000).contains(&c)
        {
            return bad(format!("clients_per_node {c} must be between 1 and 100000"));
        }
        if let Some(dp) = &self.differential_privacy {
            if !(dp.noise_multiplier.is_finite() && dp.noise_multiplier > 0.0) {
                return bad(format!("differential_privacy.noise_multiplier {} must be positive", dp.noise_multiplier));
            }
            if !(dp.clipping_norm.is_finite() && dp.clipping_norm > 0.0 && dp.clipping_norm < f64::from(f32::MAX)) {
                return bad(format!("differential_privacy.clipping_norm {} must be positive", dp.clipping_norm));
            }
            if !(dp.delta > 0.0 && dp.delta < 1.0) {
                return bad(format!("differential_privacy.delta {} must be in (0, 1)", dp.delta));
            }
        }
        check_ident("dataset", &self.dataset).map_err(|e| SessionError::Config(e.to_string()))?;
        if let Some(e) = &self.eval_dataset {
            check_ident("eval_dataset", e).map_err(|e| SessionError::Config(e.to_string()))?;
        }
        if !self.config.is_object() {
            return bad("config must be a mapping".into());
        }
        if let Some(name) = &self.publish_as {
            name.parse::<tessera_core::ModulePath>().map_err(|e| SessionError::Config(format!("publish_as: {e}")))?;
        }
        for (node, m) in &self.node_modules {
            check_ident("node_modules node id", node).map_err(|e| SessionError::Config(e.to_string()))?;
            m.parse::<PackageRef>().map_err(|e| SessionError::Config(format!("node_modules.{node}: {e}")))?;
        }
        Ok(module)
    }
}

/// What a swarm file holds: a federated session (`module`, `rounds`, `strategy`...) or a
/// swarm of tasks (`tasks` and `flow`). Both run on the same engine.
#[derive(Clone, Debug, PartialEq)]
pub enum SwarmFile {
    /// A federated learning session with the built-in strategies.
    Federated(SessionConfig),
    /// A swarm of user-written tasks.
    Tasks(SwarmSpec),
}

impl SwarmFile {
    /// Reads a swarm file (YAML or JSON): a swarm of tasks when it has `tasks`, else a
    /// federated session. Errors name the line.
    pub fn from_yaml(text: &str) -> Result<SwarmFile, SessionError> {
        #[derive(Deserialize)]
        struct Probe {
            #[serde(default)]
            tasks: Option<serde::de::IgnoredAny>,
        }
        let probe: Option<Probe> = serde_saphyr::from_str_with_options(text, tessera_core::yaml::options()).ok();
        if probe.is_some_and(|p| p.tasks.is_some()) {
            return SwarmSpec::from_yaml(text).map(SwarmFile::Tasks).map_err(SessionError::Spec);
        }
        SessionConfig::from_yaml(text).map(SwarmFile::Federated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_validation() {
        let ok = SessionConfig::new("fl.softmax.worker@0.1.1");
        assert!(ok.validate().is_ok());
        let mut c = ok.clone();
        c.rounds = 0;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.participant_ratio = 0.0;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.strategy = StrategySpec::named("magic");
        assert!(c.validate().unwrap_err().to_string().contains("magic"));
        let mut c = ok.clone();
        c.strategy = serde_json::from_value(json!({"name": "fedadam", "eta": -1.0})).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("eta"), "parameters are checked");
        let mut c = ok.clone();
        c.strategy = serde_json::from_value(json!({"name": "krum", "colour": 1})).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("colour"));
        let mut c = ok.clone();
        c.max_failure_ratio = 2.0;
        assert!(c.validate().is_err());
        let sa = SecAggSettings { clip: 8.0, scale_bits: 16, threshold: None, weight_scale: 1000.0 };
        let mut c = ok.clone();
        c.secure_aggregation = Some(sa.clone());
        assert!(c.validate().is_ok());
        c.strategy = StrategySpec::named("krum");
        assert!(c.validate().unwrap_err().to_string().contains("fedavg"), "robust strategies need every update");
        let mut c = ok.clone();
        c.secure_aggregation = Some(SecAggSettings { scale_bits: 40, ..sa.clone() });
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.secure_aggregation = Some(sa);
        c.differential_privacy =
            Some(DpConfig { noise_multiplier: 1.0, clipping_norm: 1.0, side: DpSide::Server, delta: 1e-5 });
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.differential_privacy =
            Some(DpConfig { noise_multiplier: 0.0, clipping_norm: 1.0, side: DpSide::Server, delta: 1e-5 });
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.clients_per_node = Some(0);
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.module = "Not A Module".into();
        assert!(c.validate().is_err());
        let mut c = ok;
        c.round_timeout_secs = f64::NAN;
        assert!(c.validate().is_err());
    }

    #[test]
    fn strategies_in_swarm_files() {
        let c = SessionConfig::from_yaml("module: a.b@0.1.0\nstrategy: fedmedian\n").unwrap();
        assert_eq!(c.strategy, StrategySpec::named("fedmedian"));
        let c = SessionConfig::from_yaml(
            "module: a.b@0.1.0\nstrategy:\n  name: fedtrimmedavg\n  beta: 0.3\nfraction_evaluate: 0.5\n",
        )
        .unwrap();
        assert_eq!(c.strategy.name, "fedtrimmedavg");
        assert_eq!(c.strategy.params["beta"], 0.3);
        assert_eq!(c.participation().fraction_evaluate, 0.5);
        // Written back the same way.
        let again: SessionConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(again, c);
        for bad in ["strategy: [1]\n", "strategy: {beta: 0.3}\n", "strategy: {name: fedtrimmedavg, beta: 0.7}\n"] {
            let e = SessionConfig::from_yaml(&format!("module: a.b@0.1.0\n{bad}")).unwrap_err();
            assert!(e.to_string().contains("strateg") || e.to_string().contains("beta"), "{bad}: {e}");
        }
    }

    #[test]
    fn swarm_files() {
        let c = SessionConfig::from_yaml(
            "module: fl.softmax.worker@0.1.1\nrounds: 3\nmin_participants: 2\nparticipant_ratio: 0.5\nround_timeout_secs: 30\nconfig:\n  lr: 0.5\npublish_as: digits.softmax\n",
        )
        .unwrap();
        assert_eq!(c.rounds, 3);
        assert_eq!(c.config["lr"], 0.5);
        assert_eq!(c.publish_as.as_deref(), Some("digits.softmax"));
        for (bad, word) in [
            ("module: x\nrounds: many\n", "line 2"),
            ("module: x\nround: 3\n", "round"),
            ("rounds: 3\n", "module"),
            ("module: x\nmodule: y\n", "duplicate"),
            ("module: x\npublish_as: Not A Name\n", "publish_as"),
            ("module: x\nparticipant_ratio: 2\n", "participant_ratio"),
            ("[1, 2", ""),
        ] {
            let e = SessionConfig::from_yaml(bad).unwrap_err().to_string();
            assert!(e.to_lowercase().contains(word), "{bad:?}: {e}");
        }
    }

    #[test]
    fn session_ids_are_idents() {
        let a = crate::new_session_id();
        assert!(check_ident("session", &a).is_ok());
        assert_ne!(a, crate::new_session_id());
    }

    #[test]
    fn swarm_files_hold_a_session_or_tasks() {
        let f = SwarmFile::from_yaml("module: a.b@0.1.0\nrounds: 2\n").unwrap();
        assert!(matches!(f, SwarmFile::Federated(c) if c.rounds == 2));
        let f = SwarmFile::from_yaml("tasks:\n  w: {module: a.b@0.1.0, method: all}\nflow: w\n").unwrap();
        assert!(matches!(f, SwarmFile::Tasks(s) if s.tasks.len() == 1));
        let e = SwarmFile::from_yaml("tasks:\n  w: {module: a.b@0.1.0}\nflow: w -> v\n").unwrap_err();
        assert!(e.to_string().contains("line 3") && e.to_string().contains("unknown task `v`"), "{e}");
        let e = SwarmFile::from_yaml("module: a.b@0.1.0\nrounds: x\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
