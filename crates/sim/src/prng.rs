//! A tiny deterministic pseudo-random generator (SplitMix64) and the helpers the
//! generators use on top of it.
//!
//! We deliberately avoid the `rand` crate: its algorithms and value streams may
//! change between versions, and the generated store must be byte-identical on
//! every run and every platform. SplitMix64 only uses wrapping integer
//! arithmetic, so its output is fully specified.

/// SplitMix64 (Steele, Lea, Flood 2014), as used to seed xoshiro generators.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// One SplitMix64 output step applied to a single value: a good 64-bit mixer.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    /// A generator whose stream is fully determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// An independent generator for a named sub-stream of `seed`, so that adding
    /// draws to one part of the generator does not shift every other part.
    pub fn derive(seed: u64, stream: &str, index: u64) -> Self {
        // FNV-1a over the stream name keeps the derivation independent of
        // `std::hash`, whose output is not guaranteed stable across releases.
        let mut h: u64 = 0xCBF2_9CE4_8422_2325;
        for b in stream.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01B3);
        }
        Self::new(mix64(
            seed ^ mix64(h ^ mix64(index.wrapping_add(GOLDEN_GAMMA))),
        ))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix64(self.state)
    }

    /// Uniform-enough value in `0..n` (Lemire's multiply-high; the tiny bias
    /// is irrelevant for test data). Returns 0 when `n == 0`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Value in the inclusive range `lo..=hi` (`lo` when `hi < lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below(hi - lo + 1)
    }

    /// Index in `0..len` (usize convenience for slices).
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// True with probability `percent`/100 (integer maths only, so no
    /// floating-point rounding can differ between platforms).
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A uniformly chosen element. Panics on an empty slice, which would be a
    /// bug in the static word lists, never a runtime condition.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        assert!(!items.is_empty(), "pick from an empty list");
        &items[self.index(items.len())]
    }

    /// `count` distinct indices from `0..len`, in draw order (partial
    /// Fisher-Yates over a virtual identity permutation).
    pub fn distinct_indices(&mut self, len: usize, count: usize) -> Vec<usize> {
        let count = count.min(len);
        let mut swapped: std::collections::BTreeMap<usize, usize> = Default::default();
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let j = i + self.index(len - i);
            let at_j = *swapped.get(&j).unwrap_or(&j);
            let at_i = *swapped.get(&i).unwrap_or(&i);
            swapped.insert(j, at_i);
            out.push(at_j);
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // Reference outputs of SplitMix64 seeded with 1234567 (from the
        // original C implementation), pinning the stream across platforms.
        let mut r = SplitMix64::new(1_234_567);
        assert_eq!(r.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(r.next_u64(), 3_203_168_211_198_807_973);
        assert_eq!(r.next_u64(), 9_817_491_932_198_370_423);
    }

    #[test]
    fn distinct_indices_are_distinct() {
        let mut r = SplitMix64::new(7);
        let v = r.distinct_indices(50, 50);
        let mut s = v.clone();
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), 50);
        assert!(v.iter().all(|&i| i < 50));
    }

    #[test]
    fn range_bounds() {
        let mut r = SplitMix64::new(9);
        for _ in 0..1000 {
            let x = r.range(3, 5);
            assert!((3..=5).contains(&x));
        }
        assert_eq!(r.range(4, 4), 4);
    }
}
