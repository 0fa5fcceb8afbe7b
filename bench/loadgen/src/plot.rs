//! The latency-over-time plot: p50, p99 and max ack latency per time slice of the measured
//! window. A stall shows as a spike at the moment it happened, which a single percentile hides.
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use super::stats::histogram;

/// Number of time slices the measured window is cut into.
const SLICES: usize = 100;

/// Draws the SVG at `path` from `(scheduled offset s, latency µs)` samples.
pub fn draw(path: &Path, samples: &[(f32, u32)], window_s: f64, title: &str) -> anyhow::Result<()> {
    let slice_s = (window_s / SLICES as f64).max(0.01);
    let slices = (window_s / slice_s).ceil().max(1.0) as usize;
    let mut per_slice: Vec<_> = (0..slices).map(|_| histogram()).collect();
    for &(at, latency_us) in samples {
        let index = ((f64::from(at) / slice_s).floor().max(0.0) as usize).min(slices - 1);
        per_slice[index].saturating_record(u64::from(latency_us).max(1));
    }
    let line = |quantile: Option<f64>| -> Vec<(f64, f64)> {
        per_slice
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.is_empty())
            .map(|(i, h)| {
                let us = quantile.map_or(h.max(), |q| h.value_at_quantile(q));
                ((i as f64 + 0.5) * slice_s, us as f64 / 1000.0)
            })
            .collect()
    };
    let (p50, p99, max) = (line(Some(0.5)), line(Some(0.99)), line(None));
    let y_max = max.iter().map(|&(_, y)| y).fold(1.0_f64, f64::max) * 1.05;

    let root = SVGBackend::new(path, (1000, 500)).into_drawing_area();
    let draw_error = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing the plot: {e}");
    root.fill(&WHITE).map_err(draw_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..window_s.max(slice_s), 0.0..y_max)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds into the measured window (scheduled send time)")
        .y_desc("ack latency (ms)")
        .draw()
        .map_err(draw_error)?;
    for (points, colour, label) in [(max, RED, "max"), (p99, BLUE, "p99"), (p50, GREEN, "p50")] {
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(draw_error)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_error)?;
    root.present()
        .with_context(|| format!("writing the plot {}", path.display()))?;
    Ok(())
}
