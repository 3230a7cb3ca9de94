//! Discovery end to end on a real (virtual) LAN: two network namespaces joined by a veth
//! pair, a real `storebox serve` in the first ("the box"), and in the second ("the till")
//! an independent mDNS client (Python's `zeroconf`), the UDP broadcast probe, malformed
//! datagrams, and `storebox discover`.
//!
//! Needs root, `ip netns` and `python3 -c 'import zeroconf'` (CI runs as root and `.ci/run`
//! installs zeroconf). Without them the test fails and says what is missing, rather than
//! passing without having run. Every packet stays inside the two namespaces it creates; they
//! are deleted when the test ends, panics included.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const STORE: &str = "shop-disc";
const BOX_NAME: &str = "Back office box";
const LAN_PORT: u16 = 47080;
const UDP_PORT: u16 = 48555;

/// Network namespaces deleted on drop (deleting one also deletes its end of the veth).
struct Namespaces(Vec<String>);

impl Namespaces {
    fn add(&mut self, name: &str) {
        run_ok(Command::new("ip").args(["netns", "add", name]));
        self.0.push(name.to_owned());
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(command: &mut Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"))
}

fn run_ok(command: &mut Command) -> String {
    let out = run(command);
    assert!(
        out.status.success(),
        "{command:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip netns exec NS python3 -c SCRIPT ARGS...`, its stdout parsed as JSON.
fn python_in(ns: &str, script: &str, args: &[&str]) -> Value {
    let out = run_ok(
        Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", script])
            .args(args),
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: python printed {out:?}"))
}

/// Fails, saying why, when this machine cannot run the test.
fn preflight() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0");
    assert!(
        root,
        "tests/discovery.rs needs root to create network namespaces (CI runs as root); \
         run it with sudo or as root"
    );
    let ip = Command::new("ip").args(["netns", "list"]).output();
    assert!(
        ip.as_ref().is_ok_and(|o| o.status.success()),
        "tests/discovery.rs needs `ip netns` (Debian: apt-get install iproute2): {ip:?}"
    );
    let zeroconf = Command::new("python3")
        .args(["-c", "import zeroconf"])
        .output();
    assert!(
        zeroconf.as_ref().is_ok_and(|o| o.status.success()),
        "tests/discovery.rs needs python3 with the zeroconf package \
         (`pip install zeroconf`, as .ci/run does): {zeroconf:?}"
    );
}

/// A till's pinned HTTPS GET of `/v1/status` in Python's standard library: the certificate
/// is accepted only when its SHA-256 is the published fingerprint.
const PINNED_GET: &str = r#"
import hashlib, socket, ssl, sys
host, port, fp = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with socket.create_connection((host, port), timeout=5) as raw:
    with ctx.wrap_socket(raw) as s:
        if hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest() != fp:
            sys.exit("the certificate is not the pinned one")
        s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: box\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
print(data.split(b"\r\n\r\n", 1)[1].decode())
"#;

/// Browses `_storebox._tcp.local.` with zeroconf, resolves the first instance and prints it.
const ZEROCONF: &str = r#"
import json, sys, time
from zeroconf import IPVersion, ServiceBrowser, ServiceListener, Zeroconf
TYPE = "_storebox._tcp.local."
zc = Zeroconf(interfaces=[sys.argv[1]], ip_version=IPVersion.V4Only)
found = []
class Listener(ServiceListener):
    def add_service(self, zc, type_, name): found.append(name)
    def update_service(self, zc, type_, name): pass
    def remove_service(self, zc, type_, name): pass
browser = ServiceBrowser(zc, TYPE, Listener())
deadline = time.monotonic() + 10
while not found and time.monotonic() < deadline:
    time.sleep(0.05)
out = {"names": list(found)}
if found:
    info = zc.get_service_info(TYPE, found[0], timeout=5000)
    if info is not None:
        out.update(
            addresses=info.parsed_addresses(),
            port=info.port,
            server=info.server,
            txt={k.decode(): (v.decode() if v is not None else None)
                 for k, v in info.properties.items()},
        )
browser.cancel()
zc.close()
print(json.dumps(out))
"#;

/// Sends the probe to one address from `argv[1]` and prints every answer within 2 s.
const PROBE: &str = r#"
import json, socket, sys, time
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.bind((src, 0))
answers = []
for attempt in range(3):
    s.sendto(b"STOREBOX?", (dst, port))
    s.settimeout(0.7)
    try:
        while True:
            data, addr = s.recvfrom(2048)
            answers.append({"from": addr[0], "answer": json.loads(data)})
    except socket.timeout:
        pass
    if answers:
        break
print(json.dumps(answers))
"#;

/// Throws malformed datagrams at the box's mDNS and probe ports.
const GARBAGE: &str = r#"
import json, os, random, socket, struct, sys
box, port = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
def name(*labels):
    return b"".join(bytes([len(l)]) + l for l in labels) + b"\0"
ptr_query = b"\0\0\0\0\0\1\0\0\0\0\0\0" + name(b"_storebox", b"_tcp", b"local") + b"\0\x0c\0\1"
packets = [
    b"", b"\0", b"\xff" * 11, b"\xff" * 12, b"\xff" * 600,
    b"\0\0\0\0\xff\xff\xff\xff\xff\xff\xff\xff",          # huge counts, no body
    b"\0\0\0\0\0\1\0\0\0\0\0\0\xc0\x0c\0\1\0\1",          # a name pointing at itself
    b"\0\0\0\0\0\1\0\0\0\0\0\0\x3f" + b"a" * 20,          # a label past the end
    b"\0\0\0\0\0\1\0\0\0\0\0\0" + b"\x01a" * 200 + b"\0\0\1\0\1",  # a name over 255 bytes
    ptr_query[:-3], ptr_query + b"\xff" * 30,
    b"STOREBOX", b"STOREBOX?" + os.urandom(1000), b"\x00STOREBOX?",
]
packets += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300))) for _ in range(300)]
for i in range(300):
    p = bytearray(ptr_query)
    for _ in range(rng.randrange(1, 5)):
        p[rng.randrange(len(p))] = rng.getrandbits(8)
    packets.append(bytes(p[: rng.randrange(len(p) + 1)]))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(sys.argv[3]))
sent = 0
for p in packets:
    for dst in [(box, 5353), ("224.0.0.251", 5353), (box, port)]:
        s.sendto(p, dst)
        sent += 1
print(json.dumps({"sent": sent}))
"#;

fn wait_for_log(log: &Path, needle: &str, proc: &mut Killed, timeout: Duration) {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        if let Ok(Some(exit)) = proc.0.try_wait() {
            panic!("the box exited ({exit}) before logging {needle:?}; its log:\n{text}");
        }
        assert!(
            start.elapsed() < timeout,
            "the box did not log {needle:?} within {timeout:?}; its log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tills_find_the_box_by_mdns_and_by_udp_probe() {
    preflight();
    let started = Instant::now();
    let pid = std::process::id();
    // A per-run subnet: namespaces isolate addresses anyway, this only eases reading logs.
    let net = format!("10.77.{}", pid % 200 + 20);
    let (box_ip, till_ip) = (format!("{net}.1"), format!("{net}.2"));
    let (box_ns, till_ns) = (format!("sbdisc-{pid}-box"), format!("sbdisc-{pid}-till"));
    let (box_if, till_if) = (format!("sbd{pid}b"), format!("sbd{pid}t"));

    // Declared before the box process, so it drops after it: the box dies, then its network.
    let mut namespaces = Namespaces(Vec::new());
    namespaces.add(&box_ns);
    namespaces.add(&till_ns);
    // Each end is created directly inside its namespace: nothing appears on the host.
    run_ok(Command::new("ip").args([
        "link", "add", &box_if, "netns", &box_ns, "type", "veth", "peer", "name", &till_if,
        "netns", &till_ns,
    ]));
    for (ns, ifname, ip) in [(&box_ns, &box_if, &box_ip), (&till_ns, &till_if, &till_ip)] {
        run_ok(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]));
        run_ok(Command::new("ip").args([
            "-n",
            ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            ifname,
        ]));
        run_ok(Command::new("ip").args(["-n", ns, "link", "set", ifname, "multicast", "on", "up"]));
    }

    // The box's config as `storehub init` writes it, with a hub that is never there.
    let dir = tempfile::tempdir().unwrap();
    run_ok(
        Command::new(support::bin("storehub"))
            .arg("init")
            .arg("--dir")
            .arg(dir.path())
            .args(["--store", STORE, "--hub-port", "1", "--admin-port", "2"])
            .args(["--lan-port", &LAN_PORT.to_string()]),
    );
    let config = dir.path().join("boxes").join(format!("{STORE}.toml"));
    let dropins = dir.path().join("boxes").join("storebox.d");
    std::fs::create_dir_all(&dropins).unwrap();
    std::fs::write(
        dropins.join("50-discovery-test.toml"),
        format!(
            "[lan]\nlisten = \"{box_ip}:{LAN_PORT}\"\n\n[sync]\ndelta_interval = \"off\"\nnotify = false\n\n\
             [discovery]\nname = \"{BOX_NAME}\"\nudp_port = {UDP_PORT}\n"
        ),
    )
    .unwrap();

    let log = dir.path().join("box.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut boxed = Killed(
        Command::new("ip")
            .args(["netns", "exec", &box_ns])
            .arg(support::bin("storebox"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("STOREBOX_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
    );
    wait_for_log(
        &log,
        "discovery: advertising",
        &mut boxed,
        Duration::from_secs(15),
    );

    // The till API serves HTTPS on the LAN address, hub or no hub; a till pins the
    // certificate by the fingerprint discovery publishes.
    let fp = support::lan_fingerprint(&support::box_data_dir(&config)).unwrap();
    let status = python_in(&till_ns, PINNED_GET, &[&box_ip, &LAN_PORT.to_string(), &fp]);
    assert_eq!(status["store_id"], STORE, "{status}");

    // (1) An independent mDNS client browses and resolves the box.
    let t = Instant::now();
    let mdns = python_in(&till_ns, ZEROCONF, &[&till_ip]);
    let mdns_took = t.elapsed();
    let instance = format!("{BOX_NAME}._storebox._tcp.local.");
    assert_eq!(mdns["names"], serde_json::json!([instance]), "{mdns}");
    assert_eq!(mdns["addresses"], serde_json::json!([box_ip]), "{mdns}");
    assert_eq!(mdns["port"], LAN_PORT, "{mdns}");
    assert_eq!(
        mdns["txt"],
        serde_json::json!({"store": STORE, "api": "1", "name": BOX_NAME, "fp": fp}),
        "{mdns}"
    );

    // (2) The UDP probe, to the limited broadcast address and to the subnet's.
    let expected = serde_json::json!(
        {"store": STORE, "name": BOX_NAME, "api": "1", "port": LAN_PORT, "fp": fp}
    );
    for dst in ["255.255.255.255".to_string(), format!("{net}.255")] {
        let answers = python_in(&till_ns, PROBE, &[&till_ip, &dst, &UDP_PORT.to_string()]);
        assert_eq!(
            answers,
            serde_json::json!([{"from": box_ip, "answer": expected}]),
            "probe to {dst}"
        );
    }

    // Malformed datagrams on both ports: the box ignores them and goes on.
    let garbage = python_in(
        &till_ns,
        GARBAGE,
        &[&box_ip, &UDP_PORT.to_string(), &till_ip],
    );
    assert!(garbage["sent"].as_u64().unwrap() > 1000, "{garbage}");

    // (3) `storebox discover` finds it both ways.
    let t = Instant::now();
    let out = run(Command::new("ip")
        .args(["netns", "exec", &till_ns])
        .arg(support::bin("storebox"))
        .args(["discover", "--timeout", "3"]));
    let discover_took = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "storebox discover failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with(&box_ip)).collect();
    assert_eq!(lines.len(), 1, "one line for the box:\n{stdout}");
    let fields: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        fields[..3],
        [box_ip.as_str(), &LAN_PORT.to_string(), STORE],
        "{stdout}"
    );
    assert!(lines[0].contains(BOX_NAME), "{stdout}");
    assert_eq!(fields.last(), Some(&"mdns+udp"), "{stdout}");

    // Still alive and serving after all of it, without a panic or a discovery failure.
    assert!(
        boxed.0.try_wait().unwrap().is_none(),
        "the box died; its log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let status = python_in(&till_ns, PINNED_GET, &[&box_ip, &LAN_PORT.to_string(), &fp]);
    assert_eq!(status["store_id"], STORE, "{status}");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("panicked"), "{text}");
    assert!(!text.contains("discovery: no "), "{text}");
    eprintln!(
        "discovery test: zeroconf resolved in {mdns_took:?}, discover took {discover_took:?}, \
         {:?} in all",
        started.elapsed()
    );
}
