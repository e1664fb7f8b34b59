//! Pipeline files: modules wired together through their queues.
//!
//! Every actor `a` has two queues, `a.in` and `a.out`. A pipeline names its stages (each one
//! an actor, launched from a module when the stage says which) and, for each stage, the
//! stages it takes its items from:
//!
//! - a stage with no `from` is a **source**: its function is called once and returns a list;
//!   each element becomes an item;
//! - a stage with several `from` stages is a **fan-in**: it takes the items of all of them,
//!   one call per item;
//! - a stage read by several stages is **broadcast**: each of them gets every item;
//! - a stage with `join: true` is an **ensemble**: it waits until it holds the same item
//!   from each of its `from` stages and makes one call with the list of their values (in
//!   `from` order).
//!
//! ```yaml
//! name: digits-ensemble
//! capacity: 32
//! stages:
//!   - actor: demo.digits-a
//!     module: demo.digits
//!     function: batch
//!     kwargs: {part: 0}
//!   - actor: demo.scale
//!     function: apply
//!     from: [demo.digits-a]
//!   - actor: demo.vote
//!     function: vote
//!     from: [demo.scale]
//! ```
//!
//! This module parses and checks the file (names, references, cycles); running it is the
//! client's job.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;
use serde_json::Value;

use crate::ModulePath;
use crate::name::check_ident;
use crate::version::PackageRef;

/// The largest pipeline file accepted.
pub const MAX_PIPELINE_BYTES: usize = 256 * 1024;
/// The most stages in a pipeline.
pub const MAX_STAGES: usize = 256;
/// The default bound of each stage's input queue.
pub const DEFAULT_CAPACITY: u64 = 64;

/// Why a pipeline file was refused: where and what.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PipelineError {
    /// Dotted path of the offending field (`stages[2].from`), when known.
    pub field: Option<String>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("pipeline")?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

fn err(field: impl Into<String>, message: impl Into<String>) -> PipelineError {
    PipelineError { field: Some(field.into()), line: None, message: message.into() }
}

/// One stage: an actor, the function called for each item, and where items come from.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    /// The actor's name (`path` or `path-tag`); its queues are `<actor>.in` and `<actor>.out`.
    pub actor: String,
    /// The module to launch the actor from (get-or-create), if the pipeline launches it.
    pub module: Option<PackageRef>,
    /// The tag the actor is launched with (from its name and module path).
    pub tag: Option<String>,
    /// Replicas, when launched.
    pub replicas: usize,
    /// Config merged over the module's default, when launched.
    pub config: Value,
    /// The function called.
    pub function: String,
    /// Extra positional arguments (after the item, for non-sources).
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: serde_json::Map<String, Value>,
    /// The stages it takes items from (none: a source).
    pub from: Vec<String>,
    /// Waits for the item from every `from` stage and calls once with all of them.
    pub join: bool,
}

impl Stage {
    /// True when the stage produces items from nothing.
    pub fn is_source(&self) -> bool {
        self.from.is_empty()
    }
}

/// A checked pipeline: stages in an order where every stage comes after its inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Pipeline {
    /// Its name.
    pub name: String,
    /// The bound of every input queue (puts wait while a queue holds this many).
    pub capacity: u64,
    /// Stages, inputs first.
    pub stages: Vec<Stage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    name: String,
    #[serde(default)]
    capacity: Option<u64>,
    stages: Vec<RawStage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    actor: String,
    #[serde(default)]
    module: Option<String>,
    #[serde(default)]
    replicas: Option<usize>,
    #[serde(default)]
    config: Option<Value>,
    function: String,
    #[serde(default)]
    args: Vec<Value>,
    #[serde(default)]
    kwargs: serde_json::Map<String, Value>,
    #[serde(default)]
    from: Vec<String>,
    #[serde(default)]
    join: bool,
}

/// The queue an actor takes items from.
pub fn in_queue(actor: &str) -> String {
    format!("{actor}.in")
}

/// The queue an actor's results go to.
pub fn out_queue(actor: &str) -> String {
    format!("{actor}.out")
}

/// Splits an actor name into its module path and tag given the module it runs:
/// `demo.model-lr` of `demo.model` has the tag `lr`.
pub fn tag_of(actor: &str, path: &ModulePath) -> Result<Option<String>, String> {
    let p = path.as_str();
    if actor == p {
        return Ok(None);
    }
    match actor.strip_prefix(p).and_then(|rest| rest.strip_prefix('-')) {
        Some(tag) => {
            check_ident("actor tag", tag).map_err(|e| e.to_string())?;
            Ok(Some(tag.to_owned()))
        }
        None => Err(format!("actor {actor:?} is not named after its module: use {p:?} or \"{p}-<tag>\"")),
    }
}

/// Checks an actor name: a module path, optionally followed by `-<tag>`.
pub fn check_actor_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err(format!("{name:?} is not an actor name (1 to 200 characters)"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(format!("{name:?} is not an actor name (letters, digits, '.', '_' and '-')"));
    }
    if name.starts_with(['.', '-']) || name.ends_with(['.', '-']) || name.contains("..") {
        return Err(format!("{name:?} is not an actor name (no empty segments)"));
    }
    Ok(())
}

impl Pipeline {
    /// Parses and checks a pipeline file.
    pub fn parse(text: &str) -> Result<Pipeline, PipelineError> {
        if text.len() > MAX_PIPELINE_BYTES {
            return Err(PipelineError {
                field: None,
                line: None,
                message: format!("the file is {} bytes; the limit is {MAX_PIPELINE_BYTES}", text.len()),
            });
        }
        let path = RefCell::new(None::<String>);
        let raw: Result<RawPipeline, _> =
            serde_saphyr::with_deserializer_from_str_with_options(text, crate::yaml::options(), |de| {
                serde_path_to_error::deserialize(de).map_err(|e| {
                    let p = e.path().to_string();
                    if p != "." && p != "?" && !p.is_empty() {
                        *path.borrow_mut() = Some(p);
                    }
                    e.into_inner()
                })
            });
        let raw = raw.map_err(|e| PipelineError {
            field: path.into_inner(),
            line: crate::yaml::location(&e).map(|l| l.0),
            message: crate::yaml::message(&e),
        })?;
        raw.check()
    }
}

impl RawPipeline {
    fn check(self) -> Result<Pipeline, PipelineError> {
        check_ident("pipeline name", &self.name).map_err(|e| err("name", e.to_string()))?;
        let capacity = self.capacity.unwrap_or(DEFAULT_CAPACITY);
        if !(1..=1_000_000).contains(&capacity) {
            return Err(err("capacity", format!("{capacity}: must be between 1 and 1000000")));
        }
        if self.stages.is_empty() {
            return Err(err("stages", "a pipeline needs at least one stage"));
        }
        if self.stages.len() > MAX_STAGES {
            return Err(err("stages", format!("{} stages; the limit is {MAX_STAGES}", self.stages.len())));
        }
        let mut stages = BTreeMap::new();
        for (i, s) in self.stages.into_iter().enumerate() {
            let f = |field: &str| format!("stages[{i}].{field}");
            check_actor_name(&s.actor).map_err(|m| err(f("actor"), m))?;
            check_ident("function name", &s.function).map_err(|e| err(f("function"), e.to_string()))?;
            let (module, tag) = match &s.module {
                None => (None, None),
                Some(m) => {
                    let r: PackageRef = m.parse().map_err(|e| err(f("module"), format!("{m:?}: {e}")))?;
                    let tag = match &r {
                        PackageRef::Digest(_) | PackageRef::Component { .. } => None,
                        PackageRef::Named { name, .. } => tag_of(&s.actor, name).map_err(|m| err(f("actor"), m))?,
                    };
                    (Some(r), tag)
                }
            };
            let replicas = s.replicas.unwrap_or(1);
            if !(1..=64).contains(&replicas) {
                return Err(err(f("replicas"), format!("{replicas}: must be between 1 and 64")));
            }
            let config = match s.config {
                None | Some(Value::Null) => Value::Object(Default::default()),
                Some(c @ Value::Object(_)) if module.is_some() => c,
                Some(Value::Object(_)) => return Err(err(f("config"), "config needs `module` (it is used to launch)")),
                Some(_) => return Err(err(f("config"), "the config must be a mapping")),
            };
            let mut seen = BTreeSet::new();
            for (j, from) in s.from.iter().enumerate() {
                if !seen.insert(from) {
                    return Err(err(format!("stages[{i}].from[{j}]"), format!("{from:?} is listed twice")));
                }
                if from == &s.actor {
                    return Err(err(format!("stages[{i}].from[{j}]"), "a stage cannot take its own items"));
                }
            }
            if s.join && s.from.len() < 2 {
                return Err(err(f("join"), "a join needs at least two stages in `from`"));
            }
            let stage = Stage {
                actor: s.actor.clone(),
                module,
                tag,
                replicas,
                config,
                function: s.function,
                args: s.args,
                kwargs: s.kwargs,
                from: s.from,
                join: s.join,
            };
            if stages.insert(s.actor.clone(), (i, stage)).is_some() {
                return Err(err(f("actor"), format!("{:?} is the actor of two stages", s.actor)));
            }
        }
        for (i, s) in stages.values() {
            for (j, from) in s.from.iter().enumerate() {
                if !stages.contains_key(from) {
                    return Err(err(format!("stages[{i}].from[{j}]"), format!("no stage has the actor {from:?}")));
                }
            }
        }
        // Order stages so each comes after its inputs (Kahn), refusing cycles.
        let mut order = Vec::with_capacity(stages.len());
        let mut done = BTreeSet::new();
        while order.len() < stages.len() {
            let ready: Vec<String> = stages
                .iter()
                .filter(|(a, (_, s))| !done.contains(*a) && s.from.iter().all(|f| done.contains(f)))
                .map(|(a, _)| a.clone())
                .collect();
            if ready.is_empty() {
                let stuck: Vec<&String> = stages.keys().filter(|a| !done.contains(*a)).collect();
                return Err(err("stages", format!("the stages {stuck:?} form a cycle")));
            }
            let mut ready: Vec<(usize, String)> = ready.into_iter().map(|a| (stages[&a].0, a)).collect();
            ready.sort();
            for (_, a) in ready {
                done.insert(a.clone());
                order.push(a);
            }
        }
        let mut by_actor = stages;
        let stages = order.iter().map(|a| by_actor.remove(a).expect("ordered from the map").1).collect();
        Ok(Pipeline { name: self.name, capacity, stages })
    }
}

impl Pipeline {
    /// The stages that read `actor`'s items.
    pub fn consumers(&self, actor: &str) -> Vec<&Stage> {
        self.stages.iter().filter(|s| s.from.iter().any(|f| f == actor)).collect()
    }

    /// The stage of `actor`.
    pub fn stage(&self, actor: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.actor == actor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
name: ensemble
capacity: 8
stages:
  - actor: demo.vote
    module: demo.vote
    function: vote
    from: [demo.model-a, demo.model-b]
    join: true
  - actor: demo.data-1
    module: demo.data@0.1.0
    function: items
    kwargs: {part: 1}
  - actor: demo.data-2
    module: demo.data
    function: items
  - actor: demo.scale
    function: apply
    from: [demo.data-1, demo.data-2]
  - actor: demo.model-a
    module: demo.model
    config: {kind: knn}
    function: predict
    from: [demo.scale]
  - actor: demo.model-b
    module: demo.model
    replicas: 2
    function: predict
    from: [demo.scale]
";

    #[test]
    fn parses_and_orders_a_pipeline() {
        let p = Pipeline::parse(GOOD).unwrap();
        assert_eq!(p.capacity, 8);
        let order: Vec<&str> = p.stages.iter().map(|s| s.actor.as_str()).collect();
        assert_eq!(order, ["demo.data-1", "demo.data-2", "demo.scale", "demo.model-a", "demo.model-b", "demo.vote"]);
        let d1 = p.stage("demo.data-1").unwrap();
        assert!(d1.is_source());
        assert_eq!(d1.tag.as_deref(), Some("1"));
        assert_eq!(d1.kwargs["part"], 1);
        assert_eq!(p.stage("demo.model-b").unwrap().replicas, 2);
        assert_eq!(p.stage("demo.model-a").unwrap().config["kind"], "knn");
        assert_eq!(p.stage("demo.vote").unwrap().tag, None);
        assert!(p.stage("demo.vote").unwrap().join);
        assert_eq!(p.stage("demo.scale").unwrap().module, None);
        let consumers: Vec<&str> = p.consumers("demo.scale").iter().map(|s| s.actor.as_str()).collect();
        assert_eq!(consumers, ["demo.model-a", "demo.model-b"]);
        assert_eq!(in_queue("demo.scale"), "demo.scale.in");
        assert_eq!(out_queue("demo.scale"), "demo.scale.out");
    }

    fn refused(text: &str) -> PipelineError {
        Pipeline::parse(text).unwrap_err()
    }

    #[test]
    fn refuses_bad_files_naming_the_problem() {
        let head = "name: p\nstages:\n";
        let cases: &[(&str, &str, &str)] = &[
            ("name: p\nstages: []\n", "stages", "at least one stage"),
            ("name: 'a b'\nstages:\n  - {actor: a.b, function: f}\n", "name", "only letters"),
            ("name: p\ncapacity: 0\nstages:\n  - {actor: a.b, function: f}\n", "capacity", "between 1"),
            (&format!("{head}  - {{actor: a.b, function: f, from: [x.y]}}\n"), "stages[0].from[0]", "no stage"),
            (&format!("{head}  - {{actor: a.b, function: f, from: [a.b]}}\n"), "stages[0].from[0]", "its own"),
            (
                &format!("{head}  - {{actor: a.b, function: f}}\n  - {{actor: a.b, function: g}}\n"),
                "stages[1].actor",
                "two stages",
            ),
            (
                &format!(
                    "{head}  - {{actor: a.b, function: f, from: [c.d]}}\n  - {{actor: c.d, function: f, from: [a.b]}}\n"
                ),
                "stages",
                "cycle",
            ),
            (&format!("{head}  - {{actor: a.b, function: f, join: true, from: []}}\n"), "stages[0].join", "two"),
            (&format!("{head}  - {{actor: a.b, module: x.y, function: f}}\n"), "stages[0].actor", "not named after"),
            (&format!("{head}  - {{actor: a.b-c!, module: a.b, function: f}}\n"), "stages[0].actor", "actor name"),
            (&format!("{head}  - {{actor: a.b, module: 'a.b@'}}\n"), "", ""),
            (&format!("{head}  - {{actor: a.b, function: 'f g'}}\n"), "stages[0].function", "only letters"),
            (&format!("{head}  - {{actor: a.b, function: f, replicas: 0}}\n"), "stages[0].replicas", "between"),
            (&format!("{head}  - {{actor: a.b, function: f, colour: red}}\n"), "", "colour"),
            (&format!("{head}  - {{actor: '..', function: f}}\n"), "stages[0].actor", "actor name"),
            (
                &format!("{head}  - {{actor: a.b, module: a.b, function: f, config: [1]}}\n"),
                "stages[0].config",
                "mapping",
            ),
            (&format!("{head}  - {{actor: a.b, function: f, config: {{x: 1}}}}\n"), "stages[0].config", "module"),
        ];
        for (text, field, message) in cases {
            let e = refused(text);
            if !field.is_empty() {
                assert_eq!(e.field.as_deref(), Some(*field), "{text}: {e}");
            }
            assert!(e.message.contains(message), "{text}: {e}");
        }
    }

    #[test]
    fn hostile_input_is_refused_cleanly() {
        let huge = "a".repeat(MAX_PIPELINE_BYTES + 1);
        assert!(refused(&huge).message.contains("limit"));
        for text in ["", "[]", "name: [1, 2]", "{{{{", "name: p\nname: q\nstages: []", "\u{0}\u{1}", "*x"] {
            let e = refused(text);
            assert!(!e.message.is_empty(), "{text:?}");
        }
        let many = format!(
            "name: p\nstages:\n{}",
            (0..=MAX_STAGES).map(|i| format!("  - {{actor: a.s{i}, function: f}}\n")).collect::<String>()
        );
        assert!(refused(&many).message.contains("limit"));
        // Deeply nested kwargs parse or fail; they never overflow the stack.
        let deep = format!(
            "name: p\nstages:\n  - {{actor: a.b, function: f, kwargs: {{x: {}1{}}}}}\n",
            "[".repeat(2000),
            "]".repeat(2000)
        );
        let _ = Pipeline::parse(&deep);
    }

    #[test]
    fn line_numbers_point_at_the_problem() {
        let e = refused("name: p\nstages:\n  - actor: a.b\n    function: f\n    replicas: many\n");
        assert_eq!(e.line, Some(5), "{e}");
    }
}
