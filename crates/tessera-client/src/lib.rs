//! A client for the Tessera hub's REST API.
//!
//! Every download is verified against its digest before it is returned. [`HubClient`] is
//! also a [`PackageSource`], so a node on another machine pulls packages through it.
//!
//! [`gateway::GatewayClient`] speaks to a node's gateway (actors, calls, queues), and
//! [`pipeline::run`] runs a pipeline file through one.
//!
//! This crate speaks HTTP to a hub and to nodes; it does not store anything.

pub mod gateway;
mod models;
pub mod pipeline;

pub use models::{ModelSource, PIECE, RESUMABLE_FROM, UploadMeta, UploadState};

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tessera_core::registry::{ModelRecord, PackageRecord};
use tessera_core::wire::Lineage;
use tessera_core::{Digest, PackageRef};
use tessera_identity::envelope::HEADER as SIGNATURE_HEADER;
use tessera_identity::{Envelope, KeyPair, PACKAGE_SIGNATURE_HEADER, PackageSignature, PublicKey, now_ms};
use tessera_ports::{PackageSource, SourceError};

/// The default hub address.
pub const DEFAULT_HUB: &str = "http://127.0.0.1:7700";

/// Why a hub call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The hub answered with an error.
    #[error("hub answered {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The hub's message.
        message: String,
    },
    /// The hub could not be reached.
    #[error(
        "cannot reach the hub at {url}: {message} (is `tessera hub serve` running there? --hub or TESSERA_HUB say where the hub is)"
    )]
    Transport {
        /// Where.
        url: String,
        /// Why.
        message: String,
    },
    /// Downloaded bytes do not match their digest.
    #[error("download from {url} does not match its digest: expected {expected}, got {actual}")]
    Verify {
        /// Where.
        url: String,
        /// The digest asked for.
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },
    /// The hub's answer is not what the API promises.
    #[error("unexpected answer from {url}: {message}")]
    Decode {
        /// Where.
        url: String,
        /// What.
        message: String,
    },
    /// The hub address is not a URL.
    #[error("invalid hub address {0:?}: expected http://host:port")]
    Address(String),
    /// A hub's record is not what was asked for, or names something unsafe.
    #[error("the hub's answer cannot be trusted: {0}")]
    Untrusted(String),
    /// A local file could not be read or written.
    #[error("{0}")]
    Local(String),
}

impl ClientError {
    /// True for 404.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Status { status: 404, .. })
    }
    /// True for 409.
    pub fn is_conflict(&self) -> bool {
        matches!(self, ClientError::Status { status: 409, .. })
    }
    /// True when the hub is busy with the account's other uploads (429 `busy`): worth
    /// trying again shortly, unlike a quota.
    pub fn is_busy(&self) -> bool {
        matches!(self, ClientError::Status { status: 429, message } if message.starts_with("busy:"))
    }
}

/// A hub client. With a signer, every mutating request carries a signature envelope
/// addressed to the hub's key, and published packages carry the signer's package
/// signature.
#[derive(Clone)]
pub struct HubClient {
    base: String,
    http: reqwest::Client,
    signer: Option<Arc<KeyPair>>,
    audience: Arc<tokio::sync::OnceCell<PublicKey>>,
    known_hubs: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubClient")
            .field("base", &self.base)
            .field("signer", &self.signer.as_ref().map(|k| k.public().to_string()))
            .finish()
    }
}

/// Filters for [`HubClient::list`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct ListParams {
    /// Module-path prefix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Text search.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
    /// Every version.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// License (manifest or card).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    /// Library (`needs.libraries` or the card's `library_name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub library: Option<String>,
    /// Signer's key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// Records to skip.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Records to return (at most 1,000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
}

/// Filters for [`HubClient::search_models`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct ModelSearch {
    /// Name prefix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Text in the name or description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
    /// Tag (metadata `tags` or card).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// License (metadata or card).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    /// Library (metadata `library` or the card's `library_name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub library: Option<String>,
    /// Uploader's key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// Records to skip.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Records to return (at most 1,000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
}

fn seg(s: &str) -> String {
    // Names, versions and digests are checked to be URL-safe before they get here; encode
    // anything else so a bad value becomes a 400 from the hub, not a different route.
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b':' | b'+' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl HubClient {
    /// A client for the hub at `base` (e.g. `http://127.0.0.1:7700`).
    pub fn new(base: &str) -> Result<Self, ClientError> {
        let base = base.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) || base.len() < 10 {
            return Err(ClientError::Address(base));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| ClientError::Transport { url: base.clone(), message: e.to_string() })?;
        Ok(HubClient { base, http, signer: None, audience: Arc::default(), known_hubs: None })
    }

    /// Signs mutating requests (and published packages) with `key`.
    pub fn with_signer(mut self, key: Arc<KeyPair>) -> Self {
        self.signer = Some(key);
        self
    }

    /// Addresses signed requests to this hub key instead of asking the hub for it (pinning).
    pub fn with_hub_key(self, key: PublicKey) -> Self {
        let _ = self.audience.set(key);
        self
    }

    /// Remembers the key each hub address answered with the first time (a JSON file of
    /// address -> key, like SSH's known hosts), and refuses to sign for a hub whose key
    /// changed, or whose key is already known for another address: a server that relays
    /// what it is sent to the hub whose key it announces gets nothing signed.
    pub fn with_known_hubs(mut self, path: std::path::PathBuf) -> Self {
        self.known_hubs = Some(path);
        self
    }

    fn check_known(&self, key: &PublicKey) -> Result<(), ClientError> {
        let Some(path) = &self.known_hubs else { return Ok(()) };
        let mut known: std::collections::BTreeMap<String, String> = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| ClientError::Local(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(e) => return Err(ClientError::Local(format!("{}: {e}", path.display()))),
        };
        let key_text = key.to_string();
        match known.get(&self.base) {
            Some(k) if k == &key_text => return Ok(()),
            Some(k) => {
                return Err(ClientError::Untrusted(format!(
                    "the hub at {} now answers with the key {key_text}, but it was {k} when first seen; if its key really changed, remove it from {} (or pin it with --hub-key)",
                    self.base,
                    path.display()
                )));
            }
            None => {}
        }
        if let Some((other, _)) = known.iter().find(|(_, k)| *k == &key_text) {
            return Err(ClientError::Untrusted(format!(
                "the server at {} announces the key of the hub at {other}: it could pass on what is signed for it; if it is the same hub, pin its key with --hub-key",
                self.base
            )));
        }
        known.insert(self.base.clone(), key_text);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| ClientError::Local(format!("{}: {e}", dir.display())))?;
        }
        let text = serde_json::to_vec_pretty(&known).map_err(|e| ClientError::Local(e.to_string()))?;
        std::fs::write(path, text).map_err(|e| ClientError::Local(format!("{}: {e}", path.display())))
    }

    /// The signing key, if any.
    pub fn signer(&self) -> Option<&KeyPair> {
        self.signer.as_deref()
    }

    /// The hub's key, asked once from `/api/v1/health` unless pinned.
    pub async fn hub_key(&self) -> Result<PublicKey, ClientError> {
        let key = self
            .audience
            .get_or_try_init(|| async {
                let h = self.health().await?;
                let text = h["key"].as_str().unwrap_or_default().to_owned();
                let key = text
                    .parse::<PublicKey>()
                    .map_err(|e| ClientError::Decode { url: self.url("/health"), message: format!("hub key: {e}") })?;
                self.check_known(&key)?;
                Ok::<_, ClientError>(key)
            })
            .await?;
        Ok(key.clone())
    }

    /// Adds the signature envelope to a request when there is a signer.
    async fn sign(
        &self,
        req: reqwest::RequestBuilder,
        method: &str,
        url: &str,
        body: &[u8],
    ) -> Result<reqwest::RequestBuilder, ClientError> {
        self.sign_digest(req, method, url, Digest::of(body)).await
    }

    /// Adds the signature envelope for a body whose digest is known (a streamed body).
    async fn sign_digest(
        &self,
        req: reqwest::RequestBuilder,
        method: &str,
        url: &str,
        body: Digest,
    ) -> Result<reqwest::RequestBuilder, ClientError> {
        let Some(key) = &self.signer else { return Ok(req) };
        let audience = self.hub_key().await?;
        let path = url.strip_prefix(&self.base).unwrap_or(url);
        let env = Envelope::sign_digest(key, &audience, method, path, body, now_ms());
        Ok(req.header(SIGNATURE_HEADER, env.to_header()))
    }

    /// The hub's address.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder, url: &str) -> Result<reqwest::Response, ClientError> {
        let resp = req.send().await.map_err(|e| ClientError::Transport { url: url.to_owned(), message: causes(&e) })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(text);
        Err(ClientError::Status { status, message })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<(u16, T), ClientError> {
        let resp = self.send(req, url).await?;
        let status = resp.status().as_u16();
        let bytes =
            resp.bytes().await.map_err(|e| ClientError::Transport { url: url.to_owned(), message: e.to_string() })?;
        let v = serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Decode { url: url.to_owned(), message: e.to_string() })?;
        Ok((status, v))
    }

    async fn bytes(&self, url: &str, expected: Option<Digest>) -> Result<(Bytes, Digest), ClientError> {
        let req = self.sign(self.http.get(url), "GET", url, b"").await?;
        let resp = self.send(req, url).await?;
        let announced =
            resp.headers().get("x-tessera-digest").and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<Digest>().ok());
        let body =
            resp.bytes().await.map_err(|e| ClientError::Transport { url: url.to_owned(), message: e.to_string() })?;
        let actual = Digest::of(&body);
        if let Some(expected) = expected.or(announced)
            && expected != actual
        {
            return Err(ClientError::Verify { url: url.to_owned(), expected, actual });
        }
        Ok((body, actual))
    }

    /// Checks the hub is up.
    pub async fn health(&self) -> Result<Value, ClientError> {
        let url = self.url("/health");
        Ok(self.json(self.http.get(&url), &url).await?.1)
    }

    /// Publishes package bytes, signed by the signer when there is one. Returns the record
    /// and whether it was new.
    pub async fn publish(&self, bytes: Vec<u8>) -> Result<(PackageRecord, bool), ClientError> {
        self.publish_declared(bytes, None).await
    }

    /// Publishes package bytes that hold `name@version` (declared, so the hub can refuse an
    /// unauthorized upload before reading it, and checks the package says so).
    pub async fn publish_declared(
        &self,
        bytes: Vec<u8>,
        declared: Option<(&str, &str)>,
    ) -> Result<(PackageRecord, bool), ClientError> {
        let url = self.url("/packages");
        let digest = Digest::of(&bytes);
        let mut req = self
            .http
            .post(&url)
            .header("content-type", "application/octet-stream")
            .header("x-tessera-digest", digest.to_string());
        if let Some((name, version)) = declared {
            req = req.header("x-tessera-package", format!("{name}@{version}"));
        }
        if let Some(key) = &self.signer {
            req = req.header(PACKAGE_SIGNATURE_HEADER, PackageSignature::sign(key, &digest).to_header());
        }
        let req = self.sign(req, "POST", &url, &bytes).await?.body(bytes);
        let (status, rec) = self.json(req, &url).await?;
        Ok((rec, status == 201))
    }

    /// Lists packages.
    pub async fn list(&self, params: &ListParams) -> Result<Vec<PackageRecord>, ClientError> {
        let url = self.url("/packages");
        Ok(self.json(self.http.get(&url).query(params), &url).await?.1)
    }

    /// Every version of a package.
    pub async fn versions(&self, name: &str) -> Result<Vec<PackageRecord>, ClientError> {
        let url = self.url(&format!("/packages/{}", seg(name)));
        Ok(self.json(self.http.get(&url), &url).await?.1)
    }

    /// Resolves a reference to its record.
    pub async fn show(&self, reference: &PackageRef) -> Result<PackageRecord, ClientError> {
        match reference {
            PackageRef::Named { name, selector } => {
                let url = self.url(&format!("/packages/{}/{}", seg(name.as_str()), seg(&selector.to_string())));
                Ok(self.json(self.http.get(&url), &url).await?.1)
            }
            PackageRef::Digest(d) => {
                let url = self.url(&format!("/digests/{}", seg(&d.to_string())));
                Ok(self.json(self.http.get(&url), &url).await?.1)
            }
            PackageRef::Component { collection, id } => {
                let url = self.url(&format!("/components/{}/{}/package", collection.name(), seg(id)));
                Ok(self.json(self.http.get(&url), &url).await?.1)
            }
        }
    }

    /// Downloads a package, verified, with its record. The record is checked against the
    /// reference ([`check_record`]) before anything is fetched.
    pub async fn download(&self, reference: &PackageRef) -> Result<(PackageRecord, Bytes), ClientError> {
        let record = self.show(reference).await?;
        check_record(reference, &record)?;
        let bytes = self.blob(&record.digest).await?;
        Ok((record, bytes))
    }

    /// The document of a transformation, service or inferencer as its owner wrote it
    /// (`GET /{collection}/meta?id=`, the Component Repository's route; the hub's own
    /// `tessera` object removed).
    pub async fn component_document(
        &self,
        collection: tessera_core::version::ComponentCollection,
        id: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, ClientError> {
        let url = format!("{}/{}/meta", self.base, collection.name());
        let mut doc: serde_json::Map<String, serde_json::Value> =
            self.json(self.http.get(&url).query(&[("id", id)]), &url).await?.1;
        doc.remove("tessera");
        Ok(doc)
    }

    /// Downloads any blob the hub serves, verified against `digest`. With a signer the
    /// request is signed, so private packages granted to it can be read.
    pub async fn blob(&self, digest: &Digest) -> Result<Bytes, ClientError> {
        let url = self.url(&format!("/blobs/{}", seg(&digest.to_string())));
        Ok(self.bytes(&url, Some(*digest)).await?.0)
    }

    /// Publishes a sealed package with its declared manifest (signed by the signer, which
    /// is required).
    pub async fn publish_private(
        &self,
        sealed: Vec<u8>,
        manifest: &tessera_core::Manifest,
    ) -> Result<(PackageRecord, bool), ClientError> {
        use base64::Engine;
        // Only the public part travels in clear; the rest is inside the sealed package.
        let declared = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&manifest.public_part()).expect("serialisable"));
        let url = self.url("/packages");
        let digest = Digest::of(&sealed);
        let key = self.signer.as_ref().ok_or_else(|| ClientError::Status {
            status: 401,
            message: "private packages must be signed: no key".into(),
        })?;
        let req = self
            .http
            .post(&url)
            .header("content-type", "application/octet-stream")
            .header("x-tessera-digest", digest.to_string())
            .header("x-tessera-manifest", declared)
            .header(PACKAGE_SIGNATURE_HEADER, PackageSignature::sign(key, &digest).to_header());
        let req = self.sign(req, "POST", &url, &sealed).await?.body(sealed);
        let (status, rec) = self.json(req, &url).await?;
        Ok((rec, status == 201))
    }

    /// The grants of a package (the signer must own its namespace).
    pub async fn grants(&self, name: &str) -> Result<Value, ClientError> {
        let url = self.url(&format!("/packages/{}/grants", seg(name)));
        let req = self.sign(self.http.get(&url), "GET", &url, b"").await?;
        Ok(self.json(req, &url).await?.1)
    }

    /// Grants `key` the right to read a private package, until `expires` if given
    /// (`YYYY-MM-DDTHH:MM:SSZ`); with `revoke`, takes it away.
    pub async fn set_grant(
        &self,
        name: &str,
        key: &PublicKey,
        expires: Option<&str>,
        revoke: bool,
    ) -> Result<Value, ClientError> {
        let url = self.url(&format!("/packages/{}/grants/{}", seg(name), seg(&key.to_string())));
        let req = if revoke {
            self.sign(self.http.delete(&url), "DELETE", &url, b"").await?
        } else {
            let body = serde_json::to_vec(&json!({"expires": expires})).expect("serialisable");
            self.json_request("PUT", &url, body).await?
        };
        Ok(self.json(req, &url).await?.1)
    }

    /// The signer's usage on this hub.
    pub async fn usage(&self) -> Result<Value, ClientError> {
        let key = self
            .signer
            .as_ref()
            .ok_or_else(|| ClientError::Status { status: 401, message: "no key to ask with".into() })?;
        let url = self.url(&format!("/accounts/{}/usage", seg(&key.public().to_string())));
        let req = self.sign(self.http.get(&url), "GET", &url, b"").await?;
        Ok(self.json(req, &url).await?.1)
    }

    /// Deletes a package version.
    pub async fn delete(&self, name: &str, version: &str) -> Result<PackageRecord, ClientError> {
        let url = self.url(&format!("/packages/{}/{}", seg(name), seg(version)));
        let req = self.sign(self.http.delete(&url), "DELETE", &url, b"").await?;
        Ok(self.json(req, &url).await?.1)
    }

    /// Deletes a model version (its number stays reserved for the same bytes).
    pub async fn delete_model(&self, name: &str, version: &str) -> Result<ModelRecord, ClientError> {
        let url = self.url(&format!("/models/{}/{}", seg(name), seg(version)));
        let req = self.sign(self.http.delete(&url), "DELETE", &url, b"").await?;
        Ok(self.json(req, &url).await?.1)
    }

    /// Points an alias at a version.
    pub async fn set_alias(&self, name: &str, alias: &str, version: &str) -> Result<PackageRecord, ClientError> {
        let url = self.url(&format!("/packages/{}/aliases/{}", seg(name), seg(alias)));
        let body = serde_json::to_vec(&json!({"version": version})).expect("serialisable");
        Ok(self.json(self.json_request("PUT", &url, body).await?, &url).await?.1)
    }

    /// Creates a model record.
    pub async fn create_model(
        &self,
        name: &str,
        version: &str,
        metadata: &Value,
        lineage: Option<&Lineage>,
    ) -> Result<ModelRecord, ClientError> {
        let url = self.url("/models");
        let body = json!({"name": name, "version": version, "metadata": metadata, "lineage": lineage});
        let body = serde_json::to_vec(&body).expect("serialisable");
        Ok(self.json(self.json_request("POST", &url, body).await?, &url).await?.1)
    }

    /// Uploads a model binary held in memory (creating the record if needed). Large models
    /// go through [`HubClient::push_model_from`] with a file.
    pub async fn push_model(
        &self,
        name: &str,
        version: &str,
        bytes: Vec<u8>,
    ) -> Result<(ModelRecord, bool), ClientError> {
        self.push_model_from(name, version, ModelSource::Bytes(Bytes::from(bytes)), None).await
    }

    /// Replaces a model's metadata.
    pub async fn update_model_meta(
        &self,
        name: &str,
        version: &str,
        metadata: &Value,
        lineage: Option<&Lineage>,
    ) -> Result<ModelRecord, ClientError> {
        self.update_model_meta_with_card(name, version, metadata, lineage, None).await
    }

    /// Replaces a model's metadata and sets its card (a `README.md` with YAML front matter;
    /// kept when `None`).
    pub async fn update_model_meta_with_card(
        &self,
        name: &str,
        version: &str,
        metadata: &Value,
        lineage: Option<&Lineage>,
        card: Option<&str>,
    ) -> Result<ModelRecord, ClientError> {
        let url = self.url(&format!("/models/{}/{}/meta", seg(name), seg(version)));
        let body =
            serde_json::to_vec(&json!({"metadata": metadata, "lineage": lineage, "card": card})).expect("serialisable");
        Ok(self.json(self.json_request("PUT", &url, body).await?, &url).await?.1)
    }

    /// A model's record (`version` may be `latest`).
    pub async fn model(&self, name: &str, version: &str) -> Result<ModelRecord, ClientError> {
        let url = self.url(&format!("/models/{}/{}/meta", seg(name), seg(version)));
        Ok(self.json(self.http.get(&url), &url).await?.1)
    }

    /// The tensors of a model's binary (names, dtypes, shapes), read by the hub from the
    /// file's header: nothing of the file is downloaded.
    pub async fn model_tensors(
        &self,
        name: &str,
        version: &str,
    ) -> Result<tessera_core::registry::TensorsInfo, ClientError> {
        let url = self.url(&format!("/models/{}/{}/tensors", seg(name), seg(version)));
        Ok(self.json(self.http.get(&url), &url).await?.1)
    }

    /// A model's card (`version` may be `latest`).
    pub async fn model_card(&self, name: &str, version: &str) -> Result<tessera_core::card::Card, ClientError> {
        let url = self.url(&format!("/models/{}/{}/card", seg(name), seg(version)));
        Ok(self.json(self.http.get(&url), &url).await?.1)
    }

    /// A package version's card, from its README.md (`version` may be an alias).
    pub async fn package_card(&self, name: &str, version: &str) -> Result<tessera_core::card::Card, ClientError> {
        let url = self.url(&format!("/packages/{}/{}/card", seg(name), seg(version)));
        Ok(self.json(self.http.get(&url), &url).await?.1)
    }

    /// A model's lineage both ways (`version` may be `latest`).
    pub async fn model_lineage(
        &self,
        name: &str,
        version: &str,
    ) -> Result<tessera_core::registry::ModelLineage, ClientError> {
        let url = self.url(&format!("/models/{}/{}/lineage", seg(name), seg(version)));
        Ok(self.json(self.http.get(&url), &url).await?.1)
    }

    /// Models that pass the filters, a page of them.
    pub async fn search_models(&self, filters: &ModelSearch) -> Result<Vec<ModelRecord>, ClientError> {
        let url = self.url("/models");
        Ok(self.json(self.http.get(&url).query(filters), &url).await?.1)
    }

    /// Downloads a model's binary, verified, with its record.
    pub async fn pull_model(&self, name: &str, version: &str) -> Result<(ModelRecord, Bytes), ClientError> {
        let record = self.model(name, version).await?;
        let digest = record.digest.ok_or_else(|| ClientError::Status {
            status: 404,
            message: format!("model {}@{} has no binary yet", record.name, record.version),
        })?;
        let url = self.url(&format!("/models/{}/{}", seg(&record.name), seg(&record.version)));
        let (bytes, _) = self.bytes(&url, Some(digest)).await?;
        Ok((record, bytes))
    }

    /// A namespace's owners.
    pub async fn namespace(&self, namespace: &str) -> Result<Vec<String>, ClientError> {
        let url = self.url(&format!("/namespaces/{}", seg(namespace)));
        let (_, v): (u16, Value) = self.json(self.http.get(&url), &url).await?;
        Ok(v["owners"].as_array().into_iter().flatten().filter_map(|k| k.as_str().map(str::to_owned)).collect())
    }

    /// Adds (or, with `remove`, removes) an owner of a namespace; the signer must own it.
    pub async fn set_owner(&self, namespace: &str, key: &PublicKey, remove: bool) -> Result<Vec<String>, ClientError> {
        let url = self.url(&format!("/namespaces/{}/owners/{}", seg(namespace), seg(&key.to_string())));
        let (method, req) = if remove { ("DELETE", self.http.delete(&url)) } else { ("PUT", self.http.put(&url)) };
        let req = self.sign(req, method, &url, b"").await?;
        let (_, v): (u16, Value) = self.json(req, &url).await?;
        Ok(v["owners"].as_array().into_iter().flatten().filter_map(|k| k.as_str().map(str::to_owned)).collect())
    }

    async fn json_request(
        &self,
        method: &str,
        url: &str,
        body: Vec<u8>,
    ) -> Result<reqwest::RequestBuilder, ClientError> {
        let req = match method {
            "POST" => self.http.post(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.put(url),
        }
        .header("content-type", "application/json");
        Ok(self.sign(req, method, url, &body).await?.body(body))
    }

    /// Lists models.
    pub async fn models(&self, prefix: Option<&str>) -> Result<Vec<ModelRecord>, ClientError> {
        let url = self.url("/models");
        let mut req = self.http.get(&url);
        if let Some(p) = prefix {
            req = req.query(&[("prefix", p)]);
        }
        Ok(self.json(req, &url).await?.1)
    }
}

/// Checks a hub's record against what was asked for, treating it as untrusted: its name
/// must be a module path and its version a semver version (so neither can become an unsafe
/// file name), a named reference must get that name (and that version, when exact), and a
/// digest reference that digest.
pub fn check_record(reference: &PackageRef, record: &PackageRecord) -> Result<(), ClientError> {
    let untrusted = |m: String| ClientError::Untrusted(m);
    let name: tessera_core::ModulePath =
        record.name.parse().map_err(|e| untrusted(format!("the record names the package {:?}: {e}", record.name)))?;
    let version = tessera_core::version::Version::parse(&record.version)
        .map_err(|e| untrusted(format!("the record's version {:?}: {e}", record.version)))?;
    if name.as_str() != record.manifest.name.as_str() || version != record.manifest.version {
        return Err(untrusted(format!(
            "the record is for {}@{} but its manifest says {}@{}",
            record.name, record.version, record.manifest.name, record.manifest.version
        )));
    }
    match reference {
        PackageRef::Named { name: asked, selector } => {
            if asked != &name {
                return Err(untrusted(format!("asked for {asked}, the hub answered with {name}")));
            }
            if let tessera_core::version::Selector::Exact(v) = selector
                && !tessera_core::version::same_version(v, &version)
            {
                return Err(untrusted(format!("asked for {asked}@{v}, the hub answered with version {version}")));
            }
            if let tessera_core::version::Selector::Range(req) = selector
                && !req.matches(&version)
            {
                return Err(untrusted(format!("asked for {asked}@{req}, the hub answered with version {version}")));
            }
        }
        PackageRef::Digest(d) => {
            if d != &record.digest {
                return Err(untrusted(format!("asked for {d}, the hub answered with {}", record.digest)));
            }
        }
        PackageRef::Component { .. } => {
            let asked = reference.to_string();
            if record.component.as_deref() != Some(asked.as_str()) {
                return Err(untrusted(format!("asked for {asked}, the hub answered with {:?}", record.component)));
            }
        }
    }
    // Only an entry's answer names an entry (a run resumed later resolves through it).
    if let (Some(entry), PackageRef::Named { .. } | PackageRef::Digest(_)) = (&record.component, reference) {
        return Err(untrusted(format!("asked for {reference}, the hub answered with entry {entry}")));
    }
    Ok(())
}

/// An error's message with its causes (reqwest's own message hides them: "error sending
/// request" says nothing of the refused connection underneath).
pub(crate) fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

fn source_err(e: ClientError) -> SourceError {
    if e.is_not_found() { SourceError::NotFound(e.to_string()) } else { SourceError::Backend(e.to_string()) }
}

#[async_trait]
impl PackageSource for HubClient {
    async fn resolve(&self, reference: &PackageRef) -> Result<PackageRecord, SourceError> {
        let record = self.show(reference).await.map_err(source_err)?;
        check_record(reference, &record).map_err(|e| SourceError::Backend(e.to_string()))?;
        Ok(record)
    }
    async fn fetch(&self, digest: &Digest) -> Result<Bytes, SourceError> {
        self.blob(digest).await.map_err(source_err)
    }
}
