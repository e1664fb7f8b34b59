//! The orchestrator's semantics on DFFML's own examples and on hostile flow files. The
//! operations run in this process through a small network of Rust functions, so what is
//! checked is the orchestration: which parameter sets form, run once, wait for locks.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use tessera_dataflow::{DataFlow, DataflowError, Operation, OperationNetwork, Orchestrator, ResultCache};

const CALC: &str = "\
definitions:
  calc_string: {type: str}
  is_add: {type: bool}
  is_mult: {type: bool}
  numbers: {type: json}
  result: {type: int}
operations:
  parse:
    module: calc.ops@0.1.0
    function: parse
    inputs: {line: calc_string}
    outputs: {add: is_add, mult: is_mult, numbers: numbers}
  add:
    module: calc.ops@0.1.0
    function: add
    inputs: {numbers: numbers}
    outputs: {sum: result}
    conditions: [is_add]
  mult:
    module: calc.ops@0.1.0
    function: mult
    inputs: {numbers: numbers}
    outputs: {product: result}
    conditions: [is_mult]
inputs: [calc_string]
output: {get_single: [result]}
";

/// DFFML's calculator operations, and a few more, as plain functions; counts what runs at
/// once per value.
#[derive(Default)]
struct Calc {
    busy: Mutex<BTreeMap<String, (usize, usize)>>, // value -> (now, most at once)
    called: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl OperationNetwork for Calc {
    async fn run(
        &self,
        _: &str,
        op: &Operation,
        _: &BTreeMap<String, tessera_dataflow::Definition>,
        inputs: BTreeMap<String, Value>,
    ) -> Result<BTreeMap<String, Value>, String> {
        let num = |v: &Value| v.as_i64().ok_or("not a number");
        self.called.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(match op.function.as_str() {
            "parse" => {
                let line = inputs["line"].as_str().unwrap_or_default();
                let numbers: Vec<i64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
                BTreeMap::from([
                    ("add".into(), json!(line.starts_with("add"))),
                    ("mult".into(), json!(line.starts_with("multiply"))),
                    ("numbers".into(), json!(numbers)),
                ])
            }
            "add" | "mult" => {
                let ns: Vec<i64> =
                    inputs["numbers"].as_array().ok_or("no numbers")?.iter().map(num).collect::<Result<_, _>>()?;
                let (key, v) = if op.function == "add" {
                    ("sum", ns.iter().sum::<i64>())
                } else {
                    ("product", ns.iter().product::<i64>())
                };
                BTreeMap::from([(key.into(), json!(v))])
            }
            "pair" => BTreeMap::from([("out".into(), json!(format!("{}{}", inputs["a"], inputs["b"])))]),
            "clamp" => BTreeMap::from([("age".into(), json!(num(&inputs["age"])?.min(120)))]),
            "double" => BTreeMap::from([("twice".into(), json!(num(&inputs["age"])? * 2))]),
            "hold" => {
                let key = inputs["x"].to_string();
                {
                    let mut b = self.busy.lock().unwrap();
                    let e = b.entry(key.clone()).or_default();
                    e.0 += 1;
                    e.1 = e.1.max(e.0);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                self.busy.lock().unwrap().get_mut(&key).unwrap().0 -= 1;
                BTreeMap::from([("done".into(), json!(true))])
            }
            other => return Err(format!("no function {other}")),
        })
    }

    /// The module reference stands for the code's digest here.
    fn implementation(&self, _: &str, op: &Operation) -> Option<String> {
        Some(op.module.clone())
    }
}

async fn run(flow: &DataFlow, line: &str) -> tessera_dataflow::ContextResult {
    let net = Calc::default();
    Orchestrator::new(flow, &net).run_context(vec![("calc_string".into(), json!(line))]).await.unwrap()
}

#[tokio::test]
async fn the_calculator_adds_and_multiplies_by_condition() {
    let flow = DataFlow::from_yaml(CALC).unwrap();
    let r = run(&flow, "add 40 and 2").await;
    assert_eq!(r.single["result"], json!(42));
    assert_eq!(r.runs, BTreeMap::from([("add".to_string(), 1), ("parse".to_string(), 1)]), "mult's condition is false");
    let r = run(&flow, "multiply 42 and 10").await;
    assert_eq!(r.single["result"], json!(420));
    assert_eq!(r.runs.get("add"), None);
    // Contexts are independent: each starts from its own inputs.
    let net = Calc::default();
    let o = Orchestrator::new(&flow, &net);
    let (a, b) = tokio::join!(
        o.run_context(vec![("calc_string".into(), json!("add 1 and 2"))]),
        o.run_context(vec![("calc_string".into(), json!("multiply 3 and 4"))])
    );
    assert_eq!((a.unwrap().single["result"].clone(), b.unwrap().single["result"].clone()), (json!(3), json!(12)));
    // A value of the wrong type, or of a definition the flow does not take, is refused.
    let e = o.run_context(vec![("calc_string".into(), json!(7))]).await.unwrap_err();
    assert!(matches!(e, DataflowError::Value(_)), "{e}");
    let e = o.run_context(vec![("result".into(), json!(7))]).await.unwrap_err();
    assert!(e.to_string().contains("not an input"), "{e}");
}

const PAIRS: &str = "\
definitions:
  num: {type: int}
  text: {type: str}
operations:
  pair: {module: t.ops@1.0.0, function: pair, inputs: {a: num, b: num}, outputs: {out: text}}
inputs: [num]
output: {get_multi: [text]}
";

#[tokio::test]
async fn every_parameter_set_runs_once() {
    let flow = DataFlow::from_yaml(PAIRS).unwrap();
    let net = Calc::default();
    let r = Orchestrator::new(&flow, &net)
        .run_context(vec![("num".into(), json!(1)), ("num".into(), json!(2))])
        .await
        .unwrap();
    // (1,1) (1,2) (2,1) (2,2), each once.
    assert_eq!(r.runs["pair"], 4);
    let mut texts: Vec<String> = r.multi["text"].iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    texts.sort();
    assert_eq!(texts, ["11", "12", "21", "22"]);
}

#[tokio::test]
async fn fan_out_beyond_the_limit_is_refused() {
    let flow = DataFlow::from_yaml(PAIRS).unwrap();
    let net = Calc::default();
    let many: Vec<(String, Value)> = (0..400).map(|i| ("num".to_string(), json!(i))).collect();
    let e = Orchestrator::new(&flow, &net).run_context(many).await.unwrap_err();
    assert!(matches!(e, DataflowError::FanOut { count: 160_000, .. }), "{e}");
}

fn holds(lock: bool) -> String {
    format!(
        "definitions:\n  res: {{type: str, lock: {lock}}}\n  done: {{type: bool}}\noperations:\n  \
         one: {{module: t.ops@1.0.0, function: hold, inputs: {{x: res}}, outputs: {{done: done}}}}\n  \
         two: {{module: t.ops@1.0.0, function: hold, inputs: {{x: res}}, outputs: {{done: done}}}}\n\
         inputs: [res]\noutput: {{get_multi: [done]}}\n"
    )
}

#[tokio::test]
async fn a_locked_value_is_used_by_one_operation_at_a_time() {
    for (lock, most) in [(true, 1), (false, 2)] {
        let flow = DataFlow::from_yaml(&holds(lock)).unwrap();
        let net = Calc::default();
        let r = Orchestrator::new(&flow, &net).run_context(vec![("res".into(), json!("gpu-0"))]).await.unwrap();
        assert_eq!(r.multi["done"].len(), 2, "both ran");
        assert_eq!(net.busy.lock().unwrap()["\"gpu-0\""].1, most, "lock: {lock}");
    }
}

#[tokio::test]
async fn values_go_through_their_validation_operation() {
    let flow = DataFlow::from_yaml(
        "definitions:\n  age: {type: int, validate: clamp}\n  twice: {type: int}\noperations:\n  \
         clamp: {module: t.ops@1.0.0, function: clamp, inputs: {age: age}, outputs: {age: age}}\n  \
         double: {module: t.ops@1.0.0, function: double, inputs: {age: age}, outputs: {twice: twice}}\n\
         inputs: [age]\noutput: {get_single: [twice]}\n",
    )
    .unwrap();
    let net = Calc::default();
    let r = Orchestrator::new(&flow, &net).run_context(vec![("age".into(), json!(500))]).await.unwrap();
    assert_eq!(r.single["twice"], json!(240));
    assert_eq!(r.runs.get("clamp"), None, "a validator runs on values as they arrive, not as an operation");
}

#[test]
fn hostile_flow_files_are_refused_naming_the_line() {
    let cases = [
        // (the change to the calculator, the line, what the error says); an error about
        // an operation names the line the operation starts on
        (CALC.to_string() + "flow:\n  add: {conditions: [parse.numbers]}\n", 28, "type mismatch"),
        (CALC.to_string() + "flow:\n  divide: {numbers: [parse.numbers]}\n", 28, "unknown operation `divide`"),
        // Values keep their definition: wiring another one of the same type is refused too.
        (
            CALC.replace("  result: {type: int}\n", "  result: {type: int}\n  other: {type: json}\n").replace(
                "inputs: {numbers: numbers}\n    outputs: {sum",
                "inputs: {numbers: other}\n    outputs: {sum",
            ) + "flow:\n  add: {numbers: [parse.numbers]}\n",
            29,
            "its own definition",
        ),
        (
            CALC.replace("inputs: {numbers: numbers}\n    outputs: {sum: result}", "outputs: {sum: result}"),
            14,
            "at least one input",
        ),
        (CALC.replace("inputs: [calc_string]\n", ""), 9, "can never run"),
        (CALC.replace("conditions: [is_mult]", "conditions: [numbers]"), 20, "not a bool"),
        (
            CALC.replace(
                "inputs: {numbers: numbers}\n    outputs: {sum: result}",
                "inputs: {numbers: numberz}\n    outputs: {sum: result}",
            ),
            14,
            "unknown definition `numberz`",
        ),
        (CALC.replace("function: parse", "function: parse\n    retries: 3"), 11, "unknown field"),
        (CALC.replace("module: calc.ops@0.1.0\n    function: add", "module: ../calc\n    function: add"), 14, "module"),
    ];
    for (i, (text, line, what)) in cases.iter().enumerate() {
        let e = DataFlow::from_yaml(text).unwrap_err();
        assert!(e.to_string().contains(what), "case {i}: {e}");
        assert_eq!(e.line, Some(*line), "case {i}: {e}");
    }
    // Operations feeding each other with nothing to stop them.
    let cycle = "definitions:\n  n: {type: int}\noperations:\n  \
                 inc: {module: t.ops@1.0.0, function: inc, inputs: {n: n}, outputs: {n: n}}\n\
                 inputs: [n]\noutput: {get_single: [n]}\n";
    let e = DataFlow::from_yaml(cycle).unwrap_err();
    assert!(e.to_string().contains("inc -> inc") && e.line == Some(4), "{e}");
    // The same cycle with a condition is a loop the flow can end.
    let guarded = cycle
        .replace("outputs: {n: n}}", "outputs: {n: n}, conditions: [more]}")
        .replace("  n: {type: int}\n", "  n: {type: int}\n  more: {type: bool}\n")
        .replace("inputs: [n]", "inputs: [n, more]");
    assert!(DataFlow::from_yaml(&guarded).is_ok());
    assert!(DataFlow::from_yaml(&"#".repeat(300_000)).is_err());
    // A fan-out the seed alone makes too big: 400 x 400 parameter sets.
    let seeds: String = (0..400).map(|i| format!("  - num: {i}\n")).collect();
    let fan = PAIRS.replace("inputs: [num]\n", &format!("seed:\n{seeds}"));
    let e = DataFlow::from_yaml(&fan).unwrap_err();
    assert!(e.to_string().contains("160000 parameter sets") && e.line == Some(5), "{e}");
}

#[test]
fn the_calculator_as_a_graph() {
    use tessera_dataflow::graph::{Format, edges, render};
    let flow = DataFlow::from_yaml(CALC).unwrap();
    let e: Vec<(String, String, String)> = edges(&flow);
    let has = |f: &str, t: &str, l: &str| e.iter().any(|x| x == &(f.to_string(), t.to_string(), l.to_string()));
    assert!(has("inputs", "parse", "calc_string"));
    assert!(has("parse", "add", "numbers") && has("parse", "add", "is_add?"));
    assert!(has("parse", "mult", "is_mult?"));
    assert!(!has("parse", "add", "is_mult?"), "{e:?}");
    assert_eq!(e.len(), 5, "{e:?}");
    let mermaid = render(&flow, Format::Mermaid);
    assert!(mermaid.starts_with("flowchart LR\n") && mermaid.contains("    parse -->|numbers| add\n"), "{mermaid}");
    let dot = render(&flow, Format::Dot);
    assert!(dot.contains("\"parse\" -> \"mult\" [label=\"is_mult?\"];") && dot.ends_with("}\n"), "{dot}");
}

#[tokio::test]
async fn values_arriving_later_form_only_the_new_parameter_sets() {
    let flow = DataFlow::from_yaml(
        "definitions:\n  num: {type: int}\n  seedling: {type: int}\n  text: {type: str}\noperations:\n  \
         pair: {module: t.ops@1.0.0, function: pair, inputs: {a: num, b: num}, outputs: {out: text}}\n  \
         grow: {module: t.ops@1.0.0, function: double, inputs: {age: seedling}, outputs: {twice: num}}\n\
         inputs: [num, seedling]\noutput: {get_multi: [text]}\n",
    )
    .unwrap();
    let net = Calc::default();
    let r = Orchestrator::new(&flow, &net)
        .run_context(vec![("num".into(), json!(1)), ("num".into(), json!(2)), ("seedling".into(), json!(5))])
        .await
        .unwrap();
    // {1, 2} first, then 10 from `grow`: every pair of {1, 2, 10} once.
    assert_eq!(r.runs["pair"], 9);
    let mut texts: Vec<String> = r.multi["text"].iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len(), 9, "{texts:?}");
}

/// The calculator with its arithmetic in a subflow: `parse` in the outer flow, `add` and
/// `mult` in `arith.yaml`, forwarded the numbers and both flags.
fn calc_with_subflow(dir: &std::path::Path) -> std::path::PathBuf {
    let arith = CALC
        .replace(
            "  parse:\n    module: calc.ops@0.1.0\n    function: parse\n    inputs: {line: calc_string}\n    \
             outputs: {add: is_add, mult: is_mult, numbers: numbers}\n",
            "",
        )
        .replace("  calc_string: {type: str}\n", "")
        .replace("inputs: [calc_string]", "inputs: [numbers, is_add, is_mult]");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/arith.yaml"), arith).unwrap();
    let outer = "definitions:\n  calc_string: {type: str}\n  is_add: {type: bool}\n  is_mult: {type: bool}\n  \
                 numbers: {type: json}\n  result: {type: int}\noperations:\n  parse:\n    module: calc.ops@0.1.0\n    \
                 function: parse\n    inputs: {line: calc_string}\n    outputs: {add: is_add, mult: is_mult, numbers: numbers}\n  \
                 arith:\n    subflow: sub/arith.yaml\n    inputs: {numbers: numbers, is_add: is_add, is_mult: is_mult}\n    \
                 outputs: {result: result}\ninputs: [calc_string]\noutput: {get_single: [result]}\n";
    std::fs::write(dir.join("calc.yaml"), outer).unwrap();
    dir.join("calc.yaml")
}

#[tokio::test]
async fn a_subflow_runs_a_whole_flow_on_each_parameter_set() {
    let dir = tempfile::tempdir().unwrap();
    let flow = DataFlow::from_file(&calc_with_subflow(dir.path())).unwrap();
    assert!(flow.operations["arith"].subflow.is_some());
    let r = run(&flow, "add 40 and 2").await;
    assert_eq!(r.single["result"], json!(42));
    let want = |pairs: &[(&str, usize)]| pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect::<BTreeMap<_, _>>();
    assert_eq!(
        r.runs,
        want(&[("arith", 1), ("arith.add", 1), ("parse", 1)]),
        "mult's condition is false in the subflow"
    );
    let r = run(&flow, "multiply 42 and 10").await;
    assert_eq!(r.single["result"], json!(420));
    assert_eq!(r.runs, want(&[("arith", 1), ("arith.mult", 1), ("parse", 1)]));
    // A subflow that gives nothing for an output fails the operation, naming it.
    let r = Orchestrator::new(&flow, &Calc::default())
        .run_context(vec![("calc_string".into(), json!("divide 1 by 2"))])
        .await
        .unwrap_err();
    assert!(r.to_string().contains("arith") && r.to_string().contains("gave no `result`"), "{r}");
    let graph = tessera_dataflow::graph::render(&flow, tessera_dataflow::graph::Format::Mermaid);
    assert!(graph.contains("arith[\"arith<br/>subflow\"]"), "{graph}");
}

#[test]
fn hostile_subflows_are_refused_naming_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = calc_with_subflow(dir.path());
    let outer = std::fs::read_to_string(&path).unwrap();
    let write = |text: &str| {
        std::fs::write(&path, text).unwrap();
        DataFlow::from_file(&path).unwrap_err()
    };
    // Given as text, a flow cannot name files.
    let e = DataFlow::from_yaml(&outer).unwrap_err();
    assert!(e.to_string().contains("subflow names a file") && e.line == Some(14), "{e}");
    for (text, line, what) in [
        (outer.replace("sub/arith.yaml", "../arith.yaml"), 14, "this flow's folder"),
        (outer.replace("sub/arith.yaml", "/etc/passwd"), 14, "this flow's folder"),
        (outer.replace("sub/arith.yaml", "calc.yaml"), 0, "runs itself"),
        (outer.replace("sub/arith.yaml", "sub/none.yaml"), 0, "cannot read"),
        (outer.replace("  result: {type: int}", "  result: {type: str}"), 14, "type mismatch"),
        (outer.replace("outputs: {result: result}", "outputs: {sum: result}"), 14, "get_single"),
        (
            outer.replace("is_mult: is_mult}", "is_mult: is_mult, line: calc_string}"),
            14,
            "not one of the subflow's inputs",
        ),
        (outer.replace("subflow: sub/arith.yaml", "subflow: sub/arith.yaml\n    function: add"), 14, "or `subflow`"),
        (outer.replace("subflow: sub/arith.yaml", "subflow: sub/arith.yaml\n    cache: true"), 14, "not cached"),
    ] {
        let e = write(&text);
        assert!(e.to_string().contains(what), "{what}: {e}");
        if line > 0 {
            assert_eq!(e.line, Some(line), "{what}: {e}");
        }
        assert!(e.to_string().contains("calc.yaml") || e.to_string().contains("none.yaml"), "the file is named: {e}");
    }
    // A link leading out of the flow's folder, a pipe, and subflows nesting without bound.
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join("sub/arith.yaml"), outside.path().join("arith.yaml")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("arith.yaml"), dir.path().join("sub/link.yaml")).unwrap();
    let e = write(&outer.replace("sub/arith.yaml", "sub/link.yaml"));
    assert!(e.to_string().contains("this flow's folder") && e.line == Some(14), "{e}");
    let made = std::process::Command::new("mkfifo").arg(dir.path().join("sub/pipe.yaml")).status();
    if made.is_ok_and(|s| s.success()) {
        let e = write(&outer.replace("sub/arith.yaml", "sub/pipe.yaml"));
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }
    // Each level runs the next three times: 3^6 subflows from six small files.
    for level in 0..6 {
        let ops: String = (0..3)
            .map(|i| format!("  s{i}: {{subflow: l{}.yaml, inputs: {{n: n}}, outputs: {{m: m}}}}\n", level + 1))
            .collect();
        let text = format!(
            "definitions:\n  n: {{type: int}}\n  m: {{type: int}}\noperations:\n{ops}inputs: [n]\noutput: {{get_single: [m]}}\n"
        );
        std::fs::write(dir.path().join(format!("l{level}.yaml")), text).unwrap();
    }
    std::fs::write(
        dir.path().join("l6.yaml"),
        "definitions:\n  n: {type: int}\n  m: {type: int}\noperations:\n  \
         inc: {module: t.ops@1.0.0, function: clamp, inputs: {n: n}, outputs: {m: m}}\ninputs: [n]\noutput: {get_single: [m]}\n",
    )
    .unwrap();
    let e = DataFlow::from_file(&dir.path().join("l0.yaml")).unwrap_err();
    assert!(e.to_string().contains("at most 256 subflow operations"), "{e}");
    // An error inside the subflow names the subflow's file and line.
    std::fs::write(&path, &outer).unwrap();
    let arith = std::fs::read_to_string(dir.path().join("sub/arith.yaml")).unwrap();
    std::fs::write(dir.path().join("sub/arith.yaml"), arith.replace("function: add", "function: add\n    retries: 1"))
        .unwrap();
    let e = DataFlow::from_file(&path).unwrap_err();
    assert!(e.to_string().contains("arith.yaml") && e.to_string().contains("unknown field"), "{e}");
}

/// Results kept in memory, counting what was asked.
#[derive(Default)]
struct Memo(Mutex<BTreeMap<String, BTreeMap<String, Value>>>);

#[async_trait]
impl ResultCache for Memo {
    async fn get(&self, key: &str) -> Option<BTreeMap<String, Value>> {
        self.0.lock().unwrap().get(key).cloned()
    }
    async fn put(&self, key: &str, outputs: &BTreeMap<String, Value>) {
        self.0.lock().unwrap().insert(key.to_owned(), outputs.clone());
    }
}

#[tokio::test]
async fn cached_operations_answer_a_parameter_set_seen_before_without_running() {
    use std::sync::atomic::Ordering::SeqCst;
    let flow = DataFlow::from_yaml(&CALC.replace("function: parse\n", "function: parse\n    cache: true\n")).unwrap();
    let (net, memo) = (Calc::default(), Memo::default());
    let o = Orchestrator::new(&flow, &net).with_cache(&memo);
    let line = |l: &str| vec![("calc_string".to_string(), json!(l))];
    let first = o.run_context(line("add 40 and 2")).await.unwrap();
    assert_eq!((first.runs["parse"], first.cached.get("parse")), (1, None));
    assert_eq!(net.called.load(SeqCst), 2, "parse and add ran");
    // The same line: parse is answered from the cache, add (not cached) runs.
    let again = o.run_context(line("add 40 and 2")).await.unwrap();
    assert_eq!(again.single["result"], json!(42));
    assert_eq!((again.runs.get("parse"), again.cached["parse"], again.runs["add"]), (None, 1, 1));
    assert_eq!(net.called.load(SeqCst), 3);
    // Other inputs, or other code, are other keys.
    o.run_context(line("add 40 and 3")).await.unwrap();
    assert_eq!(net.called.load(SeqCst), 5);
    let other = DataFlow::from_yaml(&CALC.replace("function: parse\n", "function: parse\n    cache: true\n").replacen(
        "calc.ops@0.1.0",
        "calc.ops@0.2.0",
        1,
    ))
    .unwrap();
    let r = Orchestrator::new(&other, &net).with_cache(&memo).run_context(line("add 40 and 2")).await.unwrap();
    assert_eq!((r.runs["parse"], r.cached.get("parse")), (1, None), "a new module version runs again");
    // A kept entry missing an output is not trusted.
    for v in memo.0.lock().unwrap().values_mut() {
        v.remove("numbers");
    }
    let r = o.run_context(line("add 40 and 2")).await.unwrap();
    assert_eq!((r.runs["parse"], r.single["result"].clone()), (1, json!(42)));
    // A result of the wrong type is not kept (and the context fails on it).
    let wrong = DataFlow::from_yaml(
        &CALC
            .replace("function: parse\n", "function: parse\n    cache: true\n")
            .replace("numbers: {type: json}", "numbers: {type: str}")
            .replace("calc.ops@0.1.0", "calc.ops@9.0.0"),
    )
    .unwrap();
    let fresh = Memo::default();
    let e = Orchestrator::new(&wrong, &net).with_cache(&fresh).run_context(line("add 1 and 2")).await.unwrap_err();
    assert!(matches!(e, DataflowError::Value(_)), "{e}");
    assert!(fresh.0.lock().unwrap().is_empty(), "a wrong-typed result was kept");
    // Without `cache: true`, nothing is kept.
    let plain = DataFlow::from_yaml(CALC).unwrap();
    let memo = Memo::default();
    Orchestrator::new(&plain, &net).with_cache(&memo).run_context(line("add 1 and 2")).await.unwrap();
    assert!(memo.0.lock().unwrap().is_empty());
}

/// `check` validates `v` and can only finish once `side` has run while it waits: it
/// signals `a` and waits for `b`, which `side` sends when it sees `a`.
#[derive(Default)]
struct Handshake {
    a: tokio::sync::Notify,
    b: tokio::sync::Notify,
}

#[async_trait]
impl OperationNetwork for Handshake {
    async fn run(
        &self,
        _: &str,
        op: &Operation,
        _: &BTreeMap<String, tessera_dataflow::Definition>,
        inputs: BTreeMap<String, Value>,
    ) -> Result<BTreeMap<String, Value>, String> {
        Ok(match op.function.as_str() {
            "emit" => BTreeMap::from([("v".into(), inputs["x"].clone())]),
            "side" => {
                self.a.notified().await;
                self.b.notify_one();
                BTreeMap::from([("w".into(), json!(true))])
            }
            "check" => {
                self.a.notify_one();
                self.b.notified().await;
                BTreeMap::from([("v".into(), inputs["v"].clone())])
            }
            other => return Err(format!("no function {other}")),
        })
    }
}

#[tokio::test]
async fn a_validation_runs_beside_the_operations_in_flight() {
    let flow = DataFlow::from_yaml(
        "definitions:\n  x: {type: int}\n  v: {type: int, validate: check}\n  w: {type: bool}\noperations:\n  \
         emit: {module: t.ops@1.0.0, function: emit, inputs: {x: x}, outputs: {v: v}}\n  \
         side: {module: t.ops@1.0.0, function: side, inputs: {x: x}, outputs: {w: w}}\n  \
         check: {module: t.ops@1.0.0, function: check, inputs: {v: v}, outputs: {v: v}}\n\
         inputs: [x]\noutput: {get_single: [v, w]}\n",
    )
    .unwrap();
    let net = Handshake::default();
    // Were the validation awaited in line, `side` would never be polled while `check`
    // waits for it: the context would never end.
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        Orchestrator::new(&flow, &net).run_context(vec![("x".into(), json!(7))]),
    )
    .await
    .expect("the validation stalled the operation in flight")
    .unwrap();
    assert_eq!((r.single["v"].clone(), r.single["w"].clone()), (json!(7), json!(true)));
}

#[tokio::test]
async fn json_values_meet_their_schema() {
    let flow = DataFlow::from_yaml(&CALC.replace(
        "numbers: {type: json}",
        "numbers: {type: json, schema: {type: array, items: {type: integer}, maxItems: 3}}",
    ))
    .unwrap();
    assert_eq!(run(&flow, "add 40 and 2").await.single["result"], json!(42));
    let e = Orchestrator::new(&flow, &Calc::default())
        .run_context(vec![("calc_string".into(), json!("add 1 and 2 and 3 and 4"))])
        .await
        .unwrap_err();
    assert!(matches!(e, DataflowError::Value(_)) && e.to_string().contains("`numbers` from parse.numbers"), "{e}");
    // Schemas and tensor fields where they do not belong, or that are not schemas.
    for (change, line, what) in [
        ("result: {type: int, schema: {type: integer}}", 6, "for `json` definitions"),
        ("result: {type: int, dtype: F32}", 6, "for `tensor` definitions"),
        ("result: {type: tensor, dtype: F99}", 6, "not a safetensors dtype"),
        ("result: {type: json, schema: {type: 12}}", 6, "not a JSON Schema"),
        ("result: {type: json, schema: {\"$ref\": \"file:///etc/hostname\"}}", 6, "nothing outside"),
    ] {
        let e = DataFlow::from_yaml(&CALC.replace("result: {type: int}", change)).unwrap_err();
        assert!(e.to_string().contains(what) && e.line == Some(line), "{change}: {e}");
    }
}

/// Tensors in a blob store of this process.
#[derive(Default)]
struct Blobs(BTreeMap<String, Vec<u8>>);

#[async_trait]
impl OperationNetwork for Blobs {
    async fn run(
        &self,
        _: &str,
        _: &Operation,
        _: &BTreeMap<String, tessera_dataflow::Definition>,
        inputs: BTreeMap<String, Value>,
    ) -> Result<BTreeMap<String, Value>, String> {
        Ok(BTreeMap::from([("same".into(), inputs["t"].clone())]))
    }

    async fn tensor_header(&self, digest: &str) -> Result<Vec<u8>, String> {
        self.0.get(digest).cloned().ok_or_else(|| format!("no blob {digest}"))
    }
}

fn tensor(dtype: safetensors::Dtype, shape: &[usize]) -> Vec<u8> {
    let size = shape.iter().product::<usize>() * dtype.bitsize() / 8;
    let data = vec![0u8; size];
    let view = safetensors::tensor::TensorView::new(dtype, shape.to_vec(), &data).unwrap();
    safetensors::serialize(vec![("data".to_string(), view)], None).unwrap()
}

#[tokio::test]
async fn tensor_values_have_their_dtype_and_shape() {
    let flow = DataFlow::from_yaml(
        "definitions:\n  t: {type: tensor, dtype: F32, shape: [null, 2]}\n  u: {type: tensor}\noperations:\n  \
         pass: {module: t.ops@1.0.0, function: pass, inputs: {t: t}, outputs: {same: u}}\n\
         inputs: [t]\noutput: {get_single: [u]}\n",
    )
    .unwrap();
    let mut net = Blobs::default();
    let mut put = |bytes: Vec<u8>| {
        let d = tessera_core::Digest::of(&bytes).to_string();
        net.0.insert(d.clone(), bytes);
        d
    };
    let good = put(tensor(safetensors::Dtype::F32, &[5, 2]));
    let long = put(tensor(safetensors::Dtype::F32, &[5, 3]));
    let wide = put(tensor(safetensors::Dtype::F64, &[5, 2]));
    let flat = put(tensor(safetensors::Dtype::F32, &[10]));
    let json = put(b"{\"not\": \"a tensor\"}".to_vec());
    let o = Orchestrator::new(&flow, &net);
    let r = o.run_context(vec![("t".into(), json!(good))]).await.unwrap();
    assert_eq!(r.single["u"], json!(good));
    for (digest, what) in [(&long, "shape [5, 3]"), (&wide, "dtype F64"), (&flat, "shape [10]")] {
        let e = o.run_context(vec![("t".into(), json!(digest))]).await.unwrap_err();
        assert!(matches!(e, DataflowError::Value(_)) && e.to_string().contains(what), "{what}: {e}");
    }
    // A tensor output is its operation's only output.
    let e = DataFlow::from_yaml(&CALC.replace("numbers: {type: json}", "numbers: {type: tensor}")).unwrap_err();
    assert!(e.to_string().contains("only output") && e.line == Some(9), "{e}");
    // Not a tensor at all.
    let e = o.run_context(vec![("t".into(), json!(json))]).await.unwrap_err();
    assert!(e.to_string().contains("not a safetensors tensor"), "{e}");
    let missing = tessera_core::Digest::of(b"nothing").to_string();
    let e = o.run_context(vec![("t".into(), json!(missing))]).await.unwrap_err();
    assert!(e.to_string().contains("no blob"), "{e}");
}
