//! Per-till counters and latency histograms, and the one-line report printed
//! for each till.

use std::fmt;
use std::time::Duration;

/// A fixed-size log-linear latency histogram: 8 sub-buckets per power of two
/// of microseconds (12.5% resolution), so memory stays constant however long
/// the tills run.
#[derive(Debug, Clone)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

const SUB_BITS: u32 = 3;
const SUBS: u64 = 1 << SUB_BITS;
const BUCKETS: usize = ((64 - SUB_BITS as usize + 1) * SUBS as usize) + SUBS as usize;

fn bucket(us: u64) -> usize {
    if us < SUBS {
        return us as usize;
    }
    let top = 63 - u64::from(us.leading_zeros()); // >= SUB_BITS
    let sub = (us >> (top - u64::from(SUB_BITS))) & (SUBS - 1);
    ((top - u64::from(SUB_BITS) + 1) * SUBS + sub) as usize
}

/// The largest value that falls in bucket `i`.
fn bucket_max(i: usize) -> u64 {
    let i = i as u64;
    if i < SUBS {
        return i;
    }
    let shift = i / SUBS - 1;
    let low = (SUBS + i % SUBS) << shift;
    low + ((1u64 << shift) - 1)
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

impl Histogram {
    pub(crate) fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.counts[bucket(us)] += 1;
        self.total += 1;
    }

    /// The `q` quantile (0 < q <= 1) in milliseconds, or None without samples.
    pub(crate) fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_max(i) as f64 / 1_000.0);
            }
        }
        None
    }
}

/// What one till has done so far.
#[derive(Debug, Default, Clone)]
pub(crate) struct TillStats {
    pub sales: u64,
    pub replays: u64,
    pub lookups: u64,
    pub not_found: u64,
    pub errors: u64,
    pub last_error: Option<String>,
    pub lookup_latency: Histogram,
    pub post_latency: Histogram,
}

/// A snapshot of one till's activity, as returned by [`crate::tills::run`].
#[derive(Debug, Clone, PartialEq)]
pub struct TillReport {
    /// `till-01`…
    pub till: String,
    /// Sales the box acknowledged (201 Created, or 200 for a replayed id).
    pub sales: u64,
    /// Of `sales`, those acknowledged with 200 (the box already had the id).
    pub replays: u64,
    /// Lookup requests answered (product, customer and promotion lookups).
    pub lookups: u64,
    /// Of `lookups`, product or customer lookups answered 404 (delisted
    /// product, unknown card) or inactive products, which are not errors.
    pub not_found: u64,
    /// Failed attempts: connection failures, timeouts, 5xx, unexpected
    /// statuses or bodies.
    pub errors: u64,
    pub last_error: Option<String>,
    pub lookup_p50_ms: Option<f64>,
    pub lookup_p99_ms: Option<f64>,
    pub post_p50_ms: Option<f64>,
    pub post_p99_ms: Option<f64>,
}

impl TillStats {
    pub(crate) fn report(&self, till: &str) -> TillReport {
        TillReport {
            till: till.to_owned(),
            sales: self.sales,
            replays: self.replays,
            lookups: self.lookups,
            not_found: self.not_found,
            errors: self.errors,
            last_error: self.last_error.clone(),
            lookup_p50_ms: self.lookup_latency.quantile_ms(0.50),
            lookup_p99_ms: self.lookup_latency.quantile_ms(0.99),
            post_p50_ms: self.post_latency.quantile_ms(0.50),
            post_p99_ms: self.post_latency.quantile_ms(0.99),
        }
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
}

impl fmt::Display for TillReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<8} sales {:>7} (replays {})  lookups {:>8} (not found {})  errors {:>5}  \
             lookup p50/p99 {}/{} ms  post p50/p99 {}/{} ms",
            self.till,
            self.sales,
            self.replays,
            self.lookups,
            self.not_found,
            self.errors,
            ms(self.lookup_p50_ms),
            ms(self.lookup_p99_ms),
            ms(self.post_p50_ms),
            ms(self.post_p99_ms),
        )?;
        if let Some(e) = self.last_error.as_deref().filter(|_| self.errors > 0) {
            write!(f, "  last error: {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_contain_their_values() {
        let mut last = 0;
        for us in (0..100_000u64).chain([1 << 40, u64::MAX]) {
            let b = bucket(us);
            assert!(b >= last, "bucket order at {us}");
            assert!(b < BUCKETS);
            assert!(us <= bucket_max(b), "{us} > max of bucket {b}");
            if b > 0 {
                assert!(us > bucket_max(b - 1), "{us} <= max of bucket {}", b - 1);
            }
            last = b;
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile_ms(0.5), None);
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile_ms(0.5).unwrap_or_default();
        let p99 = h.quantile_ms(0.99).unwrap_or_default();
        assert!((50.0..=57.0).contains(&p50), "p50 {p50}");
        assert!((99.0..=112.0).contains(&p99), "p99 {p99}");
    }
}
