//! A shop's Internet line, emulated: three network namespaces, "shop" (the box, a payment
//! terminal, another device), "wan" (the line) and "cloud" (the hub, the terminal's host,
//! the other device's server).
//!
//! ```text
//!  shop 10.91.1.2 ──veth── wan ──veth── 10.91.2.2 cloud
//!                          │  every packet routed into a TUN device, held `delay` by a
//!                          │  user-space relay (linkemu.py relay), written back, then
//!                          │  through a tbf per direction: the modem's rate and buffer
//! ```
//!
//! This kernel has no netem, hence the relay; tbf gives the rate and the buffer (`latency`).
//! Both ends use CUBIC, as shop devices and servers do. The relay also counts bytes per flow
//! (`flows()`), so the box's share of the line is measured where the line is.
//!
//! Nothing leaves the namespaces: no address or interface appears outside them; the tests
//! reach the processes inside through forwarders from the caller's loopback (`forward`).
//! Namespaces (with their interfaces) and every process are removed when the [`Emu`]
//! drops, a panic included. Needs root, `ip`/`tc` (iproute2), `python3` and `/dev/net/tun`:
//! [`preflight`] says which is missing.
//!
//! Shared by the tests (`tests/link_sharing.rs`) and the benchmark (`bench link`, which
//! includes this file by path).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The relay, the terminal, the other device and the forwarders.
const SCRIPT: &str = include_str!("linkemu.py");

pub const SHOP_IP: &str = "10.91.1.2";
pub const CLOUD_IP: &str = "10.91.2.2";
const WAN_SHOP_IP: &str = "10.91.1.1";
const WAN_CLOUD_IP: &str = "10.91.2.1";
/// The terminal's host in "cloud".
pub const TPE_PORT: u16 = 9100;
/// The other device's server in "cloud".
pub const BULK_PORT: u16 = 9200;

/// A line: rates, one-way delay, modem buffer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    pub name: &'static str,
    pub down_kbit: u32,
    pub up_kbit: u32,
    /// One way, each direction.
    pub delay_ms: u32,
    /// The modem's buffer, as time at the line's rate.
    pub buffer_ms: u32,
}

/// ADSL: 4 Mbit/s down, 1 Mbit/s up, 20 ms each way, 400 ms of buffer.
pub const ADSL: Profile = Profile {
    name: "4/1 Mbit/s, 20 ms, 400 ms buffer",
    down_kbit: 4_000,
    up_kbit: 1_000,
    delay_ms: 20,
    buffer_ms: 400,
};

/// VDSL: 20 Mbit/s down, 2 Mbit/s up, 15 ms each way, 200 ms of buffer.
pub const VDSL: Profile = Profile {
    name: "20/2 Mbit/s, 15 ms, 200 ms buffer",
    down_kbit: 20_000,
    up_kbit: 2_000,
    delay_ms: 15,
    buffer_ms: 200,
};

/// Where a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    Shop,
    Wan,
    Cloud,
}

/// Says what this machine lacks to run the emulator, if anything.
pub fn preflight() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0");
    if !root {
        return Err("needs root (network namespaces, tc, a TUN device)".into());
    }
    for (tool, args) in [("ip", &["netns", "list"][..]), ("tc", &["-V"][..])] {
        let ok = Command::new(tool)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(format!("needs `{tool}` (Debian: apt-get install iproute2)"));
        }
    }
    let python = Command::new("python3")
        .args(["-c", "import ctypes, fcntl, select"])
        .status()
        .is_ok_and(|s| s.success());
    if !python {
        return Err("needs python3".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err("needs /dev/net/tun (the tun module)".into());
    }
    Ok(())
}

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A child process of the emulator, killed when the emulator drops (or by [`Emu::kill`]).
pub struct Handle(usize);

/// The emulated line and everything running around it.
pub struct Emu {
    pub profile: Profile,
    namespaces: Vec<String>,
    children: Vec<Option<Child>>,
    pub dir: PathBuf,
    script: PathBuf,
    stats: PathBuf,
    tag: String,
}

impl Emu {
    /// Sets up the three namespaces, the veths, the relay and the tbf of `profile`. `dir`
    /// receives the script, logs and statistics.
    pub fn start(profile: Profile, dir: &Path) -> Result<Emu, String> {
        preflight()?;
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("le{}x{n}", std::process::id());
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let script = dir.join("linkemu.py");
        std::fs::write(&script, SCRIPT).map_err(|e| e.to_string())?;
        let mut emu = Emu {
            profile,
            namespaces: Vec::new(),
            children: Vec::new(),
            dir: dir.to_owned(),
            script,
            stats: dir.join("flows.jsonl"),
            tag,
        };
        emu.build()?;
        Ok(emu)
    }

    pub fn ns(&self, site: Site) -> String {
        let suffix = match site {
            Site::Shop => "shop",
            Site::Wan => "wan",
            Site::Cloud => "cloud",
        };
        format!("{}-{suffix}", self.tag)
    }

    fn build(&mut self) -> Result<(), String> {
        let (shop, wan, cloud) = (
            self.ns(Site::Shop),
            self.ns(Site::Wan),
            self.ns(Site::Cloud),
        );
        for ns in [&shop, &wan, &cloud] {
            run(&["ip", "netns", "add", ns])?;
            self.namespaces.push(ns.clone());
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        // Interface names are per namespace; each end is created directly inside its own.
        let t = &self.tag;
        let (s, ws, c, wc) = (
            format!("{t}s"),
            format!("{t}S"),
            format!("{t}c"),
            format!("{t}C"),
        );
        for (a, ans, b, bns) in [(&s, &shop, &ws, &wan), (&c, &cloud, &wc, &wan)] {
            run(&[
                "ip", "link", "add", a, "netns", ans, "type", "veth", "peer", "name", b, "netns",
                bns,
            ])?;
        }
        for (ns, dev, addr) in [
            (&shop, &s, SHOP_IP),
            (&cloud, &c, CLOUD_IP),
            (&wan, &ws, WAN_SHOP_IP),
            (&wan, &wc, WAN_CLOUD_IP),
        ] {
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                dev,
            ])?;
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        }
        // Shop devices and servers run CUBIC, whatever this kernel's default: set on the
        // routes across the line (a namespace may not change its default to it).
        for (ns, via) in [(&shop, WAN_SHOP_IP), (&cloud, WAN_CLOUD_IP)] {
            run(&[
                "ip", "-n", ns, "route", "add", "default", "via", via, "congctl", "cubic",
            ])?;
        }
        self.sh(
            &wan,
            "echo 1 > /proc/sys/net/ipv4/ip_forward; \
             for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done",
        )?;

        // The delay: the relay opens the TUN device; packets from either side go into it,
        // come back out of it after the delay, and are routed on by the main table.
        let relay = self.spawn_script(
            Site::Wan,
            &[
                "relay",
                "--tun",
                "dly",
                "--delay-ms",
                &self.profile.delay_ms.to_string(),
                "--stats",
                &self.stats.display().to_string(),
                "--stats-ms",
                "20",
            ],
            "relay.log",
        )?;
        let start = Instant::now();
        while run(&["ip", "-n", &wan, "link", "show", "dly"]).is_err() {
            self.check_alive(&relay, "the relay")?;
            if start.elapsed() > Duration::from_secs(10) {
                return Err("the relay did not open its TUN device".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        run(&["ip", "-n", &wan, "link", "set", "dly", "up"])?;
        self.sh(&wan, "echo 0 > /proc/sys/net/ipv4/conf/dly/rp_filter")?;
        run(&[
            "ip", "-n", &wan, "rule", "add", "iif", &ws, "table", "100", "pref", "100",
        ])?;
        run(&[
            "ip", "-n", &wan, "rule", "add", "iif", &wc, "table", "100", "pref", "101",
        ])?;
        run(&[
            "ip", "-n", &wan, "route", "add", "default", "dev", "dly", "table", "100",
        ])?;

        // The modem: a rate and a buffer per direction. Burst: two full packets, as a line
        // that sends one packet while the next waits.
        let p = self.profile;
        for (dev, kbit) in [(&ws, p.down_kbit), (&wc, p.up_kbit)] {
            run(&[
                "tc",
                "-n",
                &wan,
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                &format!("{kbit}kbit"),
                "burst",
                "3028",
                "latency",
                &format!("{}ms", p.buffer_ms),
            ])?;
        }
        Ok(())
    }

    fn sh(&self, ns: &str, script: &str) -> Result<String, String> {
        run(&["ip", "netns", "exec", ns, "sh", "-c", script])
    }

    fn check_alive(&mut self, h: &Handle, what: &str) -> Result<(), String> {
        if let Some(Some(child)) = self.children.get_mut(h.0) {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("{what} exited ({status})"));
            }
        }
        Ok(())
    }

    /// Starts `program args` in `site`, output to `log` in the emulator's directory.
    pub fn spawn(
        &mut self,
        site: Site,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: &str,
    ) -> Result<Handle, String> {
        let out = std::fs::File::create(self.dir.join(log)).map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.ns(site)])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command
            .spawn()
            .map_err(|e| format!("starting {}: {e}", program.display()))?;
        self.children.push(Some(child));
        Ok(Handle(self.children.len() - 1))
    }

    fn spawn_script(&mut self, site: Site, args: &[&str], log: &str) -> Result<Handle, String> {
        let script = self.script.display().to_string();
        let mut all = vec!["-u", script.as_str()];
        all.extend_from_slice(args);
        self.spawn(site, Path::new("python3"), &all, &[], log)
    }

    /// Whether a child still runs.
    pub fn alive(&mut self, h: &Handle) -> bool {
        match self.children.get_mut(h.0) {
            Some(Some(c)) => matches!(c.try_wait(), Ok(None)),
            _ => false,
        }
    }

    pub fn kill(&mut self, h: &Handle) {
        if let Some(Some(mut child)) = self.children.get_mut(h.0).map(Option::take) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// Forwards a port on the caller's loopback to `to` inside `site`; answers the local
    /// address.
    pub fn forward(&mut self, site: Site, to: SocketAddr) -> Result<SocketAddr, String> {
        let log = format!("forward-{}.log", self.children.len());
        let script = self.script.display().to_string();
        let out = std::fs::File::create(self.dir.join(&log)).map_err(|e| e.to_string())?;
        let child = Command::new("python3")
            .args([
                "-u",
                &script,
                "forward",
                "--listen",
                "127.0.0.1:0",
                "--netns",
            ])
            .arg(format!("/run/netns/{}", self.ns(site)))
            .args(["--to", &to.to_string()])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting a forwarder: {e}"))?;
        self.children.push(Some(child));
        let start = Instant::now();
        loop {
            let text = self.log(&log);
            if let Some(port) = text
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<u16>().ok())
            {
                return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err(format!("the forwarder to {to} did not start: {text}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_ready(&mut self, h: &Handle, log: &str, what: &str) -> Result<(), String> {
        let start = Instant::now();
        while !self.log(log).contains("ready") {
            self.check_alive(h, what)?;
            if start.elapsed() > Duration::from_secs(10) {
                return Err(format!("{what} did not start: {}", self.log(log)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Payment terminals: their host in "cloud", `count` terminals in "shop", each with one
    /// 200-byte request and 500-byte answer every `every`, started evenly spread over the
    /// period. Their round trips accumulate in [`Emu::tpe_rounds`].
    pub fn start_tpe(&mut self, every: Duration, count: u32) -> Result<(), String> {
        let listen = format!("{CLOUD_IP}:{TPE_PORT}");
        let server_out = self.dir.join("tpe-server.jsonl").display().to_string();
        let server = self.spawn_script(
            Site::Cloud,
            &["tpe-server", "--listen", &listen, "--out", &server_out],
            "tpe-server.log",
        )?;
        self.wait_ready(&server, "tpe-server.log", "the terminals' host")?;
        let out = self.dir.join("tpe.jsonl").display().to_string();
        let every_ms = every.as_millis().to_string();
        for id in 0..count {
            let offset = (every.as_millis() as u32 * id / count.max(1)).to_string();
            self.spawn_script(
                Site::Shop,
                &[
                    "tpe-client",
                    "--connect",
                    &listen,
                    "--every-ms",
                    &every_ms,
                    "--offset-ms",
                    &offset,
                    "--id",
                    &id.to_string(),
                    "--out",
                    &out,
                ],
                &format!("tpe-client-{id}.log"),
            )?;
        }
        Ok(())
    }

    /// Every round trip of the terminals so far.
    pub fn tpe_rounds(&self) -> Vec<Round> {
        self.log("tpe.jsonl")
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| {
                Some(Round {
                    terminal: v["id"].as_u64().unwrap_or(0),
                    at: v["t"].as_f64()?,
                    rtt_ms: v["rtt_ms"].as_f64()?,
                    retrans: v["retrans"].as_u64()?,
                    dsack: v["dsack"].as_u64().unwrap_or(0),
                })
            })
            .collect()
    }

    /// Packets the terminals and their host lost between two wall-clock times: their
    /// retransmissions, less those the other side reported as duplicates (D-SACK).
    pub fn tpe_lost(&self, from: f64, to: f64) -> u64 {
        // Per connection: the counter before the window, and its highest value in it.
        let mut rise: BTreeMap<String, (u64, Option<u64>)> = BTreeMap::new();
        let mut see = |key: String, at: f64, lost: u64| {
            let e = rise.entry(key).or_insert((0, None));
            if at < from {
                e.0 = e.0.max(lost);
            } else if at < to {
                e.1 = Some(e.1.unwrap_or(0).max(lost));
            }
        };
        for r in self.tpe_rounds() {
            see(
                format!("t{}", r.terminal),
                r.at,
                r.retrans.saturating_sub(r.dsack),
            );
        }
        for v in self
            .log("tpe-server.jsonl")
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            let lost = v["retrans"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(v["dsack"].as_u64().unwrap_or(0));
            see(
                format!("s{}", v["conn"]),
                v["t"].as_f64().unwrap_or(0.0),
                lost,
            );
        }
        rise.values()
            .map(|(before, during)| during.map_or(0, |d| d.saturating_sub(*before)))
            .sum()
    }

    /// Another device's bulk transfer, CUBIC with the kernel's default buffers: a download
    /// (server in "cloud" sending to "shop") or an upload. Kill the handles to stop it.
    pub fn start_bulk(&mut self, download: bool) -> Result<(Handle, Handle), String> {
        let listen = format!("{CLOUD_IP}:{BULK_PORT}");
        let (server_mode, client_mode) = if download {
            ("send", "recv")
        } else {
            ("recv", "send")
        };
        let n = self.children.len();
        let server_log = format!("bulk-server-{n}.log");
        let server = self.spawn_script(
            Site::Cloud,
            &["bulk", "--listen", &listen, "--mode", server_mode],
            &server_log,
        )?;
        self.wait_ready(&server, &server_log, "the bulk server")?;
        let client_log = format!("bulk-client-{n}.log");
        let client = self.spawn_script(
            Site::Shop,
            &["bulk", "--connect", &listen, "--mode", client_mode],
            &client_log,
        )?;
        self.wait_ready(&client, &client_log, "the bulk client")?;
        Ok((server, client))
    }

    /// The relay's counts so far: per sample (every 20 ms), wall time and per flow
    /// ("src:port>dst:port") the IP bytes and packets that entered the line.
    pub fn flows(&self) -> Vec<FlowSample> {
        std::fs::read_to_string(&self.stats)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| {
                let at = v["t"].as_f64()?;
                let flows = v["flows"]
                    .as_object()?
                    .iter()
                    .filter_map(|(k, c)| Some((k.clone(), (c[0].as_u64()?, c[1].as_u64()?))))
                    .collect();
                Some(FlowSample { at, flows })
            })
            .collect()
    }
}

impl Drop for Emu {
    fn drop(&mut self) {
        for child in self.children.iter_mut().filter_map(Option::take) {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// One round trip of a terminal.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    pub terminal: u64,
    /// Wall-clock time the request left, seconds since the epoch.
    pub at: f64,
    pub rtt_ms: f64,
    /// Retransmissions by the terminal so far, and of those the ones its host reported as
    /// duplicates (spurious).
    pub retrans: u64,
    pub dsack: u64,
}

/// The relay's counters at one instant.
#[derive(Debug, Clone)]
pub struct FlowSample {
    pub at: f64,
    pub flows: BTreeMap<String, (u64, u64)>,
}

impl FlowSample {
    /// Line bytes (IP plus the Ethernet header the shaper counts) of the flows whose key
    /// matches, in that direction.
    pub fn bytes(&self, matches: impl Fn(&str) -> bool) -> u64 {
        self.flows
            .iter()
            .filter(|(k, _)| matches(k))
            .map(|(_, (b, p))| b + 14 * p)
            .sum()
    }
}

/// Wall-clock now, seconds since the epoch, as the helpers write it.
pub fn wall() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Percentile (nearest rank) of `values`, 0 for none.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.saturating_sub(1).min(v.len() - 1)]
}

/// A hub and its store's box on the emulated line: `storehub init` in `dir`, the hub's
/// certificate issued again for its address in "cloud", the hub in "cloud" (admin API
/// forwarded to the caller's loopback) and the box config pointed at it.
pub struct Sites {
    pub dir: PathBuf,
    pub store: String,
    /// The hub's admin API, forwarded.
    pub admin: SocketAddr,
    pub admin_token: String,
    /// The hub's sync port in "cloud".
    pub hub_port: u16,
    pub box_config: PathBuf,
    hub: Option<Handle>,
    boxed: Option<Handle>,
    /// The box's LAN API, forwarded (once the box started).
    pub lan: Option<SocketAddr>,
}

const HUB_SYNC_PORT: u16 = 7443;
const HUB_ADMIN_PORT: u16 = 7080;
const BOX_LAN_PORT: u16 = 8080;

impl Sites {
    pub fn setup(emu: &mut Emu, hub_bin: &Path, dir: &Path, store: &str) -> Result<Sites, String> {
        let out = Command::new(hub_bin)
            .arg("init")
            .arg("--dir")
            .arg(dir)
            .args(["--store", store])
            .args(["--hub-port", &HUB_SYNC_PORT.to_string()])
            .args(["--admin-port", &HUB_ADMIN_PORT.to_string()])
            .args(["--lan-port", &BOX_LAN_PORT.to_string()])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "storehub init: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        reissue_hub_cert(dir, CLOUD_IP)?;
        let hub_toml = dir.join("hub.toml");
        let text = std::fs::read_to_string(&hub_toml).map_err(|e| e.to_string())?;
        let from = format!("\"127.0.0.1:{HUB_SYNC_PORT}\"");
        if !text.contains(&from) {
            return Err(format!("no sync listen address {from} in hub.toml"));
        }
        std::fs::write(
            &hub_toml,
            text.replace(&from, &format!("\"{CLOUD_IP}:{HUB_SYNC_PORT}\"")),
        )
        .map_err(|e| e.to_string())?;
        let admin_token = std::fs::read_to_string(dir.join("admin.token"))
            .map_err(|e| e.to_string())?
            .trim()
            .to_owned();
        let config = hub_toml.display().to_string();
        let hub = emu.spawn(
            Site::Cloud,
            hub_bin,
            &["serve", "--config", &config],
            &[],
            "hub.log",
        )?;
        let admin = emu.forward(
            Site::Cloud,
            SocketAddr::from(([127, 0, 0, 1], HUB_ADMIN_PORT)),
        )?;
        let box_config = dir.join("boxes").join(format!("{store}.toml"));
        let dropins = dir.join("boxes").join("storebox.d");
        std::fs::create_dir_all(&dropins).map_err(|e| e.to_string())?;
        std::fs::write(
            dropins.join("40-linkemu.toml"),
            format!(
                "[hub]\nurl = \"https://{CLOUD_IP}:{HUB_SYNC_PORT}\"\n\n[discovery]\nenabled = false\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        Ok(Sites {
            dir: dir.to_owned(),
            store: store.to_owned(),
            admin,
            admin_token,
            hub_port: HUB_SYNC_PORT,
            box_config,
            hub: Some(hub),
            boxed: None,
            lan: None,
        })
    }

    /// Writes the box's drop-in (`storebox.d/50-linkemu-run.toml`), replacing the last one.
    pub fn box_dropin(&self, text: &str) -> Result<(), String> {
        let path = self
            .box_config
            .parent()
            .map(|p| p.join("storebox.d").join("50-linkemu-run.toml"))
            .ok_or("no box config directory")?;
        std::fs::write(path, text).map_err(|e| e.to_string())
    }

    /// The box's data directory.
    pub fn box_data(&self) -> PathBuf {
        self.dir.join("boxes").join(format!("{}-data", self.store))
    }

    /// Starts the box in "shop" (its LAN API forwarded once), `log` in the emulator's dir.
    pub fn start_box(
        &mut self,
        emu: &mut Emu,
        box_bin: &Path,
        env: &[(&str, &str)],
        log: &str,
    ) -> Result<SocketAddr, String> {
        if let Some(h) = self.boxed.take() {
            emu.kill(&h);
        }
        let config = self.box_config.display().to_string();
        let h = emu.spawn(
            Site::Shop,
            box_bin,
            &["serve", "--config", &config],
            env,
            log,
        )?;
        self.boxed = Some(h);
        let lan = match self.lan {
            Some(lan) => lan,
            None => {
                let lan =
                    emu.forward(Site::Shop, SocketAddr::from(([127, 0, 0, 1], BOX_LAN_PORT)))?;
                self.lan = Some(lan);
                lan
            }
        };
        Ok(lan)
    }

    pub fn stop_box(&mut self, emu: &mut Emu) {
        if let Some(h) = self.boxed.take() {
            emu.kill(&h);
        }
    }

    pub fn box_alive(&self, emu: &mut Emu) -> bool {
        self.boxed.as_ref().is_some_and(|h| emu.alive(h))
    }

    pub fn hub_alive(&self, emu: &mut Emu) -> bool {
        self.hub.as_ref().is_some_and(|h| emu.alive(h))
    }

    /// Whether a relay flow key is the box's connection to the hub, and which way.
    pub fn is_box_down(&self, key: &str) -> bool {
        key.starts_with(&format!("{CLOUD_IP}:{}>", self.hub_port))
    }

    pub fn is_box_up(&self, key: &str) -> bool {
        key.ends_with(&format!(">{CLOUD_IP}:{}", self.hub_port))
    }
}

/// Issues the hub's server certificate again, for `ip` (and localhost), with the CA
/// `storehub init` made: the box checks the hub's address against it.
pub fn reissue_hub_cert(dir: &Path, ip: &str) -> Result<(), String> {
    let ca_key = std::fs::read_to_string(dir.join("ca.key")).map_err(|e| e.to_string())?;
    let ca_key = rcgen::KeyPair::from_pem(&ca_key).map_err(|e| e.to_string())?;
    let ca_params = storehub::pki::ca_params();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()]).map_err(|e| e.to_string())?;
    let addr: std::net::IpAddr = ip.parse().map_err(|e| format!("{ip}: {e}"))?;
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress(addr));
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "storehub");
    params.distinguished_name = dn;
    let now = std::time::SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(30 * 86_400)).into();
    let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("hub.crt"), cert.pem()).map_err(|e| e.to_string())?;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join("hub.key"))
        .and_then(|mut f| f.write_all(key.serialize_pem().as_bytes()))
        .map_err(|e| e.to_string())?;
    Ok(())
}
