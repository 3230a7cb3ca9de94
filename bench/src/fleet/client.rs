//! The light box of the fleet bench: what one storebox does on its hub link, without the
//! storebox process. One TLS 1.3 connection with the store's client certificate, HTTP/2,
//! the real `storebox-protocol` messages, and the box's habits on it:
//!
//! - a change watch held open (`/sync/v2/watch`, 10 minutes), and a delta pull as soon as it
//!   reports a change;
//! - an idle delta pull every `poll_every` (the periodic pull: the box's safety net);
//! - activity pushed as sales happen (a Poisson stream of sales at the shop's rate, the
//!   sales that arrive while a push is in flight batched into the next one, as the box's
//!   push process does);
//! - one full sync by reconciliation at a planned moment of the measured window, then the
//!   acknowledgement a box sends after it.
//!
//! The box holds no records: it keeps, per module, the cursor and the digest the hub
//! reported. That is exactly what a healthy box sends, so the hub does the work it does for
//! a real fleet (a full sync that finds nothing to do answers `Unchanged`). The records are
//! the hub's concern here, not the box's.
//!
//! Everything a box records stays in its own [`BoxReport`] until the run ends: no lock or
//! shared counter on the hot path, so the generator stays cheap next to the hub it loads.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use serde_json::json;
use storebox_protocol as proto;
use storebox_sim::prng::SplitMix64;
use tokio::time::Instant;

/// How long a box waits for any answer but a held watch's.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a box asks the hub to hold its change watch, as the real box does.
const WATCH_WAIT: Duration = Duration::from_secs(600);
/// The zstd level of request bodies: the box's own.
const REQUEST_ZSTD_LEVEL: i32 = 3;
/// Most changes per module in one delta answer, as the box asks.
const DELTA_LIMIT: u32 = 5_000;

/// One HTTP/2 connection to a hub's sync listener.
#[derive(Clone)]
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    base: Arc<str>,
}

/// Opens a connection: TCP, TLS 1.3 (with the client certificate `tls` carries, if any),
/// HTTP/2. The hub's certificate names 127.0.0.1, which is what the server name checks.
pub async fn connect(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> anyhow::Result<Conn> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    // Small requests, latency measured: no Nagle delay (the box sets it too).
    tcp.set_nodelay(true).context("setting TCP_NODELAY")?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = connector
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS handshake with {addr}"))?;
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new());
    let (sender, connection) = builder
        .handshake(TokioIo::new(tls))
        .await
        .with_context(|| format!("HTTP/2 handshake with {addr}"))?;
    tokio::spawn(async move {
        // The connection ends when the run drops its senders or the hub goes: either way
        // the next request reports it, with its context.
        let _ = connection.await;
    });
    Ok(Conn {
        sender,
        base: format!("https://{addr}").into(),
    })
}

impl Conn {
    /// One POST and its whole answer; any status but 200 is an error carrying the answer.
    pub async fn post(
        &self,
        path: &str,
        content_type: &'static str,
        body: Bytes,
    ) -> anyhow::Result<Bytes> {
        let mut sender = self.sender.clone();
        sender
            .ready()
            .await
            .with_context(|| format!("POST {path}: the connection is gone"))?;
        let request = Request::post(format!("{}{path}", self.base))
            .header(header::CONTENT_TYPE, content_type)
            .header(proto::HEADER_PROTOCOL, proto::PROTOCOL_VERSION.to_string())
            .body(Full::new(body))
            .with_context(|| format!("building POST {path}"))?;
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .with_context(|| format!("reading the answer to POST {path}"))?
            .to_bytes();
        ensure!(
            status == StatusCode::OK,
            "POST {path}: HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        );
        Ok(body)
    }

    /// A sync call: the message encoded as the box encodes it.
    async fn sync<T: serde::Serialize>(&self, path: &str, message: &T) -> anyhow::Result<Bytes> {
        let body = proto::encode(message, REQUEST_ZSTD_LEVEL)
            .with_context(|| format!("encoding the request of {path}"))?;
        self.post(path, proto::CONTENT_TYPE, Bytes::from(body))
            .await
    }

    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// Enrolls a store's box as `storebox enroll` does: a P-256 key made here, a hub challenge
/// signed with it, the one-time token. Answers the TLS configuration of that box: the hub's
/// CA pinned, the issued certificate presented.
pub async fn enroll(
    conn: &Conn,
    store: &str,
    token: &str,
    roots: Arc<rustls::RootCertStore>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rcgen::SigningKey;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    let key = rcgen::KeyPair::generate().context("generating a device key")?;
    let public = hex(key.public_key_raw());
    let doc = conn
        .post("/pki/v1/challenge", "application/json", Bytes::from("{}"))
        .await?;
    let doc: serde_json::Value =
        serde_json::from_slice(&doc).context("the challenge answer is not JSON")?;
    let challenge = doc["challenge"]
        .as_str()
        .context("the challenge answer has no challenge")?;
    let message = storehub::pki::proof_message("enroll", store, challenge, &public);
    let signature = key
        .sign(message.as_bytes())
        .context("signing the challenge")?;
    let request = json!({
        "store": store,
        "token": token,
        "public_key": public,
        "challenge": challenge,
        "signature": hex(&signature),
    });
    let doc = conn
        .post(
            "/pki/v1/enroll",
            "application/json",
            Bytes::from(request.to_string()),
        )
        .await
        .with_context(|| format!("enrolling store {store}"))?;
    let doc: serde_json::Value =
        serde_json::from_slice(&doc).context("the enrollment answer is not JSON")?;
    let pem = doc["certificate"]
        .as_str()
        .context("the enrollment answer has no certificate")?;
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the issued certificate")?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut config = box_tls(roots)?
        .with_client_auth_cert(chain, key)
        .context("loading the issued certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The box's TLS: TLS 1.3 only, the hub's CA and nothing else.
fn box_tls(
    roots: Arc<rustls::RootCertStore>,
) -> anyhow::Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("choosing TLS 1.3")?
        .with_root_certificates(roots))
}

/// The TLS configuration of a client without a certificate: the enrollment calls.
pub fn anonymous_tls(
    roots: Arc<rustls::RootCertStore>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut config = box_tls(roots)?.with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

// ---------------------------------------------------------------------------------------------
// The fleet's shared plan, and one box's life

/// A product a till can sell: what a sale line names.
pub struct Product {
    pub id: String,
    pub ean13: String,
    pub price_cents: u64,
}

/// What every box of the run shares: read-only, set before the boxes start.
pub struct Fleet {
    /// The modules of every store, with the cursor and digest a box holds after the import.
    pub modules: Vec<(String, u64, proto::Digest)>,
    pub products: Vec<Product>,
    /// The catalog record whose chain-wide price change the boxes watch for.
    pub target_id: String,
    /// The instant every offset is counted from.
    pub epoch: Instant,
    /// The measured window: samples of calls sent inside it are kept.
    pub window: (Instant, Instant),
    pub poll_every: Duration,
    /// Mean time between two sales of one shop.
    pub sale_every: Duration,
    /// Bounds the TLS handshakes in progress, so the ramp does not starve the hub.
    pub handshakes: tokio::sync::Semaphore,
    /// Run tag in event ids: two runs never collide at the hub.
    pub run_id: String,
    /// Boxes connected so far, and boxes that have pulled the changed record: for the
    /// orchestrator's progress and its wait for the change to spread.
    pub connected: AtomicUsize,
    pub reached: AtomicUsize,
}

/// One box of the fleet.
pub struct BoxSpec {
    pub index: usize,
    pub store: String,
    pub addr: SocketAddr,
    pub tls: Arc<rustls::ClientConfig>,
    /// When it connects, from [`Fleet::epoch`].
    pub connect_at: Duration,
    /// When it runs its full sync, from [`Fleet::epoch`].
    pub full_at: Duration,
}

/// What one box saw. Latencies in microseconds.
#[derive(Default)]
pub struct BoxReport {
    pub connected: bool,
    pub connect_us: u32,
    /// The box's connection was still open at the end.
    pub alive_at_end: bool,
    pub errors: u32,
    pub first_error: Option<String>,
    /// Idle delta pulls (the periodic pull): request sent to answer decoded.
    pub polls: Vec<u32>,
    /// Delta pulls started by the change watch: request sent to answer decoded.
    pub change_pulls: Vec<u32>,
    /// Activity pushes: request sent to `ActivityAck` decoded.
    pub pushes: Vec<u32>,
    /// Full syncs by reconciliation (without the acknowledgement that follows).
    pub fulls: Vec<u32>,
    pub events: u64,
    pub full_done: bool,
    /// Modules a full sync answered with anything but `Unchanged` or the changes since the
    /// box's cursor: a box whose state is right should never see one.
    pub full_unexpected: u32,
    /// When the box had pulled the changed record, from [`Fleet::epoch`].
    pub reached_us: Option<u64>,
}

impl BoxReport {
    fn error(&mut self, e: &anyhow::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{e:#}"));
        }
    }

    fn merge(&mut self, other: BoxReport) {
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.polls.extend(other.polls);
        self.change_pulls.extend(other.change_pulls);
        self.pushes.extend(other.pushes);
        self.fulls.extend(other.fulls);
        self.events += other.events;
        self.full_done |= other.full_done;
        self.full_unexpected += other.full_unexpected;
    }
}

/// What the box holds: per module, the cursor and the digest it last got from the hub.
struct Held {
    modules: Vec<(String, u64, proto::Digest)>,
    reached_us: Option<u64>,
}

impl Held {
    fn cursors(&self) -> Vec<proto::ModuleCursor> {
        self.modules
            .iter()
            .map(|(module, cursor, _)| proto::ModuleCursor {
                module: module.clone(),
                cursor: *cursor,
            })
            .collect()
    }

    /// Moves a module forward; never back, since two pulls may overlap.
    fn advance(&mut self, module: &str, cursor: u64, digest: Option<proto::Digest>) {
        if let Some(entry) = self.modules.iter_mut().find(|(m, _, _)| m == module) {
            if cursor >= entry.1 {
                entry.1 = cursor;
                if let Some(d) = digest {
                    entry.2 = d;
                }
            }
        } else {
            self.modules
                .push((module.to_owned(), cursor, digest.unwrap_or_default()));
        }
    }
}

fn lock(held: &Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    held.lock().unwrap_or_else(PoisonError::into_inner)
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn in_window(fleet: &Fleet, sent: Instant) -> bool {
    sent >= fleet.window.0 && sent < fleet.window.1
}

/// One box's whole run: connect at its slot, then watch, poll, push and full-sync until
/// `stop` turns true.
pub async fn run_box(
    spec: BoxSpec,
    fleet: Arc<Fleet>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> BoxReport {
    let mut report = BoxReport::default();
    tokio::time::sleep_until(fleet.epoch + spec.connect_at).await;
    let conn = {
        // The semaphore is never closed, so this only waits.
        let _permit = fleet.handshakes.acquire().await;
        let started = Instant::now();
        match tokio::time::timeout(CALL_TIMEOUT, connect(spec.addr, spec.tls.clone())).await {
            Ok(Ok(conn)) => {
                report.connect_us = micros(started.elapsed());
                conn
            }
            Ok(Err(e)) => {
                report.error(&e.context(format!("box {}", spec.store)));
                return report;
            }
            Err(_) => {
                report.error(&anyhow::anyhow!(
                    "box {}: no connection within {CALL_TIMEOUT:?}",
                    spec.store
                ));
                return report;
            }
        }
    };
    report.connected = true;
    fleet.connected.fetch_add(1, Ordering::Relaxed);
    let held = Mutex::new(Held {
        modules: fleet.modules.clone(),
        reached_us: None,
    });
    // The box's first pull after connecting: it checks that the hub knows the box's state.
    if let Err(e) = pull(&conn, &fleet, &held).await {
        report.error(&e);
    }
    let (watched, polled, pushed) = tokio::join!(
        watch_loop(&conn, &fleet, &held, stop.clone()),
        poll_loop(&conn, &fleet, &spec, &held, stop.clone()),
        push_loop(&conn, &fleet, &spec, stop),
    );
    report.merge(watched);
    report.merge(polled);
    report.merge(pushed);
    report.reached_us = lock(&held).reached_us;
    report.alive_at_end = !conn.is_closed();
    report
}

/// Waits until `at` or until the run stops; false when it stopped.
async fn wait_until(at: Instant, stop: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep_until(at) => !*stop.borrow(),
        _ = stop.changed() => false,
    }
}

/// Notes the moment the changed record first reaches the box.
fn note_reached(fleet: &Fleet, held: &mut Held, changes: &[proto::Change]) {
    if held.reached_us.is_none() && changes.iter().any(|c| c.id == fleet.target_id) {
        held.reached_us = Some(fleet.epoch.elapsed().as_micros() as u64);
        fleet.reached.fetch_add(1, Ordering::Relaxed);
    }
}

/// The round trips of one box on an idle hub, one call at a time: `n` idle delta pulls, then
/// `n` pushes of one sale each. The run's baseline.
pub async fn idle_round_trips(
    conn: &Conn,
    fleet: &Fleet,
    n: usize,
) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
    let held = Mutex::new(Held {
        modules: fleet.modules.clone(),
        reached_us: None,
    });
    let mut polls = Vec::with_capacity(n);
    for _ in 0..n {
        let sent = Instant::now();
        pull(conn, fleet, &held).await.context("a baseline poll")?;
        polls.push(micros(sent.elapsed()));
    }
    let mut rng = SplitMix64::derive(0, "fleet-baseline", 0);
    let mut pushes = Vec::with_capacity(n);
    for sequence in 0..n as u64 {
        let event = sale(
            &fleet.products,
            &format!("{}-baseline", fleet.run_id),
            &mut rng,
            sequence,
        );
        let batch = proto::ActivityBatch {
            events: vec![event],
        };
        let sent = Instant::now();
        let body = conn.sync(proto::PATH_ACTIVITY, &batch).await?;
        let ack: proto::ActivityAck =
            proto::decode(&body, "an activity ack").context("decoding a baseline ack")?;
        ensure!(
            ack.accepted == 1,
            "a baseline push was not accepted: {ack:?}"
        );
        pushes.push(micros(sent.elapsed()));
    }
    Ok((polls, pushes))
}

/// A cold full sync, as a new box's first: every module as a whole record set. Answers, per
/// module, the cursor and digest the hub gave with it: what a box holds after it. A module
/// the box shares with its group has a cursor only the hub can tell (the group's sequence
/// number in its high 32 bits, the store's in its low 32), so the bench takes it from here.
pub async fn cold_full_sync(conn: &Conn) -> anyhow::Result<Vec<(String, u64, proto::Digest)>> {
    let answer = send_full(conn, Vec::new()).await?;
    let mut modules = Vec::new();
    for frame in answer.frames {
        let snapshot: proto::ModuleSnapshot =
            proto::decode_payload(&frame.payload, "a module snapshot")
                .with_context(|| format!("decoding the snapshot of {}", frame.module))?;
        match snapshot {
            proto::ModuleSnapshot::Records { cursor, digest, .. } => {
                modules.push((frame.module, cursor, digest));
            }
            proto::ModuleSnapshot::Failed { error } => {
                bail!("the cold full sync failed module {}: {error}", frame.module)
            }
            _ => bail!(
                "the cold full sync of {} was not answered with its records",
                frame.module
            ),
        }
    }
    ensure!(!modules.is_empty(), "the cold full sync answered no module");
    Ok(modules)
}

/// One delta pull (asking again while the hub says `more`). Notes when the changed record
/// arrives.
async fn pull(conn: &Conn, fleet: &Fleet, held: &Mutex<Held>) -> anyhow::Result<()> {
    loop {
        let request = proto::DeltaRequest {
            cursors: lock(held).cursors(),
            skip: Vec::new(),
            limit: DELTA_LIMIT,
        };
        let body = tokio::time::timeout(CALL_TIMEOUT, conn.sync(proto::PATH_DELTA, &request))
            .await
            .context("the delta pull timed out")??;
        let answer: proto::ModulesAnswer =
            proto::decode_plain(&body, "a delta answer").context("decoding a delta answer")?;
        let mut more = false;
        for frame in answer.frames {
            let delta: proto::ModuleDelta = proto::decode_payload(&frame.payload, "a module delta")
                .with_context(|| format!("decoding the delta of {}", frame.module))?;
            match delta {
                proto::ModuleDelta::Changes {
                    changes,
                    cursor,
                    more: m,
                    digest,
                } => {
                    let mut held = lock(held);
                    note_reached(fleet, &mut held, &changes);
                    held.advance(&frame.module, cursor, digest);
                    more |= m;
                }
                proto::ModuleDelta::ResetNeeded => {
                    bail!("the hub wants a full sync of {}", frame.module)
                }
                proto::ModuleDelta::Failed { error } => {
                    bail!("the hub failed module {}: {error}", frame.module)
                }
            }
        }
        if !more {
            return Ok(());
        }
    }
}

/// The change watch, and the delta pull it starts.
async fn watch_loop(
    conn: &Conn,
    fleet: &Fleet,
    held: &Mutex<Held>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> BoxReport {
    let mut report = BoxReport::default();
    while !*stop.borrow() && !conn.is_closed() {
        let request = proto::WatchRequest {
            cursors: lock(held).cursors(),
            wait_ms: WATCH_WAIT.as_millis() as u64,
        };
        let answer = tokio::select! {
            answer = conn.sync(proto::PATH_WATCH, &request) => answer,
            _ = stop.changed() => break,
        };
        let changed = answer.and_then(|body| {
            proto::decode::<proto::WatchAnswer>(&body, "a watch answer")
                .context("decoding a watch answer")
        });
        match changed {
            Ok(answer) if answer.changed.is_empty() => {}
            Ok(_) => {
                let sent = Instant::now();
                match pull(conn, fleet, held).await {
                    Ok(()) if in_window(fleet, sent) => {
                        report.change_pulls.push(micros(sent.elapsed()))
                    }
                    Ok(()) => {}
                    Err(e) => report.error(&e),
                }
            }
            Err(e) => {
                report.error(&e);
                // A hub that answers at once with an error must not be hammered.
                if !wait_until(Instant::now() + Duration::from_secs(1), &mut stop).await {
                    break;
                }
            }
        }
    }
    report
}

/// The periodic delta pull and the day's full sync.
async fn poll_loop(
    conn: &Conn,
    fleet: &Fleet,
    spec: &BoxSpec,
    held: &Mutex<Held>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> BoxReport {
    let mut report = BoxReport::default();
    let mut rng = SplitMix64::derive(spec.index as u64, "fleet-poll", 0);
    let phase = fleet.poll_every.mul_f64(rng.below(1_000_000) as f64 / 1e6);
    let mut next_poll = Instant::now() + phase;
    let full_at = fleet.epoch + spec.full_at;
    loop {
        let full_due = !report.full_done && full_at <= next_poll;
        let at = if full_due { full_at } else { next_poll };
        if !wait_until(at, &mut stop).await || conn.is_closed() {
            break;
        }
        let sent = Instant::now();
        if full_due {
            report.full_done = true;
            let acknowledged = match full_sync(conn, fleet, held, &mut report).await {
                Ok(acknowledged) => {
                    report.fulls.push(micros(sent.elapsed()));
                    acknowledged
                }
                Err(e) => {
                    report.error(&e);
                    false
                }
            };
            // The acknowledgement a box sends after a full sync that changed something,
            // outside the timing; an unchanged one was acknowledged by the hub in its answer.
            if !acknowledged {
                let ack = proto::Ack {
                    cursors: lock(held).cursors(),
                    pending_activity: 0,
                    box_version: "fleet-bench".into(),
                    errors: Vec::new(),
                };
                if let Err(e) = tokio::time::timeout(CALL_TIMEOUT, conn.sync(proto::PATH_ACK, &ack))
                    .await
                    .context("the acknowledgement timed out")
                    .and_then(|r| r)
                {
                    report.error(&e);
                }
            }
        } else {
            next_poll += fleet.poll_every;
            match pull(conn, fleet, held).await {
                Ok(()) if in_window(fleet, sent) => report.polls.push(micros(sent.elapsed())),
                Ok(()) => {}
                Err(e) => report.error(&e),
            }
        }
    }
    report
}

/// A full sync by reconciliation of a box that holds every module right; whether the hub
/// recorded it as the box's acknowledgement.
async fn full_sync(
    conn: &Conn,
    fleet: &Fleet,
    held: &Mutex<Held>,
    report: &mut BoxReport,
) -> anyhow::Result<bool> {
    let digests = lock(held)
        .modules
        .iter()
        .map(|(module, cursor, digest)| proto::ModuleDigest {
            module: module.clone(),
            cursor: *cursor,
            digest: *digest,
        })
        .collect();
    let answer = send_full(conn, digests).await?;
    for frame in answer.frames {
        let snapshot: proto::ModuleSnapshot =
            proto::decode_payload(&frame.payload, "a module snapshot")
                .with_context(|| format!("decoding the snapshot of {}", frame.module))?;
        let mut held = lock(held);
        let held_count = held
            .modules
            .iter()
            .find(|(m, _, _)| *m == frame.module)
            .map_or(0, |(_, _, d)| d.count);
        match snapshot {
            proto::ModuleSnapshot::Unchanged { .. } => {}
            proto::ModuleSnapshot::Changes {
                changes,
                cursor,
                digest,
            } => {
                note_reached(fleet, &mut held, &changes);
                held.advance(&frame.module, cursor, Some(digest));
            }
            // An empty module is not "held" (the hub needs a count above zero), so it comes
            // back as an empty table: that is the box's normal answer, not a cold sync.
            proto::ModuleSnapshot::Records { cursor, digest, .. } => {
                if held_count > 0 {
                    report.full_unexpected += 1;
                }
                held.advance(&frame.module, cursor, Some(digest));
            }
            proto::ModuleSnapshot::Buckets { .. } => report.full_unexpected += 1,
            proto::ModuleSnapshot::Failed { error } => {
                bail!("the full sync failed module {}: {error}", frame.module)
            }
        }
    }
    Ok(answer.acknowledged)
}

/// One full sync request, with what the box holds (nothing for a cold one), and its answer.
async fn send_full(
    conn: &Conn,
    digests: Vec<proto::ModuleDigest>,
) -> anyhow::Result<proto::FullAnswer> {
    let request = proto::FullRequest {
        modules: Vec::new(),
        digests,
        records: Vec::new(),
        status: proto::BoxStatus {
            pending_activity: 0,
            box_version: "fleet-bench".into(),
            errors: Vec::new(),
        },
    };
    let body = tokio::time::timeout(CALL_TIMEOUT, conn.sync(proto::PATH_FULL, &request))
        .await
        .context("the full sync timed out")??;
    proto::decode_plain(&body, "a full sync answer").context("decoding a full answer")
}

/// The shop's sales, pushed as they happen.
async fn push_loop(
    conn: &Conn,
    fleet: &Fleet,
    spec: &BoxSpec,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> BoxReport {
    let mut report = BoxReport::default();
    let mut rng = SplitMix64::derive(spec.index as u64, "fleet-sales", 0);
    let mut next_sale = Instant::now() + exponential(&mut rng, fleet.sale_every);
    let mut sequence = 0u64;
    loop {
        if !wait_until(next_sale, &mut stop).await || conn.is_closed() {
            break;
        }
        // Every sale due by now goes in this push: those that came during the last one wait
        // for it, as on the box.
        let now = Instant::now();
        let mut events = Vec::new();
        while next_sale <= now {
            sequence += 1;
            events.push(sale(&fleet.products, &fleet.run_id, &mut rng, sequence));
            next_sale += exponential(&mut rng, fleet.sale_every);
        }
        let count = events.len() as u32;
        let batch = proto::ActivityBatch { events };
        let sent = Instant::now();
        let acked = tokio::time::timeout(CALL_TIMEOUT, conn.sync(proto::PATH_ACTIVITY, &batch))
            .await
            .context("the activity push timed out")
            .and_then(|r| r)
            .and_then(|body| {
                proto::decode::<proto::ActivityAck>(&body, "an activity ack")
                    .context("decoding an activity ack")
            });
        match acked {
            Ok(ack) if ack.accepted + ack.duplicates == count => {
                if in_window(fleet, sent) {
                    report.pushes.push(micros(sent.elapsed()));
                }
                report.events += u64::from(count);
            }
            Ok(ack) => report.error(&anyhow::anyhow!(
                "pushed {count} events, the hub acknowledged {ack:?}"
            )),
            Err(e) => report.error(&e),
        }
    }
    report
}

/// A wait drawn from the exponential distribution of mean `mean`: sales as a Poisson stream.
fn exponential(rng: &mut SplitMix64, mean: Duration) -> Duration {
    // In (0, 1]: the logarithm stays finite.
    let u = (rng.below(1 << 53) + 1) as f64 / (1u64 << 53) as f64;
    mean.mul_f64(-u.ln())
}

/// A sale as a till posts it (the shape of `storesim`'s tills): 1 to 6 lines of catalog
/// products, a loyalty card on a third of them, the payment mix of a French supermarket.
fn sale(
    products: &[Product],
    run_id: &str,
    rng: &mut SplitMix64,
    sequence: u64,
) -> proto::PushedEvent {
    let till = rng.range(1, 4);
    let mut total = 0;
    let lines: Vec<serde_json::Value> = (0..rng.range(1, 6))
        .map(|_| {
            let p = &products[rng.index(products.len())];
            let qty = match rng.below(100) {
                0..=79 => 1,
                80..=94 => 2,
                _ => 3,
            };
            total += p.price_cents * qty;
            json!({"product": p.id, "ean13": p.ean13, "qty": qty, "price_cents": p.price_cents})
        })
        .collect();
    let customer = if rng.percent(30) {
        json!(format!("C{:06}", rng.range(1, 5_000)))
    } else {
        serde_json::Value::Null
    };
    let payment = match rng.below(100) {
        0..=44 => "card",
        45..=69 => "contactless",
        70..=89 => "cash",
        90..=94 => "meal-voucher",
        95..=98 => "mobile",
        _ => "cheque",
    };
    let now = chrono::Utc::now();
    let id = format!("T{till}-{run_id}-{sequence:06}");
    let event = json!({
        "id": id,
        "type": "sale",
        "till": format!("T{till}"),
        "at": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "lines": lines,
        "total_cents": total,
        "customer": customer,
        "payment": payment,
    });
    proto::PushedEvent {
        id,
        received_at_ms: now.timestamp_millis(),
        event: event.to_string(),
    }
}
