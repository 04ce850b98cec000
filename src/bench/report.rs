//! nccl-tests' bandwidth arithmetic and its table.

use std::fmt::Write as _;

use crate::types::{CollectiveKind, DType, ReduceOp};

/// nccl-tests' bus-bandwidth factor for `kind` on `n` ranks: what turns algbw into a figure
/// comparable with link speed whatever the rank count.
///
/// ```
/// use wccl::{CollectiveKind, bench::busbw_factor};
/// assert_eq!(busbw_factor(CollectiveKind::AllReduce, 4), 1.5);
/// assert_eq!(busbw_factor(CollectiveKind::AllGather, 4), 0.75);
/// assert_eq!(busbw_factor(CollectiveKind::Broadcast, 4), 1.0);
/// ```
pub fn busbw_factor(kind: CollectiveKind, n: usize) -> f64 {
    let n = n.max(1) as f64;
    match kind {
        CollectiveKind::AllReduce => 2.0 * (n - 1.0) / n,
        CollectiveKind::ReduceScatter | CollectiveKind::AllGather => (n - 1.0) / n,
        CollectiveKind::Broadcast | CollectiveKind::Reduce | CollectiveKind::Barrier => 1.0,
    }
}

/// One timed variant (out-of-place or in-place) of one size.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Measure {
    /// Mean time of one call, microseconds.
    pub time_us: f64,
    /// Size / time, GB/s.
    pub algbw: f64,
    /// algbw x the collective's factor, GB/s.
    pub busbw: f64,
    /// Elements that differed from the expected result (0 when not checked).
    pub wrong: u64,
}

impl Measure {
    /// A measure from bytes and seconds.
    pub fn new(bytes: u64, seconds: f64, factor: f64, wrong: u64) -> Measure {
        let algbw = if seconds > 0.0 {
            bytes as f64 / seconds / 1e9
        } else {
            0.0
        };
        Measure {
            time_us: seconds * 1e6,
            algbw,
            busbw: algbw * factor,
            wrong,
        }
    }
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Bytes (the whole array for reduce_scatter and all_gather).
    pub size: u64,
    /// Elements in `size`.
    pub count: u64,
    /// Element type.
    pub dtype: DType,
    /// Operator, if the collective reduces.
    pub op: Option<ReduceOp>,
    /// Root, or -1.
    pub root: i64,
    /// Algorithm name.
    pub algo: String,
    /// Out-of-place measure.
    pub out_of_place: Measure,
    /// In-place measure.
    pub in_place: Measure,
    /// The cost model's predicted time (us) and bounding resource, if known.
    pub predicted: Option<(f64, String)>,
    /// The floor (us), if known: every rank reads its buffer back once and uploads the result
    /// once, all ranks at once, at the probe's rates ([`CostModel::floor`]). Tensors mapped in
    /// place on a unified-memory device need neither, so a row there can beat it.
    ///
    /// [`CostModel::floor`]: crate::model::CostModel::floor
    pub floor: Option<f64>,
}

/// The column header, as nccl-tests prints it, with wccl's extra columns.
pub fn header() -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "#{:>61} | {:^33} | {:^33} |",
        "", "out-of-place", "in-place"
    );
    let _ = writeln!(
        s,
        "#{:>11} {:>12} {:>8} {:>6} {:>6} {:>12} | {:>9} {:>7} {:>7} {:>6} | {:>9} {:>7} {:>7} {:>6} | {:>9} {:>9}  bound by",
        "size",
        "count",
        "type",
        "redop",
        "root",
        "algo",
        "time",
        "algbw",
        "busbw",
        "#wrong",
        "time",
        "algbw",
        "busbw",
        "#wrong",
        "model",
        "floor",
    );
    let _ = write!(
        s,
        "#{:>11} {:>12} {:>8} {:>6} {:>6} {:>12} | {:>9} {:>7} {:>7} {:>6} | {:>9} {:>7} {:>7} {:>6} | {:>9} {:>9}",
        "(B)",
        "(elements)",
        "",
        "",
        "",
        "",
        "(us)",
        "(GB/s)",
        "(GB/s)",
        "",
        "(us)",
        "(GB/s)",
        "(GB/s)",
        "",
        "(us)",
        "(us)"
    );
    s
}

/// One row of the table.
pub fn format_row(r: &Row) -> String {
    let m = |m: &Measure| {
        format!(
            "{:>9.1} {:>7.3} {:>7.3} {:>6}",
            m.time_us, m.algbw, m.busbw, m.wrong
        )
    };
    let (model, bound) = match &r.predicted {
        Some((t, b)) => (format!("{t:>9.1}"), b.clone()),
        None => (format!("{:>9}", "-"), String::new()),
    };
    let floor = r
        .floor
        .map_or(format!("{:>9}", "-"), |f| format!("{f:>9.1}"));
    format!(
        " {:>11} {:>12} {:>8} {:>6} {:>6} {:>12} | {} | {} | {} {}  {}",
        r.size,
        r.count,
        r.dtype.to_string(),
        r.op.map_or("none".to_string(), |o| o.to_string()),
        r.root,
        r.algo,
        m(&r.out_of_place),
        m(&r.in_place),
        model,
        floor,
        bound
    )
    .trim_end()
    .to_string()
}

/// The closing lines: out-of-bounds count and average bus bandwidth.
pub fn footer(rows: &[Row]) -> String {
    let wrong: u64 = rows
        .iter()
        .map(|r| r.out_of_place.wrong + r.in_place.wrong)
        .sum();
    let n = (rows.len() * 2).max(1) as f64;
    let avg = rows
        .iter()
        .map(|r| r.out_of_place.busbw + r.in_place.busbw)
        .sum::<f64>()
        / n;
    format!(
        "# Out of bounds values : {wrong} {}\n# Avg bus bandwidth    : {avg:.6} ",
        if wrong == 0 { "OK" } else { "FAILED" }
    )
}

/// How far the model's predictions were from the measured out-of-place times, per algorithm
/// (the row's label: `auto:ring` apart from `ring`): the range of predicted/measured, and how
/// many rows came within ±30%. `None` where no row has a prediction.
///
/// ```
/// use wccl::bench::{Measure, Row, model_error};
/// use wccl::DType;
/// let row = |algo: &str, us: f64, model: f64| Row {
///     size: 4, count: 1, dtype: DType::F32, op: None, root: -1, algo: algo.into(),
///     out_of_place: Measure::new(4, us * 1e-6, 1.0, 0), in_place: Measure::default(),
///     predicted: Some((model, "steps".into())), floor: None,
/// };
/// let rows = [row("ring", 100.0, 90.0), row("ring", 100.0, 140.0), row("naive", 10.0, 5.0)];
/// assert_eq!(
///     model_error(&rows).unwrap(),
///     "# model/measured, out of place: ring 0.90-1.40, naive 0.50; within ±30%: 1 of 3 rows"
/// );
/// ```
pub fn model_error(rows: &[Row]) -> Option<String> {
    let mut algos: Vec<(&str, f64, f64)> = Vec::new();
    let (mut within, mut all) = (0usize, 0usize);
    for r in rows {
        let Some((model, _)) = &r.predicted else {
            continue;
        };
        let measured = r.out_of_place.time_us;
        // A time of 0 or NaN (a row not timed) has no ratio.
        if measured.is_nan() || measured <= 0.0 {
            continue;
        }
        let ratio = model / measured;
        all += 1;
        if (0.7..=1.3).contains(&ratio) {
            within += 1;
        }
        match algos.iter_mut().find(|a| a.0 == r.algo) {
            Some(a) => {
                a.1 = a.1.min(ratio);
                a.2 = a.2.max(ratio);
            }
            None => algos.push((&r.algo, ratio, ratio)),
        }
    }
    if all == 0 {
        return None;
    }
    let each: Vec<String> = algos
        .iter()
        .map(|(a, lo, hi)| {
            if format!("{lo:.2}") == format!("{hi:.2}") {
                format!("{a} {lo:.2}")
            } else {
                format!("{a} {lo:.2}-{hi:.2}")
            }
        })
        .collect();
    Some(format!(
        "# model/measured, out of place: {}; within ±30%: {within} of {all} rows",
        each.join(", ")
    ))
}

/// The CSV header.
pub const CSV_HEADER: &str = "size,count,type,redop,root,algo,oop_time_us,oop_algbw,oop_busbw,oop_wrong,ip_time_us,ip_algbw,ip_busbw,ip_wrong,model_us,bound,floor_us";

/// One CSV line.
pub fn csv_row(r: &Row) -> String {
    let (model, bound) = match &r.predicted {
        Some((t, b)) => (format!("{t:.3}"), b.clone()),
        None => (String::new(), String::new()),
    };
    let floor = r.floor.map_or(String::new(), |f| format!("{f:.3}"));
    format!(
        "{},{},{},{},{},{},{:.3},{:.6},{:.6},{},{:.3},{:.6},{:.6},{},{},{},{}",
        r.size,
        r.count,
        r.dtype,
        r.op.map_or("none".to_string(), |o| o.to_string()),
        r.root,
        r.algo,
        r.out_of_place.time_us,
        r.out_of_place.algbw,
        r.out_of_place.busbw,
        r.out_of_place.wrong,
        r.in_place.time_us,
        r.in_place.algbw,
        r.in_place.busbw,
        r.in_place.wrong,
        model,
        bound,
        floor
    )
}
