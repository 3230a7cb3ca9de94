//! The PostgreSQL backend: the production database, shared by any number of `storehub serve`
//! replicas. The schema is in `crates/hub/migrations`, applied by `storehub migrate`
//! ([`migrate`]); `serve` refuses a database whose schema is not the one it was built for.
//!
//! How the model of [`super`] maps onto it:
//! - a module's writers lock its `module_heads` row first, so its sequence numbers are
//!   handed out and committed in order, and a reader never sees number 7 before number 6;
//! - reads of several things (a module's head, then its changes) run in one `REPEATABLE
//!   READ` transaction: one snapshot, as a redb read transaction is;
//! - activity is unique on (store, event id) in the database, and a store's pushes lock its
//!   `activity_heads` row: two replicas receiving the same batch store it once;
//! - every write to a store's records ends with `pg_notify('storehub_changes', store)` in its
//!   transaction, delivered at commit to every replica's [`listen`] thread, which forgets the
//!   store's module heads that replica keeps in memory and wakes the boxes of that store
//!   waiting on it;
//! - box reports and firmware states are JSON (`jsonb`), as in the embedded backend, so a
//!   field added to them needs no migration.
//!
//! The `postgres` crate is blocking, as the [`Backend`] interface is; each connection is used
//! by one thread at a time, from a bounded pool.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, GenericClient, IsolationLevel, NoTls, Row, Transaction};
use storebox_protocol::{CanonicalRecord, Change, PushedEvent};

use super::ota::{BoxOta, BundleMeta, DeleteBundle, EffectiveTarget, PutBundle, TargetedBy, FLEET};
use super::{
    change_body, rfc3339, ActivityEvent, Backend, BoxReport, ImportOutcome, PushOutcome,
    PutOutcome, StoreError, StoredRecord, Watchers,
};

/// The schema migrations, in order; a migration's number is its place in this list.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_initial",
        include_str!("../../migrations/0001_initial.sql"),
    ),
    (
        "0002_shared_state",
        include_str!("../../migrations/0002_shared_state.sql"),
    ),
];

/// The channel replicas notify each other on; the payload is a store id.
const CHANNEL: &str = "storehub_changes";

/// The channel of changes to the shared PKI state.
const PKI_CHANNEL: &str = "storehub_pki";

/// The advisory lock `storehub migrate` holds, so two replicas started with it at once do
/// not both apply a migration.
const MIGRATE_LOCK: i64 = 0x5354_4f52_4548_5542; // "STOREHUB"

/// The advisory lock of firmware bundle and target writes: the rules tying targets to
/// bundles are checked and applied under it.
const OTA_LOCK: i64 = 0x5354_4f52_454f_5441; // "STOREOTA"

/// How long a request waits for a free connection before it fails.
const POOL_WAIT: Duration = Duration::from_secs(10);

trait Ctx<T> {
    fn ctx(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T> Ctx<T> for Result<T, postgres::Error> {
    fn ctx(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Db {
            context,
            source: Box::new(e),
        })
    }
}

/// A column of a row of our own schema, as an error rather than a panic if it is not what
/// the schema says.
fn col<'a, T: postgres::types::FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T, StoreError> {
    row.try_get(idx).ctx("reading a column")
}

fn seq(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn sql_seq(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Where and how to reach the database (`[database]` in the hub's config).
#[derive(Debug, Clone)]
pub struct Connection {
    pub url: String,
    pub pool_size: usize,
    /// PEM certificates of the CAs the server's certificate must chain to; set, every
    /// connection is TLS (1.2 or 1.3, rustls) and the server's name is checked.
    pub ca_cert: Option<std::path::PathBuf>,
}

impl Connection {
    fn config(&self) -> anyhow::Result<postgres::Config> {
        let mut config = postgres::Config::from_str(&self.url).map_err(|e| {
            anyhow::anyhow!("[database] url is not a PostgreSQL connection string: {e}")
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name("storehub");
        if self.ca_cert.is_some() {
            // With a CA given, a server that does not offer TLS is refused, never used in
            // the clear.
            config.ssl_mode(postgres::config::SslMode::Require);
        }
        Ok(config)
    }

    /// The TLS client of database connections, from `ca_cert`.
    fn tls(
        &self,
        path: &std::path::Path,
    ) -> anyhow::Result<tokio_postgres_rustls::MakeRustlsConnect> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::CertificateDer;
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| anyhow::anyhow!("[database] ca_cert {}: {e}", path.display()))?;
        for cert in certs {
            let cert =
                cert.map_err(|e| anyhow::anyhow!("[database] ca_cert {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| anyhow::anyhow!("[database] ca_cert {}: {e}", path.display()))?;
        }
        anyhow::ensure!(
            !roots.is_empty(),
            "[database] ca_cert {} holds no certificate",
            path.display()
        );
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("setting up TLS to PostgreSQL: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }

    fn connect(&self) -> anyhow::Result<Client> {
        let config = self.config()?;
        let connected = match &self.ca_cert {
            Some(path) => config.connect(self.tls(path)?),
            None => config.connect(NoTls),
        };
        connected.map_err(|e| {
            anyhow::anyhow!(
                "connecting to PostgreSQL: {}",
                storebox_http::with_causes(&e)
            )
        })
    }
}

/// The schema version of a database: the number of migrations applied.
fn applied(client: &mut Client) -> anyhow::Result<Vec<String>> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .map_err(|e| anyhow::anyhow!("creating the schema_migrations table: {e}"))?;
    let rows = client
        .query("SELECT name FROM schema_migrations ORDER BY version", &[])
        .map_err(|e| anyhow::anyhow!("reading the schema_migrations table: {e}"))?;
    rows.iter()
        .map(|r| {
            r.try_get::<_, String>(0)
                .map_err(|e| anyhow::anyhow!("reading schema_migrations: {e}"))
        })
        .collect()
}

/// Applies the migrations the database lacks, each in its own transaction, and returns the
/// names of those applied. Refuses a database migrated by a newer storehub.
pub fn migrate(connection: &Connection) -> anyhow::Result<Vec<String>> {
    let mut client = connection.connect()?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
        .map_err(|e| anyhow::anyhow!("taking the migration lock: {e}"))?;
    let result = (|| {
        let done = applied(&mut client)?;
        check_known(&done)?;
        let mut ran = Vec::new();
        for (n, (name, sql)) in MIGRATIONS.iter().enumerate().skip(done.len()) {
            let mut txn = client
                .transaction()
                .map_err(|e| anyhow::anyhow!("starting migration {name}: {e}"))?;
            txn.batch_execute(sql)
                .map_err(|e| anyhow::anyhow!("applying migration {name}: {e}"))?;
            let version = i32::try_from(n + 1).unwrap_or(i32::MAX);
            txn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                &[&version, name],
            )
            .map_err(|e| anyhow::anyhow!("recording migration {name}: {e}"))?;
            txn.commit()
                .map_err(|e| anyhow::anyhow!("committing migration {name}: {e}"))?;
            ran.push((*name).to_owned());
        }
        Ok(ran)
    })();
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK]);
    result
}

/// Errors unless the applied migrations are a prefix of ours, under the same names.
fn check_known(done: &[String]) -> anyhow::Result<()> {
    if done.len() > MIGRATIONS.len() {
        anyhow::bail!(
            "the database schema is at migration {} ({}), newer than this storehub knows \
             ({} migrations): run a storehub at least as new as the one that migrated it",
            done.len(),
            done.last().map(String::as_str).unwrap_or(""),
            MIGRATIONS.len()
        );
    }
    for (have, (want, _)) in done.iter().zip(MIGRATIONS) {
        if have != want {
            anyhow::bail!(
                "the database's migration {have:?} is not this storehub's {want:?}: \
                 the database belongs to another application or version"
            );
        }
    }
    Ok(())
}

/// A bounded pool of connections: at most `size` open, a request waits for a free one.
struct Pool {
    connection: Connection,
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    idle: Vec<Conn>,
    open: usize,
}

/// A connection and the statements prepared on it. PostgreSQL parses and plans a prepared
/// statement once per connection, not on every call, and a call is one round trip, not two.
struct Conn {
    client: Client,
    statements: HashMap<&'static str, postgres::Statement>,
}

impl Conn {
    fn new(client: Client) -> Conn {
        Conn {
            client,
            statements: HashMap::new(),
        }
    }
}

/// Statements on a connection or in one of its transactions, each prepared on first use.
struct Db<'a, C> {
    c: &'a mut C,
    statements: &'a mut HashMap<&'static str, postgres::Statement>,
}

type Params<'p> = &'p [&'p (dyn postgres::types::ToSql + Sync)];

impl<C: GenericClient> Db<'_, C> {
    fn statement(&mut self, sql: &'static str) -> Result<postgres::Statement, postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.c.prepare(sql)?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    fn query(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, postgres::Error> {
        let statement = self.statement(sql)?;
        self.c.query(&statement, params)
    }

    fn query_one(&mut self, sql: &'static str, params: Params<'_>) -> Result<Row, postgres::Error> {
        let statement = self.statement(sql)?;
        self.c.query_one(&statement, params)
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
    ) -> Result<Option<Row>, postgres::Error> {
        let statement = self.statement(sql)?;
        self.c.query_opt(&statement, params)
    }

    fn execute(&mut self, sql: &'static str, params: Params<'_>) -> Result<u64, postgres::Error> {
        let statement = self.statement(sql)?;
        self.c.execute(&statement, params)
    }
}

/// A connection taken from the pool; it goes back when dropped, unless it broke.
struct Pooled<'p> {
    pool: &'p Pool,
    client: Option<Conn>,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        // Set from creation to drop.
        #[allow(clippy::expect_used)]
        self.client
            .as_ref()
            .expect("a pooled connection is present until dropped")
    }
}

impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        #[allow(clippy::expect_used)]
        self.client
            .as_mut()
            .expect("a pooled connection is present until dropped")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let mut state = self.pool.state.lock().unwrap_or_else(|e| e.into_inner());
        match self.client.take() {
            Some(conn) if !conn.client.is_closed() => state.idle.push(conn),
            _ => state.open = state.open.saturating_sub(1),
        }
        self.pool.freed.notify_one();
    }
}

impl Pool {
    fn get(&self) -> Result<Pooled<'_>, StoreError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = std::time::Instant::now() + POOL_WAIT;
        loop {
            if let Some(client) = state.idle.pop() {
                return Ok(Pooled {
                    pool: self,
                    client: Some(client),
                });
            }
            if state.open < self.connection.pool_size {
                state.open += 1;
                drop(state);
                return match self.connection.connect() {
                    Ok(client) => Ok(Pooled {
                        pool: self,
                        client: Some(Conn::new(client)),
                    }),
                    Err(e) => {
                        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                        state.open = state.open.saturating_sub(1);
                        self.freed.notify_one();
                        Err(StoreError::Db {
                            context: "opening a connection",
                            source: e.into(),
                        })
                    }
                };
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(StoreError::Db {
                    context: "waiting for a free connection",
                    source: format!(
                        "all {} connections of [database] pool_size stayed busy for {} s",
                        self.connection.pool_size,
                        POOL_WAIT.as_secs()
                    )
                    .into(),
                });
            }
            state = self
                .freed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The hub database in PostgreSQL.
pub struct Postgres {
    pool: Pool,
}

impl Postgres {
    /// Connects, and checks that the schema is the one this storehub was built for.
    pub fn open(connection: Connection) -> anyhow::Result<Postgres> {
        let mut client = connection.connect()?;
        let done = applied(&mut client)?;
        check_known(&done)?;
        if done.len() < MIGRATIONS.len() {
            anyhow::bail!(
                "the database schema is at migration {} of {}: run `storehub migrate` first",
                done.len(),
                MIGRATIONS.len()
            );
        }
        Ok(Postgres {
            pool: Pool {
                connection,
                state: Mutex::new(PoolState {
                    idle: vec![Conn::new(client)],
                    open: 1,
                }),
                freed: Condvar::new(),
            },
        })
    }

    /// A read-only transaction over one snapshot of the database.
    fn read<T>(
        &self,
        f: impl FnOnce(&mut Db<'_, Transaction<'_>>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut pooled = self.pool.get()?;
        let Conn { client, statements } = &mut *pooled;
        let mut txn = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .ctx("starting a read")?;
        let out = f(&mut Db {
            c: &mut txn,
            statements,
        })?;
        txn.commit().ctx("ending a read")?;
        Ok(out)
    }

    /// One statement on its own: atomic without a transaction, in half the round trips.
    fn direct<T>(
        &self,
        f: impl FnOnce(&mut Db<'_, Client>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut pooled = self.pool.get()?;
        let Conn { client, statements } = &mut *pooled;
        f(&mut Db {
            c: client,
            statements,
        })
    }

    /// A read-write transaction; with `durable` false, its commit does not wait for the
    /// database's disk (bookkeeping that the next contact replaces).
    fn write<T>(
        &self,
        durable: bool,
        f: impl FnOnce(&mut Db<'_, Transaction<'_>>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut pooled = self.pool.get()?;
        let Conn { client, statements } = &mut *pooled;
        let mut txn = client.transaction().ctx("starting a write")?;
        if !durable {
            txn.batch_execute("SET LOCAL synchronous_commit = off")
                .ctx("relaxing durability")?;
        }
        let out = f(&mut Db {
            c: &mut txn,
            statements,
        })?;
        txn.commit().ctx("committing a write")?;
        Ok(out)
    }
}

/// Wakes the boxes connected to this process when another replica (or this one) writes to
/// their store: a thread listening on [`CHANNEL`], reconnecting after a loss. After each
/// (re)connection every watcher is woken once, since notifications may have been missed.
pub fn listen(connection: Connection, watchers: Arc<Watchers>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("pg-listen".into())
        .spawn(move || {
            let mut delay = Duration::from_millis(200);
            loop {
                match listen_once(&connection, &watchers) {
                    Ok(()) => delay = Duration::from_millis(200),
                    Err(e) => {
                        // Writes of other replicas go unheard until the next LISTEN: the
                        // module heads are read from the database meanwhile.
                        watchers.heads.set_on(false);
                        tracing::warn!(
                            "change notifications from PostgreSQL lost ({e}); \
                             reconnecting in {} ms",
                            delay.as_millis()
                        );
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                }
            }
        })
        .map(|_| ())
}

fn listen_once(connection: &Connection, watchers: &Watchers) -> anyhow::Result<()> {
    let mut client = connection.connect()?;
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .map_err(|e| anyhow::anyhow!("LISTEN: {e}"))?;
    client
        .batch_execute(&format!("LISTEN {PKI_CHANNEL}"))
        .map_err(|e| anyhow::anyhow!("LISTEN: {e}"))?;
    // From here every write is heard: the heads this process reads can be kept.
    watchers.heads.set_on(true);
    watchers.wake_all();
    reload_pki();
    loop {
        let mut pki_changed = false;
        {
            let mut notifications = client.notifications();
            let first = match notifications.blocking_iter().next() {
                Ok(Some(n)) => n,
                Ok(None) => anyhow::bail!("the connection closed"),
                Err(e) => anyhow::bail!("{e}"),
            };
            // A burst of enrollments notifies once per box: the state is read once for all
            // the notifications already here, not once each.
            let mut handle = |n: postgres::Notification| {
                if n.channel() == PKI_CHANNEL {
                    pki_changed = true;
                } else {
                    watchers.wake(n.payload());
                }
            };
            handle(first);
            let mut here = notifications.iter();
            loop {
                match here.next() {
                    Ok(Some(n)) => handle(n),
                    Ok(None) => break,
                    Err(e) => anyhow::bail!("{e}"),
                }
            }
        }
        if pki_changed {
            reload_pki();
        }
    }
}

fn reload_pki() {
    if let Some(pki) = crate::pki::global() {
        if let Err(e) = pki.reload() {
            tracing::error!("reading the PKI state another replica changed: {e:#}");
        }
    }
}

/// The PKI state shared by the replicas, in `hub_state` under the name `pki`.
pub struct SharedPki {
    connection: Connection,
    client: Mutex<Option<Client>>,
}

impl SharedPki {
    pub fn new(connection: Connection) -> SharedPki {
        SharedPki {
            connection,
            client: Mutex::new(None),
        }
    }

    /// Runs `f` on this state's own connection, reopened after a failure. Enrollment calls
    /// come from the async listeners: the blocking client runs off their worker thread.
    fn with_client<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error>,
    ) -> anyhow::Result<T> {
        let run = || {
            let mut slot = self.client.lock().unwrap_or_else(|e| e.into_inner());
            if slot.as_ref().is_none_or(Client::is_closed) {
                *slot = Some(self.connection.connect()?);
            }
            let Some(client) = slot.as_mut() else {
                anyhow::bail!("no connection to PostgreSQL");
            };
            let out = f(client);
            if out.is_err() {
                *slot = None;
            }
            out.map_err(|e| anyhow::anyhow!("the shared PKI state in PostgreSQL: {e}"))
        };
        match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(run),
            Err(_) => run(),
        }
    }
}

impl crate::pki::SharedPkiState for SharedPki {
    fn load(&self) -> anyhow::Result<Option<(i64, Vec<u8>)>> {
        self.with_client(|client| {
            let row = client.query_opt(
                "SELECT version, value FROM hub_state WHERE name = 'pki'",
                &[],
            )?;
            row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
        })
    }

    fn store(&self, version: Option<i64>, bytes: &[u8]) -> anyhow::Result<Option<i64>> {
        self.with_client(|client| {
            let mut txn = client.transaction()?;
            let row = match version {
                None => txn.query_opt(
                    "INSERT INTO hub_state (name, version, value) VALUES ('pki', 1, $1) \
                     ON CONFLICT DO NOTHING RETURNING version",
                    &[&bytes],
                )?,
                Some(v) => txn.query_opt(
                    "UPDATE hub_state SET version = version + 1, value = $2 \
                     WHERE name = 'pki' AND version = $1 RETURNING version",
                    &[&v, &bytes],
                )?,
            };
            let stored = row.map(|r| r.try_get::<_, i64>(0)).transpose()?;
            if stored.is_some() {
                txn.execute("SELECT pg_notify($1, '')", &[&PKI_CHANNEL])?;
            }
            txn.commit()?;
            Ok(stored)
        })
    }
}

/// A record's row as this backend keeps it.
#[derive(Clone)]
struct Row8 {
    seq: u64,
    deleted_at_ms: Option<i64>,
    json: String,
    prev: Option<(u64, String)>,
}

impl Row8 {
    fn from_row(row: &Row, first: usize) -> Result<Row8, StoreError> {
        let prev_seq: Option<i64> = col(row, first + 3)?;
        let prev_json: Option<String> = col(row, first + 4)?;
        Ok(Row8 {
            seq: seq(col(row, first)?),
            deleted_at_ms: col(row, first + 1)?,
            json: col(row, first + 2)?,
            prev: prev_seq.zip(prev_json).map(|(s, j)| (seq(s), j)),
        })
    }

    fn stored(self) -> StoredRecord {
        StoredRecord {
            seq: self.seq,
            deleted_at_ms: self.deleted_at_ms,
            json: self.json,
            prev: self.prev,
        }
    }
}

/// The columns of a record after its id, as `Row8::from_row` reads them.
macro_rules! record_columns {
    () => {
        "seq, deleted_at_ms, json, prev_seq, prev_json"
    };
}

/// Writes to one module inside a transaction: the module's head row locked, the records
/// touched read first, their new rows written in one statement at the end.
struct ModuleWriter<'t, 'd, 'c> {
    txn: &'t mut Db<'d, Transaction<'c>>,
    store: String,
    module: String,
    head: u64,
    current: HashMap<String, Row8>,
    /// Ids written, in the order of their first write.
    order: Vec<String>,
    written: HashMap<String, Row8>,
}

impl<'t, 'd, 'c> ModuleWriter<'t, 'd, 'c> {
    /// Locks the module's head and reads the current rows of `ids` (`None`: all of them).
    fn open(
        txn: &'t mut Db<'d, Transaction<'c>>,
        store: &str,
        module: &str,
        ids: Option<Vec<&str>>,
    ) -> Result<ModuleWriter<'t, 'd, 'c>, StoreError> {
        txn.execute(
            "INSERT INTO module_heads (store, module) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&store, &module],
        )
        .ctx("creating a module head")?;
        let row = txn
            .query_one(
                "SELECT head FROM module_heads WHERE store = $1 AND module = $2 FOR UPDATE",
                &[&store, &module],
            )
            .ctx("locking a module head")?;
        let head = seq(col(&row, 0)?);
        let rows = match ids {
            None => txn.query(
                concat!(
                    "SELECT id, ",
                    record_columns!(),
                    " FROM records WHERE store = $1 AND module = $2"
                ),
                &[&store, &module],
            ),
            Some(ids) => txn.query(
                concat!(
                    "SELECT id, ",
                    record_columns!(),
                    " FROM records WHERE store = $1 AND module = $2 AND id = ANY($3)"
                ),
                &[&store, &module, &ids],
            ),
        }
        .ctx("reading the records to write")?;
        let mut current = HashMap::with_capacity(rows.len());
        for row in &rows {
            current.insert(col::<String>(row, 0)?, Row8::from_row(row, 1)?);
        }
        Ok(ModuleWriter {
            txn,
            store: store.to_owned(),
            module: module.to_owned(),
            head,
            current,
            order: Vec::new(),
            written: HashMap::new(),
        })
    }

    fn set(&mut self, id: &str, row: Row8) {
        if !self.written.contains_key(id) {
            self.order.push(id.to_owned());
        }
        self.current.insert(id.to_owned(), row.clone());
        self.written.insert(id.to_owned(), row);
    }

    fn put(&mut self, id: &str, json: &str) -> PutOutcome {
        let current = self.current.get(id);
        let outcome = match current {
            Some(c) if c.deleted_at_ms.is_none() && c.json == json => return PutOutcome::Unchanged,
            Some(c) if c.deleted_at_ms.is_none() => PutOutcome::Updated,
            _ => PutOutcome::Created,
        };
        self.head += 1;
        let prev = current
            .filter(|c| c.deleted_at_ms.is_none())
            .map(|c| (c.seq, c.json.clone()));
        let row = Row8 {
            seq: self.head,
            deleted_at_ms: None,
            json: json.to_owned(),
            prev,
        };
        self.set(id, row);
        outcome
    }

    fn delete(&mut self, id: &str, now_ms: i64) -> bool {
        match self.current.get(id) {
            Some(c) if c.deleted_at_ms.is_none() => {}
            _ => return false,
        }
        self.head += 1;
        let row = Row8 {
            seq: self.head,
            deleted_at_ms: Some(now_ms),
            json: String::new(),
            prev: None,
        };
        self.set(id, row);
        true
    }

    /// Live ids in id (byte) order.
    fn live_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .current
            .iter()
            .filter(|(_, r)| r.deleted_at_ms.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Writes the rows, the head, and the notification; the caller commits.
    fn finish(self) -> Result<u64, StoreError> {
        if self.order.is_empty() {
            return Ok(self.head);
        }
        let n = self.order.len();
        let mut ids = Vec::with_capacity(n);
        let mut seqs = Vec::with_capacity(n);
        let mut deleted = Vec::with_capacity(n);
        let mut jsons = Vec::with_capacity(n);
        let mut prev_seqs = Vec::with_capacity(n);
        let mut prev_jsons = Vec::with_capacity(n);
        for id in &self.order {
            let Some(row) = self.written.get(id) else {
                continue;
            };
            ids.push(id.as_str());
            seqs.push(sql_seq(row.seq));
            deleted.push(row.deleted_at_ms);
            jsons.push(row.json.as_str());
            prev_seqs.push(row.prev.as_ref().map(|(s, _)| sql_seq(*s)));
            prev_jsons.push(row.prev.as_ref().map(|(_, j)| j.as_str()));
        }
        // A record moving to a new sequence number could collide on the (store, module, seq)
        // index with the number another row of this statement leaves; the numbers handed out
        // here are all above the old head, so none does.
        self.txn
            .execute(
                "INSERT INTO records \
                     (store, module, id, seq, deleted_at_ms, json, prev_seq, prev_json) \
                 SELECT $1, $2, * FROM unnest($3::text[], $4::int8[], $5::int8[], \
                                              $6::text[], $7::int8[], $8::text[]) \
                 ON CONFLICT (store, module, id) DO UPDATE SET \
                     seq = EXCLUDED.seq, deleted_at_ms = EXCLUDED.deleted_at_ms, \
                     json = EXCLUDED.json, prev_seq = EXCLUDED.prev_seq, \
                     prev_json = EXCLUDED.prev_json",
                &[
                    &self.store,
                    &self.module,
                    &ids,
                    &seqs,
                    &deleted,
                    &jsons,
                    &prev_seqs,
                    &prev_jsons,
                ],
            )
            .ctx("writing records")?;
        self.txn
            .execute(
                "UPDATE module_heads SET head = $3 WHERE store = $1 AND module = $2",
                &[&self.store, &self.module, &sql_seq(self.head)],
            )
            .ctx("writing a module head")?;
        self.txn
            .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &self.store])
            .ctx("notifying the replicas")?;
        Ok(self.head)
    }
}

/// (head, horizon) of a module; zeros for a module never written.
fn read_head(
    txn: &mut Db<'_, impl GenericClient>,
    store: &str,
    module: &str,
) -> Result<(u64, u64), StoreError> {
    let row = txn
        .query_opt(
            "SELECT head, horizon FROM module_heads WHERE store = $1 AND module = $2",
            &[&store, &module],
        )
        .ctx("reading a module head")?;
    match row {
        Some(row) => Ok((seq(col(&row, 0)?), seq(col(&row, 1)?))),
        None => Ok((0, 0)),
    }
}

fn json_of<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    what: &'static str,
) -> Result<T, StoreError> {
    serde_json::from_value(value).map_err(|_| StoreError::Corrupt { what })
}

fn value_of<T: serde::Serialize>(
    value: &T,
    what: &'static str,
) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(value).map_err(|_| StoreError::Corrupt { what })
}

fn targeted_by_in(
    txn: &mut Db<'_, impl GenericClient>,
    version: &str,
) -> Result<TargetedBy, StoreError> {
    let rows = txn
        .query(
            "SELECT key FROM ota_targets WHERE version = $1 ORDER BY key",
            &[&version],
        )
        .ctx("reading firmware targets")?;
    let mut by = TargetedBy::default();
    for row in &rows {
        let key: String = col(row, 0)?;
        if key == FLEET {
            by.fleet = true;
        } else {
            by.stores.push(key);
        }
    }
    Ok(by)
}

fn bundle_in(
    txn: &mut Db<'_, impl GenericClient>,
    version: &str,
) -> Result<Option<BundleMeta>, StoreError> {
    let row = txn
        .query_opt(
            "SELECT meta FROM ota_bundles WHERE version = $1",
            &[&version],
        )
        .ctx("reading a firmware bundle")?;
    row.map(|r| json_of(col(&r, 0)?, "firmware bundle record"))
        .transpose()
}

impl Backend for Postgres {
    fn import(
        &self,
        store: &str,
        module: &str,
        records: &[CanonicalRecord],
        replace: bool,
        now_ms: i64,
    ) -> Result<ImportOutcome, StoreError> {
        self.write(true, |txn| {
            // A replace needs every live id; a big import reads the module in one scan
            // rather than naming thousands of ids.
            let ids = (!replace && records.len() <= 1000)
                .then(|| records.iter().map(|r| r.id.as_str()).collect());
            let mut writer = ModuleWriter::open(txn, store, module, ids)?;
            let mut outcome = ImportOutcome::default();
            let mut seen = std::collections::BTreeSet::new();
            for record in records {
                match writer.put(&record.id, &record.json) {
                    PutOutcome::Unchanged => outcome.unchanged += 1,
                    PutOutcome::Created | PutOutcome::Updated => outcome.upserted += 1,
                }
                seen.insert(record.id.as_str());
            }
            if replace {
                for id in writer.live_ids() {
                    if !seen.contains(id.as_str()) && writer.delete(&id, now_ms) {
                        outcome.deleted += 1;
                    }
                }
            }
            writer.finish()?;
            Ok(outcome)
        })
    }

    fn put_record(
        &self,
        store: &str,
        module: &str,
        record: &CanonicalRecord,
    ) -> Result<(PutOutcome, u64), StoreError> {
        self.write(true, |txn| {
            let mut writer = ModuleWriter::open(txn, store, module, Some(vec![&record.id]))?;
            let outcome = writer.put(&record.id, &record.json);
            let head = writer.finish()?;
            Ok((outcome, head))
        })
    }

    fn delete_record(
        &self,
        store: &str,
        module: &str,
        id: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.write(true, |txn| {
            let mut writer = ModuleWriter::open(txn, store, module, Some(vec![id]))?;
            let deleted = writer.delete(id, now_ms);
            writer.finish()?;
            Ok(deleted)
        })
    }

    fn get_record(
        &self,
        store: &str,
        module: &str,
        id: &str,
    ) -> Result<Option<String>, StoreError> {
        self.direct(|client| {
            let row = client
                .query_opt(
                    "SELECT json FROM records \
                 WHERE store = $1 AND module = $2 AND id = $3 AND deleted_at_ms IS NULL",
                    &[&store, &module, &id],
                )
                .ctx("reading a record")?;
            row.map(|r| col(&r, 0)).transpose()
        })
    }

    fn changes_since(
        &self,
        store: &str,
        module: &str,
        cursor: u64,
        limit: usize,
    ) -> Result<Option<(Vec<Change>, u64, bool)>, StoreError> {
        self.read(|txn| {
            let (head, horizon) = read_head(txn, store, module)?;
            // Below the horizon a deletion may have been forgotten; above the head the box
            // holds state from some other database. Either way only a full sync makes the
            // module exact again.
            if cursor < horizon || cursor > head {
                return Ok(None);
            }
            let take = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
            let rows = txn
                .query(
                    concat!(
                        "SELECT id, ",
                        record_columns!(),
                        " FROM records WHERE store = $1 AND module = $2 AND seq > $3 \
                         ORDER BY seq LIMIT $4"
                    ),
                    &[&store, &module, &sql_seq(cursor), &take],
                )
                .ctx("scanning changes")?;
            let more = rows.len() > limit;
            let mut out = Vec::with_capacity(rows.len().min(limit));
            let mut last = cursor;
            for row in rows.iter().take(limit) {
                let id: String = col(row, 0)?;
                let record = Row8::from_row(row, 1)?;
                last = record.seq;
                out.push(Change {
                    id,
                    body: change_body(record.stored(), cursor),
                });
            }
            if !more {
                last = head;
            }
            Ok(Some((out, last, more)))
        })
    }

    fn snapshot(
        &self,
        store: &str,
        module: &str,
    ) -> Result<(Vec<(String, String)>, u64), StoreError> {
        self.read(|txn| {
            let (head, _) = read_head(txn, store, module)?;
            let rows = txn
                .query(
                    "SELECT id, json FROM records \
                     WHERE store = $1 AND module = $2 AND deleted_at_ms IS NULL ORDER BY id",
                    &[&store, &module],
                )
                .ctx("scanning records")?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push((col(row, 0)?, col(row, 1)?));
            }
            Ok((out, head))
        })
    }

    fn module_head(&self, store: &str, module: &str) -> Result<u64, StoreError> {
        self.direct(|c| Ok(read_head(c, store, module)?.0))
    }

    fn module_heads(&self, keys: &[&str]) -> Result<HashMap<(String, String), u64>, StoreError> {
        self.direct(|c| {
            let rows = c
                .query(
                    "SELECT store, module, head FROM module_heads WHERE store = ANY($1)",
                    &[&keys],
                )
                .ctx("reading module heads")?;
            let mut out = HashMap::with_capacity(rows.len());
            for row in &rows {
                out.insert((col(row, 0)?, col(row, 1)?), seq(col(row, 2)?));
            }
            Ok(out)
        })
    }

    fn prune_tombstones(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.write(true, |txn| {
            let row = txn
                .query_one(
                    "WITH gone AS (
                         DELETE FROM records WHERE deleted_at_ms < $1
                         RETURNING store, module, seq),
                     per_module AS (
                         SELECT store, module, max(seq) AS top, count(*) AS n
                         FROM gone GROUP BY store, module),
                     raised AS (
                         UPDATE module_heads h SET horizon = GREATEST(h.horizon, p.top)
                         FROM per_module p WHERE h.store = p.store AND h.module = p.module
                         RETURNING 1)
                     SELECT coalesce(sum(n), 0)::int8 FROM per_module",
                    &[&before_ms],
                )
                .ctx("pruning tombstones")?;
            Ok(seq(col(&row, 0)?))
        })
    }

    fn push_activity(
        &self,
        store: &str,
        events: &[PushedEvent],
        now_ms: i64,
    ) -> Result<PushOutcome, StoreError> {
        self.write(true, |txn| {
            // One statement creates the store's head if need be and locks it (the no-op
            // update takes the row lock), so pushes of a store number their events in
            // commit order.
            let row = txn
                .query_one(
                    "INSERT INTO activity_heads (store) VALUES ($1) \
                     ON CONFLICT (store) DO UPDATE SET head = activity_heads.head \
                     RETURNING head",
                    &[&store],
                )
                .ctx("locking the activity head")?;
            let mut next = seq(col(&row, 0)?) + 1;
            let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
            let rows = txn
                .query(
                    "SELECT id FROM activity WHERE store = $1 AND id = ANY($2)",
                    &[&store, &ids],
                )
                .ctx("checking event ids")?;
            let mut known = std::collections::HashSet::with_capacity(rows.len());
            for row in &rows {
                known.insert(col::<String>(row, 0)?);
            }
            let mut outcome = PushOutcome::default();
            let (mut seqs, mut new_ids, mut received, mut bodies) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for event in events {
                // A batch may repeat an id too: the first one counts.
                if !known.insert(event.id.clone()) {
                    outcome.duplicates += 1;
                    continue;
                }
                seqs.push(sql_seq(next));
                new_ids.push(event.id.as_str());
                received.push(event.received_at_ms);
                bodies.push(event.event.as_str());
                next += 1;
                outcome.accepted += 1;
            }
            if outcome.accepted > 0 {
                // The events and the new head in one statement: one round trip fewer
                // for every push of the fleet.
                txn.execute(
                    "WITH stored AS ( \
                         INSERT INTO activity \
                             (store, seq, id, received_at_ms, hub_received_at_ms, event) \
                         SELECT $1, s, i, r, $2, e \
                         FROM unnest($3::int8[], $4::text[], $5::int8[], $6::text[]) \
                             AS u(s, i, r, e)) \
                     UPDATE activity_heads SET head = $7 WHERE store = $1",
                    &[
                        &store,
                        &now_ms,
                        &seqs,
                        &new_ids,
                        &received,
                        &bodies,
                        &sql_seq(next - 1),
                    ],
                )
                .ctx("storing events")?;
            }
            Ok(outcome)
        })
    }

    fn activity(
        &self,
        store: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<ActivityEvent>, u64), StoreError> {
        self.read(|txn| {
            let take = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = txn
                .query(
                    "SELECT seq, id, received_at_ms, hub_received_at_ms, event FROM activity \
                     WHERE store = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                    &[&store, &sql_seq(after), &take],
                )
                .ctx("scanning activity")?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let body: String = col(row, 4)?;
                let event = serde_json::from_str(&body)
                    .map_err(|_| StoreError::Corrupt { what: "event body" })?;
                out.push(ActivityEvent {
                    seq: seq(col(row, 0)?),
                    id: col(row, 1)?,
                    received_at: rfc3339(col(row, 2)?),
                    hub_received_at: rfc3339(col(row, 3)?),
                    event,
                });
            }
            let high = activity_head(txn, store)?;
            Ok((out, high))
        })
    }

    fn activity_high_water(&self, store: &str) -> Result<u64, StoreError> {
        self.direct(|c| activity_head(c, store))
    }

    fn box_report(&self, store: &str) -> Result<BoxReport, StoreError> {
        self.direct(|txn| {
            let row = txn
                .query_opt("SELECT report FROM box_reports WHERE store = $1", &[&store])
                .ctx("reading a box report")?;
            match row {
                Some(row) => json_of(col(&row, 0)?, "box report"),
                None => Ok(BoxReport::default()),
            }
        })
    }

    fn update_box_reports(
        &self,
        stores: &[&str],
        change: &mut dyn FnMut(&str, &mut BoxReport),
    ) -> Result<(), StoreError> {
        let empty = value_of(&BoxReport::default(), "box report")?;
        self.write(false, |txn| {
            txn.execute(
                "INSERT INTO box_reports (store, report) SELECT s, $2 FROM unnest($1::text[]) AS s \
                 ON CONFLICT DO NOTHING",
                &[&stores, &empty],
            )
            .ctx("creating box reports")?;
            // Locked in store order, as every flush does: two replicas flushing at once wait
            // for each other instead of deadlocking.
            let rows = txn
                .query(
                    "SELECT store, report FROM box_reports WHERE store = ANY($1) \
                     ORDER BY store FOR UPDATE",
                    &[&stores],
                )
                .ctx("reading box reports")?;
            let mut names = Vec::with_capacity(rows.len());
            let mut reports = Vec::with_capacity(rows.len());
            for row in &rows {
                let store: String = col(row, 0)?;
                let mut report: BoxReport = json_of(col(row, 1)?, "box report")?;
                change(&store, &mut report);
                reports.push(value_of(&report, "box report")?);
                names.push(store);
            }
            txn.execute(
                "UPDATE box_reports b SET report = u.r \
                 FROM unnest($1::text[], $2::jsonb[]) AS u(s, r) WHERE b.store = u.s",
                &[&names, &reports],
            )
            .ctx("writing box reports")?;
            Ok(())
        })
    }

    fn ota_bundles(&self) -> Result<Vec<(String, BundleMeta)>, StoreError> {
        self.direct(|txn| {
            let rows = txn
                .query(
                    "SELECT version, meta FROM ota_bundles ORDER BY version",
                    &[],
                )
                .ctx("scanning firmware bundles")?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push((
                    col(row, 0)?,
                    json_of(col(row, 1)?, "firmware bundle record")?,
                ));
            }
            Ok(out)
        })
    }

    fn ota_bundle(&self, version: &str) -> Result<Option<BundleMeta>, StoreError> {
        self.direct(|c| bundle_in(c, version))
    }

    fn ota_targeted_by(&self, version: &str) -> Result<TargetedBy, StoreError> {
        self.direct(|c| targeted_by_in(c, version))
    }

    fn ota_put_bundle(&self, version: &str, meta: &BundleMeta) -> Result<PutBundle, StoreError> {
        self.write(true, |txn| {
            txn.execute("SELECT pg_advisory_xact_lock($1)", &[&OTA_LOCK])
                .ctx("locking firmware targets")?;
            let by = targeted_by_in(txn, version)?;
            if by.any() {
                return Ok(PutBundle::Targeted(by));
            }
            let old = bundle_in(txn, version)?;
            txn.execute(
                "INSERT INTO ota_bundles (version, meta) VALUES ($1, $2) \
                 ON CONFLICT (version) DO UPDATE SET meta = EXCLUDED.meta",
                &[&version, &value_of(meta, "firmware bundle record")?],
            )
            .ctx("writing a firmware bundle")?;
            Ok(match old {
                Some(old) => PutBundle::Replaced { old_file: old.file },
                None => PutBundle::Created,
            })
        })
    }

    fn ota_delete_bundle(&self, version: &str) -> Result<DeleteBundle, StoreError> {
        self.write(true, |txn| {
            txn.execute("SELECT pg_advisory_xact_lock($1)", &[&OTA_LOCK])
                .ctx("locking firmware targets")?;
            let by = targeted_by_in(txn, version)?;
            if by.any() {
                return Ok(DeleteBundle::Targeted(by));
            }
            let row = txn
                .query_opt(
                    "DELETE FROM ota_bundles WHERE version = $1 RETURNING meta",
                    &[&version],
                )
                .ctx("deleting a firmware bundle")?;
            Ok(match row {
                Some(row) => {
                    let old: BundleMeta = json_of(col(&row, 0)?, "firmware bundle record")?;
                    DeleteBundle::Deleted { file: old.file }
                }
                None => DeleteBundle::Unknown,
            })
        })
    }

    fn ota_set_target(
        &self,
        store: Option<&str>,
        version: Option<&str>,
    ) -> Result<bool, StoreError> {
        let key = store.unwrap_or(FLEET);
        self.write(true, |txn| {
            txn.execute("SELECT pg_advisory_xact_lock($1)", &[&OTA_LOCK])
                .ctx("locking firmware targets")?;
            match version {
                Some(version) => {
                    if bundle_in(txn, version)?.is_none() {
                        return Ok(false);
                    }
                    txn.execute(
                        "INSERT INTO ota_targets (key, version) VALUES ($1, $2) \
                         ON CONFLICT (key) DO UPDATE SET version = EXCLUDED.version",
                        &[&key, &version],
                    )
                    .ctx("writing a firmware target")?;
                }
                None => {
                    txn.execute("DELETE FROM ota_targets WHERE key = $1", &[&key])
                        .ctx("clearing a firmware target")?;
                }
            }
            Ok(true)
        })
    }

    fn ota_targets(&self) -> Result<(Option<String>, BTreeMap<String, String>), StoreError> {
        self.direct(|txn| {
            let rows = txn
                .query("SELECT key, version FROM ota_targets", &[])
                .ctx("scanning firmware targets")?;
            let mut fleet = None;
            let mut stores = BTreeMap::new();
            for row in &rows {
                let key: String = col(row, 0)?;
                let version: String = col(row, 1)?;
                if key == FLEET {
                    fleet = Some(version);
                } else {
                    stores.insert(key, version);
                }
            }
            Ok((fleet, stores))
        })
    }

    fn ota_effective_target(&self, store: &str) -> Result<Option<EffectiveTarget>, StoreError> {
        self.read(|txn| {
            let rows = txn
                .query(
                    "SELECT key, version FROM ota_targets WHERE key = $1 OR key = $2",
                    &[&store, &FLEET],
                )
                .ctx("reading firmware targets")?;
            let mut own = None;
            let mut fleet = None;
            for row in &rows {
                let key: String = col(row, 0)?;
                let version: String = col(row, 1)?;
                if key == store {
                    own = Some(version);
                } else {
                    fleet = Some(version);
                }
            }
            let (version, from_store) = match (own, fleet) {
                (Some(v), _) => (v, true),
                (None, Some(v)) => (v, false),
                (None, None) => return Ok(None),
            };
            let Some(bundle) = bundle_in(txn, &version)? else {
                // Deleting a targeted bundle is refused, so this is damage, not a state.
                return Err(StoreError::Corrupt {
                    what: "firmware target (its bundle is missing)",
                });
            };
            Ok(Some(EffectiveTarget {
                version,
                from_store,
                bundle,
            }))
        })
    }

    fn ota_box(&self, store: &str) -> Result<BoxOta, StoreError> {
        self.direct(|txn| {
            let row = txn
                .query_opt("SELECT state FROM ota_boxes WHERE store = $1", &[&store])
                .ctx("reading a firmware state")?;
            match row {
                Some(row) => json_of(col(&row, 0)?, "firmware state"),
                None => Ok(BoxOta::default()),
            }
        })
    }

    fn update_box_ota(
        &self,
        store: &str,
        durable: bool,
        change: &mut dyn FnMut(&mut BoxOta),
    ) -> Result<(), StoreError> {
        let empty = value_of(&BoxOta::default(), "firmware state")?;
        self.write(durable, |txn| {
            txn.execute(
                "INSERT INTO ota_boxes (store, state) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&store, &empty],
            )
            .ctx("creating a firmware state")?;
            let row = txn
                .query_one(
                    "SELECT state FROM ota_boxes WHERE store = $1 FOR UPDATE",
                    &[&store],
                )
                .ctx("reading a firmware state")?;
            let mut state: BoxOta = json_of(col(&row, 0)?, "firmware state")?;
            change(&mut state);
            txn.execute(
                "UPDATE ota_boxes SET state = $2 WHERE store = $1",
                &[&store, &value_of(&state, "firmware state")?],
            )
            .ctx("writing a firmware state")?;
            Ok(())
        })
    }
}

fn activity_head(txn: &mut Db<'_, impl GenericClient>, store: &str) -> Result<u64, StoreError> {
    let row = txn
        .query_opt(
            "SELECT head FROM activity_heads WHERE store = $1",
            &[&store],
        )
        .ctx("reading the activity head")?;
    match row {
        Some(row) => Ok(seq(col(&row, 0)?)),
        None => Ok(0),
    }
}
