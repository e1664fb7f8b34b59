//! The orchestrator's semantics on DFFML's own examples and on hostile flow files. The
//! operations run in this process through a small network of Rust functions, so what is
//! checked is the orchestration: which parameter sets form, run once, wait for locks.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use tessera_dataflow::{DataFlow, DataflowError, Operation, OperationNetwork, Orchestrator};

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
}

#[async_trait]
impl OperationNetwork for Calc {
    async fn run(
        &self,
        _: &str,
        op: &Operation,
        inputs: BTreeMap<String, Value>,
    ) -> Result<BTreeMap<String, Value>, String> {
        let num = |v: &Value| v.as_i64().ok_or("not a number");
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
