//! Hierarchical rounds: region aggregators (nodes running the `fedavg-partial` builtin)
//! sum their region's updates, and the coordinator combines their partial sums, so it
//! never downloads a region's individual updates (but one, when the model has integer
//! tensors: those come whole from the participant with the most examples, as in a flat
//! round). Models of any floating-point type: partial sums travel as F32, and the new
//! model is written back in the global model's types.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use tessera_core::PackageRef;
use tessera_core::tensor::{Model, TensorLimits, Tensors};
use tessera_core::wire::{BlobRef, Failure, RoundTimings, TaskOutcome, WorkerMetrics};

use crate::dispatch::{Replies, participant_node};
use crate::engine::Coordinator;
use crate::fl::{AGG_ROUND_BASE, Aggregated, RoundCtx, too_few};
use crate::placement::Workers;
use crate::{Hierarchy, Region, SessionError};

impl Coordinator {
    /// A participant's update, read and checked against the global model's layout (names,
    /// shapes and types).
    async fn read_update(&self, base: &Model, update: &BlobRef) -> Result<Model, SessionError> {
        let bytes = tessera_ports::read_ref(self.backend.blobs.as_ref(), update)
            .await?
            .ok_or_else(|| SessionError::Aggregate("an update is missing".into()))?;
        let m = Model::decode(&bytes, TensorLimits::default()).map_err(|e| SessionError::Aggregate(e.to_string()))?;
        base.check_same_layout(&m).map_err(|e| SessionError::Aggregate(e.to_string()))?;
        Ok(m)
    }

    /// The aggregation of a round with region aggregators: each region's aggregator node
    /// gets its participants' update blobs (by digest) and the global model, checks the
    /// updates against it and answers their weighted sum; the coordinator reads metrics,
    /// the partial sums, the updates of participants in no region, and (for a model with
    /// integer tensors) the update of the participant with the most examples. An update
    /// its aggregator refuses fails its region's participants.
    pub(crate) async fn hierarchical_round(
        &self,
        ctx: RoundCtx<'_>,
        h: &Hierarchy,
        replies: Replies,
    ) -> Result<crate::evaluation::Finished, SessionError> {
        let RoundCtx { state, workers, round, started, selected, available, global, global_ref, .. } = ctx;
        let cfg = &state.config;
        let id = state.id.as_str();
        let base =
            Model::decode(&global, TensorLimits::default()).map_err(|e| SessionError::Aggregate(e.to_string()))?;
        let mut failures = Vec::new();
        // participant -> (update blob, examples, loss, seconds)
        let mut done: BTreeMap<String, (BlobRef, u64, f64, f64)> = BTreeMap::new();
        for p in &selected {
            let outcome = match replies.replies.get(p) {
                None => {
                    failures.push(Failure {
                        node: p.clone(),
                        error: format!("no reply within {}s", cfg.round_timeout_secs),
                    });
                    continue;
                }
                Some(r) => &r.outcome,
            };
            let (outputs, seconds) = match outcome {
                TaskOutcome::Ok { outputs, seconds } => (outputs, *seconds),
                TaskOutcome::Failed { error } => {
                    failures.push(Failure { node: p.clone(), error: error.clone() });
                    continue;
                }
            };
            let model = outputs.iter().find(|o| o.name == "model").cloned();
            let metrics = match outputs.iter().find(|o| o.name == "metrics") {
                Some(o) => tessera_ports::read_ref(self.backend.blobs.as_ref(), o).await?,
                None => None,
            };
            match (model, metrics.and_then(|b| serde_json::from_slice::<WorkerMetrics>(&b).ok())) {
                (Some(m), Some(w)) if w.num_examples > 0 => {
                    done.insert(p.clone(), (m, w.num_examples, w.loss, seconds));
                }
                _ => failures.push(Failure { node: p.clone(), error: "no usable `model` and `metrics`".into() }),
            }
        }
        if done.len() < cfg.min_participants {
            return Err(too_few(round, done.len(), cfg.min_participants, &failures));
        }
        // Regions with updates this round, and the participants in none.
        let mut regions: Vec<(&Region, Vec<String>)> = Vec::new();
        let mut direct = Vec::new();
        for p in done.keys() {
            match h.regions.values().find(|r| r.nodes.iter().any(|n| n == participant_node(p))) {
                Some(r) => match regions.iter_mut().find(|(x, _)| std::ptr::eq(*x, r)) {
                    Some((_, v)) => v.push(p.clone()),
                    None => regions.push((r, vec![p.clone()])),
                },
                None => direct.push(p.clone()),
            }
        }
        let module: PackageRef =
            h.module.parse().map_err(|e| SessionError::Config(format!("hierarchy.module: {e}")))?;
        let agg_record = self.source.resolve(&module).await?;
        let agg_workers = Workers { default: agg_record, nodes: BTreeMap::new() };
        let aggregators: Vec<String> = regions.iter().map(|(r, _)| r.aggregator.clone()).collect();
        let partials = self
            .dispatch(
                id,
                AGG_ROUND_BASE + round,
                &aggregators,
                &crate::fl::base_attempt(&state.model),
                &agg_workers,
                |i, _| {
                    let weights: serde_json::Map<String, Value> =
                        regions[i].1.iter().enumerate().map(|(k, p)| (format!("u{k}"), json!(done[p].1))).collect();
                    json!({"weights": weights})
                },
                |i, _| {
                    // The global model too: the aggregator checks every update against its
                    // layout, types included.
                    std::iter::once(BlobRef { name: "global".into(), ..global_ref.clone() })
                        .chain(
                            regions[i]
                                .1
                                .iter()
                                .enumerate()
                                .map(|(k, p)| BlobRef { name: format!("u{k}"), ..done[p].0.clone() }),
                        )
                        .collect()
                },
                Duration::from_secs_f64(cfg.round_timeout_secs),
            )
            .await?;
        let mut sum = Tensors(
            base.floats.0.iter().map(|(k, t)| (k.clone(), tessera_core::tensor::Tensor::zeros(&t.shape))).collect(),
        );
        let mut weight = 0.0f64;
        let mut contributed = Vec::new();
        let add = |sum: &mut Tensors, t: &Tensors, w: f32| -> Result<(), SessionError> {
            base.floats.check_same_layout(t).map_err(|e| SessionError::Aggregate(e.to_string()))?;
            for (k, acc) in sum.0.iter_mut() {
                for (a, v) in acc.data.iter_mut().zip(&t.0[k].data) {
                    *a += w * v;
                }
            }
            Ok(())
        };
        for (i, (region, members)) in regions.iter().enumerate() {
            let reply = partials.replies.get(&aggregators[i]).map(|r| &r.outcome);
            let Some(TaskOutcome::Ok { outputs, .. }) = reply else {
                let why = match reply {
                    Some(TaskOutcome::Failed { error }) => {
                        format!("its region's aggregator {} failed: {error}", region.aggregator)
                    }
                    _ => format!("its region's aggregator {} did not answer", region.aggregator),
                };
                for p in members {
                    failures.push(Failure { node: p.clone(), error: why.clone() });
                }
                continue;
            };
            let get = |name: &str| outputs.iter().find(|o| o.name == name);
            let (Some(pd), Some(wd)) = (get("partial"), get("weight")) else {
                return Err(SessionError::Aggregate(format!("aggregator {} gave no partial sum", region.aggregator)));
            };
            let partial = tessera_ports::read_ref(self.backend.blobs.as_ref(), pd)
                .await?
                .ok_or_else(|| SessionError::Aggregate("a partial sum is missing".into()))?;
            let w: f64 = tessera_ports::read_ref(self.backend.blobs.as_ref(), wd)
                .await?
                .and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.trim().parse().ok()))
                .ok_or_else(|| SessionError::Aggregate("a partial weight is missing".into()))?;
            let t = Tensors::decode(&partial, TensorLimits::default())
                .map_err(|e| SessionError::Aggregate(e.to_string()))?;
            add(&mut sum, &t, 1.0)?;
            weight += w;
            contributed.extend(members.iter().cloned());
        }
        for p in &direct {
            let m = self.read_update(&base, &done[p].0).await?;
            add(&mut sum, &m.floats, done[p].1 as f32)?;
            weight += done[p].1 as f64;
            contributed.push(p.clone());
        }
        if contributed.len() < cfg.min_participants || weight <= 0.0 {
            return Err(too_few(round, contributed.len(), cfg.min_participants, &failures));
        }
        for t in sum.0.values_mut() {
            for v in t.data.iter_mut() {
                *v = (f64::from(*v) / weight) as f32;
            }
        }
        contributed.sort();
        let mut model = base.with_floats(sum);
        if !base.fixed.is_empty() {
            // Integer tensors from the participant with the most examples (the first in
            // participant order on a tie), as in a flat round: its update is read here.
            let mut most = &contributed[0];
            for p in &contributed {
                if done[p].1 > done[most].1 {
                    most = p;
                }
            }
            model.fixed = self.read_update(&base, &done[most].0).await?.fixed;
        }
        let examples: u64 = contributed.iter().map(|p| done[p].1).sum();
        let train_loss = contributed.iter().map(|p| done[p].2 * done[p].1 as f64).sum::<f64>() / examples as f64;
        let compute_seconds = contributed.iter().map(|p| done[p].3).fold(0.0, f64::max);
        let strategy = cfg.build_strategy().map_err(|e| SessionError::Config(e.to_string()))?;
        let result = Aggregated {
            selected,
            contributed,
            failures,
            examples,
            train_loss,
            compute_seconds,
            model,
            dp_epsilon: None,
            dp_sample_rate: None,
            // The participants' tasks, then the region aggregators'.
            timings: RoundTimings {
                dispatch: replies.dispatch_seconds + partials.dispatch_seconds,
                waiting: replies.wait_seconds + partials.wait_seconds,
                ..RoundTimings::default()
            },
        };
        let ctx = RoundCtx {
            state,
            workers,
            round,
            started,
            selected: Vec::new(),
            available,
            global,
            global_ref,
            seed_base: 0,
        };
        self.finish_round(&ctx, &*strategy, result).await
    }
}
