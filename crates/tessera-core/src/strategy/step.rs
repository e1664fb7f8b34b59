//! A server step over the model with state kept across rounds (FedAvgM's momentum, FedOpt's
//! moments), taken so that a refused round leaves the state as it was without copying it.

use super::StrategyError;
use crate::tensor::Tensors;

/// Values of a tensor a step takes at a time (4 MiB of f32): a step's scratch is one chunk
/// per state tensor, not a copy of the state.
pub(super) const STEP_CHUNK: usize = 1 << 20;

/// Runs `step(weights, avg, state)` over the model [`STEP_CHUNK`] values at a time, twice:
/// first on a copy of `current` with `state` only read (each chunk's new state goes to
/// scratch, and must be finite); then, once `accept` takes the new model, on `state` in
/// place (each chunk's new weights go to scratch: the same values, the step being a
/// function of its inputs; no second pass without state). Returns the new model; when the
/// round is refused, `state` is unchanged.
///
/// `avg` (the round's mean) and every `state` entry must have `current`'s layout (the callers
/// check it).
///
/// # Errors
/// [`StrategyError::Aggregation`] when a new state value is not finite (past the f32 range:
/// kept, it would turn every later round's model into NaN), and `accept`'s.
pub(super) fn step_in_two_passes(
    round: u32,
    strategy: &str,
    current: &Tensors,
    avg: &Tensors,
    state: &mut [&mut Tensors],
    step: impl Fn(&mut [f32], &[f32], &mut [&mut [f32]]),
    accept: impl FnOnce(&Tensors) -> Result<(), StrategyError>,
) -> Result<Tensors, StrategyError> {
    let mut out = current.clone();
    let mut scratch: Vec<Vec<f32>> = state.iter().map(|_| Vec::new()).collect();
    for (tensor, w) in out.0.iter_mut() {
        let a = &avg.0[tensor].data;
        for (k, w) in w.data.chunks_mut(STEP_CHUNK).enumerate() {
            let at = k * STEP_CHUNK..k * STEP_CHUNK + w.len();
            for (s, saved) in scratch.iter_mut().zip(state.iter()) {
                s.clear();
                s.extend_from_slice(&saved.0[tensor].data[at.clone()]);
            }
            let mut views: Vec<&mut [f32]> = scratch.iter_mut().map(Vec::as_mut_slice).collect();
            step(w, &a[at], &mut views);
            if let Some(bad) = scratch.iter().flatten().find(|v| !v.is_finite()) {
                return Err(StrategyError::Aggregation {
                    round,
                    strategy: strategy.into(),
                    message: format!("the server state of tensor {tensor:?} would leave the f32 range ({bad})"),
                });
            }
        }
    }
    accept(&out)?;
    if state.is_empty() {
        return Ok(out);
    }
    drop(scratch);
    let mut w_new = Vec::new();
    for (tensor, w) in &current.0 {
        let a = &avg.0[tensor].data;
        for (k, w) in w.data.chunks(STEP_CHUNK).enumerate() {
            let at = k * STEP_CHUNK..k * STEP_CHUNK + w.len();
            w_new.clear();
            w_new.extend_from_slice(w);
            let mut views: Vec<&mut [f32]> = state
                .iter_mut()
                .map(|s| &mut s.0.get_mut(tensor).expect("the state has the model's layout").data[at.clone()])
                .collect();
            step(&mut w_new, &a[at], &mut views);
        }
    }
    Ok(out)
}
