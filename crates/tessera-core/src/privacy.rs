//! Differential privacy for federated updates: L2 clipping, Gaussian noise, DP-FedAvg with
//! fixed clipping (server side and client side) and a Rényi DP accountant.
//!
//! Pure like the rest of the crate: randomness comes in as a [`Gaussian`] source.
//!
//! # DP-FedAvg
//!
//! An *update* is a client's model minus the global model it started from (a delta).
//!
//! - [`dp_fedavg_server_side`] (like Flower's `DifferentialPrivacyServerSideFixedClipping`):
//!   the server clips each update to L2 norm `C`, averages them and adds N(0, (z·C/n)²) to
//!   each coordinate of the average. The server sees raw updates.
//! - [`dp_fedavg_client_side`] (like Flower's `DifferentialPrivacyClientSideFixedClipping`):
//!   each client clips its own update with [`clip_l2`]; the server checks the norms,
//!   averages and adds the same noise. With secure aggregation the server sees only the
//!   sum; it then noises the mean with [`noise_mean`].
//!
//! In both, one round is one step of the sampled Gaussian mechanism with noise multiplier
//! `z` and sampling rate `q` = sampled clients / population, at the client level; account
//! for it with [`RdpAccountant::step`].
//!
//! # Hostile input
//!
//! NaN and infinite values are refused with [`PrivacyError::NonFinite`], naming the update
//! and coordinate, and nothing is modified: a non-finite update has no norm, so it cannot
//! be clipped, and averaging it would poison the model. Callers drop that client and
//! aggregate the rest. Non-positive or non-finite norms, noise multipliers, standard
//! deviations and deltas are refused with [`PrivacyError::Parameter`].
//!
//! # Caveat
//!
//! The noise is floating point (Box-Muller over 64-bit uniforms). Floating-point samplers
//! leak a little through the low-order bits of their outputs (Mironov, CCS 2012), and the
//! accountant assumes the noise is exactly Gaussian. For formal guarantees in production,
//! prefer a discrete Gaussian added to integers (Canonne, Kamath and Steinke 2020), which
//! also composes with secure aggregation (Kairouz, Liu and Steinke 2021). The uniform source
//! must be cryptographically secure; [`crate::select::SplitMix64`] is for tests only.
//!
//! # Accountant
//!
//! [`RdpAccountant`] computes the Rényi DP of the sampled Gaussian mechanism (Mironov 2017;
//! Mironov, Talwar and Zhang 2019), with the same algorithm as TF-privacy's and Opacus'
//! `compute_rdp` (exact binomial expansion for integer orders, the two-sided series with
//! erfc for fractional ones), and converts it to (ε, δ) with either
//! - [`RdpAccountant::epsilon`]: the conversion of Balle et al. 2020 (also Canonne,
//!   Kamath and Steinke 2020), `ε = rdp + ln(1 - 1/α) - ln(δ·α)/(α - 1)`, as in Opacus ≥ 1.0
//!   and Google's `dp_accounting`, or
//! - [`RdpAccountant::epsilon_classic`]: Mironov's `ε = rdp + ln(1/δ)/(α - 1)`, as in older
//!   TF-privacy; always larger.
//!
//! ```
//! use tessera_core::privacy::RdpAccountant;
//!
//! let mut acc = RdpAccountant::new();
//! acc.step(1.1, 0.01, 1000).unwrap(); // z = 1.1, q = 1 %, 1000 rounds
//! let (eps, order) = acc.epsilon(1e-5).unwrap();
//! assert!((eps - 1.7253).abs() < 1e-3 && order == 9.0);
//! ```

/// Why a privacy step was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrivacyError {
    /// A NaN or infinite value.
    #[error("update {update} has a non-finite value at coordinate {index}")]
    NonFinite {
        /// Which update (0 for a single vector).
        update: usize,
        /// Which coordinate.
        index: usize,
    },
    /// A parameter outside its domain.
    #[error("invalid parameter: {0}")]
    Parameter(String),
    /// Updates of different lengths.
    #[error("update {update} has {got} values, expected {expected}")]
    Shape {
        /// Which update.
        update: usize,
        /// The first update's length.
        expected: usize,
        /// This one's.
        got: usize,
    },
    /// No updates to aggregate.
    #[error("no updates to aggregate")]
    NoUpdates,
    /// A client-side clipped update whose norm exceeds the clipping norm.
    #[error("update {update} has norm {norm}, above the clipping norm {clip}: it was not clipped")]
    NotClipped {
        /// Which update.
        update: usize,
        /// Its L2 norm.
        norm: f64,
        /// The clipping norm.
        clip: f32,
    },
    /// The accountant's arithmetic failed (parameters far outside the useful range).
    #[error("privacy accounting failed: {0}")]
    Numerical(String),
}

fn positive(name: &str, v: f64) -> Result<(), PrivacyError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(PrivacyError::Parameter(format!("{name} must be finite and positive, got {v}")))
    }
}

/// Clips a whole model update: the difference `update - base` over every tensor, as one
/// vector, is scaled down to L2 norm `max_norm` when above it; `update` becomes `base` plus
/// the clipped difference. Returns the difference's norm before clipping. Refuses models of
/// different layouts and non-finite values.
pub fn clip_model_update(
    base: &crate::tensor::Tensors,
    update: &mut crate::tensor::Tensors,
    max_norm: f32,
) -> Result<f64, PrivacyError> {
    positive("the clipping norm", f64::from(max_norm))?;
    base.check_same_layout(update).map_err(|e| PrivacyError::Parameter(format!("update layout: {e}")))?;
    let mut delta: Vec<f32> = Vec::new();
    for (name, t) in &update.0 {
        delta.extend(t.data.iter().zip(&base.0[name].data).map(|(u, b)| u - b));
    }
    check_finite(&delta)?;
    let norm = l2_norm(&delta);
    clip_l2(&mut delta, max_norm)?;
    let mut at = 0;
    for (name, t) in update.0.iter_mut() {
        for (u, b) in t.data.iter_mut().zip(&base.0[name].data) {
            *u = b + delta[at];
            at += 1;
        }
    }
    Ok(norm)
}

/// The L2 norm of `update - base` over every tensor, as one vector, accumulated in f64
/// without copying either model: how a coordinator checks that a node clipped its update.
/// Refuses models of different layouts.
pub fn model_update_norm(base: &crate::tensor::Tensors, update: &crate::tensor::Tensors) -> Result<f64, PrivacyError> {
    base.check_same_layout(update).map_err(|e| PrivacyError::Parameter(format!("update layout: {e}")))?;
    let mut sq = 0.0f64;
    for (name, t) in &update.0 {
        for (u, b) in t.data.iter().zip(&base.0[name].data) {
            let d = f64::from(*u) - f64::from(*b);
            sq += d * d;
        }
    }
    Ok(sq.sqrt())
}

/// Refuses NaN and infinities, naming the first one.
pub fn check_finite(values: &[f32]) -> Result<(), PrivacyError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(PrivacyError::NonFinite { update: 0, index }),
        None => Ok(()),
    }
}

/// The L2 norm, accumulated in f64 (no overflow for finite f32 values).
pub fn l2_norm(values: &[f32]) -> f64 {
    values.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt()
}

/// Clips `update` to L2 norm `max_norm` and returns its original norm (computed in f64;
/// infinite when above `f32::MAX`, which finite values can reach).
///
/// An update above the norm is scaled to just under it (by `max_norm / norm · (1 - 2⁻²⁰)`,
/// so that rounding to f32 never leaves it above); one at or below is unchanged. Refuses
/// non-finite values (unchanged update) and a `max_norm` that is not finite and positive.
pub fn clip_l2(update: &mut [f32], max_norm: f32) -> Result<f32, PrivacyError> {
    positive("the clipping norm", f64::from(max_norm))?;
    check_finite(update)?;
    let norm = l2_norm(update);
    if norm > f64::from(max_norm) {
        let factor = f64::from(max_norm) / norm * (1.0 - 1.0 / (1u64 << 20) as f64);
        for v in update.iter_mut() {
            *v = (f64::from(*v) * factor) as f32;
        }
    }
    Ok(norm as f32)
}

/// A source of standard normal samples, N(0, 1).
pub trait Gaussian {
    /// The next sample.
    fn next_gaussian(&mut self) -> f64;
}

/// Standard normal samples by the Box-Muller transform over a source of uniform 64-bit
/// words (two words give two samples).
#[derive(Clone, Debug)]
pub struct BoxMuller<F> {
    uniform: F,
    spare: Option<f64>,
}

impl<F: FnMut() -> u64> BoxMuller<F> {
    /// A sampler over `uniform`, which must return independent uniform 64-bit words (from
    /// a cryptographically secure generator, for real privacy).
    pub fn new(uniform: F) -> Self {
        BoxMuller { uniform, spare: None }
    }
}

impl<F: FnMut() -> u64> Gaussian for BoxMuller<F> {
    fn next_gaussian(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        const TWO_POW_M53: f64 = 1.0 / (1u64 << 53) as f64;
        // u1 in (0, 1], so its logarithm is finite; u2 in [0, 1).
        let u1 = (((self.uniform)() >> 11) + 1) as f64 * TWO_POW_M53;
        let u2 = ((self.uniform)() >> 11) as f64 * TWO_POW_M53;
        let r = (-2.0 * u1.ln()).sqrt();
        let (sin, cos) = (std::f64::consts::TAU * u2).sin_cos();
        self.spare = Some(r * sin);
        r * cos
    }
}

/// Adds N(0, sigma²) noise to every value. Refuses a `sigma` that is not finite and
/// positive.
pub fn add_gaussian_noise(values: &mut [f32], sigma: f64, rng: &mut dyn Gaussian) -> Result<(), PrivacyError> {
    positive("sigma", sigma)?;
    for v in values.iter_mut() {
        *v = (f64::from(*v) + sigma * rng.next_gaussian()) as f32;
    }
    Ok(())
}

/// A differentially private average of updates.
#[derive(Clone, Debug, PartialEq)]
pub struct DpAggregate {
    /// The noised mean update.
    pub mean: Vec<f32>,
    /// Each update's L2 norm before clipping (useful to tune the clipping norm).
    pub norms: Vec<f32>,
    /// How many updates were above the clipping norm.
    pub clipped: usize,
    /// The standard deviation of the noise added to each coordinate, z·C/n.
    pub noise_std: f64,
}

fn check_updates(updates: &[&[f32]]) -> Result<usize, PrivacyError> {
    let first = updates.first().ok_or(PrivacyError::NoUpdates)?;
    for (k, u) in updates.iter().enumerate() {
        if u.len() != first.len() {
            return Err(PrivacyError::Shape { update: k, expected: first.len(), got: u.len() });
        }
        check_finite(u).map_err(|_| PrivacyError::NonFinite {
            update: k,
            index: u.iter().position(|v| !v.is_finite()).unwrap_or(0),
        })?;
    }
    Ok(first.len())
}

/// Server-side DP-FedAvg with fixed clipping: clips each update to L2 norm `clip_norm`,
/// averages them (unweighted) and adds N(0, (noise_multiplier · clip_norm / n)²) to each
/// coordinate, `n` being the number of updates.
///
/// Refuses an empty list, mixed lengths, non-finite values (naming the update; nothing is
/// aggregated), and a norm or multiplier that is not finite and positive.
pub fn dp_fedavg_server_side(
    updates: &[&[f32]],
    clip_norm: f32,
    noise_multiplier: f64,
    rng: &mut dyn Gaussian,
) -> Result<DpAggregate, PrivacyError> {
    positive("the clipping norm", f64::from(clip_norm))?;
    positive("the noise multiplier", noise_multiplier)?;
    let len = check_updates(updates)?;
    let mut sum = vec![0f64; len];
    let mut norms = Vec::with_capacity(updates.len());
    let mut clipped = 0;
    let mut buf = vec![0f32; len];
    for u in updates {
        buf.copy_from_slice(u);
        let norm = clip_l2(&mut buf, clip_norm)?;
        if f64::from(norm) > f64::from(clip_norm) {
            clipped += 1;
        }
        norms.push(norm);
        for (s, &v) in sum.iter_mut().zip(&buf) {
            *s += f64::from(v);
        }
    }
    finish_mean(sum, norms, clipped, clip_norm, noise_multiplier, rng)
}

/// Client-side DP-FedAvg with fixed clipping, the server's part: checks that every update
/// was clipped to `clip_norm` (with [`clip_l2`], tolerance 10⁻⁵ relative), averages them
/// and adds N(0, (noise_multiplier · clip_norm / n)²) to each coordinate.
///
/// Refuses an update above the norm ([`PrivacyError::NotClipped`]), and otherwise as
/// [`dp_fedavg_server_side`].
pub fn dp_fedavg_client_side(
    clipped_updates: &[&[f32]],
    clip_norm: f32,
    noise_multiplier: f64,
    rng: &mut dyn Gaussian,
) -> Result<DpAggregate, PrivacyError> {
    positive("the clipping norm", f64::from(clip_norm))?;
    positive("the noise multiplier", noise_multiplier)?;
    let len = check_updates(clipped_updates)?;
    let mut sum = vec![0f64; len];
    let mut norms = Vec::with_capacity(clipped_updates.len());
    for (k, u) in clipped_updates.iter().enumerate() {
        let norm = l2_norm(u);
        if norm > f64::from(clip_norm) * (1.0 + 1e-5) {
            return Err(PrivacyError::NotClipped { update: k, norm, clip: clip_norm });
        }
        norms.push(norm as f32);
        for (s, &v) in sum.iter_mut().zip(u.iter()) {
            *s += f64::from(v);
        }
    }
    finish_mean(sum, norms, 0, clip_norm, noise_multiplier, rng)
}

fn finish_mean(
    sum: Vec<f64>,
    norms: Vec<f32>,
    clipped: usize,
    clip_norm: f32,
    noise_multiplier: f64,
    rng: &mut dyn Gaussian,
) -> Result<DpAggregate, PrivacyError> {
    let n = norms.len() as f64;
    let mut mean: Vec<f32> = sum.iter().map(|&s| (s / n) as f32).collect();
    let noise_std = noise_multiplier * f64::from(clip_norm) / n;
    add_gaussian_noise(&mut mean, noise_std, rng)?;
    Ok(DpAggregate { mean, norms, clipped, noise_std })
}

/// Noises a mean of `n` client-clipped updates that the server did not see one by one
/// (for example the sum from secure aggregation, divided by `n`): adds
/// N(0, (noise_multiplier · clip_norm / n)²) to each coordinate and returns that standard
/// deviation. Refuses non-finite values, `n` = 0 and non-positive parameters.
pub fn noise_mean(
    mean: &mut [f32],
    n: usize,
    clip_norm: f32,
    noise_multiplier: f64,
    rng: &mut dyn Gaussian,
) -> Result<f64, PrivacyError> {
    positive("the clipping norm", f64::from(clip_norm))?;
    positive("the noise multiplier", noise_multiplier)?;
    if n == 0 {
        return Err(PrivacyError::NoUpdates);
    }
    check_finite(mean)?;
    let std = noise_multiplier * f64::from(clip_norm) / n as f64;
    add_gaussian_noise(mean, std, rng)?;
    Ok(std)
}

/// The Rényi orders the accountant tracks by default, as in TF-privacy's
/// `compute_dp_sgd_privacy`: 1.25 to 4.5, the integers 5 to 63, then 128, 256 and 512.
pub const DEFAULT_ORDERS: [f64; 72] = {
    let mut o = [0f64; 72];
    let head = [1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5];
    let mut i = 0;
    while i < 10 {
        o[i] = head[i];
        i += 1;
    }
    while i < 69 {
        o[i] = (i - 5) as f64;
        i += 1;
    }
    o[69] = 128.0;
    o[70] = 256.0;
    o[71] = 512.0;
    o
};

/// The largest order the accountant accepts (integer orders cost O(order) each).
pub const MAX_ORDER: f64 = 10_000.0;

/// A Rényi differential privacy accountant for the (sampled) Gaussian mechanism: the RDP
/// of every step, summed per order, and its conversion to (ε, δ).
#[derive(Clone, Debug, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        RdpAccountant::new()
    }
}

impl RdpAccountant {
    /// An accountant over [`DEFAULT_ORDERS`], with nothing spent.
    pub fn new() -> Self {
        RdpAccountant { orders: DEFAULT_ORDERS.to_vec(), rdp: vec![0.0; DEFAULT_ORDERS.len()] }
    }

    /// An accountant over the given orders (each above 1 and at most [`MAX_ORDER`]).
    pub fn with_orders(orders: Vec<f64>) -> Result<Self, PrivacyError> {
        if orders.is_empty() {
            return Err(PrivacyError::Parameter("no Rényi orders".into()));
        }
        if let Some(a) = orders.iter().find(|&&a| !(a > 1.0 && a <= MAX_ORDER)) {
            return Err(PrivacyError::Parameter(format!("Rényi order {a} must be in (1, {MAX_ORDER}]")));
        }
        let rdp = vec![0.0; orders.len()];
        Ok(RdpAccountant { orders, rdp })
    }

    /// The orders tracked.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// The RDP spent so far, per order.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// Accounts for `steps` applications of the Gaussian mechanism with noise multiplier
    /// `noise_multiplier` (noise std / sensitivity), each on a Poisson sample of rate
    /// `sample_rate` (1 for the whole population). Nothing changes when it fails.
    pub fn step(&mut self, noise_multiplier: f64, sample_rate: f64, steps: u64) -> Result<(), PrivacyError> {
        positive("the noise multiplier", noise_multiplier)?;
        if !(0.0..=1.0).contains(&sample_rate) {
            return Err(PrivacyError::Parameter(format!("sample rate {sample_rate} must be in [0, 1]")));
        }
        let per_step: Vec<f64> = self
            .orders
            .iter()
            .map(|&a| rdp_sampled_gaussian(sample_rate, noise_multiplier, a))
            .collect::<Result<_, _>>()?;
        for (r, s) in self.rdp.iter_mut().zip(per_step) {
            *r += s * steps as f64;
        }
        Ok(())
    }

    /// The ε spent for `delta` in (0, 1), and the order that gives it, with the conversion
    /// of Balle et al. 2020 (as Opacus ≥ 1.0 and `dp_accounting`).
    pub fn epsilon(&self, delta: f64) -> Result<(f64, f64), PrivacyError> {
        check_delta(delta)?;
        self.best(|a, r| {
            if delta * delta + (-r).exp_m1() > 0.0 {
                // Bounded through the KL divergence: delta <= sqrt(1 - exp(-KL)).
                0.0
            } else if a > 1.01 {
                r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
            } else {
                f64::INFINITY
            }
        })
    }

    /// The ε spent for `delta` in (0, 1), and the order that gives it, with Mironov's
    /// classic conversion `ε = rdp + ln(1/δ)/(α - 1)`.
    pub fn epsilon_classic(&self, delta: f64) -> Result<(f64, f64), PrivacyError> {
        check_delta(delta)?;
        self.best(|a, r| r - delta.ln() / (a - 1.0))
    }

    fn best(&self, eps: impl Fn(f64, f64) -> f64) -> Result<(f64, f64), PrivacyError> {
        let mut best = (f64::INFINITY, self.orders[0]);
        for (&a, &r) in self.orders.iter().zip(&self.rdp) {
            let e = eps(a, r);
            if e < best.0 {
                best = (e, a);
            }
        }
        Ok((best.0.max(0.0), best.1))
    }
}

fn check_delta(delta: f64) -> Result<(), PrivacyError> {
    if delta > 0.0 && delta < 1.0 {
        Ok(())
    } else {
        Err(PrivacyError::Parameter(format!("delta {delta} must be in (0, 1)")))
    }
}

/// The RDP at `order` of one step of the sampled Gaussian mechanism: noise multiplier
/// `noise_multiplier`, sampling rate `sample_rate`. With rate 1 it is the Gaussian
/// mechanism's `order / (2 z²)`; with rate 0 it is 0.
pub fn rdp_sampled_gaussian(sample_rate: f64, noise_multiplier: f64, order: f64) -> Result<f64, PrivacyError> {
    positive("the noise multiplier", noise_multiplier)?;
    if !(0.0..=1.0).contains(&sample_rate) {
        return Err(PrivacyError::Parameter(format!("sample rate {sample_rate} must be in [0, 1]")));
    }
    if !(order > 1.0 && order <= MAX_ORDER) {
        return Err(PrivacyError::Parameter(format!("Rényi order {order} must be in (1, {MAX_ORDER}]")));
    }
    let (q, sigma) = (sample_rate, noise_multiplier);
    if q == 0.0 {
        return Ok(0.0);
    }
    if q == 1.0 {
        return Ok(order / (2.0 * sigma * sigma));
    }
    let log_a = if order.fract() == 0.0 { log_a_int(q, sigma, order as u32) } else { log_a_frac(q, sigma, order)? };
    Ok(log_a / (order - 1.0))
}

/// `ln(e^x + e^y)`.
fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// `ln(e^x - e^y)`, for `x >= y`.
fn log_sub(x: f64, y: f64) -> Result<f64, PrivacyError> {
    if x < y {
        return Err(PrivacyError::Numerical("a negative intermediate sum".into()));
    }
    if y == f64::NEG_INFINITY {
        return Ok(x);
    }
    if x == y {
        return Ok(f64::NEG_INFINITY);
    }
    let d = (x - y).exp_m1();
    Ok(if d.is_finite() { d.ln() + y } else { x })
}

/// `ln A_α` for integer α: `ln sum_i C(α, i) q^i (1-q)^(α-i) exp((i² - i) / (2σ²))`.
fn log_a_int(q: f64, sigma: f64, alpha: u32) -> f64 {
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    let mut log_a = f64::NEG_INFINITY;
    let mut log_binom = 0.0;
    for i in 0..=alpha {
        let fi = f64::from(i);
        let s = log_binom + fi * lq + f64::from(alpha - i) * l1q + (fi * fi - fi) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, s);
        log_binom += f64::from(alpha - i).ln() - (fi + 1.0).ln();
    }
    log_a
}

/// `ln A_α` for fractional α (Mironov, Talwar and Zhang 2019, section 3.3), as TF-privacy.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> Result<f64, PrivacyError> {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let s2 = std::f64::consts::SQRT_2 * sigma;
    // |C(α, i)| in log space and its sign, updated as i grows.
    let (mut log_coef, mut positive_coef) = (0.0f64, true);
    for i in 0..1_000_000u32 {
        let fi = f64::from(i);
        let j = alpha - fi;
        let log_t0 = log_coef + fi * lq + j * l1q;
        let log_t1 = log_coef + j * lq + fi * l1q;
        let log_e0 = 0.5f64.ln() + log_erfc((fi - z0) / s2);
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / s2);
        let log_s0 = log_t0 + (fi * fi - fi) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        if positive_coef {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0)?;
            log_a1 = log_sub(log_a1, log_s1)?;
        }
        if log_s0.max(log_s1) < -30.0 {
            return Ok(log_add(log_a0, log_a1));
        }
        // C(α, i+1) = C(α, i) (α - i) / (i + 1).
        let factor = alpha - fi;
        if factor == 0.0 {
            break;
        }
        log_coef += factor.abs().ln() - (fi + 1.0).ln();
        if factor < 0.0 {
            positive_coef = !positive_coef;
        }
    }
    Err(PrivacyError::Numerical(format!("the series for order {alpha} does not converge")))
}

/// `ln erfc(x)`, accurate in the far right tail where erfc underflows.
///
/// The rational approximations are those of FreeBSD's `s_erf.c` (Copyright (C) 1993 Sun
/// Microsystems, Inc.: "Permission to use, copy, modify, and distribute this software is
/// freely granted, provided that this notice is preserved."), evaluated in log space; for
/// x >= 28, the asymptotic series.
fn log_erfc(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x < 1.25 {
        return erfc_small(x).ln();
    }
    if x >= 28.0 {
        let (x2, ix2) = (x * x, 1.0 / (x * x));
        return -std::f64::consts::PI.ln() / 2.0 - x.ln() - x2
            + ix2 * (-0.5 + ix2 * (0.625 + ix2 * (-37.0 / 24.0 + ix2 * 353.0 / 64.0)));
    }
    let (r, s) = erfc_tail_rs(x);
    let z = f64::from_bits(x.to_bits() & 0xffff_ffff_0000_0000);
    -z * z - 0.5625 + (z - x) * (z + x) + r / s - x.ln()
}

/// The coefficients of FreeBSD's `s_erf.c`, digits as published.
#[allow(clippy::excessive_precision)]
mod sun {
    pub(super) const ERX: f64 = 8.45062911510467529297e-01;
    pub(super) const PP: [f64; 5] = [
        1.28379167095512558561e-01,
        -3.25042107247001499370e-01,
        -2.84817495755985104766e-02,
        -5.77027029648944159157e-03,
        -2.37630166566501626084e-05,
    ];
    pub(super) const QQ: [f64; 5] = [
        3.97917223959155352819e-01,
        6.50222499887672944485e-02,
        5.08130628187576562776e-03,
        1.32494738004321644526e-04,
        -3.96022827877536812320e-06,
    ];
    pub(super) const PA: [f64; 7] = [
        -2.36211856075265944077e-03,
        4.14856118683748331666e-01,
        -3.72207876035701323847e-01,
        3.18346619901161753674e-01,
        -1.10894694282396677476e-01,
        3.54783043256182359371e-02,
        -2.16637559486879084300e-03,
    ];
    pub(super) const QA: [f64; 6] = [
        1.06420880400844228286e-01,
        5.40397917702171048937e-01,
        7.18286544141962662868e-02,
        1.26171219808761642112e-01,
        1.36370839120290507362e-02,
        1.19844998467991074170e-02,
    ];
    pub(super) const RA: [f64; 8] = [
        -9.86494403484714822705e-03,
        -6.93858572707181764372e-01,
        -1.05586262253232909814e+01,
        -6.23753324503260060396e+01,
        -1.62396669462573470355e+02,
        -1.84605092906711035994e+02,
        -8.12874355063065934246e+01,
        -9.81432934416914548592e+00,
    ];
    pub(super) const SA: [f64; 8] = [
        1.96512716674392571292e+01,
        1.37657754143519042600e+02,
        4.34565877475229228821e+02,
        6.45387271733267880336e+02,
        4.29008140027567833386e+02,
        1.08635005541779435134e+02,
        6.57024977031928170135e+00,
        -6.04244152148580987438e-02,
    ];
    pub(super) const RB: [f64; 7] = [
        -9.86494292470009928597e-03,
        -7.99283237680523006574e-01,
        -1.77579549177547519889e+01,
        -1.60636384855821916062e+02,
        -6.37566443368389627722e+02,
        -1.02509513161107724954e+03,
        -4.83519191608651397019e+02,
    ];
    pub(super) const SB: [f64; 7] = [
        3.03380607434824582924e+01,
        3.25792512996573918826e+02,
        1.53672958608443695994e+03,
        3.19985821950859553908e+03,
        2.55305040643316442583e+03,
        4.74528541206955367215e+02,
        -2.24409524465858183362e+01,
    ];
}

use sun::*;

/// `c[0] + x c[1] + x² c[2] + …`.
fn poly(c: &[f64], x: f64) -> f64 {
    c.iter().rev().fold(0.0, |acc, &k| acc * x + k)
}

/// `(R, S)` of the tail approximation `erfc(x) = exp(-x² - 0.5625 + R/S) / x`, x >= 1.25.
fn erfc_tail_rs(x: f64) -> (f64, f64) {
    let s = 1.0 / (x * x);
    if x < 1.0 / 0.35 { (poly(&RA, s), 1.0 + s * poly(&SA, s)) } else { (poly(&RB, s), 1.0 + s * poly(&SB, s)) }
}

/// `erfc(x)` for x < 1.25 (no underflow there).
fn erfc_small(x: f64) -> f64 {
    let ax = x.abs();
    if ax < 0.84375 {
        let z = x * x;
        let y = poly(&PP, z) / (1.0 + z * poly(&QQ, z));
        if x < 0.25 {
            return 1.0 - (x + x * y);
        }
        return 0.5 - (x - 0.5 + x * y);
    }
    if ax < 1.25 {
        let s = ax - 1.0;
        let p = poly(&PA, s);
        let q = 1.0 + s * poly(&QA, s);
        return if x > 0.0 { 1.0 - ERX - p / q } else { 1.0 + ERX + p / q };
    }
    // x <= -1.25.
    if ax >= 6.0 {
        return 2.0;
    }
    let (r, s) = erfc_tail_rs(ax);
    let z = f64::from_bits(ax.to_bits() & 0xffff_ffff_0000_0000);
    2.0 - (-z * z - 0.5625).exp() * ((z - ax) * (z + ax) + r / s).exp() / ax
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_a_model_update_keeps_the_base_and_bounds_the_difference() {
        use crate::tensor::{Tensor, Tensors};
        let t = |v: Vec<f32>| Tensor { shape: vec![v.len()], data: v };
        let base = Tensors([("a".to_string(), t(vec![1.0, 1.0])), ("b".to_string(), t(vec![0.0]))].into());
        let mut up = Tensors([("a".to_string(), t(vec![4.0, 1.0])), ("b".to_string(), t(vec![4.0]))].into());
        let norm = clip_model_update(&base, &mut up, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let d = [up.0["a"].data[0] - 1.0, up.0["a"].data[1] - 1.0, up.0["b"].data[0]];
        let n = d.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(n <= 1.0 && n > 0.999, "{n}");
        assert!((d[0] / d[2] - 0.75).abs() < 1e-5, "direction kept");
        let mut small = base.clone();
        small.0.get_mut("b").unwrap().data[0] = 0.5;
        assert!((clip_model_update(&base, &mut small, 1.0).unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(small.0["b"].data[0], 0.5, "below the norm: unchanged");
        let mut other = Tensors([("a".to_string(), t(vec![1.0]))].into());
        assert!(clip_model_update(&base, &mut other, 1.0).is_err());
        let mut nan = base.clone();
        nan.0.get_mut("a").unwrap().data[0] = f32::NAN;
        assert!(clip_model_update(&base, &mut nan, 1.0).is_err());
        assert!(clip_model_update(&base, &mut base.clone(), 0.0).is_err());
        let mut far = Tensors([("a".to_string(), t(vec![4.0, 1.0])), ("b".to_string(), t(vec![4.0]))].into());
        assert_eq!(model_update_norm(&base, &far).unwrap(), 5.0);
        clip_model_update(&base, &mut far, 1.0).unwrap();
        assert!((model_update_norm(&base, &far).unwrap() - 1.0).abs() < 1e-6);
        assert!(model_update_norm(&base, &other).is_err());
    }

    #[test]
    #[allow(clippy::excessive_precision)] // the reference digits as computed
    fn log_erfc_matches_high_precision_values() {
        // ln erfc(x) from mpmath at 30 digits.
        let cases = [
            (-3.0, 0.69313613525044681032),
            (-0.5, 0.41903914777555958036),
            (0.0, 0.0),
            (0.3, -0.3984300514400852726),
            (0.84375, -1.4576857978617409643),
            (1.0, -1.8496055099332482486),
            (1.25, -2.5626536619221257245),
            (2.0, -5.3649412646166375745),
            (3.0, -10.720363041981112568),
            (5.0, -27.200889545537434422),
            (10.0, -102.87988902484488857),
            (27.0, -732.86888650789741098),
            (30.0, -903.97411711064387808),
            (100.0, -10005.177585122664333),
        ];
        for (x, want) in cases {
            let got = log_erfc(x);
            assert!((got - want).abs() <= 1e-13 * want.abs().max(1.0), "ln erfc({x}) = {got}, want {want}");
        }
        assert!(log_erfc(f64::NAN).is_nan());
    }

    #[test]
    fn log_space_helpers() {
        assert!((log_add(1f64.ln(), 2f64.ln()) - 3f64.ln()).abs() < 1e-15);
        assert_eq!(log_add(f64::NEG_INFINITY, 0.5), 0.5);
        assert!((log_sub(3f64.ln(), 2f64.ln()).unwrap()).abs() < 1e-15);
        assert_eq!(log_sub(1.0, 1.0).unwrap(), f64::NEG_INFINITY);
        assert!(log_sub(0.0, 1.0).is_err());
    }

    #[test]
    fn default_orders() {
        assert_eq!(&DEFAULT_ORDERS[..11], &[1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]);
        assert_eq!(&DEFAULT_ORDERS[67..], &[62.0, 63.0, 128.0, 256.0, 512.0]);
    }
}
