//! Shamir secret sharing: a secret split into `n` shares, any `t` of which recover it and
//! any `t - 1` of which say nothing about it.
//!
//! Each byte of the secret is the constant term of its own random polynomial of degree
//! `t - 1` over GF(2^16) (reduction polynomial x^16 + x^12 + x^3 + x + 1, primitive); share
//! `x` holds the polynomials' values at `x`, one 16-bit symbol per secret byte. Working in
//! GF(2^16) rather than GF(2^8) allows up to 65535 shares (indices `1..=65535`, index 0 is
//! the secret) at the price of shares twice the size of the secret. Secrecy is perfect: for
//! any `t - 1` shares and any candidate secret there is exactly one consistent polynomial.
//!
//! [`combine`] interpolates at 0 through all the shares it is given. A recovered symbol
//! above 255 cannot be a secret byte, so shares from different secrets, altered shares or
//! too few shares are usually refused as [`ShamirError::Inconsistent`]: a probabilistic
//! check against accidents, not an authentication (shares must travel authenticated).
//!
//! The field arithmetic uses log/exp tables (built once, 384 KiB), so it is not constant
//! time; that matters only against an attacker who can measure this process's cache.
//!
//! ```
//! use tessera_identity::shamir::{combine, split};
//!
//! let mut counter = 0u8;
//! let mut rng = |buf: &mut [u8]| buf.iter_mut().for_each(|b| { counter = counter.wrapping_add(97); *b = counter });
//! let shares = split(b"a 32-byte secret, or any length", 5, 3, &mut rng).unwrap();
//! assert_eq!(combine(&shares[1..4]).unwrap(), b"a 32-byte secret, or any length");
//! ```

use std::sync::OnceLock;

use zeroize::{Zeroize, Zeroizing};

/// Why splitting or combining failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShamirError {
    /// The threshold is 0 or above the number of shares.
    #[error("threshold {t} must be between 1 and the number of shares ({n})")]
    Threshold {
        /// Shares asked for.
        n: u16,
        /// Threshold asked for.
        t: u16,
    },
    /// The secret is empty.
    #[error("the secret is empty")]
    EmptySecret,
    /// No shares were given.
    #[error("no shares to combine")]
    NoShares,
    /// A share has index 0 (the secret's own position).
    #[error("share index 0 is invalid")]
    ZeroIndex,
    /// Two shares have the same index.
    #[error("share index {0} appears more than once")]
    DuplicateIndex(u16),
    /// Shares of different lengths.
    #[error("the shares have different lengths")]
    LengthMismatch,
    /// The interpolated value is not a byte string: too few shares, altered shares, or
    /// shares of different secrets.
    #[error("the shares are inconsistent: too few, altered, or of different secrets")]
    Inconsistent,
}

/// One share: the index it was evaluated at and one GF(2^16) symbol per secret byte.
///
/// Its value is wiped from memory when dropped; `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Share {
    /// The evaluation point, `1..=n`.
    pub index: u16,
    /// The share's symbols, as long as the secret.
    pub value: Vec<u16>,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Share {{ index: {}, len: {} }}", self.index, self.value.len())
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.value.zeroize();
    }
}

impl Share {
    /// The value as little-endian bytes (two per symbol).
    pub fn value_bytes(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.value.iter().flat_map(|s| s.to_le_bytes()).collect())
    }

    /// A share from its index and little-endian value bytes; `None` when the byte count is odd.
    pub fn from_value_bytes(index: u16, bytes: &[u8]) -> Option<Share> {
        if !bytes.len().is_multiple_of(2) {
            return None;
        }
        Some(Share { index, value: bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect() })
    }
}

/// x^16 + x^12 + x^3 + x + 1.
const POLY: u32 = 0x1100B;
const ORDER: usize = 65535;

struct Tables {
    /// `exp[i] = g^i`, doubled so that `exp[log a + log b]` needs no reduction.
    exp: Vec<u16>,
    /// `log[a]` for `a != 0`.
    log: Vec<u16>,
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut exp = vec![0u16; 2 * ORDER];
        let mut log = vec![0u16; ORDER + 1];
        let mut x: u32 = 1;
        for (i, e) in exp[..ORDER].iter_mut().enumerate() {
            *e = x as u16;
            log[x as usize] = i as u16;
            x <<= 1;
            if x & 0x1_0000 != 0 {
                x ^= POLY;
            }
        }
        exp.copy_within(..ORDER, ORDER);
        Tables { exp, log }
    })
}

fn mul(t: &Tables, a: u16, b: u16) -> u16 {
    if a == 0 || b == 0 { 0 } else { t.exp[usize::from(t.log[usize::from(a)]) + usize::from(t.log[usize::from(b)])] }
}

/// `1 / a` for `a != 0`.
fn inv(t: &Tables, a: u16) -> u16 {
    debug_assert_ne!(a, 0);
    t.exp[ORDER - usize::from(t.log[usize::from(a)])]
}

/// Splits `secret` into `n` shares (indices `1..=n`), any `t` of which recover it.
///
/// `rng` fills a buffer with random bytes (for the polynomials' coefficients); it must be a
/// cryptographically secure source, such as the operating system's.
pub fn split(secret: &[u8], n: u16, t: u16, rng: &mut dyn FnMut(&mut [u8])) -> Result<Vec<Share>, ShamirError> {
    if t == 0 || t > n {
        return Err(ShamirError::Threshold { n, t });
    }
    if secret.is_empty() {
        return Err(ShamirError::EmptySecret);
    }
    let tab = tables();
    let degree = usize::from(t) - 1;
    // coeffs[k * degree + d] is the coefficient of x^(d+1) in byte k's polynomial.
    let mut raw = Zeroizing::new(vec![0u8; secret.len() * degree * 2]);
    rng(&mut raw);
    let coeffs: Zeroizing<Vec<u16>> =
        Zeroizing::new(raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect());
    let mut shares = Vec::with_capacity(usize::from(n));
    for x in 1..=n {
        let mut value = Vec::with_capacity(secret.len());
        for (k, &s) in secret.iter().enumerate() {
            let mut acc = 0u16;
            for &c in coeffs[k * degree..(k + 1) * degree].iter().rev() {
                acc = mul(tab, acc, x) ^ c;
            }
            value.push(mul(tab, acc, x) ^ u16::from(s));
        }
        shares.push(Share { index: x, value });
    }
    Ok(shares)
}

/// Recovers the secret from shares (at least the threshold's worth, all of the same split).
///
/// Refuses an empty list, index 0, repeated indices and mixed lengths; see the module
/// documentation for [`ShamirError::Inconsistent`]. Fewer than `t` shares give either an
/// error or a wrong value, never the secret (except by chance, 2^-16 per byte).
pub fn combine(shares: &[Share]) -> Result<Vec<u8>, ShamirError> {
    let indices: Vec<u16> = shares.iter().map(|s| s.index).collect();
    let coeffs = lagrange_at_zero(&indices)?;
    let values: Vec<&[u16]> = shares.iter().map(|s| &s.value[..]).collect();
    interpolate(&coeffs, &values)
}

/// The Lagrange coefficients for evaluating at 0 the polynomial through points at `indices`
/// (refusing an empty list, index 0 and repeats).
pub(crate) fn lagrange_at_zero(indices: &[u16]) -> Result<Vec<u16>, ShamirError> {
    if indices.is_empty() {
        return Err(ShamirError::NoShares);
    }
    let mut seen = std::collections::BTreeSet::new();
    for &i in indices {
        if i == 0 {
            return Err(ShamirError::ZeroIndex);
        }
        if !seen.insert(i) {
            return Err(ShamirError::DuplicateIndex(i));
        }
    }
    let tab = tables();
    // l_j = prod_{m != j} x_m / (x_m - x_j); in characteristic 2, minus is xor.
    let all = indices.iter().fold(1u16, |acc, &x| mul(tab, acc, x));
    Ok(indices
        .iter()
        .map(|&xj| {
            let den = indices.iter().filter(|&&xm| xm != xj).fold(xj, |acc, &xm| mul(tab, acc, xm ^ xj));
            mul(tab, all, inv(tab, den))
        })
        .collect())
}

/// `sum_j coeffs[j] * values[j]`, symbol by symbol, checked to be bytes.
pub(crate) fn interpolate(coeffs: &[u16], values: &[&[u16]]) -> Result<Vec<u8>, ShamirError> {
    let len = values.first().map_or(0, |v| v.len());
    if values.iter().any(|v| v.len() != len) || coeffs.len() != values.len() {
        return Err(ShamirError::LengthMismatch);
    }
    let tab = tables();
    let mut out = Zeroizing::new(Vec::with_capacity(len));
    for k in 0..len {
        let s = coeffs.iter().zip(values).fold(0u16, |acc, (&c, v)| acc ^ mul(tab, c, v[k]));
        out.push(u8::try_from(s).map_err(|_| ShamirError::Inconsistent)?);
    }
    Ok(std::mem::take(&mut *out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_is_a_field() {
        let t = tables();
        // The generator's powers visit every non-zero element once: the polynomial is primitive.
        let mut seen = vec![false; ORDER + 1];
        for &e in &t.exp[..ORDER] {
            assert!(e != 0 && !seen[usize::from(e)]);
            seen[usize::from(e)] = true;
        }
        for a in [1u16, 2, 3, 255, 256, 4097, 65535] {
            assert_eq!(mul(t, a, inv(t, a)), 1);
            assert_eq!(mul(t, a, 1), a);
        }
        // Distributivity on a few values against a bitwise carry-less multiplication.
        let slow = |a: u16, b: u16| {
            let (mut r, mut a, mut b) = (0u32, u32::from(a), b);
            while b != 0 {
                if b & 1 != 0 {
                    r ^= a;
                }
                a <<= 1;
                if a & 0x1_0000 != 0 {
                    a ^= POLY;
                }
                b >>= 1;
            }
            r as u16
        };
        for (a, b) in [(3u16, 7u16), (0x8000, 2), (0xffff, 0xffff), (12345, 54321)] {
            assert_eq!(mul(t, a, b), slow(a, b));
        }
    }
}
