//! HTTP plumbing shared by storebox and storehub: accept loops, JSON answers, bounded bodies,
//! and a small HTTP/1.1 client for the command-line tools that talk to a local daemon.
//!
//! It knows nothing of what the routes mean; each binary routes requests itself.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;

pub mod pinned;

/// The body type of every answer.
pub type Body = Full<Bytes>;

/// A JSON answer.
pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
        Err(_) => Response::new(Full::new(Bytes::new())),
    }
}

/// A JSON error: `{"error": kind, "message": ...}`. `kind` is a stable word a program can
/// match on; `message` is for people.
pub fn error(status: StatusCode, kind: &str, message: impl std::fmt::Display) -> Response<Body> {
    json(
        status,
        &serde_json::json!({"error": kind, "message": message.to_string()}),
    )
}

/// Reads a request body of at most `limit` bytes; above it, a 413 answer.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, Response<Body>> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body is larger than {limit} bytes"),
        )),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("could not read the body: {e}"),
        )),
    }
}

/// The value of a query parameter, percent-decoded.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

/// The segments of a request path, percent-decoded: `/v1/catalog/P%201` gives
/// `["v1", "catalog", "P 1"]`. Routers match on the slice of it.
pub fn path_segments(path: &str) -> Vec<String> {
    path.trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect()
}

/// Decodes `%XX` escapes (and `+` as a space in queries is not used by our clients, so it is
/// kept). Invalid escapes are kept as they are.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Limits every listener applies, so a slow, silent or greedy client costs bounded memory and
/// time and cannot starve the others.
#[derive(Debug, Clone)]
pub struct Limits {
    /// From accept to the end of the TLS handshake and of the first request's headers (also
    /// the HTTP/1.1 header read timeout). A connection that sends nothing is closed after it:
    /// protocol detection waits no longer.
    pub header_timeout: Duration,
    /// A connection with no request in flight and no byte moving for this long is closed.
    pub idle_timeout: Duration,
    /// Open connections at most; beyond, new ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// Largest request head (request line and headers), HTTP/1.1 and HTTP/2.
    pub max_header_bytes: usize,
    /// When set, a connection older than this is asked to close once its requests in hand
    /// are answered (HTTP/2 GOAWAY), and the client reconnects. The hub uses it so a box's
    /// connection never outlives the client certificate it was opened with.
    pub max_connection_age: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_connections: 512,
            max_header_bytes: 16 * 1024,
            max_connection_age: None,
        }
    }
}

/// The client certificate chain of a request's TLS connection, leaf first; present in the
/// request's extensions only when the client sent one. On a resumed TLS session this is the
/// chain of the original handshake, not verified again: the handler must check its validity.
#[derive(Debug, Clone)]
pub struct PeerCertificates(pub Arc<Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>>);

/// What a request's connection looked like: in every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo {
    pub peer: std::net::SocketAddr,
    /// TLS was resumed from an earlier session (no certificate was verified this time).
    pub resumed: bool,
}

/// Serves HTTP/1.1 and HTTP/2 on `listener` until the process ends, one task per connection.
/// `tls`, when given, wraps each connection first.
pub async fn serve<S, F>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<S>,
    handler: fn(Arc<S>, Request<Incoming>) -> F,
) where
    S: Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    serve_until(listener, tls, state, handler, std::future::pending()).await
}

/// Like [`serve`], until `shutdown` completes; then drains: closes the listener (new
/// connections are refused), asks every open connection to finish the request in hand and
/// close (an idle HTTP/1.1 keep-alive closes at once, HTTP/2 sends GOAWAY), and returns once
/// all have closed. The caller bounds how long it waits for that.
pub async fn serve_until<S, F, D>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<S>,
    handler: fn(Arc<S>, Request<Incoming>) -> F,
    shutdown: D,
) where
    S: Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
    D: Future<Output = ()>,
{
    serve_with(listener, tls, Limits::default(), state, handler, shutdown).await
}

/// Like [`serve_until`], with explicit [`Limits`], and answers of any body type `B`: a
/// handler that streams (a file served in chunks) answers with a body of its own; the others
/// answer [`Body`].
pub async fn serve_with<S, F, B, D>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    state: Arc<S>,
    handler: fn(Arc<S>, Request<Incoming>) -> F,
    shutdown: D,
) where
    S: Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    D: Future<Output = ()>,
{
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Every connection task holds a clone of `open_tx`; `recv` answers `None` once the last
    // one has ended, which is when the drain is complete.
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let limits = Arc::new(limits);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // Take a connection slot before accepting: at the cap, new connections wait in the
        // kernel's backlog instead of costing a task and buffers here.
        let permit = tokio::select! {
            _ = shutdown.as_mut() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.as_mut() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Running out of file descriptors is the usual cause; pausing lets
                // connections close instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let state = state.clone();
        let tls = tls.clone();
        let stop = stop_rx.clone();
        let open = open_tx.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let _open = open;
            let _permit = permit;
            serve_connection(tcp, peer, tls, &limits, state, handler, stop).await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_tx);
    let _ = open_rx.recv().await;
}

/// When the connection last moved a byte, and how many requests are in flight on it.
#[derive(Default)]
struct Activity {
    last_io_ms: AtomicU64,
    in_flight: AtomicUsize,
    born: std::sync::OnceLock<Instant>,
}

impl Activity {
    fn now_ms(&self) -> u64 {
        self.born.get_or_init(Instant::now).elapsed().as_millis() as u64
    }
    fn touch(&self) {
        self.last_io_ms.store(self.now_ms(), Ordering::Relaxed);
    }
    /// Resolves once the connection has been idle (no request, no byte) for `limit`.
    async fn idle(&self, limit: Duration) {
        let tick = (limit / 4).max(Duration::from_millis(50));
        loop {
            tokio::time::sleep(tick).await;
            let quiet = self
                .now_ms()
                .saturating_sub(self.last_io_ms.load(Ordering::Relaxed));
            if self.in_flight.load(Ordering::Relaxed) == 0 && Duration::from_millis(quiet) >= limit
            {
                return;
            }
        }
    }
}

/// Counts a request in flight while alive.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A stream that notes when bytes move, for the idle timeout.
struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The HTTP/2 connection preface a client starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Waits (within the header timeout) for the first bytes of a plain connection and tells
/// whether they start HTTP/2. `None`: the client closed or stayed silent.
async fn detect_h2(tcp: &tokio::net::TcpStream, limits: &Limits) -> Option<bool> {
    let deadline = tokio::time::Instant::now() + limits.header_timeout;
    let mut buf = [0u8; 14];
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        // Enough bytes to tell, or a byte that differs from the preface.
        if n >= 3 || !H2_PREFACE.starts_with(&buf[..n]) {
            return Some(H2_PREFACE.starts_with(&buf[..n]));
        }
        // peek returns at once while the first bytes sit in the buffer: wait a little for more.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn serve_connection<S, F, B>(
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: &Limits,
    state: Arc<S>,
    handler: fn(Arc<S>, Request<Incoming>) -> F,
    stop: tokio::sync::watch::Receiver<bool>,
) where
    S: Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Arc::new(Activity::default());
    activity.touch();
    match tls {
        Some(acceptor) => {
            let tracked = Tracked {
                inner: tcp,
                activity: activity.clone(),
            };
            let stream =
                match tokio::time::timeout(limits.header_timeout, acceptor.accept(tracked)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::info!("TLS handshake with {peer} failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::info!("TLS handshake with {peer} timed out");
                        return;
                    }
                };
            let (_, session) = stream.get_ref();
            let certs = session
                .peer_certificates()
                .filter(|c| !c.is_empty())
                .map(|c| PeerCertificates(Arc::new(c.to_vec())));
            let info = ConnectionInfo {
                peer,
                resumed: session.handshake_kind()
                    == Some(tokio_rustls::rustls::HandshakeKind::Resumed),
            };
            // ALPN has already told the protocol: no detection to wait for.
            let h2 = session.alpn_protocol() == Some(b"h2");
            run_http(
                stream, h2, info, certs, activity, limits, state, handler, stop,
            )
            .await;
        }
        None => {
            let Some(h2) = detect_h2(&tcp, limits).await else {
                tracing::debug!("connection from {peer} closed or silent before a request");
                return;
            };
            let info = ConnectionInfo {
                peer,
                resumed: false,
            };
            let tracked = Tracked {
                inner: tcp,
                activity: activity.clone(),
            };
            run_http(
                tracked, h2, info, None, activity, limits, state, handler, stop,
            )
            .await;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_http<IO, S, F, B>(
    io: IO,
    h2: bool,
    info: ConnectionInfo,
    certs: Option<PeerCertificates>,
    activity: Arc<Activity>,
    limits: &Limits,
    state: Arc<S>,
    handler: fn(Arc<S>, Request<Incoming>) -> F,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let counter = activity.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let state = state.clone();
        req.extensions_mut().insert(info);
        if let Some(certs) = &certs {
            req.extensions_mut().insert(certs.clone());
        }
        let in_flight = InFlight::new(&counter);
        async move {
            let response = handler(state, req).await;
            drop(in_flight);
            Ok::<_, Infallible>(response)
        }
    });
    let io = TokioIo::new(io);
    // Serves the connection; when the drain starts or the connection idles out, lets the
    // request in hand finish and closes, waiting at most the header timeout for the client to
    // go. (A macro: the two connection types differ in type only.)
    macro_rules! until_drained {
        ($connection:expr) => {{
            let mut connection = std::pin::pin!($connection);
            let reason = tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!("connection from {} ended: {e}", info.peer);
                    }
                    return;
                }
                // The block drops the watch's read guard before the drain.
                _ = async { let _ = stop.wait_for(|stopping| *stopping).await; } => "drain",
                _ = activity.idle(limits.idle_timeout) => "idle",
                _ = async {
                    match limits.max_connection_age {
                        Some(age) => tokio::time::sleep(age).await,
                        None => std::future::pending().await,
                    }
                } => "age",
            };
            tracing::debug!("closing the connection from {} ({reason})", info.peer);
            connection.as_mut().graceful_shutdown();
            if reason == "idle" {
                let _ = tokio::time::timeout(limits.header_timeout, connection).await;
            } else {
                let _ = connection.await;
            }
        }};
    }
    if h2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(limits.max_header_bytes as u32)
            .max_concurrent_streams(128);
        until_drained!(builder.serve_connection(io, service))
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192));
        until_drained!(builder.serve_connection(io, service))
    }
}

/// An error's message followed by those of its causes, as "a: b: c". Library errors often
/// stop at a summary (hyper's "http2 error", the `postgres` crate's "error performing TLS
/// handshake") and keep what went wrong in their sources; a cause already quoted by the text
/// before it is not repeated.
pub fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

/// Parses a JSON request body into `T`, refusing nesting deeper than [`MAX_JSON_DEPTH`]
/// before serde sees it; a 400 JSON error names what is wrong.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Response<Body>> {
    if json_depth(body) > MAX_JSON_DEPTH {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("JSON nested deeper than {MAX_JSON_DEPTH} levels"),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("the body is not the expected JSON: {e}"),
        )
    })
}

/// Deepest nesting of objects and arrays accepted in a JSON body.
pub const MAX_JSON_DEPTH: usize = 32;

/// The deepest nesting of `[`/`{` in JSON text, strings skipped; a cheap scan so a deeply
/// nested body is refused before a parser recurses into it.
pub fn json_depth(text: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in text {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// The bearer token of a request, if any.
pub fn bearer(req: &Request<Incoming>) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Errors of [`call`].
#[derive(Debug)]
pub enum CallError {
    Connect(std::io::Error),
    Http(hyper::Error),
    Request(http::Error),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Connect(e) => write!(f, "could not connect: {e}"),
            CallError::Http(e) => write!(f, "HTTP exchange failed: {e}"),
            CallError::Request(e) => write!(f, "could not build the request: {e}"),
        }
    }
}

impl std::error::Error for CallError {}

/// One plain HTTP/1.1 request on a fresh connection: for command-line tools and tests talking
/// to a daemon on this machine. Returns the status and the whole body.
pub async fn call(
    addr: std::net::SocketAddr,
    method: http::Method,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(StatusCode, Bytes), CallError> {
    call_over(addr, None, method, path_and_query, headers, body).await
}

/// Like [`call`], over TLS with `tls` when given (see [`pinned::pinned_client_config`]).
pub async fn call_over(
    addr: std::net::SocketAddr,
    tls: Option<&Arc<tokio_rustls::rustls::ClientConfig>>,
    method: http::Method,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(StatusCode, Bytes), CallError> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(CallError::Connect)?;
    match tls {
        Some(config) => {
            let name = tokio_rustls::rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let stream = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .map_err(CallError::Connect)?;
            call_on(
                stream,
                &addr.to_string(),
                method,
                path_and_query,
                headers,
                body,
            )
            .await
        }
        None => {
            call_on(
                tcp,
                &addr.to_string(),
                method,
                path_and_query,
                headers,
                body,
            )
            .await
        }
    }
}

/// One HTTP/1.1 request on a connection the caller opened (plain or TLS), `host` as the
/// `Host` header.
pub async fn call_on<IO>(
    io: IO,
    host: &str,
    method: http::Method,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(StatusCode, Bytes), CallError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(CallError::Http)?;
    tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(header::HOST, host);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(Full::new(body)).map_err(CallError::Request)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(CallError::Http)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(CallError::Http)?
        .to_bytes();
    Ok((status, body))
}
