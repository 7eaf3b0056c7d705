//! Distributions for the metrics: [`AtomicHistogram`], the lock-free fixed-bucket histogram
//! the hot path records into (one `fetch_add` on its bucket, one on its sum: no lock, no
//! allocation), and [`Distribution`], the owned picture of one histogram that a snapshot
//! carries and the metrics adapter renders, whichever recorder it came from (an
//! `AtomicHistogram`, or the ledger's HDR histograms through [`Distribution::from_hdr`]).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// The unit a distribution's integers count in; rendered in the base unit (seconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum Scale {
    Nanos,
    Micros,
    Millis,
    /// A plain count (a batch size): rendered as it is.
    #[default]
    One,
}

impl Scale {
    /// `value` in the base unit.
    pub fn base(self, value: u64) -> f64 {
        let v = value as f64;
        match self {
            Self::Nanos => v / 1e9,
            Self::Micros => v / 1e6,
            Self::Millis => v / 1e3,
            Self::One => v,
        }
    }
}

/// One histogram as observed: per bucket (upper bound inclusive, in `scale`) how many
/// observations fell in it and not in an earlier one; what fell past the last bound is in
/// `count` only (the `+Inf` bucket).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Distribution {
    pub scale: Scale,
    pub buckets: Vec<(u64, u64)>,
    pub count: u64,
    /// The sum of the observations, in `scale`.
    pub sum: u64,
}

impl Distribution {
    /// The distribution of what `histogram` recorded, in the buckets `bounds` (ascending, in
    /// the histogram's unit, which is `scale`). An HDR histogram keeps values to its
    /// significant digits: each counts in the bucket of the lowest value it stands for (a
    /// value recorded exactly on a bound stays in that bound's bucket), the sum takes the
    /// middle of each range.
    pub fn from_hdr(
        histogram: &hdrhistogram::Histogram<u64>,
        bounds: &[u64],
        scale: Scale,
    ) -> Self {
        let mut buckets: Vec<(u64, u64)> = bounds.iter().map(|b| (*b, 0)).collect();
        let mut sum = 0u64;
        let mut count = 0u64;
        for step in histogram.iter_recorded() {
            let value = step.value_iterated_to();
            let n = step.count_at_value();
            count += n;
            sum = sum.saturating_add(histogram.median_equivalent(value).saturating_mul(n));
            let lowest = histogram.lowest_equivalent(value);
            let i = bounds.partition_point(|b| *b < lowest);
            if let Some(bucket) = buckets.get_mut(i) {
                bucket.1 += n;
            }
        }
        Self {
            scale,
            buckets,
            count,
            sum,
        }
    }
}

/// A histogram with fixed buckets, recorded from any thread without a lock.
#[derive(Debug)]
pub struct AtomicHistogram {
    /// Upper bounds (inclusive), ascending, in `scale`.
    bounds: &'static [u64],
    scale: Scale,
    /// One per bound, then the overflow (`+Inf`).
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl AtomicHistogram {
    /// An empty histogram over `bounds` (ascending, in `scale`).
    pub fn new(bounds: &'static [u64], scale: Scale) -> Self {
        debug_assert!(bounds.is_sorted());
        Self {
            bounds,
            scale,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// Records one observation of `value` (in its scale).
    pub fn observe(&self, value: u64) {
        let i = self.bounds.partition_point(|b| *b < value);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// What it recorded so far. Observations racing with it may show in a bucket and not
    /// yet in the sum; the count is always the buckets' total.
    pub fn distribution(&self) -> Distribution {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        Distribution {
            scale: self.scale,
            buckets: self
                .bounds
                .iter()
                .copied()
                .zip(counts.iter().copied())
                .collect(),
            count: counts.iter().sum(),
            sum: self.sum.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static BOUNDS: [u64; 3] = [10, 100, 1000];

    #[test]
    fn an_observation_counts_in_the_first_bucket_whose_bound_it_does_not_exceed() {
        let h = AtomicHistogram::new(&BOUNDS, Scale::Micros);
        for v in [0, 10, 11, 100, 5000] {
            h.observe(v);
        }
        let d = h.distribution();
        assert_eq!(d.buckets, vec![(10, 2), (100, 2), (1000, 0)]);
        assert_eq!(d.count, 5, "the overflow counts in the total only");
        assert_eq!(d.sum, 5121);
        assert_eq!(d.scale.base(d.sum), 0.005121);
    }

    #[test]
    fn an_hdr_histogram_reads_as_the_same_buckets() {
        let mut hdr = hdrhistogram::Histogram::<u64>::new(3).expect("valid precision");
        let atomic = AtomicHistogram::new(&BOUNDS, Scale::Micros);
        for v in [1, 10, 11, 100, 999, 5000] {
            hdr.record(v).expect("in range");
            atomic.observe(v);
        }
        let from_hdr = Distribution::from_hdr(&hdr, &BOUNDS, Scale::Micros);
        let direct = atomic.distribution();
        assert_eq!(from_hdr.buckets, direct.buckets);
        assert_eq!(from_hdr.count, direct.count);
        // HDR keeps 3 significant digits: the sum is within that.
        assert!(from_hdr.sum.abs_diff(direct.sum) <= direct.sum / 500);
    }
}
