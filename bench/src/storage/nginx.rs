//! The lookup baseline: nginx serving the same product records as static files, the fastest
//! common way to answer "GET this JSON document" from a disk, with no database at all.
//!
//! The bench starts it itself in the foreground (`daemon off; master_process off;`, so one
//! process, which the bench's guards kill like any child), on a free 127.0.0.1 port, with its
//! own minimal configuration, pid file, error log and temporary paths in the run's
//! temporary directory. No access log, keep-alive without a request limit, `sendfile` on. If
//! no nginx is installed the benchmark says so and skips this baseline
//! (`apt-get install nginx-light` brings one). `STOREBOX_BENCH_NGINX` names another binary,
//! or `off` skips the baseline.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::common::{free_port, Proc};

/// Where nginx is usually installed, beyond `PATH` (Debian puts it in `/usr/sbin`, which is
/// not on every user's `PATH`).
const USUAL: &[&str] = &[
    "/usr/sbin/nginx",
    "/usr/local/sbin/nginx",
    "/usr/local/nginx/sbin/nginx",
];

/// Names the nginx binary to use, or `off` to skip the baseline.
pub const ENV: &str = "STOREBOX_BENCH_NGINX";

/// The nginx binary, if there is one (or the one [`ENV`] names; none if it says `off`).
pub fn find() -> Option<PathBuf> {
    if let Some(choice) = std::env::var_os(ENV) {
        return (choice != "off")
            .then(|| PathBuf::from(choice))
            .filter(|p| p.is_file());
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nginx"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(USUAL.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

/// Its version line, e.g. `nginx/1.22.1`.
pub fn version(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("-v").output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.split_once("version:").map(|(_, v)| v.trim().to_owned()))
}

/// A running nginx, killed when dropped.
pub struct Nginx {
    _proc: Proc,
    pub addr: SocketAddr,
}

impl Nginx {
    /// Starts nginx serving `root` from a configuration written in `dir`.
    pub fn start(bin: &Path, dir: &Path, root: &Path) -> anyhow::Result<Nginx> {
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        std::fs::create_dir_all(dir.join("tmp"))?;
        let d = dir.display();
        let mut lines: Vec<String> = vec![
            "daemon off;".into(),
            "master_process off;".into(),
            "worker_processes 1;".into(),
            format!("pid {d}/nginx.pid;"),
            format!("error_log {d}/error.log warn;"),
            "events { worker_connections 256; }".into(),
            "http {".into(),
            "  access_log off;".into(),
            "  default_type application/json;".into(),
            "  sendfile on;".into(),
            "  tcp_nodelay on;".into(),
            "  keepalive_timeout 300s;".into(),
            "  keepalive_requests 100000000;".into(),
            format!("  client_body_temp_path {d}/tmp/body;"),
            format!("  proxy_temp_path {d}/tmp/proxy;"),
            format!("  fastcgi_temp_path {d}/tmp/fastcgi;"),
            format!("  uwsgi_temp_path {d}/tmp/uwsgi;"),
            format!("  scgi_temp_path {d}/tmp/scgi;"),
            format!("  server {{ listen {addr}; root {}; }}", root.display()),
            "}".into(),
        ];
        let conf = dir.join("nginx.conf");
        // A build without some module knows no `*_temp_path` of it: drop what it refuses.
        for _ in 0..8 {
            std::fs::write(&conf, lines.join("\n") + "\n")?;
            let out = Command::new(bin)
                .arg("-t")
                .arg("-q")
                .arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(&conf)
                .output()
                .with_context(|| format!("running {} -t", bin.display()))?;
            if out.status.success() {
                let mut command = Command::new(bin);
                command
                    .arg("-p")
                    .arg(dir)
                    .arg("-e")
                    .arg(dir.join("error.log"))
                    .arg("-c")
                    .arg(&conf);
                let proc = Proc::spawn(command, dir.join("nginx.log"))?;
                wait_listening(&proc, addr)?;
                return Ok(Nginx { _proc: proc, addr });
            }
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            let unknown = err
                .split("unknown directive \"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .map(str::to_owned);
            match unknown {
                Some(directive) if directive.ends_with("_temp_path") => {
                    lines.retain(|l| !l.trim_start().starts_with(&directive));
                }
                _ => bail!("nginx refused its configuration:\n{err}"),
            }
        }
        bail!("nginx refused its configuration")
    }
}

fn wait_listening(proc: &Proc, addr: SocketAddr) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        proc.check_alive().context("while waiting for nginx")?;
        if start.elapsed() > Duration::from_secs(10) {
            bail!("nginx does not listen on {addr}; log:\n{}", proc.tail());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
