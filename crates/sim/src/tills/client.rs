//! A minimal keep-alive HTTP/1.1 client for one till: one hyper connection
//! over a tokio `TcpStream` (inside TLS pinned to the box's certificate for an
//! `https://` box), re-established whenever it breaks (the box may restart
//! while tills keep selling). Every request carries the till's token.

use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long one request (including connecting) may take before the till
/// gives up on it and reconnects. Short, because a till operator would not
/// wait longer either.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the box's till API lives.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    host: String,
    port: u16,
    /// `Host` header value.
    authority: String,
    /// Path prefix of the API (empty for `http://host:port`).
    prefix: String,
    /// TLS pinned to the box's certificate, for `https://`.
    tls: Option<std::sync::Arc<tokio_rustls::rustls::ClientConfig>>,
    /// `Authorization` header value, when the till is paired.
    authorization: Option<String>,
}

impl Endpoint {
    /// Parses `http://host[:port][/prefix]`.
    #[cfg(test)]
    pub(crate) fn parse(url: &str) -> anyhow::Result<Self> {
        Self::parse_secure(url, None, None)
    }

    /// Parses `http(s)://host[:port][/prefix]`; `https` needs the SHA-256
    /// fingerprint of the box's LAN certificate to pin.
    pub(crate) fn parse_secure(
        url: &str,
        fingerprint: Option<&str>,
        token: Option<&str>,
    ) -> anyhow::Result<Self> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("invalid box URL {url:?}"))?;
        let tls = match (uri.scheme_str(), fingerprint) {
            (Some("http"), _) => None,
            (Some("https"), Some(fp)) => Some(
                storebox_http::pinned::pinned_client_config(fp)
                    .map_err(|e| anyhow::anyhow!("--fingerprint: {e}"))?,
            ),
            (Some("https"), None) => bail!(
                "box URL {url:?} is https: give the box's certificate fingerprint \
                 (--fingerprint, from `storebox pair` or the status page) to pin it"
            ),
            _ => bail!("box URL {url:?} must start with http:// or https://"),
        };
        let authority = uri
            .authority()
            .with_context(|| format!("box URL {url:?} has no host"))?;
        // IPv6 literals come bracketed in URLs but not in socket addresses.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let default_port = if tls.is_some() { 443 } else { 80 };
        Ok(Self {
            host,
            port: authority.port_u16().unwrap_or(default_port),
            authority: authority.as_str().to_owned(),
            prefix: uri.path().trim_end_matches('/').to_owned(),
            tls,
            authorization: token.map(|t| format!("Bearer {}", t.trim())),
        })
    }

    /// The request target for an API path such as `/v1/activity`.
    pub(crate) fn target(&self, path: &str) -> String {
        format!("{}{path}", self.prefix)
    }
}

/// One till's connection to the box.
pub(crate) struct Client {
    endpoint: Endpoint,
    sender: Option<SendRequest<Full<Bytes>>>,
    /// Completed exchanges on the current connection.
    exchanges: u64,
}

impl Client {
    pub(crate) fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            sender: None,
            exchanges: 0,
        }
    }

    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sends one request and returns the status and body, or a description
    /// of what went wrong at the connection level.
    ///
    /// A failure on a connection that already served requests is retried
    /// once on a fresh connection: the box may have closed an idle
    /// keep-alive connection, which is not a failure worth reporting. Only
    /// idempotent requests go through here (GETs, and activity POSTs whose
    /// `id` makes replays harmless).
    pub(crate) async fn send(
        &mut self,
        method: &Method,
        target: &str,
        body: Option<&Bytes>,
    ) -> Result<(StatusCode, Bytes), String> {
        let reused = self.sender.is_some() && self.exchanges > 0;
        match self.attempt(method, target, body).await {
            Err(_) if reused => self.attempt(method, target, body).await,
            other => other,
        }
    }

    async fn attempt(
        &mut self,
        method: &Method,
        target: &str,
        body: Option<&Bytes>,
    ) -> Result<(StatusCode, Bytes), String> {
        let result =
            tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(method, target, body)).await;
        match result {
            Ok(Ok(answer)) => {
                self.exchanges += 1;
                Ok(answer)
            }
            Ok(Err(e)) => {
                self.sender = None;
                Err(format!("{e:#}"))
            }
            Err(_) => {
                // The connection may still be busy with the abandoned
                // request: start afresh.
                self.sender = None;
                Err(format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()))
            }
        }
    }

    async fn exchange(
        &mut self,
        method: &Method,
        target: &str,
        body: Option<&Bytes>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        if self.sender.as_ref().is_none_or(SendRequest::is_closed) {
            self.sender = Some(self.connect().await?);
            self.exchanges = 0;
        }
        let Some(sender) = self.sender.as_mut() else {
            bail!("not connected");
        };
        sender.ready().await.context("connection closed")?;
        let mut req = Request::builder()
            .method(method.clone())
            .uri(target)
            .header(HOST, &self.endpoint.authority)
            .header(USER_AGENT, "storesim");
        if let Some(auth) = &self.endpoint.authorization {
            req = req.header(AUTHORIZATION, auth);
        }
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body.cloned().unwrap_or_default()))
            .context("building request")?;
        let resp = sender.send_request(req).await.context("sending request")?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .context("reading response body")?
            .to_bytes();
        Ok((status, bytes))
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let Endpoint { host, port, .. } = &self.endpoint;
        let stream = TcpStream::connect((host.as_str(), *port))
            .await
            .with_context(|| format!("connecting to {host}:{port}"))?;
        // Requests are small and latency is what we measure.
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        // The connection task ends when the box closes the connection or the
        // sender is dropped; its error then surfaces through the sender.
        match &self.endpoint.tls {
            Some(config) => {
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.clone())
                    .with_context(|| format!("{host:?} is not a server name"))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, stream)
                    .await
                    .context("TLS handshake with the box")?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                    .await
                    .context("HTTP/1.1 handshake")?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(sender)
            }
            None => {
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .context("HTTP/1.1 handshake")?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(sender)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let e = Endpoint::parse("http://127.0.0.1:8080").expect("valid URL");
        assert_eq!(
            (e.host.as_str(), e.port, e.authority.as_str()),
            ("127.0.0.1", 8080, "127.0.0.1:8080")
        );
        assert_eq!(e.target("/v1/activity"), "/v1/activity");
        let e = Endpoint::parse("http://[::1]/box/").expect("valid URL");
        assert_eq!((e.host.as_str(), e.port), ("::1", 80));
        assert_eq!(e.target("/v1/activity"), "/box/v1/activity");
        assert!(
            Endpoint::parse("https://example.org").is_err(),
            "https needs a pin"
        );
        let pinned =
            Endpoint::parse_secure("https://127.0.0.1:8443", Some(&"ab".repeat(32)), Some("t"))
                .expect("https with a pin");
        assert!(pinned.tls.is_some());
        assert_eq!(pinned.authorization.as_deref(), Some("Bearer t"));
        assert!(Endpoint::parse("not a url").is_err());
    }
}
