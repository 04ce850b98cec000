//! busbw against size, one line per algorithm, as an SVG (plotters).

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use super::report::Row;

/// Draws the out-of-place busbw of `rows` against size, one line per algorithm, into `path`.
pub fn plot_busbw(rows: &[Row], title: &str, path: &Path) -> Result<(), super::BenchError> {
    let mut lines: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.size > 0) {
        lines
            .entry(r.algo.as_str())
            .or_default()
            .push((r.size as f64, r.out_of_place.busbw));
    }
    let xs = || lines.values().flatten().map(|p| p.0);
    let (xmin, xmax) = (
        xs().fold(f64::INFINITY, f64::min).max(1.0),
        xs().fold(0.0, f64::max).max(2.0),
    );
    let ymax = lines
        .values()
        .flatten()
        .map(|p| p.1)
        .fold(0.0, f64::max)
        .max(1e-6)
        * 1.1;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((xmin..xmax * 1.2).log_scale(), 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_desc("size (bytes)")
        .y_desc("busbw (GB/s)")
        .x_label_formatter(&|x| human(*x))
        .draw()?;
    for (i, (algo, pts)) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(*algo)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn human(b: f64) -> String {
    match b {
        b if b >= (1u64 << 30) as f64 => format!("{:.0}G", b / (1u64 << 30) as f64),
        b if b >= (1 << 20) as f64 => format!("{:.0}M", b / (1 << 20) as f64),
        b if b >= (1 << 10) as f64 => format!("{:.0}K", b / (1 << 10) as f64),
        b => format!("{b:.0}"),
    }
}

/// Draws each scheme's progress (the closed form) against the job's ranks into `path`: the
/// availability model of `wccl-bench availability --plot`.
pub fn plot_progress(
    rows: &[crate::availability::report::JobRow],
    title: &str,
    path: &Path,
) -> Result<(), super::BenchError> {
    use crate::availability::job::Scheme;
    if rows.is_empty() {
        return Err("nothing to plot: no job size".into());
    }
    let xmin = rows
        .iter()
        .map(|r| f64::from(r.ranks))
        .fold(f64::INFINITY, f64::min);
    let xmax = rows.iter().map(|r| f64::from(r.ranks)).fold(0.0, f64::max);
    let (xmin, xmax) = (xmin.max(1.0), xmax.max(2.0));
    let ymin = rows
        .iter()
        .flat_map(|r| r.progress.iter().map(|p| p.0))
        .fold(1.0, f64::min)
        .clamp(0.0, 0.99);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((xmin..xmax * 1.2).log_scale(), ymin..1.0)?;
    chart
        .configure_mesh()
        .x_desc("ranks")
        .y_desc("fraction of wall-clock making progress")
        .draw()?;
    for (i, scheme) in Scheme::ALL.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|r| r.progress.get(i).map(|p| (f64::from(r.ranks), p.0)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(scheme.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
