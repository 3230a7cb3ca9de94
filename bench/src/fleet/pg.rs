//! The fleet bench's own PostgreSQL, for `--backend postgres` without `--database-url`: a
//! throwaway server (`initdb` in the run directory, `postgres` on 127.0.0.1 at a free port),
//! run as the `postgres` user when the bench runs as root, since PostgreSQL refuses root.
//!
//! It is a bench server, not a production one: `fsync=off`, so the hubs' commits cost
//! less than on a durable server. The results say so.
//!
//! `runuser` forks and waits, so killing it would leave the server running: the server is
//! stopped through its postmaster (SIGQUIT, PostgreSQL's immediate shutdown), when it drops
//! and from the panic hook ([`crate::common::quit_on_exit`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};

use crate::common::{free_port, Proc};

/// The server's settings besides its port: durability off, and room for the replicas'
/// pools.
fn settings(max_connections: usize) -> Vec<String> {
    vec![
        "fsync=off".into(),
        format!("max_connections={max_connections}"),
    ]
}

pub struct Server {
    pub url: String,
    data: PathBuf,
    version: String,
    settings: Vec<String>,
    proc: Proc,
}

impl Server {
    /// `initdb` in `<run_dir>/pg`, then the server, waiting until it answers.
    pub async fn start(run_dir: &Path, max_connections: usize) -> anyhow::Result<Server> {
        let dir = run_dir.join("pg");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if is_root() {
            // The postgres user must reach its directory inside the run's (root's, 0700):
            // traversal only, the run directory's listing stays root's.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o711))
                .with_context(|| format!("opening {} to the postgres user", run_dir.display()))?;
            let out = Command::new("chown")
                .arg("postgres:")
                .arg(&dir)
                .output()
                .context("running chown")?;
            ensure!(
                out.status.success(),
                "chown postgres {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let data = dir.join("data");
        let out = as_postgres(pg_bin("initdb")?)
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .output()
            .context("running initdb")?;
        ensure!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let version = Command::new(pg_bin("postgres")?)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let port = free_port()?;
        let settings = settings(max_connections);
        let mut command = as_postgres(pg_bin("postgres")?);
        command
            .arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .arg("-k")
            .arg(&dir);
        for s in &settings {
            command.args(["-c", s]);
        }
        let proc = Proc::spawn(command, dir.join("postgres.log"))?;
        let server = Server {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            data,
            version,
            settings,
            proc,
        };
        let started = std::time::Instant::now();
        loop {
            if query(&server.url, "select 1").is_ok() {
                break;
            }
            server
                .proc
                .check_alive()
                .context("PostgreSQL exited while starting")?;
            if started.elapsed() > Duration::from_secs(30) {
                bail!(
                    "PostgreSQL did not answer within 30 s; log:\n{}",
                    server.proc.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // From now on a panic stops the server too.
        if let Some(pid) = server.postmaster() {
            crate::common::quit_on_exit(pid);
        }
        Ok(server)
    }

    /// The postmaster's pid, from its pid file.
    pub fn postmaster(&self) -> Option<u32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// What the results say of the server.
    pub fn describe(&self) -> Value {
        json!({
            "version": self.version,
            "settings": self.settings.join(", "),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // runuser passes SIGTERM on, but a "smart" shutdown would wait for clients: the
        // immediate one, straight to the postmaster.
        if let Some(pid) = self.postmaster() {
            crate::common::signal_quit(pid);
            crate::common::forget_quit_on_exit(pid);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline && self.proc.check_alive().is_ok() {
            std::thread::sleep(Duration::from_millis(50));
        }
        // The process guard then kills runuser if it is still there.
    }
}

/// One SQL query through `psql`, its unaligned output.
pub fn query(url: &str, sql: &str) -> anyhow::Result<String> {
    let out = Command::new("psql")
        .arg(url)
        .args(["-XAtc", sql])
        .output()
        .context("running psql (PostgreSQL's client)")?;
    ensure!(
        out.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A PostgreSQL server program: the newest of Debian's versioned directories, else `PATH`.
fn pg_bin(name: &str) -> anyhow::Result<PathBuf> {
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
        .with_context(|| {
            format!(
                "PostgreSQL's {name} is not installed (Debian: apt install postgresql); \
             or give --database-url"
            )
        })
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `program` as the `postgres` user when root.
fn as_postgres(program: PathBuf) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// What the hubs' database sessions were doing, sampled from `pg_stat_activity`: per state
/// and wait event, how many sessions were seen in it over how many samples.
pub struct Waits {
    samples: u64,
    seen: std::collections::BTreeMap<String, u64>,
}

impl Waits {
    pub fn json(&self) -> Value {
        json!({
            "samples": self.samples,
            "mean_sessions": self.sorted().iter().map(|(k, n)| {
                json!({"what": k, "mean": (**n as f64 / self.samples.max(1) as f64 * 100.0).round() / 100.0})
            }).collect::<Vec<_>>(),
        })
    }

    fn sorted(&self) -> Vec<(&String, &u64)> {
        let mut v: Vec<_> = self.seen.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        v
    }

    pub fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut md = format!(
            "\nThe hubs' PostgreSQL sessions over the window (`pg_stat_activity`, {} samples, \
             one a second): mean sessions per state and wait event.\n\n\
             | State / wait event | Mean sessions |\n|---|---|\n",
            self.samples
        );
        for (what, n) in self.sorted().into_iter().take(12) {
            let _ = writeln!(
                md,
                "| {what} | {:.2} |",
                *n as f64 / self.samples.max(1) as f64
            );
        }
        md
    }
}

/// Samples `pg_stat_activity` of the hubs' database until stopped.
pub struct WaitSampler {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Waits>,
}

impl WaitSampler {
    pub fn start(url: String, every: Duration) -> WaitSampler {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut waits = Waits {
                samples: 0,
                seen: Default::default(),
            };
            // The hubs' sessions: client backends on this database but this query's own.
            let sql = "select state || coalesce(' / ' || wait_event_type || ':' || wait_event, ''), count(*) \
                       from pg_stat_activity where backend_type = 'client backend' \
                       and datname = current_database() and pid <> pg_backend_pid() group by 1";
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => return waits,
                }
                let url = url.clone();
                let Ok(Ok(text)) = tokio::task::spawn_blocking(move || query(&url, sql)).await
                else {
                    continue;
                };
                waits.samples += 1;
                for line in text.lines() {
                    if let Some((what, n)) = line.rsplit_once('|') {
                        *waits.seen.entry(what.to_owned()).or_default() +=
                            n.trim().parse::<u64>().unwrap_or(0);
                    }
                }
            }
        });
        WaitSampler { stop, task }
    }

    pub async fn stop(self) -> Waits {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or(Waits {
            samples: 0,
            seen: Default::default(),
        })
    }
}
