//! Results: one row per measurement, written as markdown tables, CSV, and a
//! small SVG bar chart per workload (no plotting dependency).

use std::fmt::Write as _;

#[derive(Debug, Clone, Default)]
pub struct Row {
    pub workload: &'static str,
    pub target: String,
    /// Devices (idle, p2p), group size (fanout) or backend connections (ingest).
    pub param: u64,
    pub messages: u64,
    /// p2p: the paced send rate, msg/s; none: as fast as acknowledgements allow.
    pub offered: Option<f64>,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub secs: f64,
    pub rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// p2p: send → queued on the device's socket by the kernel (the server's
    /// part, without the tool's devices waiting for a core to read it).
    pub sock_p50_ms: Option<f64>,
    pub sock_p99_ms: Option<f64>,
    pub sock_max_ms: Option<f64>,
    /// Fan-out: time from send until the last device had it, per push.
    pub last_p50_ms: Option<f64>,
    pub last_max_ms: Option<f64>,
    pub cpu_secs: Option<f64>,
    /// The kernel's part of `cpu_secs` (p2p).
    pub sys_cpu_secs: Option<f64>,
    /// This tool's own CPU time over the same span: it shares the cores.
    pub tool_cpu_secs: Option<f64>,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    /// core: seconds to attach the sessions.
    pub setup_secs: Option<f64>,
    /// core: heap bytes per session (glibc in-use delta / sessions) after attaching.
    pub heap_per_item: Option<f64>,
    /// core: the same after one message to each session.
    pub heap_per_item_warm: Option<f64>,
    /// core: RSS delta per session after one message to each.
    pub rss_per_item: Option<f64>,
    pub note: String,
}

impl Row {
    pub fn rss_per_conn_kib(&self) -> Option<f64> {
        self.rss_growth_kib_per_param("idle")
    }

    /// p2p: RSS the run left per device, in bytes (the devices stay
    /// connected): what a device that was sent pushes keeps beyond an idle one.
    pub fn rss_kept_per_device(&self) -> Option<f64> {
        self.rss_growth_kib_per_param("p2p").map(|k| k * 1024.0)
    }

    /// (RSS after − RSS before) / `param`, for rows of `workload`.
    fn rss_growth_kib_per_param(&self, workload: &str) -> Option<f64> {
        if self.workload != workload {
            return None;
        }
        let (a, b) = (self.rss_before_kib?, self.rss_after_kib?);
        (self.param > 0).then(|| (b as f64 - a as f64) / self.param as f64)
    }

    /// core: ns of this thread's CPU per publish.
    pub fn cpu_ns_per_op(&self) -> Option<f64> {
        (self.messages > 0).then(|| self.cpu_secs.map(|c| c * 1e9 / self.messages as f64))?
    }

    pub fn cpu_us_per_msg(&self) -> Option<f64> {
        self.per_msg_us(self.cpu_secs)
    }

    pub fn sys_us_per_msg(&self) -> Option<f64> {
        self.per_msg_us(self.sys_cpu_secs)
    }

    fn per_msg_us(&self, secs: Option<f64>) -> Option<f64> {
        (self.delivered > 0).then(|| secs.map(|c| c * 1e6 / self.delivered as f64))?
    }
}

/// Nearest-rank percentile of nanosecond samples, in ms.
pub fn percentile_ms(sorted: &[u64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1] as f64 / 1e6)
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
        None => "–".into(),
    }
}

fn num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn mib(v: Option<u64>) -> String {
    v.map_or("–".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

pub const WORKLOADS: [&str; 6] = ["idle", "p2p", "fanout", "ingest", "core", "apns"];

pub fn title(workload: &str) -> &'static str {
    match workload {
        "idle" => "idle: devices connected and subscribed, server memory",
        "p2p" => "p2p: pushes to random connected users (QoS 1)",
        "fanout" => "fanout: one push to a group, until the last device has it",
        "core" => "core: in-process routing, publish to one of S exact-topic sessions (no sockets)",
        "apns" => "apns: notifications/s to the local HTTP/2 TLS APNs, pushbridge vs h2load",
        _ => "ingest: frames accepted by the proxy (no devices)",
    }
}

/// The value runs are ranked by (the one each chart shows).
fn rank(r: &Row) -> f64 {
    metric(r.workload).1(r).unwrap_or(0.0)
}

/// One row per measurement (workload, target, parameter, rate): the median
/// run by the workload's metric, noting the range and any run with loss.
pub fn medians(rows: &[Row]) -> Vec<Row> {
    type Key = (&'static str, String, u64, Option<u64>);
    let key = |r: &Row| -> Key {
        (
            r.workload,
            r.target.clone(),
            r.param,
            r.offered.map(|o| o as u64),
        )
    };
    let mut keys: Vec<Key> = Vec::new();
    for r in rows {
        if !keys.contains(&key(r)) {
            keys.push(key(r));
        }
    }
    keys.into_iter()
        .map(|k| {
            let mut runs: Vec<&Row> = rows.iter().filter(|r| key(r) == k).collect();
            if runs.len() == 1 {
                return runs[0].clone();
            }
            runs.sort_by(|a, b| rank(a).total_cmp(&rank(b)));
            let mut m = runs[runs.len() / 2].clone();
            let lossy = runs.iter().filter(|r| r.lost > 0).count();
            let (lo, hi) = (rank(runs[0]), rank(runs[runs.len() - 1]));
            let fmt = |v: f64| {
                if v >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.1}")
                }
            };
            let mut note = format!("median of {}; range {}–{}", runs.len(), fmt(lo), fmt(hi));
            if lossy > 0 {
                note.push_str(&format!("; loss in {lossy} runs"));
                m.lost = m.lost.max(1);
            }
            if !m.note.is_empty() {
                note = format!("{}; {note}", m.note);
            }
            m.note = note;
            m
        })
        .collect()
}

/// A markdown table per workload present in `rows`.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::new();
    for w in WORKLOADS {
        let rows: Vec<&Row> = rows.iter().filter(|r| r.workload == w).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(out, "### {}\n", title(w));
        if w == "core" {
            core_table(&mut out, &rows);
            continue;
        }
        if w == "apns" {
            apns_table(&mut out, &rows);
            continue;
        }
        let (head, cells): (&str, fn(&Row) -> String) = match w {
            "idle" => (
                "| target | devices | connected | connect s | RSS before MiB | RSS after MiB | RSS/conn KiB | server CPU s | note |\n|---|--:|--:|--:|--:|--:|--:|--:|---|",
                |r| format!(
                    "| {} | {} | {} | {:.2} | {} | {} | {} | {} | {} |",
                    r.target, r.param, r.delivered, r.secs, mib(r.rss_before_kib), mib(r.rss_after_kib),
                    opt(r.rss_per_conn_kib(), 1), opt(r.cpu_secs, 2), r.note
                ),
            ),
            "p2p" => (
                "| target | devices | offered msg/s | pushes | delivered | lost | msg/s | p50 ms | p99 ms | max ms | at socket p50 / p99 / max ms | server CPU s | CPU µs/msg | of it kernel | bench CPU s | RSS MiB | RSS kept B/device | note |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
                |r| format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.target, r.param, r.offered.map_or("max".into(), num), r.messages, r.delivered, r.lost, num(r.rate), ms(r.p50_ms), ms(r.p99_ms),
                    ms(r.max_ms), ms(r.sock_p50_ms), ms(r.sock_p99_ms), ms(r.sock_max_ms), opt(r.cpu_secs, 2), opt(r.cpu_us_per_msg(), 1), opt(r.sys_us_per_msg(), 1), opt(r.tool_cpu_secs, 2), mib(r.rss_after_kib), opt(r.rss_kept_per_device(), 0), r.note
                ),
            ),
            "fanout" => (
                "| target | group size | pushes | deliveries | lost | to last p50 ms | to last max ms | latency p50 ms | p99 ms | deliveries/s | server CPU s | bench CPU s | RSS MiB | note |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
                |r| format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.target, r.param, r.messages, r.delivered, r.lost, ms(r.last_p50_ms), ms(r.last_max_ms),
                    ms(r.p50_ms), ms(r.p99_ms), num(r.rate), opt(r.cpu_secs, 2), opt(r.tool_cpu_secs, 2), mib(r.rss_after_kib), r.note
                ),
            ),
            _ => (
                "| target | backend conns | frames | accepted | refused/lost | frames/s | ack p50 ms | ack p99 ms | ack max ms | server CPU s | CPU µs/frame | bench CPU s | RSS MiB | note |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
                |r| format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.target, r.param, r.messages, r.delivered, r.lost, num(r.rate), ms(r.p50_ms), ms(r.p99_ms),
                    ms(r.max_ms), opt(r.cpu_secs, 2), opt(r.cpu_us_per_msg(), 2), opt(r.tool_cpu_secs, 2), mib(r.rss_after_kib), r.note
                ),
            ),
        };
        let _ = writeln!(out, "{head}");
        for r in &rows {
            let _ = writeln!(out, "{}", cells(r).replace("|  |", "| |"));
        }
        out.push('\n');
        if w == "p2p" || w == "idle" {
            ratios(&mut out, &rows);
        }
    }
    out
}

/// Each pushbridge row divided by Mosquitto's at the same size and rate,
/// and (p2p) each target's msg/s at its largest size over its smallest:
/// the figures the targets are set in.
fn ratios(out: &mut String, rows: &[&Row]) {
    let peer = |r: &Row| {
        rows.iter()
            .find(|m| m.target == "mosquitto" && m.param == r.param && m.offered == r.offered)
    };
    let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let ours: Vec<&&Row> = rows.iter().filter(|r| r.target != "mosquitto").collect();
    if ours.iter().all(|r| peer(r).is_none()) {
        return;
    }
    if rows[0].workload == "idle" {
        let _ = writeln!(
            out,
            "| target | devices | RSS/conn ÷ Mosquitto's |\n|---|--:|--:|"
        );
        for r in &ours {
            let m = peer(r).and_then(|m| m.rss_per_conn_kib());
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                r.target,
                r.param,
                opt(div(r.rss_per_conn_kib(), m), 2)
            );
        }
        out.push('\n');
        return;
    }
    let _ = writeln!(out, "| target | devices | offered msg/s | msg/s ÷ Mosquitto's | p50 ÷ Mosquitto's | p99 ÷ Mosquitto's | max ÷ Mosquitto's | p99 at socket ÷ Mosquitto's |\n|---|--:|--:|--:|--:|--:|--:|--:|");
    for r in &ours {
        let Some(m) = peer(r) else { continue };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.target,
            r.param,
            r.offered.map_or("max".into(), num),
            opt(div(Some(r.rate), Some(m.rate)), 2),
            opt(div(r.p50_ms, m.p50_ms), 2),
            opt(div(r.p99_ms, m.p99_ms), 2),
            opt(div(r.max_ms, m.max_ms), 2),
            opt(div(r.sock_p99_ms, m.sock_p99_ms), 2),
        );
    }
    let mut scaling = Vec::new();
    for target in ["pushbridge", "mosquitto"] {
        let closed: Vec<&&Row> = rows
            .iter()
            .filter(|r| r.target == target && r.offered.is_none())
            .collect();
        let (Some(lo), Some(hi)) = (
            closed.iter().min_by_key(|r| r.param),
            closed.iter().max_by_key(|r| r.param),
        ) else {
            continue;
        };
        if hi.param > lo.param {
            let ratio = opt(div(Some(hi.rate), Some(lo.rate)), 2);
            scaling.push(format!(
                "{target} {} ÷ {} devices: {ratio}",
                hi.param, lo.param
            ));
        }
    }
    if !scaling.is_empty() {
        let _ = writeln!(
            out,
            "\nmsg/s at the most devices ÷ at the fewest (closed loop): {}",
            scaling.join("; ")
        );
    }
    out.push('\n');
}

/// ns per publish against the smallest S of the same target: the scaling ratio.
fn core_table(out: &mut String, rows: &[&Row]) {
    let _ = writeln!(out, "| target | sessions | publishes | routed | dropped | ns/publish (wall) | ns/publish (thread CPU) | × smallest S (CPU) | attach s | heap B/session | heap B/session after 1 msg each | RSS B/session | note |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|");
    for r in rows {
        let base = rows
            .iter()
            .filter(|b| b.target == r.target)
            .min_by_key(|b| b.param)
            .and_then(|b| b.cpu_ns_per_op());
        let ratio = match (r.cpu_ns_per_op(), base) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let wall = (r.messages > 0).then(|| r.secs * 1e9 / r.messages as f64);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.target,
            r.param,
            r.messages,
            r.delivered,
            r.lost,
            opt(wall, 0),
            opt(r.cpu_ns_per_op(), 0),
            opt(ratio, 2),
            opt(r.setup_secs, 2),
            opt(r.heap_per_item, 0),
            opt(r.heap_per_item_warm, 0),
            opt(r.rss_per_item, 0),
            r.note
        );
    }
    out.push('\n');
}

/// notifications/s against h2load's at the same connection count.
fn apns_table(out: &mut String, rows: &[&Row]) {
    let _ = writeln!(out, "| target | connections | notifications | answered | lost | notifications/s | × h2load | client CPU s | CPU µs/notification | bench CPU s | client RSS MiB | note |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|");
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.target == "h2load" && b.param == r.param)
            .map(|b| b.rate);
        let ratio = base.filter(|b| *b > 0.0).map(|b| r.rate / b);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.target,
            r.param,
            r.messages,
            r.delivered,
            r.lost,
            num(r.rate),
            opt(ratio, 2),
            opt(r.cpu_secs, 2),
            opt(r.cpu_us_per_msg(), 1),
            opt(r.tool_cpu_secs, 2),
            mib(r.rss_after_kib),
            r.note
        );
    }
    out.push('\n');
}

pub const CSV_HEADER: &str = "workload,target,param,offered_per_s,messages,delivered,lost,duplicates,secs,rate_per_s,p50_ms,p99_ms,max_ms,to_last_p50_ms,to_last_max_ms,server_cpu_s,bench_cpu_s,rss_before_kib,rss_after_kib,rss_per_conn_kib,setup_s,heap_bytes_per_item,heap_bytes_per_item_warm,rss_bytes_per_item,sock_p50_ms,sock_p99_ms,sock_max_ms,server_sys_s,note";

pub fn csv_line(r: &Row) -> String {
    let f = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
    let u = |v: Option<u64>| v.map_or(String::new(), |v| v.to_string());
    format!(
        "{},{},{},{},{},{},{},{},{:.4},{:.1},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},\"{}\"",
        r.workload,
        r.target,
        r.param,
        f(r.offered),
        r.messages,
        r.delivered,
        r.lost,
        r.duplicates,
        r.secs,
        r.rate,
        f(r.p50_ms),
        f(r.p99_ms),
        f(r.max_ms),
        f(r.last_p50_ms),
        f(r.last_max_ms),
        f(r.cpu_secs),
        f(r.tool_cpu_secs),
        u(r.rss_before_kib),
        u(r.rss_after_kib),
        f(r.rss_per_conn_kib()),
        f(r.setup_secs),
        f(r.heap_per_item),
        f(r.heap_per_item_warm),
        f(r.rss_per_item),
        f(r.sock_p50_ms),
        f(r.sock_p99_ms),
        f(r.sock_max_ms),
        f(r.sys_cpu_secs),
        r.note.replace('"', "'"),
    )
}

/// The metric each workload's chart shows.
fn metric(w: &str) -> (&'static str, fn(&Row) -> Option<f64>) {
    match w {
        "idle" => ("server RSS per connection (KiB, lower is better)", |r| {
            r.rss_per_conn_kib()
        }),
        "p2p" => ("delivered msg/s (higher is better)", |r| Some(r.rate)),
        "fanout" => (
            "time until the last device has it, median (ms, lower is better)",
            |r| r.last_p50_ms,
        ),
        "core" => ("ns of CPU per publish (lower is better)", |r| {
            r.cpu_ns_per_op()
        }),
        "apns" => ("notifications/s (higher is better)", |r| Some(r.rate)),
        _ => ("accepted frames/s (higher is better)", |r| Some(r.rate)),
    }
}

const COLORS: [&str; 4] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];

/// Grouped bars: one group per parameter value, one bar per target.
pub fn svg(workload: &str, rows: &[Row]) -> Option<String> {
    let rows: Vec<&Row> = rows.iter().filter(|r| r.workload == workload).collect();
    if rows.is_empty() {
        return None;
    }
    let (label, value) = metric(workload);
    let mut params: Vec<u64> = rows.iter().map(|r| r.param).collect();
    params.dedup();
    params.sort_unstable();
    params.dedup();
    let mut targets: Vec<String> = Vec::new();
    for r in &rows {
        if !targets.contains(&r.target) {
            targets.push(r.target.clone());
        }
    }
    let max = rows
        .iter()
        .filter_map(|r| value(r))
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let (w, h, left, top, bottom) = (640.0, 320.0, 60.0, 40.0, 50.0);
    let plot_h = h - top - bottom;
    let group_w = (w - left - 20.0) / params.len() as f64;
    let bar_w = (group_w * 0.8) / targets.len() as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">"
    );
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"{left}\" y=\"16\" font-size=\"13\">{workload}: {label}</text>"
    );
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>",
        h - bottom,
        w - 10.0,
        h - bottom
    );
    for (gi, p) in params.iter().enumerate() {
        let gx = left + gi as f64 * group_w + group_w * 0.1;
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{p}</text>",
            gx + group_w * 0.4,
            h - bottom + 15.0
        );
        for (ti, t) in targets.iter().enumerate() {
            let Some(v) = rows
                .iter()
                .find(|r| r.param == *p && &r.target == t)
                .and_then(|r| value(r))
            else {
                continue;
            };
            let bh = (v.max(0.0) / max) * plot_h;
            let x = gx + ti as f64 * bar_w;
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"/>",
                h - bottom - bh,
                bar_w * 0.95,
                COLORS[ti % COLORS.len()]
            );
            let _ =
                writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\">{}</text>",
                x + bar_w * 0.47,
                h - bottom - bh - 3.0,
                if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.1}") }
            );
        }
    }
    for (ti, t) in targets.iter().enumerate() {
        let x = left + ti as f64 * 140.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{t}</text>",
            h - 18.0,
            COLORS[ti % COLORS.len()],
            x + 14.0,
            h - 9.0
        );
    }
    s.push_str("</svg>\n");
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).map(|i| i * 1_000_000).collect();
        assert_eq!(percentile_ms(&v, 0.5), Some(50.0));
        assert_eq!(percentile_ms(&v, 0.99), Some(99.0));
        assert_eq!(percentile_ms(&v, 1.0), Some(100.0));
        assert_eq!(percentile_ms(&[], 0.5), None);
    }

    #[test]
    fn tables_and_charts_render() {
        let row = Row {
            workload: "p2p",
            target: "mosquitto".into(),
            param: 20,
            messages: 200,
            delivered: 200,
            rate: 12345.0,
            cpu_secs: Some(0.004),
            sys_cpu_secs: Some(0.003),
            rss_before_kib: Some(1000),
            rss_after_kib: Some(1010),
            ..Row::default()
        };
        let md = markdown(std::slice::from_ref(&row));
        assert!(
            md.contains("| mosquitto | 20 | max | 200 | 200 | 0 |"),
            "{md}"
        );
        assert!(
            md.contains("| 0.00 | 20.0 | 15.0 |"),
            "µs per push, then the kernel's part: {md}"
        );
        assert!(
            md.contains("| 1.0 | 512 |"),
            "RSS after, then kept per device: {md}"
        );
        assert!(svg("p2p", std::slice::from_ref(&row))
            .unwrap()
            .contains("<rect"));
        assert_eq!(
            csv_line(&row).split(',').count(),
            CSV_HEADER.split(',').count()
        );
    }

    #[test]
    fn p2p_ratios_divide_by_mosquitto_at_the_same_size() {
        let row = |target: &str, param, rate, p99| Row {
            workload: "p2p",
            target: target.into(),
            param,
            rate,
            p99_ms: Some(p99),
            ..Row::default()
        };
        let rows = [
            row("pushbridge", 1000, 200.0, 10.0),
            row("mosquitto", 1000, 50.0, 20.0),
            row("pushbridge", 15000, 150.0, 30.0),
            row("mosquitto", 15000, 40.0, 20.0),
        ];
        let md = markdown(&rows);
        assert!(
            md.contains("| pushbridge | 1000 | max | 4.00 | – | 0.50 | – |"),
            "{md}"
        );
        assert!(
            md.contains("| pushbridge | 15000 | max | 3.75 | – | 1.50 | – |"),
            "{md}"
        );
        assert!(
            md.contains(
                "pushbridge 15000 ÷ 1000 devices: 0.75; mosquitto 15000 ÷ 1000 devices: 0.80"
            ),
            "{md}"
        );
    }
}
