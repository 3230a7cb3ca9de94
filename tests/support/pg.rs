//! PostgreSQL for the tests that run the hub on its production backend.
//!
//! With `STOREHUB_TEST_POSTGRES` set (a connection URL to a server the tests may create
//! databases on, as CI does: `postgres://postgres@127.0.0.1:5432`), each hub gets a fresh
//! database there, dropped afterwards. Without it, each hub gets a private server: `initdb`
//! in a temporary directory and `postgres` on 127.0.0.1 at a free port, run as the
//! `postgres` user when the tests run as root (PostgreSQL refuses root), killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which database the hub of a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Postgres,
}

thread_local! {
    static BACKEND: std::cell::Cell<Backend> = const { std::cell::Cell::new(Backend::Embedded) };
}

/// Sets the backend of the hubs this test thread starts. A tokio test's body runs on its
/// test thread, so its `Hub::start` sees this.
pub fn set_backend(backend: Backend) {
    BACKEND.with(|b| b.set(backend));
}

pub fn backend() -> Backend {
    BACKEND.with(|b| b.get())
}

/// A database for one hub; dropped with it.
pub struct Database {
    pub url: String,
    /// The shared server's URL and this database's name, to drop it.
    shared: Option<(String, String)>,
    private: Option<PrivateServer>,
}

impl Database {
    /// Creates the database. On a thread of its own: the `postgres` client runs its own
    /// runtime, which cannot start inside a test's.
    pub fn create() -> Database {
        std::thread::spawn(Database::create_blocking)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    fn create_blocking() -> Database {
        match std::env::var("STOREHUB_TEST_POSTGRES") {
            Ok(base) if !base.is_empty() => {
                let name = format!(
                    "storehub_test_{}_{}",
                    std::process::id(),
                    super::free_port()
                );
                let mut client = postgres::Client::connect(&base, postgres::NoTls)
                    .unwrap_or_else(|e| panic!("connecting to STOREHUB_TEST_POSTGRES={base}: {e}"));
                client
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .unwrap();
                Database {
                    url: with_dbname(&base, &name),
                    shared: Some((base, name)),
                    private: None,
                }
            }
            _ => {
                let server = PrivateServer::start();
                Database {
                    url: format!("postgres://postgres@127.0.0.1:{}/postgres", server.port),
                    shared: None,
                    private: Some(server),
                }
            }
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Some((base, name)) = self.shared.take() {
            let _ = std::thread::spawn(move || {
                if let Ok(mut client) = postgres::Client::connect(&base, postgres::NoTls) {
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
                }
            })
            .join();
        }
    }
}

/// `base` with its database name replaced by `name`.
fn with_dbname(base: &str, name: &str) -> String {
    let (head, query) = match base.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (base, None),
    };
    // After "scheme://", a path starts the database name.
    let authority_start = head.find("://").map(|i| i + 3).unwrap_or(0);
    let head = match head[authority_start..].find('/') {
        Some(i) => &head[..authority_start + i],
        None => head,
    };
    match query {
        Some(q) => format!("{head}/{name}?{q}"),
        None => format!("{head}/{name}"),
    }
}

/// A throwaway PostgreSQL server.
struct PrivateServer {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

fn pg_bin(name: &str) -> PathBuf {
    let mut candidates = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        versions.sort();
        for v in versions.into_iter().rev() {
            candidates.push(v.join("bin").join(name));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            candidates.push(dir.join(name));
        }
    }
    candidates
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "PostgreSQL's {name} is not installed: the hub's PostgreSQL tests need it \
                 (Debian: apt install postgresql), or set STOREHUB_TEST_POSTGRES to a server URL"
            )
        })
}

fn is_root() -> bool {
    // The effective uid of this process, from /proc, without a libc call.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// `program args` as the `postgres` user when root.
fn as_postgres(program: PathBuf) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A private server that accepts TLS connections only, with a certificate for `localhost`
/// and 127.0.0.1 from a CA of its own; plain connections from 127.0.0.1 are refused.
pub struct TlsDatabase {
    /// `postgres://postgres@localhost:PORT/postgres`: the name the certificate carries.
    pub url: String,
    /// The server's CA (PEM).
    pub ca_cert: PathBuf,
    server: PrivateServer,
}

impl TlsDatabase {
    pub fn create() -> TlsDatabase {
        std::thread::spawn(|| {
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
            params
                .subject_alt_names
                .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
            let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
            let cert = params.signed_by(&key, &issuer).unwrap();
            let files = tempfile::tempdir().unwrap();
            let ca_cert = files.path().join("db-ca.crt");
            std::fs::write(&ca_cert, ca.pem()).unwrap();
            let server = PrivateServer::start_with(|dir| {
                let (crt, key_file) = (dir.join("server.crt"), dir.join("server.key"));
                std::fs::write(&crt, cert.pem()).unwrap();
                std::fs::write(&key_file, key.serialize_pem()).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
                    .unwrap();
                if is_root() {
                    for f in [&crt, &key_file] {
                        let out = Command::new("chown")
                            .arg("postgres:")
                            .arg(f)
                            .output()
                            .unwrap();
                        assert!(out.status.success(), "chown postgres: {out:?}");
                    }
                }
                // TLS on, and plain TCP refused: only "hostssl" lines let clients in.
                std::fs::write(
                    dir.join("data").join("pg_hba.conf"),
                    "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
                )
                .unwrap();
                vec![
                    "-c".into(),
                    "ssl=on".into(),
                    "-c".into(),
                    format!("ssl_cert_file={}", crt.display()),
                    "-c".into(),
                    format!("ssl_key_file={}", key_file.display()),
                ]
            });
            // Kept with the server, so the CA file lives as long as it does.
            let ca_in_server = server.dir.path().join("db-ca.crt");
            std::fs::copy(&ca_cert, &ca_in_server).unwrap();
            TlsDatabase {
                url: format!("postgres://postgres@localhost:{}/postgres", server.port),
                ca_cert: ca_in_server,
                server,
            }
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// The server's socket directory, for a plain local connection that inspects it.
    pub fn socket_url(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.server.dir.path().display(),
            self.server.port
        )
    }
}

impl PrivateServer {
    fn start() -> PrivateServer {
        PrivateServer::start_with(|_| Vec::new())
    }

    /// Starts a server; `configure` may write files into its directory (after `initdb`) and
    /// answers extra arguments for `postgres`.
    fn start_with(configure: impl FnOnce(&std::path::Path) -> Vec<String>) -> PrivateServer {
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            let out = Command::new("chown")
                .args(["postgres:"])
                .arg(dir.path())
                .output()
                .unwrap();
            assert!(out.status.success(), "chown postgres: {out:?}");
        }
        let data = dir.path().join("data");
        let out = as_postgres(pg_bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let extra = configure(dir.path());
        let port = super::free_port();
        let log = std::fs::File::create(dir.path().join("postgres.log")).unwrap();
        let child = as_postgres(pg_bin("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .arg("-k")
            .arg(dir.path())
            // A test database need not survive a crash of the machine.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let server = PrivateServer { dir, port, child };
        // Called on a thread of its own (see `Database::create`).
        // Readiness over the server's Unix socket: it answers whatever TLS rules apply to TCP.
        let url = format!(
            "host={} port={port} user=postgres dbname=postgres",
            server.dir.path().display()
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if postgres::Client::connect(&url, postgres::NoTls).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start: {}",
                std::fs::read_to_string(server.dir.path().join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        // runuser passes SIGTERM on to postgres: a "smart" shutdown would wait for the
        // hub's connections, so ask for "immediate" through SIGQUIT to the postmaster.
        let pid_file = self.dir.path().join("data").join("postmaster.pid");
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned))
        {
            let _ = Command::new("kill").args(["-QUIT", &pid]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
