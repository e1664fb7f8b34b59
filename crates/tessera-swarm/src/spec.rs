//! Swarm specs: what a swarm file (or a Python `Swarm`) says, read and checked.
//!
//! ```yaml
//! tasks:
//!   worker:     {module: fl.manta.worker@0.1.0, method: all, datasets: [digits]}
//!   aggregator: {module: fl.manta.aggregator@0.1.0, method: any, maximum: 1}
//!   scheduler:  {module: fl.manta.scheduler@0.1.0, method: any, maximum: 1}
//! flow: worker -> aggregator -> scheduler
//! iterations: 30
//! globals: {target_accuracy: 0.9}
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_saphyr::Spanned;
use tessera_core::name::check_ident;
use tessera_core::version::Version;
use tessera_core::{ModulePath, PackageRef};

use crate::flow::{self, Edge};
use tessera_core::yaml::At;
pub use tessera_core::yaml::SpecError;

/// Largest swarm file read, and largest spec, in bytes (a run's stored state holds its
/// spec and must stay well within a world-state value, 1 MiB).
pub const MAX_SPEC_BYTES: usize = 256 * 1024;

/// Most tasks in one swarm.
pub const MAX_TASKS: usize = 64;

/// Most iterations a swarm may ask for.
pub const MAX_ITERATIONS: u32 = 1_000_000;

/// Where a task runs, as Manta's `Task(method=...)` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Every eligible node (capped by `maximum`).
    All,
    /// Any eligible node(s): the first `maximum` by node id, the same ones each iteration
    /// while they stay eligible.
    Any,
    /// Eligible nodes drawn anew each iteration from the swarm's seed.
    Random,
}

/// How many nodes a task runs on at most.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Maximum {
    /// No limit (`-1`).
    Unlimited,
    /// At most this many nodes (an integer of at least 1).
    Count(usize),
    /// This fraction of the eligible nodes, rounded up, at least one (a number in (0, 1]).
    Fraction(f64),
}

impl Maximum {
    /// How many of `eligible` nodes the task takes.
    pub fn of(self, eligible: usize) -> usize {
        match self {
            Maximum::Unlimited => eligible,
            Maximum::Count(n) => n.min(eligible),
            Maximum::Fraction(f) => ((f * eligible as f64).ceil() as usize).clamp(1, eligible.max(1)).min(eligible),
        }
    }
}

impl<'de> Deserialize<'de> for MaximumText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = MaximumText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("-1, a count of at least 1, or a fraction in (0, 1]")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<MaximumText, E> {
                match v {
                    -1 => Ok(MaximumText(Maximum::Unlimited)),
                    n if n >= 1 => Ok(MaximumText(Maximum::Count(usize::try_from(n).unwrap_or(usize::MAX)))),
                    n => Err(E::custom(format!(
                        "maximum {n}: use -1 for no limit, a count of at least 1, or a fraction in (0, 1]"
                    ))),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<MaximumText, E> {
                match v {
                    0 => {
                        Err(E::custom("maximum 0: use -1 for no limit, a count of at least 1, or a fraction in (0, 1]"))
                    }
                    n => Ok(MaximumText(Maximum::Count(usize::try_from(n).unwrap_or(usize::MAX)))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<MaximumText, E> {
                if v.is_finite() && v > 0.0 && v <= 1.0 {
                    Ok(MaximumText(Maximum::Fraction(v)))
                } else if v.is_finite() && v > 1.0 {
                    Err(E::custom(format!(
                        "maximum {v}: a fraction of the eligible nodes must be in (0, 1]; write a count as an integer"
                    )))
                } else {
                    Err(E::custom(format!("maximum {v}: a fraction must be in (0, 1]")))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `maximum` as written (a number whose type says what it means).
struct MaximumText(Maximum);

/// Which outputs of the stages before a task become its inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Inputs {
    /// Every output of every node of the stages feeding it (all-to-one collection, or a
    /// broadcast when the task runs on many nodes).
    #[default]
    All,
    /// Only the outputs its own node produced (producer-consumer on each node).
    Own,
}

/// One task of a swarm: a module, its config, and where it runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// The module: `name@version`, `name@^1.2` (a range), `name@alias`, `b3:<digest>`, or
    /// a bare `name` with `versions`. (The CLI also takes a folder, `./worker`, which it
    /// publishes before the run.)
    pub module: String,
    /// A version split (canary): version -> share of the task's nodes, shares summing to 1.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub versions: BTreeMap<String, f64>,
    /// Config overrides, merged over the module's default config.
    #[serde(default = "empty_map")]
    pub config: Value,
    /// Where it runs (default `all`, as the Python SDK's `Task`).
    pub method: Method,
    /// How many nodes at most (default: no limit for `all`, 1 for `any` and `random`).
    pub maximum: Maximum,
    /// Runs only on nodes with a GPU.
    #[serde(default)]
    pub gpu: bool,
    /// Runs only on nodes with these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Runs only on nodes holding these datasets (which it may read).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datasets: Vec<String>,
    /// Which outputs of the previous stages it gets.
    #[serde(default)]
    pub inputs: Inputs,
    /// Fewest nodes whose task must succeed for the stage to count.
    pub min_nodes: usize,
    /// Seconds a stage of this task waits for its nodes (default: the swarm's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<f64>,
    /// How many times a stage that ended with too few successes is tried again on other
    /// eligible nodes (for `any` and `random` tasks).
    #[serde(default)]
    pub retries: u32,
}

fn empty_map() -> Value {
    Value::Object(Default::default())
}

impl TaskSpec {
    /// A task of `module` on every node holding `datasets`, with the defaults a swarm file
    /// gives (the worker of a federated session is one).
    pub fn on_all(module: impl Into<String>, datasets: Vec<String>) -> TaskSpec {
        TaskSpec {
            module: module.into(),
            versions: BTreeMap::new(),
            config: empty_map(),
            method: Method::All,
            maximum: Maximum::Unlimited,
            gpu: false,
            labels: BTreeMap::new(),
            datasets,
            inputs: Inputs::All,
            min_nodes: 1,
            timeout_secs: None,
            retries: 0,
        }
    }

    /// The folder of a task whose module is given as a path (`./worker`, `../m`, `/abs`),
    /// which the CLI packs and publishes before the run.
    pub fn local_path(&self) -> Option<&str> {
        is_path(&self.module).then_some(self.module.as_str())
    }

    /// The module references this task runs: one, or one per version of the split (in
    /// the split's order, ascending versions).
    pub fn references(&self) -> Result<Vec<PackageRef>, String> {
        if self.versions.is_empty() {
            return self.module.parse::<PackageRef>().map(|r| vec![r]).map_err(|e| e.to_string());
        }
        let name: ModulePath = self.module.parse().map_err(|e| format!("{e}"))?;
        self.split()?.into_iter().map(|(v, _)| format!("{name}@{v}").parse().map_err(|e| format!("{e}"))).collect()
    }

    /// The version split in ascending version order.
    pub fn split(&self) -> Result<Vec<(Version, f64)>, String> {
        let mut out = Vec::new();
        for (v, share) in &self.versions {
            let parsed = Version::parse(v).map_err(|e| format!("versions: {v:?} is not a semver version: {e}"))?;
            out.push((parsed, *share));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

fn is_path(module: &str) -> bool {
    module.starts_with("./") || module.starts_with("../") || module.starts_with('/') || module == "."
}

/// A swarm: tasks, the flow of stages between them each iteration, what ends it, and the
/// world's initial globals.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwarmSpec {
    /// A name for people (runs are found by their id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The tasks by name.
    pub tasks: BTreeMap<String, TaskSpec>,
    /// The flow: edges `from -> to`. The outputs of `from` are inputs of `to` in the same
    /// iteration; an edge out of the scheduler carries its outputs into the next one.
    pub flow: Vec<Edge>,
    /// The task whose answer ends the run (its `continue` output, or the `continue`
    /// global, being `false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    /// The most iterations.
    pub iterations: u32,
    /// The world's globals before the first iteration.
    #[serde(default)]
    pub globals: serde_json::Map<String, Value>,
    /// Seeds `random` placement, version splits, and the `seed` tasks get.
    #[serde(default)]
    pub seed: u64,
    /// Seconds a stage waits for its nodes, unless its task says otherwise.
    pub timeout_secs: f64,
    /// Publishes the final `model` global to the hub under this name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_as: Option<String>,
    /// Where each task was written (`tasks.<name>`: the line of its `module`), so errors
    /// found after reading (a module the hub does not have) name the line.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub lines: BTreeMap<String, SourceLine>,
}

/// A line of the file a spec was read from: the swarm file itself (`file` unset) or the
/// Python file a swarm was declared in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceLine {
    /// The Python file, when the spec came from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// 1-based.
    pub line: usize,
}

/// Source lines a Python swarm reports for its parts (`tasks.worker` -> 12), so errors name
/// the line of the Python file rather than of the JSON it produced.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Source {
    file: String,
    #[serde(default)]
    lines: BTreeMap<String, usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    #[serde(default)]
    name: Option<Spanned<String>>,
    tasks: Spanned<BTreeMap<String, Spanned<RawTask>>>,
    flow: Spanned<FlowText>,
    #[serde(default)]
    scheduler: Option<Spanned<String>>,
    #[serde(default)]
    iterations: Option<Spanned<u32>>,
    #[serde(default)]
    globals: Option<Spanned<Value>>,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    timeout_secs: Option<Spanned<f64>>,
    #[serde(default)]
    publish_as: Option<Spanned<String>>,
    #[serde(default)]
    source: Option<Source>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    module: Spanned<String>,
    #[serde(default)]
    versions: Option<Spanned<BTreeMap<String, f64>>>,
    #[serde(default)]
    config: Option<Spanned<Value>>,
    #[serde(default)]
    method: Option<Method>,
    #[serde(default)]
    maximum: Option<Spanned<MaximumText>>,
    #[serde(default)]
    gpu: bool,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    datasets: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    inputs: Inputs,
    #[serde(default)]
    min_nodes: Option<Spanned<usize>>,
    #[serde(default)]
    timeout_secs: Option<Spanned<f64>>,
    #[serde(default)]
    retries: Option<Spanned<u32>>,
}

/// `flow` as written: one chain (`a -> b -> c`), a list of chains, or a list of names (one
/// chain in that order).
struct FlowText(Vec<String>);

impl<'de> Deserialize<'de> for FlowText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FlowText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a chain of tasks (`worker -> aggregator -> scheduler`) or a list of chains")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FlowText, E> {
                Ok(FlowText(vec![v.to_owned()]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<FlowText, A::Error> {
                let mut items = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    if items.len() >= 1024 {
                        return Err(de::Error::custom("the flow has more than 1024 chains"));
                    }
                    items.push(s);
                }
                Ok(FlowText(items))
            }
        }
        d.deserialize_any(V)
    }
}

impl SwarmSpec {
    /// An error about `field` (`tasks.worker.module`), at the line its task was written
    /// on when the spec knows it.
    pub fn error_at(&self, field: &str, message: impl Into<String>) -> SpecError {
        let key = field.split('.').take(2).collect::<Vec<_>>().join(".");
        let at = self.lines.get(field).or_else(|| self.lines.get(&key));
        SpecError {
            file: at.and_then(|l| l.file.clone()),
            line: at.map(|l| l.line),
            column: None,
            field: Some(field.to_owned()),
            message: message.into(),
        }
    }

    /// Reads and checks a swarm file (YAML; JSON is YAML too). Errors name the line, the
    /// field and what is wrong: unknown fields, a flow naming an unknown task, a task not in
    /// the flow, a cycle without a scheduler, a `maximum` fraction above 1, a version split
    /// not summing to 1, module references that do not parse.
    pub fn from_yaml(text: &str) -> Result<SwarmSpec, SpecError> {
        if text.len() > MAX_SPEC_BYTES {
            return Err(SpecError {
                file: None,
                line: None,
                column: None,
                field: None,
                message: format!("the file is {} bytes; the limit is {MAX_SPEC_BYTES}", text.len()),
            });
        }
        let raw: RawSpec = tessera_core::yaml::from_str_located(text)?;
        raw.check()
    }

    /// The stages of one iteration in the order they run (the flow's tasks, sorted so
    /// every task comes after those feeding it).
    pub fn stages(&self) -> Vec<String> {
        flow::order(&self.tasks.keys().cloned().collect::<Vec<_>>(), &self.flow, self.scheduler.as_deref())
            .unwrap_or_default()
    }

    /// The tasks feeding `task` in the same iteration.
    pub fn feeds(&self, task: &str) -> Vec<&str> {
        self.flow
            .iter()
            .filter(|e| e.to == task && Some(e.from.as_str()) != self.scheduler.as_deref())
            .map(|e| e.from.as_str())
            .collect()
    }

    /// The tasks feeding `task` from the previous iteration (edges out of the scheduler).
    pub fn carried(&self, task: &str) -> Vec<&str> {
        self.flow
            .iter()
            .filter(|e| e.to == task && Some(e.from.as_str()) == self.scheduler.as_deref())
            .map(|e| e.from.as_str())
            .collect()
    }

    /// Checks a spec that did not come from a file (one stored with a run).
    pub fn validate(&self) -> Result<(), SpecError> {
        let plain =
            |field: Option<String>, message: String| SpecError { file: None, line: None, column: None, field, message };
        if self.tasks.is_empty() || self.tasks.len() > MAX_TASKS {
            return Err(plain(Some("tasks".into()), format!("a swarm has 1 to {MAX_TASKS} tasks")));
        }
        for (name, t) in &self.tasks {
            check_task(name, t).map_err(|(f, m)| plain(Some(format!("tasks.{name}.{f}")), m))?;
        }
        let names: Vec<String> = self.tasks.keys().cloned().collect();
        flow::check(&names, &self.flow, self.scheduler.as_deref()).map_err(|m| plain(Some("flow".into()), m))?;
        if self.iterations == 0 || self.iterations > MAX_ITERATIONS {
            return Err(plain(Some("iterations".into()), format!("must be between 1 and {MAX_ITERATIONS}")));
        }
        if !(self.timeout_secs.is_finite() && self.timeout_secs > 0.0 && self.timeout_secs <= 86_400.0 * 7.0) {
            return Err(plain(
                Some("timeout_secs".into()),
                "must be a positive number of seconds, at most a week".into(),
            ));
        }
        for k in self.globals.keys() {
            tessera_core::name::check_key("global name", k)
                .map_err(|e| plain(Some(format!("globals.{k}")), e.to_string()))?;
        }
        let size = serde_json::to_vec(self).map_or(usize::MAX, |v| v.len());
        if size > MAX_SPEC_BYTES {
            return Err(plain(None, format!("the swarm is {size} bytes as JSON; the limit is {MAX_SPEC_BYTES}")));
        }
        Ok(())
    }
}

/// Checks one task's values; `(field, message)` on failure.
fn check_task(name: &str, t: &TaskSpec) -> Result<(), (String, String)> {
    check_ident("task name", name).map_err(|e| ("name".to_owned(), e.to_string()))?;
    if !t.versions.is_empty() {
        if t.module.contains('@') || t.module.starts_with("b3:") || t.local_path().is_some() {
            return Err((
                "module".into(),
                format!("with `versions`, `module` is a bare name (not {:?}); the split names the versions", t.module),
            ));
        }
        let split = t.split().map_err(|e| ("versions".to_owned(), e))?;
        let mut sum = 0.0;
        for (v, share) in &split {
            if !(share.is_finite() && *share > 0.0 && *share <= 1.0) {
                return Err(("versions".into(), format!("the share of {v} is {share}; shares are in (0, 1]")));
            }
            sum += share;
        }
        if (sum - 1.0).abs() > 1e-9 {
            return Err(("versions".into(), format!("the shares sum to {sum}, not 1")));
        }
    }
    if t.local_path().is_none() {
        t.references().map_err(|e| ("module".to_owned(), e))?;
    }
    if !t.config.is_object() {
        return Err(("config".into(), "must be a mapping".into()));
    }
    for d in &t.datasets {
        check_ident("dataset", d).map_err(|e| ("datasets".to_owned(), e.to_string()))?;
    }
    for (k, v) in &t.labels {
        check_ident("label name", k).map_err(|e| ("labels".to_owned(), e.to_string()))?;
        check_ident("label value", v).map_err(|e| ("labels".to_owned(), e.to_string()))?;
    }
    if let Maximum::Fraction(f) = t.maximum
        && !(f > 0.0 && f <= 1.0)
    {
        return Err(("maximum".into(), format!("the fraction {f} is not in (0, 1]")));
    }
    if let Maximum::Count(0) = t.maximum {
        return Err(("maximum".into(), "a count is at least 1".into()));
    }
    if t.min_nodes == 0 {
        return Err(("min_nodes".into(), "must be at least 1".into()));
    }
    if let Maximum::Count(n) = t.maximum
        && t.min_nodes > n
    {
        return Err(("min_nodes".into(), format!("{} is more than `maximum` {n}", t.min_nodes)));
    }
    if let Some(s) = t.timeout_secs
        && !(s.is_finite() && s > 0.0 && s <= 86_400.0 * 7.0)
    {
        return Err(("timeout_secs".into(), "must be a positive number of seconds, at most a week".into()));
    }
    if t.retries > 100 {
        return Err(("retries".into(), "at most 100".into()));
    }
    Ok(())
}

impl RawSpec {
    fn check(self) -> Result<SwarmSpec, SpecError> {
        let source = self.source;
        // A Python swarm names lines of its own file.
        let err = |at: At, field: &str, message: String| {
            let (file, line, column) = match &source {
                Some(s) => {
                    let key = field.split('.').take(2).collect::<Vec<_>>().join(".");
                    (Some(s.file.clone()), s.lines.get(field).or_else(|| s.lines.get(&key)).copied(), None)
                }
                None => (None, at.line, at.column),
            };
            SpecError { file, line, column, field: Some(field.to_owned()), message }
        };
        let tasks_at = At::of(&self.tasks);
        if self.tasks.value.is_empty() {
            return Err(err(tasks_at, "tasks", "a swarm needs at least one task".into()));
        }
        if self.tasks.value.len() > MAX_TASKS {
            return Err(err(tasks_at, "tasks", format!("at most {MAX_TASKS} tasks")));
        }
        let flow_at = At::of(&self.flow);
        let (edges, mentioned) = flow::parse(&self.flow.value.0).map_err(|m| err(flow_at, "flow", m))?;
        let mut tasks = BTreeMap::new();
        let mut task_at = BTreeMap::new();
        let mut lines = BTreeMap::new();
        for (name, raw) in self.tasks.value {
            let at = At::of(&raw);
            let field = |f: &str| format!("tasks.{name}.{f}");
            check_ident("task name", &name).map_err(|e| err(at, &format!("tasks.{name}"), e.to_string()))?;
            let r = raw.value;
            let method = r.method.unwrap_or(Method::All);
            let maximum = r.maximum.as_ref().map(|m| m.value.0).unwrap_or(match method {
                Method::All => Maximum::Unlimited,
                Method::Any | Method::Random => Maximum::Count(1),
            });
            let spec = TaskSpec {
                module: r.module.value.clone(),
                versions: r.versions.as_ref().map(|v| v.value.clone()).unwrap_or_default(),
                config: r.config.as_ref().map(|c| c.value.clone()).unwrap_or_else(empty_map),
                method,
                maximum,
                gpu: r.gpu,
                labels: r.labels,
                datasets: r.datasets.as_ref().map(|d| d.value.clone()).unwrap_or_default(),
                inputs: r.inputs,
                min_nodes: r.min_nodes.as_ref().map_or(1, |m| m.value),
                timeout_secs: r.timeout_secs.as_ref().map(|t| t.value),
                retries: r.retries.as_ref().map_or(
                    match method {
                        Method::All => 0,
                        Method::Any | Method::Random => 2,
                    },
                    |t| t.value,
                ),
            };
            if let Err((f, m)) = check_task(&name, &spec) {
                let at = match f.as_str() {
                    "module" => At::of(&r.module),
                    "versions" => r.versions.as_ref().map_or(at, At::of),
                    "config" => r.config.as_ref().map_or(at, At::of),
                    "maximum" => r.maximum.as_ref().map_or(at, At::of),
                    "datasets" => r.datasets.as_ref().map_or(at, At::of),
                    "min_nodes" => r.min_nodes.as_ref().map_or(at, At::of),
                    "timeout_secs" => r.timeout_secs.as_ref().map_or(at, At::of),
                    "retries" => r.retries.as_ref().map_or(at, At::of),
                    _ => at,
                };
                return Err(err(at, &field(&f), m));
            }
            let written = match &source {
                Some(s) => {
                    s.lines.get(&format!("tasks.{name}")).map(|&line| SourceLine { file: Some(s.file.clone()), line })
                }
                None => At::of(&r.module).line.map(|line| SourceLine { file: None, line }),
            };
            if let Some(w) = written {
                lines.insert(format!("tasks.{name}"), w);
            }
            task_at.insert(name.clone(), at);
            tasks.insert(name, spec);
        }
        let names: Vec<String> = tasks.keys().cloned().collect();
        let scheduler = match &self.scheduler {
            Some(s) => {
                if !tasks.contains_key(&s.value) {
                    return Err(err(
                        At::of(s),
                        "scheduler",
                        format!("unknown task `{}` (tasks: {})", s.value, names.join(", ")),
                    ));
                }
                Some(s.value.clone())
            }
            None => tasks.contains_key("scheduler").then(|| "scheduler".to_owned()),
        };
        if let Some(unknown) = mentioned.iter().find(|t| !tasks.contains_key(*t)) {
            return Err(err(flow_at, "flow", format!("unknown task `{unknown}` (tasks: {})", names.join(", "))));
        }
        if let Some(name) = names.iter().find(|n| !mentioned.contains(n)) {
            return Err(err(task_at[name], &format!("tasks.{name}"), format!("task `{name}` is not in the flow")));
        }
        flow::check(&names, &edges, scheduler.as_deref()).map_err(|m| err(flow_at, "flow", m))?;
        let iterations = match &self.iterations {
            Some(i) if i.value == 0 || i.value > MAX_ITERATIONS => {
                return Err(err(At::of(i), "iterations", format!("must be between 1 and {MAX_ITERATIONS}")));
            }
            Some(i) => i.value,
            None if scheduler.is_some() => 100,
            None => 1,
        };
        let globals_at = self.globals.as_ref().map_or(tasks_at, At::of);
        let globals = match self.globals {
            None => serde_json::Map::new(),
            Some(g) => match g.value {
                Value::Object(m) => m,
                Value::Null => serde_json::Map::new(),
                _ => return Err(err(At::of(&g), "globals", "must be a mapping of names to values".into())),
            },
        };
        for k in globals.keys() {
            tessera_core::name::check_key("global name", k)
                .map_err(|e| err(globals_at, &format!("globals.{k}"), e.to_string()))?;
        }
        let timeout_secs = match &self.timeout_secs {
            Some(t) if !(t.value.is_finite() && t.value > 0.0 && t.value <= 86_400.0 * 7.0) => {
                return Err(err(
                    At::of(t),
                    "timeout_secs",
                    "must be a positive number of seconds, at most a week".into(),
                ));
            }
            Some(t) => t.value,
            None => 300.0,
        };
        if let Some(p) = &self.publish_as {
            p.value.parse::<ModulePath>().map_err(|e| err(At::of(p), "publish_as", e.to_string()))?;
        }
        if let Some(n) = &self.name
            && (n.value.is_empty() || n.value.len() > 128)
        {
            return Err(err(At::of(n), "name", "a name has 1 to 128 characters".into()));
        }
        let spec = SwarmSpec {
            name: self.name.map(|n| n.value),
            tasks,
            flow: edges,
            scheduler,
            iterations,
            globals,
            seed: self.seed,
            timeout_secs,
            publish_as: self.publish_as.map(|p| p.value),
            lines,
        };
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANTA: &str = "\
tasks:
  worker:
    module: fl.manta.worker@0.1.0
    method: all
    datasets: [digits]
  aggregator:
    module: fl.manta.aggregator@0.1.0
    method: any
    maximum: 1
  scheduler:
    module: fl.manta.scheduler@0.1.0
    method: any
    maximum: 1
flow: worker -> aggregator -> scheduler
iterations: 30
globals:
  target_accuracy: 0.9
";

    #[test]
    fn reads_a_manta_swarm() {
        let s = SwarmSpec::from_yaml(MANTA).unwrap();
        assert_eq!(s.stages(), ["worker", "aggregator", "scheduler"]);
        assert_eq!(s.scheduler.as_deref(), Some("scheduler"));
        assert_eq!(s.iterations, 30);
        assert_eq!(s.tasks["worker"].maximum, Maximum::Unlimited);
        assert_eq!(s.tasks["aggregator"].maximum, Maximum::Count(1));
        assert_eq!(s.feeds("aggregator"), ["worker"]);
        assert_eq!(s.globals["target_accuracy"], 0.9);
        s.validate().unwrap();
        // Stored and read back, the same.
        let again: SwarmSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(again, s);
        // A list of names is one chain; a list of chains is a graph.
        let listed = MANTA.replace("flow: worker -> aggregator -> scheduler", "flow: [worker, aggregator, scheduler]");
        assert_eq!(SwarmSpec::from_yaml(&listed).unwrap().flow, s.flow);
    }

    #[test]
    fn maximum_is_a_count_or_a_fraction() {
        let with = |m: &str| {
            SwarmSpec::from_yaml(&MANTA.replace("method: all\n", &format!("method: all\n    maximum: {m}\n")))
        };
        assert_eq!(with("3").unwrap().tasks["worker"].maximum, Maximum::Count(3));
        assert_eq!(with("0.5").unwrap().tasks["worker"].maximum, Maximum::Fraction(0.5));
        assert_eq!(with("-1").unwrap().tasks["worker"].maximum, Maximum::Unlimited);
        assert_eq!(Maximum::Fraction(0.5).of(5), 3);
        assert_eq!(Maximum::Fraction(0.01).of(5), 1);
        assert_eq!(Maximum::Count(9).of(5), 5);
        for bad in ["1.5", "0", "-2", "0.0", ".nan"] {
            let e = with(bad).unwrap_err();
            assert_eq!(e.line, Some(5), "{bad}: {e}");
            assert!(e.to_string().starts_with("line 5"), "{bad}: {e}");
        }
        assert!(with("1.5").unwrap_err().to_string().contains("fraction"));
    }

    #[test]
    fn bad_files_name_the_line() {
        let cases: &[(&str, &str, usize, &str)] = &[
            (
                "flow: worker -> aggregator -> scheduler",
                "flow: worker -> aggregater -> scheduler",
                14,
                "unknown task `aggregater`",
            ),
            ("flow: worker -> aggregator -> scheduler", "flow: worker -> aggregator", 11, "not in the flow"),
            ("module: fl.manta.aggregator@0.1.0", "module: Not A Module", 7, "tasks.aggregator.module"),
            ("    maximum: 1\n  scheduler", "    maximum: 1.5\n  scheduler", 9, "fraction"),
            ("iterations: 30", "iterations: 0", 15, "iterations"),
            ("    method: all\n", "    method: everywhere\n", 4, "method"),
            ("    datasets: [digits]\n", "    datasets: [digits]\n    colour: red\n", 6, "colour"),
        ];
        for (from, to, line, word) in cases {
            let text = MANTA.replace(from, to);
            assert_ne!(text, MANTA, "{to}");
            let e = SwarmSpec::from_yaml(&text).unwrap_err();
            assert_eq!(e.line, Some(*line), "{to}: {e}");
            assert!(e.to_string().contains(word), "{to}: {e}");
        }
    }

    #[test]
    fn a_cycle_needs_a_scheduler() {
        let cyc = "tasks:\n  a: {module: x.a@1.0.0}\n  b: {module: x.b@1.0.0}\nflow: [a -> b, b -> a]\n";
        let e = SwarmSpec::from_yaml(cyc).unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("cycle") && e.message.contains("scheduler"), "{e}");
        // With b as the scheduler, b -> a carries b's outputs into the next iteration.
        let s = SwarmSpec::from_yaml(&format!("{cyc}scheduler: b\n")).unwrap();
        assert_eq!(s.stages(), ["a", "b"]);
        assert_eq!(s.carried("a"), ["b"]);
        assert!(s.feeds("a").is_empty());
        assert_eq!(s.iterations, 100);
    }

    #[test]
    fn version_splits_sum_to_one() {
        let base = "tasks:\n  w:\n    module: x.w\n    method: all\n    versions: {1.0.0: 0.8, 1.1.0: 0.2}\nflow: w\n";
        let s = SwarmSpec::from_yaml(base).unwrap();
        let refs = s.tasks["w"].references().unwrap();
        assert_eq!(refs.iter().map(|r| r.to_string()).collect::<Vec<_>>(), ["x.w@1.0.0", "x.w@1.1.0"]);
        let e = SwarmSpec::from_yaml(&base.replace("0.2}", "0.1}")).unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.message.contains("sum to 0.9"), "{e}");
        let e = SwarmSpec::from_yaml(&base.replace("x.w\n", "x.w@1.0.0\n")).unwrap_err();
        assert!(e.message.contains("bare name"), "{e}");
        let e = SwarmSpec::from_yaml(&base.replace("1.1.0:", "banana:")).unwrap_err();
        assert!(e.message.contains("semver"), "{e}");
    }

    #[test]
    fn modules_are_references_or_folders() {
        let s = SwarmSpec::from_yaml("tasks:\n  t: {module: ./worker}\nflow: t\n").unwrap();
        assert_eq!(s.tasks["t"].local_path(), Some("./worker"));
        for ok in
            ["a.b@^1.2", "a.b@stable", "a.b", "b3:0000000000000000000000000000000000000000000000000000000000000000"]
        {
            SwarmSpec::from_yaml(&format!("tasks:\n  t: {{module: \"{ok}\"}}\nflow: t\n")).unwrap();
        }
    }

    #[test]
    fn python_swarms_name_lines_of_their_file() {
        let json = r#"{"tasks": {"w": {"module": "Bad Name"}}, "flow": "w",
            "source": {"file": "swarm.py", "lines": {"tasks.w": 12}}}"#;
        let e = SwarmSpec::from_yaml(json).unwrap_err();
        assert!(e.to_string().starts_with("swarm.py line 12: tasks.w.module: invalid module path \"Bad Name\""), "{e}");
    }

    #[test]
    fn hostile_files_are_refused() {
        assert!(SwarmSpec::from_yaml(&"#".repeat(MAX_SPEC_BYTES + 1)).is_err());
        let many: String = (0..100).map(|i| format!("  t{i}: {{module: a.b@1.0.0}}\n")).collect();
        assert!(SwarmSpec::from_yaml(&format!("tasks:\n{many}flow: t0\n")).unwrap_err().message.contains("at most"));
        let e = SwarmSpec::from_yaml("tasks:\n  ../x: {module: a.b@1.0.0}\nflow: ../x\n").unwrap_err();
        assert!(e.to_string().contains("task name"), "{e}");
        let e = SwarmSpec::from_yaml("tasks:\n  t: {module: a.b@1.0.0, timeout_secs: 1e300}\nflow: t\n").unwrap_err();
        assert!(e.to_string().contains("timeout_secs"), "{e}");
        let e =
            SwarmSpec::from_yaml("tasks:\n  t: {module: a.b@1.0.0}\nflow: t\niterations: 99999999999\n").unwrap_err();
        assert!(e.to_string().contains("iterations"), "{e}");
    }
}
