//! Participant selection: who takes part in a round, decided from a seed.

/// Why a round could not pick its participants.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// Fewer nodes are available than the minimum.
    #[error("{available} node(s) available, but the session needs at least {min}")]
    TooFew {
        /// Nodes available.
        available: usize,
        /// The minimum.
        min: usize,
    },
    /// The ratio is outside (0, 1].
    #[error("participant ratio {0} must be in (0, 1]")]
    Ratio(String),
}

/// A small deterministic generator (SplitMix64); seeds come from outside.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A value in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// How many participants a round takes: `ceil(ratio * available)`, at least `min`, at most
/// `available`.
pub fn participant_count(available: usize, ratio: f64, min: usize) -> Result<usize, SelectError> {
    if !(ratio > 0.0 && ratio <= 1.0) {
        return Err(SelectError::Ratio(ratio.to_string()));
    }
    if available < min || available == 0 {
        return Err(SelectError::TooFew { available, min: min.max(1) });
    }
    let want = (ratio * available as f64).ceil() as usize;
    Ok(want.max(min).min(available))
}

/// Picks a round's participants from the available nodes, deterministically from `seed`.
/// The result is sorted.
pub fn select_participants(
    available: &[String],
    ratio: f64,
    min: usize,
    seed: u64,
) -> Result<Vec<String>, SelectError> {
    let mut pool: Vec<String> = available.to_vec();
    pool.sort();
    pool.dedup();
    let k = participant_count(pool.len(), ratio, min)?;
    let mut rng = SplitMix64::new(seed);
    for i in 0..k.min(pool.len()) {
        let j = i + rng.below(pool.len() - i);
        pool.swap(i, j);
    }
    pool.truncate(k);
    pool.sort();
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn counts() {
        assert_eq!(participant_count(10, 0.5, 2).unwrap(), 5);
        assert_eq!(participant_count(10, 0.01, 2).unwrap(), 2);
        assert_eq!(participant_count(4, 1.0, 2).unwrap(), 4);
        assert_eq!(participant_count(3, 0.34, 1).unwrap(), 2);
        assert!(matches!(participant_count(1, 1.0, 2), Err(SelectError::TooFew { .. })));
        assert!(matches!(participant_count(0, 1.0, 0), Err(SelectError::TooFew { .. })));
        assert!(participant_count(4, 0.0, 1).is_err());
        assert!(participant_count(4, 1.5, 1).is_err());
        assert!(participant_count(4, f64::NAN, 1).is_err());
    }

    #[test]
    fn duplicates_count_once() {
        let mut twice = nodes(4);
        twice.extend(nodes(4));
        assert_eq!(select_participants(&twice, 0.5, 1, 3).unwrap().len(), 2);
    }

    #[test]
    fn selection_is_seeded_and_varies() {
        let a = select_participants(&nodes(10), 0.3, 1, 42).unwrap();
        assert_eq!(a, select_participants(&nodes(10), 0.3, 1, 42).unwrap());
        assert_eq!(a.len(), 3);
        let picks: std::collections::BTreeSet<Vec<String>> =
            (0..20).map(|s| select_participants(&nodes(10), 0.3, 1, s).unwrap()).collect();
        assert!(picks.len() > 5, "different seeds pick different nodes");
    }
}
