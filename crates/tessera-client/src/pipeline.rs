//! Runs a pipeline file through a node's gateway: stages are actors, items travel through
//! their bounded `<actor>.in` / `<actor>.out` queues.
//!
//! Each source stage is called once and its list of items is put on its `.out` queue; a
//! forwarder per stage moves each item from `.out` to the `.in` queue of every stage reading
//! it (broadcast; a full queue makes it wait: backpressure); each other stage takes items
//! from its `.in` queue with one worker per replica and puts its results on `.out`
//! (fan-in is just several forwarders feeding one `.in`); a join stage keeps items until
//! it holds one from each of its inputs. The items of stages nobody reads are the
//! pipeline's results. Items are `{"item": id, "value": ...}` with ids `<source>/<index>`.
//!
//! Queues hold JSON; a queue's messages are taken once, so only one run of a pipeline
//! should use its actors' queues at a time (the run empties them first).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_core::pipeline::{Pipeline, Stage, in_queue, out_queue};
use tessera_core::wire::{CallRequest, LaunchRequest};
use tokio::task::JoinSet;

use crate::gateway::{GatewayClient, GatewayError};

/// Why a pipeline run failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineRunError {
    /// A stage's call failed.
    #[error("stage {stage}, item {item}: {source}")]
    Stage {
        /// The stage's actor.
        stage: String,
        /// The item.
        item: String,
        /// What the gateway said.
        source: GatewayError,
    },
    /// A source did not return a list.
    #[error("source {0} must return a list of items")]
    NotAList(String),
    /// A launch or queue operation failed.
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    /// The run did not finish in time.
    #[error("the pipeline did not finish within {0:?} ({1})")]
    Timeout(Duration, String),
}

/// What a run produced.
#[derive(Debug, Default, Clone)]
pub struct PipelineReport {
    /// Results of each final stage, as (item, value), ordered by item.
    pub results: BTreeMap<String, Vec<(String, Value)>>,
    /// Calls made per stage.
    pub calls: BTreeMap<String, u64>,
    /// Wall time.
    pub seconds: f64,
}

/// The shape of an item on a queue.
fn item(id: &str, value: Value, from: Option<&str>) -> Value {
    match from {
        Some(f) => json!({"item": id, "from": f, "value": value}),
        None => json!({"item": id, "value": value}),
    }
}

fn split(msg: Value) -> (String, Option<String>, Value) {
    let id = msg["item"].as_str().unwrap_or_default().to_owned();
    let from = msg["from"].as_str().map(str::to_owned);
    let value = msg.get("value").cloned().unwrap_or(Value::Null);
    (id, from, value)
}

/// Runs `p` through `client`; fails after `timeout`.
pub async fn run(client: &GatewayClient, p: &Pipeline, timeout: Duration) -> Result<PipelineReport, PipelineRunError> {
    let started = Instant::now();
    // Launch what the pipeline launches (get-or-create).
    for s in &p.stages {
        if let Some(m) = &s.module {
            client
                .launch(&LaunchRequest {
                    module: m.to_string(),
                    tag: s.tag.clone(),
                    replicas: s.replicas,
                    config: s.config.clone(),
                    priority: 0,
                    node: None,
                })
                .await?;
        }
    }
    // Start from empty queues.
    for s in &p.stages {
        for q in [in_queue(&s.actor), out_queue(&s.actor)] {
            while client.queue_get(&q, Duration::ZERO).await?.is_some() {}
        }
    }
    let calls: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let patience = timeout;
    let mut tasks: JoinSet<Result<(), PipelineRunError>> = JoinSet::new();
    let (count_tx, mut count_rx) = tokio::sync::mpsc::unbounded_channel::<(String, u64)>();
    for s in &p.stages {
        let consumers: Vec<String> = p.consumers(&s.actor).iter().map(|c| c.actor.clone()).collect();
        if s.is_source() {
            let (c, s, calls, tx) = (client.clone(), s.clone(), calls.clone(), count_tx.clone());
            tasks.spawn(async move { source(&c, &s, &calls, tx, patience).await });
        } else {
            // A join keeps partial items, so it has one worker.
            for _ in 0..if s.join { 1 } else { s.replicas } {
                let (c, s, calls) = (client.clone(), s.clone(), calls.clone());
                tasks.spawn(async move { worker(&c, &s, &calls, patience).await });
            }
        }
        if !consumers.is_empty() {
            let (c, actor) = (client.clone(), s.actor.clone());
            tasks.spawn(async move { forward(&c, &actor, &consumers, patience).await });
        }
    }
    drop(count_tx);
    // Items expected from each final stage: a source's count flows down; a join passes one
    // item per item of its first input.
    let mut source_counts: HashMap<String, u64> = HashMap::new();
    let sources = p.stages.iter().filter(|s| s.is_source()).count();
    let deadline = tokio::time::Instant::now() + timeout;
    while source_counts.len() < sources {
        tokio::select! {
            got = count_rx.recv() => match got {
                Some((a, n)) => { source_counts.insert(a, n); }
                None => break,
            },
            Some(done) = tasks.join_next() => flatten(done)?,
            _ = tokio::time::sleep_until(deadline) => {
                return Err(PipelineRunError::Timeout(timeout, "waiting for the sources".into()));
            }
        }
    }
    let mut expected: HashMap<String, u64> = HashMap::new();
    for s in &p.stages {
        let n = if s.is_source() {
            source_counts.get(&s.actor).copied().unwrap_or(0)
        } else if s.join {
            expected[&s.from[0]]
        } else {
            s.from.iter().map(|f| expected[f]).sum()
        };
        expected.insert(s.actor.clone(), n);
    }
    let sinks: Vec<&Stage> = p.stages.iter().filter(|s| p.consumers(&s.actor).is_empty()).collect();
    let mut results: BTreeMap<String, Vec<(String, Value)>> = BTreeMap::new();
    for s in &sinks {
        let want = expected[&s.actor];
        let got = results.entry(s.actor.clone()).or_default();
        while (got.len() as u64) < want {
            if let Some(done) = tasks.try_join_next() {
                flatten(done)?;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(PipelineRunError::Timeout(
                    timeout,
                    format!("{} of {want} results from {}", got.len(), s.actor),
                ));
            }
            if let Some(msg) = client.queue_get(&out_queue(&s.actor), Duration::from_millis(200)).await? {
                let (id, _, value) = split(msg);
                got.push((id, value));
            }
        }
        got.sort_by_key(|a| natural(&a.0));
    }
    tasks.abort_all();
    let calls = calls.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(PipelineReport { results, calls, seconds: started.elapsed().as_secs_f64() })
}

/// Orders `src/10` after `src/9`.
fn natural(id: &str) -> (String, u64) {
    match id.rsplit_once('/') {
        Some((a, n)) => (a.to_owned(), n.parse().unwrap_or(u64::MAX)),
        None => (id.to_owned(), 0),
    }
}

fn flatten(done: Result<Result<(), PipelineRunError>, tokio::task::JoinError>) -> Result<(), PipelineRunError> {
    match done {
        Ok(r) => r,
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => panic!("a pipeline task panicked: {e}"),
    }
}

fn count(calls: &Mutex<BTreeMap<String, u64>>, actor: &str) {
    *calls.lock().unwrap_or_else(|p| p.into_inner()).entry(actor.to_owned()).or_default() += 1;
}

async fn call_stage(
    client: &GatewayClient,
    s: &Stage,
    first: Option<Value>,
    id: &str,
) -> Result<Value, PipelineRunError> {
    let mut args: Vec<Value> = first.into_iter().collect();
    args.extend(s.args.iter().cloned());
    let mut req = CallRequest::new(&s.actor, &s.function, args);
    req.kwargs = Value::Object(s.kwargs.clone());
    let stage_err = |source| PipelineRunError::Stage { stage: s.actor.clone(), item: id.to_owned(), source };
    let resp = client.call(&req).await.map_err(stage_err)?;
    match resp.outputs.get("result") {
        Some(out) if resp.result.is_null() && out.kind == "json" => {
            let bytes = client.output(out).await.map_err(stage_err)?;
            Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
        }
        _ => Ok(resp.result),
    }
}

async fn source(
    client: &GatewayClient,
    s: &Stage,
    calls: &Mutex<BTreeMap<String, u64>>,
    counts: tokio::sync::mpsc::UnboundedSender<(String, u64)>,
    patience: Duration,
) -> Result<(), PipelineRunError> {
    let value = call_stage(client, s, None, &format!("{}/*", s.actor)).await?;
    count(calls, &s.actor);
    let Value::Array(items) = value else {
        return Err(PipelineRunError::NotAList(s.actor.clone()));
    };
    let _ = counts.send((s.actor.clone(), items.len() as u64));
    for (i, v) in items.into_iter().enumerate() {
        let id = format!("{}/{i}", s.actor);
        client.queue_put_wait(&out_queue(&s.actor), &item(&id, v, None), patience).await?;
    }
    Ok(())
}

async fn forward(
    client: &GatewayClient,
    actor: &str,
    consumers: &[String],
    patience: Duration,
) -> Result<(), PipelineRunError> {
    loop {
        let Some(msg) = client.queue_get(&out_queue(actor), Duration::from_secs(1)).await? else {
            continue;
        };
        let (id, _, value) = split(msg);
        for c in consumers {
            client.queue_put_wait(&in_queue(c), &item(&id, value.clone(), Some(actor)), patience).await?;
        }
    }
}

async fn worker(
    client: &GatewayClient,
    s: &Stage,
    calls: &Mutex<BTreeMap<String, u64>>,
    patience: Duration,
) -> Result<(), PipelineRunError> {
    // A join's partial items: id -> values by input.
    let mut partial: HashMap<String, BTreeMap<String, Value>> = HashMap::new();
    loop {
        let Some(msg) = client.queue_get(&in_queue(&s.actor), Duration::from_secs(1)).await? else {
            continue;
        };
        let (id, from, value) = split(msg);
        let arg = if s.join {
            let have = partial.entry(id.clone()).or_default();
            have.insert(from.unwrap_or_default(), value);
            if !s.from.iter().all(|f| have.contains_key(f)) {
                continue;
            }
            let mut have = partial.remove(&id).expect("present");
            Value::Array(s.from.iter().map(|f| have.remove(f).unwrap_or(Value::Null)).collect())
        } else {
            value
        };
        let result = call_stage(client, s, Some(arg), &id).await?;
        count(calls, &s.actor);
        client.queue_put_wait(&out_queue(&s.actor), &item(&id, result, None), patience).await?;
    }
}
