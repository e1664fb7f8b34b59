//! Rounds of order-statistic strategies (FedMedian, FedTrimmedAvg, Krum, Bulyan) on
//! models too large to hold once per participant. Their aggregate needs every update at
//! once, coordinate by coordinate ([`CoordinateRule`]); here the updates are not decoded
//! and held but read where they are stored, a window of coordinates at a time, so the
//! coordinator holds the aggregate (f32: twice an F16 model) and one window of every
//! participant's values ([`WINDOW_BUDGET`] bytes of them by default,
//! [`Coordinator::with_window_budget`], and at least one block of 4 Ki values each),
//! whatever the model's size. No file stays open between reads.
//!
//! Where each update is read from: the memory store's shared buffer, the directory
//! store's file ([`BlobStore::view`](tessera_ports::BlobStore::view)); a store with no
//! such view (the NATS Object Store) has each update copied once to a scratch directory in
//! the system's temporary directory (`TMPDIR`: it needs room for the round's updates, and
//! on a tmpfs they take memory), read from there, and deleted once the strategy's choice
//! leaves it out or the round ends (a coordinator that dies mid-round leaves its directory,
//! which the next windowed round to make one removes: [`crate::scratch`]).
//!
//! An update is checked whole before any window is read: its outputs and metrics, its
//! header against the model's layout, every byte against its digest, every value finite.
//! A bad one is its participant's failure, except a value that is not finite in bytes
//! that match the digest, which fails the round, as it does when updates are held whole.
//! Windows cut each tensor at multiples of [`DISTANCE_BLOCK`] elements and visit the
//! tensors in name order, so the aggregate has the bits [`Strategy::aggregate_fit`] gives
//! for the same updates held whole (tested below for every rule).
//!
//! A round reads this way when its global model is at least
//! [`Coordinator::with_streaming_from`] bytes and its strategy is
//! [per coordinate](Strategy::per_coordinate), without differential privacy, secure
//! aggregation or a hierarchy. The cost is reading: every window reads a piece of every
//! update (of those chosen, for the aggregate's windows), so an update is read once to
//! check it, once more for Krum's and Bulyan's distances, and once for the aggregate (and
//! from NATS, copied once before all that). Beside the window, a read buffer holds one
//! participant's piece of it in the update's type.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tessera_core::layout::{Layout, PREFIX};
use tessera_core::strategy::{CoordinateRule, DISTANCE_BLOCK, FitFailure, Strategy, add_pairwise_sq_distances};
use tessera_core::tensor::{FixedTensor, FloatType, Model, Tensor, TensorLimits, Tensors};
use tessera_core::wire::{Failure, TaskReply};
use tessera_core::{Digest, DigestWriter};
use tessera_ports::{BlobError, BlobView};

use crate::SessionError;
use crate::engine::Coordinator;
use crate::fl::in_round;
use crate::fold::Contribution;
use crate::scratch::Scratch;
use crate::streamed::Named;

/// Bytes of participants' values a window holds (f32 each): 256 MiB.
pub const WINDOW_BUDGET: usize = 256 << 20;

/// Bytes read at once when an update is checked.
const CHECK_CHUNK: usize = 1 << 20;

/// An update that passed its checks, read a window at a time.
struct Held {
    view: BlobView,
    /// Where each float tensor's data starts in the update, and its type, by name.
    tensors: BTreeMap<String, (u64, FloatType)>,
    /// Whether `view` is the round's own copy (removed once not needed).
    copy: bool,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let (true, BlobView::Path(p)) = (self.copy, &self.view) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Why an update was not taken.
enum Refusal {
    /// Its participant's failure.
    Participant(String),
    /// The round's failure.
    Round(String),
}

/// A piece of a window: elements `start..end` of the float tensor `name`.
#[derive(Clone, Debug, PartialEq)]
struct Piece {
    name: String,
    start: usize,
    end: usize,
}

/// The windows over float tensors of these sizes (elements, by name): each at most `len`
/// elements (a multiple of [`DISTANCE_BLOCK`], at least one block), tensors in name order,
/// each tensor cut at multiples of `len` from its start.
fn windows(sizes: &BTreeMap<String, usize>, len: usize) -> Vec<Vec<Piece>> {
    let len = (len / DISTANCE_BLOCK).max(1) * DISTANCE_BLOCK;
    let mut out = Vec::new();
    let mut current: Vec<Piece> = Vec::new();
    let mut used = 0;
    for (name, &size) in sizes {
        let mut start = 0;
        while start < size {
            let room = len - used;
            // A tensor's rest goes in whole when it fits; otherwise it is cut at a block
            // boundary of the tensor, so the distances' blocks line up with the whole
            // tensor's.
            let end = if size - start <= room { size } else { start + room / DISTANCE_BLOCK * DISTANCE_BLOCK };
            if end == start {
                out.push(std::mem::take(&mut current));
                used = 0;
                continue;
            }
            current.push(Piece { name: name.clone(), start, end });
            used += end - start;
            start = end;
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

impl Coordinator {
    /// Reads at most `bytes` of the participants' values (f32) at once in rounds of
    /// order-statistic strategies on large models (default [`WINDOW_BUDGET`], 256 MiB;
    /// at least one block of 4 Ki values per participant whatever the budget).
    pub fn with_window_budget(mut self, bytes: usize) -> Self {
        self.window_budget = bytes;
        self
    }

    /// A windowed round's updates from `outcomes` (each participant's reply, or why it has
    /// none), taken in participant order: the strategy's aggregate (in the global model's
    /// types, with the integer tensors of the participant with the most examples), the
    /// participants taken, the failures and the time spent aggregating. Fewer usable
    /// updates than `min_participants` fail the round ([`SessionError::RoundFailed`]), as
    /// do the strategy's refusals ([`SessionError::Aggregate`]).
    pub(crate) async fn fold_windowed(
        &self,
        round: u32,
        global: &Layout,
        strategy: &mut dyn Strategy,
        outcomes: Vec<(String, Result<&TaskReply, String>)>,
        min_participants: usize,
    ) -> Result<(Model, Vec<Contribution>, Vec<Failure>, Duration), SessionError> {
        let mut scratch: Option<Scratch> = None;
        let mut held = Vec::new();
        let mut usable: Vec<Contribution> = Vec::new();
        let mut failures = Vec::new();
        let mut examples = Vec::new();
        let mut fixed: Option<(u64, BTreeMap<String, FixedTensor>)> = None;
        let mut folding = Duration::ZERO;
        if let Some(w) = outcomes.windows(2).find(|w| w[0].0 >= w[1].0) {
            return Err(SessionError::Aggregate(format!(
                "round {round}: updates are taken in participant order, once each, and {:?} comes after {:?}",
                w[1].0, w[0].0
            )));
        }
        let shared = Arc::new(global.clone());
        for (i, (node, outcome)) in outcomes.into_iter().enumerate() {
            let taken = match outcome {
                Ok(reply) => match self.update_named(reply, global).await {
                    Ok(named) => self
                        .hold(&shared, &named, &mut scratch, i, round, &node, &mut folding)
                        .await
                        .map(|(h, i)| (h, i, named)),
                    Err(e) => Err(Refusal::Participant(e)),
                },
                Err(e) => Err(Refusal::Participant(e)),
            };
            match taken {
                Ok((h, ints, named)) => {
                    let n = named.metrics.num_examples;
                    if !ints.is_empty() && fixed.as_ref().is_none_or(|(best, _)| n > *best) {
                        fixed = Some((n, ints));
                    }
                    held.push(h);
                    examples.push(n);
                    usable.push(Contribution { node, metrics: named.metrics, seconds: named.seconds });
                }
                Err(Refusal::Participant(error)) => failures.push(Failure { node, error }),
                Err(Refusal::Round(e)) => return Err(SessionError::Aggregate(e)),
            }
        }
        if usable.len() < min_participants {
            return Err(crate::fl::too_few(round, usable.len(), min_participants, &failures));
        }
        let failed: Vec<FitFailure> =
            failures.iter().map(|f| FitFailure { node: f.node.clone(), error: f.error.clone() }).collect();
        let rule = strategy
            .coordinate_rule(round, &examples, &failed)
            .map_err(|e| SessionError::Aggregate(in_round(round, &e)))?;
        let started = Instant::now();
        let shapes = global.float_shapes();
        let nodes: Vec<String> = usable.iter().map(|u| u.node.clone()).collect();
        let (threads, budget) = (self.threads, self.window_budget);
        let held: Vec<Option<Held>> = held.into_iter().map(Some).collect();
        let floats = tokio::task::spawn_blocking(move || aggregate(rule, held, &nodes, &shapes, threads, budget))
            .await
            .map_err(|e| SessionError::Aggregate(format!("round {round}: aggregating: {e}")))?
            .map_err(|e| SessionError::Aggregate(format!("round {round}: {e}")))?;
        drop(scratch);
        let model = Model { floats, types: global.float_types(), fixed: fixed.map(|(_, f)| f).unwrap_or_default() };
        Ok((model, usable, failures, folding + started.elapsed()))
    }

    /// Opens participant `node`'s update where it is stored (copying it into `scratch`
    /// when the store offers no view) and checks it whole; gives it with its integer
    /// tensors.
    #[allow(clippy::too_many_arguments)]
    async fn hold(
        &self,
        global: &Arc<Layout>,
        named: &Named<'_>,
        scratch: &mut Option<Scratch>,
        index: usize,
        round: u32,
        node: &str,
        folding: &mut Duration,
    ) -> Result<(Held, BTreeMap<String, FixedTensor>), Refusal> {
        let model = named.model;
        let (view, copy) = match model.inline_bytes() {
            Ok(Some(b)) => (BlobView::Bytes(Bytes::copy_from_slice(b)), false),
            Err(_) => {
                return Err(Refusal::Participant(format!(
                    "the inline `model` output does not match its size and digest {}",
                    model.digest
                )));
            }
            Ok(None) => self.open_view(&model.digest, scratch, index, model.size, round).await?,
        };
        let global = global.clone();
        let (digest, size) = (model.digest, model.size);
        let node = node.to_owned();
        let started = Instant::now();
        let checked = tokio::task::spawn_blocking(move || check(view, copy, &global, &digest, size, round, &node))
            .await
            .map_err(|e| Refusal::Round(format!("round {round}: checking an update: {e}")))?;
        *folding += started.elapsed();
        checked
    }

    /// Blob `digest` for positioned reads: the store's view, or participant `index`'s copy
    /// in `scratch` (a directory in the system's temporary directory, `TMPDIR`, made at the
    /// first copy); gives whether it is a copy. The store's failures are the participant's;
    /// failing to make or write the copy is the round's.
    async fn open_view(
        &self,
        digest: &Digest,
        scratch: &mut Option<Scratch>,
        index: usize,
        size: u64,
        round: u32,
    ) -> Result<(BlobView, bool), Refusal> {
        match self.retry("reading an update", || self.backend.blobs.view(digest)).await {
            Ok(Some(v)) => return Ok((v, false)),
            Ok(None) => {}
            Err(e) => return Err(Refusal::Participant(e.to_string())),
        }
        // A blob other than the size its reply gives (bounded by the model's) is not
        // copied: it could fill the scratch directory.
        match self.retry("reading an update", || self.backend.blobs.size(digest)).await {
            Ok(Some(n)) if n != size => {
                return Err(Refusal::Participant(format!(
                    "update refused: the stored blob is {n} bytes, its reply says {size}"
                )));
            }
            Ok(_) => {}
            Err(e) => return Err(Refusal::Participant(e.to_string())),
        }
        if scratch.is_none() {
            let dir = tokio::task::spawn_blocking(|| Scratch::new_in(&std::env::temp_dir()))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r)
                .map_err(|e| {
                    Refusal::Round(format!("round {round}: making a scratch directory for the round's updates: {e}"))
                })?;
            *scratch = Some(dir);
        }
        let dir = scratch.as_ref().map(|d| d.path().to_owned()).unwrap_or_default();
        let path = dir.join(index.to_string());
        // The store's transient failures are retried; the local copy's (a full disk) are not.
        let copied = self
            .retry("reading an update", || async {
                match self.backend.blobs.get_file(digest, &path).await {
                    Err(BlobError::Io { path: at, source }) if at.starts_with(&dir) => Err(Copying::Local(at, source)),
                    other => other.map_err(Copying::Store),
                }
            })
            .await;
        match copied {
            Ok(true) => Ok((BlobView::Path(path), true)),
            Ok(false) => Err(Refusal::Participant("the `model` blob is missing".into())),
            Err(Copying::Local(at, source)) => {
                let _ = std::fs::remove_file(&path);
                Err(Refusal::Round(format!("round {round}: copying an update to {}: {source}", at.display())))
            }
            Err(Copying::Store(e)) => {
                let _ = std::fs::remove_file(&path);
                Err(Refusal::Participant(e.to_string()))
            }
        }
    }
}

/// Why an update could not be copied: the store's failure, or the local copy's.
enum Copying {
    Store(BlobError),
    Local(std::path::PathBuf, std::io::Error),
}

impl std::fmt::Display for Copying {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Copying::Store(e) => e.fmt(f),
            Copying::Local(at, e) => write!(f, "writing {}: {e}", at.display()),
        }
    }
}

impl tessera_ports::Transient for Copying {
    fn transient(&self) -> bool {
        matches!(self, Copying::Store(e) if e.transient())
    }
}

/// Reads a safetensors header of at most `max_header` bytes from the front of `view`.
fn layout_of_view(view: &BlobView, max_header: usize) -> Result<Layout, String> {
    let mut prefix = [0u8; PREFIX];
    view.read_at(0, &mut prefix).map_err(|e| format!("reading its header: {e}"))?;
    let n = Layout::header_len(prefix).map_err(|e| e.to_string())?;
    if n > max_header {
        return Err(format!("its header is {n} bytes, more than the {max_header} the model's allows"));
    }
    let mut head = vec![0u8; n];
    view.read_at(PREFIX as u64, &mut head).map_err(|e| format!("reading its header: {e}"))?;
    Layout::parse(&head, TensorLimits::default()).map_err(|e| e.to_string())
}

/// Checks an update whole (blocking): its header against the model's layout, its size,
/// every byte against `digest`, every float value finite; gives it held, with its integer
/// tensors.
fn check(
    view: BlobView,
    copy: bool,
    global: &Layout,
    digest: &Digest,
    size: u64,
    round: u32,
    node: &str,
) -> Result<(Held, BTreeMap<String, FixedTensor>), Refusal> {
    // Removed (when a copy) on every way out but the update held.
    let view = Held { view, tensors: BTreeMap::new(), copy };
    let refuse = |e: String| Refusal::Participant(format!("update refused: {e}"));
    let len = view.view.size().map_err(|e| Refusal::Participant(format!("reading the update: {e}")))?;
    if len != size {
        return Err(refuse(format!("it is {len} bytes, its reply says {size}")));
    }
    let max_header = usize::try_from(global.data_start).unwrap_or(usize::MAX).saturating_mul(2).max(1 << 20);
    let layout = layout_of_view(&view.view, max_header).map_err(refuse)?;
    if layout.file_len() != size {
        return Err(refuse(format!("its header describes {} bytes, its reply {size}", layout.file_len())));
    }
    global.check_same(&layout).map_err(|e| refuse(e.to_string()))?;
    let mut hasher = DigestWriter::new();
    let mut buf = vec![0u8; CHECK_CHUNK];
    let read = |at: u64, buf: &mut [u8]| {
        view.view.read_at(at, buf).map_err(|e| Refusal::Participant(format!("reading the update: {e}")))
    };
    // The header, then each tensor: floats checked finite, integers kept.
    let mut at = 0u64;
    while at < layout.data_start {
        let n = usize::try_from(layout.data_start - at).unwrap_or(usize::MAX).min(CHECK_CHUNK);
        read(at, &mut buf[..n])?;
        std::io::Write::write_all(&mut hasher, &buf[..n]).map_err(|e| Refusal::Round(e.to_string()))?;
        at += n as u64;
    }
    let mut tensors = BTreeMap::new();
    let mut ints = BTreeMap::new();
    // The first value that is not finite fails the round once the bytes are known to be
    // the update's (a blob corrupted in the store is its participant's failure).
    let mut not_finite = None;
    for t in &layout.tensors {
        let Some(ty) = t.float_type() else {
            let mut bytes = vec![0u8; usize::try_from(t.len).map_err(|e| refuse(e.to_string()))?];
            read(at, &mut bytes)?;
            std::io::Write::write_all(&mut hasher, &bytes).map_err(|e| Refusal::Round(e.to_string()))?;
            ints.insert(t.name.clone(), FixedTensor { dtype: t.dtype, shape: t.shape.clone(), bytes });
            at += t.len;
            continue;
        };
        tensors.insert(t.name.clone(), (at, ty));
        let step = (CHECK_CHUNK / ty.size() * ty.size()) as u64;
        let (mut done, mut index) = (0u64, 0usize);
        while done < t.len {
            let n = usize::try_from(step.min(t.len - done)).unwrap_or(CHECK_CHUNK);
            read(at + done, &mut buf[..n])?;
            std::io::Write::write_all(&mut hasher, &buf[..n]).map_err(|e| Refusal::Round(e.to_string()))?;
            let values = ty.read(&buf[..n]);
            if not_finite.is_none()
                && let Some(i) = values.iter().position(|v| !v.is_finite())
            {
                not_finite = Some(format!(
                    "round {round}: node {node}'s update holds {} in tensor {:?} at index {}, not a finite number",
                    values[i],
                    t.name,
                    index + i
                ));
            }
            index += values.len();
            done += n as u64;
        }
        at += t.len;
    }
    if hasher.finish() != *digest {
        return Err(Refusal::Participant(format!("the update's bytes do not match its digest {digest}")));
    }
    if let Some(e) = not_finite {
        return Err(Refusal::Round(e));
    }
    let mut held = view;
    held.tensors = tensors;
    Ok((held, ints))
}

/// Runs `rule` over the held updates (in node order), a window of at most `budget` bytes
/// of values at a time: the distances when it needs them, its choice, then each window of
/// the aggregate (blocking).
fn aggregate(
    mut rule: Box<dyn CoordinateRule>,
    mut held: Vec<Option<Held>>,
    nodes: &[String],
    shapes: &BTreeMap<String, Vec<usize>>,
    threads: usize,
    budget: usize,
) -> Result<Tensors, String> {
    let sizes: BTreeMap<String, usize> = shapes.iter().map(|(n, s)| (n.clone(), s.iter().product())).collect();
    let everyone: Vec<usize> = (0..held.len()).collect();
    let mut distances = Vec::new();
    if rule.needs_distances() {
        let n = held.len();
        distances = vec![0.0f64; n * n];
        for window in windows(&sizes, budget / 4 / n.max(1)) {
            let values = read_window(&held, nodes, &everyone, &window)?;
            for k in 0..window.len() {
                let inputs: Vec<&[f32]> = values.iter().map(|v| v[k].as_slice()).collect();
                add_pairwise_sq_distances(&mut distances, &inputs, threads);
            }
        }
    }
    let picked = rule.select(&distances);
    if picked.is_empty() || picked.iter().any(|&i| i >= held.len()) {
        return Err(format!("the strategy chose {picked:?} of {} updates", held.len()));
    }
    // Updates not chosen are not read again: their copies go now.
    for (i, h) in held.iter_mut().enumerate() {
        if !picked.contains(&i) {
            *h = None;
        }
    }
    let mut out = Tensors(shapes.iter().map(|(n, s)| (n.clone(), Tensor::zeros(s))).collect());
    for window in windows(&sizes, budget / 4 / picked.len().max(1)) {
        let values = read_window(&held, nodes, &picked, &window)?;
        for (k, piece) in window.iter().enumerate() {
            let inputs: Vec<&[f32]> = values.iter().map(|v| v[k].as_slice()).collect();
            let t = out.0.get_mut(&piece.name).ok_or_else(|| format!("tensor {:?} is not in the model", piece.name))?;
            rule.apply(&mut t.data[piece.start..piece.end], &inputs);
        }
    }
    Ok(out)
}

/// The values of `window` (a vector per piece) of each of the updates `which`, in that order.
fn read_window(
    held: &[Option<Held>],
    nodes: &[String],
    which: &[usize],
    window: &[Piece],
) -> Result<Vec<Vec<Vec<f32>>>, String> {
    let mut bytes = Vec::new();
    which
        .iter()
        .map(|&i| {
            let h = held[i].as_ref().ok_or_else(|| format!("{}'s update was let go", nodes[i]))?;
            window
                .iter()
                .map(|p| {
                    let &(at, ty) = h
                        .tensors
                        .get(&p.name)
                        .ok_or_else(|| format!("{}'s update lacks tensor {:?}", nodes[i], p.name))?;
                    bytes.resize((p.end - p.start) * ty.size(), 0);
                    h.view
                        .read_at(at + (p.start * ty.size()) as u64, &mut bytes)
                        .map_err(|e| format!("reading the update of {} again: {e}", nodes[i]))?;
                    Ok(ty.read(&bytes))
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streamed::tests::reply;

    use std::sync::Arc;

    use tessera_core::strategy::{FitResult, Participation, from_config};
    use tessera_core::tensor::Dtype;
    use tessera_core::wire::{BlobRef, TaskOutcome};
    use tessera_ports::{Backend, BlobError, BlobStore, FsBlobStore, MemoryBlobStore};

    const B: usize = DISTANCE_BLOCK;

    /// Participant `i`'s model: `w` (F32, past three blocks), `h` (F16), `b` (BF16, past a
    /// block), `d` (F64, past a block) and the counter `n` (I64). Participants 5 and 6 are
    /// far from the others.
    fn model(i: usize) -> Model {
        let far = if i >= 5 { 40.0 } else { 0.0 };
        let v = |len: usize, salt: usize| -> Vec<f32> {
            (0..len).map(|j| far + ((j * 7 + i * 13 + salt) % 23) as f32 * 0.125 - (i as f32) * 0.01).collect()
        };
        let mut m = Model::default();
        m.floats.0.insert("w".into(), Tensor { shape: vec![3 * B + 100], data: v(3 * B + 100, 1) });
        m.floats.0.insert("h".into(), Tensor { shape: vec![5], data: v(5, 2) });
        m.floats.0.insert("b".into(), Tensor { shape: vec![B + 3], data: v(B + 3, 3) });
        m.floats.0.insert("d".into(), Tensor { shape: vec![B + 9], data: v(B + 9, 4) });
        m.types.insert("h".into(), FloatType::F16);
        m.types.insert("b".into(), FloatType::BF16);
        m.types.insert("d".into(), FloatType::F64);
        m.fixed.insert(
            "n".into(),
            FixedTensor { dtype: Dtype::I64, shape: vec![], bytes: (i as i64 * 10).to_le_bytes().to_vec() },
        );
        m
    }

    fn strategies() -> Vec<(serde_json::Value, Box<dyn Strategy>)> {
        let p = Participation { min_fit: 1, min_available: 1, ..Participation::default() };
        [
            ("fedmedian", serde_json::Value::Null),
            ("fedtrimmedavg", serde_json::json!({"beta": 0.2})),
            ("krum", serde_json::json!({"num_malicious_clients": 2})),
            ("krum", serde_json::json!({"num_malicious_clients": 1, "num_clients_to_keep": 3})),
            ("bulyan", serde_json::json!({"num_malicious_clients": 1})),
        ]
        .into_iter()
        .map(|(name, params)| (serde_json::json!([name, params]), from_config(name, &params, p.clone()).unwrap()))
        .collect()
    }

    /// What each participant's update decodes to, as the held path takes it.
    fn held_results(n: usize) -> Vec<FitResult> {
        (0..n)
            .map(|i| FitResult {
                node: format!("n{i}"),
                update: Model::decode(&model(i).encode(), TensorLimits::default()).unwrap().floats,
                num_examples: 10 + i as u64 * 3,
            })
            .collect()
    }

    #[test]
    fn every_rule_over_windows_gives_the_bits_of_updates_held_whole() {
        let n = 7;
        let global = model(0);
        let layout = layout_of_view(&BlobView::Bytes(Bytes::from(global.encode())), 1 << 20).unwrap();
        let held: Vec<Option<Held>> = (0..n)
            .map(|i| {
                let bytes = Bytes::from(model(i).encode());
                let digest = Digest::of(&bytes);
                let size = bytes.len() as u64;
                let Ok((h, _)) = check(BlobView::Bytes(bytes), false, &layout, &digest, size, 1, "n") else { panic!() };
                Some(h)
            })
            .collect();
        let nodes: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
        let results = held_results(n);
        let examples: Vec<u64> = results.iter().map(|r| r.num_examples).collect();
        for (what, mut strategy) in strategies() {
            let want = strategy.aggregate_fit(1, &global.floats, &results, &[]).unwrap();
            // One block per participant per window, a few blocks, all at once.
            for budget in [4 * B * n, 4 * 3 * B * n + 4 * 100, WINDOW_BUDGET] {
                let rule = strategy.coordinate_rule(1, &examples, &[]).unwrap();
                let held = held
                    .iter()
                    .map(|h| h.as_ref().map(|h| Held { view: h.view.clone(), tensors: h.tensors.clone(), copy: false }))
                    .collect();
                let got = aggregate(rule, held, &nodes, &layout.float_shapes(), 2, budget).unwrap();
                assert!(got == want, "{what}, budget {budget}: windows and whole updates differ");
            }
        }
        // The far participants are not Krum's choice: the test tells the rules apart.
        let (_, mut krum) = strategies().swap_remove(2);
        let chosen = krum.aggregate_fit(1, &global.floats, &results, &[]).unwrap();
        assert!(chosen.0["w"].data[0] < 10.0);
    }

    /// A store that offers no view of its blobs, as the NATS Object Store does not.
    struct NoView(MemoryBlobStore);

    #[async_trait::async_trait]
    impl BlobStore for NoView {
        async fn put(&self, bytes: Bytes) -> Result<Digest, BlobError> {
            self.0.put(bytes).await
        }
        async fn get(&self, digest: &Digest) -> Result<Option<Bytes>, BlobError> {
            self.0.get(digest).await
        }
        async fn contains(&self, digest: &Digest) -> Result<bool, BlobError> {
            self.0.contains(digest).await
        }
        async fn delete(&self, digest: &Digest) -> Result<bool, BlobError> {
            self.0.delete(digest).await
        }
        async fn stored_bytes(&self) -> Result<u64, BlobError> {
            self.0.stored_bytes().await
        }
        async fn size(&self, digest: &Digest) -> Result<Option<u64>, BlobError> {
            self.0.size(digest).await
        }
    }

    #[tokio::test]
    async fn updates_are_read_from_each_kind_of_store_and_bad_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = Arc::new(FsBlobStore::open(dir.path().join("blobs")).unwrap());
        let stores: Vec<(&str, Arc<dyn BlobStore>)> = vec![
            ("memory", Arc::new(MemoryBlobStore::new())),
            ("directory", files.clone()),
            ("no view", Arc::new(NoView(MemoryBlobStore::new()))),
        ];
        let n = 7;
        let results = held_results(n);
        for (kind, blobs) in stores {
            let hub = tessera_hub::HubStore::open(dir.path().join(format!("hub-{kind}"))).unwrap();
            let backend = Backend { blobs: blobs.clone(), ..Backend::in_process(Duration::from_secs(5)) };
            let c = Coordinator::new(backend, Arc::new(tessera_hub::LocalHub(Arc::new(hub))), None);
            let global = model(0).encode();
            let layout = layout_of_view(&BlobView::Bytes(Bytes::from(global)), 1 << 20).unwrap();
            let mut replies = Vec::new();
            for (i, r) in results.iter().enumerate() {
                let bytes = Bytes::from(model(i).encode());
                let size = bytes.len() as u64;
                let stored = BlobRef::stored("model", blobs.put(bytes).await.unwrap(), size);
                replies.push(reply(&r.node, stored, r.num_examples));
            }
            for (what, mut strategy) in strategies() {
                let want = strategy.aggregate_fit(1, &model(0).floats, &results, &[]).unwrap();
                let outcomes = replies.iter().map(|r| (r.node.clone(), Ok(r))).collect();
                let (got, usable, failures, _) =
                    c.fold_windowed(1, &layout, strategy.as_mut(), outcomes, n).await.unwrap();
                assert!(failures.is_empty(), "{kind} {what}: {failures:?}");
                assert_eq!(usable.len(), n);
                assert!(got.floats == want, "{kind} {what}: windows and whole updates differ");
                assert_eq!(got.types, model(0).types);
                // The counter of the participant with the most examples (the last).
                assert_eq!(got.fixed["n"].bytes, 60i64.to_le_bytes(), "{kind} {what}");
            }

            // Bad updates are their participants' failures; a value that is not finite
            // fails the round.
            let mut renamed = model(1);
            let t = renamed.floats.0.remove("h").unwrap();
            renamed.floats.0.insert("x".into(), t);
            renamed.types = BTreeMap::from([
                ("x".to_string(), FloatType::F16),
                ("b".to_string(), FloatType::BF16),
                ("d".to_string(), FloatType::F64),
            ]);
            let bytes = Bytes::from(renamed.encode());
            let size = bytes.len() as u64;
            let renamed = reply("r", BlobRef::stored("model", blobs.put(bytes).await.unwrap(), size), 10);
            let mut lying = replies[0].clone();
            if let TaskOutcome::Ok { outputs, .. } = &mut lying.outcome {
                outputs[0].digest = Digest::of(b"nothing stored here");
            }
            lying.node = "s".into();
            // A reply that gives its update a size other than the stored blob's: never
            // copied nor read as that size.
            let mut short = replies[1].clone();
            if let TaskOutcome::Ok { outputs, .. } = &mut short.outcome {
                outputs[0].size -= 8;
            }
            short.node = "s2".into();
            let outcomes = vec![
                ("n0".to_string(), Ok(&replies[0])),
                ("r".to_string(), Ok(&renamed)),
                ("s".to_string(), Ok(&lying)),
                ("s2".to_string(), Ok(&short)),
                ("t".to_string(), Err("no reply within 5s".to_string())),
            ];
            let mut median = strategies().swap_remove(0).1;
            let (_, usable, failures, _) = c.fold_windowed(1, &layout, median.as_mut(), outcomes, 1).await.unwrap();
            assert_eq!(usable.iter().map(|u| u.node.as_str()).collect::<Vec<_>>(), ["n0"], "{kind}");
            let why: BTreeMap<&str, &str> = failures.iter().map(|f| (f.node.as_str(), f.error.as_str())).collect();
            assert!(why["r"].contains("update refused") && why["r"].contains("\"x\""), "{kind}: {}", why["r"]);
            assert!(why["s"].contains("missing"), "{kind}: {}", why["s"]);
            assert!(why["s2"].contains("its reply says"), "{kind}: {}", why["s2"]);
            assert_eq!(why["t"], "no reply within 5s");

            let mut nan = model(2);
            nan.floats.0.get_mut("w").unwrap().data[2 * B + 7] = f32::NAN;
            let bytes = Bytes::from(nan.encode());
            let size = bytes.len() as u64;
            let nan = reply("u", BlobRef::stored("model", blobs.put(bytes).await.unwrap(), size), 10);
            let outcomes = vec![("u".to_string(), Ok(&nan))];
            let e = c.fold_windowed(1, &layout, median.as_mut(), outcomes, 1).await.unwrap_err();
            assert!(
                e.to_string().contains("not a finite number") && e.to_string().contains("index 8199"),
                "{kind}: {e}"
            );
        }

        // A stored file changed under its digest is its participant's failure, found
        // before any of it is read into the aggregate.
        let blobs: Arc<dyn BlobStore> = files.clone();
        let hub = tessera_hub::HubStore::open(dir.path().join("hub-corrupt")).unwrap();
        let backend = Backend { blobs: blobs.clone(), ..Backend::in_process(Duration::from_secs(5)) };
        let c = Coordinator::new(backend, Arc::new(tessera_hub::LocalHub(Arc::new(hub))), None);
        let layout = layout_of_view(&BlobView::Bytes(Bytes::from(model(0).encode())), 1 << 20).unwrap();
        let bytes = Bytes::from(model(3).encode());
        let size = bytes.len() as u64;
        let digest = blobs.put(bytes).await.unwrap();
        let path = files.path_of(&digest);
        let mut raw = std::fs::read(&path).unwrap();
        // The last value (F16 or BF16) made NaN: not finite, in bytes that are not the
        // update's.
        let last = raw.len() - 1;
        raw[last - 1] = 0xff;
        raw[last] = 0x7f;
        std::fs::write(&path, raw).unwrap();
        let r = reply("v", BlobRef::stored("model", digest, size), 10);
        let mut median = strategies().swap_remove(0).1;
        let e = c.fold_windowed(1, &layout, median.as_mut(), vec![("v".into(), Ok(&r))], 1).await.unwrap_err();
        assert!(matches!(&e, SessionError::RoundFailed { got: 0, .. }), "{e}");
        assert!(e.to_string().contains("do not match its digest"), "{e}");
    }

    fn sizes(of: &[(&str, usize)]) -> BTreeMap<String, usize> {
        of.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    }

    #[test]
    fn windows_cover_every_element_once_cut_at_blocks() {
        let b = DISTANCE_BLOCK;
        let s = sizes(&[("a", 3 * b + 5), ("b", 7), ("c", 2 * b)]);
        for len in [1, b, 2 * b, 3 * b + 100, 10 * b] {
            let ws = windows(&s, len);
            let cap = (len / b).max(1) * b;
            let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
            let order: Vec<&str> = ws.iter().flatten().map(|p| p.name.as_str()).collect();
            assert!(order.windows(2).all(|w| w[0] <= w[1]), "{len}: tensors in name order: {order:?}");
            for w in &ws {
                assert!(w.iter().map(|p| p.end - p.start).sum::<usize>() <= cap, "{len}: {w:?}");
                for p in w {
                    let next = seen.entry(&p.name).or_default();
                    assert_eq!(p.start, *next, "{len}: pieces of {} in order, no gap", p.name);
                    assert!(p.start % b == 0, "{len}: {p:?} starts at a block");
                    *next = p.end;
                }
            }
            assert_eq!(seen, BTreeMap::from([("a", 3 * b + 5), ("b", 7), ("c", 2 * b)]), "{len}");
        }
        assert!(windows(&BTreeMap::new(), b).is_empty());
    }
}
