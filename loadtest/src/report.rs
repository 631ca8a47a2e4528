//! The report: a table for people, JSON for machines, an SVG plot of the latency
//! distribution; the server's RSS and CPU (and the load generator's own CPU) from /proc.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde_json::{json, Value};

use crate::Common;

/// Resident set size of `pid`, bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// User + system CPU seconds used so far by `pid` (`None`: this process).
fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Clock ticks: 100 per second on Linux.
    Some((utime + stime) / 100.0)
}

/// Server (summed over `--server-pid`s) and load-generator readings at the start,
/// once connected, and at the end.
pub struct Sample {
    pids: Vec<u32>,
    readings: [Option<Reading>; 3],
    /// Connections held when the `connected` reading was taken.
    connections: usize,
}

#[derive(Clone, Copy)]
struct Reading {
    rss: Option<u64>,
    cpu: Option<f64>,
    own_cpu: Option<f64>,
}

impl Sample {
    pub fn start(pids: &[u32]) -> Sample {
        let mut s = Sample {
            pids: pids.to_vec(),
            readings: [None; 3],
            connections: 0,
        };
        s.readings[0] = Some(s.read());
        s
    }

    fn read(&self) -> Reading {
        let sum_u = |f: &dyn Fn(u32) -> Option<u64>| -> Option<u64> {
            (!self.pids.is_empty())
                .then(|| self.pids.iter().map(|&p| f(p)).sum::<Option<u64>>())
                .flatten()
        };
        let cpu = (!self.pids.is_empty())
            .then(|| {
                self.pids
                    .iter()
                    .map(|&p| cpu_seconds(Some(p)))
                    .sum::<Option<f64>>()
            })
            .flatten();
        Reading {
            rss: sum_u(&rss_bytes),
            cpu,
            own_cpu: cpu_seconds(None),
        }
    }

    /// Reads once `connections` are held.
    pub fn connected(&mut self, connections: usize) {
        self.connections = connections;
        self.readings[1] = Some(self.read());
    }

    pub fn finished(&mut self) {
        self.readings[2] = Some(self.read());
    }

    fn json(&self) -> Value {
        let [start, connected, end] = self.readings;
        let get = |r: Option<Reading>, f: fn(&Reading) -> Option<f64>| r.as_ref().and_then(f);
        let rss = |r: &Reading| r.rss.map(|b| b as f64);
        let cpu = |r: &Reading| r.cpu;
        let own = |r: &Reading| r.own_cpu;
        let delta = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| b - a);
        let rss_start = get(start, rss);
        let rss_connected = get(connected, rss);
        json!({
            "server_pids": self.pids,
            "server_rss_bytes_start": rss_start,
            "server_rss_bytes_connected": rss_connected,
            "server_rss_bytes_end": get(end, rss),
            // What connecting cost, not what the process held before.
            "server_rss_bytes_per_connection": delta(rss_start, rss_connected)
                .filter(|_| self.connections > 0)
                .map(|d| (d / self.connections as f64).round()),
            "server_cpu_seconds_connecting": delta(get(start, cpu), get(connected, cpu)),
            "server_cpu_seconds_load": delta(get(connected, cpu), get(end, cpu)),
            "loadgen_cpu_seconds_load": delta(get(connected, own), get(end, own)),
        })
    }
}

pub struct Report {
    json: Value,
    latency: Option<Histogram<u64>>,
    storm: Option<StormPlot>,
}

/// What the `storm` plot shows: connects per window over the run, per node, with the
/// events marked; and each event's reconnect-time distribution.
pub struct StormPlot {
    pub window_ms: u64,
    /// When publishing started, seconds after the first connect.
    pub start_offset_s: f64,
    /// Per node: `connected` frames per window from the start of the run.
    pub connected: Vec<(String, Vec<u32>)>,
    /// Successful upgrades per window (whichever node, refused ones too).
    pub upgrades: Vec<u32>,
    /// Event name and time, seconds after the first connect.
    pub events: Vec<(String, f64)>,
    /// Per event: reconnect times (µs).
    pub reconnect: Vec<(String, Histogram<u64>)>,
}

impl Report {
    pub fn new(
        scenario: &str,
        common: &Common,
        connect_time: Duration,
        mut fields: Value,
        sample: &Sample,
        latency: Option<Histogram<u64>>,
        load_time: Duration,
    ) -> Report {
        let mut j = json!({
            "scenario": scenario,
            "url": common.url,
            "transport": common.transport.name(),
            "clients": common.clients,
            "duration_seconds": common.duration,
            "connect_seconds": connect_time.as_secs_f64(),
            "load_seconds": load_time.as_secs_f64(),
        });
        if let Some(h) = &latency {
            let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            j["latency_ms"] = json!({
                "count": h.len(),
                "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999),
                "max": h.max() as f64 / 1000.0,
            });
            // Over the load: from the first publish until the last delivery (or the
            // end of the grace period).
            let delivered = fields.get("delivered").and_then(Value::as_u64);
            if let Some(d) = delivered.filter(|_| !load_time.is_zero()) {
                j["deliveries_per_second"] = json!((d as f64 / load_time.as_secs_f64()).round());
            }
        }
        let (Value::Object(a), Value::Object(b), Value::Object(c)) =
            (&mut j, fields.take(), sample.json())
        else {
            unreachable!("objects")
        };
        a.extend(b);
        a.extend(c);
        if scenario == "churn" {
            // No connections are held: a figure per connection would mean nothing.
            a.remove("server_rss_bytes_per_connection");
            a.remove("server_cpu_seconds_connecting");
        }
        if scenario == "storm" {
            // The edges measured hold some of the clients, a share that changes as
            // edges go: per connection means nothing.
            a.remove("server_rss_bytes_per_connection");
        }
        Report {
            json: j,
            latency,
            storm: None,
        }
    }

    /// With the `storm` plot instead of a latency one.
    pub fn with_storm(mut self, plot: StormPlot) -> Report {
        self.storm = Some(plot);
        self
    }

    pub fn json(&self) -> &Value {
        &self.json
    }

    /// The table, then the JSON on one line.
    pub fn print(&self) {
        let j = &self.json;
        let row = |label: &str, value: String| println!("{label:<28}{value}");
        let num = |k: &str| j.get(k).filter(|v| !v.is_null()).map(|v| v.to_string());
        for (label, key) in [
            ("scenario", "scenario"),
            ("url", "url"),
            ("transport", "transport"),
            ("clients", "clients"),
            ("jobs", "jobs"),
            ("rate (per second)", "rate_per_second"),
            ("published", "published"),
            ("publish errors", "publish_errors"),
            ("delivered", "delivered"),
            ("expected", "expected_deliveries"),
            ("lost", "lost"),
            ("extra (duplicates)", "extra"),
            ("out of order (late)", "out_of_order"),
            ("clients short", "clients_short"),
            ("clients that did not stop", "clients_unfinished"),
            ("jobs completed (subs)", "subscriptions_completed"),
            ("cycles ok", "cycles_ok"),
            ("cycles failed", "cycles_failed"),
            ("cycles aborted", "cycles_aborted"),
            ("still connected at end", "still_connected_at_end"),
        ] {
            if let Some(v) = num(key) {
                row(label, v.trim_matches('"').to_string());
            }
        }
        let secs = |k: &str| j.get(k).and_then(Value::as_f64);
        if let Some(s) = secs("connect_seconds").filter(|s| *s > 0.0) {
            row("connect + subscribe (all)", format!("{s:.3} s"));
        }
        if let Some(s) = secs("publish_seconds") {
            row("publishing took", format!("{s:.2} s"));
        }
        if let Some(l) = j.get("publish_lag_ms") {
            let f = |k: &str| l[k].as_f64().unwrap_or(0.0);
            row(
                "publisher behind schedule",
                format!(
                    "p50 {:.2}  p99 {:.2}  max {:.2} ms",
                    f("p50"),
                    f("p99"),
                    f("max")
                ),
            );
        }
        if let Some(r) = secs("deliveries_per_second") {
            row("received per second", format!("{r:.0}"));
        }
        if let Some(r) = secs("cycles_per_second") {
            row("cycles per second", format!("{r:.0}"));
        }
        if let Some(l) = j.get("latency_ms") {
            let f = |k: &str| l[k].as_f64().unwrap_or(0.0);
            row(
                "latency (ms)",
                format!(
                    "p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
                    f("p50"),
                    f("p90"),
                    f("p99"),
                    f("p999"),
                    f("max")
                ),
            );
        }
        if let Some(rss) = secs("server_rss_bytes_connected") {
            let per = secs("server_rss_bytes_per_connection")
                .map(|p| format!(" ({p:.0} B per connection over the start)"))
                .unwrap_or_default();
            row(
                "server RSS connected",
                format!("{:.1} MiB{per}", rss / 1048576.0),
            );
        }
        if let Some(rss) = secs("server_rss_bytes_end") {
            row(
                "server RSS at the end",
                format!("{:.1} MiB", rss / 1048576.0),
            );
        }
        if let Some(c) = secs("server_cpu_seconds_connecting") {
            row("server CPU connecting", format!("{c:.2} s"));
        }
        if let Some(c) = secs("server_cpu_seconds_load") {
            row("server CPU under load", format!("{c:.2} s"));
        }
        if let Some(c) = secs("loadgen_cpu_seconds_load") {
            row("load generator CPU (load)", format!("{c:.2} s"));
        }
        if j["scenario"] == "storm" {
            print_storm(j, &row);
        }
        if let Some(errors) = j.get("client_errors").and_then(Value::as_array) {
            for e in errors.iter().take(3) {
                row("client error", e.to_string());
            }
        }
        println!("{}", serde_json::to_string(j).unwrap_or_default());
    }

    /// The latency distribution as an SVG: latency against percentile, on the usual
    /// "nines" axis (50 %, 90 %, 99 %, 99.9 %, …); for `storm`, the connect rate over
    /// time and the reconnect-time distributions.
    pub fn plot(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(storm) = &self.storm {
            return plot_storm(storm, &self.json, path);
        }
        let h = self
            .latency
            .as_ref()
            .filter(|h| !h.is_empty())
            .context("this run recorded no latencies to plot")?;
        // x = number of nines: q = 1 - 10^-x.
        let top = ((h.len() as f64).log10()).clamp(1.0, 5.0);
        let points: Vec<(f64, f64)> = (0..=(top * 20.0) as usize)
            .map(|k| {
                let x = k as f64 / 20.0;
                let q = 1.0 - 10f64.powf(-x);
                (x, h.value_at_quantile(q) as f64 / 1000.0)
            })
            .collect();
        let y_max = (h.max() as f64 / 1000.0 * 1.1).max(0.01);
        let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let title = format!(
            "fanout-loadtest {} ({}) — {} clients — latency publish → receive",
            self.json["scenario"].as_str().unwrap_or(""),
            self.json["transport"].as_str().unwrap_or("ws"),
            self.json["clients"]
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..top, 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms)")
            .x_labels(top as usize + 1)
            .x_label_formatter(&|x| {
                let p = format!("{:.3}", 100.0 * (1.0 - 10f64.powf(-x)));
                format!("{}%", p.trim_end_matches('0').trim_end_matches('.'))
            })
            .draw()?;
        chart.draw_series(LineSeries::new(points, BLUE.stroke_width(2)))?;
        root.present()?;
        Ok(())
    }
}

/// The `storm` rows: totals, then one block per event.
fn print_storm(j: &Value, row: &dyn Fn(&str, String)) {
    let v = |k: &str| j.get(k).map(|v| v.to_string()).unwrap_or_default();
    row(
        "reconnect policy",
        j["reconnect_policy"].as_str().unwrap_or("").to_string(),
    );
    row("messages lost", v("lost"));
    row("app duplicates (SDK)", v("app_duplicates"));
    row("raw duplicate frames", v("raw_duplicate_frames"));
    row("resets (recovered:false)", v("resets"));
    row("recovered:true", v("recovered"));
    row(
        "caught up at the end",
        format!("{} of {}", v("caught_up_at_end"), v("clients")),
    );
    row(
        "attempts (failed)",
        format!("{} ({})", v("attempts"), v("failed_attempts")),
    );
    row("closes by code", v("closes_by_code"));
    row("failed attempts by kind", v("failed_attempts_by_kind"));
    for e in j["events"].as_array().into_iter().flatten() {
        let ms = |k: &str| {
            let r = &e[k];
            if r["count"].as_u64().unwrap_or(0) == 0 {
                return "none".to_string();
            }
            let f = |q: &str| r[q].as_f64().unwrap_or(0.0);
            format!(
                "p50 {:.0}  p90 {:.0}  p99 {:.0}  max {:.0} ms (n={})",
                f("p50"),
                f("p90"),
                f("p99"),
                f("max"),
                r["count"]
            )
        };
        let name = e["event"].as_str().unwrap_or("?");
        row(
            &format!("{name} at"),
            format!(
                "T+{:.1} s (pid {})",
                e["at_seconds"].as_f64().unwrap_or(0.0),
                e["pid"]
            ),
        );
        row(
            &format!("  {name}: clients affected"),
            format!("{} (left {})", e["clients_affected"], e["left_nodes"]),
        );
        row(&format!("  {name}: reconnect"), ms("reconnect_ms"));
        row(&format!("  {name}: to subscribed"), ms("to_subscribed_ms"));
        row(
            &format!("  {name}: connect→subscribed"),
            ms("last_attempt_connect_to_subscribed_ms"),
        );
        row(
            &format!("  {name}: TCP connect"),
            ms("last_attempt_tcp_connect_ms"),
        );
        row(
            &format!("  {name}: connect→upgraded"),
            ms("last_attempt_connect_to_upgraded_ms"),
        );
        row(
            &format!("  {name}: unrecovered"),
            e["unrecovered"].to_string(),
        );
        row(
            &format!("  {name}: attempts"),
            format!(
                "{} (failed: {})",
                e["attempts"], e["failed_attempts_by_kind"]
            ),
        );
        row(
            &format!("  {name}: dups / resets"),
            format!("{} / {}", e["app_duplicates"], e["resets"]),
        );
        row(
            &format!("  {name}: peak connects"),
            format!(
                "{} per 100 ms (by node {}; upgrades {})",
                e["peak_connects_per_100ms"],
                e["peak_connects_per_100ms_by_node"],
                e["peak_upgrades_per_100ms"]
            ),
        );
    }
}

/// Two panels: connects per window over time (one line per node, the events as
/// vertical lines), and each event's reconnect time against percentile.
fn plot_storm(p: &StormPlot, j: &Value, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(470);
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    let w = p.window_ms as f64 / 1000.0;
    let len = p
        .connected
        .iter()
        .map(|(_, s)| s.len())
        .chain([p.upgrades.len()])
        .max()
        .unwrap_or(1);
    let x_max = (len as f64 * w).max(1.0);
    let y_max = p
        .connected
        .iter()
        .flat_map(|(_, s)| s.iter())
        .chain(p.upgrades.iter())
        .copied()
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;
    let title = format!(
        "fanout-loadtest storm ({}) — {} clients — connects per {} ms",
        if j["jitter"].as_bool().unwrap_or(true) {
            "full jitter"
        } else {
            "no jitter"
        },
        j["clients"],
        p.window_ms
    );
    let mut chart = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc(format!(
            "seconds since the first connect (publishing from {:.1} s)",
            p.start_offset_s
        ))
        .y_desc(format!("connects per {} ms", p.window_ms))
        .draw()?;
    // Upgrades that a node refused at once (a draining one answers 1001) show as the
    // gap between this line and the nodes' connects.
    chart
        .draw_series(LineSeries::new(
            p.upgrades
                .iter()
                .enumerate()
                .map(|(i, c)| (i as f64 * w, *c as f64)),
            BLACK.mix(0.35).stroke_width(1),
        ))?
        .label("upgrades, refused ones included")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.mix(0.35)));
    for (k, (name, s)) in p.connected.iter().enumerate() {
        let color = colors[k % colors.len()];
        chart
            .draw_series(LineSeries::new(
                s.iter().enumerate().map(|(i, c)| (i as f64 * w, *c as f64)),
                color.stroke_width(1),
            ))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    for (name, at) in &p.events {
        chart
            .draw_series(LineSeries::new(
                vec![(*at, 0.0), (*at, y_max)],
                BLACK.stroke_width(2),
            ))?
            .label(format!("{name} at {at:.1} s"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;

    // Reconnect time against percentile, per event.
    let most = p.reconnect.iter().map(|(_, h)| h.len()).max().unwrap_or(0);
    let nines = ((most.max(10) as f64).log10()).clamp(1.0, 4.0);
    let y_max = p
        .reconnect
        .iter()
        .map(|(_, h)| h.max())
        .max()
        .unwrap_or(1)
        .max(1) as f64
        / 1e6
        * 1.1;
    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            "reconnect time: disconnect → subscribed and caught up",
            ("sans-serif", 18),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..nines, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("seconds")
        .x_labels(nines as usize + 1)
        .x_label_formatter(&|x| {
            let p = format!("{:.3}", 100.0 * (1.0 - 10f64.powf(-x)));
            format!("{}%", p.trim_end_matches('0').trim_end_matches('.'))
        })
        .draw()?;
    for (k, (name, h)) in p.reconnect.iter().enumerate() {
        if h.is_empty() {
            continue;
        }
        let color = colors[k % colors.len()];
        let points: Vec<(f64, f64)> = (0..=(nines * 20.0) as usize)
            .map(|i| {
                let x = i as f64 / 20.0;
                let q = 1.0 - 10f64.powf(-x);
                (x, h.value_at_quantile(q) as f64 / 1e6)
            })
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(format!("{name} ({} clients)", h.len()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
