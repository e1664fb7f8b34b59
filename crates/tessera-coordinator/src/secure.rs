//! Secure aggregation rounds: participants train, then mask their weighted updates in a
//! secure-aggregation protocol (Bonawitz et al., CCS 2017) driven here through world
//! state; the coordinator learns only the sum.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use tessera_core::config::deep_merge;
use tessera_core::tensor::{Model, TensorLimits};
use tessera_core::wire::{Failure, RoundTimings, TaskOutcome, WorkerMetrics};

use crate::engine::Coordinator;
use crate::fl::{Aggregated, RoundCtx, partition_config, too_few};
use crate::{SecAggSettings, SessionError};

impl Coordinator {
    /// A round under secure aggregation: participants train, then mask their weighted
    /// updates in a secure-aggregation round driven here through world state; the
    /// coordinator learns the sum (FedAvg's numerator and denominator) and applies it.
    pub(crate) async fn secure_round(
        &self,
        ctx: RoundCtx<'_>,
        sa: &SecAggSettings,
        plan_config: &Value,
    ) -> Result<crate::evaluation::Finished, SessionError> {
        use tessera_identity::secagg::{
            self as sagg, AdvertiseKeys, MaskedInput, SecAggConfig, ShareBundle, UnmaskResponse,
        };
        let RoundCtx { state, workers, round, started, selected, available, global, global_ref, seed_base } = ctx;
        let cfg = &state.config;
        let id = state.id.as_str();
        let model =
            Model::decode(&global, TensorLimits::default()).map_err(|e| SessionError::Aggregate(e.to_string()))?;
        let base = &model.floats;
        let params: usize = base.0.values().map(|t| t.data.len()).sum();
        let n = u16::try_from(selected.len()).map_err(|_| {
            SessionError::Participants(format!("round {round}: too many participants for secure aggregation"))
        })?;
        let sconfig = SecAggConfig {
            session: id.to_owned(),
            round,
            n,
            threshold: sa.threshold.unwrap_or(n / 2 + 1),
            vector_len: params + 1,
            clip: sa.clip,
            scale_bits: sa.scale_bits,
        };
        sconfig.validate().map_err(|e| SessionError::Config(format!("secure aggregation: {e}")))?;
        let prefix = format!("secagg/{id}/r{round}/{}", self.dispatch);
        let step = Duration::from_secs_f64(cfg.round_timeout_secs / 5.0);
        let attempt = format!(".{}", self.dispatch);
        let task = |i: usize| {
            json!({"secagg": {
                "config": sconfig,
                "id": i + 1,
                "prefix": prefix,
                "weight_scale": sa.weight_scale,
                "step_timeout_secs": step.as_secs_f64(),
            }})
        };
        let world = self.backend.world.clone();
        let blobs = self.backend.blobs.clone();
        let drive = async {
            let bad = |e: sagg::SecAggError| SessionError::Aggregate(format!("round {round}: secure aggregation: {e}"));
            let mut c = sagg::Coordinator::new(sconfig.clone()).map_err(bad)?;
            let post = |key: String, bytes: Vec<u8>| {
                let (world, blobs) = (world.clone(), blobs.clone());
                async move { tessera_node::secagg::post(world.as_ref(), blobs.as_ref(), &key, bytes).await }
            };
            for (_, b) in gather(world.as_ref(), blobs.as_ref(), &format!("{prefix}/keys"), n.into(), step).await? {
                if let Err(e) = AdvertiseKeys::from_bytes(&b).and_then(|m| c.receive_keys(m)) {
                    tracing::warn!("secure aggregation: keys refused: {e}");
                }
            }
            let dir = c.key_directory().map_err(bad)?;
            let u1 = dir.keys.len();
            post(format!("{prefix}/directory"), dir.to_bytes()).await?;
            for (_, b) in gather(world.as_ref(), blobs.as_ref(), &format!("{prefix}/shares"), u1, step).await? {
                if let Err(e) = ShareBundle::from_bytes(&b).and_then(|m| c.receive_shares(m)) {
                    tracing::warn!("secure aggregation: shares refused: {e}");
                }
            }
            let relayed = c.relay_shares().map_err(bad)?;
            let u2 = relayed.len();
            for r in relayed {
                post(format!("{prefix}/relay/{}", r.to), r.to_bytes()).await?;
            }
            for (_, b) in gather(world.as_ref(), blobs.as_ref(), &format!("{prefix}/masked"), u2, step).await? {
                if let Err(e) = MaskedInput::from_bytes(&b).and_then(|m| c.receive_masked(m)) {
                    tracing::warn!("secure aggregation: masked input refused: {e}");
                }
            }
            let req = c.unmask_request().map_err(bad)?;
            let u3 = req.survivors.len();
            post(format!("{prefix}/unmask"), req.to_bytes()).await?;
            for (_, b) in gather(world.as_ref(), blobs.as_ref(), &format!("{prefix}/unmasked"), u3, step).await? {
                if let Err(e) = UnmaskResponse::from_bytes(&b).and_then(|m| c.receive_unmask(m)) {
                    tracing::warn!("secure aggregation: unmask response refused: {e}");
                }
            }
            c.finish().map_err(bad)
        };
        let dispatch = self.dispatch(
            id,
            round,
            &selected,
            &attempt,
            workers,
            |i, participant| {
                let mut c = Self::worker_config(cfg, "train", seed_base + i as u64);
                deep_merge(&mut c, plan_config);
                deep_merge(&mut c, &partition_config(cfg, participant));
                deep_merge(&mut c, &task(i));
                c
            },
            |_, _| vec![global_ref.clone()],
            Duration::from_secs_f64(cfg.round_timeout_secs),
        );
        let (unmasked, replies) = tokio::join!(drive, dispatch);
        let replies = replies?;
        // The round's messages are no longer needed.
        if let Ok(keys) = self.backend.world.keys(&prefix).await {
            for k in keys {
                let _ = self.backend.world.delete(&k).await;
            }
        }
        let unmasked = unmasked?;
        let survivors: Vec<String> = unmasked.survivors.iter().map(|&i| selected[usize::from(i) - 1].clone()).collect();
        let mut failures = Vec::new();
        let mut examples = 0u64;
        let mut loss = 0.0f64;
        let mut compute_seconds = 0.0f64;
        for p in &selected {
            let in_sum = survivors.contains(p);
            match replies.replies.get(p).map(|r| &r.outcome) {
                Some(TaskOutcome::Ok { outputs, seconds }) if in_sum => {
                    let m = match outputs.iter().find(|o| o.name == "metrics") {
                        Some(o) => tessera_ports::read_ref(self.backend.blobs.as_ref(), o).await?,
                        None => None,
                    };
                    if let Some(m) = m.and_then(|b| serde_json::from_slice::<WorkerMetrics>(&b).ok()) {
                        examples += m.num_examples;
                        loss += m.loss * m.num_examples as f64;
                    }
                    compute_seconds = compute_seconds.max(*seconds);
                }
                Some(TaskOutcome::Failed { error }) => failures.push(Failure { node: p.clone(), error: error.clone() }),
                _ if in_sum => {}
                _ => failures.push(Failure { node: p.clone(), error: "dropped out of the secure aggregation".into() }),
            }
        }
        if survivors.len() < cfg.min_participants {
            return Err(too_few(round, survivors.len(), cfg.min_participants, &failures));
        }
        let sum = sconfig
            .dequantize_sum(&unmasked.sum, unmasked.survivors.len())
            .map_err(|e| SessionError::Aggregate(e.to_string()))?;
        let weight = f64::from(sum[params]);
        if !(weight.is_finite() && weight > 0.0) {
            return Err(SessionError::Aggregate(format!("round {round}: the summed weight is {weight}")));
        }
        let mut aggregate = base.clone();
        let mut at = 0;
        for t in aggregate.0.values_mut() {
            for v in t.data.iter_mut() {
                *v += (f64::from(sum[at]) / weight) as f32;
                at += 1;
            }
        }
        // Written back in the model's types; integer tensors stay the model's own (one
        // participant's would be its own values, which the protocol hides).
        let aggregate = model.with_floats(aggregate);
        let strategy = cfg.build_strategy().map_err(|e| SessionError::Config(e.to_string()))?;
        let result = Aggregated {
            selected,
            contributed: survivors,
            failures,
            examples,
            train_loss: if examples > 0 { loss / examples as f64 } else { 0.0 },
            compute_seconds,
            model: aggregate,
            dp_epsilon: None,
            dp_sample_rate: None,
            timings: RoundTimings {
                dispatch: replies.dispatch_seconds,
                waiting: replies.wait_seconds,
                ..RoundTimings::default()
            },
        };
        let ctx =
            RoundCtx { state, workers, round, started, selected: Vec::new(), available, global, global_ref, seed_base };
        self.finish_round(&ctx, &*strategy, result).await
    }
}

/// Waits until `expected` messages are under `dir` in world state or `timeout` passes, and
/// returns those there (by participant number).
async fn gather(
    world: &dyn tessera_ports::WorldState,
    blobs: &dyn tessera_ports::BlobStore,
    dir: &str,
    expected: usize,
    timeout: Duration,
) -> Result<BTreeMap<u16, Bytes>, SessionError> {
    let deadline = Instant::now() + timeout;
    loop {
        let keys = world.keys(dir).await?;
        if keys.len() >= expected || Instant::now() >= deadline {
            let mut out = BTreeMap::new();
            for k in keys {
                let Some(idx) = k.rsplit('/').next().and_then(|i| i.parse::<u16>().ok()) else { continue };
                if let Some(b) = tessera_node::secagg::fetch(world, blobs, &k).await? {
                    out.insert(idx, b);
                }
            }
            return Ok(out);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
