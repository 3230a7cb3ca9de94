//! Discovery: how tills find the box on the shop LAN without being told its address.
//!
//! Owns two ways of being found and the client that uses both:
//! - **DNS-SD over multicast DNS**: the service `_storebox._tcp.local.`, instance name = the
//!   box name (`[discovery] name`, default `storebox-<store_id>`), SRV port = the LAN port,
//!   TXT `store`, `api`, `name` (and `fp` once the LAN has a TLS certificate).
//! - **The UDP probe** on `[discovery] udp_port` (default 48555), for LANs whose switches or
//!   access points filter multicast: a datagram starting with `STOREBOX?` is answered, to its
//!   sender, with one JSON datagram `{"store","name","api","port"}`.
//! - `storebox discover`: an mDNS browse plus the probe sent to 255.255.255.255 and to each
//!   interface's broadcast address, merged into one line per box.
//!
//! Must not touch: the till API, the database, the journal or the sync processes. It reads
//! the config and the LAN port once, and nothing else in the daemon waits on it: every
//! failure (no multicast, a port taken, a malformed datagram) is logged or dropped here and
//! the till API keeps serving. The daemon speaks only on the interface holding the LAN listen
//! address (every up, non-loopback, non-point-to-point IPv4 interface when it listens on
//! 0.0.0.0), so a box with a second network (a VPN, a back-office LAN) is not shown there.
//!
//! Why a minimal responder and not the `mdns-sd` crate: that crate joins the mDNS group on
//! every interface of the machine when its daemon starts, before an interface selection can
//! apply, which would announce the box on networks that are not its LAN. What is left out of
//! RFC 6762 on purpose: IPv6, probing for name conflicts (the name comes from the config and
//! carries the store id), known-answer suppression (answers are rate-limited to one per
//! second per interface instead) and goodbye packets.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::config::BoxConfig;

/// The default port of the UDP probe (IANA-unassigned, in the registered range).
pub const DEFAULT_UDP_PORT: u16 = 48555;
/// The DNS-SD service type.
pub const SERVICE_TYPE: &str = "_storebox._tcp.local.";
/// The till API version announced (TXT `api`, probe answer `api`).
pub const API_VERSION: &str = "1";
/// What a probe datagram starts with; anything after it is ignored, so later clients may add
/// to it.
pub const PROBE: &[u8] = b"STOREBOX?";

const MDNS_PORT: u16 = 5353;
const MDNS_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
/// How often the daemon looks for interfaces that appeared or changed (a DHCP lease that
/// arrives after the daemon started, when listening on 0.0.0.0).
const RECHECK: Duration = Duration::from_secs(10);
/// RFC 6762 §6: a record is multicast at most once a second per interface.
const MULTICAST_GAP: Duration = Duration::from_secs(1);
/// TTLs (RFC 6762 §10): host records (SRV, A) 120 s, the others 75 minutes.
const TTL_HOST: u32 = 120;
const TTL_OTHER: u32 = 4500;
/// Legacy unicast answers carry short TTLs (RFC 6762 §6.7).
const TTL_LEGACY_MAX: u32 = 10;
/// Most unicast answers (probe or legacy mDNS) per second and interface: a datagram is
/// small, an answer larger, so unbounded answers would make the box an amplifier.
const UNICAST_PER_SEC: u32 = 20;

const TYPE_A: u16 = 1;
const TYPE_PTR: u16 = 12;
const TYPE_TXT: u16 = 16;
const TYPE_SRV: u16 = 33;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const CLASS_ANY: u16 = 255;
/// Top bit of a question's class (unicast answer wanted) or a record's (cache flush).
const CLASS_TOP: u16 = 0x8000;

/// What the box announces about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    pub store: String,
    pub name: String,
    pub port: u16,
    /// SHA-256 fingerprint of the LAN TLS certificate, published as TXT `fp` and as `fp` in
    /// the probe answer so a till can pin it. Hook: the LAN has no TLS yet, so `serve` passes
    /// `None`; give it the fingerprint when it does and both ways publish it.
    pub fingerprint: Option<String>,
}

/// The box name: `[discovery] name`, or `storebox-<store_id>` cut to a DNS label's 63 bytes.
pub fn box_name(config: &BoxConfig) -> String {
    match &config.discovery.name {
        Some(name) => name.trim().to_owned(),
        None => {
            let mut name = format!("storebox-{}", config.store_id);
            // store ids are ASCII (checked by the config), so any byte is a char boundary.
            name.truncate(63);
            name
        }
    }
}

/// Starts advertising the box for the LAN listener bound at `lan`, on tasks of its own.
/// Returns at once; problems are logged as warnings and never stop the daemon.
pub fn start(config: &BoxConfig, lan: SocketAddr, fingerprint: Option<String>) {
    let d = &config.discovery;
    if !d.enabled {
        tracing::info!("discovery off ([discovery] enabled = false)");
        return;
    }
    let listen = match lan.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => None,
        IpAddr::V6(ip) if ip.is_unspecified() => None,
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(ip) => {
            tracing::warn!(
                "discovery off: the LAN listens on the IPv6 address {ip} and discovery \
                 advertises over IPv4 only; the till API serves as usual"
            );
            return;
        }
    };
    let advert = Arc::new(Advert {
        store: config.store_id.clone(),
        name: box_name(config),
        port: lan.port(),
        fingerprint,
    });
    tokio::spawn(supervise(advert, listen, d.udp_port, d.mdns));
}

// --- interfaces ------------------------------------------------------------------------

/// One IPv4 address of an interface, as the system lists it.
#[derive(Debug, Clone)]
struct IfAddr {
    name: String,
    ip: Ipv4Addr,
    broadcast: Option<Ipv4Addr>,
    loopback: bool,
    up: bool,
    p2p: bool,
}

/// An interface the daemon serves or the client asks on, with the addresses to use there.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Iface {
    name: String,
    addrs: Vec<Ipv4Addr>,
    broadcasts: Vec<Ipv4Addr>,
    loopback: bool,
}

fn system_addrs() -> std::io::Result<Vec<IfAddr>> {
    Ok(if_addrs::get_if_addrs()?
        .into_iter()
        .filter_map(|i| {
            let up = i.is_oper_up();
            let p2p = i.is_p2p();
            match i.addr {
                if_addrs::IfAddr::V4(v4) => Some(IfAddr {
                    loopback: v4.ip.is_loopback(),
                    name: i.name,
                    ip: v4.ip,
                    broadcast: v4.broadcast,
                    up,
                    p2p,
                }),
                if_addrs::IfAddr::V6(_) => None,
            }
        })
        .collect())
}

/// Groups addresses by interface, keeping the system's order.
fn group(addrs: impl IntoIterator<Item = IfAddr>) -> Vec<Iface> {
    let mut out: Vec<Iface> = Vec::new();
    for a in addrs {
        let i = match out.iter().position(|i| i.name == a.name) {
            Some(i) => i,
            None => {
                out.push(Iface {
                    name: a.name.clone(),
                    addrs: Vec::new(),
                    broadcasts: Vec::new(),
                    loopback: a.loopback,
                });
                out.len() - 1
            }
        };
        if let Some(iface) = out.get_mut(i) {
            if !iface.addrs.contains(&a.ip) {
                iface.addrs.push(a.ip);
            }
            if let Some(b) = a.broadcast.filter(|b| !iface.broadcasts.contains(b)) {
                iface.broadcasts.push(b);
            }
        }
    }
    out
}

/// The interfaces the daemon speaks on: the one holding `listen` (with that address only),
/// or, for a wildcard listener, every up, non-loopback, non-point-to-point interface.
fn served(addrs: &[IfAddr], listen: Option<Ipv4Addr>) -> Vec<Iface> {
    match listen {
        Some(ip) => group(addrs.iter().filter(|a| a.ip == ip).cloned()),
        None => group(
            addrs
                .iter()
                .filter(|a| a.up && !a.loopback && !a.p2p)
                .cloned(),
        ),
    }
}

/// The interfaces `storebox discover` asks on: every up, non-point-to-point interface, and
/// loopback too, so a box on this machine (the demo's, on 127.0.0.1) is found as well.
fn asked(addrs: &[IfAddr]) -> Vec<Iface> {
    group(
        addrs
            .iter()
            .filter(|a| (a.up || a.loopback) && !a.p2p)
            .cloned(),
    )
}

// --- the daemon side ---------------------------------------------------------------------

/// Keeps one responder task per served interface, following interfaces that come and go.
async fn supervise(advert: Arc<Advert>, listen: Option<Ipv4Addr>, udp_port: u16, mdns: bool) {
    let mut running: HashMap<String, (Iface, tokio::task::JoinHandle<()>)> = HashMap::new();
    let mut problem: Option<String> = None;
    loop {
        let listed = tokio::task::spawn_blocking(system_addrs).await;
        let now_problem = match listed {
            Ok(Ok(addrs)) => {
                let want = served(&addrs, listen);
                let gone: Vec<String> = running
                    .iter()
                    .filter(|(_, (iface, _))| !want.contains(iface))
                    .map(|(name, _)| name.clone())
                    .collect();
                for name in gone {
                    if let Some((_, task)) = running.remove(&name) {
                        task.abort();
                        // Waiting for the cancelled task closes its sockets before the
                        // interface's new task binds the same ports.
                        let _ = task.await;
                    }
                }
                for iface in want {
                    if running.contains_key(&iface.name) {
                        continue;
                    }
                    tracing::info!(
                        "discovery: advertising {:?} (store {}, port {}) on {} {:?}: {}UDP probe on port {udp_port}",
                        advert.name,
                        advert.store,
                        advert.port,
                        iface.name,
                        iface.addrs,
                        if mdns { "mDNS _storebox._tcp, " } else { "" },
                    );
                    let task =
                        tokio::spawn(serve_iface(iface.clone(), advert.clone(), udp_port, mdns));
                    running.insert(iface.name.clone(), (iface, task));
                }
                match listen {
                    Some(ip) if running.is_empty() => Some(format!(
                        "no interface holds the LAN listen address {ip}; will look again every {}s",
                        RECHECK.as_secs()
                    )),
                    None if running.is_empty() => Some(format!(
                        "no up IPv4 LAN interface; will look again every {}s",
                        RECHECK.as_secs()
                    )),
                    _ => None,
                }
            }
            Ok(Err(e)) => Some(format!("listing the network interfaces: {e}")),
            Err(e) => Some(format!("listing the network interfaces: {e}")),
        };
        // Warn when a problem appears or changes, not every RECHECK.
        if now_problem != problem {
            if let Some(p) = &now_problem {
                tracing::warn!("discovery: {p}");
            }
            problem = now_problem;
        }
        tokio::time::sleep(RECHECK).await;
    }
}

/// Both responders of one interface; each one failing only logs, and the other goes on.
async fn serve_iface(iface: Iface, advert: Arc<Advert>, udp_port: u16, mdns: bool) {
    let multicast = async {
        if mdns {
            if let Err(e) = mdns_responder(&iface, &advert).await {
                tracing::warn!(
                    "discovery: no mDNS on {}: {e:#}; tills can still use the UDP probe",
                    iface.name
                );
            }
        }
    };
    let probe = async {
        if let Err(e) = probe_responder(&iface, &advert, udp_port).await {
            tracing::warn!(
                "discovery: no UDP probe answers on {} port {udp_port}: {e:#}",
                iface.name
            );
        }
    };
    tokio::join!(multicast, probe);
}

/// A token bucket refilled every second.
struct Budget {
    left: u32,
    since: Instant,
}

impl Budget {
    fn new() -> Budget {
        Budget {
            left: UNICAST_PER_SEC,
            since: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        if self.since.elapsed() >= Duration::from_secs(1) {
            self.left = UNICAST_PER_SEC;
            self.since = Instant::now();
        }
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
        true
    }
}

/// A UDP socket bound to `ip:port`, or to `0.0.0.0:port` on `device` (to receive broadcasts
/// there and nowhere else). Not shared: a second box on the same interface gets an error.
fn udp_socket(ip: Ipv4Addr, port: u16, device: Option<&str>) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    if let Some(device) = device {
        s.bind_device(Some(device.as_bytes()))?;
    }
    s.bind(&SocketAddrV4::new(ip, port).into())?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// An mDNS socket on `iface`: port 5353 (or an ephemeral port for a client when 5353 cannot
/// be had), member of the mDNS group on that interface only, sending out of it only.
fn mdns_socket(iface: &Iface, client: bool) -> anyhow::Result<(UdpSocket, bool)> {
    let addr = *iface
        .addrs
        .first()
        .context("the interface has no address")?;
    let make = |port: u16, bind_ip: Ipv4Addr| -> std::io::Result<Socket> {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        // Either this or IP_MULTICAST_IF below must hold, so that our multicast leaves by
        // this interface only; it also keeps unicast to port 5353 from other interfaces
        // away. Linux before 5.7 wants CAP_NET_RAW for it; qemu-user lacks the other one.
        let bound = match s.bind_device(Some(iface.name.as_bytes())) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("discovery: SO_BINDTODEVICE {}: {e}", iface.name);
                false
            }
        };
        // Only the memberships of this socket, not every group any socket of the machine
        // joined: one socket per interface, each seeing its own interface's traffic. Best
        // effort (qemu-user lacks it): without it a socket may also hear queries from
        // another interface, and its answers still leave by this interface only.
        if let Err(e) = s.set_multicast_all_v4(false) {
            tracing::debug!("discovery: IP_MULTICAST_ALL off on {}: {e}", iface.name);
        }
        s.bind(&SocketAddrV4::new(bind_ip, port).into())?;
        s.join_multicast_v4(&MDNS_GROUP, &addr)?;
        if let Err(e) = s.set_multicast_if_v4(&addr) {
            if !bound {
                return Err(e);
            }
            tracing::debug!("discovery: IP_MULTICAST_IF {}: {e}", iface.name);
        }
        s.set_multicast_ttl_v4(255)?;
        s.set_multicast_loop_v4(true)?;
        s.set_nonblocking(true)?;
        Ok(s)
    };
    let (s, legacy) = match make(MDNS_PORT, Ipv4Addr::UNSPECIFIED) {
        Ok(s) => (s, false),
        Err(e) if client => {
            tracing::debug!(
                "discovery: port 5353 on {}: {e}; asking from another port",
                iface.name
            );
            (
                make(0, addr).with_context(|| format!("mDNS socket on {}", iface.name))?,
                true,
            )
        }
        Err(e) => {
            return Err(e).with_context(|| format!("joining mDNS on {} ({addr})", iface.name))
        }
    };
    Ok((UdpSocket::from_std(s.into())?, legacy))
}

/// What an mDNS query from a peer asks of us.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// Multicast our records on the interface (at most once a second).
    Multicast,
    /// A legacy unicast answer (RFC 6762 §6.7): the query came from a port other than 5353.
    Unicast(Vec<u8>),
}

async fn mdns_responder(iface: &Iface, advert: &Advert) -> anyhow::Result<()> {
    let (sock, _) = mdns_socket(iface, false)?;
    let records = Records::new(advert, &iface.addrs);
    let group = SocketAddr::from((MDNS_GROUP, MDNS_PORT));
    let announcement = records.response(0, &[], false);
    let mut buf = vec![0u8; 9000];
    let mut budget = Budget::new();
    let mut last_multicast: Option<Instant> = None;
    // RFC 6762 §8.3: announce twice, one second apart, then answer queries.
    let mut announcements_left = 2u32;
    let mut due = Some(Instant::now());
    loop {
        let wake = due.unwrap_or_else(|| Instant::now() + RECHECK);
        let received = tokio::select! {
            received = sock.recv_from(&mut buf) => Some(received),
            _ = tokio::time::sleep_until(wake), if due.is_some() => None,
        };
        match received {
            None => {
                if let Err(e) = sock.send_to(&announcement, group).await {
                    tracing::debug!("discovery: mDNS send on {}: {e}", iface.name);
                }
                let now = Instant::now();
                last_multicast = Some(now);
                announcements_left = announcements_left.saturating_sub(1);
                due = (announcements_left > 0).then(|| now + MULTICAST_GAP);
            }
            Some(Ok((n, src))) => {
                let reply = buf
                    .get(..n)
                    .and_then(|packet| answer_query(packet, src, &records));
                match reply {
                    Some(Reply::Multicast) => {
                        // Answer with the next multicast, sent no sooner than a second
                        // after the last one.
                        let now = Instant::now();
                        let earliest = last_multicast.map_or(now, |t| (t + MULTICAST_GAP).max(now));
                        due.get_or_insert(earliest);
                    }
                    Some(Reply::Unicast(packet)) if budget.take() => {
                        if let Err(e) = sock.send_to(&packet, src).await {
                            tracing::debug!("discovery: answering {src}: {e}");
                        }
                    }
                    _ => {}
                }
            }
            Some(Err(e)) => {
                // Errors on a UDP socket are per datagram; pause so a persistent one
                // cannot spin a core.
                tracing::debug!("discovery: mDNS receive on {}: {e}", iface.name);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Decides how to answer one datagram received on the mDNS port; `None` for anything that
/// is not a well-formed query naming one of our records.
fn answer_query(packet: &[u8], src: SocketAddr, records: &Records) -> Option<Reply> {
    let msg = parse_message(packet)?;
    if msg.flags & 0x8000 != 0 || (msg.flags >> 11) & 0xF != 0 {
        return None; // a response, or not a standard query
    }
    let asked: Vec<&Question> = msg
        .questions
        .iter()
        .filter(|q| records.answers(q))
        .collect();
    if asked.is_empty() {
        return None;
    }
    if src.port() == MDNS_PORT {
        Some(Reply::Multicast)
    } else {
        let echoed: Vec<Question> = asked.into_iter().cloned().collect();
        Some(Reply::Unicast(records.response(msg.id, &echoed, true)))
    }
}

async fn probe_responder(iface: &Iface, advert: &Advert, port: u16) -> anyhow::Result<()> {
    let sock = match udp_socket(Ipv4Addr::UNSPECIFIED, port, Some(&iface.name)) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(e).with_context(|| format!("binding UDP port {port} on {}", iface.name));
        }
        Err(e) => {
            // Without SO_BINDTODEVICE (an old kernel, no CAP_NET_RAW) the only way to stay
            // on this interface is its own address: unicast probes only, no broadcasts.
            let ip = *iface
                .addrs
                .first()
                .context("the interface has no address")?;
            let s = udp_socket(ip, port, None)
                .with_context(|| format!("binding UDP port {port} on {}", iface.name))?;
            tracing::warn!(
                "discovery: UDP probe on {} answers only probes sent to {ip}: \
                 binding to the interface failed ({e})",
                iface.name
            );
            s
        }
    };
    let sock = UdpSocket::from_std(sock.into())?;
    let answer = probe_answer(advert);
    let mut buf = vec![0u8; 2048];
    let mut budget = Budget::new();
    loop {
        match sock.recv_from(&mut buf).await {
            Ok((n, src)) => {
                let is_probe = buf.get(..n).is_some_and(|d| d.starts_with(PROBE));
                if is_probe && sane_source(src) && budget.take() {
                    if let Err(e) = sock.send_to(&answer, src).await {
                        tracing::debug!("discovery: answering the probe of {src}: {e}");
                    }
                }
            }
            Err(e) => {
                tracing::debug!("discovery: UDP probe receive on {}: {e}", iface.name);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Whether to answer a probe from `src`: never to port 0, never to the well-known ports
/// below 1024 (a spoofed source there could bounce answers into echo or chargen), never to
/// a broadcast or multicast address.
fn sane_source(src: SocketAddr) -> bool {
    match src {
        SocketAddr::V4(v4) => {
            let ip = v4.ip();
            v4.port() >= 1024 && !ip.is_broadcast() && !ip.is_multicast() && !ip.is_unspecified()
        }
        SocketAddr::V6(_) => false,
    }
}

/// The probe answer's JSON document.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct ProbeAnswer {
    store: String,
    name: String,
    api: String,
    port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fp: Option<String>,
}

fn probe_answer(advert: &Advert) -> Vec<u8> {
    serde_json::to_vec(&ProbeAnswer {
        store: advert.store.clone(),
        name: advert.name.clone(),
        api: API_VERSION.into(),
        port: advert.port,
        fp: advert.fingerprint.clone(),
    })
    .unwrap_or_default()
}

// --- DNS messages ------------------------------------------------------------------------

/// A domain name as its labels.
type Name = Vec<Vec<u8>>;

fn name(text: &str) -> Name {
    text.trim_end_matches('.')
        .split('.')
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

fn same_name(a: &[Vec<u8>], b: &[Vec<u8>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.eq_ignore_ascii_case(y))
}

/// A name's key for maps: lower case, each label length-prefixed.
fn name_key(n: &[Vec<u8>]) -> Vec<u8> {
    let mut key = Vec::new();
    for label in n {
        key.push(label.len() as u8);
        key.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    key
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Question {
    name: Name,
    qtype: u16,
    qclass: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RData {
    Ptr(Name),
    Srv { port: u16, target: Name },
    Txt(Vec<Vec<u8>>),
    A(Ipv4Addr),
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    name: Name,
    class: u16,
    ttl: u32,
    data: RData,
}

#[derive(Debug, Default)]
struct Message {
    id: u16,
    flags: u16,
    questions: Vec<Question>,
    /// Answers, authorities and additionals alike.
    records: Vec<Record>,
}

fn u16_at(msg: &[u8], pos: usize) -> Option<u16> {
    let b = msg.get(pos..pos.checked_add(2)?)?;
    Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
}

fn u32_at(msg: &[u8], pos: usize) -> Option<u32> {
    Some((u32::from(u16_at(msg, pos)?) << 16) | u32::from(u16_at(msg, pos.checked_add(2)?)?))
}

/// Reads a possibly compressed name at `pos`; answers it and where the bytes after it start.
/// Compression pointers must point backwards, so a malicious loop ends; 255 bytes at most.
fn read_name(msg: &[u8], mut pos: usize) -> Option<(Name, usize)> {
    let mut labels = Vec::new();
    let mut after = None;
    let mut total = 0usize;
    loop {
        let len = *msg.get(pos)?;
        match len & 0xC0 {
            0x00 if len == 0 => {
                let next = after.unwrap_or(pos.checked_add(1)?);
                return Some((labels, next));
            }
            0x00 => {
                let start = pos.checked_add(1)?;
                let end = start.checked_add(usize::from(len))?;
                let label = msg.get(start..end)?;
                total = total.checked_add(label.len() + 1)?;
                if total > 255 {
                    return None;
                }
                labels.push(label.to_vec());
                pos = end;
            }
            0xC0 => {
                let low = *msg.get(pos.checked_add(1)?)?;
                let target = (usize::from(len & 0x3F) << 8) | usize::from(low);
                if target >= pos {
                    return None;
                }
                after.get_or_insert(pos.checked_add(2)?);
                pos = target;
            }
            _ => return None,
        }
    }
}

fn parse_message(msg: &[u8]) -> Option<Message> {
    let mut m = Message {
        id: u16_at(msg, 0)?,
        flags: u16_at(msg, 2)?,
        ..Message::default()
    };
    let qd = u16_at(msg, 4)?;
    let rr = u32::from(u16_at(msg, 6)?) + u32::from(u16_at(msg, 8)?) + u32::from(u16_at(msg, 10)?);
    let mut pos = 12usize;
    // Each question or record takes bytes, so the counts cannot make this loop run past the
    // datagram's end.
    for _ in 0..qd {
        let (name, next) = read_name(msg, pos)?;
        m.questions.push(Question {
            name,
            qtype: u16_at(msg, next)?,
            qclass: u16_at(msg, next.checked_add(2)?)?,
        });
        pos = next.checked_add(4)?;
    }
    for _ in 0..rr {
        let (name, next) = read_name(msg, pos)?;
        let rtype = u16_at(msg, next)?;
        let class = u16_at(msg, next.checked_add(2)?)?;
        let ttl = u32_at(msg, next.checked_add(4)?)?;
        let len = usize::from(u16_at(msg, next.checked_add(8)?)?);
        let start = next.checked_add(10)?;
        let end = start.checked_add(len)?;
        let rdata = msg.get(start..end)?;
        let data = match rtype {
            TYPE_PTR => RData::Ptr(read_name(msg, start)?.0),
            TYPE_SRV => RData::Srv {
                port: u16_at(rdata, 4)?,
                target: read_name(msg, start.checked_add(6)?)?.0,
            },
            TYPE_TXT => {
                let mut strings = Vec::new();
                let mut rest = rdata;
                while let Some((&n, tail)) = rest.split_first() {
                    let s = tail.get(..usize::from(n))?;
                    strings.push(s.to_vec());
                    rest = tail.get(usize::from(n)..)?;
                }
                RData::Txt(strings)
            }
            TYPE_A => {
                let b: [u8; 4] = rdata.try_into().ok()?;
                RData::A(Ipv4Addr::from(b))
            }
            _ => RData::Other,
        };
        m.records.push(Record {
            name,
            class,
            ttl,
            data,
        });
        pos = end;
    }
    Some(m)
}

fn put_name(out: &mut Vec<u8>, n: &[Vec<u8>]) {
    for label in n {
        // Labels are at most 63 bytes: our own names are checked or cut when built.
        out.push(label.len().min(63) as u8);
        out.extend(label.iter().take(63));
    }
    out.push(0);
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// One record of ours, ready to write.
struct OwnRecord {
    name: Name,
    rtype: u16,
    /// Unique to this box: the cache-flush bit is set on multicast (RFC 6762 §10.2).
    unique: bool,
    ttl: u32,
    rdata: Vec<u8>,
}

/// Our names and records for one interface.
struct Records {
    service: Name,
    instance: Name,
    host: Name,
    enumeration: Name,
    all: Vec<OwnRecord>,
}

impl Records {
    fn new(advert: &Advert, addrs: &[Ipv4Addr]) -> Records {
        let service = name(SERVICE_TYPE);
        let mut label = advert.name.as_bytes().to_vec();
        label.truncate(63);
        let mut instance = vec![label];
        instance.extend(service.iter().cloned());
        let host = vec![host_label(&advert.name).into_bytes(), b"local".to_vec()];
        let enumeration = name("_services._dns-sd._udp.local.");

        let mut all = Vec::new();
        let mut rdata = Vec::new();
        put_name(&mut rdata, &instance);
        all.push(OwnRecord {
            name: service.clone(),
            rtype: TYPE_PTR,
            unique: false,
            ttl: TTL_OTHER,
            rdata,
        });
        let mut rdata = vec![0, 0, 0, 0];
        put_u16(&mut rdata, advert.port);
        put_name(&mut rdata, &host);
        all.push(OwnRecord {
            name: instance.clone(),
            rtype: TYPE_SRV,
            unique: true,
            ttl: TTL_HOST,
            rdata,
        });
        let mut txt = vec![
            format!("store={}", advert.store),
            format!("api={API_VERSION}"),
            format!("name={}", advert.name),
        ];
        if let Some(fp) = &advert.fingerprint {
            txt.push(format!("fp={fp}"));
        }
        let mut rdata = Vec::new();
        for s in txt {
            let mut s = s.into_bytes();
            s.truncate(255);
            rdata.push(s.len() as u8);
            rdata.extend(s);
        }
        all.push(OwnRecord {
            name: instance.clone(),
            rtype: TYPE_TXT,
            unique: true,
            ttl: TTL_OTHER,
            rdata,
        });
        for ip in addrs {
            all.push(OwnRecord {
                name: host.clone(),
                rtype: TYPE_A,
                unique: true,
                ttl: TTL_HOST,
                rdata: ip.octets().to_vec(),
            });
        }
        let mut rdata = Vec::new();
        put_name(&mut rdata, &service);
        all.push(OwnRecord {
            name: enumeration.clone(),
            rtype: TYPE_PTR,
            unique: false,
            ttl: TTL_OTHER,
            rdata,
        });
        Records {
            service,
            instance,
            host,
            enumeration,
            all,
        }
    }

    /// Whether `q` asks for one of our records.
    fn answers(&self, q: &Question) -> bool {
        let class = q.qclass & !CLASS_TOP;
        if class != CLASS_IN && class != CLASS_ANY {
            return false;
        }
        let of = |types: &[u16]| q.qtype == TYPE_ANY || types.contains(&q.qtype);
        (of(&[TYPE_PTR])
            && (same_name(&q.name, &self.service) || same_name(&q.name, &self.enumeration)))
            || (of(&[TYPE_SRV, TYPE_TXT]) && same_name(&q.name, &self.instance))
            || (of(&[TYPE_A]) && same_name(&q.name, &self.host))
    }

    /// A response carrying every record of ours: a querier gets the PTR, SRV, TXT and A in
    /// one datagram and needs no second round. `legacy` for a unicast answer to a one-shot
    /// querier: its id and questions echoed, short TTLs, no cache-flush bit.
    fn response(&self, id: u16, questions: &[Question], legacy: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        put_u16(&mut out, id);
        put_u16(&mut out, 0x8400); // a response, authoritative
        put_u16(&mut out, questions.len() as u16);
        put_u16(&mut out, self.all.len() as u16);
        put_u16(&mut out, 0);
        put_u16(&mut out, 0);
        for q in questions {
            put_name(&mut out, &q.name);
            put_u16(&mut out, q.qtype);
            put_u16(&mut out, q.qclass & !CLASS_TOP);
        }
        for r in &self.all {
            put_name(&mut out, &r.name);
            put_u16(&mut out, r.rtype);
            put_u16(
                &mut out,
                if r.unique && !legacy {
                    CLASS_IN | CLASS_TOP
                } else {
                    CLASS_IN
                },
            );
            let ttl = if legacy {
                r.ttl.min(TTL_LEGACY_MAX)
            } else {
                r.ttl
            };
            out.extend_from_slice(&ttl.to_be_bytes());
            put_u16(&mut out, r.rdata.len() as u16);
            out.extend_from_slice(&r.rdata);
        }
        out
    }
}

/// The SRV target's host label: the box name in the letters a host name may use.
fn host_label(box_name: &str) -> String {
    let mut label: String = box_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    label.truncate(63);
    let label = label.trim_matches('-');
    if label.is_empty() {
        "storebox".into()
    } else {
        label.to_owned()
    }
}

/// A query for `questions`, in the multicast form (id 0, no cache-flush bits).
fn query(questions: &[(Name, u16)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    put_u16(&mut out, 0);
    put_u16(&mut out, 0);
    put_u16(&mut out, questions.len() as u16);
    for _ in 0..3 {
        put_u16(&mut out, 0);
    }
    for (n, t) in questions {
        put_name(&mut out, n);
        put_u16(&mut out, *t);
        put_u16(&mut out, CLASS_IN);
    }
    out
}

// --- the client: `storebox discover` ------------------------------------------------------

/// One box found, by one way or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub store: String,
    pub name: String,
    pub mdns: bool,
    pub udp: bool,
}

/// What the mDNS answers taught so far.
#[derive(Default)]
struct Browse {
    /// Instance key -> instance name, for every PTR of our service type.
    instances: BTreeMap<Vec<u8>, Name>,
    /// Instance key -> (target host, port).
    srv: HashMap<Vec<u8>, (Name, u16)>,
    /// Instance key -> TXT strings.
    txt: HashMap<Vec<u8>, Vec<Vec<u8>>>,
    /// Host key -> addresses.
    hosts: HashMap<Vec<u8>, BTreeSet<Ipv4Addr>>,
}

impl Browse {
    fn learn(&mut self, packet: &[u8]) {
        let Some(msg) = parse_message(packet) else {
            return;
        };
        if msg.flags & 0x8000 == 0 {
            return; // a query from someone else
        }
        let service = name(SERVICE_TYPE);
        for r in msg.records {
            if r.ttl == 0 {
                continue; // a goodbye
            }
            let key = name_key(&r.name);
            match r.data {
                RData::Ptr(target) if same_name(&r.name, &service) => {
                    self.instances.insert(name_key(&target), target);
                }
                RData::Srv { port, target } => {
                    self.srv.insert(key, (target, port));
                }
                RData::Txt(strings) => {
                    self.txt.insert(key, strings);
                }
                RData::A(ip) => {
                    self.hosts.entry(key).or_default().insert(ip);
                }
                _ => {}
            }
        }
    }

    /// Questions for what is still missing: the service's PTRs always (new boxes may
    /// answer), an instance's SRV and TXT, a host's address.
    fn questions(&self) -> Vec<(Name, u16)> {
        let mut q = vec![(name(SERVICE_TYPE), TYPE_PTR)];
        for (key, instance) in &self.instances {
            if !self.srv.contains_key(key) {
                q.push((instance.clone(), TYPE_SRV));
            }
            if !self.txt.contains_key(key) {
                q.push((instance.clone(), TYPE_TXT));
            }
            if let Some((host, _)) = self.srv.get(key) {
                if !self.hosts.contains_key(&name_key(host)) {
                    q.push((host.clone(), TYPE_A));
                }
            }
        }
        q
    }

    fn found(&self) -> Vec<Found> {
        let mut out = Vec::new();
        for (key, instance) in &self.instances {
            let Some((host, port)) = self.srv.get(key) else {
                continue;
            };
            let txt = self.txt.get(key).cloned().unwrap_or_default();
            let value = |k: &str| {
                txt.iter().find_map(|s| {
                    let s = String::from_utf8_lossy(s);
                    s.strip_prefix(k)
                        .and_then(|v| v.strip_prefix('='))
                        .map(str::to_owned)
                })
            };
            let label = instance
                .first()
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .unwrap_or_default();
            for ip in self.hosts.get(&name_key(host)).into_iter().flatten() {
                out.push(Found {
                    addr: *ip,
                    port: *port,
                    store: value("store").unwrap_or_else(|| "?".into()),
                    name: value("name").unwrap_or_else(|| label.clone()),
                    mdns: true,
                    udp: false,
                });
            }
        }
        out
    }
}

/// A probe answer as a finding, or `None` for anything else.
fn probe_found(packet: &[u8], src: SocketAddr) -> Option<Found> {
    let SocketAddr::V4(src) = src else {
        return None;
    };
    let a: ProbeAnswer = serde_json::from_slice(packet).ok()?;
    Some(Found {
        addr: *src.ip(),
        port: a.port,
        store: a.store,
        name: a.name,
        mdns: false,
        udp: true,
    })
}

enum Heard {
    Mdns(Vec<u8>),
    Probe(Vec<u8>, SocketAddr),
}

/// Looks for boxes both ways for `timeout`, on every IPv4 interface of this machine.
pub async fn discover(timeout: Duration, udp_port: u16) -> anyhow::Result<Vec<Found>> {
    let addrs = tokio::task::spawn_blocking(system_addrs)
        .await?
        .context("listing the network interfaces")?;
    let ifaces = asked(&addrs);
    anyhow::ensure!(!ifaces.is_empty(), "this machine has no up IPv4 interface");

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Heard>(256);
    let mut tasks = tokio::task::JoinSet::new();
    // Per interface: where to send the mDNS query, and the probe socket with its targets.
    let mut mdns_socks = Vec::new();
    let mut probe_socks = Vec::new();
    for iface in &ifaces {
        match mdns_socket(iface, true) {
            Ok((sock, _)) => {
                let sock = Arc::new(sock);
                mdns_socks.push(sock.clone());
                let tx = tx.clone();
                tasks.spawn(async move {
                    let mut buf = vec![0u8; 9000];
                    while let Ok((n, _)) = sock.recv_from(&mut buf).await {
                        let packet = buf.get(..n).unwrap_or_default().to_vec();
                        if tx.send(Heard::Mdns(packet)).await.is_err() {
                            break;
                        }
                    }
                });
            }
            Err(e) => tracing::warn!("discovery: no mDNS browse on {}: {e:#}", iface.name),
        }
        for ip in &iface.addrs {
            let targets: Vec<Ipv4Addr> = if iface.loopback {
                vec![*ip]
            } else {
                std::iter::once(Ipv4Addr::BROADCAST)
                    .chain(iface.broadcasts.iter().copied())
                    .collect()
            };
            let sock = udp_socket(*ip, 0, None).and_then(|s| {
                s.set_broadcast(true)?;
                UdpSocket::from_std(s.into())
            });
            match sock {
                Ok(sock) => {
                    let sock = Arc::new(sock);
                    probe_socks.push((sock.clone(), targets));
                    let tx = tx.clone();
                    tasks.spawn(async move {
                        let mut buf = vec![0u8; 2048];
                        while let Ok((n, src)) = sock.recv_from(&mut buf).await {
                            let packet = buf.get(..n).unwrap_or_default().to_vec();
                            if tx.send(Heard::Probe(packet, src)).await.is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(e) => tracing::warn!("discovery: no UDP probe from {ip}: {e}"),
            }
        }
    }
    drop(tx);

    let mut browse = Browse::default();
    let mut probed: Vec<Found> = Vec::new();
    let deadline = Instant::now() + timeout;
    // Ask again every second: mDNS and UDP both lose datagrams, and boxes answer at most
    // once a second anyway.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let heard = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tick.tick() => {
                ask(&browse, &mdns_socks, &probe_socks, udp_port).await;
                continue;
            }
            heard = rx.recv() => heard,
        };
        match heard {
            Some(Heard::Mdns(packet)) => browse.learn(&packet),
            Some(Heard::Probe(packet, src)) => probed.extend(probe_found(&packet, src)),
            None => break,
        }
    }
    tasks.abort_all();
    Ok(merge(browse.found().into_iter().chain(probed)))
}

/// Sends the mDNS query for what is still missing, and the probes.
async fn ask(
    browse: &Browse,
    mdns_socks: &[Arc<UdpSocket>],
    probe_socks: &[(Arc<UdpSocket>, Vec<Ipv4Addr>)],
    udp_port: u16,
) {
    let q = query(&browse.questions());
    let group = SocketAddr::from((MDNS_GROUP, MDNS_PORT));
    for sock in mdns_socks {
        if let Err(e) = sock.send_to(&q, group).await {
            tracing::debug!("discovery: mDNS query: {e}");
        }
    }
    for (sock, targets) in probe_socks {
        for t in targets {
            if let Err(e) = sock.send_to(PROBE, (*t, udp_port)).await {
                tracing::debug!("discovery: probe to {t}: {e}");
            }
        }
    }
}

/// One entry per address and port, remembering every way that found it.
fn merge(found: impl IntoIterator<Item = Found>) -> Vec<Found> {
    let mut by_addr: BTreeMap<(Ipv4Addr, u16), Found> = BTreeMap::new();
    for f in found {
        by_addr
            .entry((f.addr, f.port))
            .and_modify(|e| {
                e.mdns |= f.mdns;
                e.udp |= f.udp;
            })
            .or_insert(f);
    }
    by_addr.into_values().collect()
}

/// Text from the network, safe for a terminal: control characters become `?`.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The findings as a table, one line per box.
pub fn render(found: &[Found]) -> String {
    let mut out = format!(
        "{:<15}  {:>5}  {:<20}  {:<24}  {}\n",
        "ADDRESS", "PORT", "STORE", "NAME", "FOUND BY"
    );
    for f in found {
        let ways = match (f.mdns, f.udp) {
            (true, true) => "mdns+udp",
            (true, false) => "mdns",
            _ => "udp",
        };
        out += &format!(
            "{:<15}  {:>5}  {:<20}  {:<24}  {}\n",
            f.addr.to_string(),
            f.port,
            printable(&f.store),
            printable(&f.name),
            ways
        );
    }
    out
}

/// `storebox discover`: prints the boxes found; fails when there is none.
pub async fn discover_command(
    timeout_secs: f64,
    udp_port: u16,
) -> anyhow::Result<std::process::ExitCode> {
    let timeout = Duration::try_from_secs_f64(timeout_secs)
        .ok()
        .filter(|t| !t.is_zero() && *t <= Duration::from_secs(600))
        .with_context(|| format!("--timeout {timeout_secs}: give 0.1 to 600 seconds"))?;
    let found = discover(timeout, udp_port).await?;
    if found.is_empty() {
        eprintln!(
            "no storebox answered within {timeout_secs} s (mDNS {SERVICE_TYPE}, UDP probe port {udp_port})"
        );
        return Ok(std::process::ExitCode::FAILURE);
    }
    print!("{}", render(&found));
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn advert() -> Advert {
        Advert {
            store: "shop-001".into(),
            name: "storebox-shop-001".into(),
            port: 8080,
            fingerprint: None,
        }
    }

    fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
        Ipv4Addr::new(a, b, c, d)
    }

    fn from_5353() -> SocketAddr {
        SocketAddr::from((ip(10, 0, 0, 9), MDNS_PORT))
    }

    #[test]
    fn a_ptr_query_gets_every_record_in_one_answer() {
        let records = Records::new(&advert(), &[ip(10, 0, 0, 1)]);
        let q = query(&[(name(SERVICE_TYPE), TYPE_PTR)]);
        assert_eq!(
            answer_query(&q, from_5353(), &records),
            Some(Reply::Multicast)
        );

        let mut browse = Browse::default();
        browse.learn(&records.response(0, &[], false));
        assert_eq!(
            browse.found(),
            [Found {
                addr: ip(10, 0, 0, 1),
                port: 8080,
                store: "shop-001".into(),
                name: "storebox-shop-001".into(),
                mdns: true,
                udp: false,
            }]
        );
        // Nothing is missing, so the client asks only for new instances.
        assert_eq!(browse.questions().len(), 1);
    }

    #[test]
    fn txt_carries_store_api_name_and_the_fingerprint_when_there_is_one() {
        let mut a = advert();
        let records = Records::new(&a, &[ip(10, 0, 0, 1)]);
        let msg = parse_message(&records.response(0, &[], false)).unwrap();
        let txt = msg
            .records
            .iter()
            .find_map(|r| match &r.data {
                RData::Txt(t) => Some(t.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            txt,
            [
                b"store=shop-001".to_vec(),
                b"api=1".to_vec(),
                b"name=storebox-shop-001".to_vec()
            ]
        );
        a.fingerprint = Some("ab12".into());
        let records = Records::new(&a, &[ip(10, 0, 0, 1)]);
        let packet = records.response(0, &[], false);
        assert!(packet.windows(7).any(|w| w == b"fp=ab12"));
        let answer: serde_json::Value = serde_json::from_slice(&probe_answer(&a)).unwrap();
        assert_eq!(answer["fp"], "ab12");
    }

    #[test]
    fn names_match_without_regard_to_case_and_other_names_get_nothing() {
        let records = Records::new(&advert(), &[ip(10, 0, 0, 1)]);
        for (n, t) in [
            ("_STOREBOX._TCP.LOCAL.", TYPE_PTR),
            ("StoreBox-Shop-001._storebox._tcp.local.", TYPE_SRV),
            ("storebox-shop-001._storebox._tcp.local.", TYPE_TXT),
            ("storebox-shop-001.local.", TYPE_A),
            ("_services._dns-sd._udp.local.", TYPE_PTR),
        ] {
            let q = query(&[(name(n), t)]);
            assert_eq!(
                answer_query(&q, from_5353(), &records),
                Some(Reply::Multicast),
                "{n}"
            );
        }
        for (n, t) in [
            ("_http._tcp.local.", TYPE_PTR),
            ("storebox-shop-001.local.", 28), // AAAA: no IPv6 here
            ("storebox-shop-002._storebox._tcp.local.", TYPE_SRV),
        ] {
            let q = query(&[(name(n), t)]);
            assert_eq!(answer_query(&q, from_5353(), &records), None, "{n}");
        }
        // Our own answers, heard back through multicast loop, are not queries.
        let answer = records.response(0, &[], false);
        assert_eq!(answer_query(&answer, from_5353(), &records), None);
    }

    #[test]
    fn a_query_from_another_port_gets_a_legacy_unicast_answer() {
        let records = Records::new(&advert(), &[ip(10, 0, 0, 1)]);
        let mut q = query(&[(name(SERVICE_TYPE), TYPE_PTR)]);
        q[0] = 0x12;
        q[1] = 0x34;
        let Some(Reply::Unicast(answer)) =
            answer_query(&q, SocketAddr::from((ip(10, 0, 0, 9), 40000)), &records)
        else {
            panic!("no unicast answer");
        };
        let msg = parse_message(&answer).unwrap();
        assert_eq!(msg.id, 0x1234);
        assert_eq!(msg.questions.len(), 1);
        assert!(msg.records.iter().all(|r| r.ttl <= TTL_LEGACY_MAX));
        // ...without the cache-flush bit, which legacy resolvers would misread.
        assert!(msg.records.iter().all(|r| r.class == CLASS_IN));
        // The multicast form sets it on the records unique to this box (SRV, TXT, A).
        let multicast = parse_message(&records.response(0, &[], false)).unwrap();
        let flushed = multicast
            .records
            .iter()
            .filter(|r| r.class & CLASS_TOP != 0)
            .count();
        assert_eq!(flushed, 3);
    }

    #[test]
    fn compressed_names_are_read_and_loops_are_refused() {
        // A response with the SRV target compressed against the question's name.
        let mut m = vec![0, 0, 0x84, 0, 0, 1, 0, 1, 0, 0, 0, 0];
        put_name(&mut m, &name("box.local."));
        put_u16(&mut m, TYPE_A);
        put_u16(&mut m, CLASS_IN);
        m.extend_from_slice(&[0xC0, 12]); // the name at offset 12
        put_u16(&mut m, TYPE_A);
        put_u16(&mut m, CLASS_IN);
        m.extend_from_slice(&120u32.to_be_bytes());
        put_u16(&mut m, 4);
        m.extend_from_slice(&[10, 0, 0, 7]);
        let msg = parse_message(&m).unwrap();
        assert_eq!(msg.records[0].name, name("box.local."));
        assert_eq!(msg.records[0].data, RData::A(ip(10, 0, 0, 7)));

        // A pointer to itself, and one pointing forward.
        let mut looped = vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 12, 0, 1, 0, 1];
        assert!(parse_message(&looped).is_none());
        looped[13] = 14;
        assert!(parse_message(&looped).is_none());
    }

    #[test]
    fn malformed_datagrams_never_panic() {
        let records = Records::new(&advert(), &[ip(10, 0, 0, 1)]);
        let good = [
            query(&[(name(SERVICE_TYPE), TYPE_PTR)]),
            records.response(7, &[], false),
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut browse = Browse::default();
        for round in 0..50_000 {
            let packet: Vec<u8> = if round % 2 == 0 {
                let len = (next() % 80) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                // A real packet with a few bytes changed or cut short.
                let mut p = good[round % 4 / 2].clone();
                for _ in 0..(next() % 4 + 1) {
                    let i = (next() as usize) % p.len();
                    p[i] = next() as u8;
                }
                p.truncate((next() as usize) % (p.len() + 1));
                p
            };
            let _ = answer_query(&packet, from_5353(), &records);
            let _ = answer_query(&packet, SocketAddr::from((ip(1, 2, 3, 4), 999)), &records);
            browse.learn(&packet);
            let _ = probe_found(&packet, from_5353());
        }
        let _ = browse.found();
        let _ = browse.questions();
    }

    #[test]
    fn probe_answers_and_who_gets_them() {
        let answer: serde_json::Value = serde_json::from_slice(&probe_answer(&advert())).unwrap();
        assert_eq!(
            answer,
            serde_json::json!({"store": "shop-001", "name": "storebox-shop-001", "api": "1", "port": 8080})
        );
        let f = probe_found(
            &probe_answer(&advert()),
            SocketAddr::from((ip(10, 0, 0, 1), DEFAULT_UDP_PORT)),
        )
        .unwrap();
        assert_eq!(
            (f.addr, f.port, f.udp, f.mdns),
            (ip(10, 0, 0, 1), 8080, true, false)
        );
        assert!(probe_found(b"STOREBOX?", from_5353()).is_none());

        assert!(sane_source(SocketAddr::from((ip(10, 0, 0, 9), 40000))));
        assert!(!sane_source(SocketAddr::from((ip(10, 0, 0, 9), 7))));
        assert!(!sane_source(SocketAddr::from((Ipv4Addr::BROADCAST, 40000))));
        assert!(!sane_source(SocketAddr::from((ip(0, 0, 0, 0), 40000))));
    }

    #[test]
    fn served_interfaces_follow_the_listen_address() {
        let a = |name: &str, ip: Ipv4Addr, loopback: bool, up: bool, p2p: bool| IfAddr {
            name: name.into(),
            ip,
            broadcast: (!loopback && !p2p).then(|| Ipv4Addr::from(u32::from(ip) | 0xFF)),
            loopback,
            up,
            p2p,
        };
        let all = [
            a("lo", ip(127, 0, 0, 1), true, true, false),
            a("eth0", ip(10, 0, 0, 1), false, true, false),
            a("eth0", ip(10, 0, 1, 1), false, true, false),
            a("wg0", ip(10, 9, 0, 1), false, true, true),
            a("eth1", ip(192, 168, 1, 1), false, false, false),
        ];
        let names = |v: Vec<Iface>| v.into_iter().map(|i| (i.name, i.addrs)).collect::<Vec<_>>();
        assert_eq!(
            names(served(&all, Some(ip(10, 0, 1, 1)))),
            [("eth0".to_string(), vec![ip(10, 0, 1, 1)])]
        );
        assert_eq!(
            names(served(&all, Some(ip(127, 0, 0, 1)))),
            [("lo".to_string(), vec![ip(127, 0, 0, 1)])]
        );
        assert!(served(&all, Some(ip(10, 0, 0, 2))).is_empty());
        assert_eq!(
            names(served(&all, None)),
            [("eth0".to_string(), vec![ip(10, 0, 0, 1), ip(10, 0, 1, 1)])]
        );
        assert_eq!(
            names(asked(&all)),
            [
                ("lo".to_string(), vec![ip(127, 0, 0, 1)]),
                ("eth0".to_string(), vec![ip(10, 0, 0, 1), ip(10, 0, 1, 1)])
            ]
        );
    }

    #[test]
    fn findings_merge_by_address_and_render_one_line_each() {
        let f = |addr: Ipv4Addr, mdns: bool, udp: bool| Found {
            addr,
            port: 8080,
            store: "shop-001".into(),
            name: "storebox-shop-001".into(),
            mdns,
            udp,
        };
        let merged = merge([
            f(ip(10, 0, 0, 2), false, true),
            f(ip(10, 0, 0, 1), true, false),
            f(ip(10, 0, 0, 1), false, true),
        ]);
        assert_eq!(
            merged,
            [
                f(ip(10, 0, 0, 1), true, true),
                f(ip(10, 0, 0, 2), false, true)
            ]
        );
        let text = render(&merged);
        assert_eq!(text.lines().count(), 3);
        assert!(text.lines().nth(1).unwrap().ends_with("mdns+udp"), "{text}");
        let mut evil = f(ip(10, 0, 0, 3), false, true);
        evil.name = "x\u{1b}[2Jy".into();
        assert!(render(&[evil]).contains("x?[2Jy"));
    }

    #[test]
    fn host_labels_and_box_names() {
        assert_eq!(host_label("storebox-shop-001"), "storebox-shop-001");
        assert_eq!(host_label("Till Room #2"), "till-room--2");
        assert_eq!(host_label("Épicerie"), "picerie");
        assert_eq!(host_label("!!!"), "storebox");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("storebox.toml");
        let base = "store_id = \"shop-001\"\ndata_dir = \"d\"\n[hub]\nurl = \"https://127.0.0.1:1\"\nca_file = \"ca.crt\"\ncredential = \"x\"\n";
        std::fs::write(&path, base).unwrap();
        let config = BoxConfig::load(&path).unwrap();
        assert!(config.discovery.enabled && config.discovery.mdns);
        assert_eq!(config.discovery.udp_port, DEFAULT_UDP_PORT);
        assert_eq!(box_name(&config), "storebox-shop-001");

        std::fs::write(
            &path,
            format!("{base}[discovery]\nname = \"Back shop\"\nudp_port = 40001\nmdns = false\n"),
        )
        .unwrap();
        let config = BoxConfig::load(&path).unwrap();
        assert_eq!(box_name(&config), "Back shop");
        assert_eq!(config.discovery.udp_port, 40001);
        assert!(!config.discovery.mdns);

        let long = "x".repeat(64);
        std::fs::write(&path, format!("{base}[discovery]\nname = \"{long}\"\n")).unwrap();
        let e = format!("{:#}", BoxConfig::load(&path).unwrap_err());
        assert!(e.contains("[discovery] name"), "{e}");

        let long_store = format!("s{}", "x".repeat(63));
        std::fs::write(&path, base.replace("shop-001", &long_store)).unwrap();
        let config = BoxConfig::load(&path).unwrap();
        assert_eq!(box_name(&config).len(), 63);
    }
}
