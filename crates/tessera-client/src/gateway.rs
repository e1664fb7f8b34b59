//! A client for a node's gateway: actors (launch, list, kill, call) and queues.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tessera_client::gateway::GatewayError> {
//! use serde_json::json;
//! let node = tessera_client::gateway::GatewayClient::new("http://127.0.0.1:7710")?;
//! let model = node.actor("demo.digits-sklearn");
//! let label = model.call("predict", vec![json!([vec![0.0; 64]])]).await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde_json::Value;
use tessera_core::Digest;
use tessera_core::wire::{ActorInfo, CallOutput, CallRequest, CallResponse, LaunchRequest};
use tessera_identity::envelope::HEADER as SIGNATURE_HEADER;
use tessera_identity::{Envelope, KeyPair, PublicKey, now_ms};

/// The default gateway address (`tessera node run` listens there unless told otherwise).
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7710";

/// Why a gateway request failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The gateway answered with an error.
    #[error("{message} ({kind}, HTTP {status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The error's kind (`not_found`, `module_error`, `timeout`, `queue_full`, …).
        kind: String,
        /// What went wrong.
        message: String,
    },
    /// The gateway could not be reached.
    #[error("cannot reach the node at {url}: {message}")]
    Transport {
        /// Where.
        url: String,
        /// Why.
        message: String,
    },
    /// The answer is not what the API promises.
    #[error("unexpected answer from {url}: {message}")]
    Decode {
        /// Where.
        url: String,
        /// What.
        message: String,
    },
    /// The address is not a URL.
    #[error("invalid node address {0:?}: expected http://host:port")]
    Address(String),
}

impl GatewayError {
    /// The error's kind, when the gateway answered.
    pub fn kind(&self) -> Option<&str> {
        match self {
            GatewayError::Api { kind, .. } => Some(kind),
            _ => None,
        }
    }
}

/// A node gateway client. With a signer, every request (calls, launches, kills, lists,
/// queues, blobs, cancels) carries a signature envelope addressed to the node's key, as
/// nodes with a policy require.
#[derive(Clone)]
pub struct GatewayClient {
    base: String,
    http: reqwest::Client,
    signer: Option<Arc<KeyPair>>,
    audience: Arc<tokio::sync::OnceCell<PublicKey>>,
}

/// An actor by name: calls go to `POST /api/v1/call`.
#[derive(Clone)]
pub struct ActorHandle {
    client: GatewayClient,
    name: String,
    timeout: Option<f64>,
}

impl ActorHandle {
    /// The same actor with a call time-out.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout.as_secs_f64());
        self
    }

    /// Calls `function` with positional arguments and returns its JSON result (for other
    /// outputs, use [`GatewayClient::call`]).
    pub async fn call(&self, function: &str, args: Vec<Value>) -> Result<Value, GatewayError> {
        let mut req = CallRequest::new(&self.name, function, args);
        req.timeout = self.timeout;
        let resp = self.client.call(&req).await?;
        match resp.outputs.get("result") {
            Some(out) if resp.result.is_null() && out.kind == "json" => {
                let bytes = self.client.output(out).await?;
                serde_json::from_slice(&bytes)
                    .map_err(|e| GatewayError::Decode { url: self.client.base.clone(), message: e.to_string() })
            }
            _ => Ok(resp.result),
        }
    }
}

impl GatewayClient {
    /// A client of the gateway at `endpoint` (`http://host:port`).
    pub fn new(endpoint: &str) -> Result<Self, GatewayError> {
        let base = endpoint.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) || base.len() < 10 {
            return Err(GatewayError::Address(endpoint.to_owned()));
        }
        let http = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| GatewayError::Transport { url: base.clone(), message: e.to_string() })?;
        Ok(GatewayClient { base, http, signer: None, audience: Arc::default() })
    }

    /// Signs requests with `key`.
    pub fn with_signer(mut self, key: Arc<KeyPair>) -> Self {
        self.signer = Some(key);
        self
    }

    /// The node's key, asked once from `/api/v1/health`.
    pub async fn node_key(&self) -> Result<PublicKey, GatewayError> {
        let url = format!("{}/api/v1/health", self.base);
        let key = self
            .audience
            .get_or_try_init(|| async {
                let resp = self.send(self.http.get(&url), &url).await?;
                let v: Value = self.json(resp, &url).await?;
                v["key"].as_str().unwrap_or_default().parse::<PublicKey>().map_err(|e| GatewayError::Decode {
                    url: url.clone(),
                    message: format!("the node has no usable key ({e}); it cannot take signed requests"),
                })
            })
            .await?;
        Ok(key.clone())
    }

    /// A request with a JSON body (or none), signed when there is a signer.
    async fn request(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::Response, GatewayError> {
        let mut req = self.http.request(method.clone(), url);
        let bytes = body.unwrap_or_default();
        if let Some(key) = &self.signer {
            let audience = self.node_key().await?;
            let path = url.strip_prefix(&self.base).unwrap_or(url);
            let env = Envelope::sign(key, &audience, method.as_str(), path, &bytes, now_ms());
            req = req.header(SIGNATURE_HEADER, env.to_header());
        }
        if !bytes.is_empty() {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(bytes);
        }
        self.send(req, url).await
    }

    /// The gateway's address.
    pub fn endpoint(&self) -> &str {
        &self.base
    }

    /// A handle on an actor (or a module, launched by the first call when the node allows).
    pub fn actor(&self, name: &str) -> ActorHandle {
        ActorHandle { client: self.clone(), name: name.to_owned(), timeout: None }
    }

    async fn send(&self, req: reqwest::RequestBuilder, url: &str) -> Result<reqwest::Response, GatewayError> {
        let resp =
            req.send().await.map_err(|e| GatewayError::Transport { url: url.to_owned(), message: e.to_string() })?;
        let status = resp.status().as_u16();
        if status < 400 {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        Err(GatewayError::Api {
            status,
            kind: v["kind"].as_str().unwrap_or("http").to_owned(),
            message: v["error"].as_str().map(str::to_owned).unwrap_or(text),
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        resp: reqwest::Response,
        url: &str,
    ) -> Result<T, GatewayError> {
        resp.json().await.map_err(|e| GatewayError::Decode { url: url.to_owned(), message: e.to_string() })
    }

    /// Calls a function.
    pub async fn call(&self, req: &CallRequest) -> Result<CallResponse, GatewayError> {
        let url = format!("{}/api/v1/call", self.base);
        let resp = self.request(reqwest::Method::POST, &url, Some(to_json(req))).await?;
        self.json(resp, &url).await
    }

    /// The bytes of a call's output (inline or from the node's blob store, verified).
    pub async fn output(&self, out: &CallOutput) -> Result<Bytes, GatewayError> {
        if let Some(inline) = &out.inline {
            return B64
                .decode(inline)
                .map(Bytes::from)
                .map_err(|e| GatewayError::Decode { url: self.base.clone(), message: format!("inline output: {e}") });
        }
        let Some(d) = out.digest else {
            return Err(GatewayError::Decode { url: self.base.clone(), message: "an output with no bytes".into() });
        };
        self.blob(&d).await
    }

    /// A blob by digest, verified.
    pub async fn blob(&self, digest: &Digest) -> Result<Bytes, GatewayError> {
        let url = format!("{}/api/v1/blobs/{digest}", self.base);
        let resp = self.request(reqwest::Method::GET, &url, None).await?;
        let bytes =
            resp.bytes().await.map_err(|e| GatewayError::Transport { url: url.clone(), message: e.to_string() })?;
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(GatewayError::Decode { url, message: format!("expected {digest}, got {actual}") });
        }
        Ok(bytes)
    }

    /// Launches an actor (get-or-create).
    pub async fn launch(&self, req: &LaunchRequest) -> Result<ActorInfo, GatewayError> {
        let url = format!("{}/api/v1/actors", self.base);
        let resp = self.request(reqwest::Method::POST, &url, Some(to_json(req))).await?;
        self.json(resp, &url).await
    }

    /// The actors of the cluster.
    pub async fn actors(&self) -> Result<Vec<ActorInfo>, GatewayError> {
        let url = format!("{}/api/v1/actors", self.base);
        let resp = self.request(reqwest::Method::GET, &url, None).await?;
        self.json(resp, &url).await
    }

    /// Stops an actor.
    pub async fn kill(&self, name: &str) -> Result<ActorInfo, GatewayError> {
        let url = format!("{}/api/v1/actors/{name}", self.base);
        let resp = self.request(reqwest::Method::DELETE, &url, None).await?;
        self.json(resp, &url).await
    }

    /// Puts a JSON message on a queue; `queue_full` when the queue is at its bound.
    pub async fn queue_put(&self, queue: &str, value: &Value) -> Result<(), GatewayError> {
        let url = format!("{}/api/v1/queues/{queue}", self.base);
        self.request(reqwest::Method::POST, &url, Some(to_json(value))).await?;
        Ok(())
    }

    /// Puts a message, waiting while the queue is full (backpressure) up to `patience`.
    pub async fn queue_put_wait(&self, queue: &str, value: &Value, patience: Duration) -> Result<(), GatewayError> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut pause = Duration::from_millis(2);
        loop {
            match self.queue_put(queue, value).await {
                Err(e) if e.kind() == Some("queue_full") && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }

    /// Takes the next message of a queue, waiting up to `wait` (at most 30 s).
    pub async fn queue_get(&self, queue: &str, wait: Duration) -> Result<Option<Value>, GatewayError> {
        let url = format!("{}/api/v1/queues/{queue}/get?wait={}", self.base, wait.as_secs_f64());
        let resp = self.request(reqwest::Method::POST, &url, None).await?;
        if resp.status().as_u16() == 204 {
            return Ok(None);
        }
        self.json(resp, &url).await.map(Some)
    }

    /// Cancels a running call by its id.
    pub async fn cancel(&self, id: &str) -> Result<(), GatewayError> {
        let url = format!("{}/api/v1/calls/{id}/cancel", self.base);
        self.request(reqwest::Method::POST, &url, None).await?;
        Ok(())
    }

    /// Messages waiting in a queue.
    pub async fn queue_len(&self, queue: &str) -> Result<u64, GatewayError> {
        let url = format!("{}/api/v1/queues/{queue}", self.base);
        let resp = self.request(reqwest::Method::GET, &url, None).await?;
        let v: Value = self.json(resp, &url).await?;
        v["len"].as_u64().ok_or_else(|| GatewayError::Decode { url, message: "no len".into() })
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("request types serialize")
}
