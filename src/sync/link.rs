//! The box's HTTPS link to the hub: one HTTP/2 connection shared by the three sync processes
//! and the change watch, opened on demand, reused while it lives, resumed (TLS 1.3 tickets)
//! when it has to be opened again, and counted byte for byte at the socket.
//!
//! Only the CA named in the box config is trusted (the hub's certificate is pinned to it);
//! the box authenticates with its client certificate (identity.rs).
//!
//! Accounting: the socket counters are the truth (TLS records, HTTP/2 framing, handshakes).
//! Each request also adds its body bytes to its process, and the sync engine adds each
//! module's payload bytes to the module; what the socket saw beyond the bodies is the link's
//! overhead, shown apart. Requests share one connection, so the overhead cannot be split
//! honestly between processes.
//!
//! Shaping: optional upload and download caps, token buckets over the body streams, served
//! in priority order: activity push first, then delta pull, then full sync.
//!
//! Link sharing (on by default, [`super::sharing`]): the socket itself is sized and paced so
//! the shop's line never queues more than a few milliseconds of the box's traffic. Before
//! connecting, the box asks for a receive buffer that fixes a fine window scale; then the
//! receive window is clamped to what the controller allows, and every write to the socket
//! is one segment, spaced by the controller's upload rate. [`Counted`] does both: it sees
//! every byte of the connection, reads `TCP_INFO` every few milliseconds while bytes move,
//! and feeds the controller. The caps above stay as ceilings.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use super::sharing::{self, Meter, Pacer, SharingParams};

use storebox_protocol as proto;

/// Why a hub call failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot reach the hub at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with the hub failed: {0}")]
    Tls(#[source] std::io::Error),
    // hyper's own message is only "http2 error": the causes say which (a GOAWAY, a reset).
    #[error("HTTP/2 with the hub failed: {}", storebox_http::with_causes(.0))]
    Http(#[from] hyper::Error),
    #[error("the hub did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the hub answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("could not build the request: {0}")]
    Request(#[from] http::Error),
    #[error("the hub's answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("writing the download: {0}")]
    Io(#[source] std::io::Error),
}

/// Bytes that crossed the socket, TLS records and HTTP/2 framing included.
#[derive(Debug, Default)]
pub struct ByteCounters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// Who is calling the hub: names the process in the accounting and sets its priority under
/// shaping (lower first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Process {
    Push = 0,
    Watch = 1,
    Delta = 2,
    Full = 3,
    /// Firmware update checks, reports and bundle downloads: last in line.
    Ota = 4,
}

impl Process {
    pub const ALL: [Process; 5] = [
        Process::Push,
        Process::Watch,
        Process::Delta,
        Process::Full,
        Process::Ota,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Process::Push => "push",
            Process::Watch => "watch",
            Process::Delta => "delta",
            Process::Full => "full",
            Process::Ota => "ota",
        }
    }
}

/// One process's share of the link.
#[derive(Debug, Default)]
pub struct ProcessBytes {
    /// Request body bytes sent.
    pub sent: AtomicU64,
    /// Answer body bytes received.
    pub received: AtomicU64,
    pub requests: AtomicU64,
}

/// Everything the link counts, for status and metrics.
#[derive(Debug, Default)]
pub struct WireStats {
    /// At the socket, every connection ever opened.
    pub socket: ByteCounters,
    pub connections: AtomicU64,
    /// Connections whose TLS handshake resumed an earlier session.
    pub resumed: AtomicU64,
    pub processes: [ProcessBytes; 5],
    /// Payload bytes received per module.
    pub modules: std::sync::Mutex<BTreeMap<String, u64>>,
    /// The link-sharing controller of the current connection, when it is on.
    pub sharing: std::sync::Mutex<Option<sharing::Snapshot>>,
}

impl WireStats {
    pub fn process(&self, p: Process) -> &ProcessBytes {
        &self.processes[p as usize]
    }

    /// Adds a module's payload bytes.
    pub fn add_module(&self, module: &str, bytes: u64) {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        *modules.entry(module.to_owned()).or_default() += bytes;
    }

    pub fn modules(&self) -> BTreeMap<String, u64> {
        self.modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A token bucket in bytes per second, shared by the processes, that serves waiting
/// processes in priority order.
pub struct Shaper {
    rate: f64,
    burst: f64,
    state: std::sync::Mutex<(f64, tokio::time::Instant)>,
    waiting: [AtomicU32; 5],
}

impl Shaper {
    pub fn new(bytes_per_second: u64) -> Arc<Shaper> {
        let rate = bytes_per_second.max(1) as f64;
        Arc::new(Shaper {
            rate,
            // A quarter second of burst: enough to keep the pipe full, too little to swamp
            // the shop's line.
            burst: (rate / 4.0).max(CHUNK as f64),
            state: std::sync::Mutex::new((0.0, tokio::time::Instant::now())),
            waiting: Default::default(),
        })
    }

    /// Waits until `n` bytes may pass for `process`.
    pub async fn take(&self, n: usize, process: Process) {
        let p = process as usize;
        self.waiting[p].fetch_add(1, Ordering::SeqCst);
        let _done = Decrement(&self.waiting[p]);
        loop {
            let wait = {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let now = tokio::time::Instant::now();
                let (tokens, last) = &mut *state;
                *tokens =
                    (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
                *last = now;
                let ahead = self.waiting[..p]
                    .iter()
                    .any(|w| w.load(Ordering::SeqCst) > 0);
                if !ahead && *tokens >= 0.0 {
                    // Going into debt lets a chunk larger than the bucket through; the next
                    // taker waits for it to be paid back.
                    *tokens -= n as f64;
                    return;
                }
                if ahead {
                    Duration::from_millis(5)
                } else {
                    Duration::from_secs_f64((-*tokens / self.rate).max(0.001))
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

struct Decrement<'a>(&'a AtomicU32);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Bytes per body chunk under shaping: one HTTP/2 frame of the default size.
const CHUNK: usize = 16 * 1024;

/// Largest answer the box reads from the hub.
const MAX_ANSWER_BYTES: usize = storebox_protocol::MAX_DECODED_BYTES;

/// Link settings from the box config.
#[derive(Debug, Clone, Default)]
pub struct LinkSettings {
    /// Upload cap in bytes per second.
    pub upload_rate: Option<u64>,
    /// Download cap in bytes per second.
    pub download_rate: Option<u64>,
    /// The link-sharing controller's settings; None: off (`[hub] link_sharing = "off"`).
    pub sharing: Option<SharingParams>,
}

/// Where and how to reach the hub; shared by the links of all processes.
pub struct HubTarget {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    authorization: String,
    timeout: Duration,
}

impl HubTarget {
    /// Builds the target from the hub URL, the pinned CA file and the store credential.
    pub fn new(
        url: &str,
        ca_file: &std::path::Path,
        credential: &str,
        timeout: Duration,
    ) -> anyhow::Result<HubTarget> {
        let (host, port, server_name) = hub_address(url)?;
        // The hub's CA pinned, dates by the clock rule, the box's current client certificate
        // presented (swapped in place on renewal): see identity.rs.
        let mut tls = crate::identity::hub_client_config(ca_file)?;
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Ok(HubTarget {
            host,
            port,
            server_name,
            tls: Arc::new(tls),
            authorization: format!("Bearer {credential}"),
            timeout,
        })
    }
}

/// Host, port and TLS server name of the `[hub] url`, which must be `https://host[:port]`.
/// Shared by the sync link and the enrollment client, so both read the URL alike.
pub fn hub_address(url: &str) -> anyhow::Result<(String, u16, ServerName<'static>)> {
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("[hub] url {url:?} is not a URL"))?;
    anyhow::ensure!(
        uri.scheme_str() == Some("https"),
        "[hub] url {url:?} must use https"
    );
    let host = uri
        .host()
        .with_context(|| format!("[hub] url {url:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let server_name = ServerName::try_from(host.clone())
        .with_context(|| format!("[hub] url host {host:?} is not a valid name"))?;
    Ok((host, port, server_name))
}

/// The box's connection to the hub, shared by every process.
pub struct HubLink {
    target: Arc<HubTarget>,
    connection: Mutex<Option<SendRequest<ShapedBody>>>,
    pub wire: Arc<WireStats>,
    upload: Option<Arc<Shaper>>,
    download: Option<Arc<Shaper>>,
    /// The link-sharing controller's settings and what it learned of the line, kept from
    /// one connection to the next.
    sharing: Option<Arc<SharingShared>>,
    /// Consecutive failed connection attempts, and when the next one may start.
    reconnect: std::sync::Mutex<(u32, Option<tokio::time::Instant>)>,
}

/// Longest wait between two connection attempts.
const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(60);

impl HubLink {
    pub fn new(target: Arc<HubTarget>, settings: &LinkSettings) -> HubLink {
        HubLink {
            target,
            connection: Mutex::new(None),
            wire: Arc::new(WireStats::default()),
            upload: settings.upload_rate.map(Shaper::new),
            download: settings.download_rate.map(Shaper::new),
            sharing: settings.sharing.clone().map(|mut params| {
                params.upload_cap = settings.upload_rate;
                params.download_cap = settings.download_rate;
                Arc::new(SharingShared {
                    params,
                    memory: std::sync::Mutex::new(None),
                })
            }),
            reconnect: std::sync::Mutex::new((0, None)),
        }
    }

    /// The configured time limit of one call.
    pub fn timeout(&self) -> Duration {
        self.target.timeout
    }

    /// POSTs an encoded message to `path` for `process` and returns the answer's body, within
    /// the configured time limit.
    pub async fn post(
        &self,
        process: Process,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Bytes, LinkError> {
        self.post_within(process, path, body, self.target.timeout, None)
            .await
    }

    /// As [`HubLink::post`], with its own time limit (a change watch waits for minutes), and
    /// a flag raised while the hub holds the request (sent, no answer yet). A failed call
    /// drops the connection so the next one starts afresh.
    pub async fn post_within(
        &self,
        process: Process,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
        held: Option<&std::sync::atomic::AtomicBool>,
    ) -> Result<Bytes, LinkError> {
        let body = Bytes::from(body);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut result =
            tokio::time::timeout_at(deadline, self.post_inner(process, path, body.clone(), held))
                .await;
        // A request sent in the instant the hub closes the connection (it does so gracefully
        // every few hours, and a line cut looks the same) never reached the hub: send it
        // again at once on a new connection. Every sync call is safe to repeat: reads, and
        // pushes the hub deduplicates by event id.
        if let Ok(Err(LinkError::Http(e))) = &result {
            if never_reached_the_hub(e) {
                tracing::debug!("the hub connection closed under a request; sending it again");
                *self.connection.lock().await = None;
                result =
                    tokio::time::timeout_at(deadline, self.post_inner(process, path, body, held))
                        .await;
            }
        }
        if let Some(flag) = held {
            flag.store(false, Ordering::Relaxed);
        }
        match result {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(e)) => {
                if !matches!(e, LinkError::Status { .. } | LinkError::TooLarge(_)) {
                    *self.connection.lock().await = None;
                }
                Err(e)
            }
            Err(_) => {
                *self.connection.lock().await = None;
                Err(LinkError::Timeout(timeout))
            }
        }
    }

    async fn post_inner(
        &self,
        process: Process,
        path: &str,
        body: Bytes,
        held: Option<&std::sync::atomic::AtomicBool>,
    ) -> Result<Bytes, LinkError> {
        let mut sender = {
            let mut slot = self.connection.lock().await;
            match slot.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let s = self.connect_with_backoff().await?;
                    *slot = Some(s.clone());
                    s
                }
            }
        };
        sender.ready().await?;
        let stats = self.wire.process(process);
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats.sent.fetch_add(body.len() as u64, Ordering::Relaxed);
        let request = Request::post(format!(
            "https://{}:{}{path}",
            self.target.host, self.target.port
        ))
        .header(header::AUTHORIZATION, &self.target.authorization)
        .header(header::CONTENT_TYPE, proto::CONTENT_TYPE)
        .header(proto::HEADER_PROTOCOL, proto::PROTOCOL_VERSION.to_string())
        .body(ShapedBody::new(body, self.upload.clone(), process))?;
        let response = sender.send_request(request);
        if let Some(flag) = held {
            flag.store(true, Ordering::Relaxed);
        }
        let response = response.await?;
        let status = response.status();
        let mut incoming = response.into_body();
        let mut body = Vec::new();
        while let Some(frame) = incoming.frame().await {
            let frame = frame?;
            if let Some(data) = frame.data_ref() {
                stats
                    .received
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if body.len() + data.len() > MAX_ANSWER_BYTES {
                    return Err(LinkError::TooLarge(MAX_ANSWER_BYTES));
                }
                body.extend_from_slice(data);
                // Not reading holds back HTTP/2 window updates, so the hub waits too.
                if let Some(shaper) = &self.download {
                    shaper.take(data.len(), process).await;
                }
            }
        }
        let body = Bytes::from(body);
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
            return Err(LinkError::Status { status, message });
        }
        Ok(body)
    }

    /// GETs a file from the hub into `file`, from byte `offset` on (`Range: bytes=N-`), for
    /// the firmware update process: last in line under the link's caps, and paced by `pace`
    /// too when the link has no download cap of its own. No overall time limit (a bundle may
    /// take an hour on a shop's line); a minute without a byte ends the call, and the caller
    /// resumes from what was written.
    pub async fn download(
        &self,
        path: &str,
        offset: u64,
        file: &mut tokio::fs::File,
        pace: Option<&Shaper>,
    ) -> Result<(), LinkError> {
        use tokio::io::{AsyncSeekExt, AsyncWriteExt};
        const IDLE: Duration = Duration::from_secs(60);
        let process = Process::Ota;
        let mut sender = {
            let mut slot = self.connection.lock().await;
            match slot.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let s = self.connect_with_backoff().await?;
                    *slot = Some(s.clone());
                    s
                }
            }
        };
        tokio::time::timeout(IDLE, sender.ready())
            .await
            .map_err(|_| LinkError::Timeout(IDLE))??;
        let stats = self.wire.process(process);
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let mut request = Request::get(format!(
            "https://{}:{}{path}",
            self.target.host, self.target.port
        ))
        .header(header::AUTHORIZATION, &self.target.authorization)
        .header(proto::HEADER_PROTOCOL, proto::PROTOCOL_VERSION.to_string());
        if offset > 0 {
            request = request.header(header::RANGE, format!("bytes={offset}-"));
        }
        let request = request.body(ShapedBody::new(Bytes::new(), self.upload.clone(), process))?;
        let response = tokio::time::timeout(IDLE, sender.send_request(request))
            .await
            .map_err(|_| LinkError::Timeout(IDLE))??;
        let status = response.status();
        match status {
            http::StatusCode::PARTIAL_CONTENT if offset > 0 => {
                file.seek(std::io::SeekFrom::Start(offset))
                    .await
                    .map_err(LinkError::Io)?;
            }
            http::StatusCode::OK => {
                // The hub sends the whole file: start the file again.
                file.set_len(0).await.map_err(LinkError::Io)?;
                file.seek(std::io::SeekFrom::Start(0))
                    .await
                    .map_err(LinkError::Io)?;
            }
            _ => {
                let body = response.into_body().collect().await.map(|b| b.to_bytes());
                let message = body
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
                    .unwrap_or_default();
                return Err(LinkError::Status { status, message });
            }
        }
        let mut incoming = response.into_body();
        loop {
            let frame = match tokio::time::timeout(IDLE, incoming.frame()).await {
                Err(_) => return Err(LinkError::Timeout(IDLE)),
                Ok(None) => break,
                Ok(Some(frame)) => frame?,
            };
            if let Some(data) = frame.data_ref() {
                stats
                    .received
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                file.write_all(data).await.map_err(LinkError::Io)?;
                match (&self.download, pace) {
                    (Some(shaper), _) => shaper.take(data.len(), process).await,
                    (None, Some(shaper)) => shaper.take(data.len(), process).await,
                    (None, None) => {}
                }
            }
        }
        file.flush().await.map_err(LinkError::Io)?;
        file.sync_data().await.map_err(LinkError::Io)?;
        Ok(())
    }

    /// Opens a connection, first waiting out the pause after earlier failures: a hub that is
    /// down is not hammered by a box retrying at once, and a thousand boxes cut off at the
    /// same moment do not all come back in the same second.
    async fn connect_with_backoff(&self) -> Result<SendRequest<ShapedBody>, LinkError> {
        let not_before = self.reconnect.lock().unwrap_or_else(|e| e.into_inner()).1;
        if let Some(at) = not_before {
            tokio::time::sleep_until(at).await;
        }
        match self.connect().await {
            Ok(sender) => {
                *self.reconnect.lock().unwrap_or_else(|e| e.into_inner()) = (0, None);
                Ok(sender)
            }
            Err(e) => {
                let mut reconnect = self.reconnect.lock().unwrap_or_else(|e| e.into_inner());
                let wait =
                    super::plan::backoff(reconnect.0, MAX_RECONNECT_WAIT, super::plan::jitter());
                reconnect.0 = reconnect.0.saturating_add(1);
                reconnect.1 = Some(tokio::time::Instant::now() + wait);
                Err(e)
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<ShapedBody>, LinkError> {
        let addr = format!("{}:{}", self.target.host, self.target.port);
        let connect_error = |source| LinkError::Connect {
            addr: addr.clone(),
            source,
        };
        let tcp = match &self.sharing {
            None => TcpStream::connect(&addr).await.map_err(connect_error)?,
            Some(shared) => connect_sized(
                &addr,
                sharing::first_window(&shared.memory(), &shared.params),
            )
            .await
            .map_err(connect_error)?,
        };
        let _ = tcp.set_nodelay(true);
        let sharing = match &self.sharing {
            Some(shared) => match ConnSharing::start(&tcp, shared.clone(), self.wire.clone()) {
                Ok(s) => Some(Box::new(s)),
                Err(e) => {
                    // A kernel without TCP_INFO: the link works as without link sharing.
                    tracing::warn!("link sharing is off for this connection: {e}");
                    None
                }
            },
            None => None,
        };
        let counted = Counted {
            inner: tcp,
            bytes: self.wire.clone(),
            sharing,
        };
        let connector = tokio_rustls::TlsConnector::from(self.target.tls.clone());
        let tls = connector
            .connect(self.target.server_name.clone(), counted)
            .await
            .map_err(LinkError::Tls)?;
        self.wire.connections.fetch_add(1, Ordering::Relaxed);
        if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            self.wire.resumed.fetch_add(1, Ordering::Relaxed);
        }
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        // Pings find a dead connection under a held change watch; they are rare because
        // each costs the shop's line about 80 bytes.
        builder
            .keep_alive_interval(Some(Duration::from_secs(240)))
            .keep_alive_timeout(Duration::from_secs(20));
        if self.download.is_some() {
            // A small window makes the hub wait for the box's reads, which the download cap
            // paces: without it the hub would push megabytes ahead of the cap.
            builder
                .initial_stream_window_size(64 * 1024)
                .initial_connection_window_size(128 * 1024);
        } else if self.sharing.is_some() {
            // The TCP window paces the hub; these only bound what the hub may queue in its
            // own socket ahead of a small answer (a push's), kept over the largest TCP window.
            builder
                .initial_stream_window_size(2 * sharing::MAX_WINDOW)
                .initial_connection_window_size(4 * sharing::MAX_WINDOW);
        }
        let (sender, connection) = builder.handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("hub connection ended: {e}");
            }
        });
        Ok(sender)
    }
}

/// A request body sent in chunks, each waiting for the upload shaper when there is one.
pub struct ShapedBody {
    data: Bytes,
    shaper: Option<Arc<Shaper>>,
    process: Process,
    waiting: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl ShapedBody {
    fn new(data: Bytes, shaper: Option<Arc<Shaper>>, process: Process) -> ShapedBody {
        ShapedBody {
            data,
            shaper,
            process,
            waiting: None,
        }
    }
}

impl hyper::body::Body for ShapedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.data.is_empty() {
            return Poll::Ready(None);
        }
        let n = self.data.len().min(CHUNK);
        if let Some(shaper) = self.shaper.clone() {
            if self.waiting.is_none() {
                let process = self.process;
                self.waiting = Some(Box::pin(async move { shaper.take(n, process).await }));
            }
            if let Some(waiting) = self.waiting.as_mut() {
                if waiting.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            self.waiting = None;
        }
        let chunk = self.data.split_to(n);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.data.len() as u64)
    }
}

/// The link-sharing settings and what the controller learned of the line, shared by the
/// link's successive connections.
struct SharingShared {
    params: SharingParams,
    /// What the last connection learned, and when.
    memory: std::sync::Mutex<Option<(sharing::Memory, tokio::time::Instant)>>,
}

impl SharingShared {
    /// What earlier connections learned of the line, when recent enough.
    fn memory(&self) -> sharing::Memory {
        self.memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .filter(|(_, at)| at.elapsed() < MEMORY_KEPT)
            .map(|(m, _)| m)
            .unwrap_or_default()
    }
}

/// How long what a connection learned of the line is trusted by the next one.
const MEMORY_KEPT: Duration = Duration::from_secs(600);

/// How often `TCP_INFO` is read while bytes move (and the controller fed).
const SAMPLE_EVERY: Duration = Duration::from_millis(2);

/// How long after the last byte moved the controller keeps sampling.
const ACTIVE_FOR: Duration = Duration::from_millis(500);

/// Opens a TCP connection to `addr` (each of its addresses in turn) with a receive buffer
/// of `first_window` set before connecting: the kernel offers the whole buffer in the
/// handshake and never takes an offer back, so this is what keeps the hub's first flight
/// from flooding the line; it also leaves the window scale at zero, so the window clamp
/// holds to the byte.
async fn connect_sized(addr: &str, first_window: u32) -> std::io::Result<TcpStream> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_recv_buffer_size(first_window)?;
        match socket.connect(a).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no address for the hub")
    }))
}

/// One connection's link-sharing state, driven from inside the socket's reads and writes
/// (so on the connection's own task: no lock, no other task).
struct ConnSharing {
    meter: Meter,
    shared: Arc<SharingShared>,
    wire: Arc<WireStats>,
    opened: tokio::time::Instant,
    pacer: Pacer,
    /// The pacer's wait before the next write.
    pace: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The next `TCP_INFO` reading while bytes move.
    tick: Option<Pin<Box<tokio::time::Sleep>>>,
    last_sample: tokio::time::Instant,
    active_until: tokio::time::Instant,
    last_shared: tokio::time::Instant,
    /// The window clamp set on the socket.
    window: u32,
    trace: Option<std::fs::File>,
}

impl ConnSharing {
    fn start(
        tcp: &TcpStream,
        shared: Arc<SharingShared>,
        wire: Arc<WireStats>,
    ) -> std::io::Result<ConnSharing> {
        use std::os::fd::AsFd;
        let now = tokio::time::Instant::now();
        let info = super::tcp::tcp_info(tcp.as_fd())?;
        let meter = Meter::new(
            shared.params.clone(),
            &shared.memory(),
            &info,
            Duration::ZERO,
        );
        let window = meter.targets().window;
        apply_window(tcp, window)?;
        tracing::debug!(
            "link sharing: base RTT {} us, window {window} B, upload {:.0} B/s",
            meter.snapshot().base_rtt_us,
            meter.targets().upload_rate
        );
        Ok(ConnSharing {
            meter,
            shared,
            wire,
            opened: now,
            pacer: Pacer::new(Duration::ZERO),
            pace: None,
            tick: None,
            last_sample: now,
            active_until: now + ACTIVE_FOR,
            last_shared: now,
            window,
            trace: std::env::var_os("STOREBOX_SHARING_TRACE").and_then(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .ok()
            }),
        })
    }

    fn since_open(&self, now: tokio::time::Instant) -> Duration {
        now.duration_since(self.opened)
    }

    /// Reads `TCP_INFO` when the last reading is old enough, and applies the controller's
    /// new window.
    fn sample(&mut self, tcp: &TcpStream, now: tokio::time::Instant) {
        use std::os::fd::AsFd;
        if now.duration_since(self.last_sample) < SAMPLE_EVERY {
            return;
        }
        self.last_sample = now;
        let Ok(info) = super::tcp::tcp_info(tcp.as_fd()) else {
            return;
        };
        let at = self.since_open(now);
        if let Some(f) = self.trace.as_mut() {
            use std::io::Write as _;
            let snap = self.meter.snapshot();
            let _ = writeln!(
                f,
                "{:.4} rcv_rtt {} rtt {} min {} rx {} acked {} unacked {} notsent {} qd {} qu {} win {} up {} down {} lines {} {} ooo {} retr {}",
                at.as_secs_f64(), info.rcv_rtt_us, info.rtt_us, info.min_rtt_us, info.bytes_received,
                info.bytes_acked, info.unacked, info.notsent_bytes, snap.queue_down_us, snap.queue_up_us,
                snap.window, snap.upload_rate, snap.download_rate, snap.download_line, snap.upload_line,
                info.rcv_ooopack, info.total_retrans
            );
        }
        if let Some(targets) = self.meter.observe(at, &info) {
            if targets.window != self.window && apply_window(tcp, targets.window).is_ok() {
                self.window = targets.window;
            }
        }
        // The kernel resets the clamp to its buffer's size when it re-estimates the
        // overhead of its buffers (as packets of other sizes arrive): set it again each
        // time (the same value again is a no-op for the kernel).
        let _ = super::tcp::set_window_clamp(tcp.as_fd(), self.window);
        if now.duration_since(self.last_shared) >= Duration::from_millis(100) {
            self.last_shared = now;
            self.publish(now);
        }
    }

    fn publish(&self, now: tokio::time::Instant) {
        *self.wire.sharing.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.meter.snapshot());
        *self.shared.memory.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((self.meter.memory(), now));
    }
}

impl Drop for ConnSharing {
    fn drop(&mut self) {
        self.publish(tokio::time::Instant::now());
    }
}

/// Sets the receive window: the clamp, and a receive buffer of twice the window (room for
/// what the box has not read yet; and what the kernel resets the clamp to, now and then, is
/// then not far above it).
fn apply_window(tcp: &TcpStream, window: u32) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    socket2::SockRef::from(tcp).set_recv_buffer_size(2 * window as usize)?;
    super::tcp::set_window_clamp(tcp.as_fd(), window)
}

/// The connection's socket: counts the bytes crossing it and, with link sharing on, paces
/// every write and drives the controller.
struct Counted {
    inner: TcpStream,
    bytes: Arc<WireStats>,
    sharing: Option<Box<ConnSharing>>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        this.bytes
            .socket
            .received
            .fetch_add(n as u64, Ordering::Relaxed);
        if let Some(s) = this.sharing.as_mut() {
            let now = tokio::time::Instant::now();
            if n > 0 {
                s.active_until = now + ACTIVE_FOR;
            }
            s.sample(&this.inner, now);
            if result.is_pending() && now < s.active_until {
                // Come back in a few milliseconds to read TCP_INFO again: ACKs of the box's
                // own writes wake nobody, and the window must follow the line as it goes.
                let at = now + SAMPLE_EVERY;
                let tick = s
                    .tick
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                if tick.deadline() <= now {
                    tick.as_mut().reset(at);
                }
                if tick.as_mut().poll(cx).is_ready() {
                    tick.as_mut().reset(now + SAMPLE_EVERY);
                    let _ = tick.as_mut().poll(cx);
                }
            }
        }
        result
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let mut len = buf.len();
        if let Some(s) = this.sharing.as_mut() {
            // One segment per write, each when the pacer lets it go.
            loop {
                let now = tokio::time::Instant::now();
                s.sample(&this.inner, now);
                let rate = s.meter.targets().upload_rate;
                let at = s.since_open(now);
                let Some(wait) = s.pacer.wait(at, rate, s.meter.mss()) else {
                    break;
                };
                s.meter.backlogged(at);
                let pace = s
                    .pace
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(now + wait)));
                pace.as_mut().reset(now + wait);
                if pace.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            len = len.min(s.meter.mss());
        }
        let result = Pin::new(&mut this.inner).poll_write(cx, &buf[..len]);
        if let Poll::Ready(Ok(n)) = &result {
            this.bytes
                .socket
                .sent
                .fetch_add(*n as u64, Ordering::Relaxed);
            if let Some(s) = this.sharing.as_mut() {
                let now = tokio::time::Instant::now();
                let at = s.since_open(now);
                s.pacer.spend(*n, s.meter.mss());
                s.meter.wrote(at, *n);
                s.active_until = now + ACTIVE_FOR;
            }
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Whether a failed request can be sent again on a new connection because the hub closed the
/// connection under it: the connection was gone before or while it was sent, or the hub's
/// HTTP/2 GOAWAY (sent when it recycles a connection) or REFUSED_STREAM says it did not
/// process the stream (RFC 9113, 6.8 and 8.7).
fn never_reached_the_hub(e: &hyper::Error) -> bool {
    if e.is_canceled() || e.is_closed() || e.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return (h2.is_go_away() && h2.is_remote())
                || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = cause.source();
    }
    false
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A minimal HTTP/2 peer: it settles the settings, waits for the request's HEADERS, then
    /// answers them with one raw frame (a GOAWAY or a RST_STREAM), and returns the error the
    /// client's request ends with.
    async fn request_answered_with(frame_type: u8, payload: Vec<u8>, stream: u32) -> hyper::Error {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut preface = [0u8; 24];
            socket.read_exact(&mut preface).await.unwrap();
            socket
                .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
                .await
                .unwrap();
            loop {
                let mut head = [0u8; 9];
                socket.read_exact(&mut head).await.unwrap();
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut body = vec![0u8; len];
                socket.read_exact(&mut body).await.unwrap();
                match (head[3], head[4] & 1) {
                    // SETTINGS, not an ACK: acknowledge.
                    (4, 0) => socket
                        .write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0])
                        .await
                        .unwrap(),
                    // HEADERS: the request.
                    (1, _) => break,
                    _ => {}
                }
            }
            let len = (payload.len() as u32).to_be_bytes();
            let mut frame = vec![len[1], len[2], len[3], frame_type, 0];
            frame.extend_from_slice(&stream.to_be_bytes());
            frame.extend_from_slice(&payload);
            socket.write_all(&frame).await.unwrap();
            // Hold the socket open until the client has read the frame and gone.
            let mut rest = Vec::new();
            let _ = socket.read_to_end(&mut rest).await;
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http2::handshake::<
            _,
            _,
            http_body_util::Full<Bytes>,
        >(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .unwrap();
        tokio::spawn(connection);
        let request = Request::post("http://hub/v3/sync/delta")
            .body(http_body_util::Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let error = sender.send_request(request).await.unwrap_err();
        drop(sender);
        peer.abort();
        error
    }

    #[tokio::test]
    async fn a_request_the_hub_did_not_process_is_sent_again() {
        // GOAWAY with last stream 0 and NO_ERROR: the hub recycles the connection and never
        // processed stream 1.
        let goaway = [0u32.to_be_bytes(), 0u32.to_be_bytes()].concat();
        let e = request_answered_with(7, goaway, 0).await;
        assert!(
            never_reached_the_hub(&e),
            "{}",
            storebox_http::with_causes(&e)
        );
        let message = LinkError::Http(e).to_string();
        assert!(
            message.contains("connection error received"),
            "the cause is not named: {message}"
        );
        // RST_STREAM with REFUSED_STREAM (7).
        let e = request_answered_with(3, 7u32.to_be_bytes().to_vec(), 1).await;
        assert!(
            never_reached_the_hub(&e),
            "{}",
            storebox_http::with_causes(&e)
        );
        // RST_STREAM with INTERNAL_ERROR (2): the hub may have acted on it; not sent again.
        let e = request_answered_with(3, 2u32.to_be_bytes().to_vec(), 1).await;
        assert!(
            !never_reached_the_hub(&e),
            "{}",
            storebox_http::with_causes(&e)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_shaper_holds_the_rate_and_serves_push_first() {
        let shaper = Shaper::new(100_000);
        let start = tokio::time::Instant::now();
        // 1 MB at 100 kB/s: about 10 s, less the first burst.
        for _ in 0..64 {
            shaper.take(16_384, Process::Full).await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!((9.0..11.0).contains(&took), "took {took} s");

        // A full sync and a push both wait: the push goes first.
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (a, b) = (shaper.clone(), shaper.clone());
        let (oa, ob) = (order.clone(), order.clone());
        let full = tokio::spawn(async move {
            for _ in 0..5 {
                a.take(16_384, Process::Full).await;
                oa.lock().unwrap_or_else(|e| e.into_inner()).push("full");
            }
        });
        tokio::task::yield_now().await;
        let push = tokio::spawn(async move {
            b.take(16_384, Process::Push).await;
            ob.lock().unwrap_or_else(|e| e.into_inner()).push("push");
        });
        let _ = tokio::join!(full, push);
        let order = order.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let push_at = order.iter().position(|p| *p == "push");
        assert!(push_at.is_some_and(|i| i <= 1), "order {order:?}");
    }
}
