//! Calls: `POST /api/v1/call` (and `/call`), cancellation, and who owns their outputs.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde_json::{Value, json};
use tessera_core::wire::{CallOutput, CallRequest, CallResponse};
use tessera_core::{Digest, PackageRef};
use tessera_node::actors::Placement;
use tessera_node::{ActorError, ActorSpec};

use crate::api::{ApiError, Gateway, GatewayConfig, json_body};
use crate::authz::Caller;
use crate::forward::{Target, forwardable};

/// Running calls with an id, by (caller account, id): each caller has its own ids.
pub(crate) type CallRegistry = Mutex<HashMap<(String, String), CallEntry>>;

/// A running call.
pub(crate) struct CallEntry {
    /// Stops it (set once its task is spawned).
    abort: Option<tokio::task::AbortHandle>,
    /// The called module's package, when known before the call ran.
    module: Option<Digest>,
    /// Which call of that id this is (ids come back once a call ends).
    seq: u64,
}

impl CallEntry {
    fn stop(&self) {
        if let Some(a) = &self.abort {
            a.abort();
        }
    }
}

/// Numbers calls, so an ending call removes its own entry and no later one of the same id.
static CALL_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Which accounts made the call outputs kept as blobs (so only they read them back on a
/// node that checks grants). Bounded: the oldest records go first.
#[derive(Default)]
pub(crate) struct OutputOwners {
    owners: HashMap<Digest, Vec<String>>,
    order: VecDeque<Digest>,
}

/// Most output blobs whose owners a gateway remembers.
const REMEMBERED_OUTPUTS: usize = 100_000;

impl OutputOwners {
    fn add(&mut self, digest: Digest, account: String) {
        let list = self.owners.entry(digest).or_default();
        if list.is_empty() {
            self.order.push_back(digest);
        }
        if !list.contains(&account) {
            list.push(account);
        }
        while self.order.len() > REMEMBERED_OUTPUTS {
            if let Some(old) = self.order.pop_front() {
                self.owners.remove(&old);
            }
        }
    }

    pub(crate) fn owned_by(&self, digest: &Digest, account: &str) -> bool {
        self.owners.get(digest).is_some_and(|l| l.iter().any(|a| a == account))
    }
}

/// A call request, checked: what the gateway runs.
#[derive(Debug)]
pub struct CheckedCall {
    /// The request.
    pub request: CallRequest,
    /// Its time-out (the request's, cut to the gateway's longest, or the default).
    pub timeout: Duration,
    /// Its binary inputs, decoded.
    pub inputs: Vec<(String, Bytes)>,
}

/// Reads and checks a call request body (JSON [`CallRequest`]): the function is not a state
/// hook, the time-out is a finite positive number of seconds (longer than the gateway's
/// longest is cut to it), the id is an identifier, the inputs are base64. Errors are the
/// `400 bad_request` answers the route gives; nothing panics, whatever the bytes.
pub fn check_call(body: &[u8], config: &GatewayConfig) -> Result<CheckedCall, ApiError> {
    let request: CallRequest = json_body(body)?;
    if matches!(request.function.as_str(), "save_state" | "restore_state") {
        return Err(ApiError::bad(format!("{} is a state hook; the node calls it", request.function)));
    }
    let timeout = match request.timeout {
        None => config.default_timeout,
        Some(t) => {
            let max = config.max_timeout.as_secs_f64();
            let t = if t.is_finite() && t > max { max } else { t };
            tessera_core::time::seconds(t, config.max_timeout).map_err(|e| ApiError::bad(format!("timeout: {e}")))?
        }
    };
    if let Some(id) = &request.id {
        tessera_core::name::check_ident("call id", id).map_err(|e| ApiError::bad(e.to_string()))?;
    }
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for (k, v) in &request.inputs {
        tessera_core::name::check_ident("input name", k).map_err(|e| ApiError::bad(e.to_string()))?;
        let bytes = B64.decode(v).map_err(|e| ApiError::bad(format!("input {k:?} is not base64: {e}")))?;
        inputs.push((k.clone(), Bytes::from(bytes)));
    }
    Ok(CheckedCall { request, timeout, inputs })
}

fn kind_of(bytes: &[u8]) -> &'static str {
    if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok() {
        "json"
    } else if safetensors::SafeTensors::deserialize(bytes).is_ok() {
        "tensor"
    } else {
        "bytes"
    }
}

impl Gateway {
    /// Resolves a module reference to a package digest.
    pub(crate) async fn resolve(&self, module: &str) -> Result<Digest, ApiError> {
        let r: PackageRef = module.parse().map_err(|e| ApiError::bad(format!("module {module:?}: {e}")))?;
        Ok(self.node.resolve(&r).await.map_err(ActorError::from)?.digest)
    }

    async fn call_local(&self, call: &CheckedCall, name: &str, caller: &Caller) -> Result<CallResponse, ActorError> {
        let req = &call.request;
        let started = std::time::Instant::now();
        let outputs =
            self.actors.call(name, &req.function, &req.args, &req.kwargs, call.inputs.clone(), call.timeout).await;
        {
            use tessera_ports::metrics as m;
            let outcome = if outputs.is_ok() { "ok" } else { "failed" };
            metrics::counter!(m::CALLS, "actor" => name.to_owned(), "outcome" => outcome).increment(1);
            metrics::histogram!(m::CALL_SECONDS, "actor" => name.to_owned()).record(started.elapsed().as_secs_f64());
        }
        let outputs = outputs?;
        let mut result = Value::Null;
        let mut out = BTreeMap::new();
        for (n, bytes) in outputs {
            let kind = kind_of(&bytes);
            let small = bytes.len() <= self.config.inline_limit;
            if n == "result" && kind == "json" && small {
                result = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            }
            let (inline, digest) = if small {
                (Some(B64.encode(&bytes)), None)
            } else {
                let d = self.node.blobs().put(bytes.clone()).await.map_err(tessera_node::NodeError::from)?;
                self.outputs.lock().unwrap_or_else(|p| p.into_inner()).add(d, caller.account());
                (None, Some(d))
            };
            out.insert(n, CallOutput { size: bytes.len() as u64, kind: kind.into(), inline, digest });
        }
        Ok(CallResponse { actor: name.to_owned(), node: self.node.id().to_owned(), result, outputs: out })
    }

    async fn do_call(
        &self,
        call: CheckedCall,
        body: Bytes,
        forward: bool,
        caller: Caller,
    ) -> Result<Response, ApiError> {
        let req = &call.request;
        // `path@version` and digests name a module; anything else names an actor.
        let by_module = req.module.contains('@') || req.module.starts_with("b3:");
        let name = if by_module {
            let digest = self.resolve(&req.module).await?;
            let image = self.node.module(&digest).await?;
            image.manifest.name.to_string()
        } else {
            tessera_core::pipeline::check_actor_name(&req.module).map_err(ApiError::bad)?;
            req.module.clone()
        };
        if let Some(image) = self.actors.image(&name).await {
            self.authorize_call(&caller, &image, &req.function).await?;
            match self.call_local(&call, &name, &caller).await {
                Err(ActorError::NotFound(_)) => {}
                other => return Ok(Json(other?).into_response()),
            }
        }
        // Not here: elsewhere in the cluster, or to be launched.
        if let Some(p) = self.actors.locate(&name).await?
            && p.node != self.node.id()
        {
            return self.forward_call(&p, &name, body, forward, caller.key().is_some()).await;
        }
        if !self.config.spawn_on_call {
            return Err(ActorError::NotFound(name).into());
        }
        let module = if by_module { req.module.clone() } else { name.clone() };
        let digest = match self.resolve(&module).await {
            Ok(d) => d,
            Err(e) if e.status() == StatusCode::NOT_FOUND => return Err(ActorError::NotFound(name).into()),
            Err(e) => return Err(e),
        };
        let image = self.node.module(&digest).await?;
        self.authorize_call(&caller, &image, &req.function).await?;
        let spec = ActorSpec { module: digest, tag: None, replicas: 1, config: json!({}), priority: 0 };
        match self.actors.launch(spec).await {
            Ok(info) => {
                tracing::info!(actor = %info.name, "launched by a call");
                Ok(Json(self.call_local(&call, &info.name, &caller).await?).into_response())
            }
            Err(ActorError::Elsewhere { placement, .. }) => {
                self.forward_call(&placement, &name, body, forward, caller.key().is_some()).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends a call to the node running the actor. A signed call is addressed to this node,
    /// so it cannot be forwarded: the caller is told where to sign it for.
    async fn forward_call(
        &self,
        p: &Placement,
        name: &str,
        body: Bytes,
        forward: bool,
        signed: bool,
    ) -> Result<Response, ApiError> {
        if !forward || signed {
            let why = if signed { "; a signed call goes to that node directly" } else { "" };
            return Err(Target::from(p).elsewhere(name, why));
        }
        self.forward(&p.into(), reqwest::Method::POST, "/api/v1/call", Some(body)).await
    }

    /// The package a call will run, when it can be known without loading anything.
    async fn module_hint(&self, req: &CallRequest) -> Option<Digest> {
        if req.module.contains('@') || req.module.starts_with("b3:") {
            return self.resolve(&req.module).await.ok();
        }
        self.actors.image(&req.module).await.map(|i| i.digest)
    }
}

/// Calls a function of an actor (`module`: an actor name, or `path@version` / a digest to
/// launch). Takes `{module, function, args, kwargs, inputs, timeout, id}`; outputs over the
/// inline limit come back as blobs (`GET /api/v1/blobs/{digest}`, readable by the caller).
#[utoipa::path(post, path = "/api/v1/call", request_body = CallRequest,
    responses((status = 200, body = CallResponse), (status = 400, body = Value), (status = 401, body = Value), (status = 403, body = Value), (status = 404, body = Value), (status = 409, body = Value), (status = 422, body = Value), (status = 504, body = Value), (status = 507, body = Value)))]
pub(crate) async fn call(
    State(gw): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let checked = check_call(&body, &gw.config)?;
    let forward = forwardable(&headers);
    let Some(id) = checked.request.id.clone() else {
        return gw.do_call(checked, body, forward, caller).await;
    };
    let key = (caller.account(), id.clone());
    let module = gw.module_hint(&checked.request).await;
    let seq = CALL_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // The id is taken before anything runs: a duplicate is refused having done nothing.
    {
        let mut calls = gw.calls.lock().unwrap_or_else(|p| p.into_inner());
        if calls.contains_key(&key) {
            return Err(ApiError::new(StatusCode::CONFLICT, "duplicate", format!("a call with id {id:?} is running")));
        }
        calls.insert(key.clone(), CallEntry { abort: None, module, seq });
    }
    // A call with an id runs as its own task, so `POST /calls/<id>/cancel` can stop it.
    let task = {
        let gw = gw.clone();
        let caller = caller.clone();
        tokio::spawn(async move { gw.do_call(checked, body, forward, caller).await })
    };
    {
        let mut calls = gw.calls.lock().unwrap_or_else(|p| p.into_inner());
        match calls.get_mut(&key) {
            Some(e) if e.seq == seq => e.abort = Some(task.abort_handle()),
            // Cancelled before its task started.
            _ => task.abort(),
        }
    }
    // Aborted too when the caller goes away (this future is dropped).
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _guard = AbortOnDrop(task.abort_handle());
    let result = task.await;
    {
        let mut calls = gw.calls.lock().unwrap_or_else(|p| p.into_inner());
        if calls.get(&key).is_some_and(|e| e.seq == seq) {
            calls.remove(&key);
        }
    }
    match result {
        Ok(r) => r,
        Err(e) if e.is_cancelled() => {
            Err(ApiError::new(StatusCode::CONFLICT, "cancelled", format!("call {id:?} was cancelled")))
        }
        Err(e) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())),
    }
}

/// The same as `POST /api/v1/call`, at the root.
#[utoipa::path(post, path = "/call", request_body = CallRequest, responses((status = 200, body = CallResponse)))]
pub(crate) async fn call_short(
    state: State<Arc<Gateway>>,
    caller: Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    call(state, caller, headers, body).await
}

/// Cancels a running call by its id: the caller's own call of that id, or, for the owner
/// (signer) of the called module's package, anyone's. Others get 404, as if there were no
/// such call.
#[utoipa::path(post, path = "/api/v1/calls/{id}/cancel", params(("id" = String, Path, description = "The call's id")),
    responses((status = 200, body = Value), (status = 404, body = Value)))]
pub(crate) async fn cancel(
    State(gw): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let own = gw.calls.lock().unwrap_or_else(|p| p.into_inner()).remove(&(caller.account(), id.clone()));
    if let Some(entry) = own {
        entry.stop();
        return Ok(Json(json!({"cancelled": id})));
    }
    // Someone else's call of that id, of a module whose package this caller signed.
    if let Some(k) = caller.key() {
        let others: Vec<((String, String), Option<Digest>)> = gw
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|((_, i), _)| i == &id)
            .map(|(key, e)| (key.clone(), e.module))
            .collect();
        for (key, module) in others {
            let Some(d) = module else { continue };
            let owner = gw.node.resolve(&PackageRef::Digest(d)).await.ok().and_then(|r| r.signer);
            if owner.as_deref() == Some(&k.to_string()) {
                if let Some(entry) = gw.calls.lock().unwrap_or_else(|p| p.into_inner()).remove(&key) {
                    entry.stop();
                }
                return Ok(Json(json!({"cancelled": id})));
            }
        }
    }
    Err(ApiError::not_found(format!("no running call {id:?} of yours")))
}
