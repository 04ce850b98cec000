//! The scaling argument in numbers: alpha-beta-gamma predictions (Thakur, Rabenseifner & Gropp
//! 2005) of all-reduce busbw for ring, central (parameter server) and tree over independent
//! links, from 2 ranks to thousands.

use std::fmt::Write as _;

/// A link: bandwidth, latency, and optionally the rate at which a rank reduces.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkModel {
    /// Link bandwidth, GB/s (beta = 1 / this).
    pub gbps: f64,
    /// Per-message latency, microseconds (alpha).
    pub latency_us: f64,
    /// Reduction rate, GB/s (gamma = 1 / this); `None` ignores the reduction.
    pub reduce_gbps: Option<f64>,
}

impl LinkModel {
    /// Seconds of an all-reduce of `bytes` per rank over `n` ranks: (ring, central, tree).
    ///
    /// ```
    /// use wccl::model::LinkModel;
    /// let l = LinkModel { gbps: 1.0, latency_us: 0.0, reduce_gbps: None };
    /// let (ring, central, tree) = l.all_reduce_seconds(4, 1e9);
    /// assert!((ring - 1.5).abs() < 1e-12);    // 2(n-1)/n S beta
    /// assert!((central - 6.0).abs() < 1e-12); // 2(n-1) S beta through the server's link
    /// assert!((tree - 4.0).abs() < 1e-12);    // 2 log2(n) S beta
    /// ```
    pub fn all_reduce_seconds(&self, n: usize, bytes: f64) -> (f64, f64, f64) {
        let nf = n as f64;
        let alpha = self.latency_us * 1e-6;
        let beta = 1.0 / (self.gbps * 1e9);
        let gamma = self.reduce_gbps.map_or(0.0, |g| 1.0 / (g * 1e9));
        let lg = nf.log2().ceil();
        let ring = 2.0 * (nf - 1.0) * alpha
            + 2.0 * (nf - 1.0) / nf * bytes * beta
            + (nf - 1.0) / nf * bytes * gamma;
        let central = 2.0 * alpha + 2.0 * (nf - 1.0) * bytes * beta + (nf - 1.0) * bytes * gamma;
        let tree = 2.0 * lg * (alpha + bytes * beta) + lg * bytes * gamma;
        (ring, central, tree)
    }
}

/// A table of predicted busbw (GB/s) per rank count for an all-reduce of `bytes` per rank.
pub fn scaling_table(ranks: &[usize], bytes: f64, link: &LinkModel) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# all_reduce of {bytes} B per rank over independent links: {} GB/s, {} us{}",
        link.gbps,
        link.latency_us,
        link.reduce_gbps
            .map_or(String::new(), |g| format!(", reduce {g} GB/s"))
    );
    let _ = writeln!(
        s,
        "#{:>7} {:>14} {:>14} {:>14}   (predicted busbw, GB/s)",
        "ranks", "ring", "central", "tree"
    );
    for &n in ranks.iter().filter(|&&n| n >= 2) {
        let (r, c, t) = link.all_reduce_seconds(n, bytes);
        let f = 2.0 * (n as f64 - 1.0) / n as f64;
        let bw = |sec: f64| bytes / sec / 1e9 * f;
        let _ = writeln!(
            s,
            " {:>7} {:>14.4} {:>14.4} {:>14.4}",
            n,
            bw(r),
            bw(c),
            bw(t)
        );
    }
    s
}
