//! The box's HTTPS link to the hub: one HTTP/2 connection per sync process, opened on demand,
//! reused while it lives, and counted byte for byte at the socket.
//!
//! Only the CA named in the box config is trusted (the hub's certificate is pinned to it);
//! the box authenticates with its client certificate (identity.rs).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

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
    #[error("HTTP/2 with the hub failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("the hub did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the hub answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("could not build the request: {0}")]
    Request(#[from] http::Error),
}

/// Bytes that crossed the socket, TLS records and HTTP/2 framing included.
#[derive(Debug, Default)]
pub struct ByteCounters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
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

/// One process's connection to the hub.
pub struct HubLink {
    target: Arc<HubTarget>,
    connection: Mutex<Option<SendRequest<Full<Bytes>>>>,
    pub bytes: Arc<ByteCounters>,
}

impl HubLink {
    pub fn new(target: Arc<HubTarget>) -> HubLink {
        HubLink {
            target,
            connection: Mutex::new(None),
            bytes: Arc::new(ByteCounters::default()),
        }
    }

    /// POSTs an encoded message to `path` and returns the answer's body. Opens a connection
    /// when none is alive; a failed call drops the connection so the next one starts afresh.
    pub async fn post(&self, path: &str, body: Vec<u8>) -> Result<Bytes, LinkError> {
        let timeout = self.target.timeout;
        match tokio::time::timeout(timeout, self.post_inner(path, body)).await {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(e)) => {
                *self.connection.lock().await = None;
                Err(e)
            }
            Err(_) => {
                *self.connection.lock().await = None;
                Err(LinkError::Timeout(timeout))
            }
        }
    }

    async fn post_inner(&self, path: &str, body: Vec<u8>) -> Result<Bytes, LinkError> {
        let mut sender = {
            let mut slot = self.connection.lock().await;
            match slot.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let s = self.connect().await?;
                    *slot = Some(s.clone());
                    s
                }
            }
        };
        sender.ready().await?;
        let request = Request::post(format!(
            "https://{}:{}{path}",
            self.target.host, self.target.port
        ))
        .header(header::AUTHORIZATION, &self.target.authorization)
        .header(header::CONTENT_TYPE, proto::CONTENT_TYPE)
        .header(proto::HEADER_PROTOCOL, proto::PROTOCOL_VERSION.to_string())
        .body(Full::new(Bytes::from(body)))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
            return Err(LinkError::Status { status, message });
        }
        Ok(body)
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, LinkError> {
        let addr = format!("{}:{}", self.target.host, self.target.port);
        let tcp = TcpStream::connect(&addr)
            .await
            .map_err(|source| LinkError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let counted = Counted {
            inner: tcp,
            bytes: self.bytes.clone(),
        };
        let connector = tokio_rustls::TlsConnector::from(self.target.tls.clone());
        let tls = connector
            .connect(self.target.server_name.clone(), counted)
            .await
            .map_err(LinkError::Tls)?;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("hub connection ended: {e}");
            }
        });
        Ok(sender)
    }
}

/// A socket that counts the bytes crossing it.
struct Counted {
    inner: TcpStream,
    bytes: Arc<ByteCounters>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.bytes.received.fetch_add(n as u64, Ordering::Relaxed);
        result
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            self.bytes.sent.fetch_add(*n as u64, Ordering::Relaxed);
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
