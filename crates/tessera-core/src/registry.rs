//! The hub's records, as its REST API speaks them: packages, models and their lineage.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::manifest::Manifest;
use crate::wire::Lineage;
use crate::{Digest, Kind, RuntimeKind};

/// What the signature of a resumable upload's piece covers in place of its body's digest:
/// the BLAKE3 digest of the text `tessera-upload-piece {id} {offset} {len}`, binding the
/// signer to the upload, where the piece starts and its length in bytes. The bytes
/// themselves are proven by the upload's declared digest, which the hub checks over the
/// whole object before anything names it (as AWS Signature Version 4's `UNSIGNED-PAYLOAD`
/// leaves a body to another check), so neither side hashes a piece twice.
pub fn upload_piece_statement(id: &str, offset: u64, len: u64) -> Digest {
    Digest::of(format!("tessera-upload-piece {id} {offset} {len}").as_bytes())
}

/// A published package version.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PackageRecord {
    /// Module path.
    pub name: String,
    /// Semver version.
    pub version: String,
    /// The package id.
    pub digest: Digest,
    /// Compressed size in bytes.
    pub size: u64,
    /// Module kind.
    pub kind: Kind,
    /// Runtime.
    pub runtime: RuntimeKind,
    /// Description from the manifest.
    pub description: String,
    /// Tags from the manifest.
    pub tags: Vec<String>,
    /// When it was published (RFC 3339, UTC).
    pub published_at: String,
    /// The full manifest.
    pub manifest: Manifest,
    /// The publisher's key (`ed25519:…`), when the package was signed.
    #[serde(default)]
    pub signer: Option<String>,
    /// The publisher's signature over the digest (base64url), when signed.
    #[serde(default)]
    pub signature: Option<String>,
    /// True for a sealed package: the hub holds only ciphertext, readable by its
    /// recipients; the manifest is the public part of the publisher's declaration
    /// ([`Manifest::public_part`]).
    #[serde(default)]
    pub private: bool,
    /// Times this version was downloaded whole (range requests for a later part do not
    /// count).
    #[serde(default)]
    pub downloads: u64,
    /// Its card's facts and description, when the package has a `README.md` (the text is at
    /// `GET /api/v1/packages/{name}/{version}/card`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<crate::card::Card>,
    /// The Component Repository entry this record was resolved through
    /// (`transformation/custom.scale`), when it was: the package is that entry's current
    /// object, and `manifest.needs` are the package's own joined with the entry's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
}

/// A model stored in the hub.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// Model name (a module path).
    pub name: String,
    /// Semver version.
    pub version: String,
    /// Digest of the binary, when uploaded.
    pub digest: Option<Digest>,
    /// Size of the binary.
    pub size: Option<u64>,
    /// Free-form metadata (library, description, metrics...).
    pub metadata: Value,
    /// Where it came from, when a run produced it.
    pub lineage: Option<Lineage>,
    /// When the record was created (RFC 3339, UTC).
    pub created_at: String,
    /// The key that uploaded the binary (`ed25519:…`), when the upload was signed.
    #[serde(default)]
    pub signer: Option<String>,
    /// The key that last set the metadata or lineage, when that was signed.
    #[serde(default)]
    pub meta_signer: Option<String>,
    /// Times this version's binary was downloaded whole.
    #[serde(default)]
    pub downloads: u64,
    /// Its card, when one was given (`card` in the metadata upload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<crate::card::Card>,
}

/// One tensor of a safetensors file.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Its name.
    pub name: String,
    /// Its dtype as safetensors writes it (`F32`, `F16`, `BF16`, `I64`...).
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Where its bytes are, counted from the end of the header: `[start, end)`.
    pub data_offsets: [u64; 2],
}

/// The tensors a model file holds, read from its safetensors header alone.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorsInfo {
    /// The file's digest.
    pub digest: String,
    /// The file's size in bytes.
    pub size: u64,
    /// The header's `__metadata__`, if any.
    pub metadata: Option<std::collections::BTreeMap<String, String>>,
    /// Its tensors, in file order.
    pub tensors: Vec<TensorEntry>,
}

/// A model's lineage both ways: what made it, what it came from, what was built from it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelLineage {
    /// `name@version`.
    pub model: String,
    /// Its binary's digest.
    pub digest: Option<Digest>,
    /// The run that made it: session, strategy, modules with their digests, data sets,
    /// nodes, rounds and their metrics.
    pub made_by: Option<Lineage>,
    /// The model it was built from (`name@version`, from its lineage or its card).
    pub base_model: Option<String>,
    /// The models built from it (`name@version`), whose lineage or card names it.
    pub derived: Vec<String>,
}
