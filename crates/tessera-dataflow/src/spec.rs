//! Flow files: definitions, operations, how operations' inputs are wired, seed inputs and
//! the outputs a context gives back, read from YAML with errors naming the line.
//!
//! ```yaml
//! definitions:
//!   calc_string: {type: str}
//!   is_add: {type: bool}
//!   numbers: {type: json}
//!   result: {type: int}
//! operations:
//!   parse: {module: calc.ops@0.1.0, function: parse,
//!           inputs: {line: calc_string}, outputs: {add: is_add, numbers: numbers}}
//!   add:   {module: calc.ops@0.1.0, function: add, inputs: {numbers: numbers},
//!           outputs: {sum: result}, conditions: [is_add]}
//! inputs: [calc_string]
//! output: {get_single: [result]}
//! ```
//!
//! An operation's input is fed by every value of its definition (DFFML's wiring by
//! definition) unless `flow` names where it comes from: `seed` (values given to the
//! context) or `<operation>.<output>`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_saphyr::Spanned;
use tessera_core::PackageRef;
use tessera_core::name::check_ident;
use tessera_core::yaml::At;
pub use tessera_core::yaml::SpecError;

/// Largest flow file read, in bytes.
pub const MAX_FLOW_BYTES: usize = 256 * 1024;
/// Most definitions in a flow.
pub const MAX_DEFINITIONS: usize = 1024;
/// Most operations in a flow.
pub const MAX_OPERATIONS: usize = 256;

/// What values of a definition are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Primitive {
    /// A whole number (JSON integer, 64 bits).
    Int,
    /// A number (JSON number, f64).
    Float,
    /// A string.
    Str,
    /// `true` or `false`.
    Bool,
    /// Any JSON value.
    Json,
    /// A tensor, as a blob digest (`b3:<hex>`) of its safetensors bytes.
    Tensor,
    /// Bytes, as a blob digest (`b3:<hex>`).
    Blob,
}

impl Primitive {
    /// True when `v` is a value of this type.
    pub fn admits(self, v: &Value) -> bool {
        match self {
            Primitive::Int => v.is_i64() || v.is_u64(),
            Primitive::Float => v.is_number(),
            Primitive::Str => v.is_string(),
            Primitive::Bool => v.is_boolean(),
            Primitive::Json => true,
            Primitive::Tensor | Primitive::Blob => {
                v.as_str().is_some_and(|s| s.parse::<tessera_core::Digest>().is_ok())
            }
        }
    }
}

/// A kind of value that flows between operations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// Its type.
    #[serde(rename = "type")]
    pub primitive: Primitive,
    /// A value of it is used by one operation at a time.
    #[serde(default)]
    pub lock: bool,
    /// An operation every new value of it goes through first (one input, one output of
    /// this definition); the value it gives is the one used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validate: Option<String>,
    /// For `json` values: a JSON Schema every value meets (the draft its `$schema` names,
    /// else 2020-12; checked with the `boon` crate; no remote `$ref`s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    /// For `tensor` values: the safetensors dtype of the one tensor in the blob (`F32`,
    /// `F64`, `I64`, `U8`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// For `tensor` values: its shape, `null` for a dimension of any size (`[null, 64]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<Vec<Option<u64>>>,
}

/// Most dimensions a tensor definition's `shape` names.
pub const MAX_RANK: usize = 32;

/// Largest safetensors header read, in bytes (the format's own limit).
pub const MAX_TENSOR_HEADER: usize = 100_000_000;

/// How many bytes at the start of a blob hold its safetensors header (the length and the
/// header), from its first 8 bytes; `None` when they are not a safetensors start.
pub fn tensor_header_len(first8: &[u8]) -> Option<usize> {
    let n = u64::from_le_bytes(first8.get(..8)?.try_into().ok()?);
    let n = usize::try_from(n).ok().filter(|n| *n <= MAX_TENSOR_HEADER)?;
    Some(8 + n)
}

/// The dtype and shape of the one tensor a safetensors header describes (`head`: at least
/// its length and header).
fn tensor_header(head: &[u8]) -> Result<(String, Vec<u64>), String> {
    let not = |why: &str| format!("not a safetensors tensor: {why}");
    let end = tensor_header_len(head).ok_or_else(|| not("no header length"))?;
    let header = head.get(8..end).ok_or_else(|| not("the header is cut short"))?;
    let entries: BTreeMap<String, Value> = serde_json::from_slice(header).map_err(|e| not(&e.to_string()))?;
    let tensors: Vec<&Value> = entries.iter().filter(|(k, _)| *k != "__metadata__").map(|(_, v)| v).collect();
    let [info] = tensors.as_slice() else {
        return Err(format!("the blob holds {} tensors, not one", tensors.len()));
    };
    let dtype = info.get("dtype").and_then(Value::as_str).ok_or_else(|| not("no dtype"))?;
    let shape: Option<Vec<u64>> =
        info.get("shape").and_then(Value::as_array).and_then(|s| s.iter().map(Value::as_u64).collect());
    Ok((dtype.to_owned(), shape.ok_or_else(|| not("no shape"))?))
}

/// A definition's JSON Schema, compiled.
pub struct Schema {
    schemas: boon::Schemas,
    index: boon::SchemaIndex,
}

impl Schema {
    /// Compiles `schema` (no remote references are fetched). Errors say why it is not a
    /// schema.
    pub fn compile(schema: &Value) -> Result<Schema, String> {
        let mut schemas = boon::Schemas::new();
        let mut compiler = boon::Compiler::new();
        // Nothing is fetched: not files, not URLs (only the drafts' own meta-schemas).
        compiler.use_loader(Box::new(NoLoader));
        let url = "urn:tessera:definition";
        compiler.add_resource(url, schema.clone()).map_err(|e| first_line(&e.to_string()))?;
        let index = compiler.compile(url, &mut schemas).map_err(|e| first_line(&format!("{e:#}")))?;
        Ok(Schema { schemas, index })
    }

    /// Checks `value` against the schema; the error names where it fails.
    pub fn check(&self, value: &Value) -> Result<(), String> {
        self.schemas.validate(value, self.index).map_err(|e| first_line(&format!("{e}")))
    }
}

/// Refuses every schema a `$ref` or `$schema` would load.
struct NoLoader;

impl boon::UrlLoader for NoLoader {
    fn load(&self, url: &str) -> Result<Value, Box<dyn std::error::Error>> {
        Err(format!("{url}: a flow's schemas refer to nothing outside themselves").into())
    }
}

fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    line.chars().take(300).collect()
}

impl Definition {
    /// A definition of `primitive` values with nothing else asked of them.
    pub fn of(primitive: Primitive) -> Definition {
        Definition { primitive, lock: false, validate: None, schema: None, dtype: None, shape: None }
    }

    /// Checks a tensor value against `dtype` and `shape` from the start of its safetensors
    /// blob (`bytes`: at least the 8-byte header length and the JSON header; the data is
    /// not needed): the blob holds one tensor, of that dtype, of that shape (`null`
    /// matching any size). Errors say what the blob holds instead.
    pub fn check_tensor(&self, bytes: &[u8]) -> Result<(), String> {
        let (dtype, shape) = tensor_header(bytes)?;
        if let Some(want) = &self.dtype
            && !dtype.eq_ignore_ascii_case(want)
        {
            return Err(format!("dtype {dtype}, not {want}"));
        }
        if let Some(want) = &self.shape {
            let fits = want.len() == shape.len() && want.iter().zip(&shape).all(|(w, g)| w.is_none_or(|w| w == *g));
            if !fits {
                let show: Vec<String> = want.iter().map(|d| d.map_or("null".into(), |n| n.to_string())).collect();
                return Err(format!("shape {shape:?}, not [{}]", show.join(", ")));
            }
        }
        Ok(())
    }
}

/// A module function (or a subflow) with inputs and outputs bound to definitions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    /// The module: `name@version`, a range, an alias or a digest (empty for a subflow).
    #[serde(default)]
    pub module: String,
    /// The function called (empty for a subflow).
    #[serde(default)]
    pub function: String,
    /// A whole flow this operation runs, one context per parameter set (DFFML's
    /// `run_dataflow`): each input goes to the subflow's input of the same name, each
    /// output is the subflow's `get_single` value of the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subflow: Option<Box<DataFlow>>,
    /// Results are kept by the digest of the module, the function and the inputs, and a
    /// parameter set seen before is answered from them without running (for functions
    /// whose result depends on their inputs alone).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cache: bool,
    /// Parameter name -> definition.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// Output name -> definition.
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    /// Boolean definitions that must all be `true` for it to run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<String>,
}

/// Where a value comes from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Origin {
    /// Given to the context (a seed or a caller's input).
    Seed,
    /// An operation's output.
    Output {
        /// The operation.
        operation: String,
        /// Its output.
        output: String,
    },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Seed => f.write_str("seed"),
            Origin::Output { operation, output } => write!(f, "{operation}.{output}"),
        }
    }
}

/// A whole flow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataFlow {
    /// Definitions by name.
    pub definitions: BTreeMap<String, Definition>,
    /// Operations by name.
    pub operations: BTreeMap<String, Operation>,
    /// Explicit wiring: operation -> parameter (or `conditions`) -> the origins allowed.
    /// Parameters not named take every value of their definition.
    #[serde(default)]
    pub flow: BTreeMap<String, BTreeMap<String, Vec<Origin>>>,
    /// Definitions a caller gives values of (besides `seed`).
    #[serde(default)]
    pub inputs: Vec<String>,
    /// Values every context starts with: definition -> values.
    #[serde(default)]
    pub seed: Vec<(String, Value)>,
    /// What a context gives back.
    pub output: Output,
}

/// What a context gives back: the last value of each `get_single` definition, every value
/// of each `get_multi` one (DFFML's `GetSingle` and `GetMulti`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    /// Definitions given back as their last value.
    #[serde(default)]
    pub get_single: Vec<String>,
    /// Definitions given back as every value, in order.
    #[serde(default)]
    pub get_multi: Vec<String>,
}

/// `flow:` as written: operation -> parameter -> origins.
type RawWiring = BTreeMap<String, BTreeMap<String, Vec<String>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlow {
    definitions: Spanned<BTreeMap<String, Spanned<Definition>>>,
    operations: Spanned<BTreeMap<String, Spanned<RawOperation>>>,
    #[serde(default)]
    flow: Option<Spanned<RawWiring>>,
    #[serde(default)]
    inputs: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    seed: Option<Spanned<Vec<BTreeMap<String, Value>>>>,
    output: Spanned<Output>,
    /// Where a flow written in Python declared its parts (`operations.parse` -> line), so
    /// errors name lines of the Python file.
    #[serde(default)]
    source: Option<Source>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Source {
    file: String,
    #[serde(default)]
    lines: BTreeMap<String, usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperation {
    #[serde(default)]
    module: Option<String>,
    #[serde(default)]
    function: Option<String>,
    #[serde(default)]
    subflow: Option<String>,
    #[serde(default)]
    cache: bool,
    #[serde(default)]
    inputs: BTreeMap<String, String>,
    #[serde(default)]
    outputs: BTreeMap<String, String>,
    #[serde(default)]
    conditions: Vec<String>,
}

fn parse_origin(s: &str) -> Result<Origin, String> {
    if s == "seed" {
        return Ok(Origin::Seed);
    }
    match s.split_once('.') {
        Some((op, out)) if !op.is_empty() && !out.is_empty() => {
            Ok(Origin::Output { operation: op.to_owned(), output: out.to_owned() })
        }
        _ => Err(format!("origin {s:?} is neither `seed` nor `<operation>.<output>`")),
    }
}

/// Deepest nesting of subflows.
pub const MAX_SUBFLOW_DEPTH: usize = 8;

/// Most subflow operations in a flow and all its subflows, counted as they nest (each
/// names a file read and checked on its own), so a few small files cannot make reading
/// a flow take exponential time.
pub const MAX_SUBFLOW_OPERATIONS: usize = 256;

/// Where reading a flow file and its subflows stands.
#[derive(Default)]
struct Reading {
    /// The files being read, outermost first.
    stack: Vec<std::path::PathBuf>,
    /// Subflow operations met so far.
    operations: usize,
}

impl DataFlow {
    /// Reads and checks a flow given as text ([`DataFlow::check`]); errors name the line.
    /// Subflows name files, so a flow with subflows is read with [`DataFlow::from_file`].
    pub fn from_yaml(text: &str) -> Result<DataFlow, SpecError> {
        Self::parse(text, None)
    }

    /// Reads and checks a flow given as text whose subflow files are relative to `base`
    /// (the spec a Python flow file prints, `base` its folder).
    pub fn from_yaml_in(text: &str, base: &std::path::Path) -> Result<DataFlow, SpecError> {
        // Subflow paths are compared with the folder resolved, as `read_file` resolves its own.
        let base = base.canonicalize().unwrap_or_else(|_| base.to_path_buf());
        Self::parse(text, Some((&base, &mut Reading::default())))
    }

    /// Reads and checks a flow file and the subflow files it names (relative to its own
    /// folder, at most [`MAX_SUBFLOW_DEPTH`] deep, none including itself); errors name the
    /// file and the line.
    pub fn from_file(path: &std::path::Path) -> Result<DataFlow, SpecError> {
        Self::read_file(path, &mut Reading::default())
    }

    fn read_file(path: &std::path::Path, stack: &mut Reading) -> Result<DataFlow, SpecError> {
        use std::io::Read;
        let named = |message: String| {
            let mut e = SpecError::at(At::default(), "file", message);
            e.file = Some(path.display().to_string());
            e
        };
        let canonical = path.canonicalize().map_err(|e| named(format!("cannot read it: {e}")))?;
        if stack.stack.contains(&canonical) {
            return Err(named("the flow runs itself as a subflow".into()));
        }
        // Not a pipe or a device: opening one could wait for ever.
        if !std::fs::metadata(&canonical).is_ok_and(|m| m.is_file()) {
            return Err(named("it is not a regular file".into()));
        }
        if stack.stack.len() >= MAX_SUBFLOW_DEPTH {
            return Err(named(format!("subflows nest at most {MAX_SUBFLOW_DEPTH} deep")));
        }
        let mut bytes = Vec::new();
        std::fs::File::open(&canonical)
            .and_then(|f| f.take(MAX_FLOW_BYTES as u64 + 1).read_to_end(&mut bytes))
            .map_err(|e| named(format!("cannot read it: {e}")))?;
        if bytes.len() > MAX_FLOW_BYTES {
            return Err(named(format!("a flow file is at most {MAX_FLOW_BYTES} bytes")));
        }
        let text = String::from_utf8(bytes).map_err(|_| named("it is not UTF-8 text".into()))?;
        stack.stack.push(canonical.clone());
        let base = canonical.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
        let flow = Self::parse(&text, Some((&base, stack))).map_err(|mut e| {
            if e.file.is_none() {
                e.file = Some(path.display().to_string());
            }
            e
        });
        stack.stack.pop();
        flow
    }

    fn parse(text: &str, files: Option<(&std::path::Path, &mut Reading)>) -> Result<DataFlow, SpecError> {
        if text.len() > MAX_FLOW_BYTES {
            return Err(SpecError::at(
                At::default(),
                "file",
                format!("the file is {} bytes; the limit is {MAX_FLOW_BYTES}", text.len()),
            ));
        }
        let mut raw: RawFlow = tessera_core::yaml::from_str_located(text)?;
        let source = raw.source.take();
        Self::build(raw, files).map_err(|mut e| {
            // A flow written in Python: the line of its part in the Python file.
            if let Some(src) = &source
                && e.file.is_none()
            {
                let field = e.field.clone().unwrap_or_default();
                let parts: Vec<&str> = field.split('.').collect();
                let line = (1..=parts.len().min(2)).rev().find_map(|n| src.lines.get(&parts[..n].join(".")));
                e.file = Some(src.file.clone());
                e.line = line.copied();
                e.column = None;
            }
            e
        })
    }

    fn build(raw: RawFlow, mut files: Option<(&std::path::Path, &mut Reading)>) -> Result<DataFlow, SpecError> {
        let mut lines: BTreeMap<String, At> = BTreeMap::new();
        lines.insert("definitions".into(), At::of(&raw.definitions));
        lines.insert("operations".into(), At::of(&raw.operations));
        lines.insert("output".into(), At::of(&raw.output));
        let definitions = raw
            .definitions
            .value
            .into_iter()
            .map(|(k, v)| {
                lines.insert(format!("definitions.{k}"), At::of(&v));
                (k, v.value)
            })
            .collect();
        let mut operations = BTreeMap::new();
        for (k, v) in raw.operations.value {
            let at = At::of(&v);
            lines.insert(format!("operations.{k}"), at);
            let r = v.value;
            let subflow = match (&r.subflow, &r.module, &r.function) {
                (Some(file), None, None) => {
                    let Some((base, stack)) = files.as_mut() else {
                        return Err(SpecError::at(
                            at,
                            &format!("operations.{k}.subflow"),
                            "a subflow names a file; read this flow from its file",
                        ));
                    };
                    let sub = std::path::Path::new(file);
                    let outside = || {
                        SpecError::at(
                            at,
                            &format!("operations.{k}.subflow"),
                            format!("{file:?}: a subflow is a file in this flow's folder or below it"),
                        )
                    };
                    if !sub
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir))
                    {
                        return Err(outside());
                    }
                    // Links are followed: where one leads must be inside too.
                    let full = base.join(sub);
                    if full.canonicalize().is_ok_and(|c| !c.starts_with(&**base)) {
                        return Err(outside());
                    }
                    stack.operations = stack.operations.saturating_add(1);
                    if stack.operations > MAX_SUBFLOW_OPERATIONS {
                        return Err(SpecError::at(
                            at,
                            &format!("operations.{k}.subflow"),
                            format!("a flow and its subflows hold at most {MAX_SUBFLOW_OPERATIONS} subflow operations"),
                        ));
                    }
                    Some(Box::new(Self::read_file(&full, stack)?))
                }
                (None, Some(_), Some(_)) => None,
                _ => {
                    return Err(SpecError::at(
                        at,
                        &format!("operations.{k}"),
                        "an operation has `module` and `function`, or `subflow`",
                    ));
                }
            };
            let op = Operation {
                module: r.module.unwrap_or_default(),
                function: r.function.unwrap_or_default(),
                subflow,
                cache: r.cache,
                inputs: r.inputs,
                outputs: r.outputs,
                conditions: r.conditions,
            };
            operations.insert(k, op);
        }
        let mut flow = BTreeMap::new();
        if let Some(f) = raw.flow {
            let at = At::of(&f);
            lines.insert("flow".into(), at);
            for (op, params) in f.value {
                let mut wired = BTreeMap::new();
                for (param, origins) in params {
                    let parsed: Result<Vec<Origin>, String> = origins.iter().map(|o| parse_origin(o)).collect();
                    wired.insert(
                        param.clone(),
                        parsed.map_err(|m| SpecError::at(at, &format!("flow.{op}.{param}"), m))?,
                    );
                }
                flow.insert(op, wired);
            }
        }
        let inputs = match raw.inputs {
            Some(i) => {
                lines.insert("inputs".into(), At::of(&i));
                i.value
            }
            None => Vec::new(),
        };
        let mut seed = Vec::new();
        if let Some(s) = raw.seed {
            let at = At::of(&s);
            lines.insert("seed".into(), at);
            for item in s.value {
                if item.len() != 1 {
                    return Err(SpecError::at(at, "seed", "each seed item is one `definition: value`"));
                }
                seed.extend(item);
            }
        }
        let flow = DataFlow { definitions, operations, flow, inputs, seed, output: raw.output.value };
        flow.check().map_err(|(field, message)| {
            // The line of the most specific part named.
            let parts: Vec<&str> = field.split('.').collect();
            let at = (1..=parts.len().min(2))
                .rev()
                .find_map(|n| lines.get(&parts[..n].join(".")))
                .copied()
                .unwrap_or_default();
            SpecError::at(at, &field, message)
        })?;
        Ok(flow)
    }

    /// The origins feeding an operation's parameter (or its `conditions`): those `flow`
    /// names, else the seed and every output of the parameter's definition.
    pub fn origins(&self, op: &str, param: &str, definition: &str) -> Vec<Origin> {
        if let Some(o) = self.flow.get(op).and_then(|p| p.get(param)) {
            return o.clone();
        }
        let mut out = vec![Origin::Seed];
        for (name, o) in &self.operations {
            for (output, def) in &o.outputs {
                if def == definition {
                    out.push(Origin::Output { operation: name.clone(), output: output.clone() });
                }
            }
        }
        out
    }

    /// Checks the flow: names, types of wired values, conditions, validation operations,
    /// inputs nothing can feed, operations that can never run, and cycles no condition
    /// guards. Gives the dotted field and what is wrong.
    pub fn check(&self) -> Result<(), (String, String)> {
        if self.definitions.is_empty() || self.definitions.len() > MAX_DEFINITIONS {
            return Err(("definitions".into(), format!("a flow has 1 to {MAX_DEFINITIONS} definitions")));
        }
        if self.operations.is_empty() || self.operations.len() > MAX_OPERATIONS {
            return Err(("operations".into(), format!("a flow has 1 to {MAX_OPERATIONS} operations")));
        }
        let def = |field: &str, name: &str| -> Result<&Definition, (String, String)> {
            self.definitions.get(name).ok_or_else(|| {
                (field.to_owned(), format!("unknown definition `{name}` (definitions: {})", self.names()))
            })
        };
        for (name, d) in &self.definitions {
            check_ident("definition name", name).map_err(|e| (format!("definitions.{name}"), e.to_string()))?;
            let at = format!("definitions.{name}");
            if let Some(schema) = &d.schema {
                if d.primitive != Primitive::Json {
                    return Err((format!("{at}.schema"), "a schema is for `json` definitions".into()));
                }
                Schema::compile(schema).map_err(|e| (format!("{at}.schema"), format!("not a JSON Schema: {e}")))?;
            }
            if (d.dtype.is_some() || d.shape.is_some()) && d.primitive != Primitive::Tensor {
                return Err((at, "`dtype` and `shape` are for `tensor` definitions".into()));
            }
            if let Some(dtype) = &d.dtype
                && serde_json::from_value::<safetensors::Dtype>(Value::String(dtype.to_ascii_uppercase())).is_err()
            {
                return Err((
                    format!("{at}.dtype"),
                    format!("{dtype:?} is not a safetensors dtype (F32, F64, I64, U8, ...)"),
                ));
            }
            if d.shape.as_ref().is_some_and(|s| s.len() > MAX_RANK) {
                return Err((format!("{at}.shape"), format!("a shape has at most {MAX_RANK} dimensions")));
            }
            if let Some(v) = &d.validate {
                let field = format!("definitions.{name}.validate");
                let op = self.operations.get(v).ok_or_else(|| (field.clone(), format!("unknown operation `{v}`")))?;
                let one_in = op.inputs.len() == 1 && op.inputs.values().all(|i| i == name);
                let one_out = op.outputs.len() == 1 && op.outputs.values().all(|o| o == name);
                if !(one_in && one_out) {
                    return Err((field, format!("`{v}` must take one `{name}` and give one `{name}`")));
                }
            }
        }
        for (name, op) in &self.operations {
            let at = format!("operations.{name}");
            check_ident("operation name", name).map_err(|e| (at.clone(), e.to_string()))?;
            if let Some(sub) = &op.subflow {
                self.check_subflow(name, op, sub)?;
            } else {
                op.module.parse::<PackageRef>().map_err(|e| (format!("{at}.module"), e.to_string()))?;
                check_ident("function name", &op.function).map_err(|e| (format!("{at}.function"), e.to_string()))?;
            }
            if op.outputs.is_empty() {
                return Err((format!("{at}.outputs"), "an operation gives at least one output".into()));
            }
            if op.inputs.is_empty() {
                return Err((format!("{at}.inputs"), "an operation takes at least one input".into()));
            }
            let blob_outputs = op
                .outputs
                .values()
                .filter(|d| {
                    self.definitions.get(*d).is_some_and(|d| matches!(d.primitive, Primitive::Tensor | Primitive::Blob))
                })
                .count();
            if op.subflow.is_none() && blob_outputs > 0 && op.outputs.len() > 1 {
                return Err((
                    format!("{at}.outputs"),
                    "a tensor or blob output is the operation's only output (its function's result)".into(),
                ));
            }
            if op.inputs.contains_key("conditions") {
                return Err((
                    format!("{at}.inputs"),
                    "`conditions` is not a parameter name (it names the conditions in `flow`)".into(),
                ));
            }
            for (p, d) in op.inputs.iter().chain(&op.outputs) {
                check_ident("parameter name", p).map_err(|e| (format!("{at}.{p}"), e.to_string()))?;
                def(&format!("{at}.{p}"), d)?;
            }
            for c in &op.conditions {
                if def(&format!("{at}.conditions"), c)?.primitive != Primitive::Bool {
                    return Err((format!("{at}.conditions"), format!("condition `{c}` is not a bool definition")));
                }
            }
        }
        for (op, params) in &self.flow {
            let o =
                self.operations.get(op).ok_or_else(|| (format!("flow.{op}"), format!("unknown operation `{op}`")))?;
            for (param, origins) in params {
                let field = format!("flow.{op}.{param}");
                let want: Vec<&String> = if param == "conditions" {
                    o.conditions.iter().collect()
                } else {
                    vec![o.inputs.get(param).ok_or_else(|| (field.clone(), format!("`{op}` has no input `{param}`")))?]
                };
                for origin in origins {
                    let Origin::Output { operation, output } = origin else { continue };
                    let from = self
                        .operations
                        .get(operation)
                        .and_then(|f| f.outputs.get(output))
                        .ok_or_else(|| (field.clone(), format!("`{origin}` is not an operation's output")))?;
                    let from_type = self.definitions[from].primitive;
                    // Values keep their definition: an input takes values of its own.
                    if let Some(w) = want.iter().find(|w| **w != from) {
                        return Err((
                            field,
                            format!(
                                "type mismatch: `{origin}` gives {from} ({from_type:?}) where `{w}` ({:?}) is wanted; \
                                 an input takes values of its own definition",
                                self.definitions[*w].primitive
                            ),
                        ));
                    }
                }
            }
        }
        for (i, d) in self.inputs.iter().enumerate() {
            def(&format!("inputs.{i}"), d)?;
        }
        for (d, v) in &self.seed {
            let definition = def("seed", d)?;
            if !definition.primitive.admits(v) {
                return Err(("seed".into(), format!("{v} is not a {:?} value of `{d}`", definition.primitive)));
            }
        }
        for d in self.output.get_single.iter().chain(&self.output.get_multi) {
            def("output", d)?;
        }
        self.check_reachable()?;
        self.check_cycles()?;
        self.check_seed_fan_out()
    }

    /// An operation whose inputs can only come from the seed forms every combination of
    /// the seed's values: more than [`crate::orchestrator::MAX_PARAMETER_SETS`] is refused
    /// before anything runs (values formed at run time are bounded as they come).
    fn check_seed_fan_out(&self) -> Result<(), (String, String)> {
        let limit = crate::orchestrator::MAX_PARAMETER_SETS;
        let mut seeds: BTreeMap<&str, usize> = BTreeMap::new();
        for (d, _) in &self.seed {
            *seeds.entry(d.as_str()).or_default() += 1;
        }
        for (name, op) in self.operations.iter().filter(|(n, _)| !self.is_validator(n)) {
            let seed_only = |p: &str, d: &String| {
                !self.inputs.contains(d) && self.origins(name, p, d).iter().all(|o| *o == Origin::Seed)
            };
            if !op.inputs.iter().all(|(p, d)| seed_only(p, d)) {
                continue;
            }
            let count = op
                .inputs
                .values()
                .try_fold(1usize, |acc, d| acc.checked_mul(seeds.get(d.as_str()).copied().unwrap_or(0)))
                .unwrap_or(usize::MAX);
            if count > limit {
                return Err((
                    format!("operations.{name}"),
                    format!("`{name}` would run on {count} parameter sets of the seed's values (at most {limit})"),
                ));
            }
        }
        Ok(())
    }

    /// A subflow operation's inputs are the subflow's inputs and its outputs the subflow's
    /// `get_single` definitions, by name, of the same types; caching is for module
    /// functions.
    fn check_subflow(&self, name: &str, op: &Operation, sub: &DataFlow) -> Result<(), (String, String)> {
        let at = format!("operations.{name}");
        sub.check().map_err(|(f, m)| (format!("{at}.subflow"), format!("{f}: {m}")))?;
        if op.cache {
            return Err((format!("{at}.cache"), "a subflow is not cached; cache its operations".into()));
        }
        let same = |field: &str, p: &str, here: &str, there: &[String], what: &str| {
            if !there.iter().any(|t| t == p) {
                return Err((
                    format!("{at}.{field}"),
                    format!("`{p}` is not one of the subflow's {what} ({})", there.join(", ")),
                ));
            }
            let (a, b) = (&self.definitions[here], &sub.definitions[p]);
            let differs = if a.primitive != b.primitive {
                Some(format!("is {:?} but the subflow's `{p}` is {:?}", a.primitive, b.primitive))
            } else if a.schema != b.schema {
                Some(format!("and the subflow's `{p}` have different schemas"))
            } else if a.dtype != b.dtype || a.shape != b.shape {
                Some(format!("and the subflow's `{p}` have different dtypes or shapes"))
            } else {
                None
            };
            if let Some(why) = differs {
                return Err((format!("{at}.{field}"), format!("type mismatch: `{here}` {why}")));
            }
            Ok(())
        };
        for (p, d) in &op.inputs {
            if self.definitions.contains_key(d) {
                same("inputs", p, d, &sub.inputs, "inputs")?;
            }
        }
        for (o, d) in &op.outputs {
            if self.definitions.contains_key(d) {
                same("outputs", o, d, &sub.output.get_single, "get_single outputs")?;
            }
        }
        Ok(())
    }

    /// True for an operation that validates a definition: it runs on values as they
    /// arrive, not on parameter sets.
    pub fn is_validator(&self, op: &str) -> bool {
        self.definitions.values().any(|d| d.validate.as_deref() == Some(op))
    }

    fn names(&self) -> String {
        self.definitions.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// Every operation can run: each of its inputs and conditions has an origin that can
    /// have a value (a seed or caller input, or an operation that can run).
    fn check_reachable(&self) -> Result<(), (String, String)> {
        let given: BTreeSet<&str> =
            self.inputs.iter().map(String::as_str).chain(self.seed.iter().map(|(d, _)| d.as_str())).collect();
        let mut runs: BTreeSet<&str> = BTreeSet::new();
        loop {
            let before = runs.len();
            for (name, op) in &self.operations {
                if runs.contains(name.as_str()) || self.is_validator(name) {
                    continue;
                }
                let fed = |param: &str, d: &str| {
                    self.origins(name, param, d).iter().any(|o| match o {
                        Origin::Seed => given.contains(d),
                        Origin::Output { operation, .. } => runs.contains(operation.as_str()),
                    })
                };
                if op.inputs.iter().all(|(p, d)| fed(p, d)) && op.conditions.iter().all(|c| fed("conditions", c)) {
                    runs.insert(name);
                }
            }
            if runs.len() == before {
                break;
            }
        }
        let stuck: Vec<(&String, &Operation)> =
            self.operations.iter().filter(|(n, _)| !runs.contains(n.as_str()) && !self.is_validator(n)).collect();
        // Name the root cause: an operation needing what nothing at all gives; else the
        // first one stuck behind others.
        let nothing_gives = |d: &String| {
            !given.contains(d.as_str()) && !self.operations.values().any(|o| o.outputs.values().any(|x| x == d))
        };
        let root =
            stuck.iter().find(|(_, op)| op.inputs.values().chain(&op.conditions).any(nothing_gives)).or(stuck.first());
        if let Some((name, op)) = root {
            let mut missing: Vec<&str> =
                op.inputs.values().chain(&op.conditions).filter(|d| nothing_gives(d)).map(String::as_str).collect();
            if missing.is_empty() {
                missing = op.inputs.values().chain(&op.conditions).map(String::as_str).collect();
            }
            return Err((
                format!("operations.{name}"),
                format!(
                    "`{name}` can never run: nothing gives {} (give it in `inputs` or `seed`, or add an operation that outputs it)",
                    missing.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// A cycle of operations (each feeding the next) runs for ever unless one of them has
    /// a condition to stop it.
    fn check_cycles(&self) -> Result<(), (String, String)> {
        let mut feeds: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (name, op) in self.operations.iter().filter(|(n, _)| !self.is_validator(n)) {
            for (param, d) in
                op.inputs.iter().map(|(p, d)| (p.as_str(), d)).chain(op.conditions.iter().map(|c| ("conditions", c)))
            {
                for o in self.origins(name, param, d) {
                    if let Origin::Output { operation, .. } = o
                        && let Some((k, _)) = self.operations.get_key_value(&operation)
                        && !self.is_validator(k)
                    {
                        feeds.entry(k.as_str()).or_default().insert(name.as_str());
                    }
                }
            }
        }
        // Depth-first search for a cycle through unguarded operations only.
        let guarded = |n: &str| !self.operations[n].conditions.is_empty();
        let mut state: BTreeMap<&str, u8> = BTreeMap::new(); // 1 on the path, 2 done
        fn visit<'a>(
            n: &'a str,
            feeds: &BTreeMap<&'a str, BTreeSet<&'a str>>,
            guarded: &dyn Fn(&str) -> bool,
            state: &mut BTreeMap<&'a str, u8>,
            path: &mut Vec<&'a str>,
        ) -> Option<Vec<&'a str>> {
            state.insert(n, 1);
            path.push(n);
            for &m in feeds.get(n).into_iter().flatten() {
                if guarded(m) {
                    continue;
                }
                match state.get(m) {
                    Some(1) => {
                        let from = path.iter().position(|p| *p == m).unwrap_or(0);
                        let mut cycle = path[from..].to_vec();
                        cycle.push(m);
                        return Some(cycle);
                    }
                    Some(_) => {}
                    None => {
                        if let Some(c) = visit(m, feeds, guarded, state, path) {
                            return Some(c);
                        }
                    }
                }
            }
            path.pop();
            state.insert(n, 2);
            None
        }
        for n in self.operations.keys() {
            if guarded(n) || self.is_validator(n) || state.contains_key(n.as_str()) {
                continue;
            }
            if let Some(c) = visit(n, &feeds, &guarded, &mut state, &mut Vec::new()) {
                return Err((
                    format!("operations.{}", c[0]),
                    format!("the operations {} feed each other with no condition to stop them", c.join(" -> ")),
                ));
            }
        }
        Ok(())
    }
}
