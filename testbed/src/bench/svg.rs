//! A small SVG line-chart writer (no external tool): panels of log-x line charts, used for
//! the plot in docs/benchmarks.md.
use std::fmt::Write as _;

use super::Report;
use super::filters::Mode;

/// One line of a chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart.
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_y: bool,
    pub series: Vec<Series>,
}

const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#7f7f7f"];
const W: f64 = 460.0;
const H: f64 = 300.0;
const ML: f64 = 62.0;
const MR: f64 = 16.0;
const MT: f64 = 30.0;
const MB: f64 = 64.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn nice(v: f64) -> String {
    if v >= 1000.0 {
        let s = format!("{v:.0}");
        // thousands separators
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if v >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The first of 1, 2, 2.5, 5 (times a power of ten) not below `raw`.
fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].into_iter().map(|m| m * mag).find(|s| *s >= raw * 0.999).unwrap_or(10.0 * mag)
}

/// The fewest decimals that show every multiple of `step` exactly (0.25 -> 2, 0.5 -> 1).
fn decimals(step: f64) -> usize {
    (0..6)
        .find(|d| {
            let x = step * 10f64.powi(*d as i32);
            (x - x.round()).abs() < 1e-6
        })
        .unwrap_or(6)
}

/// Decades covering `lo..=hi`.
fn decades(lo: f64, hi: f64) -> (f64, f64) {
    (10f64.powf(lo.log10().floor()), 10f64.powf(hi.log10().ceil()))
}

fn panel(out: &mut String, p: &Panel, ox: f64, oy: f64) {
    let pts: Vec<(f64, f64)> = p
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite() && *x > 0.0)
        .collect();
    let _ = writeln!(out, "<g transform=\"translate({ox},{oy})\">");
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        W / 2.0,
        esc(&p.title)
    );
    if pts.is_empty() {
        let _ = writeln!(out, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no data</text></g>", W / 2.0, H / 2.0);
        return;
    }
    let (x0, x1) =
        decades(pts.iter().map(|p| p.0).fold(f64::MAX, f64::min), pts.iter().map(|p| p.0).fold(0.0, f64::max));
    let (ymin, ymax) =
        (pts.iter().map(|p| p.1).fold(f64::MAX, f64::min), pts.iter().map(|p| p.1).fold(f64::MIN, f64::max));
    let (y0, y1, step) = if p.log_y {
        let (a, b) = decades(ymin.max(1e-3), ymax.max(1e-3));
        (a, b, 0.0)
    } else {
        // Ratios: always show 1 (the baseline).
        let (lo, hi) = (ymin.min(1.0), ymax.max(1.0));
        let step = nice_step((hi - lo).max(0.05) / 5.0);
        ((lo / step).floor() * step, (hi / step).ceil() * step, step)
    };
    let pw = W - ML - MR;
    let ph = H - MT - MB;
    let sx = |x: f64| ML + (x.log10() - x0.log10()) / (x1.log10() - x0.log10()) * pw;
    let sy = |y: f64| {
        let f =
            if p.log_y { (y.max(1e-3).log10() - y0.log10()) / (y1.log10() - y0.log10()) } else { (y - y0) / (y1 - y0) };
        MT + ph - f * ph
    };
    let _ = writeln!(out, "<rect x=\"{ML}\" y=\"{MT}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#444\"/>");
    // x ticks: decades
    let mut x = x0;
    while x <= x1 * 1.0001 {
        let px = sx(x);
        let _ = writeln!(out, "<line x1=\"{px:.1}\" y1=\"{MT}\" x2=\"{px:.1}\" y2=\"{}\" stroke=\"#ddd\"/>", MT + ph);
        let _ = writeln!(
            out,
            "<text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{}</text>",
            MT + ph + 15.0,
            nice(x)
        );
        x *= 10.0;
    }
    // y ticks
    let yticks: Vec<f64> = if p.log_y {
        let mut v = Vec::new();
        let mut y = y0;
        while y <= y1 * 1.0001 {
            v.push(y);
            y *= 10.0;
        }
        v
    } else {
        let n = ((y1 - y0) / step).round() as usize;
        (0..=n).map(|i| y0 + step * i as f64).collect()
    };
    for y in yticks {
        let py = sy(y);
        let label = if p.log_y { nice(y) } else { format!("{y:.*}", decimals(step)) };
        let _ = writeln!(out, "<line x1=\"{ML}\" y1=\"{py:.1}\" x2=\"{}\" y2=\"{py:.1}\" stroke=\"#ddd\"/>", ML + pw);
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"11\">{label}</text>",
            ML - 4.0,
            py + 4.0,
        );
    }
    if !p.log_y && y0 < 1.0 && y1 > 1.0 {
        let py = sy(1.0);
        let _ = writeln!(
            out,
            "<line x1=\"{ML}\" y1=\"{py:.1}\" x2=\"{}\" y2=\"{py:.1}\" stroke=\"#000\" stroke-dasharray=\"4 3\"/>",
            ML + pw
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"12\">{}</text>",
        ML + pw / 2.0,
        MT + ph + 32.0,
        esc(&p.x_label)
    );
    let _ = writeln!(
        out,
        "<text transform=\"translate(14,{}) rotate(-90)\" text-anchor=\"middle\" font-size=\"12\">{}</text>",
        MT + ph / 2.0,
        esc(&p.y_label)
    );
    for (i, s) in p.series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ =
            writeln!(out, "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"/>", path.join(" "));
        for pt in &path {
            let (a, b) = pt.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(out, "<circle cx=\"{a}\" cy=\"{b}\" r=\"3\" fill=\"{c}\"/>");
        }
        let lx = ML + (i as f64 % 3.0) * (pw / 3.0);
        let ly = MT + ph + 46.0 + (i / 3) as f64 * 14.0;
        let _ = writeln!(out, "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"12\" height=\"3\" fill=\"{c}\"/>", ly - 4.0);
        let _ = writeln!(out, "<text x=\"{:.1}\" y=\"{ly:.1}\" font-size=\"11\">{}</text>", lx + 16.0, esc(&s.name));
    }
    let _ = writeln!(out, "</g>");
}

/// Panels in a grid of `cols` columns, with a caption line at the bottom.
pub fn render(panels: &[Panel], cols: usize, caption: &str) -> String {
    let rows = panels.len().div_ceil(cols);
    let (tw, th) = (W * cols as f64, H * rows as f64 + 24.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{tw}\" height=\"{th}\" viewBox=\"0 0 {tw} {th}\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (i, p) in panels.iter().enumerate() {
        panel(&mut out, p, (i % cols) as f64 * W, (i / cols) as f64 * H);
    }
    let _ = writeln!(out, "<text x=\"8\" y=\"{}\" font-size=\"11\" fill=\"#444\">{}</text>", th - 8.0, esc(caption));
    out.push_str("</svg>\n");
    out
}

/// The plot of a report: datapath ratios against rule count, resolution time and memory
/// against identities.
pub fn report_plot(r: &Report) -> String {
    let modes = [Mode::Palisade, Mode::Iptables, Mode::IptablesNft, Mode::Nftables];
    let ratio_panel = |title: &str, metric: &str| Panel {
        title: title.into(),
        x_label: "rules (peers), log scale".into(),
        y_label: "ratio to no filter".into(),
        log_y: false,
        series: modes
            .iter()
            .map(|m| Series {
                name: m.name().replace('_', "-"),
                points: super::datapath::SIZES
                    .iter()
                    .filter_map(|n| Some((*n as f64, r.get(&format!("datapath.{}.n{n}.{metric}_ratio", m.name()))?)))
                    .collect(),
            })
            .collect(),
    };
    let ks: Vec<f64> = {
        let mut v: Vec<f64> = r
            .figures
            .iter()
            .filter_map(|f| f.name.strip_prefix("control.resolve.k")?.strip_suffix("_ms")?.parse().ok())
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let curve = |metric: &str| -> Vec<(f64, f64)> {
        ks.iter().filter_map(|k| Some((*k, r.get(&format!("control.resolve.k{k}_{metric}"))?))).collect()
    };
    let curve_panel = |title: &str, y_label: &str, metric: &str| Panel {
        title: title.into(),
        x_label: "identities, log scale".into(),
        y_label: y_label.into(),
        log_y: true,
        series: vec![Series { name: "100 endpoints, 100 policies".into(), points: curve(metric) }],
    };
    let panels = vec![
        ratio_panel("TCP connect-request-close p50", "tcp_crr_p50"),
        ratio_panel("UDP request/response p50", "udp_rr_p50"),
        ratio_panel("UDP stream packets/s (below 1: fewer)", "udp_stream_pps"),
        curve_panel("Full resolution time", "ms, log scale", "ms"),
        curve_panel("Resolution memory", "MiB (peak RSS growth), log scale", "rss_mib"),
        curve_panel("Policy entries resolved", "entries, log scale", "entries"),
    ];
    let caption = format!(
        "palisade-bench ({:?} run), {} CPUs ({}), kernel {}, load average {} .. {}",
        r.size, r.machine.nproc, r.machine.cpu, r.machine.kernel, r.machine.loadavg_start, r.machine.loadavg_end
    );
    render(&panels, 3, &caption)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_well_formed_chart() {
        let p = Panel {
            title: "t <1>".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            log_y: false,
            series: vec![Series { name: "a".into(), points: vec![(10.0, 1.0), (1000.0, 2.5), (10000.0, 0.9)] }],
        };
        let s = render(&[p], 1, "c");
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert!(s.contains("t &lt;1&gt;"));
        assert_eq!(s.matches("<circle").count(), 3);
        assert_eq!(s.matches("<g ").count(), s.matches("</g>").count());
        // 0.9 .. 2.5 in steps of 0.5 from 0.5 to 2.5, the baseline dashed at 1.
        assert!(s.contains(">0.5</text>") && s.contains(">1.0</text>") && s.contains(">2.5</text>"), "{s}");
        assert!(s.contains("stroke-dasharray"));
        assert_eq!((decimals(0.025), decimals(0.25), decimals(0.5), decimals(2.0)), (3, 2, 1, 0));
    }
}
