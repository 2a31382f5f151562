//! Pictures for a training run: an example grid (input, reconstruction, per-slot
//! reconstructions, segmentation) and loss / FG-ARI curves from `metrics.jsonl`.
//!
//! Text is drawn with plotters' `ab_glyph` backend from an embedded DejaVu Sans
//! (see `assets/DejaVuSans-LICENSE.txt`), so no system font library is needed.
//! Every PNG is written to a temporary file in the destination directory and
//! renamed into place, so a reader never sees a half-written image.

use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Family name the embedded font is registered under; plotters' own defaults use it too.
const FONT_FAMILY: &str = "sans-serif";
const FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Registers the embedded font with plotters once per process.
fn ensure_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT_BYTES)
                .map_err(|_| "embedded DejaVu Sans font could not be parsed".to_string())
        })
        .clone()
}

/// Writes an RGB8 buffer as PNG via a temp file in the same directory + rename.
/// Missing parent directories are created.
fn write_png_atomically(path: &Path, width: u32, height: u32, rgb: &[u8]) -> Result<(), String> {
    static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| format!("output path {} has no file name", path.display()))?;
    fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot create directory {}: {e}", dir.display()))?;
    // pid + counter keeps concurrent writers (threads or processes) apart.
    let temp = dir.join(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let file = fs::File::create(&temp)
            .map_err(|e| format!("cannot create {}: {e}", temp.display()))?;
        let mut writer = BufWriter::new(file);
        PngEncoder::new(&mut writer)
            .write_image(rgb, width, height, ExtendedColorType::Rgb8)
            .map_err(|e| format!("cannot encode PNG {}: {e}", path.display()))?;
        let file = writer
            .into_inner()
            .map_err(|e| format!("cannot write {}: {}", temp.display(), e.error()))?;
        file.sync_all()
            .map_err(|e| format!("cannot sync {}: {e}", temp.display()))?;
        fs::rename(&temp, path).map_err(|e| {
            format!(
                "cannot rename {} to {}: {e}",
                temp.display(),
                path.display()
            )
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp); // best effort; the original error matters more
    }
    result
}

// ---------------------------------------------------------------------------
// Example grid
// ---------------------------------------------------------------------------

/// Cells are upscaled (nearest neighbour, integer factor) to at least this size.
const MIN_CELL_PX: usize = 128;
/// Width of the separator lines between (and around) cells.
const SEPARATOR_PX: usize = 2;
/// Height of the column-title strip above the first row.
const HEADER_PX: usize = 24;
const SEPARATOR_RGB: [u8; 3] = [48, 48, 48];
const HEADER_TEXT_RGB: RGBColor = RGBColor(235, 235, 235);

/// Slot colours for the segmentation column (Tableau 10, then lighter tab20
/// tones); slot `i` gets `SLOT_PALETTE[i % 16]`.
const SLOT_PALETTE: [[u8; 3]; 16] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
    [174, 199, 232],
    [255, 187, 120],
    [152, 223, 138],
    [255, 152, 150],
    [197, 176, 213],
    [247, 182, 210],
];

/// Maps a value in [-1, 1] to a byte; out-of-range values are clamped, NaN gives 0.
fn signed_unit_to_u8(value: f32) -> u8 {
    ((value.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
}

/// Maps a value in [0, 1] to a byte; out-of-range values are clamped, NaN gives 0.
fn unit_to_u8(value: f32) -> u8 {
    (value.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Grid geometry shared by drawing and tests.
struct GridLayout {
    scale: usize,
    cell: usize,
    width: usize,
    height: usize,
}

impl GridLayout {
    fn new(n: usize, k: usize, res: usize) -> Self {
        let scale = MIN_CELL_PX.div_ceil(res).max(1);
        let cell = res * scale;
        let columns = k + 3; // input, reconstruction, K slots, segmentation
        GridLayout {
            scale,
            cell,
            width: columns * cell + (columns + 1) * SEPARATOR_PX,
            height: HEADER_PX + n * cell + (n + 1) * SEPARATOR_PX,
        }
    }

    /// Top-left pixel of the cell at (row, column).
    fn origin(&self, row: usize, column: usize) -> (usize, usize) {
        (
            SEPARATOR_PX + column * (self.cell + SEPARATOR_PX),
            HEADER_PX + SEPARATOR_PX + row * (self.cell + SEPARATOR_PX),
        )
    }
}

/// Writes a `res × res` picture, given as a per-pixel colour function, into the
/// grid cell at (row, column), upscaled by nearest neighbour.
fn paint_cell(
    canvas: &mut [u8],
    layout: &GridLayout,
    (row, column): (usize, usize),
    res: usize,
    colour_at: impl Fn(usize) -> [u8; 3],
) {
    let (x0, y0) = layout.origin(row, column);
    for y in 0..layout.cell {
        let source_row = (y / layout.scale) * res;
        let start = ((y0 + y) * layout.width + x0) * 3;
        let line = &mut canvas[start..start + layout.cell * 3];
        for (x, out) in line.chunks_exact_mut(3).enumerate() {
            out.copy_from_slice(&colour_at(source_row + x / layout.scale));
        }
    }
}

/// Draws one PNG with one row per example:
/// input | reconstruction | slot 0 … slot K-1 | segmentation.
///
/// - `images`, `recons`: `[n, res, res, 3]` in [-1, 1] (clamped).
/// - `slot_rgb`: `[n, k, res, res, 3]` in [-1, 1]; `masks`: `[n, k, res, res]` in [0, 1].
/// - A slot cell shows `rgb * mask + white * (1 - mask)`, so an unused slot is white.
/// - The segmentation cell colours each pixel by its argmax slot (fixed palette,
///   repeating after 16 slots); the swatch in each slot's title shows its colour.
///
/// Cells are upscaled by nearest neighbour to at least 128 px, separated by 2-px
/// dark lines, under a 24-px strip of column titles. The file is written
/// atomically and missing parent directories are created.
#[allow(clippy::too_many_arguments)] // mirrors the tensors the trainer holds
pub fn example_grid(
    path: &Path,
    images: &[f32],
    recons: &[f32],
    slot_rgb: &[f32],
    masks: &[f32],
    n: usize,
    k: usize,
    res: usize,
) -> Result<(), String> {
    if n == 0 || k == 0 || res == 0 {
        return Err(format!(
            "example_grid: n, k and res must be > 0 (got n={n}, k={k}, res={res})"
        ));
    }
    let pixels = res * res;
    for (name, len, expected) in [
        ("images", images.len(), n * pixels * 3),
        ("recons", recons.len(), n * pixels * 3),
        ("slot_rgb", slot_rgb.len(), n * k * pixels * 3),
        ("masks", masks.len(), n * k * pixels),
    ] {
        if len != expected {
            return Err(format!(
                "example_grid: {name} has {len} values, expected {expected} for n={n}, k={k}, res={res}"
            ));
        }
    }
    ensure_font()?;

    let layout = GridLayout::new(n, k, res);
    let mut canvas = SEPARATOR_RGB.repeat(layout.width * layout.height);
    let rgb_at = |data: &[f32], base: usize, p: usize| {
        let i = base + p * 3;
        [
            signed_unit_to_u8(data[i]),
            signed_unit_to_u8(data[i + 1]),
            signed_unit_to_u8(data[i + 2]),
        ]
    };

    for row in 0..n {
        let image_base = row * pixels * 3;
        paint_cell(&mut canvas, &layout, (row, 0), res, |p| {
            rgb_at(images, image_base, p)
        });
        paint_cell(&mut canvas, &layout, (row, 1), res, |p| {
            rgb_at(recons, image_base, p)
        });

        let row_masks = &masks[row * k * pixels..(row + 1) * k * pixels];
        for slot in 0..k {
            let rgb_base = (row * k + slot) * pixels * 3;
            let mask = &row_masks[slot * pixels..(slot + 1) * pixels];
            paint_cell(&mut canvas, &layout, (row, 2 + slot), res, |p| {
                // Composite over white in [0, 1] space so empty slots look white.
                let alpha = if mask[p].is_nan() {
                    0.0
                } else {
                    mask[p].clamp(0.0, 1.0)
                };
                let i = rgb_base + p * 3;
                std::array::from_fn(|c| {
                    let colour = (slot_rgb[i + c].clamp(-1.0, 1.0) + 1.0) * 0.5;
                    unit_to_u8(colour * alpha + (1.0 - alpha))
                })
            });
        }

        let segmentation = crate::metrics::argmax_segmentation(row_masks, k, pixels);
        paint_cell(&mut canvas, &layout, (row, k + 2), res, |p| {
            SLOT_PALETTE[usize::from(segmentation[p]) % SLOT_PALETTE.len()]
        });
    }

    draw_grid_titles(&mut canvas, &layout, k)?;
    write_png_atomically(path, layout.width as u32, layout.height as u32, &canvas)
}

/// Column titles in the header strip; slot titles carry their segmentation colour.
fn draw_grid_titles(canvas: &mut [u8], layout: &GridLayout, k: usize) -> Result<(), String> {
    let size = (layout.width as u32, layout.height as u32);
    let root = BitMapBackend::with_buffer(canvas, size).into_drawing_area();
    let font = (FONT_FAMILY, 15).into_font().color(&HEADER_TEXT_RGB);
    let centred = font.pos(Pos::new(HPos::Center, VPos::Center));
    let err = |e: DrawingAreaErrorKind<_>| format!("example_grid: drawing titles: {e}");
    // Centre of the dark strip above the first row (header + top separator),
    // nudged down because plotters' ab_glyph layout places glyphs ~3 px high.
    let middle_y = ((HEADER_PX + SEPARATOR_PX) / 2) as i32;
    let text_y = middle_y + 3;
    let centre_x = |column: usize| (layout.origin(0, column).0 + layout.cell / 2) as i32;

    for (column, title) in [(0, "input"), (1, "reconstruction"), (k + 2, "segmentation")] {
        root.draw(&Text::new(title, (centre_x(column), text_y), &centred))
            .map_err(err)?;
    }
    const SWATCH_PX: i32 = 10;
    for slot in 0..k {
        let title = format!("slot {slot}");
        let text_width = root.estimate_text_size(&title, &font).map_err(err)?.0 as i32;
        // Centre "swatch + gap + text" as one unit.
        let left = centre_x(2 + slot) - (SWATCH_PX + 5 + text_width) / 2;
        let [r, g, b] = SLOT_PALETTE[slot % SLOT_PALETTE.len()];
        let top = middle_y - SWATCH_PX / 2;
        root.draw(&Rectangle::new(
            [(left, top), (left + SWATCH_PX, top + SWATCH_PX)],
            RGBColor(r, g, b).filled(),
        ))
        .map_err(err)?;
        let left_aligned = font.pos(Pos::new(HPos::Left, VPos::Center));
        root.draw(&Text::new(
            title,
            (left + SWATCH_PX + 5, text_y),
            &left_aligned,
        ))
        .map_err(err)?;
    }
    root.present().map_err(err)
}

// ---------------------------------------------------------------------------
// Training curves
// ---------------------------------------------------------------------------

/// Size of the curves PNG.
pub const PLOT_SIZE: (u32, u32) = (1000, 400);

/// Points read from a metrics JSON-lines file, each sorted by step.
#[derive(Debug, Default)]
struct Curves {
    loss: Vec<(f64, f64)>,
    eval_mse: Vec<(f64, f64)>,
    fg_ari: Vec<(f64, f64)>,
}

impl Curves {
    fn is_empty(&self) -> bool {
        self.loss.is_empty() && self.eval_mse.is_empty() && self.fg_ari.is_empty()
    }
}

/// Reads `step` plus any of `loss`, `eval_mse`, `fg_ari` from each line.
/// Lines that are not JSON objects with a numeric `step` are skipped, as are
/// non-finite values and non-positive losses (they cannot go on a log axis).
fn read_curves(path: &Path) -> Result<Curves, String> {
    let text = fs::read_to_string(path)
        .map_err(|e| format!("cannot read metrics file {}: {e}", path.display()))?;
    let mut curves = Curves::default();
    for line in text.lines() {
        let Ok(serde_json::Value::Object(record)) = serde_json::from_str(line) else {
            continue;
        };
        let Some(step) = record.get("step").and_then(|v| v.as_f64()) else {
            continue;
        };
        let value = |key: &str| {
            record
                .get(key)
                .and_then(|v| v.as_f64())
                .filter(|v| v.is_finite())
        };
        if let Some(loss) = value("loss").filter(|&v| v > 0.0) {
            curves.loss.push((step, loss));
        }
        if let Some(mse) = value("eval_mse").filter(|&v| v > 0.0) {
            curves.eval_mse.push((step, mse));
        }
        if let Some(ari) = value("fg_ari") {
            curves.fg_ari.push((step, ari));
        }
    }
    // Resumed runs can append out of order; lines must go left to right.
    for series in [&mut curves.loss, &mut curves.eval_mse, &mut curves.fg_ari] {
        series.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Ok(curves)
}

/// Draws `PLOT_SIZE` PNG with two panels from a JSON-lines metrics file:
/// - left: training `loss` (and `eval_mse` when logged) against step, log y axis;
/// - right: `fg_ari` against step, y axis 0..1 (the fraction returned by
///   [`crate::metrics::fg_ari`], widened only if a value falls outside).
///
/// Each line should be an object with `step` and any of `loss`, `lr`, `fg_ari`,
/// `eval_mse` (`lr` is accepted but not drawn). Unparsable lines, lines without
/// a numeric `step`, non-finite values and losses <= 0 (no place on a log axis)
/// are skipped. A panel whose series is absent says so instead of a chart.
/// Fails if the file cannot be read or holds no plottable point. The PNG is
/// written atomically; missing parent directories are created.
pub fn plot_curves(metrics_jsonl: &Path, out_png: &Path) -> Result<(), String> {
    let curves = read_curves(metrics_jsonl)?;
    if curves.is_empty() {
        return Err(format!(
            "no plottable points (step with loss, eval_mse or fg_ari) in {}",
            metrics_jsonl.display()
        ));
    }
    ensure_font()?;

    let (width, height) = PLOT_SIZE;
    let mut canvas = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut canvas, PLOT_SIZE).into_drawing_area();
        let panels = root.split_evenly((1, 2));
        draw_loss_panel(&panels[0], &curves)
            .map_err(|e| format!("plot_curves: loss panel: {e}"))?;
        draw_ari_panel(&panels[1], &curves)
            .map_err(|e| format!("plot_curves: FG-ARI panel: {e}"))?;
        root.present().map_err(|e| format!("plot_curves: {e}"))?;
    }
    write_png_atomically(out_png, width, height, &canvas)
}

type Panel<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type DrawResult = Result<(), String>;

/// Plotters' error types only need to survive as text in our messages.
fn text<E: std::fmt::Display>(error: E) -> String {
    error.to_string()
}

const LOSS_COLOUR: RGBColor = RGBColor(31, 119, 180);
const LOSS_RAW_COLOUR: RGBColor = RGBColor(174, 199, 232);
const LIGHT_GRID: RGBColor = RGBColor(238, 238, 238);
const BOLD_GRID: RGBColor = RGBColor(205, 205, 205);
const EVAL_COLOUR: RGBColor = RGBColor(255, 127, 14);
const ARI_COLOUR: RGBColor = RGBColor(44, 160, 44);
const CAPTION_SIZE: u32 = 20;
const LABEL_SIZE: u32 = 14;

/// Step range over some series. A single step gets a window of about one order
/// of magnitude below it (e.g. 5000 -> 4000..6000) so the ticks stay distinct.
fn step_range<'a>(series: impl IntoIterator<Item = &'a (f64, f64)>) -> (f64, f64) {
    let (lo, hi) = series
        .into_iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(s, _)| {
            (lo.min(s), hi.max(s))
        });
    if lo < hi {
        return (lo, hi);
    }
    let pad = if lo.abs() >= 1.0 {
        10f64.powf(lo.abs().log10().floor())
    } else {
        1.0
    };
    let start = if lo >= 0.0 {
        (lo - pad).max(0.0)
    } else {
        lo - pad
    };
    (start, hi + pad)
}

/// Short step labels that stay exact: 1200 -> "1.2k", 250000 -> "250k",
/// 1.5e6 -> "1.5M", but 100050 -> "100050" rather than a rounded "100k".
fn format_step(step: &f64) -> String {
    let value = *step;
    let is_whole = |x: f64| (x - x.round()).abs() < 1e-6 * x.abs().max(1.0);
    let one_decimal = |x: f64| {
        let s = format!("{x:.1}");
        s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
    };
    let magnitude = value.abs();
    if magnitude >= 1e6 && is_whole(value / 1e5) {
        format!("{}M", one_decimal(value / 1e6))
    } else if magnitude >= 1e3 && is_whole(value / 1e2) {
        format!("{}k", one_decimal(value / 1e3))
    } else if is_whole(value) {
        format!("{value:.0}")
    } else {
        let s = format!("{value:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Log-axis labels: plain decimals in a readable range, scientific outside it.
fn format_log_value(value: &f64) -> String {
    let magnitude = value.abs();
    if (1e-3..1e4).contains(&magnitude) {
        let s = format!("{value:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{value:.0e}")
    }
}

/// Caption plus a centred note, for a panel whose series was never logged.
fn draw_empty_panel(panel: &Panel, caption: &str, note: &str) -> DrawResult {
    // Same top margin as the charts, so captions line up across panels.
    let titled = panel
        .margin(10, 0, 0, 0)
        .titled(caption, (FONT_FAMILY, CAPTION_SIZE))
        .map_err(text)?;
    let (w, h) = titled.dim_in_pixel();
    let style = (FONT_FAMILY, 16)
        .into_font()
        .color(&RGBColor(120, 120, 120))
        .pos(Pos::new(HPos::Center, VPos::Center));
    titled
        .draw(&Text::new(note, (w as i32 / 2, h as i32 / 2), &style))
        .map_err(text)
}

/// Rounds outward to one significant digit (e.g. 0.0437 -> 0.04 down, 0.05 up),
/// so a log axis always starts and ends on a labelled 1..9 × 10^e value.
fn snap_one_digit(value: f64, up: bool) -> f64 {
    let decade = 10f64.powf(value.log10().floor());
    let digit = value / decade;
    // The epsilon keeps exact values like 0.05 from moving a whole digit.
    let digit = if up {
        (digit - 1e-9).ceil()
    } else {
        (digit + 1e-9).floor()
    };
    digit * decade
}

/// Tick values for a log axis over `[lo, hi]` (both one-digit values): bold
/// labelled ticks from the finest of 1..9 / 1-2-5 / 1-3 / 1 per decade that
/// gives at most 8 labels (every n-th decade beyond that), light lines at 1..9.
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let first = lo.log10().floor() as i32;
    let last = hi.log10().ceil() as i32;
    let in_range = |v: &f64| *v >= lo * (1.0 - 1e-9) && *v <= hi * (1.0 + 1e-9);
    let ticks = |multipliers: &[f64], decade_stride: usize| -> Vec<f64> {
        (first..=last)
            .step_by(decade_stride)
            .flat_map(|e| multipliers.iter().map(move |m| m * 10f64.powi(e)))
            .filter(in_range)
            .collect()
    };
    const ALL: [f64; 9] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
    let light = ticks(&ALL, 1);
    let candidates: [&[f64]; 4] = [&ALL, &[1.0, 2.0, 5.0], &[1.0, 3.0], &[1.0]];
    let bold = candidates
        .iter()
        .map(|m| ticks(m, 1))
        .find(|t| t.len() <= 8)
        .unwrap_or_else(|| {
            let decades = (last - first) as usize;
            ticks(&[1.0], decades.div_ceil(8).max(1))
        });
    let light = light.into_iter().filter(|v| !bold.contains(v)).collect();
    (bold, light)
}

/// Below this many loss points no smoothed trend is drawn.
const SMOOTH_MIN_POINTS: usize = 100;

/// Centred moving average in log space (a geometric mean), so the trend of a
/// noisy loss reads clearly on a log axis. Window: about 1/50 of the points.
fn smooth_log(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let half = points.len() / (2 * 50);
    if half == 0 {
        return points.to_vec();
    }
    let mut prefix = Vec::with_capacity(points.len() + 1);
    prefix.push(0.0);
    for &(_, v) in points {
        prefix.push(prefix.last().unwrap() + v.ln());
    }
    (0..points.len())
        .map(|i| {
            let (a, b) = (i.saturating_sub(half), (i + half + 1).min(points.len()));
            (
                points[i].0,
                ((prefix[b] - prefix[a]) / (b - a) as f64).exp(),
            )
        })
        .collect()
}

fn draw_loss_panel(panel: &Panel, curves: &Curves) -> DrawResult {
    const CAPTION: &str = "Reconstruction loss";
    if curves.loss.is_empty() && curves.eval_mse.is_empty() {
        return draw_empty_panel(panel, CAPTION, "no \"loss\" values logged yet");
    }
    let (x_lo, x_hi) = step_range(curves.loss.iter().chain(&curves.eval_mse));
    let (y_min, y_max) = curves
        .loss
        .iter()
        .chain(&curves.eval_mse)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, v)| {
            (lo.min(v), hi.max(v))
        });
    // A little headroom, then out to labelled values at both ends.
    let y_lo = snap_one_digit(y_min / 1.05, false);
    let y_hi = snap_one_digit(y_max * 1.05, true);
    let (bold_ticks, light_ticks) = log_ticks(y_lo, y_hi);

    let mut chart = ChartBuilder::on(panel)
        .caption(CAPTION, (FONT_FAMILY, CAPTION_SIZE))
        .margin(10)
        .margin_right(24) // room for the last step label
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            x_lo..x_hi,
            (y_lo..y_hi)
                .log_scale()
                .with_key_points(bold_ticks)
                .with_light_points(light_ticks),
        )
        .map_err(text)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss (log scale)")
        .x_label_formatter(&format_step)
        .y_label_formatter(&format_log_value)
        .x_max_light_lines(4)
        .label_style((FONT_FAMILY, LABEL_SIZE))
        .axis_desc_style((FONT_FAMILY, LABEL_SIZE + 1))
        .light_line_style(LIGHT_GRID)
        .bold_line_style(BOLD_GRID)
        .draw()
        .map_err(text)?;

    if !curves.loss.is_empty() {
        // Long noisy runs: raw values faint, the smoothed trend on top.
        // Short ones: the raw line itself in full colour, with markers so even
        // a single point shows.
        let smoothed = curves.loss.len() >= SMOOTH_MIN_POINTS;
        let raw_style = if smoothed {
            LOSS_RAW_COLOUR.stroke_width(1)
        } else {
            LOSS_COLOUR.stroke_width(2)
        };
        chart
            .draw_series(LineSeries::new(curves.loss.iter().copied(), raw_style))
            .map_err(text)?
            .label("train loss")
            // Legend swatch always 2 px wide so the faint colour stays visible.
            .legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 18, y)], raw_style.stroke_width(2))
            });
        if smoothed {
            chart
                .draw_series(LineSeries::new(
                    smooth_log(&curves.loss),
                    LOSS_COLOUR.stroke_width(2),
                ))
                .map_err(text)?
                .label("train loss, smoothed")
                .legend(|(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], LOSS_COLOUR.stroke_width(2))
                });
        } else if curves.loss.len() <= 50 {
            chart
                .draw_series(
                    curves
                        .loss
                        .iter()
                        .map(|&p| Circle::new(p, 3, LOSS_COLOUR.filled())),
                )
                .map_err(text)?;
        }
    }
    if !curves.eval_mse.is_empty() {
        chart
            .draw_series(LineSeries::new(
                curves.eval_mse.iter().copied(),
                EVAL_COLOUR.stroke_width(2),
            ))
            .map_err(text)?
            .label("eval MSE")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], EVAL_COLOUR.stroke_width(2)));
        chart
            .draw_series(
                curves
                    .eval_mse
                    .iter()
                    .map(|&p| Circle::new(p, 3, EVAL_COLOUR.filled())),
            )
            .map_err(text)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT_FAMILY, LABEL_SIZE))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .draw()
        .map_err(text)
}

fn draw_ari_panel(panel: &Panel, curves: &Curves) -> DrawResult {
    const CAPTION: &str = "Foreground ARI (eval)";
    if curves.fg_ari.is_empty() {
        return draw_empty_panel(panel, CAPTION, "no \"fg_ari\" values logged yet");
    }
    let (x_lo, x_hi) = step_range(&curves.fg_ari);
    // The score is a fraction; keep 0..1 fixed so runs compare at a glance, and
    // widen only for values outside it (ARI can dip below 0).
    let (y_lo, y_hi) = curves
        .fg_ari
        .iter()
        .fold((0.0f64, 1.0f64), |(lo, hi), &(_, v)| (lo.min(v), hi.max(v)));

    let mut chart = ChartBuilder::on(panel)
        .caption(CAPTION, (FONT_FAMILY, CAPTION_SIZE))
        .margin(10)
        .margin_right(24) // room for the last step label
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
        .map_err(text)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("FG-ARI (0 to 1)")
        .x_label_formatter(&format_step)
        .y_label_formatter(&|v| format!("{v:.1}"))
        .x_max_light_lines(4)
        .y_max_light_lines(1)
        .label_style((FONT_FAMILY, LABEL_SIZE))
        .axis_desc_style((FONT_FAMILY, LABEL_SIZE + 1))
        .light_line_style(LIGHT_GRID)
        .bold_line_style(BOLD_GRID)
        .draw()
        .map_err(text)?;
    chart
        .draw_series(LineSeries::new(
            curves.fg_ari.iter().copied(),
            ARI_COLOUR.stroke_width(2),
        ))
        .map_err(text)?;
    // Markers: eval points are sparse, and a single point draws no line.
    chart
        .draw_series(
            curves
                .fg_ari
                .iter()
                .map(|&p| Circle::new(p, 3, ARI_COLOUR.filled())),
        )
        .map_err(text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_png(path: &Path) -> image::RgbImage {
        image::open(path).expect("readable PNG").to_rgb8()
    }

    #[test]
    fn grid_has_expected_size_and_pixels() {
        let (n, k, res) = (2usize, 3usize, 35usize);
        let pixels = res * res;
        // Input: a solid colour per example; recon: mid grey.
        let input_colour = [[-1.0f32, 0.0, 1.0], [0.5, -0.5, 0.25]];
        let images: Vec<f32> = (0..n)
            .flat_map(|i| input_colour[i].repeat(pixels))
            .collect();
        let recons = vec![0.0f32; n * pixels * 3];
        let slot_rgb = vec![-1.0f32; n * k * pixels * 3]; // black slots
                                                          // Slot 1 owns every pixel with alpha 1; slots 0 and 2 are empty.
        let mut masks = vec![0.0f32; n * k * pixels];
        for i in 0..n {
            let start = (i * k + 1) * pixels;
            masks[start..start + pixels].fill(1.0);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/grid.png");
        example_grid(&path, &images, &recons, &slot_rgb, &masks, n, k, res).unwrap();

        let png = read_png(&path);
        // res 35 -> x4 -> 140-px cells; 6 columns, 2 rows, 2-px separators, 24-px header.
        assert_eq!(png.width(), 6 * 140 + 7 * 2);
        assert_eq!(png.height(), 24 + 2 * 140 + 3 * 2);
        let layout = GridLayout::new(n, k, res);
        assert_eq!(
            (layout.width as u32, layout.height as u32),
            png.dimensions()
        );

        let pixel = |row: usize, column: usize, dx: usize, dy: usize| {
            let (x, y) = layout.origin(row, column);
            png.get_pixel((x + dx) as u32, (y + dy) as u32).0
        };
        assert_eq!(pixel(0, 0, 0, 0), [0, 128, 255]); // input top-left
        assert_eq!(pixel(1, 0, 139, 139), [191, 64, 159]); // input bottom-right
        assert_eq!(pixel(0, 1, 0, 0), [128, 128, 128]); // recon
        assert_eq!(pixel(0, 2, 5, 5), [255, 255, 255]); // empty slot is white
        assert_eq!(pixel(0, 3, 5, 5), [0, 0, 0]); // owned slot shows its rgb
        assert_eq!(pixel(1, 5, 70, 70), SLOT_PALETTE[1]); // segmentation = slot 1
        assert_eq!(png.get_pixel(0, 30).0, SEPARATOR_RGB); // left border
                                                           // No temp files are left behind.
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }

    #[test]
    fn grid_rejects_wrong_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        let err = example_grid(&path, &[0.0; 10], &[0.0; 10], &[], &[], 1, 1, 2).unwrap_err();
        assert!(err.contains("images"), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn plot_writes_png_of_stated_size() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.jsonl");
        let mut lines = String::new();
        for step in (0..=2000).step_by(100) {
            let loss = 0.1 * (-(step as f64) / 800.0).exp() + 0.002;
            lines.push_str(&format!(
                "{{\"step\": {step}, \"loss\": {loss}, \"lr\": 0.0004}}\n"
            ));
            if step % 500 == 0 {
                let ari = step as f64 / 2500.0;
                lines.push_str(&format!(
                    "{{\"step\": {step}, \"fg_ari\": {ari}, \"eval_mse\": {loss}}}\n"
                ));
            }
        }
        lines.push_str("not json\n{\"loss\": 1.0}\n[1, 2]\n\n{\"step\": 5, \"loss\": \"x\"}\n");
        fs::write(&metrics, lines).unwrap();
        let out = dir.path().join("curves.png");
        plot_curves(&metrics, &out).unwrap();
        assert_eq!(read_png(&out).dimensions(), PLOT_SIZE);
    }

    #[test]
    fn plot_with_only_loss_still_draws() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.jsonl");
        fs::write(&metrics, "{\"step\": 1, \"loss\": 0.5}\n").unwrap();
        let out = dir.path().join("curves.png");
        plot_curves(&metrics, &out).unwrap();
        assert_eq!(read_png(&out).dimensions(), PLOT_SIZE);
    }

    #[test]
    fn plot_errors_for_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("curves.png");
        let err = plot_curves(&dir.path().join("absent.jsonl"), &out).unwrap_err();
        assert!(err.contains("cannot read metrics file"), "{err}");
        assert!(!out.exists());
    }

    #[test]
    fn plot_errors_when_no_points() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.jsonl");
        fs::write(&metrics, "garbage\n{\"step\": 3}\n{\"lr\": 0.1}\n").unwrap();
        let out = dir.path().join("curves.png");
        let err = plot_curves(&metrics, &out).unwrap_err();
        assert!(err.contains("no plottable points"), "{err}");
        assert!(!out.exists());
    }

    #[test]
    fn log_axis_ticks_are_labelled_values() {
        assert_eq!(snap_one_digit(0.0437, false), 0.04);
        assert_eq!(snap_one_digit(0.0437, true), 0.05);
        assert_eq!(snap_one_digit(0.05, true), 0.05);
        // Narrow range: every digit is labelled.
        let (bold, light) = log_ticks(0.02, 0.05);
        assert_eq!(bold.len(), 4);
        assert!(light.is_empty());
        // Two decades: 1-2-5, the other digits as light lines.
        let (bold, light) = log_ticks(0.001, 0.06);
        let expected = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05];
        assert_eq!(bold.len(), expected.len());
        for (got, want) in bold.iter().zip(expected) {
            assert!((got / want - 1.0).abs() < 1e-9, "{got} vs {want}");
        }
        assert!(light.iter().all(|v| !bold.contains(v)));
        // Twelve decades: at most 8 labels.
        let (bold, _) = log_ticks(1e-9, 1e3);
        assert!((2..=8).contains(&bold.len()), "{bold:?}");
    }

    #[test]
    fn grid_palette_repeats_after_sixteen_slots() {
        let (n, k, res) = (1usize, 17usize, 4usize);
        let pixels = res * res;
        let mut masks = vec![0.0f32; k * pixels];
        masks[16 * pixels..].fill(1.0); // slot 16 owns everything
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        let rgb = vec![0.0f32; pixels * 3];
        let slot_rgb = vec![0.0f32; k * pixels * 3];
        example_grid(&path, &rgb, &rgb, &slot_rgb, &masks, n, k, res).unwrap();
        let layout = GridLayout::new(n, k, res);
        let (x, y) = layout.origin(0, k + 2);
        let png = read_png(&path);
        assert_eq!(png.get_pixel(x as u32, y as u32).0, SLOT_PALETTE[0]);
    }

    #[test]
    fn step_and_log_labels_are_short() {
        assert_eq!(format_step(&250.0), "250");
        assert_eq!(format_step(&1200.0), "1.2k");
        assert_eq!(format_step(&250_000.0), "250k");
        assert_eq!(format_step(&1_500_000.0), "1.5M");
        assert_eq!(format_step(&1_250_000.0), "1250k");
        assert_eq!(format_step(&100_050.0), "100050");
        assert_eq!(format_step(&0.5), "0.5");
        assert_eq!(step_range(&[(5000.0, 0.1)]), (4000.0, 6000.0));
        assert_eq!(step_range(&[(0.0, 0.1)]), (0.0, 1.0));
        assert_eq!(format_log_value(&0.05), "0.05");
        assert_eq!(format_log_value(&2.0), "2");
        assert_eq!(format_log_value(&0.0001), "1e-4");
    }
}
