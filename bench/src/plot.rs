//! SVG plot of a run: throughput and latency percentiles per second.
//!
//! plotters' SVG backend writes text as `<text>` elements and, without its
//! `ttf`/`ab_glyph` features, measures text with a built-in estimate, so this
//! needs no font files and no fontconfig.

use std::path::Path;

use plotters::prelude::*;

use super::report::Report;
use super::BenchError;

fn err(path: &Path, e: impl std::fmt::Display) -> BenchError {
    BenchError::Plot {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Draws `report` to `path` as an SVG of two panels: operations per second, and
/// p50/p99 latency per second in milliseconds. `unit` names an operation
/// ("msg", "RETR").
///
/// # Errors
/// The file cannot be written.
pub fn draw(report: &Report, unit: &str, path: &Path) -> Result<(), BenchError> {
    let root = SVGBackend::new(path, (1000, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let title = format!(
        "postino bench {} → {}: {:.0} {unit}/s overall, p99 {:.2} ms",
        report.kind,
        report.server,
        report.throughput_per_s,
        report.latency_us.p99 as f64 / 1000.0
    );
    let root = root
        .titled(&title, ("sans-serif", 20))
        .map_err(|e| err(path, e))?;
    let (top, bottom) = root.split_vertically(340);

    let x_max = (report.per_second.len().max(1)) as f64;
    // The last second is usually partial: scale it to a rate so the line
    // does not dive at the end of every run.
    let span = |t: u64| (report.elapsed_s - t as f64).clamp(0.1, 1.0);
    let rates: Vec<(f64, f64)> = report
        .per_second
        .iter()
        .map(|s| (s.t as f64 + 0.5, s.ok as f64 / span(s.t)))
        .collect();
    let failures: Vec<(f64, f64)> = report
        .per_second
        .iter()
        .map(|s| (s.t as f64 + 0.5, s.failed as f64 / span(s.t)))
        .collect();
    let y_max = rates
        .iter()
        .chain(&failures)
        .map(|p| p.1)
        .fold(1.0, f64::max)
        * 1.1;

    let mut chart = ChartBuilder::on(&top)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(|e| err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc(format!("{unit}/s"))
        .draw()
        .map_err(|e| err(path, e))?;
    chart
        .draw_series(LineSeries::new(rates, BLUE.stroke_width(2)))
        .map_err(|e| err(path, e))?
        .label(format!("{unit} ok per second"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if report.failed > 0 {
        chart
            .draw_series(LineSeries::new(failures, RED.stroke_width(2)))
            .map_err(|e| err(path, e))?
            .label("failed per second")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(|e| err(path, e))?;

    let ms = |us: u64| us as f64 / 1000.0;
    let p50: Vec<(f64, f64)> = report
        .per_second
        .iter()
        .filter(|s| s.ok > 0)
        .map(|s| (s.t as f64 + 0.5, ms(s.p50_us)))
        .collect();
    let p99: Vec<(f64, f64)> = report
        .per_second
        .iter()
        .filter(|s| s.ok > 0)
        .map(|s| (s.t as f64 + 0.5, ms(s.p99_us)))
        .collect();
    let l_max = p99.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..l_max)
        .map_err(|e| err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("latency (ms)")
        .draw()
        .map_err(|e| err(path, e))?;
    chart
        .draw_series(LineSeries::new(p50, GREEN.stroke_width(2)))
        .map_err(|e| err(path, e))?
        .label("p50")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(p99, MAGENTA.stroke_width(2)))
        .map_err(|e| err(path, e))?
        .label("p99")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(|e| err(path, e))?;
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::report::Recorder;
    use super::*;

    #[test]
    fn writes_an_svg_with_text() {
        let start = Instant::now();
        let mut r = Recorder::new(start);
        for i in 0..300u64 {
            r.ok(
                start + Duration::from_millis(i * 10),
                Duration::from_micros(500 + i * 7),
                1024,
            );
        }
        r.failed(start + Duration::from_millis(1200), "DATA 451");
        let rep = r.report(
            "smtp",
            "127.0.0.1:25",
            Duration::from_secs(3),
            serde_json::Value::Null,
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.svg");
        draw(&rep, "msg", &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.contains("<text"));
        assert!(svg.contains("latency (ms)"));
        assert!(svg.contains("<polyline"));
    }
}
