//! SVG charts of the report (plotters, SVG backend only): throughput by threads, latency
//! percentiles, consumer scalability, recovery times.

use std::path::Path;

use plotters::prelude::*;

use crate::Results;
use crate::recovery::RecoveryRun;
use crate::stats::median;
use crate::throughput::Mode;

type DrawResult = Result<(), Box<dyn std::error::Error>>;
type Chart<'a> = (&'a str, &'a dyn Fn(&Results, &Path) -> DrawResult);
type Metric<'a> = (&'a str, fn(&RecoveryRun) -> f64);

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draw every chart into `dir`; returns the problems (a chart that fails does not stop
/// the report).
pub fn draw_all(r: &Results, dir: &Path) -> Vec<String> {
    let mut errors = Vec::new();
    let charts: [Chart; 4] = [
        ("throughput_by_threads.svg", &throughput),
        ("latency_percentiles.svg", &latency),
        ("consumer_scalability.svg", &consumers),
        ("recovery_times.svg", &recovery),
    ];
    for (name, f) in charts {
        if let Err(e) = f(r, &dir.join(name)) {
            errors.push(format!("chart {name}: {e}"));
        }
    }
    errors
}

fn med(v: impl Iterator<Item = f64>) -> f64 {
    median(&v.collect::<Vec<_>>())
}

fn log_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let v: Vec<f64> = values.filter(|x| x.is_finite() && *x > 0.0).collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    if v.is_empty() {
        return 1.0..10.0;
    }
    let lo = 10f64.powf(lo.log10().floor());
    let hi = 10f64.powf(hi.log10().ceil()).max(lo * 10.0);
    lo..hi
}

fn config_labels(r: &Results) -> Vec<String> {
    r.publish_configs
        .iter()
        .map(|(t, m)| format!("{t}×{m}"))
        .collect()
}

fn throughput(r: &Results, path: &Path) -> DrawResult {
    let labels = config_labels(r);
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut clients = vec!["lepus".to_string()];
    clients.extend(r.peer_clients.iter().cloned());
    for c in &clients {
        let pts: Vec<(f64, f64)> = r
            .publish_configs
            .iter()
            .enumerate()
            .map(|(i, &(t, m))| {
                let v = med(r
                    .publish
                    .iter()
                    .filter(|p| {
                        &p.client == c
                            && p.threads == t
                            && p.per_thread == m
                            && p.mode == Mode::None
                    })
                    .map(|p| p.absorbed_rate()));
                (i as f64, v)
            })
            .filter(|(_, v)| v.is_finite())
            .collect();
        if !pts.is_empty() {
            series.push((format!("{c} (no confirms)"), pts));
        }
    }
    let pts: Vec<(f64, f64)> = r
        .publish_configs
        .iter()
        .enumerate()
        .map(|(i, &(t, m))| {
            (
                i as f64,
                med(r
                    .ceiling
                    .iter()
                    .filter(|c| c.threads == t && c.per_thread == m)
                    .map(|c| c.absorbed_rate())),
            )
        })
        .filter(|(_, v)| v.is_finite())
        .collect();
    if !pts.is_empty() {
        series.push(("ceiling (raw socket)".into(), pts));
    }
    let pts: Vec<(f64, f64)> = r
        .publish_configs
        .iter()
        .enumerate()
        .map(|(i, &(t, m))| {
            (
                i as f64,
                med(r
                    .publish
                    .iter()
                    .filter(|p| {
                        p.client == "lepus"
                            && p.threads == t
                            && p.per_thread == m
                            && p.mode == Mode::Each
                    })
                    .map(|p| p.absorbed_rate())),
            )
        })
        .filter(|(_, v)| v.is_finite())
        .collect();
    if !pts.is_empty() {
        series.push(("lepus (confirm each)".into(), pts));
    }
    lines(
        path,
        "Publish throughput absorbed by the broker",
        "threads × messages per thread",
        "msg/s (log)",
        &labels,
        &series,
    )
}

fn latency(r: &Results, path: &Path) -> DrawResult {
    let labels = config_labels(r);
    let mut series = Vec::new();
    for (mode, name) in [(Mode::None, "no confirms"), (Mode::Each, "confirm each")] {
        for (p, pname) in [(0, "P50"), (1, "P99"), (2, "P99.9")] {
            let pts: Vec<(f64, f64)> = r
                .publish_configs
                .iter()
                .enumerate()
                .map(|(i, &(t, m))| {
                    (
                        i as f64,
                        med(r
                            .publish
                            .iter()
                            .filter(|x| {
                                x.client == "lepus"
                                    && x.threads == t
                                    && x.per_thread == m
                                    && x.mode == mode
                            })
                            .map(|x| match p {
                                0 => x.lat.p50_ms,
                                1 => x.lat.p99_ms,
                                _ => x.lat.p999_ms,
                            })),
                    )
                })
                .filter(|(_, v)| v.is_finite() && *v > 0.0)
                .collect();
            if !pts.is_empty() {
                series.push((format!("lepus {pname}, {name}"), pts));
            }
        }
    }
    lines(
        path,
        "lepus per-publish latency percentiles",
        "threads × messages per thread",
        "ms (log)",
        &labels,
        &series,
    )
}

fn consumers(r: &Results, path: &Path) -> DrawResult {
    let labels: Vec<String> = r.consumer_counts.iter().map(|n| n.to_string()).collect();
    let mut clients = vec![
        "lepus".to_string(),
        crate::consume_ways::DISPATCH.to_string(),
    ];
    clients.extend(r.peer_clients.iter().cloned());
    let root = SVGBackend::new(path, (1100, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(550);
    let mut rate = Vec::new();
    let mut startup = Vec::new();
    for c in &clients {
        let pick = |f: &dyn Fn(&crate::throughput::ConsumeRun) -> f64| -> Vec<(f64, f64)> {
            r.consumer_counts
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    (
                        i as f64,
                        med(r
                            .consume
                            .iter()
                            .filter(|x| &x.client == c && x.consumers == n)
                            .map(f)),
                    )
                })
                .filter(|(_, v)| v.is_finite() && *v > 0.0)
                .collect()
        };
        let pr = pick(&|x| x.consume_rate());
        if !pr.is_empty() {
            rate.push((c.clone(), pr));
        }
        let ps = pick(&|x| x.startup_secs * 1e3);
        if !ps.is_empty() {
            startup.push((c.clone(), ps));
        }
    }
    let floor: Vec<(f64, f64)> = r
        .consumer_counts
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let v: Vec<f64> = r
                .consumer_floor
                .iter()
                .filter(|x| x.0 == n)
                .map(|x| x.2 * 1e3)
                .collect();
            (i as f64, median(&v))
        })
        .filter(|(_, v)| v.is_finite() && *v > 0.0)
        .collect();
    if !floor.is_empty() {
        startup.push(("broker floor (raw socket)".into(), floor));
    }
    lines_on(
        &left,
        "Consume rate",
        "consumers",
        "msg/s (log)",
        &labels,
        &rate,
    )?;
    lines_on(
        &right,
        "Consumer startup",
        "consumers",
        "ms (log)",
        &labels,
        &startup,
    )?;
    root.present()?;
    Ok(())
}

fn recovery(r: &Results, path: &Path) -> DrawResult {
    // One group per (fault, threads): detection, last told, full recovery (medians).
    let mut groups: Vec<(String, Vec<&RecoveryRun>)> = Vec::new();
    for x in &r.recovery {
        let k = format!("{} ×{}", x.fault.short(), x.threads);
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, v)) => v.push(x),
            None => groups.push((k, vec![x])),
        }
    }
    let root = SVGBackend::new(path, (1100, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    if groups.is_empty() {
        root.present()?;
        return Ok(());
    }
    let metrics: [Metric; 3] = [
        ("detection", |x| x.detection_ms),
        ("last thread told", |x| x.told_last_ms),
        ("full recovery", |x| x.recovery_first_ms),
    ];
    let vals: Vec<Vec<f64>> = groups
        .iter()
        .map(|(_, g)| {
            metrics
                .iter()
                .map(|(_, f)| med(g.iter().map(|x| f(x))))
                .collect()
        })
        .collect();
    let range = log_range(vals.iter().flatten().copied().map(|v| v.max(0.001)));
    let n = groups.len();
    let labels: Vec<String> = groups.iter().map(|(k, _)| k.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Recovery times by failure type (from injection)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), range.clone().log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|v| {
            let i = v.round();
            if (v - i).abs() < 0.01 && i >= 0.0 && (i as usize) < labels.len() {
                labels[i as usize].clone()
            } else {
                String::new()
            }
        })
        .y_desc("ms (log)")
        .draw()?;
    let width = 0.8 / metrics.len() as f64;
    for (mi, (name, _)) in metrics.iter().enumerate() {
        let color = PALETTE[mi % PALETTE.len()];
        let bars: Vec<Rectangle<(f64, f64)>> = vals
            .iter()
            .enumerate()
            .filter(|(_, v)| v[mi].is_finite())
            .map(|(gi, v)| {
                let x0 = gi as f64 - 0.4 + mi as f64 * width;
                Rectangle::new(
                    [
                        (x0, range.start),
                        (x0 + width * 0.9, v[mi].max(range.start)),
                    ],
                    color.filled(),
                )
            })
            .collect();
        chart
            .draw_series(bars)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn lines(
    path: &Path,
    title: &str,
    xdesc: &str,
    ydesc: &str,
    labels: &[String],
    series: &[(String, Vec<(f64, f64)>)],
) -> DrawResult {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    lines_on(&root, title, xdesc, ydesc, labels, series)?;
    root.present()?;
    Ok(())
}

fn lines_on<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    xdesc: &str,
    ydesc: &str,
    labels: &[String],
    series: &[(String, Vec<(f64, f64)>)],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let range = log_range(series.iter().flat_map(|(_, p)| p.iter().map(|(_, y)| *y)));
    let n = labels.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.3f64..(n as f64 - 0.7), range.log_scale())?;
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&|v| {
            let i = v.round();
            if (v - i).abs() < 0.01 && i >= 0.0 && (i as usize) < labels.len() {
                labels[i as usize].clone()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| {
            if *v >= 1e6 {
                format!("{:.0}M", v / 1e6)
            } else if *v >= 1e3 {
                format!("{:.0}k", v / 1e3)
            } else if *v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v}")
            }
        })
        .x_desc(xdesc)
        .y_desc(ydesc)
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
