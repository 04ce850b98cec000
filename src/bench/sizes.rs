//! Sizes as nccl-tests takes them: `-b 8 -e 128M -f 2` (or `-i STEP`), with K/M/G suffixes.

/// Parses `"8"`, `"64K"`, `"128M"`, `"1G"` (powers of 1024; case-insensitive; an optional `B`).
///
/// ```
/// use wccl::bench::parse_size;
/// assert_eq!(parse_size("64K"), Ok(65536));
/// assert_eq!(parse_size("1g"), Ok(1 << 30));
/// assert!(parse_size("12Q").is_err());
/// ```
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let v: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 8, 64K, 128M, 1G)"))?;
    v.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// The sizes from `min` to `max`: multiplied by `factor` each time, or, when `step` is not 0,
/// increased by `step` (nccl-tests' `-f` and `-i`).
///
/// ```
/// use wccl::bench::size_steps;
/// assert_eq!(size_steps(8, 64, 2, 0), vec![8, 16, 32, 64]);
/// assert_eq!(size_steps(100, 300, 2, 100), vec![100, 200, 300]);
/// ```
pub fn size_steps(min: u64, max: u64, factor: u64, step: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut s = min;
    while s <= max {
        out.push(s);
        let next = if step > 0 {
            s + step
        } else {
            s.saturating_mul(factor.max(2))
        };
        if next <= s {
            break;
        }
        s = next;
    }
    out
}
