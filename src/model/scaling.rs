//! The scaling argument in numbers: alpha-beta-gamma predictions (Thakur, Rabenseifner & Gropp
//! 2005) of all-reduce busbw for ring, central (parameter server or star), binomial tree and
//! recursive halving-doubling over independent links, from 2 ranks to thousands, with a cost
//! per message that a rank handles in turn (LogP's overhead `o`): what makes a star's root,
//! which handles 2(n-1) messages one after another, the bottleneck for small messages at scale.

use std::fmt::Write as _;

/// A link: bandwidth, latency, a per-message cost, and optionally the rate at which a rank
/// reduces.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkModel {
    /// Link bandwidth, GB/s (beta = 1 / this).
    pub gbps: f64,
    /// Per-message latency, microseconds (alpha): paid once per message in sequence, and
    /// overlapped when a rank sends to many at once.
    pub latency_us: f64,
    /// What a rank spends handling one message, microseconds (LogP's overhead: a system
    /// call, a header, a completion): paid for every message a rank sends or receives, one
    /// after another (two per ring step or halving-doubling exchange, one per tree step).
    pub message_us: f64,
    /// Reduction rate, GB/s (gamma = 1 / this); `None` ignores the reduction.
    pub reduce_gbps: Option<f64>,
}

/// Predicted seconds of one all-reduce with each algorithm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AllReduceTimes {
    /// Ring: 2(n-1) steps of 1/n of the buffer.
    pub ring: f64,
    /// Central (a star): every rank to one root and back; the root handles 2(n-1) messages
    /// and 2(n-1) buffers through its one link.
    pub central: f64,
    /// Binomial tree reduce, then broadcast: 2·ceil(log2 n) steps of the whole buffer.
    pub tree: f64,
    /// Recursive halving-doubling: 2·log2 p exchanges (p the largest power of two at most n)
    /// moving the ring's volume, plus a fold in and out for the n-p ranks beyond p.
    pub halving_doubling: f64,
}

impl LinkModel {
    /// Seconds of an all-reduce of `bytes` per rank over `n` ranks, with each algorithm.
    ///
    /// ```
    /// use wccl::model::LinkModel;
    /// let l = LinkModel { gbps: 1.0, latency_us: 0.0, message_us: 0.0, reduce_gbps: None };
    /// let t = l.all_reduce_seconds(4, 1e9);
    /// assert!((t.ring - 1.5).abs() < 1e-12);    // 2(n-1)/n S beta
    /// assert!((t.central - 6.0).abs() < 1e-12); // 2(n-1) S beta through the server's link
    /// assert!((t.tree - 4.0).abs() < 1e-12);    // 2 log2(n) S beta
    /// assert!((t.halving_doubling - 1.5).abs() < 1e-12); // the ring's volume
    /// ```
    pub fn all_reduce_seconds(&self, n: usize, bytes: f64) -> AllReduceTimes {
        let n = n.max(1);
        let nf = n as f64;
        let alpha = self.latency_us * 1e-6;
        let o = self.message_us * 1e-6;
        let beta = 1.0 / (self.gbps * 1e9);
        let gamma = self.reduce_gbps.map_or(0.0, |g| 1.0 / (g * 1e9));
        let lg = nf.log2().ceil();
        // A ring step and a halving-doubling exchange each send one message and receive one
        // (2o); a tree step is one or the other.
        let ring = 2.0 * (nf - 1.0) * (alpha + 2.0 * o)
            + 2.0 * (nf - 1.0) / nf * bytes * beta
            + (nf - 1.0) / nf * bytes * gamma;
        // One latency in, one out (the peers send at once), but the root handles every
        // message and every buffer in turn: n-1 in, then n-1 out, through one full-duplex
        // link (whose two directions a gather and then a scatter cannot use at once).
        let central =
            2.0 * alpha + 2.0 * (nf - 1.0) * (o + bytes * beta) + (nf - 1.0) * bytes * gamma;
        let tree = 2.0 * lg * (alpha + o + bytes * beta) + lg * bytes * gamma;
        let p = 1usize << n.ilog2();
        let pf = p as f64;
        let fold = if p < n {
            2.0 * (alpha + o + bytes * beta) + bytes * gamma
        } else {
            0.0
        };
        let halving_doubling = 2.0 * f64::from(p.ilog2()) * (alpha + 2.0 * o)
            + 2.0 * (pf - 1.0) / pf * bytes * beta
            + (pf - 1.0) / pf * bytes * gamma
            + fold;
        AllReduceTimes {
            ring,
            central,
            tree,
            halving_doubling,
        }
    }
}

/// A table of predicted busbw (GB/s) per rank count for an all-reduce of `bytes` per rank, and
/// how many times faster than the star the better of the two log-step algorithms (tree,
/// halving-doubling) is.
pub fn scaling_table(ranks: &[usize], bytes: f64, link: &LinkModel) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# all_reduce of {bytes} B per rank over independent links: {} GB/s, {} us latency, {} us per message{}",
        link.gbps,
        link.latency_us,
        link.message_us,
        link.reduce_gbps
            .map_or(String::new(), |g| format!(", reduce {g} GB/s"))
    );
    let _ = writeln!(
        s,
        "#{:>7} {:>12} {:>12} {:>12} {:>12} {:>12}   (predicted busbw, GB/s; log/star: how many times faster the better of tree and hd is than central)",
        "ranks", "ring", "central", "tree", "hd", "log/star"
    );
    for &n in ranks.iter().filter(|&&n| n >= 2) {
        let t = link.all_reduce_seconds(n, bytes);
        let f = 2.0 * (n as f64 - 1.0) / n as f64;
        let bw = |sec: f64| bytes / sec / 1e9 * f;
        let _ = writeln!(
            s,
            " {:>7} {:>12.4} {:>12.4} {:>12.4} {:>12.4} {:>12.2}",
            n,
            bw(t.ring),
            bw(t.central),
            bw(t.tree),
            bw(t.halving_doubling),
            t.central / t.tree.min(t.halving_doubling),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The issue's case: at 1024 ranks and 1 KiB on 25 Gb/s (3.125 GB/s) links with 5 us of
    /// latency, a log-step algorithm beats the star at least 5x, with or without a per-message
    /// cost (the star's root carries 2(n-1) buffers in turn). On 25 GB/s links those buffers
    /// cost little, and the star's root loses by its messages alone: only a per-message cost
    /// shows it (without one, the star would win there).
    #[test]
    fn log_step_algorithms_beat_the_star_at_1024_ranks() {
        for (gbps, message_us) in [(3.125, 0.0), (3.125, 1.0), (25.0, 1.0)] {
            {
                let l = LinkModel {
                    gbps,
                    latency_us: 5.0,
                    message_us,
                    reduce_gbps: None,
                };
                let t = l.all_reduce_seconds(1024, 1024.0);
                let best = t.tree.min(t.halving_doubling);
                assert!(t.central >= 5.0 * best, "{l:?}: {t:?}");
                // And the ring, with its 2(n-1) latencies, is no better than the star there.
                assert!(t.ring > 5.0 * best, "{l:?}: {t:?}");
            }
        }
        let free = LinkModel {
            gbps: 25.0,
            latency_us: 5.0,
            message_us: 0.0,
            reduce_gbps: None,
        };
        let t = free.all_reduce_seconds(1024, 1024.0);
        assert!(t.central < t.tree.min(t.halving_doubling), "{t:?}");
    }

    /// Rank counts that are not powers of two pay the fold; large buffers make the tree pay
    /// log2(n) copies of the buffer where ring and halving-doubling move 2(n-1)/n of it.
    #[test]
    fn halving_doubling_pays_the_fold_and_the_tree_pays_its_volume() {
        let l = LinkModel {
            gbps: 1.0,
            latency_us: 10.0,
            message_us: 0.0,
            reduce_gbps: None,
        };
        let (a, b) = (l.all_reduce_seconds(8, 1e3), l.all_reduce_seconds(9, 1e3));
        assert!(b.halving_doubling > a.halving_doubling + 2.0 * 10e-6);
        let big = l.all_reduce_seconds(64, 1e9);
        assert!(big.tree > 5.0 * big.halving_doubling, "{big:?}");
        assert!(
            (big.ring - big.halving_doubling).abs() < 0.01 * big.ring,
            "{big:?}"
        );
    }
}
