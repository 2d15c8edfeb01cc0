//! Drawing the metrics: one panel each for loss (train and validation),
//! tokens/s, learning rate, gradient norm, MFU and peak memory, all but the
//! first only when the file has values for them. Text is rendered by ab_glyph from an embedded DejaVu
//! Sans, so a PNG needs no system fonts; an SVG names the font family and
//! leaves the glyphs to the viewer.

use std::fs;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::{Error, Result, RunMetrics, Series};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Svg,
}

impl ImageFormat {
    /// The format named by the file's extension (case-insensitive).
    pub fn from_path(path: &Path) -> Result<Self> {
        let err = |what: String| Error::Extension { path: path.display().to_string(), what };
        let Some(ext) = path.extension() else {
            return Err(err("no extension".into()));
        };
        match ext.to_string_lossy().to_ascii_lowercase().as_str() {
            "png" => Ok(ImageFormat::Png),
            "svg" => Ok(ImageFormat::Svg),
            other => Err(err(format!("unknown extension '.{other}'"))),
        }
    }
}

/// The family plotters asks for by default; the only one registered.
const FONT: &str = "sans-serif";
const PANEL_W: u32 = 640;
const PANEL_H: u32 = 400;

struct Line {
    label: &'static str,
    color: RGBColor,
    /// Finite points only: `null`s leave a gap in the data, not a zero.
    points: Vec<(u64, f64)>,
    /// Evaluation points are few and far apart: draw each one.
    markers: bool,
}

struct Panel {
    title: &'static str,
    y_desc: &'static str,
    lines: Vec<Line>,
    /// A tick label for a value, given the axis range (lo, hi).
    y_label: fn(f64, (f64, f64)) -> String,
}

fn line(label: &'static str, color: RGBColor, s: &Series, markers: bool) -> Line {
    let points = s.iter().filter(|(_, v)| v.is_finite()).copied().collect();
    Line { label, color, points, markers }
}

fn panels(m: &RunMetrics) -> Vec<Panel> {
    let mut out = vec![Panel {
        title: "Loss",
        y_desc: "loss",
        lines: vec![
            line("train", RGBColor(31, 119, 180), &m.train_loss, false),
            line("validation", RGBColor(255, 127, 14), &m.val_loss, true),
        ],
        y_label: fixed,
    }];
    // A classifier's evaluations.
    let accuracy = vec![
        line("top-1", RGBColor(31, 119, 180), &m.val_acc, true),
        line("top-5", RGBColor(255, 127, 14), &m.val_acc5, true),
    ];
    if accuracy.iter().any(|l| !l.points.is_empty()) {
        out.push(Panel { title: "Validation accuracy", y_desc: "accuracy", lines: accuracy, y_label: percent });
    }
    let extra = [
        (
            "Throughput",
            "tokens/s",
            line("tokens/s", RGBColor(44, 160, 44), &m.tok_per_s, false),
            scaled as fn(f64, (f64, f64)) -> String,
        ),
        ("Throughput", "images/s", line("images/s", RGBColor(44, 160, 44), &m.img_per_s, false), scaled),
        ("Learning rate", "learning rate", line("lr", RGBColor(148, 103, 189), &m.lr, false), scientific),
        ("Gradient norm", "gradient norm", line("grad norm", RGBColor(214, 39, 40), &m.grad_norm, false), fixed),
        ("Model FLOPs utilization", "MFU", line("mfu", RGBColor(140, 86, 75), &m.mfu, false), percent),
        ("Peak memory", "GB", line("peak memory", RGBColor(127, 127, 127), &m.peak_mem_gb, false), fixed),
    ];
    for (title, y_desc, l, y_label) in extra {
        if !l.points.is_empty() {
            out.push(Panel { title, y_desc, lines: vec![l], y_label });
        }
    }
    out
}

/// Decimals that tell apart ticks over `span`: plotters puts at most ten
/// labels on an axis, at steps of 1, 2 or 5 times a power of ten, so a step is
/// never below span/10.
fn decimals(span: f64) -> usize {
    if !(span.is_finite() && span > 0.0) {
        return 2;
    }
    (-(span / 10.0).log10().floor()).clamp(0.0, 9.0) as usize
}

fn fixed(v: f64, (lo, hi): (f64, f64)) -> String {
    let d = decimals(hi - lo);
    format!("{v:.d$}")
}

/// 1234567 -> "1.23M": throughput spans orders of magnitude between CPU and GPU runs.
fn scaled(v: f64, (lo, hi): (f64, f64)) -> String {
    let top = lo.abs().max(hi.abs());
    let (scale, suffix) =
        [(1e9, "G"), (1e6, "M"), (1e3, "k")].into_iter().find(|&(s, _)| top >= s).unwrap_or((1.0, ""));
    let d = decimals((hi - lo) / scale);
    format!("{:.d$}{suffix}", v / scale)
}

/// Learning rates: 3.0e-4, with as many digits as the range needs.
fn scientific(v: f64, (lo, hi): (f64, f64)) -> String {
    let top = lo.abs().max(hi.abs());
    let unit = if top > 0.0 { 10f64.powf(top.log10().floor()) } else { 1.0 };
    let d = decimals((hi - lo) / unit);
    format!("{v:.d$e}")
}

/// MFU is a fraction; shown in percent.
fn percent(v: f64, (lo, hi): (f64, f64)) -> String {
    let d = decimals((hi - lo) * 100.0);
    format!("{:.d$}%", v * 100.0)
}

/// The value range of a panel with a margin, never empty.
fn y_range(lines: &[Line]) -> (f64, f64) {
    let vals = lines.iter().flat_map(|l| l.points.iter().map(|&(_, v)| v));
    let (lo, hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = if hi > lo {
        (hi - lo) * 0.05
    } else if lo != 0.0 {
        lo.abs() * 0.1
    } else {
        1.0
    };
    (lo - pad, hi + pad)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    x_max: u64,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (y0, y1) = y_range(&panel.lines);
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, (FONT, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(72)
        // Integer steps: ticks never fall between two steps.
        .build_cartesian_2d(0..x_max, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(panel.y_desc)
        .y_label_formatter(&|y| (panel.y_label)(*y, (y0, y1)))
        .draw()?;
    if panel.lines.iter().all(|l| l.points.is_empty()) {
        let (w, h) = area.dim_in_pixel();
        area.draw(&Text::new("no finite values", (w as i32 / 2 - 60, h as i32 / 2), (FONT, 16)))?;
        return Ok(());
    }
    let drawn: Vec<&Line> = panel.lines.iter().filter(|l| !l.points.is_empty()).collect();
    for l in &drawn {
        let style = l.color.stroke_width(2);
        let series = chart.draw_series(LineSeries::new(l.points.iter().copied(), style))?;
        let color = l.color;
        series.label(l.label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        if l.markers {
            chart.draw_series(l.points.iter().map(|&p| Circle::new(p, 3, l.color.filled())))?;
        }
    }
    if drawn.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT, 16))
            .draw()?;
    }
    Ok(())
}

fn draw_all<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panels: &[Panel],
    cols: usize,
    x_max: u64,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let rows = panels.len().div_ceil(cols);
    for (area, panel) in root.split_evenly((rows, cols)).iter().zip(panels) {
        draw_panel(area, panel, x_max)?;
    }
    root.present()
}

/// Draws `m` into `path` as `format`. The image is built in memory and written
/// in one go, so a drawing error leaves no partial file behind.
pub fn render(m: &RunMetrics, path: &Path, format: ImageFormat) -> Result<()> {
    register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).map_err(|_| Error::Font)?;
    let panels = panels(m);
    let cols = if panels.len() > 1 { 2 } else { 1 };
    let rows = panels.len().div_ceil(cols);
    let (w, h) = (PANEL_W * cols as u32, PANEL_H * rows as u32);
    let x_max = m.last_step().unwrap_or(0).max(1);
    let name = path.display().to_string();
    let draw_err = |e: String| Error::Draw { path: name.clone(), msg: e };
    let bytes = match format {
        ImageFormat::Svg => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
                draw_all(&root, &panels, cols, x_max).map_err(|e| draw_err(e.to_string()))?;
            }
            svg.into_bytes()
        }
        ImageFormat::Png => {
            let mut rgb = vec![0u8; (w * h * 3) as usize];
            {
                let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
                draw_all(&root, &panels, cols, x_max).map_err(|e| draw_err(e.to_string()))?;
            }
            encode_png(&rgb, w, h).map_err(|e| draw_err(e.to_string()))?
        }
    };
    fs::write(path, bytes).map_err(|err| Error::Io { path: name, err })
}

fn encode_png(rgb: &[u8], w: u32, h: u32) -> std::result::Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn format_from_extension() {
        assert_eq!(ImageFormat::from_path(Path::new("a/r.png")).unwrap(), ImageFormat::Png);
        assert_eq!(ImageFormat::from_path(Path::new("r.SVG")).unwrap(), ImageFormat::Svg);
        let e = ImageFormat::from_path(Path::new("r.jpg")).unwrap_err().to_string();
        assert_eq!(e, "output r.jpg: unknown extension '.jpg'; the file name must end in .png or .svg");
        let e = ImageFormat::from_path(Path::new("report")).unwrap_err().to_string();
        assert!(e.contains("no extension"), "{e}");
    }

    #[test]
    fn ranges_are_never_empty() {
        let l = |pts: Vec<(u64, f64)>| Line { label: "x", color: BLACK, points: pts, markers: false };
        assert_eq!(y_range(&[l(vec![])]), (0.0, 1.0));
        assert_eq!(y_range(&[l(vec![(1, 0.0)])]), (-1.0, 1.0));
        let (lo, hi) = y_range(&[l(vec![(1, 2e-3), (2, 2e-3)])]);
        assert!(lo < 2e-3 && hi > 2e-3);
        let (lo, hi) = y_range(&[l(vec![(1, 1.0)]), l(vec![(1, 3.0)])]);
        assert!((lo - 0.9).abs() < 1e-12 && (hi - 3.1).abs() < 1e-12);
    }

    #[test]
    fn tick_labels_have_the_digits_their_range_needs() {
        assert_eq!(fixed(3.25, (3.0, 11.0)), "3.2");
        assert_eq!(fixed(3.2512, (3.2, 3.26)), "3.251");
        assert_eq!(scaled(950.0, (0.0, 999.0)), "950");
        assert_eq!(scaled(2451.0, (300.0, 2500.0)), "2.5k");
        assert_eq!(scaled(1020.0, (1000.0, 1200.0)), "1.02k");
        assert_eq!(scaled(1_234_567.0, (1e6, 2e6)), "1.2M");
        assert_eq!(scientific(6e-4, (0.0, 3e-3)), "6.0e-4");
        assert_eq!(scientific(6.05e-4, (6e-4, 6.1e-4)), "6.05e-4");
        assert_eq!(percent(0.4512, (0.40, 0.50)), "45.1%");
        assert_eq!(fixed(1.0, (1.0, 1.0)), "1.00");
    }

    #[test]
    fn panels_only_for_present_series() {
        let mut m = RunMetrics { val_loss: vec![(0, 10.0)], ..Default::default() };
        assert_eq!(panels(&m).len(), 1);
        m.tok_per_s = vec![(1, f64::NAN)];
        assert_eq!(panels(&m).len(), 1, "a series of nulls has nothing to draw");
        m.tok_per_s = vec![(1, 5.0)];
        m.lr = vec![(1, 1e-3)];
        let titles: Vec<&str> = panels(&m).iter().map(|p| p.title).collect();
        assert_eq!(titles, ["Loss", "Throughput", "Learning rate"]);
        m.peak_mem_gb = vec![(1, 3.5)];
        assert_eq!(panels(&m).last().map(|p| p.title), Some("Peak memory"));
        // An image classifier: accuracy after the loss, images/s for throughput.
        let m = RunMetrics {
            val_loss: vec![(0, 2.3)],
            val_acc: vec![(0, 0.1), (50, 0.8)],
            val_acc5: vec![(0, 0.5), (50, 0.99)],
            img_per_s: vec![(1, 1500.0)],
            ..Default::default()
        };
        let p = panels(&m);
        let titles: Vec<&str> = p.iter().map(|p| p.title).collect();
        assert_eq!(titles, ["Loss", "Validation accuracy", "Throughput"]);
        assert_eq!(p[2].y_desc, "images/s");
    }
}
