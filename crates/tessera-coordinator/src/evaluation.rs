//! The end of a round: the new global model stored, then evaluated at the coordinator (on
//! its held-out data) and, when the session asks, on participants.
//!
//! The coordinator's evaluation runs on a task of its own ([`Finished`]): a synchronous
//! session starts its next round while it runs, and records the round once both are done
//! (see [`crate::fl`]). Nothing of the next round depends on it: strategies choose and
//! aggregate from the training replies and the federated evaluation alone, and the round
//! limit is the synchronous session's only scheduler. FedBuff's stop rule reads the
//! evaluation, so its steps wait for it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::json;
use tessera_core::config::deep_merge;
use tessera_core::strategy::Strategy;
use tessera_core::wire::{BlobRef, RoundReport, TaskOutcome, WorkerMetrics};
use tessera_core::{Digest, registry::PackageRecord};
use tessera_node::Node;
use tessera_ports::read_ref;

use crate::engine::Coordinator;
use crate::fl::{Aggregated, EVAL_ROUND_BASE, RoundCtx, partition_config};
use crate::placement::Workers;
use crate::{SessionConfig, SessionError};

/// A round whose model is stored, with its coordinator's evaluation still running or done.
/// Dropping it stops the evaluation.
pub(crate) struct Finished {
    /// The round's report; the coordinator's evaluation is filled in by [`Finished::settle`].
    report: RoundReport,
    /// When the round began, and when its evaluations did.
    started: Instant,
    evaluating: Instant,
    local: Option<Evaluation>,
    /// The round had its model's bytes (not a streamed model): its evaluation may run
    /// beside the next round, which then holds no second copy of a large model.
    held: bool,
}

/// The coordinator's evaluation of a round's model, on a task of its own: its metrics
/// and how long it took (seconds).
struct Evaluation(tokio::task::JoinHandle<Result<(WorkerMetrics, f64), SessionError>>);

impl Drop for Evaluation {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Finished {
    /// Whether the coordinator's evaluation of the round's model may run beside the next
    /// round: there is one, and the model is not streamed.
    pub(crate) fn runs_beside(&self) -> bool {
        self.local.is_some() && self.held
    }

    /// The digest of the round's new global model (stored).
    pub(crate) fn model(&self) -> Digest {
        self.report.model
    }

    /// Waits for the coordinator's evaluation and gives the whole report. `beside`: the
    /// evaluation ran beside the next round, so the round's `seconds` and `eval_seconds`
    /// end when its model was stored and its federated evaluation done, and the
    /// evaluation's own time is `timings.evaluation_beside`; otherwise both end now, the
    /// evaluation included. Errors: the evaluation's.
    pub(crate) async fn settle(mut self, beside: bool) -> Result<RoundReport, SessionError> {
        let round = self.report.round;
        let evaluated = self.local.is_some();
        if let Some(mut e) = self.local.take() {
            let (metrics, seconds) = (&mut e.0).await.map_err(|e| {
                SessionError::Aggregate(format!("round {round}: the coordinator's evaluation stopped: {e}"))
            })??;
            let r = &mut self.report;
            r.eval_loss = Some(metrics.loss);
            r.eval_accuracy = metrics.accuracy;
            r.eval_examples = Some(metrics.num_examples);
            if beside {
                r.timings.evaluation_beside = seconds;
            }
        }
        if !beside {
            let now = Instant::now();
            self.report.seconds = (now - self.started).as_secs_f64();
            if evaluated {
                self.report.eval_seconds = (now - self.evaluating).as_secs_f64();
            }
        }
        Ok(self.report)
    }
}

impl Coordinator {
    /// The end of every round: stores the new global model, runs the federated
    /// evaluation when the session asks for one, and starts the coordinator's evaluation
    /// of the model on a task of its own.
    pub(crate) async fn finish_round(
        &self,
        ctx: &RoundCtx<'_>,
        strategy: &dyn Strategy,
        mut done: Aggregated,
    ) -> Result<Finished, SessionError> {
        let cfg = &ctx.state.config;
        let id = ctx.state.id.as_str();
        let aggregate = std::mem::take(&mut done.model);
        crate::fold::check_storable(ctx.round, &aggregate)?;
        let storing = Instant::now();
        let (model, model_size, model_bytes) = self.store_model(aggregate).await?;
        let mut timings = done.timings;
        timings.transfer += storing.elapsed().as_secs_f64();
        let evaluating = Instant::now();
        let held = model_bytes.is_some();
        let local = self.start_evaluation(id, cfg, &ctx.workers.default, model_bytes, &model, ctx.round).await?;
        let fed = self
            .evaluate_federated(id, cfg, ctx.workers, strategy, &ctx.available, ctx.round, &model, model_size)
            .await?;
        let report = RoundReport {
            round: ctx.round,
            selected: done.selected,
            contributed: done.contributed,
            failures: done.failures,
            examples: done.examples,
            train_loss: done.train_loss,
            eval_loss: None,
            eval_accuracy: None,
            eval_examples: None,
            model,
            seconds: ctx.started.elapsed().as_secs_f64(),
            compute_seconds: done.compute_seconds,
            eval_seconds: if fed.is_some() { evaluating.elapsed().as_secs_f64() } else { 0.0 },
            fed_eval_loss: fed.as_ref().map(|f| f.0),
            fed_eval_accuracy: fed.as_ref().and_then(|f| f.1),
            fed_evaluated: fed.map(|f| f.2).unwrap_or_default(),
            dp_epsilon: done.dp_epsilon,
            dp_sample_rate: done.dp_sample_rate,
            timings,
            staleness: Vec::new(),
        };
        Ok(Finished { report, started: ctx.started, evaluating, local, held })
    }

    /// Federated evaluation: the participants the strategy picks evaluate the new model on
    /// their own data; their metrics are averaged by example counts. Nodes that fail are
    /// left out.
    #[allow(clippy::too_many_arguments)]
    async fn evaluate_federated(
        &self,
        id: &str,
        cfg: &SessionConfig,
        workers: &Workers,
        strategy: &dyn Strategy,
        available: &[String],
        round: u32,
        model: &Digest,
        size: u64,
    ) -> Result<Option<(f64, Option<f64>, Vec<String>)>, SessionError> {
        if cfg.fraction_evaluate <= 0.0 {
            return Ok(None);
        }
        let nodes = strategy
            .configure_evaluate(round, available, cfg.seed ^ 0x5EED_E7A1 ^ u64::from(round))
            .map_err(|e| SessionError::Participants(format!("round {round} evaluation: {e}")))?;
        if nodes.is_empty() {
            return Ok(None);
        }
        let input = BlobRef::stored("model", *model, size);
        // Evaluation tasks are a round of their own on their own reply queue (round numbers
        // of evaluation are offset so their replies never mix with training's), named for
        // this coordinator: a resumed session's model may differ from the one a dead
        // coordinator's evaluation saw, and that one's answers must not count.
        let attempt = format!(".{}", self.dispatch);
        let replies = self
            .dispatch(
                id,
                EVAL_ROUND_BASE + round,
                &nodes,
                &attempt,
                workers,
                |_, participant| {
                    let mut c = Self::worker_config(cfg, "evaluate", cfg.seed);
                    deep_merge(&mut c, &partition_config(cfg, participant));
                    c
                },
                |_, _| vec![input.clone()],
                std::time::Duration::from_secs_f64(cfg.round_timeout_secs),
            )
            .await?;
        let mut results = Vec::new();
        let mut evaluated = Vec::new();
        for (node, r) in &replies.replies {
            let TaskOutcome::Ok { outputs, .. } = &r.outcome else { continue };
            let Some(m) = outputs.iter().find(|o| o.name == "metrics") else { continue };
            let Ok(Some(bytes)) = read_ref(self.backend.blobs.as_ref(), m).await else { continue };
            if let Ok(w) = serde_json::from_slice::<WorkerMetrics>(&bytes)
                && w.num_examples > 0
                && w.loss.is_finite()
            {
                results.push((w.num_examples, w.loss, w.accuracy));
                evaluated.push(node.clone());
            }
        }
        Ok(strategy.aggregate_evaluate(&results).map(|(l, a)| (l, a, evaluated)))
    }

    /// Starts the coordinator's evaluation of the model `digest` (its bytes when the round
    /// has them, read from the blob store otherwise) on its own node's held-out dataset, on
    /// a task of its own. `None` when the coordinator has no node or the session no
    /// evaluation dataset.
    async fn start_evaluation(
        &self,
        id: &str,
        cfg: &SessionConfig,
        record: &PackageRecord,
        model: Option<Bytes>,
        digest: &Digest,
        round: u32,
    ) -> Result<Option<Evaluation>, SessionError> {
        let (Some(local), Some(dataset)) = (&self.local, &cfg.eval_dataset) else {
            return Ok(None);
        };
        let model = match model {
            Some(b) => b,
            None => self
                .retry("reading the global model", || self.backend.blobs.get(digest))
                .await?
                .ok_or_else(|| SessionError::Aggregate("the global model vanished from the blob store".into()))?,
        };
        let mut config = Self::worker_config(cfg, "evaluate", cfg.seed);
        deep_merge(&mut config, &json!({"dataset": dataset}));
        let task = tokio::spawn(evaluate(
            local.clone(),
            record.digest,
            config,
            model,
            id.to_owned(),
            format!("{id}.r{round}.eval"),
        ));
        Ok(Some(Evaluation(task)))
    }
}

/// Runs the evaluation task `task` of session `id` on `node`: the worker `module` in
/// `evaluate` mode on `model`. Gives its `metrics` output and how long it took (seconds).
async fn evaluate(
    node: Arc<Node>,
    module: Digest,
    config: serde_json::Value,
    model: Bytes,
    id: String,
    task: String,
) -> Result<(WorkerMetrics, f64), SessionError> {
    let started = Instant::now();
    let out = node.run(&module, &config, vec![("model".into(), model)], &id, &task).await?;
    let metrics = out
        .into_iter()
        .find(|(n, _)| n == "metrics")
        .ok_or_else(|| SessionError::Aggregate("evaluation gave no `metrics` output".into()))?;
    let metrics =
        serde_json::from_slice(&metrics.1).map_err(|e| SessionError::Aggregate(format!("evaluation metrics: {e}")))?;
    Ok((metrics, started.elapsed().as_secs_f64()))
}
