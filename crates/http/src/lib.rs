//! HTTP plumbing shared by storebox and storehub: accept loops, JSON answers, bounded bodies,
//! and a small HTTP/1.1 client for the command-line tools that talk to a local daemon.
//!
//! It knows nothing of what the routes mean; each binary routes requests itself.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

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
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Every connection task holds a clone of `open_tx`; `recv` answers `None` once the last
    // one has ended, which is when the drain is complete.
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
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
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let state = state.clone();
        let tls = tls.clone();
        let mut stop = stop_rx.clone();
        let open = open_tx.clone();
        tokio::spawn(async move {
            let _open = open;
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handler(state, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // Serves the connection; when the drain starts, lets the request in hand finish
            // and closes. (A macro: the two connection types differ only in their stream.)
            macro_rules! until_drained {
                ($connection:expr) => {{
                    let mut connection = std::pin::pin!($connection);
                    tokio::select! {
                        result = connection.as_mut() => result,
                        // The block drops the watch's read guard before the drain.
                        _ = async { let _ = stop.wait_for(|stopping| *stopping).await; } => {
                            connection.as_mut().graceful_shutdown();
                            connection.await
                        }
                    }
                }};
            }
            let result = match tls {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(stream) => {
                        until_drained!(builder.serve_connection(TokioIo::new(stream), service))
                    }
                    Err(e) => {
                        tracing::info!("TLS handshake with {peer} failed: {e}");
                        return;
                    }
                },
                None => until_drained!(builder.serve_connection(TokioIo::new(tcp), service)),
            };
            if let Err(e) = result {
                tracing::debug!("connection from {peer} ended: {e}");
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_tx);
    let _ = open_rx.recv().await;
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
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(CallError::Connect)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(CallError::Http)?;
    tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(header::HOST, addr.to_string());
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
