//! Secure aggregation, a node's part: the node trains as usual, then takes part in a
//! [`tessera_identity::secagg`] round with the other participants through world state, so
//! its model update leaves the node only masked; the coordinator learns the sum of the
//! participants' updates and nothing else.
//!
//! The vector a participant contributes is its example-weighted update, `(n / s) · (w − g)`
//! for every parameter followed by `n / s` itself (`n` its examples, `s` the session's
//! `weight_scale`, `g` the global model): the sum gives FedAvg's numerator and denominator.
//! Messages are blobs; world state holds their digests under
//! `<prefix>/{keys,directory,shares,relay,masked,unmask,unmasked}/...`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tessera_core::Digest;
use tessera_core::tensor::{Model, TensorLimits, Tensors};
use tessera_core::wire::WorkerMetrics;
use tessera_identity::secagg::{KeyDirectory, Participant, SecAggConfig, SharesFor, UnmaskRequest};
use tessera_ports::{BlobStore, Outputs, RuntimeError, WorldState};

use crate::node::NodeError;

/// What a task tells its node about the secure aggregation it takes part in (the task
/// config's `secagg`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggTask {
    /// The round's parameters, the same for every participant.
    pub config: SecAggConfig,
    /// This participant's number, 1..=n.
    pub id: u16,
    /// Where the round's messages go in world state.
    pub prefix: String,
    /// `s`: the example counts are divided by it, so the weighted values stay within the
    /// quantization range.
    pub weight_scale: f64,
    /// How long the coordinator waits for each step of the round, in seconds (a node waits
    /// twice that for the coordinator's answer).
    pub step_timeout_secs: f64,
}

fn refuse(why: impl std::fmt::Display) -> NodeError {
    NodeError::Runtime(RuntimeError::Module(format!("secure aggregation: {why}")))
}

/// Stores a message as a blob and its digest under `key`.
pub async fn post(world: &dyn WorldState, blobs: &dyn BlobStore, key: &str, bytes: Vec<u8>) -> Result<(), NodeError> {
    let d = blobs.put(Bytes::from(bytes)).await?;
    world.put(key, Bytes::from(d.to_string())).await?;
    Ok(())
}

/// The message under `key`, if it is there.
pub async fn fetch(world: &dyn WorldState, blobs: &dyn BlobStore, key: &str) -> Result<Option<Bytes>, NodeError> {
    let Some(e) = world.get(key).await? else { return Ok(None) };
    let d: Digest = std::str::from_utf8(&e.value)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| refuse("bad message reference"))?;
    Ok(blobs.get(&d).await?)
}

async fn wait_for(
    world: &dyn WorldState,
    blobs: &dyn BlobStore,
    key: &str,
    timeout: Duration,
) -> Result<Bytes, NodeError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(b) = fetch(world, blobs, key).await? {
            return Ok(b);
        }
        if Instant::now() >= deadline {
            return Err(refuse(format!("no {key} within {} s", timeout.as_secs_f64())));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The weighted update vector of a trained model.
pub fn weighted_update(
    global: &Tensors,
    model: &Tensors,
    examples: u64,
    weight_scale: f64,
) -> Result<Vec<f32>, String> {
    global.check_same_layout(model).map_err(|e| e.to_string())?;
    let w = (examples as f64 / weight_scale) as f32;
    let mut v = Vec::new();
    for (name, t) in &model.0 {
        v.extend(t.data.iter().zip(&global.0[name].data).map(|(m, g)| w * (m - g)));
    }
    v.push(w);
    Ok(v)
}

/// Takes part in the round: trains' outputs in, outputs without the model out (the model
/// went, masked, into the sum).
pub async fn participate(
    world: &dyn WorldState,
    blobs: &dyn BlobStore,
    task: &SecAggTask,
    global: Option<&[u8]>,
    outputs: Outputs,
) -> Result<Outputs, NodeError> {
    let global = global.ok_or_else(|| refuse("the task has no `model` input"))?;
    // Any float type (summed as f32); integer tensors stay out of the sum, as they would
    // be one participant's own values: the coordinator keeps the global model's.
    let global = Model::decode(global, TensorLimits::default()).map_err(|e| refuse(format!("model input: {e}")))?;
    let model = outputs.iter().find(|(n, _)| n == "model").ok_or_else(|| refuse("the worker gave no `model`"))?;
    let model = Model::decode(&model.1, TensorLimits::default()).map_err(|e| refuse(format!("model output: {e}")))?;
    global.check_same_layout(&model).map_err(|e| refuse(format!("model output: {e}")))?;
    let (global, model) = (global.floats, model.floats);
    let metrics = outputs.iter().find(|(n, _)| n == "metrics").ok_or_else(|| refuse("the worker gave no `metrics`"))?;
    let metrics: WorkerMetrics = serde_json::from_slice(&metrics.1).map_err(|e| refuse(format!("metrics: {e}")))?;
    if !(task.weight_scale.is_finite() && task.weight_scale > 0.0) {
        return Err(refuse("weight_scale must be positive"));
    }
    let x = weighted_update(&global, &model, metrics.num_examples, task.weight_scale).map_err(refuse)?;
    if x.len() != task.config.vector_len {
        return Err(refuse(format!("the update has {} values; the round expects {}", x.len(), task.config.vector_len)));
    }
    let input = task.config.quantize(&x).map_err(refuse)?;
    // The coordinator answers each step once it has every participant's message or its
    // step ran out waiting for those that dropped out, and it may have begun waiting just
    // before this node posted: a node waits two steps for the answer, so a dropout never
    // makes the others miss it.
    let step = 2 * Duration::from_secs_f64(task.step_timeout_secs.clamp(0.1, 3600.0));
    let p = &task.prefix;
    let id = task.id;
    let (mut me, keys) = Participant::new(task.config.clone(), id).map_err(refuse)?;
    post(world, blobs, &format!("{p}/keys/{id}"), keys.to_bytes()).await?;
    let dir =
        KeyDirectory::from_bytes(&wait_for(world, blobs, &format!("{p}/directory"), step).await?).map_err(refuse)?;
    let bundle = me.share(&dir).map_err(refuse)?;
    post(world, blobs, &format!("{p}/shares/{id}"), bundle.to_bytes()).await?;
    let relayed =
        SharesFor::from_bytes(&wait_for(world, blobs, &format!("{p}/relay/{id}"), step).await?).map_err(refuse)?;
    let masked = me.masked_input(&relayed, &input).map_err(refuse)?;
    post(world, blobs, &format!("{p}/masked/{id}"), masked.to_bytes()).await?;
    let req =
        UnmaskRequest::from_bytes(&wait_for(world, blobs, &format!("{p}/unmask"), step).await?).map_err(refuse)?;
    let resp = me.unmask(&req).map_err(refuse)?;
    post(world, blobs, &format!("{p}/unmasked/{id}"), resp.to_bytes()).await?;
    Ok(outputs.into_iter().filter(|(n, _)| n != "model").collect())
}
