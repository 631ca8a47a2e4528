//! The report: a table for people, JSON for machines; server RSS and CPU from /proc.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::json;

use crate::clients::ClientResult;
use crate::Common;

pub struct Report {
    json: serde_json::Value,
}

/// Resident set size of `pid`, bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
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

/// User + system CPU seconds used by `pid` so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        scenario: &str,
        c: &Common,
        connect_time: Duration,
        publish_time: Duration,
        published: u64,
        results: Vec<ClientResult>,
        rss_connected: Option<u64>,
        server_cpu: Option<f64>,
    ) -> Report {
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
        let mut received = 0u64;
        let mut reordered = 0u64;
        let mut failed_clients = 0u64;
        for r in &results {
            all.add(&r.latency_us).expect("same bounds");
            received += r.received;
            reordered += r.duplicates_or_reordered;
            if r.received < published {
                failed_clients += 1;
            }
        }
        let expected = published * results.len() as u64;
        let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
        let json = json!({
            "scenario": scenario,
            "url": c.url,
            "clients": c.clients,
            "rate_per_second": c.rate,
            "duration_seconds": c.duration,
            "payload_bytes": c.payload,
            "connect_seconds": connect_time.as_secs_f64(),
            "publish_seconds": publish_time.as_secs_f64(),
            "published": published,
            "expected_deliveries": expected,
            "delivered": received,
            "lost": expected.saturating_sub(received),
            "duplicates_or_reordered": reordered,
            "clients_short": failed_clients,
            "deliveries_per_second": received as f64 / publish_time.as_secs_f64().max(1e-9),
            "latency_ms": {
                "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999), "max": all.max() as f64 / 1000.0,
            },
            "server_rss_bytes_connected": rss_connected,
            "server_rss_bytes_per_connection": rss_connected.map(|r| r / c.clients.max(1) as u64),
            "server_cpu_seconds": server_cpu,
        });
        Report { json }
    }

    pub fn json(&self) -> &serde_json::Value {
        &self.json
    }

    pub fn print(&self) {
        let j = &self.json;
        println!(
            "scenario            {}",
            j["scenario"].as_str().unwrap_or("")
        );
        println!("clients             {}", j["clients"]);
        println!(
            "connect (all)       {:.3} s",
            j["connect_seconds"].as_f64().unwrap_or(0.0)
        );
        println!(
            "published           {} at {}/s",
            j["published"], j["rate_per_second"]
        );
        println!(
            "delivered/expected  {}/{}",
            j["delivered"], j["expected_deliveries"]
        );
        println!("lost                {}", j["lost"]);
        println!("dup/reordered       {}", j["duplicates_or_reordered"]);
        println!(
            "deliveries/s        {:.0}",
            j["deliveries_per_second"].as_f64().unwrap_or(0.0)
        );
        let l = &j["latency_ms"];
        println!(
            "latency ms          p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            l["p50"].as_f64().unwrap_or(0.0),
            l["p90"].as_f64().unwrap_or(0.0),
            l["p99"].as_f64().unwrap_or(0.0),
            l["p999"].as_f64().unwrap_or(0.0),
            l["max"].as_f64().unwrap_or(0.0)
        );
        if let Some(rss) = j["server_rss_bytes_connected"].as_u64() {
            println!(
                "server RSS          {:.1} MiB ({} B per connection)",
                rss as f64 / 1048576.0,
                j["server_rss_bytes_per_connection"]
            );
        }
        if let Some(cpu) = j["server_cpu_seconds"].as_f64() {
            println!("server CPU          {cpu:.2} s");
        }
        println!("{}", serde_json::to_string(j).unwrap_or_default());
    }
}
