//! PNG plots of a run, drawn in Rust with a bundled font (no system fonts needed):
//! `curves.png` from `metrics.jsonl`, a row of two panels (against steps and against wall-clock
//! time) for each of what the run measured: the distance to the exact target (TV, L1), the
//! modes found, the test-set Spearman correlation; and the loss. For environments drawn on a
//! grid (HyperGrid), `distribution.png`: the exact learned distribution of the checkpoint
//! beside the true one as heatmaps (for more than two dimensions, the marginal over the first
//! two coordinates), as in Figure 1 of the trajectory-balance paper.

use crate::config::Config;
use crate::run::{build_state, CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE};
use anyhow::{anyhow, bail, Context, Result};
use gfn_core::metrics::exact::{exact_terminating_distribution, forward_policy_table};
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::{Path, PathBuf};
use tch::Device;

pub const CURVES_FILE: &str = "curves.png";
pub const DISTRIBUTION_FILE: &str = "distribution.png";

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
            .unwrap_or_else(|_| panic!("the bundled font is a valid TrueType font"));
    });
}

fn draw_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing: {e}")
}

/// Writes the plots of the run in `dir`; returns their paths.
pub fn plot_run(dir: &Path) -> Result<Vec<PathBuf>> {
    register_font();
    let metrics_path = dir.join(METRICS_FILE);
    let text = std::fs::read_to_string(&metrics_path)
        .with_context(|| format!("cannot read {}", metrics_path.display()))?;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not JSON", metrics_path.display(), i + 1))
        })
        .collect::<Result<_>>()?;
    if lines.is_empty() {
        bail!("{} has no metrics yet", metrics_path.display());
    }
    let mut written = vec![dir.join(CURVES_FILE)];
    curves(&lines, &written[0])?;
    if dir.join(CHECKPOINT_FILE).exists() {
        let path = dir.join(DISTRIBUTION_FILE);
        if distribution(dir, &path)? {
            written.push(path);
        }
    }
    Ok(written)
}

fn series(lines: &[serde_json::Value], x: &str, y: &str) -> Vec<(f64, f64)> {
    lines
        .iter()
        .filter_map(|l| Some((l[x].as_f64()?, l[y].as_f64()?)))
        .filter(|(_, v)| v.is_finite())
        .collect()
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// What a row of panels shows: `keys` (metric, legend label) of the metrics.
struct Quantity {
    keys: &'static [(&'static str, &'static str)],
    title: &'static str,
    scale: Scale,
}

#[derive(Clone, Copy, PartialEq)]
enum Scale {
    Log,
    /// Linear from 0 (counts).
    FromZero,
    /// Linear over the values' range.
    Linear,
}

const QUANTITIES: [Quantity; 4] = [
    Quantity {
        keys: &[
            ("exact_tv", "exact TV"),
            ("tv", "TV (sampled)"),
            ("l1", "L1 (sampled)"),
        ],
        title: "distance to the target",
        scale: Scale::Log,
    },
    Quantity {
        keys: &[("modes_found", "modes found")],
        title: "modes found",
        scale: Scale::FromZero,
    },
    Quantity {
        keys: &[("spearman", "Spearman"), ("pearson", "Pearson")],
        title: "test-set correlation",
        scale: Scale::Linear,
    },
    Quantity {
        keys: &[("loss", "loss")],
        title: "training loss",
        scale: Scale::Log,
    },
];

/// One panel: `quantity` against `x`.
fn panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    lines: &[serde_json::Value],
    x: &str,
    x_label: &str,
    quantity: &Quantity,
) -> Result<()> {
    let keys = quantity.keys;
    let title = format!("{} vs {x_label}", quantity.title);
    let log_scale = quantity.scale == Scale::Log;
    let floor = |v: f64| if log_scale { v.max(1e-9) } else { v };
    let all: Vec<Vec<(f64, f64)>> = keys
        .iter()
        .map(|(k, _)| {
            series(lines, x, k)
                .into_iter()
                .map(|(a, b)| (a, floor(b)))
                .collect()
        })
        .collect();
    let points = all.iter().flatten();
    let x_max = points.clone().map(|p| p.0).fold(0.0, f64::max).max(1e-9);
    let y_min = points.clone().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y_max = points.map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let mut chart = ChartBuilder::on(area);
    chart
        .caption(&title, (FAMILY, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60);
    if log_scale {
        let (y_min, y_max) = if y_min.is_finite() && y_max > 0.0 {
            (y_min / 1.5, y_max * 1.5)
        } else {
            (1e-3, 1.0)
        };
        let chart = chart
            .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())
            .map_err(draw_error)?;
        draw_lines(chart, keys, all, x_label)
    } else {
        let (y_min, y_max) = match (y_min.is_finite(), quantity.scale) {
            (false, _) => (0.0, 1.0),
            (true, Scale::FromZero) => (0.0, (y_max * 1.1).max(1.0)),
            (true, _) => {
                let pad = ((y_max - y_min) * 0.1).max(1e-2);
                (y_min - pad, y_max + pad)
            }
        };
        let chart = chart
            .build_cartesian_2d(0f64..x_max, y_min..y_max)
            .map_err(draw_error)?;
        draw_lines(chart, keys, all, x_label)
    }
}

fn draw_lines<'a, Y>(
    mut chart: ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    keys: &[(&str, &str)],
    all: Vec<Vec<(f64, f64)>>,
    x_label: &str,
) -> Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc(x_label)
        .label_style((FAMILY, 13))
        .x_labels(6)
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .draw()
        .map_err(draw_error)?;
    for (i, ((_, label), points)) in keys.iter().zip(all).enumerate() {
        if points.is_empty() {
            continue;
        }
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(draw_error)?
            .label(*label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(draw_error)?;
    Ok(())
}

/// A tick label with a few significant digits (tick values carry float noise).
fn tick(v: f64) -> String {
    if v == 0.0 || (1e-2..1e5).contains(&v.abs()) {
        let text = format!("{v:.3}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.1e}")
    }
}

fn curves(lines: &[serde_json::Value], path: &Path) -> Result<()> {
    // A row for each quantity the run measured; the loss has a panel of its own.
    let present = |q: &Quantity| {
        q.keys
            .iter()
            .any(|(k, _)| !series(lines, "step", k).is_empty())
    };
    let (loss, rows): (Vec<&Quantity>, Vec<&Quantity>) = QUANTITIES
        .iter()
        .filter(|q| present(q))
        .partition(|q| q.keys[0].0 == "loss");
    let n_rows = rows.len() + loss.len();
    let root = BitMapBackend::new(path, (1100, 380 * n_rows.max(1) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let areas = root.split_evenly((n_rows.max(1), 2));
    for (r, quantity) in rows.iter().enumerate() {
        panel(&areas[2 * r], lines, "step", "steps", quantity)?;
        panel(&areas[2 * r + 1], lines, "wall_s", "seconds", quantity)?;
    }
    if let Some(quantity) = loss.first() {
        panel(&areas[2 * rows.len()], lines, "step", "steps", quantity)?;
    }
    root.present().map_err(draw_error)?;
    Ok(())
}

/// A light-to-dark blue scale for probabilities in [0, 1] (relative to the panel's maximum).
fn shade(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let lerp = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * t).round() as u8;
    RGBColor(lerp(247, 8), lerp(251, 48), lerp(255, 107))
}

fn heatmap(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    grid: &[f64],
    height: usize,
    title: &str,
) -> Result<()> {
    let max = grid
        .iter()
        .copied()
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(40)
        .build_cartesian_2d(0i32..height as i32, 0i32..height as i32)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("x0")
        .y_desc("x1")
        .label_style((FAMILY, 13))
        .draw()
        .map_err(draw_error)?;
    chart
        .draw_series((0..height).flat_map(|i| {
            (0..height).map(move |j| {
                let p = grid[i * height + j];
                Rectangle::new(
                    [(i as i32, j as i32), (i as i32 + 1, j as i32 + 1)],
                    shade(p / max).filled(),
                )
            })
        }))
        .map_err(draw_error)?;
    Ok(())
}

/// `probabilities` over all states, summed onto the first two coordinates.
fn marginal(state: &gfn_core::train::TrainState, side: usize, probabilities: &[f64]) -> Vec<f64> {
    let enumeration = state.env.enumeration().expect("a grid is enumerable");
    let mut grid = vec![0.0; side * side];
    let mut coords = vec![0i64; state.env.state_dim()];
    for (index, &p) in probabilities.iter().enumerate() {
        enumeration.state_from_index(index, &mut coords);
        grid[coords[0] as usize * side + coords[1] as usize] += p;
    }
    grid
}

/// The learned and the true distribution as heatmaps, for environments drawn on a grid whose
/// truth is known; returns whether it drew them.
fn distribution(dir: &Path, path: &Path) -> Result<bool> {
    let config = Config::from_file(&dir.join(CONFIG_FILE))?;
    let mut state = build_state(&config, Device::Cpu, 0)?;
    // Any run's checkpoint can be drawn, whatever its world size.
    gfn_core::checkpoint::load(&mut state, &dir.join(CHECKPOINT_FILE), None)?;
    let (Some(side), Some(truth)) = (state.env.grid_side(), state.truth.as_ref()) else {
        return Ok(false);
    };
    let policy = forward_policy_table(state.env.as_ref(), &state.estimators)?;
    let learned = exact_terminating_distribution(state.env.as_ref(), &policy);
    let dims = state.env.state_dim();
    let what = if dims == 2 {
        String::new()
    } else {
        format!(" (marginal of x0, x1 over {dims} dims)")
    };
    let root = BitMapBackend::new(path, (1000, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let areas = root.split_evenly((1, 2));
    heatmap(
        &areas[0],
        &marginal(&state, side, &learned),
        side,
        &format!("learned, step {}{what}", state.step),
    )?;
    heatmap(
        &areas[1],
        &marginal(&state, side, &truth.probabilities),
        side,
        &format!("target R(x)/Z{what}"),
    )?;
    root.present().map_err(draw_error)?;
    Ok(true)
}
