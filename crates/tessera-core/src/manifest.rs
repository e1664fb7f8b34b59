//! `module.yaml`: what a module is, how it runs, what it takes and gives, what it needs.
//!
//! Parsing validates everything it can (names, versions, kinds, runtimes, entry paths,
//! sizes, duplicate ports) and every error names the field and, when known, the line and
//! column in the file.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_saphyr::Spanned;

use crate::name::check_ident;
use crate::version::Version;
use crate::{ByteSize, ModulePath};

/// The file name of a manifest inside a module folder.
pub const MANIFEST_FILE: &str = "module.yaml";
/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;

/// What a module is for.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A unit of work run by a node (a training step, a job).
    Task,
    /// A model, trained or to be trained.
    Model,
    /// A data transformation (pre- or post-processing).
    Transformation,
    /// A long-lived service.
    Service,
    /// Code that runs inference for a family of models.
    Inferencer,
    /// A data set module (reads data held by a node).
    Dataset,
}

impl Kind {
    /// Every kind, in documentation order.
    pub const ALL: [Kind; 6] =
        [Kind::Task, Kind::Model, Kind::Transformation, Kind::Service, Kind::Inferencer, Kind::Dataset];

    /// The lowercase name used in manifests and queries.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Task => "task",
            Kind::Model => "model",
            Kind::Transformation => "transformation",
            Kind::Service => "service",
            Kind::Inferencer => "inferencer",
            Kind::Dataset => "dataset",
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            format!("unknown kind {s:?}; expected one of task, model, transformation, service, inferencer, dataset")
        })
    }
}

/// How a module's code runs.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// Rust compiled into the tessera binary; `entry` names the builtin.
    Builtin,
    /// A WebAssembly component run by wasmtime; `entry` is the `.wasm` file.
    Wasm,
    /// A Python process using the Tessera Python SDK; `entry` is the `.py` file.
    Python,
    /// Any executable speaking the Tessera line protocol; `entry` is the program.
    Process,
}

impl RuntimeKind {
    /// The lowercase name used in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Builtin => "builtin",
            RuntimeKind::Wasm => "wasm",
            RuntimeKind::Python => "python",
            RuntimeKind::Process => "process",
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One named input or output of a module.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    /// The name the code uses (`model`, `metrics`).
    pub name: String,
    /// The format: `safetensors`, `json`, `text` or `bytes`.
    #[serde(rename = "type", default = "default_port_type")]
    pub ty: PortType,
    /// What it holds.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// True when the module works without it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
}

fn default_port_type() -> PortType {
    PortType::Bytes
}

/// The format of an input or output.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortType {
    /// Named tensors in the safetensors format.
    Safetensors,
    /// A JSON document.
    Json,
    /// UTF-8 text.
    Text,
    /// Opaque bytes.
    Bytes,
}

/// A Python distribution name as PEP 503 normalises it: lower case, runs of `-`, `_` and
/// `.` as one `-` (how `needs.libraries` names are compared with what a node has).
pub fn normalize_distribution(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.trim().chars() {
        if matches!(c, '-' | '_' | '.') {
            if !out.ends_with('-') {
                out.push('-');
            }
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// What a module needs from the node that runs it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Needs {
    /// CPU cores (fractions allowed).
    #[serde(default)]
    pub cpu: f64,
    /// Memory.
    #[serde(default)]
    pub memory: ByteSize,
    /// GPUs.
    #[serde(default)]
    pub gpu: u32,
    /// Disk space.
    #[serde(default)]
    pub storage: ByteSize,
    /// Libraries the node must offer (`numpy>=1.26`, `torch`).
    #[serde(default)]
    pub libraries: Vec<String>,
    /// Whether its processes open sockets. A node runs such a module only if its sandbox
    /// policy grants it the network (`sandbox.network_modules`); every other module
    /// process is refused sockets.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub network: bool,
}

impl Needs {
    /// Both needs at once: the larger of each amount (CPU, memory, GPUs, disk), the
    /// libraries of both (each requirement once), the network if either needs it. How a
    /// Component Repository entry's `needs` add to those of the package it names.
    pub fn joined(&self, other: &Needs) -> Needs {
        let mut libraries = self.libraries.clone();
        for l in &other.libraries {
            if !libraries.contains(l) {
                libraries.push(l.clone());
            }
        }
        Needs {
            cpu: self.cpu.max(other.cpu),
            memory: self.memory.max(other.memory),
            gpu: self.gpu.max(other.gpu),
            storage: self.storage.max(other.storage),
            libraries,
            network: self.network || other.network,
        }
    }
}

/// Who may call a module's functions.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Anyone.
    Public,
    /// The accounts listed as trusted, and the owner.
    Trusted,
    /// Only the module's owner (its publisher).
    Owner,
}

/// A module's access rules: a default role, per-function roles, and the trusted accounts.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// The role a caller needs for functions not listed (default: public).
    #[serde(default = "public")]
    pub default: Role,
    /// Accounts with the trusted role (`ed25519:…`, `secp256k1:…`).
    #[serde(default)]
    pub trusted: Vec<String>,
    /// Per-function roles.
    #[serde(default)]
    pub functions: BTreeMap<String, Role>,
}

fn public() -> Role {
    Role::Public
}

impl Default for Access {
    fn default() -> Self {
        Access { default: Role::Public, trusted: Vec::new(), functions: BTreeMap::new() }
    }
}

impl Access {
    /// The role a function needs.
    pub fn role_for(&self, function: &str) -> Role {
        self.functions.get(function).copied().unwrap_or(self.default)
    }
}

/// Whether a runtime may run a module's later tasks in an instance an earlier task used.
///
/// `never` (the default): every run gets a fresh instance, as a WebAssembly module
/// expects. `session`: tasks of one session, sent by one account, on one node, with the
/// same datasets, may share an instance, one task after another; the module's memory (its
/// globals, its heap, a file it left in `/scratch`) carries from one to the next, as a
/// Ray worker's or a Flower client process's does. It saves each run's instantiation (a
/// few hundred microseconds) and suits short tasks that keep no state of their own. The
/// WebAssembly runtime honours it; other runtimes start every run afresh.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reuse {
    /// A fresh instance for every run.
    #[default]
    Never,
    /// One session's tasks on a node may share an instance.
    Session,
}

impl Reuse {
    fn is_never(&self) -> bool {
        *self == Reuse::Never
    }
}

/// A validated `module.yaml`. (Its JSON form, used by the hub API, deserialises without
/// re-validation: the hub validated it from the package.)
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Dotted path, e.g. `fl.softmax.worker`.
    pub name: ModulePath,
    /// Semver version.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub version: Version,
    /// What the module is for.
    pub kind: Kind,
    /// How it runs.
    pub runtime: RuntimeKind,
    /// What runs: a file in the module folder, or a builtin's name.
    pub entry: String,
    /// One paragraph for people.
    pub description: String,
    /// SPDX license expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    /// Search tags.
    pub tags: Vec<String>,
    /// The default config: a mapping, merged with overrides at launch.
    pub config: Value,
    /// Named inputs.
    pub inputs: Vec<Port>,
    /// Named outputs.
    pub outputs: Vec<Port>,
    /// Resources the module needs.
    pub needs: Needs,
    /// Who may call its functions (public when absent).
    #[serde(default)]
    pub access: Access,
    /// Whether later tasks may run in an instance an earlier one used ([`Reuse`]).
    #[serde(default, skip_serializing_if = "Reuse::is_never")]
    pub reuse: Reuse,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: ModulePath,
    version: Version,
    kind: Kind,
    runtime: RuntimeKind,
    entry: Spanned<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    license: Option<String>,
    #[serde(default)]
    tags: Vec<Spanned<String>>,
    #[serde(default)]
    config: Option<Spanned<Value>>,
    #[serde(default)]
    inputs: Vec<Spanned<Port>>,
    #[serde(default)]
    outputs: Vec<Spanned<Port>>,
    #[serde(default)]
    needs: Option<Spanned<Needs>>,
    #[serde(default)]
    access: Option<Spanned<Access>>,
    #[serde(default)]
    reuse: Reuse,
}

/// Why a manifest was refused: the field, where it is, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    /// Dotted path of the offending field (`needs.memory`, `inputs[1].name`), when known.
    pub field: Option<String>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MANIFEST_FILE)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl ManifestError {
    fn at<T>(field: impl Into<String>, spanned: &Spanned<T>, message: impl Into<String>) -> Self {
        let loc = spanned.referenced;
        let known = loc.line() > 0;
        ManifestError {
            field: Some(field.into()),
            line: known.then(|| loc.line() as usize),
            column: known.then(|| loc.column() as usize),
            message: message.into(),
        }
    }
}

/// The entry a private module's public manifest shows in place of its own.
pub const SEALED_ENTRY: &str = "sealed";

impl Manifest {
    /// What a private (sealed) module shows to everyone: its name, version, kind, runtime,
    /// description, license, tags and needs (so it can be found and placed). Its entry,
    /// config, inputs, outputs and access rules stay inside the sealed package; the entry
    /// reads [`SEALED_ENTRY`] (`sealed.wasm` for a WebAssembly module).
    pub fn public_part(&self) -> Manifest {
        let entry =
            if self.runtime == RuntimeKind::Wasm { format!("{SEALED_ENTRY}.wasm") } else { SEALED_ENTRY.into() };
        Manifest {
            name: self.name.clone(),
            version: self.version.clone(),
            kind: self.kind,
            runtime: self.runtime,
            entry,
            description: self.description.clone(),
            license: self.license.clone(),
            tags: self.tags.clone(),
            config: Value::Object(Default::default()),
            inputs: Vec::new(),
            outputs: Vec::new(),
            needs: self.needs.clone(),
            access: Access::default(),
            reuse: self.reuse,
        }
    }

    /// Parses and validates the text of a `module.yaml`.
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        if text.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError {
                field: None,
                line: None,
                column: None,
                message: format!("the file is {} bytes; the limit is {MAX_MANIFEST_BYTES}", text.len()),
            });
        }
        let path = RefCell::new(None::<String>);
        let raw: Result<RawManifest, _> =
            serde_saphyr::with_deserializer_from_str_with_options(text, crate::yaml::options(), |de| {
                serde_path_to_error::deserialize(de).map_err(|e| {
                    // `Spanned` wrappers show up as a `value` segment; the user never wrote it.
                    let p = e.path().to_string().replace(".value", "");
                    if p != "." && p != "?" && !p.is_empty() {
                        *path.borrow_mut() = Some(p);
                    }
                    e.into_inner()
                })
            });
        let raw = raw.map_err(|e| {
            let loc = crate::yaml::location(&e);
            ManifestError {
                field: path.into_inner(),
                line: loc.map(|l| l.0),
                column: loc.map(|l| l.1),
                message: crate::yaml::message(&e),
            }
        })?;
        raw.validate()
    }

    /// The config as a mapping (an empty one when the manifest has none).
    pub fn default_config(&self) -> &Value {
        &self.config
    }
}

impl RawManifest {
    fn validate(self) -> Result<Manifest, ManifestError> {
        let version = self.version.to_string();
        if version.len() > crate::version::MAX_VERSION_LEN {
            return Err(ManifestError {
                field: Some("version".into()),
                line: None,
                column: None,
                message: format!(
                    "the version has {} bytes; the most is {}",
                    version.len(),
                    crate::version::MAX_VERSION_LEN
                ),
            });
        }
        let entry = &self.entry;
        match self.runtime {
            RuntimeKind::Builtin => {
                if entry.value.is_empty()
                    || !entry.value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                {
                    return Err(ManifestError::at(
                        "entry",
                        entry,
                        format!("{:?} is not a builtin name (letters, digits, '.', '_' and '-')", entry.value),
                    ));
                }
            }
            _ => {
                if let Err(why) = check_relative_path(&entry.value) {
                    return Err(ManifestError::at("entry", entry, format!("{:?} {why}", entry.value)));
                }
            }
        }
        if self.runtime == RuntimeKind::Wasm && !entry.value.ends_with(".wasm") {
            return Err(ManifestError::at(
                "entry",
                entry,
                format!("{:?}: a wasm module's entry is a .wasm file", entry.value),
            ));
        }
        let mut tags = Vec::with_capacity(self.tags.len());
        for (i, t) in self.tags.iter().enumerate() {
            if let Err(e) = check_ident("tag", &t.value) {
                return Err(ManifestError::at(format!("tags[{i}]"), t, e.to_string()));
            }
            tags.push(t.value.clone());
        }
        let config = match self.config {
            None => Value::Object(Default::default()),
            Some(c) if c.value.is_null() => Value::Object(Default::default()),
            Some(c) if c.value.is_object() => c.value,
            Some(c) => return Err(ManifestError::at("config", &c, "the default config must be a mapping")),
        };
        let inputs = check_ports("inputs", self.inputs)?;
        let outputs = check_ports("outputs", self.outputs)?;
        let access = match self.access {
            None => Access::default(),
            Some(a) => {
                for (i, k) in a.value.trusted.iter().enumerate() {
                    let ok = k.split_once(':').is_some_and(|(t, b)| {
                        matches!(t, "ed25519" | "secp256k1")
                            && !b.is_empty()
                            && b.len() <= 64
                            && b.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
                    });
                    if !ok {
                        return Err(ManifestError::at(
                            format!("access.trusted[{i}]"),
                            &a,
                            format!("{k:?} is not a key (ed25519:… or secp256k1:…)"),
                        ));
                    }
                }
                for f in a.value.functions.keys() {
                    if let Err(e) = check_ident("function name", f) {
                        return Err(ManifestError::at("access.functions", &a, e.to_string()));
                    }
                }
                a.value
            }
        };
        let needs = match self.needs {
            None => Needs::default(),
            Some(n) => {
                if !(n.value.cpu.is_finite() && n.value.cpu >= 0.0 && n.value.cpu <= 4096.0) {
                    return Err(ManifestError::at("needs.cpu", &n, "cpu must be between 0 and 4096 cores"));
                }
                n.value
            }
        };
        if self.description.len() > 16 * 1024 {
            return Err(ManifestError {
                field: Some("description".into()),
                line: None,
                column: None,
                message: "the description is longer than 16 KiB".into(),
            });
        }
        Ok(Manifest {
            name: self.name,
            version: self.version,
            kind: self.kind,
            runtime: self.runtime,
            entry: self.entry.value,
            description: self.description,
            license: self.license,
            tags,
            config,
            inputs,
            outputs,
            needs,
            access,
            reuse: self.reuse,
        })
    }
}

fn check_ports(field: &str, ports: Vec<Spanned<Port>>) -> Result<Vec<Port>, ManifestError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(ports.len());
    for (i, p) in ports.into_iter().enumerate() {
        if let Err(e) = check_ident("port name", &p.value.name) {
            return Err(ManifestError::at(format!("{field}[{i}].name"), &p, e.to_string()));
        }
        if !seen.insert(p.value.name.clone()) {
            return Err(ManifestError::at(
                format!("{field}[{i}].name"),
                &p,
                format!("{:?} is declared twice", p.value.name),
            ));
        }
        out.push(p.value);
    }
    Ok(out)
}

/// Checks a path inside a module folder: relative, `/`-separated, no `..`, no empty or
/// `.` segments, no backslashes or NULs, at most 255 bytes.
pub fn check_relative_path(p: &str) -> Result<(), &'static str> {
    if p.is_empty() {
        return Err("is empty");
    }
    if p.len() > 255 {
        return Err("is longer than 255 bytes");
    }
    if p.starts_with('/') {
        return Err("is an absolute path");
    }
    if p.contains('\\') || p.contains('\0') {
        return Err("contains a backslash or NUL");
    }
    for seg in p.split('/') {
        match seg {
            "" => return Err("has an empty segment"),
            "." => return Err("has a '.' segment"),
            ".." => return Err("leaves the module folder ('..')"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joined_needs_take_the_larger_of_each() {
        let a = Needs {
            cpu: 2.0,
            memory: ByteSize(1 << 30),
            gpu: 0,
            storage: ByteSize(5),
            libraries: vec!["numpy>=1.26".into()],
            network: false,
        };
        let b = Needs {
            cpu: 0.5,
            memory: ByteSize(8 << 30),
            gpu: 1,
            storage: ByteSize(0),
            libraries: vec!["torch".into(), "numpy>=1.26".into()],
            network: true,
        };
        let j = a.joined(&b);
        assert_eq!((j.cpu, j.memory, j.gpu, j.storage), (2.0, ByteSize(8 << 30), 1, ByteSize(5)));
        assert_eq!(j.libraries, ["numpy>=1.26", "torch"]);
        assert!(j.network);
        assert_eq!(a.joined(&Needs::default()), a);
    }

    const GOOD: &str = "\
name: fl.softmax.worker
version: 0.1.0
kind: task
runtime: wasm
entry: module.wasm
description: Softmax regression trained with SGD.
license: Apache-2.0
tags: [fl, softmax]
config:
  lr: 0.1
  dataset:
    name: digits
    batch_size: 32
inputs:
  - name: model
    type: safetensors
outputs:
  - name: model
    type: safetensors
  - name: metrics
    type: json
needs:
  cpu: 1
  memory: 64MiB
";

    #[test]
    fn parses_a_full_manifest() {
        let m = Manifest::parse(GOOD).unwrap();
        assert_eq!(m.name.as_str(), "fl.softmax.worker");
        assert_eq!(m.version.to_string(), "0.1.0");
        assert_eq!(m.kind, Kind::Task);
        assert_eq!(m.runtime, RuntimeKind::Wasm);
        assert_eq!(m.config["dataset"]["batch_size"], 32);
        assert_eq!(m.config["lr"], 0.1);
        assert_eq!(m.outputs[1].ty, PortType::Json);
        assert_eq!(m.needs.memory, ByteSize(64 << 20));
        assert_eq!(m.tags, ["fl", "softmax"]);
    }

    #[test]
    fn minimal_manifest_gets_defaults() {
        let m = Manifest::parse("name: a\nversion: 1.0.0\nkind: model\nruntime: builtin\nentry: echo\n").unwrap();
        assert!(m.config.as_object().unwrap().is_empty());
        assert!(m.inputs.is_empty());
        assert_eq!(m.needs, Needs::default());
    }

    fn err(text: &str) -> ManifestError {
        Manifest::parse(text).expect_err("should be refused")
    }

    #[test]
    fn errors_name_the_field_and_line() {
        let e = err(&GOOD.replace("version: 0.1.0", "version: one"));
        assert_eq!(e.field.as_deref(), Some("version"), "{e}");
        assert_eq!(e.line, Some(2), "{e}");

        let e = err(&GOOD.replace("name: fl.softmax.worker", "name: Fl..worker"));
        assert_eq!(e.field.as_deref(), Some("name"), "{e}");
        assert_eq!(e.line, Some(1), "{e}");
        assert!(e.to_string().contains("invalid module path"), "{e}");

        let e = err(&GOOD.replace("kind: task", "kind: widget"));
        assert_eq!(e.field.as_deref(), Some("kind"), "{e}");
        assert_eq!(e.line, Some(3), "{e}");

        let e = err(&GOOD.replace("memory: 64MiB", "memory: lots"));
        assert_eq!(e.field.as_deref(), Some("needs.memory"), "{e}");
        assert_eq!(e.line, Some(24), "{e}");
        assert!(e.to_string().contains("invalid size"), "{e}");

        let e = err(&GOOD.replace("entry: module.wasm", "entry: ../../etc/passwd.wasm"));
        assert_eq!(e.field.as_deref(), Some("entry"), "{e}");
        assert_eq!(e.line, Some(5), "{e}");

        let e = err(&GOOD.replace("  - name: metrics", "  - name: model"));
        assert_eq!(e.field.as_deref(), Some("outputs[1].name"), "{e}");
        assert_eq!(e.line, Some(20), "{e}");

        let e = err(&GOOD.replace("license:", "licence:"));
        assert!(e.to_string().contains("licence"), "{e}");
        assert_eq!(e.line, Some(7), "{e}");

        let e = err(&GOOD.replace("entry: module.wasm\n", ""));
        assert!(e.to_string().contains("entry"), "{e}");
    }

    #[test]
    fn refuses_hostile_yaml() {
        // Not YAML at all, or not a mapping.
        assert!(Manifest::parse("").is_err());
        assert!(Manifest::parse("[1, 2").is_err());
        assert!(Manifest::parse("- a\n- b\n").is_err());
        assert!(Manifest::parse("\0\u{1}\u{2}").is_err());
        // Duplicate keys.
        let e = err(&format!("{GOOD}name: other\n"));
        assert!(e.to_string().to_lowercase().contains("duplicate"), "{e}");
        // A billion laughs.
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 0..9 {
            let prev = if i == 0 { "a".to_string() } else { format!("a{}", i - 1) };
            bomb.push_str(&format!("a{i}: &a{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
        }
        assert!(Manifest::parse(&format!("{GOOD}config:\n  {bomb}")).is_err());
        // A version longer than a file name can carry; one just short enough is taken.
        let long = |n: usize| {
            format!("name: a.b\nversion: 1.0.0-{}\nkind: task\nruntime: builtin\nentry: echo\n", "a".repeat(n))
        };
        let e = Manifest::parse(&long(200)).unwrap_err();
        assert!(e.to_string().contains("the most is 128"), "{e}");
        Manifest::parse(&long(120)).unwrap();
        // Too big.
        let e = err(&format!("{GOOD}description: {}\n", "x".repeat(MAX_MANIFEST_BYTES)));
        assert!(e.to_string().contains("limit"), "{e}");
        // Deep nesting.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(Manifest::parse(&format!("name: {deep}")).is_err());
    }

    #[test]
    fn access_rules() {
        let m = Manifest::parse(&format!(
            "{GOOD}access:\n  default: trusted\n  trusted: [ed25519:AAAAAAAA]\n  functions:\n    evaluate: public\n    init: owner\n"
        ))
        .unwrap();
        assert_eq!(m.access.role_for("train"), Role::Trusted);
        assert_eq!(m.access.role_for("evaluate"), Role::Public);
        assert_eq!(m.access.role_for("init"), Role::Owner);
        assert_eq!(Manifest::parse(GOOD).unwrap().access.role_for("anything"), Role::Public);
        assert_eq!(Manifest::parse(GOOD).unwrap().reuse, Reuse::Never);
        assert_eq!(Manifest::parse(&format!("{GOOD}reuse: session\n")).unwrap().reuse, Reuse::Session);
        let e = err(&format!("{GOOD}reuse: always\n"));
        assert_eq!(e.field.as_deref(), Some("reuse"), "{e}");
        let e = err(&format!("{GOOD}access:\n  trusted: [not-a-key]\n"));
        assert_eq!(e.field.as_deref(), Some("access.trusted[0]"), "{e}");
        let e = err(&format!("{GOOD}access:\n  default: everyone\n"));
        assert!(e.to_string().contains("everyone"), "{e}");
    }

    #[test]
    fn config_must_be_a_mapping() {
        let e =
            err(&GOOD.replace("config:\n  lr: 0.1\n  dataset:\n    name: digits\n    batch_size: 32\n", "config: 3\n"));
        assert_eq!(e.field.as_deref(), Some("config"), "{e}");
    }

    #[test]
    fn relative_paths() {
        assert!(check_relative_path("a/b.wasm").is_ok());
        for bad in ["", "/a", "a/../b", "..", "a//b", "./a", "a\\b", "a\0"] {
            assert!(check_relative_path(bad).is_err(), "{bad:?}");
        }
    }
}
