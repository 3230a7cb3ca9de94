//! The durable-ingest baseline: SQLite, as an appliance without a purpose-built journal would
//! store till activity.
//!
//! `activity(id TEXT PRIMARY KEY, received_at INTEGER, event TEXT)` in WAL mode with
//! `synchronous=FULL` (the WAL is fsync'd at every commit, so a commit is durable when it
//! returns, as the box's 201 is), one transaction per event (`INSERT OR IGNORE`, the id as
//! idempotency key as on the box), default page size and auto-checkpoint. Server-less: it runs
//! in the bench process, with no HTTP, no parsing and no socket in the way, which only flatters
//! it.
//!
//! The tills are threads sharing **one connection behind a mutex**: SQLite takes one writer
//! at a time anyway, and with 8 connections each would wait for the write lock in SQLite's
//! busy handler, which sleeps in steps of milliseconds; a mutex hands the lock over at once,
//! SQLite's best case in one process.

use std::path::Path;
use std::sync::{Mutex, PoisonError};

use anyhow::{ensure, Context};
use rusqlite::{params, Connection};

pub struct Sqlite {
    conn: Mutex<Connection>,
}

impl Sqlite {
    pub fn open(path: &Path) -> anyhow::Result<Sqlite> {
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        ensure!(
            mode.eq_ignore_ascii_case("wal"),
            "SQLite refused WAL mode: {mode}"
        );
        conn.execute_batch("PRAGMA synchronous=FULL")?;
        let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
        ensure!(sync == 2, "SQLite synchronous is {sync}, not FULL (2)");
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS activity(
                 id TEXT PRIMARY KEY, received_at INTEGER, event TEXT)",
        )?;
        Ok(Sqlite {
            conn: Mutex::new(conn),
        })
    }

    /// Stores one event in its own durable transaction; true when it was new.
    pub fn insert(&self, id: &str, received_at_ms: i64, event: &str) -> anyhow::Result<bool> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let mut statement = conn.prepare_cached(
            "INSERT OR IGNORE INTO activity(id, received_at, event) VALUES (?1, ?2, ?3)",
        )?;
        Ok(statement.execute(params![id, received_at_ms, event])? == 1)
    }

    pub fn version() -> &'static str {
        rusqlite::version()
    }
}
