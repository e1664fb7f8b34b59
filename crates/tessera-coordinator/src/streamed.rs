//! Rounds of models too large to hold twice. The global model is not read: its layout
//! comes from its header. Each update is read from the blob store front to back, in
//! participant order, and each chunk of its values is added to the running sum as it
//! arrives ([`FitSum::add_part`]), so the coordinator holds the sum and a chunk, not the
//! update. Every element takes the same operations in the same order as when updates are
//! held whole, so a streamed round gives the same bits (and a resumed session the same
//! digest).
//!
//! A round streams when its global model is at least [`Coordinator::with_streaming_from`]
//! bytes (64 MiB by default) and its strategy's aggregate is the example-weighted mean
//! (FedAvg, FedProx: [`Strategy::reads_current`] false), without differential privacy,
//! secure aggregation or a hierarchy. Order-statistic strategies read such rounds' updates
//! a window at a time instead ([`crate::windowed`]); other rounds hold their updates as
//! [`crate::fold`] does.
//!
//! An update is checked (its outputs, metrics, header and layout against the model's)
//! before any of it is added: a bad one is its participant's failure. Once part of it is
//! in the sum it cannot be taken out, so a failure after that (a non-finite value, a read
//! that breaks off, bytes that do not match the blob's digest) fails the round; resuming
//! the session runs it again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tessera_core::layout::{self, Layout, PREFIX};
use tessera_core::strategy::{FitFailure, FitSum, Strategy};
use tessera_core::tensor::{FixedTensor, Model, TensorLimits};
use tessera_core::wire::{BlobRef, Failure, TaskOutcome, TaskReply, WorkerMetrics};
use tessera_core::{Digest, DigestWriter};
use tessera_ports::{BlobReader, read_ref};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::engine::Coordinator;
use crate::fl::in_round;
use crate::fold::Contribution;
use crate::{SessionConfig, SessionError};

/// Global models of at least this many bytes are summed as streams, by default.
pub const STREAM_FROM: u64 = 64 << 20;

/// Bytes of an update read and added at once.
const CHUNK: usize = 1 << 20;

/// The global model at the start of a round: its layout, and its bytes unless the round
/// streams.
pub(crate) struct Global {
    pub(crate) layout: Layout,
    /// `None` when the round streams.
    pub(crate) bytes: Option<Bytes>,
}

impl Global {
    /// The model's size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.layout.file_len()
    }
}

/// Reads a safetensors header of at most `max_header` bytes from the front of `r`.
pub(crate) async fn read_layout(
    r: &mut (impl AsyncRead + Unpin),
    max_header: usize,
) -> Result<(Vec<u8>, Layout), String> {
    let mut prefix = [0u8; PREFIX];
    r.read_exact(&mut prefix).await.map_err(|e| format!("reading its header: {e}"))?;
    let n = Layout::header_len(prefix).map_err(|e| e.to_string())?;
    if n > max_header {
        return Err(format!("its header is {n} bytes, more than the {max_header} the model's allows"));
    }
    let mut head = vec![0u8; PREFIX + n];
    head[..PREFIX].copy_from_slice(&prefix);
    r.read_exact(&mut head[PREFIX..]).await.map_err(|e| format!("reading its header: {e}"))?;
    let layout = Layout::parse(&head[PREFIX..], TensorLimits::default()).map_err(|e| e.to_string())?;
    Ok((head, layout))
}

/// Whether rounds of `cfg` with `strategy` may leave the global model unread and read
/// their updates where they are stored (given a model large enough): summed as streams
/// here, or a window at a time for a per-coordinate strategy ([`crate::windowed`]).
pub(crate) fn may_stream(cfg: &SessionConfig, strategy: &dyn Strategy) -> bool {
    ((strategy.takes_sum() && !strategy.reads_current()) || strategy.per_coordinate())
        && cfg.differential_privacy.is_none()
        && cfg.secure_aggregation.is_none()
        && cfg.hierarchy.is_none()
}

impl Coordinator {
    /// Streams rounds whose global model is at least `bytes` long (default
    /// [`STREAM_FROM`]); `0` streams every round that may.
    pub fn with_streaming_from(mut self, bytes: u64) -> Self {
        self.stream_from = bytes;
        self
    }

    /// Reads the global model `digest`: its header, then the rest unless `may_stream` and
    /// the model is at least the streaming size (then its bytes are never held).
    pub(crate) async fn global_model(&self, digest: &Digest, may_stream: bool) -> Result<Global, SessionError> {
        let missing = |e: String| SessionError::Aggregate(format!("the global model {digest}: {e}"));
        if !may_stream {
            let bytes = self
                .retry("reading the global model", || self.backend.blobs.get(digest))
                .await?
                .ok_or_else(|| missing("it is missing".into()))?;
            let (_, layout) = read_layout(&mut &bytes[..], layout::MAX_HEADER).await.map_err(missing)?;
            return Ok(Global { layout, bytes: Some(bytes) });
        }
        let mut r = self.open_blob("reading the global model", digest).await?;
        let (head, layout) = read_layout(&mut r, layout::MAX_HEADER).await.map_err(missing)?;
        if may_stream && layout.file_len() >= self.stream_from {
            return Ok(Global { layout, bytes: None });
        }
        let mut all = Vec::with_capacity(usize::try_from(layout.file_len()).unwrap_or(0));
        all.extend_from_slice(&head);
        if r.read_to_end(&mut all).await.is_err() {
            // A read that broke off is read again whole, as transient failures are.
            drop((r, all));
            let bytes = self
                .retry("reading the global model", || self.backend.blobs.get(digest))
                .await?
                .ok_or_else(|| missing("it is missing".into()))?;
            return Ok(Global { layout, bytes: Some(bytes) });
        }
        Ok(Global { layout, bytes: Some(Bytes::from(all)) })
    }

    /// Opens blob `digest` (retrying transient failures); a missing blob is an error.
    async fn open_blob(&self, what: &str, digest: &Digest) -> Result<BlobReader, SessionError> {
        self.retry(what, || self.backend.blobs.reader(digest))
            .await?
            .ok_or_else(|| SessionError::Aggregate(format!("{what}: blob {digest} is missing")))
    }

    /// A streamed round's updates from `outcomes` (each participant's reply, or why it has
    /// none), taken in participant order: the strategy's aggregate (in the global model's
    /// types, with the integer tensors of the participant with the most examples), the
    /// participants folded in, the failures and the time spent adding. Fewer usable updates
    /// than `min_participants` fail the round ([`SessionError::RoundFailed`]).
    pub(crate) async fn fold_streamed(
        &self,
        round: u32,
        global: &Layout,
        strategy: &mut dyn Strategy,
        outcomes: Vec<(String, Result<&TaskReply, String>)>,
        min_participants: usize,
    ) -> Result<(Model, Vec<Contribution>, Vec<Failure>, Duration), SessionError> {
        let mut fold = StreamedFold {
            round,
            global,
            sum: FitSum::zeros(round, &global.float_shapes(), self.threads),
            fixed: None,
            usable: Vec::new(),
            failures: Vec::new(),
            folding: Duration::ZERO,
        };
        for (node, outcome) in outcomes {
            let taken = match outcome {
                Ok(reply) => self.fold_one(&mut fold, &node, reply).await?,
                Err(e) => Err(e),
            };
            if let Err(error) = taken {
                fold.failures.push(Failure { node, error });
            }
        }
        let failed: Vec<FitFailure> =
            fold.failures.iter().map(|f| FitFailure { node: f.node.clone(), error: f.error.clone() }).collect();
        if fold.usable.len() < min_participants {
            return Err(crate::fl::too_few(round, fold.usable.len(), min_participants, &fold.failures));
        }
        let started = Instant::now();
        let floats = strategy
            .aggregate_sum(round, &Default::default(), fold.sum, &failed)
            .map_err(|e| SessionError::Aggregate(in_round(round, &e)))?;
        let model =
            Model { floats, types: global.float_types(), fixed: fold.fixed.map(|(_, f)| f).unwrap_or_default() };
        Ok((model, fold.usable, fold.failures, fold.folding + started.elapsed()))
    }

    /// A participant's update as its reply names it, checked before any of it is read:
    /// the reply succeeded, has its `model` and `metrics` outputs, its metrics count at
    /// least one example, and the update is at most twice the global model's size plus
    /// 1 MiB (its header may be written otherwise). The error is the participant's failure.
    pub(crate) async fn update_named<'r>(&self, reply: &'r TaskReply, global: &Layout) -> Result<Named<'r>, String> {
        let (outputs, seconds) = match &reply.outcome {
            TaskOutcome::Ok { outputs, seconds } => (outputs, *seconds),
            TaskOutcome::Failed { error } => return Err(error.clone()),
        };
        let get = |name: &str| outputs.iter().find(|o| o.name == name);
        let (Some(model), Some(metrics)) = (get("model"), get("metrics")) else {
            return Err("the reply lacks its `model` or `metrics` output".into());
        };
        let metrics = match self.retry("reading metrics", || read_ref(self.backend.blobs.as_ref(), metrics)).await {
            Ok(Some(b)) => b,
            Ok(None) => return Err("the `metrics` blob is missing".into()),
            Err(e) => return Err(e.to_string()),
        };
        let metrics: WorkerMetrics = serde_json::from_slice(&metrics).map_err(|e| format!("metrics: {e}"))?;
        if metrics.num_examples == 0 {
            return Err("the update is based on zero examples".into());
        }
        // An update has the model's tensors, but its header may be written otherwise
        // (tensors in another order, names escaped, metadata): its size may differ a little.
        let max_size = global.file_len().saturating_mul(2).saturating_add(1 << 20);
        if model.size > max_size {
            return Err(format!("update refused: it is {} bytes, the model {max_size} at most", model.size));
        }
        Ok(Named { model, metrics, seconds })
    }

    /// Reads participant `node`'s update from its reply and adds it to the sum. The inner
    /// error is the participant's failure (nothing of it was added); the outer one fails
    /// the round.
    async fn fold_one(
        &self,
        fold: &mut StreamedFold<'_>,
        node: &str,
        reply: &TaskReply,
    ) -> Result<Result<(), String>, SessionError> {
        let Named { model, metrics, seconds } = match self.update_named(reply, fold.global).await {
            Ok(named) => named,
            Err(e) => return Ok(Err(e)),
        };
        let n = metrics.num_examples;
        let r: BlobReader = match model.inline_bytes() {
            Ok(Some(b)) => Box::pin(std::io::Cursor::new(b.to_vec())),
            Err(_) => {
                return Ok(Err(format!(
                    "the inline `model` output does not match its size and digest {}",
                    model.digest
                )));
            }
            Ok(None) => match self.retry("reading an update", || self.backend.blobs.reader(&model.digest)).await {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(Err("the `model` blob is missing".into())),
                Err(e) => return Ok(Err(e.to_string())),
            },
        };
        let mut r = UpdateStream { c: self, digest: model.digest, r, consumed: 0, reopens: 0 };
        let max_header = usize::try_from(fold.global.data_start).unwrap_or(usize::MAX).saturating_mul(2).max(1 << 20);
        let layout = match read_layout(&mut r.r, max_header).await {
            Ok((head, l)) => {
                r.consumed = head.len() as u64;
                l
            }
            Err(e) => return Ok(Err(format!("update refused: {e}"))),
        };
        if layout.file_len() != model.size {
            return Ok(Err(format!(
                "update refused: its header describes {} bytes, its reply {}",
                layout.file_len(),
                model.size
            )));
        }
        if let Err(e) = fold.global.check_same(&layout) {
            return Ok(Err(format!("update refused: {e}")));
        }
        let round = fold.round;
        fold.sum.check_next(node).map_err(|e| SessionError::Aggregate(in_round(round, &e)))?;
        // From here on, part of the update may be in the sum.
        let broken = |e: String| {
            SessionError::Aggregate(format!(
                "round {round}: the update of {node} broke off after part of it was added ({e}); \
                 resume the session to run the round again"
            ))
        };
        let mut fixed = BTreeMap::new();
        let mut buf = vec![0u8; CHUNK];
        for t in &layout.tensors {
            let len = usize::try_from(t.len).map_err(|e| broken(e.to_string()))?;
            let Some(ty) = t.float_type() else {
                let mut bytes = vec![0u8; len];
                r.read_exact(&mut bytes).await.map_err(|e| broken(e.to_string()))?;
                fixed.insert(t.name.clone(), FixedTensor { dtype: t.dtype, shape: t.shape.clone(), bytes });
                continue;
            };
            let step = CHUNK / ty.size() * ty.size();
            let (mut done, mut offset) = (0usize, 0usize);
            while done < len {
                let part = step.min(len - done);
                r.read_exact(&mut buf[..part]).await.map_err(|e| broken(e.to_string()))?;
                let adding = Instant::now();
                let values = ty.read(&buf[..part]);
                fold.sum
                    .add_part(node, &t.name, offset, &values, n)
                    .map_err(|e| SessionError::Aggregate(in_round(round, &e)))?;
                fold.folding += adding.elapsed();
                offset += values.len();
                done += part;
            }
        }
        // The end, where the bytes are checked against the blob's digest.
        r.end().await.map_err(|e| broken(e.to_string()))?;
        fold.sum.count(node, n).map_err(|e| SessionError::Aggregate(in_round(round, &e)))?;
        if !fixed.is_empty() && fold.fixed.as_ref().is_none_or(|(best, _)| n > *best) {
            fold.fixed = Some((n, fixed));
        }
        fold.usable.push(Contribution { node: node.to_owned(), metrics, seconds });
        Ok(Ok(()))
    }
}

impl Coordinator {
    /// Stores a round's new global model; gives its digest, its size, and its bytes when it
    /// is smaller than the streaming size (for the coordinator's evaluation). A larger one
    /// is encoded twice a chunk at a time, once to hash it and once into the store
    /// ([`BlobStore::put_stream`](tessera_ports::BlobStore::put_stream)), so its values
    /// and its encoding are never held together.
    pub(crate) async fn store_model(&self, model: Model) -> Result<(Digest, u64, Option<Bytes>), SessionError> {
        if model.data_len() < self.stream_from {
            let bytes = Bytes::from(model.encode());
            let digest = self.retry("storing the global model", || self.backend.blobs.put(bytes.clone())).await?;
            return Ok((digest, bytes.len() as u64, Some(bytes)));
        }
        let model = std::sync::Arc::new(model);
        let m = model.clone();
        let (digest, size) = tokio::task::spawn_blocking(move || {
            let mut h = DigestWriter::new();
            m.write_to(&mut h).map(|()| (h.finish(), h.len()))
        })
        .await
        .map_err(|e| SessionError::Aggregate(format!("encoding the global model: {e}")))?
        .map_err(|e| SessionError::Aggregate(format!("encoding the global model: {e}")))?;
        self.retry("storing the global model", || self.backend.blobs.put_stream(&digest, size, encoder(model.clone())))
            .await?;
        Ok((digest, size, None))
    }
}

/// A model's encoding as a stream: a blocking thread encodes it a chunk at a time into a
/// channel of a few chunks, which the stream reads.
fn encoder(model: std::sync::Arc<Model>) -> BlobReader {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let mut w = Sender(tx);
        if let Err(e) = model.write_to(&mut w) {
            let _ = w.0.blocking_send(Err(e));
        }
    });
    let chunks = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    Box::pin(tokio_util::io::StreamReader::new(chunks))
}

/// Sends what is written to it down a channel, a chunk per write.
struct Sender(tokio::sync::mpsc::Sender<std::io::Result<Bytes>>);

impl std::io::Write for Sender {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.blocking_send(Ok(Bytes::copy_from_slice(buf))).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the blob store stopped reading the model")
        })?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Times an update's stream is opened again where it broke off.
const REOPENS: u32 = 3;

/// An update read front to back. A read that fails (a backend's transient failure) opens
/// the blob again and skips what was read, up to [`REOPENS`] times; bytes that do not match
/// the digest are not read again.
struct UpdateStream<'a> {
    c: &'a Coordinator,
    digest: Digest,
    r: BlobReader,
    /// Bytes read so far.
    consumed: u64,
    reopens: u32,
}

impl UpdateStream<'_> {
    async fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        loop {
            match self.r.read_exact(buf).await {
                Ok(_) => {
                    self.consumed += buf.len() as u64;
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData || self.reopens >= REOPENS => return Err(e),
                Err(e) => {
                    self.reopens += 1;
                    tracing::warn!(blob = %self.digest, at = self.consumed, "an update's read broke off ({e}); reading on");
                    self.reopen().await?;
                }
            }
        }
    }

    /// Reads past the last byte: an error when there are more, or they do not match.
    async fn end(&mut self) -> std::io::Result<()> {
        let mut rest = [0u8; 1];
        match self.r.read(&mut rest).await? {
            0 => Ok(()),
            _ => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "bytes past the last tensor")),
        }
    }

    async fn reopen(&mut self) -> std::io::Result<()> {
        let other = |e: String| std::io::Error::other(e);
        self.r = self
            .c
            .retry("reading an update", || self.c.backend.blobs.reader(&self.digest))
            .await
            .map_err(|e| other(e.to_string()))?
            .ok_or_else(|| other(format!("blob {} is gone", self.digest)))?;
        let mut skip = vec![0u8; 64 << 10];
        let mut left = self.consumed;
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(skip.len());
            self.r.read_exact(&mut skip[..n]).await?;
            left -= n as u64;
        }
        Ok(())
    }
}

/// An update named by a participant's reply ([`Coordinator::update_named`]).
pub(crate) struct Named<'r> {
    /// The `model` output.
    pub(crate) model: &'r BlobRef,
    pub(crate) metrics: WorkerMetrics,
    /// The participant's training time, as it reported it.
    pub(crate) seconds: f64,
}

/// A streamed round's sum so far.
struct StreamedFold<'a> {
    round: u32,
    global: &'a Layout,
    sum: FitSum,
    /// The integer tensors of the participant with the most examples so far.
    fixed: Option<(u64, BTreeMap<String, FixedTensor>)>,
    usable: Vec<Contribution>,
    failures: Vec<Failure>,
    folding: Duration,
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use tessera_core::strategy::{Participation, from_config};
    use tessera_core::tensor::{Dtype, FloatType, Tensor, Tensors};
    use tessera_core::wire::{BlobRef, SCHEMA_VERSION};
    use tessera_ports::Backend;

    use super::*;

    fn coordinator(dir: &std::path::Path) -> Coordinator {
        let hub = tessera_hub::HubStore::open(dir).unwrap();
        let source = Arc::new(tessera_hub::LocalHub(Arc::new(hub)));
        Coordinator::new(Backend::in_process(Duration::from_secs(5)), source, None).with_streaming_from(0)
    }

    /// A model of `w` (F32, past one chunk), `h` (F16) and the counter `n` (I64).
    fn model(scale: f32, count: i64) -> Model {
        let mut m = Model::default();
        let w: Vec<f32> = (0..(CHUNK / 4 + 100)).map(|i| scale * (i % 97) as f32 * 0.01).collect();
        m.floats.0.insert("w".into(), Tensor { shape: vec![w.len()], data: w });
        m.floats.0.insert("h".into(), Tensor { shape: vec![3], data: vec![scale, 0.5, -1.0] });
        m.types.insert("h".into(), FloatType::F16);
        m.fixed
            .insert("n".into(), FixedTensor { dtype: Dtype::I64, shape: vec![], bytes: count.to_le_bytes().to_vec() });
        m
    }

    /// Participant `node`'s reply to round 1: `model` and its metrics (`examples`).
    pub(crate) fn reply(node: &str, model: BlobRef, examples: u64) -> TaskReply {
        let metrics = serde_json::to_vec(&WorkerMetrics { num_examples: examples, loss: 1.0, accuracy: None }).unwrap();
        TaskReply {
            schema: SCHEMA_VERSION,
            task_id: format!("s.r1.{node}"),
            session: "s".into(),
            round: 1,
            node: node.into(),
            outcome: TaskOutcome::Ok { outputs: vec![model, BlobRef::inline("metrics", &metrics)], seconds: 0.1 },
            auth: None,
        }
    }

    async fn stored(c: &Coordinator, m: &Model) -> BlobRef {
        let bytes = m.encode();
        let size = bytes.len() as u64;
        BlobRef::stored("model", c.backend.blobs.put(Bytes::from(bytes)).await.unwrap(), size)
    }

    /// `m` encoded with its header written as another writer would: tensors in name order
    /// and a `__metadata__` entry (Hugging Face tools write `{"format": "pt"}`).
    fn rewritten(m: &Model) -> Vec<u8> {
        let bytes = m.encode();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut text = serde_json::to_vec(&header).unwrap();
        text.resize(text.len().next_multiple_of(8), b' ');
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&text);
        out.extend_from_slice(&bytes[8 + n..]);
        out
    }

    fn fedavg() -> Box<dyn Strategy> {
        from_config(
            "fedavg",
            &serde_json::Value::Null,
            Participation { min_fit: 1, min_available: 1, ..Participation::default() },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn streamed_updates_sum_to_the_bits_of_held_ones() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let global = stored(&c, &model(1.0, 0)).await;
        let held = c.global_model(&global.digest, false).await.unwrap();
        assert_eq!(held.bytes.as_deref(), Some(&model(1.0, 0).encode()[..]));
        let g = c.global_model(&global.digest, true).await.unwrap();
        assert!(g.bytes.is_none(), "a model past the streaming size is not read");
        assert_eq!(g.size(), global.size);

        let updates = [("a", model(0.5, 3), 10u64), ("b", model(2.0, 4), 30), ("c", model(-1.0, 5), 20)];
        let mut replies = Vec::new();
        for (node, m, n) in &updates {
            replies.push(reply(node, stored(&c, m).await, *n));
        }
        let outcomes = replies.iter().map(|r| (r.node.clone(), Ok(r))).collect();
        let (aggregate, usable, failures, _) =
            c.fold_streamed(1, &g.layout, fedavg().as_mut(), outcomes, 3).await.unwrap();
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(usable.iter().map(|u| u.node.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);

        // The same sum taken whole, in the same order.
        let mut sum = FitSum::new(1, &model(1.0, 0).floats, 1);
        for (node, m, n) in &updates {
            // Each update as the store holds it: rounded to its types.
            let m = Model::decode(&m.encode(), TensorLimits::default()).unwrap();
            sum.add(node, &m.floats, *n).unwrap();
        }
        let want: Tensors = sum.mean().unwrap();
        assert!(aggregate.floats == want, "streamed and held sums differ");
        assert_eq!(aggregate.types, model(1.0, 0).types);
        // The counter of the participant with the most examples.
        assert_eq!(aggregate.fixed["n"].bytes, 4i64.to_le_bytes());

        // Stored a chunk at a time through a file: the bytes `encode` gives.
        let (digest, size, bytes) = c.store_model(aggregate.clone()).await.unwrap();
        assert!(bytes.is_none());
        let back = c.backend.blobs.get(&digest).await.unwrap().unwrap();
        assert!(back == aggregate.encode());
        assert_eq!(size, back.len() as u64);
    }

    #[tokio::test]
    async fn an_update_whose_header_is_written_otherwise_is_summed_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let g = c.global_model(&stored(&c, &model(1.0, 0)).await.digest, true).await.unwrap();
        let (a, b) = (model(0.5, 1), model(2.0, 2));
        let other = rewritten(&b);
        assert_ne!(other.len(), b.encode().len(), "the rewritten header has another size");
        let size = other.len() as u64;
        let other = BlobRef::stored("model", c.backend.blobs.put(Bytes::from(other)).await.unwrap(), size);
        let replies = [reply("a", stored(&c, &a).await, 10), reply("b", other, 30)];
        let outcomes = replies.iter().map(|r| (r.node.clone(), Ok(r))).collect();
        let (got, usable, failures, _) = c.fold_streamed(1, &g.layout, fedavg().as_mut(), outcomes, 2).await.unwrap();
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(usable.len(), 2);
        let replies = [reply("a", stored(&c, &a).await, 10), reply("b", stored(&c, &b).await, 30)];
        let outcomes = replies.iter().map(|r| (r.node.clone(), Ok(r))).collect();
        let (want, ..) = c.fold_streamed(1, &g.layout, fedavg().as_mut(), outcomes, 2).await.unwrap();
        assert!(got == want);
    }

    /// On a store that checks its bytes as they are read, an update whose bytes changed
    /// under its digest is found at its end, once it is in the sum: the round fails.
    #[tokio::test]
    async fn an_update_changed_in_the_store_fails_the_round() {
        let dir = tempfile::tempdir().unwrap();
        let hub = tessera_hub::HubStore::open(dir.path().join("hub")).unwrap();
        let files = Arc::new(tessera_ports::FsBlobStore::open(dir.path().join("blobs")).unwrap());
        let backend = Backend { blobs: files.clone(), ..Backend::in_process(Duration::from_secs(5)) };
        let c = Coordinator::new(backend, Arc::new(tessera_hub::LocalHub(Arc::new(hub))), None).with_streaming_from(0);
        let g = c.global_model(&stored(&c, &model(1.0, 0)).await.digest, true).await.unwrap();
        let update = stored(&c, &model(0.5, 1)).await;
        let path = files.path_of(&update.digest);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let r = reply("a", update, 10);
        let e = c.fold_streamed(1, &g.layout, fedavg().as_mut(), vec![("a".into(), Ok(&r))], 1).await.unwrap_err();
        assert!(e.to_string().contains("broke off") && e.to_string().contains("corrupt"), "{e}");
    }

    #[tokio::test]
    async fn bad_updates_are_their_participants_failures_until_part_is_added() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let g = c.global_model(&stored(&c, &model(1.0, 0)).await.digest, true).await.unwrap();
        let good = stored(&c, &model(0.5, 1)).await;
        let mut renamed = model(0.5, 1);
        let t = renamed.floats.0.remove("h").unwrap();
        renamed.floats.0.insert("x".into(), t);
        renamed.types = BTreeMap::from([("x".to_string(), FloatType::F16)]);
        let mut other = model(0.5, 1);
        other.floats.0.get_mut("h").unwrap().data.push(1.0);
        other.floats.0.get_mut("h").unwrap().shape = vec![4];
        let mut lying = stored(&c, &model(0.5, 1)).await;
        lying.digest = Digest::of(b"nothing stored here");
        let mut forged = BlobRef::inline("model", b"tiny");
        forged.size = good.size;
        let replies = [
            reply("a", stored(&c, &renamed).await, 10),
            reply("b", stored(&c, &other).await, 10),
            reply("c", lying, 10),
            reply("d", good.clone(), 0),
            reply("e", forged, 10),
            reply("f", good.clone(), 10),
        ];
        let mut outcomes: Vec<(String, Result<&TaskReply, String>)> =
            replies.iter().map(|r| (r.node.clone(), Ok(r))).collect();
        outcomes.push(("g".into(), Err("no reply within 5s".into())));
        let (_, usable, failures, _) = c.fold_streamed(1, &g.layout, fedavg().as_mut(), outcomes, 1).await.unwrap();
        assert_eq!(usable.iter().map(|u| u.node.as_str()).collect::<Vec<_>>(), ["f"]);
        let why: BTreeMap<&str, &str> = failures.iter().map(|f| (f.node.as_str(), f.error.as_str())).collect();
        assert!(why["a"].contains("update refused") && why["a"].contains("\"x\""), "{}", why["a"]);
        assert!(why["b"].contains("update refused") && why["b"].contains("\"h\""), "{}", why["b"]);
        assert!(why["c"].contains("missing"), "{}", why["c"]);
        assert!(why["d"].contains("zero examples"), "{}", why["d"]);
        assert!(why["e"].contains("does not match its size"), "{}", why["e"]);
        assert_eq!(why["g"], "no reply within 5s");

        // Too few usable updates fail the round, naming the failures.
        let outcomes = vec![("a".to_string(), Err("gone".to_string()))];
        let e = c.fold_streamed(1, &g.layout, fedavg().as_mut(), outcomes, 1).await.unwrap_err();
        assert!(matches!(e, SessionError::RoundFailed { got: 0, min: 1, .. }), "{e}");

        // A value that is not finite, found once part of the update is in the sum, fails
        // the round.
        let mut nan = model(0.5, 1);
        nan.floats.0.get_mut("w").unwrap().data[CHUNK / 4 + 50] = f32::NAN;
        let r = reply("h", stored(&c, &nan).await, 10);
        let e = c.fold_streamed(1, &g.layout, fedavg().as_mut(), vec![("h".into(), Ok(&r))], 1).await.unwrap_err();
        assert!(e.to_string().contains("not finite") || e.to_string().contains("NaN"), "{e}");
    }
}
