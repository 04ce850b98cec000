//! Line charts as SVG (plotters): busbw against size, one line per algorithm; a training job's
//! progress against its ranks, one line per way of surviving failures.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use super::report::Row;

/// Draws the out-of-place busbw of `rows` against size, one line per algorithm, into `path`,
/// and the floor's busbw (one read-back and one upload per rank) where the rows know it.
pub fn plot_busbw(rows: &[Row], title: &str, path: &Path) -> Result<(), super::BenchError> {
    let mut lines: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    let mut floor: BTreeMap<u64, f64> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.size > 0) {
        lines
            .entry(r.algo.as_str())
            .or_default()
            .push((r.size as f64, r.out_of_place.busbw));
        // busbw at the floor's time: the row's own busbw/algbw factor, size over the floor.
        let m = &r.out_of_place;
        if let Some(f) = r.floor.filter(|f| *f > 0.0 && m.algbw > 0.0) {
            let busbw = r.size as f64 / f / 1e3 * (m.busbw / m.algbw);
            floor.entry(r.size).or_insert(busbw);
        }
    }
    if !floor.is_empty() {
        lines.insert(
            "floor",
            floor.into_iter().map(|(b, f)| (b as f64, f)).collect(),
        );
    }
    let ymax = lines
        .values()
        .flatten()
        .map(|p| p.1)
        .fold(0.0, f64::max)
        .max(1e-6)
        * 1.1;
    let lines: Vec<(&str, Vec<(f64, f64)>)> = lines.into_iter().collect();
    let chart = Chart {
        title,
        x_desc: "size (bytes)",
        y_desc: "busbw (GB/s)",
        y: 0.0..ymax,
        x_label: Some(&|x| human(*x)),
        legend: SeriesLabelPosition::MiddleRight,
    };
    chart.draw(&lines, path)
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
    let ymin = rows
        .iter()
        .flat_map(|r| r.progress.iter().map(|p| p.0))
        .fold(1.0, f64::min)
        .clamp(0.0, 0.99);
    let lines: Vec<(&str, Vec<(f64, f64)>)> = Scheme::ALL
        .iter()
        .enumerate()
        .map(|(i, scheme)| {
            let pts = rows
                .iter()
                .filter_map(|r| r.progress.get(i).map(|p| (f64::from(r.ranks), p.0)))
                .collect();
            (scheme.name(), pts)
        })
        .collect();
    let chart = Chart {
        title,
        x_desc: "ranks",
        y_desc: "fraction of wall-clock making progress",
        y: ymin..1.0,
        x_label: None,
        legend: SeriesLabelPosition::LowerLeft,
    };
    chart.draw(&lines, path)
}

/// A chart with a logarithmic x axis spanning its lines' points, one line (and its points) per
/// series, in the order given.
struct Chart<'a> {
    title: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    y: std::ops::Range<f64>,
    x_label: Option<&'a dyn Fn(&f64) -> String>,
    legend: SeriesLabelPosition,
}

impl Chart<'_> {
    fn draw(self, lines: &[(&str, Vec<(f64, f64)>)], path: &Path) -> Result<(), super::BenchError> {
        let xs = || lines.iter().flat_map(|l| l.1.iter().map(|p| p.0));
        let (xmin, xmax) = (
            xs().fold(f64::INFINITY, f64::min).max(1.0),
            xs().fold(0.0, f64::max).max(2.0),
        );
        if xmin > xmax {
            return Err("nothing to plot: no points".into());
        }
        let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(self.title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d((xmin..xmax * 1.2).log_scale(), self.y)?;
        let mut mesh = chart.configure_mesh();
        mesh.x_desc(self.x_desc).y_desc(self.y_desc);
        if let Some(f) = self.x_label {
            mesh.x_label_formatter(f);
        }
        mesh.draw()?;
        for (i, (name, pts)) in lines.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(self.legend)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}
