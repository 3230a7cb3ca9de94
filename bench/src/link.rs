//! The link-sharing benchmark: payment terminals on the shop's line while the box syncs,
//! on emulated lines (`tests/support/linkemu.rs`: three network namespaces, tbf for the
//! modem's rate and buffer, a user-space delay relay), with the real `storehub` in "cloud"
//! and the real `storebox` in "shop".
//!
//! Two lines: 4/1 Mbit/s with 20 ms each way and 400 ms of modem buffer, and 20/2 Mbit/s with
//! 15 ms and 200 ms. On each, three transfers, each with the controller on (the default),
//! off (unshaped), and with fixed caps at 80 % of the line instead:
//! - a cold full sync of the seed-scale store (a fresh box, its identity kept), repeated;
//! - a burst of 2,000 sales pushed (posted while push is off, then the box restarted with
//!   push on: the whole backlog goes at once), repeated;
//! - a firmware bundle download (30 MB).
//!
//! Four payment terminals, each a 200-byte request and a 500-byte answer every 200 ms on
//! its own TCP connection, spread over the period, measure the round trip: p50/p95/p99 when
//! the line is idle (the baseline, same run) and during each transfer (from its first to its
//! last byte on the line, as the relay counts them), and the packets they lost. Each transfer
//! has its duration and its share of the line (bytes on the line, headers included, over
//! the line's rate and the duration).
//!
//! Then another device's bulk download (CUBIC, kernel buffers) starts in the middle of a
//! bundle download and stops 10 s later: the box's share of the downstream line, per 250 ms,
//! shows how fast it gives way and comes back, with the controller on and off.
//!
//! Needs root (namespaces, tc, a TUN device), iproute2 and python3. Results in
//! `bench/results/link.{json,md}`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};

use crate::common::{call, machine_info, machine_line, sibling, write_results, Bins, Conn};
use crate::linkemu::{percentile, wall, Emu, Profile, Sites, ADSL, VDSL};

const STORE: &str = "bench-001";

pub struct Plan {
    quick: bool,
    /// Cold full syncs per variant.
    cold_syncs: usize,
    /// Pushes of `SALES` sales per variant.
    pushes: usize,
    bundle_bytes: usize,
    idle: Duration,
}

const SALES: usize = 2_000;
const TERMINALS: u32 = 4;
const TPE_EVERY: Duration = Duration::from_millis(200);

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                cold_syncs: 4,
                pushes: 1,
                bundle_bytes: 6_000_000,
                idle: Duration::from_secs(5),
            }
        } else {
            Plan {
                quick,
                cold_syncs: 12,
                pushes: 3,
                bundle_bytes: 30_000_000,
                idle: Duration::from_secs(15),
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    On,
    Off,
    Cap80,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::On, Variant::Off, Variant::Cap80];

    fn name(self) -> &'static str {
        match self {
            Variant::On => "controller on",
            Variant::Off => "off (unshaped)",
            Variant::Cap80 => "fixed caps at 80 %",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Variant::On => "on",
            Variant::Off => "off",
            Variant::Cap80 => "cap80",
        }
    }

    fn hub_dropin(self, p: &Profile) -> String {
        match self {
            Variant::On => "[hub]\nlink_sharing = \"auto\"\n".into(),
            Variant::Off => "[hub]\nlink_sharing = \"off\"\n".into(),
            Variant::Cap80 => format!(
                "[hub]\nlink_sharing = \"off\"\ndownload_cap = \"{}kbit/s\"\nupload_cap = \"{}kbit/s\"\n",
                p.down_kbit * 8 / 10,
                p.up_kbit * 8 / 10
            ),
        }
    }
}

/// One line under test: the emulator, the hub and the box's setup, and what the box needs.
struct Line {
    emu: Emu,
    sites: Sites,
    bins: Bins,
    lan: Option<SocketAddr>,
    image: PathBuf,
    store: storebox_sim::Store,
    sale_seq: u64,
}

/// What the terminals saw during some windows, and the transfers' figures.
#[derive(Default)]
struct Measure {
    rtts: Vec<f64>,
    lost: u64,
    seconds: f64,
    bytes: u64,
    transfers: usize,
}

impl Measure {
    fn add(&mut self, emu: &Emu, w: &Window) {
        self.rtts.extend(
            emu.tpe_rounds()
                .iter()
                .filter(|r| r.at >= w.from && r.at <= w.to)
                .map(|r| r.rtt_ms),
        );
        self.lost += emu.tpe_lost(w.from, w.to + 1.0);
        self.seconds += w.to - w.from;
        self.bytes += w.bytes;
        self.transfers += 1;
    }

    fn json(&self, idle: &Value, line_bytes_per_s: f64) -> Value {
        let p = |q| round1(percentile(&self.rtts, q));
        let idle_p = |k: &str| idle[k].as_f64().unwrap_or(0.0);
        json!({
            "transfers": self.transfers,
            "seconds_each": round2(self.seconds / self.transfers.max(1) as f64),
            "line_share": round3(self.bytes as f64 / self.seconds.max(1e-3) / line_bytes_per_s),
            "tpe_samples": self.rtts.len(),
            "tpe_p50_ms": p(50.0),
            "tpe_p95_ms": p(95.0),
            "tpe_p99_ms": p(99.0),
            "tpe_added_p95_ms": round1(p(95.0) - idle_p("tpe_p95_ms")),
            "tpe_added_p99_ms": round1(p(99.0) - idle_p("tpe_p99_ms")),
            "tpe_lost_packets": self.lost,
        })
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A transfer as the relay saw it: from its first to its last byte on the line.
struct Window {
    from: f64,
    to: f64,
    bytes: u64,
}

impl Line {
    async fn start(bins: Bins, profile: Profile, dir: &Path) -> anyhow::Result<Line> {
        let mut emu = Emu::start(profile, &dir.join("emu")).map_err(anyhow::Error::msg)?;
        let sites = Sites::setup(&mut emu, &bins.hub, &dir.join("setup"), STORE)
            .map_err(anyhow::Error::msg)?;
        let image = dir.join("image");
        std::fs::create_dir_all(&image)?;
        std::fs::write(image.join("image-version"), "1.0.0\n")?;
        std::fs::write(
            image.join("system.conf"),
            "[system]\ncompatible=storebox-bench\nbootloader=noop\n",
        )?;
        let store = storebox_sim::generate_store(1);
        let mut line = Line {
            emu,
            sites,
            bins,
            lan: None,
            image,
            store,
            sale_seq: 0,
        };
        let start = Instant::now();
        while line
            .admin(Method::GET, "/admin/v1/stores", Bytes::new())
            .await
            .is_err()
        {
            ensure!(
                start.elapsed() < Duration::from_secs(20) && line.sites.hub_alive(&mut line.emu),
                "the hub did not start: {}",
                line.emu.log("hub.log")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for module in storebox_sim::MODULES {
            let path = format!("/admin/v1/stores/{STORE}/modules/{module}/import");
            let body = Bytes::from(storebox_sim::to_ndjson(&line.store.modules[module]));
            line.admin(Method::POST, &path, body).await?;
        }
        // A technician token for the box's LAN API (plain HTTP in the bench).
        let paired = std::process::Command::new(&line.bins.storebox)
            .args([
                "pair",
                "--name",
                "bench",
                "--approve",
                "--technician",
                "--config",
            ])
            .arg(&line.sites.box_config)
            .output()?;
        ensure!(
            paired.status.success(),
            "storebox pair: {}",
            String::from_utf8_lossy(&paired.stderr)
        );
        crate::common::set_bench_auth(String::from_utf8(paired.stdout)?.trim());
        Ok(line)
    }

    async fn admin(&self, method: Method, path: &str, body: Bytes) -> anyhow::Result<Value> {
        let auth = format!("Bearer {}", self.sites.admin_token);
        let (status, answer) = call(
            self.sites.admin,
            method.clone(),
            path,
            &[("authorization", &auth)],
            body,
        )
        .await?;
        ensure!(status.is_success(), "{method} {path}: {status} {answer}");
        Ok(answer)
    }

    fn dropin(&self, variant: Variant, extra: &str) -> anyhow::Result<()> {
        let text = format!(
            "{}\n[lan]\ntls = false\n\n{extra}",
            variant.hub_dropin(&self.emu.profile)
        );
        self.sites.box_dropin(&text).map_err(anyhow::Error::msg)
    }

    /// Starts the box and waits for its LAN API.
    async fn start_box(&mut self, log: &str) -> anyhow::Result<SocketAddr> {
        let lan = self
            .sites
            .start_box(&mut self.emu, &self.bins.storebox, &[], log)
            .map_err(anyhow::Error::msg)?;
        self.lan = Some(lan);
        let start = Instant::now();
        while self.status().await.is_err() {
            ensure!(
                start.elapsed() < Duration::from_secs(20) && self.sites.box_alive(&mut self.emu),
                "the box did not start: {}",
                self.emu.log(log)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(lan)
    }

    fn stop_box(&mut self) {
        self.sites.stop_box(&mut self.emu);
    }

    async fn status(&self) -> anyhow::Result<Value> {
        let lan = self.lan.context("no box")?;
        let auth = crate::common::bench_auth();
        let (status, doc) = call(
            lan,
            Method::GET,
            "/v1/status",
            &[("authorization", &auth)],
            Bytes::new(),
        )
        .await?;
        ensure!(status.is_success(), "status: {status} {doc}");
        Ok(doc)
    }

    async fn wait<F: Fn(&Value) -> bool>(
        &mut self,
        what: &str,
        log: &str,
        timeout: Duration,
        done: F,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Ok(doc) = self.status().await {
                if done(&doc) {
                    return Ok(());
                }
            }
            if start.elapsed() > timeout || !self.sites.box_alive(&mut self.emu) {
                bail!(
                    "timed out waiting for {what}; the box's log:\n{}",
                    self.emu.log(log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The box's bytes on the line between two times (down: from the hub), as the relay
    /// counted them: the transfer's window.
    fn window(&self, from: f64, to: f64, down: bool) -> anyhow::Result<Window> {
        let sites = &self.sites;
        let series: Vec<(f64, u64)> = self
            .emu
            .flows()
            .iter()
            .map(|s| {
                let b = if down {
                    s.bytes(|k| sites.is_box_down(k))
                } else {
                    s.bytes(|k| sites.is_box_up(k))
                };
                (s.at, b)
            })
            .collect();
        let before = series
            .iter()
            .rev()
            .find(|(t, _)| *t <= from)
            .map_or(0, |(_, b)| *b);
        let inside: Vec<&(f64, u64)> = series
            .iter()
            .filter(|(t, _)| *t > from && *t <= to)
            .collect();
        let last = inside.last().map_or(before, |(_, b)| *b);
        ensure!(
            last > before,
            "no bytes on the line between {from} and {to}"
        );
        // The sample before the first one that grew, to the first one at the final count.
        let first = inside
            .iter()
            .position(|(_, b)| *b > before)
            .context("no first byte")?;
        let start = if first == 0 {
            from
        } else {
            inside[first - 1].0
        };
        let end = inside
            .iter()
            .find(|(_, b)| *b >= last)
            .map_or(to, |(t, _)| *t);
        Ok(Window {
            from: start,
            to: end,
            bytes: last - before,
        })
    }

    fn wipe_box_data(&self, keep_database: bool) -> anyhow::Result<()> {
        let data = self.sites.box_data();
        let Ok(entries) = std::fs::read_dir(&data) else {
            return Ok(());
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // The box's identity and its LAN pairing stay: the same box, started afresh.
            if ["identity", "pairing", "lan"].contains(&name.as_ref()) {
                continue;
            }
            if keep_database && name != "ota" {
                continue;
            }
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    const QUIET: &'static str =
        "[sync]\ndelta_interval = \"off\"\nnotify = false\nfull_sync_at = []\n";

    /// One cold full sync: a fresh box (identity kept) syncs the whole store.
    async fn cold_sync(&mut self, variant: Variant, n: usize) -> anyhow::Result<Window> {
        self.stop_box();
        self.wipe_box_data(false)?;
        self.dropin(
            variant,
            &format!("{}\n[ota]\nenabled = false\n", Self::QUIET),
        )?;
        let log = format!("box-cold-{}-{n}.log", variant.key());
        let from = wall();
        self.start_box(&log).await?;
        self.wait(
            "the cold full sync",
            &log,
            Duration::from_secs(120),
            |doc| {
                storebox_sim::MODULES
                    .iter()
                    .all(|m| doc["modules"][m]["last_full_ok"].is_string())
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let to = wall();
        self.stop_box();
        self.window(from, to, true)
    }

    /// 2,000 sales posted while push is off, then pushed at once by a box started with push on.
    async fn push_burst(&mut self, variant: Variant, n: usize) -> anyhow::Result<Window> {
        self.stop_box();
        self.dropin(
            variant,
            "[sync]\ndelta_interval = \"off\"\nnotify = false\nfull_sync_at = []\npush = false\n\n[ota]\nenabled = false\n",
        )?;
        let log = format!("box-post-{}-{n}.log", variant.key());
        let lan = self.start_box(&log).await?;
        let mut conn = Conn::open(lan).await?;
        for _ in 0..SALES {
            self.sale_seq += 1;
            let body = sale(&self.store, self.sale_seq).to_string();
            let status = conn
                .send(Method::POST, "/v1/activity", Bytes::from(body))
                .await?;
            ensure!(status.is_success(), "posting a sale: {status}");
        }
        drop(conn);
        self.stop_box();
        self.dropin(
            variant,
            &format!("{}\n[ota]\nenabled = false\n", Self::QUIET),
        )?;
        let log = format!("box-push-{}-{n}.log", variant.key());
        let from = wall();
        self.start_box(&log).await?;
        self.wait(
            "the push of the backlog",
            &log,
            Duration::from_secs(120),
            |doc| doc["activity"]["pending"] == 0,
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let to = wall();
        self.stop_box();
        self.window(from, to, false)
    }

    /// A firmware bundle download; `during` runs once it is under way (the competing
    /// transfer), given the time the download's first byte was seen.
    async fn bundle(
        &mut self,
        variant: Variant,
        version: &str,
        size: usize,
        competitor: Option<(Duration, Duration)>,
    ) -> anyhow::Result<(Window, Option<(f64, f64)>)> {
        self.stop_box();
        let mut bytes = vec![0u8; size];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ version.len() as u64 ^ (size as u64);
        for (i, b) in version.bytes().enumerate() {
            x ^= u64::from(b) << (8 * (i % 8));
        }
        for chunk in bytes.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            for (d, s) in chunk.iter_mut().zip(x.to_le_bytes()) {
                *d = s;
            }
        }
        self.admin(
            Method::PUT,
            &format!("/admin/v1/ota/bundles/{version}"),
            Bytes::from(bytes),
        )
        .await?;
        self.admin(
            Method::PUT,
            &format!("/admin/v1/stores/{STORE}/ota"),
            Bytes::from(json!({"version": version}).to_string()),
        )
        .await?;
        self.wipe_box_data(true)?;
        self.dropin(
            variant,
            &format!(
                "{}\n[ota]\ncheck_interval = \"1s\"\nwindow = \"always\"\ndownload_cap = \"off\"\n\
                 version_file = \"{}\"\nrauc_conf = \"{}\"\n",
                Self::QUIET,
                self.image.join("image-version").display(),
                self.image.join("system.conf").display()
            ),
        )?;
        let log = format!("box-ota-{version}.log");
        let partial = self.sites.box_data().join("ota").join("incoming.raucb");
        self.start_box(&log).await?;
        let start = Instant::now();
        let mut first: Option<Instant> = None;
        let mut first_wall = 0.0;
        let mut other = None;
        let mut times: Option<(f64, f64)> = None;
        loop {
            let n = std::fs::metadata(&partial).map_or(0, |m| m.len());
            if n > 0 && first.is_none() {
                first = Some(Instant::now());
                first_wall = wall();
            }
            if let (Some(f), Some((after, lasting))) = (first, competitor) {
                if times.is_none() && f.elapsed() >= after {
                    other = Some(self.emu.start_bulk(true).map_err(anyhow::Error::msg)?);
                    times = Some((wall(), 0.0));
                }
                if f.elapsed() >= after + lasting {
                    if let Some((server, client)) = other.take() {
                        self.emu.kill(&server);
                        self.emu.kill(&client);
                        if let Some(t) = times.as_mut() {
                            t.1 = wall();
                        }
                    }
                }
            }
            if n >= size as u64 {
                break;
            }
            ensure!(
                start.elapsed() < Duration::from_secs(900) && self.sites.box_alive(&mut self.emu),
                "the bundle download did not complete; the box's log:\n{}",
                self.emu.log(&log)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some((server, client)) = other.take() {
            self.emu.kill(&server);
            self.emu.kill(&client);
            if let Some(t) = times.as_mut() {
                t.1 = wall();
            }
        }
        let done = wall();
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.stop_box();
        // The download itself: from its first bytes in the file (less one sample of the
        // relay and the file's first write) to the last byte on the line.
        Ok((self.window(first_wall - 0.1, done + 0.2, true)?, times))
    }

    /// The box's share of the downstream line per `bin`, from `from` to `to`, with the other
    /// device's share.
    fn shares(&self, from: f64, to: f64, bin: f64) -> Vec<(f64, f64, f64)> {
        let flows = self.emu.flows();
        let sites = &self.sites;
        let rate = f64::from(self.emu.profile.down_kbit) * 1000.0 / 8.0;
        let at = |t: f64| {
            flows
                .iter()
                .rev()
                .find(|s| s.at <= t)
                .map(|s| {
                    (
                        s.bytes(|k| sites.is_box_down(k)),
                        s.bytes(|k| {
                            k.starts_with(&format!(
                                "{}:{}>",
                                crate::linkemu::CLOUD_IP,
                                crate::linkemu::BULK_PORT
                            ))
                        }),
                    )
                })
                .unwrap_or((0, 0))
        };
        let mut out = Vec::new();
        let mut t = from;
        while t + bin <= to {
            let (b0, o0) = at(t);
            let (b1, o1) = at(t + bin);
            out.push((
                round2(t - from),
                round3((b1 - b0) as f64 / bin / rate),
                round3((o1 - o0) as f64 / bin / rate),
            ));
            t += bin;
        }
        out
    }
}

/// A sale as a till posts it, varied as a day's sales are (products, quantities, customer,
/// payment, time), so a push compresses as real activity does rather than as one sale
/// repeated: 1 to 8 lines, about 250 to 1,000 bytes of JSON.
fn sale(store: &storebox_sim::Store, n: u64) -> Value {
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move |m: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % m.max(1) as u64) as usize
    };
    let catalog = &store.modules["catalog"];
    let customers = &store.modules["customers"];
    let lines: Vec<Value> = (0..1 + next(8))
        .map(|_| {
            let p = &catalog[next(catalog.len())];
            let qty = 1 + next(3);
            json!({
                "product": p["id"],
                "ean13": p["ean13"],
                "qty": qty,
                "price_cents": p["price_cents"],
            })
        })
        .collect();
    let total: u64 = lines
        .iter()
        .map(|l| l["price_cents"].as_u64().unwrap_or(0) * l["qty"].as_u64().unwrap_or(1))
        .sum();
    let at = chrono::DateTime::from_timestamp(
        1_790_000_000 + (n as i64) * 7,
        (n % 1000) as u32 * 1_000_000,
    )
    .unwrap_or_default();
    let till = 1 + next(6);
    let payment = ["card", "cash", "contactless", "voucher"][next(4)];
    let mut sale = json!({
        "id": format!("link-{n}"),
        "type": "sale",
        "till": format!("till-{till:02}"),
        "receipt": format!("{till:02}-{:06}", n),
        "at": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "lines": lines,
        "total_cents": total,
        "payment": payment,
    });
    if next(10) < 6 {
        sale["customer"] = customers[next(customers.len())]["id"].clone();
    }
    sale
}

fn idle_json(rtts: &[f64]) -> Value {
    json!({
        "tpe_samples": rtts.len(),
        "tpe_p50_ms": round1(percentile(rtts, 50.0)),
        "tpe_p95_ms": round1(percentile(rtts, 95.0)),
        "tpe_p99_ms": round1(percentile(rtts, 99.0)),
    })
}

async fn profile_run(
    bins: Bins,
    profile: Profile,
    plan: &Plan,
    dir: &Path,
) -> anyhow::Result<Value> {
    println!("\n== {} ==", profile.name);
    let mut line = Line::start(bins, profile, dir).await?;
    line.emu
        .start_tpe(TPE_EVERY, TERMINALS)
        .map_err(anyhow::Error::msg)?;
    // The box enrolls and syncs once, so every measured run is the same enrolled box.
    line.dropin(
        Variant::On,
        &format!("{}\n[ota]\nenabled = false\n", Line::QUIET),
    )?;
    line.start_box("box-first.log").await?;
    line.wait(
        "the first full sync",
        "box-first.log",
        Duration::from_secs(120),
        |doc| {
            storebox_sim::MODULES
                .iter()
                .all(|m| doc["modules"][m]["last_full_ok"].is_string())
        },
    )
    .await?;
    line.stop_box();

    let from = wall();
    tokio::time::sleep(plan.idle).await;
    let idle_rtts: Vec<f64> = line
        .emu
        .tpe_rounds()
        .iter()
        .filter(|r| r.at >= from)
        .map(|r| r.rtt_ms)
        .collect();
    let idle = idle_json(&idle_rtts);
    println!("idle: {idle}");
    let down = f64::from(profile.down_kbit) * 125.0;
    let up = f64::from(profile.up_kbit) * 125.0;

    let mut scenarios = Vec::new();
    for variant in Variant::ALL {
        let mut cold = Measure::default();
        for n in 0..plan.cold_syncs {
            let w = line.cold_sync(variant, n).await?;
            cold.add(&line.emu, &w);
        }
        let cold = cold.json(&idle, down);
        println!("cold full sync, {}: {cold}", variant.name());
        let mut push = Measure::default();
        for n in 0..plan.pushes {
            let w = line.push_burst(variant, n).await?;
            push.add(&line.emu, &w);
        }
        let push = push.json(&idle, up);
        println!("push of {SALES} sales, {}: {push}", variant.name());
        let version = format!("2.0.{}", variant as u32 + 1);
        let (w, _) = line
            .bundle(variant, &version, plan.bundle_bytes, None)
            .await?;
        let mut bundle = Measure::default();
        bundle.add(&line.emu, &w);
        let bundle = bundle.json(&idle, down);
        println!("bundle download, {}: {bundle}", variant.name());
        scenarios.push(json!({
            "variant": variant.key(),
            "name": variant.name(),
            "cold_full_sync": cold,
            "push_2000_sales": push,
            "bundle_download": bundle,
        }));
    }

    // Another device's bulk download during a bundle download.
    let (after, lasting) = if profile.down_kbit <= 4_000 {
        (Duration::from_secs(5), Duration::from_secs(10))
    } else {
        (Duration::from_secs(3), Duration::from_secs(5))
    };
    // Long enough to outlast the other transfer, whoever gets the line meanwhile.
    let size = (f64::from(profile.down_kbit)
        * 125.0
        * (after + lasting + Duration::from_secs(6)).as_secs_f64()) as usize;
    let mut competing = Vec::new();
    for (i, variant) in [Variant::On, Variant::Off].into_iter().enumerate() {
        let version = format!("3.0.{}", i + 1);
        let (w, times) = line
            .bundle(variant, &version, size, Some((after, lasting)))
            .await?;
        let Some((start, stop)) = times else {
            bail!("the other device's transfer did not start");
        };
        let bins = line.shares(start - 2.0, (stop + 4.0).min(w.to), 0.25);
        let before: Vec<f64> = bins.iter().filter(|b| b.0 < 2.0).map(|b| b.1).collect();
        let during: Vec<f64> = bins
            .iter()
            .filter(|b| b.0 >= 4.0 && b.0 < 2.0 + (stop - start))
            .map(|b| b.1)
            .collect();
        let below = bins
            .iter()
            .find(|b| b.0 >= 2.0 && b.1 < 0.2)
            .map(|b| round2(b.0 + 0.25 - 2.0));
        let back = bins
            .iter()
            .find(|b| b.0 >= 2.0 + (stop - start) && b.1 >= 0.7)
            .map(|b| round2(b.0 + 0.25 - 2.0 - (stop - start)));
        let mean = |v: &[f64]| round3(v.iter().sum::<f64>() / v.len().max(1) as f64);
        let entry = json!({
            "variant": variant.key(),
            "name": variant.name(),
            "box_share_before": mean(&before),
            "box_share_while_other_runs": mean(&during),
            "seconds_until_box_share_below_20pct": below,
            "seconds_until_box_share_back_above_70pct": back,
            "other_device_seconds": round2(stop - start),
            "shares_per_250ms": bins.iter().map(|b| json!([b.0, b.1, b.2])).collect::<Vec<_>>(),
        });
        println!(
            "another device, {}: before {} while {} below 20 % after {:?} s, back after {:?} s",
            variant.name(),
            entry["box_share_before"],
            entry["box_share_while_other_runs"],
            below,
            back
        );
        competing.push(entry);
    }
    Ok(json!({
        "profile": {
            "name": profile.name,
            "down_kbit": profile.down_kbit,
            "up_kbit": profile.up_kbit,
            "delay_ms_each_way": profile.delay_ms,
            "buffer_ms": profile.buffer_ms,
        },
        "idle": idle,
        "scenarios": scenarios,
        "another_device": competing,
    }))
}

/// Runs the benchmark on both lines, or on those named in `only` ("4/1", "20/2").
pub async fn run(plan: &Plan, only: &[String]) -> anyhow::Result<()> {
    crate::linkemu::preflight().map_err(|e| anyhow::anyhow!("the line emulator {e}"))?;
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let started_at = chrono::Utc::now();
    let tmp = tempfile::tempdir()?;
    let _ = crate::common::RUN_DIR.set(tmp.path().to_owned());
    let mut profiles = Vec::new();
    let chosen = |p: &Profile| {
        only.is_empty()
            || only
                .iter()
                .any(|o| *o == format!("{}/{}", p.down_kbit / 1000, p.up_kbit / 1000))
    };
    for (i, profile) in [ADSL, VDSL].into_iter().filter(chosen).enumerate() {
        let bins = Bins {
            hub: sibling(&exe, "storehub")?,
            storebox: sibling(&exe, "storebox")?,
        };
        let mut result =
            profile_run(bins, profile, plan, &tmp.path().join(format!("line{i}"))).await?;
        result["measured"] = machine_info(chrono::Utc::now());
        profiles.push(result);
    }
    if !only.is_empty() {
        // One line at a time: the other's figures stay from their own run, with its date
        // and source.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("results/link.json");
        let earlier: Value = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        for old in earlier["profiles"].as_array().into_iter().flatten() {
            let name = &old["profile"]["name"];
            if !profiles.iter().any(|p| p["profile"]["name"] == *name) {
                profiles.push(old.clone());
            }
        }
        profiles.sort_by_key(|p| p["profile"]["down_kbit"].as_u64().unwrap_or(0));
    }
    let results = json!({
        "machine": machine_info(started_at),
        "plan": {
            "quick": plan.quick,
            "cold_full_syncs_per_variant": plan.cold_syncs,
            "pushes_per_variant": plan.pushes,
            "sales_per_push": SALES,
            "bundle_bytes": plan.bundle_bytes,
            "terminals": TERMINALS,
            "terminal_period_ms": TPE_EVERY.as_millis() as u64,
        },
        "targets_4_1": {
            "tpe_added_p95_ms_max": 15,
            "tpe_added_p99_ms_max": 30,
            "tpe_lost_packets_max": 0,
            "line_share_alone_min": 0.8,
            "box_share_below_20pct_within_s": 2,
        },
        "profiles": profiles,
    });
    write_results("link", &results, &table(&results))?;
    Ok(())
}

fn table(r: &Value) -> String {
    let mut t = format!(
        "# Link sharing: payment terminals while the box syncs\n\n{}\n\
         Emulated lines (three network namespaces, tbf for the modem's rate and buffer, a \
         user-space relay for the delay, CUBIC at both ends); real `storehub` and `storebox`. \
         {} terminals, each a 200-byte request and a 500-byte answer every {} ms on its own \
         TCP connection; their round trips during each transfer (first to last byte on the \
         line) against the idle line measured in the same run. *Share*: the transfer's bytes on \
         the line, headers included, over the line's rate and the transfer's duration. \
         *Lost*: packets the terminals or their host had to retransmit (D-SACKed \
         retransmissions excluded). Cold syncs: {} per variant; pushes of {} sales: {} per \
         variant; bundle: {} MB.\n",
        machine_line(&r["machine"]),
        r["plan"]["terminals"],
        r["plan"]["terminal_period_ms"],
        r["plan"]["cold_full_syncs_per_variant"],
        r["plan"]["sales_per_push"],
        r["plan"]["pushes_per_variant"],
        r["plan"]["bundle_bytes"].as_f64().unwrap_or(0.0) / 1e6,
    );
    for p in r["profiles"].as_array().into_iter().flatten() {
        let idle = &p["idle"];
        t += &format!(
            "\n## {}\n\nMeasured {}\nIdle line: terminal round trip p50 {} ms, p95 {} ms, p99 {} ms ({} samples).\n\n\
             | transfer | variant | time (s) | share of the line | TPE p50 (ms) | p95 | p99 | added p95 | added p99 | lost | samples |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            p["profile"]["name"].as_str().unwrap_or("?"),
            if p["measured"].is_object() {
                machine_line(&p["measured"])
            } else {
                "with the run above.\n".into()
            },
            idle["tpe_p50_ms"],
            idle["tpe_p95_ms"],
            idle["tpe_p99_ms"],
            idle["tpe_samples"],
        );
        for (key, name) in [
            ("cold_full_sync", "cold full sync"),
            ("push_2000_sales", "push of 2,000 sales (upload)"),
            ("bundle_download", "firmware bundle download"),
        ] {
            for s in p["scenarios"].as_array().into_iter().flatten() {
                let m = &s[key];
                t += &format!(
                    "| {name} | {} | {} | {:.0} % | {} | {} | {} | {:+} | {:+} | {} | {} |\n",
                    s["name"].as_str().unwrap_or(""),
                    m["seconds_each"],
                    m["line_share"].as_f64().unwrap_or(0.0) * 100.0,
                    m["tpe_p50_ms"],
                    m["tpe_p95_ms"],
                    m["tpe_p99_ms"],
                    m["tpe_added_p95_ms"].as_f64().unwrap_or(0.0),
                    m["tpe_added_p99_ms"].as_f64().unwrap_or(0.0),
                    m["tpe_lost_packets"],
                    m["tpe_samples"],
                );
            }
        }
        t += "\nAnother device's bulk download (CUBIC) starts during a bundle download and stops later; the box's share of the downstream line:\n\n\
              | variant | share before | share while the other runs | below 20 % after | back above 70 % after |\n|---|---:|---:|---:|---:|\n";
        for c in p["another_device"].as_array().into_iter().flatten() {
            let secs = |v: &Value| v.as_f64().map_or("never".into(), |s| format!("{s:.2} s"));
            t += &format!(
                "| {} | {:.0} % | {:.0} % | {} | {} |\n",
                c["name"].as_str().unwrap_or(""),
                c["box_share_before"].as_f64().unwrap_or(0.0) * 100.0,
                c["box_share_while_other_runs"].as_f64().unwrap_or(0.0) * 100.0,
                secs(&c["seconds_until_box_share_below_20pct"]),
                secs(&c["seconds_until_box_share_back_above_70pct"]),
            );
        }
    }
    t
}
