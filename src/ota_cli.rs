//! `storebox ota ...`: the technician's side of a firmware update. `install` sends a bundle
//! (a file, or an `http://` URL streamed through) to the daemon in chunks over its LAN API,
//! resuming a cut upload, queues the install and follows it until the box reboots into the
//! new slot or refuses the bundle with its reason.

use std::io::{Read, Seek};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::Value;

use crate::config::BoxConfig;

/// Bytes per upload request: large enough to keep the LAN busy, small enough to resume
/// cheaply and to bound the daemon's memory.
const CHUNK: usize = 8 * 1024 * 1024;

/// One call to the daemon's LAN API with a body; any status comes back with its JSON.
async fn request(
    config: &BoxConfig,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> anyhow::Result<(http::StatusCode, Value)> {
    let addr = crate::local_addr(config.lan.listen);
    let token = crate::pairing::Pairing::open(&config.data_dir)?
        .local_token()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let auth = format!("Bearer {token}");
    let tls = if config.lan.tls {
        let fingerprint = crate::pairing::lan_fingerprint(&config.data_dir)?;
        Some(
            storebox_http::pinned::pinned_client_config(&fingerprint)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        )
    } else {
        None
    };
    let mut all = vec![("authorization", auth.as_str())];
    all.extend_from_slice(headers);
    let (status, answer) = storebox_http::call_over(addr, tls.as_ref(), method, path, &all, body)
        .await
        .with_context(|| {
            format!("asking the storebox daemon at {addr} (is `storebox serve` running?)")
        })?;
    let doc = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    Ok((status, doc))
}

/// Where the bytes come from.
enum Source {
    File(std::fs::File),
    Url(UrlStream),
}

pub async fn install(
    config: &BoxConfig,
    bundle: &str,
    force_downgrade: bool,
    no_wait: bool,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let (mut source, total, name) = if bundle.starts_with("http://") {
        let stream = UrlStream::open(bundle, 0).await?;
        let total = stream.total;
        (Source::Url(stream), total, bundle.to_owned())
    } else if bundle.contains("://") {
        bail!("{bundle}: only files and http:// URLs can be installed (the bundle is signed, so the transport needs no TLS)");
    } else {
        let file = std::fs::File::open(bundle).with_context(|| format!("opening {bundle}"))?;
        let total = file
            .metadata()
            .with_context(|| format!("reading {bundle}"))?
            .len();
        let name = Path::new(bundle)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| bundle.to_owned());
        (Source::File(file), total, name)
    };
    if total == 0 {
        bail!("{bundle} is empty");
    }
    // A cut upload of the same bundle resumes where it stopped.
    let (_, doc) = request(config, http::Method::GET, "/v1/ota", &[], Bytes::new()).await?;
    let incoming = &doc["incoming"];
    let mut offset = if incoming["source"] == "lan"
        && incoming["name"].as_str() == Some(name.as_str())
        && incoming["total"].as_u64() == Some(total)
    {
        incoming["received"].as_u64().unwrap_or(0).min(total)
    } else {
        0
    };
    if offset == total {
        eprintln!("the bundle is already on the box");
    } else if offset > 0 {
        eprintln!("resuming the upload at {} MiB", offset >> 20);
    }
    if let Source::Url(stream) = &mut source {
        if offset > 0 {
            *stream = UrlStream::open(bundle, offset).await?;
        }
    }
    let mut last_print = std::time::Instant::now();
    while offset < total {
        let want = CHUNK.min((total - offset) as usize);
        let chunk = match &mut source {
            Source::File(file) => {
                file.seek(std::io::SeekFrom::Start(offset))?;
                let mut buf = vec![0u8; want];
                file.read_exact(&mut buf)
                    .with_context(|| format!("reading {bundle}"))?;
                Bytes::from(buf)
            }
            Source::Url(stream) => stream.read(want).await?,
        };
        let range = format!("bytes {offset}-{}/{total}", offset + chunk.len() as u64 - 1);
        let (status, answer) = request(
            config,
            http::Method::PUT,
            "/v1/ota/bundle",
            &[("content-range", &range), ("x-bundle-name", &name)],
            chunk.clone(),
        )
        .await?;
        match status {
            s if s.is_success() => offset += chunk.len() as u64,
            http::StatusCode::CONFLICT if answer["received"].is_u64() => {
                // The daemon holds a different amount: follow it.
                let received = answer["received"].as_u64().unwrap_or(0);
                if matches!(source, Source::Url(_)) {
                    source = Source::Url(UrlStream::open(bundle, received).await?);
                }
                offset = received;
            }
            s => bail!(
                "the box refused the bundle ({s}): {}",
                answer["message"].as_str().unwrap_or("no reason given")
            ),
        }
        if last_print.elapsed() >= Duration::from_secs(2) || offset == total {
            last_print = std::time::Instant::now();
            eprintln!(
                "uploaded {} of {} MiB ({}%)",
                offset >> 20,
                total >> 20,
                offset * 100 / total
            );
        }
    }
    let body = serde_json::json!({ "force_downgrade": force_downgrade }).to_string();
    let (status, answer) = request(
        config,
        http::Method::POST,
        "/v1/ota/install",
        &[("content-type", "application/json")],
        Bytes::from(body),
    )
    .await?;
    if !status.is_success() {
        bail!(
            "the box did not queue the install ({status}): {}",
            answer["message"].as_str().unwrap_or("no reason given")
        );
    }
    let attempt = answer["attempt"].as_u64().unwrap_or(0);
    eprintln!("install queued (attempt {attempt}); the box checks the bundle");
    if no_wait {
        return Ok(());
    }
    follow(config, attempt, started).await
}

/// Follows an install attempt until it is installed (the box then reboots) or refused.
async fn follow(
    config: &BoxConfig,
    attempt: u64,
    started: std::time::Instant,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30 * 60);
    let mut seen = String::new();
    loop {
        match request(config, http::Method::GET, "/v1/ota", &[], Bytes::new()).await {
            Ok((_, doc)) => {
                let phase = doc["phase"].as_str().unwrap_or("").to_owned();
                let ours = doc["attempt"].as_u64() == Some(attempt);
                if ours && phase != seen {
                    eprintln!("phase: {phase}");
                    seen = phase.clone();
                }
                let last = &doc["last"];
                if ours && (phase == "installed" || phase == "trial") {
                    println!(
                        "installed {} into slot {} in {:.1} s; the box reboots into it now",
                        doc["version"].as_str().unwrap_or("?"),
                        if doc["slot"] == "A" { "B" } else { "A" },
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
                if ours && phase == "idle" && last["event"] == "failed" {
                    bail!(
                        "the box refused the bundle: {}",
                        last["reason"].as_str().unwrap_or("no reason given")
                    );
                }
            }
            // The box going away after the install is the reboot.
            Err(e) if seen == "installing" || seen == "installed" => {
                println!("installed; the box is rebooting ({e:#})");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        if std::time::Instant::now() >= deadline {
            bail!("no outcome after 30 minutes; see `storebox ota status`");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn status(config: &BoxConfig, json: bool) -> anyhow::Result<()> {
    let (status, doc) = request(config, http::Method::GET, "/v1/ota", &[], Bytes::new()).await?;
    if !status.is_success() {
        bail!("the daemon answered {status}: {doc}");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    let text = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    println!(
        "running {} on slot {} ({}); update phase {}",
        text(&doc["running"]),
        text(&doc["slot"]),
        text(&doc["compatible"]),
        text(&doc["phase"])
    );
    if !doc["target"].is_null() {
        println!("hub target: {}", text(&doc["target"]["version"]));
    }
    if !doc["incoming"].is_null() {
        let i = &doc["incoming"];
        println!(
            "bundle on the box: {} from {}, {} of {} bytes",
            text(&i["name"]),
            text(&i["source"]),
            text(&i["received"]),
            text(&i["total"])
        );
    }
    let h = &doc["health"];
    println!(
        "health: {}{}",
        if h["healthy"] == true {
            "healthy"
        } else {
            "not healthy"
        },
        h["problems"]
            .as_array()
            .filter(|p| !p.is_empty())
            .map(|p| format!(" ({})", p.iter().map(text).collect::<Vec<_>>().join("; ")))
            .unwrap_or_default()
    );
    if let Some(events) = doc["events"].as_array() {
        for e in events.iter().take(10) {
            println!(
                "  {} {} {}{}",
                text(&e["at"]),
                text(&e["event"]),
                text(&e["version"]),
                e["reason"]
                    .as_str()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// A plain HTTP GET read in pieces, resumed with `Range` (a server without ranges sends the
/// whole file again, and the bytes before the offset are skipped).
struct UrlStream {
    body: hyper::body::Incoming,
    buffer: bytes::BytesMut,
    total: u64,
}

impl UrlStream {
    async fn open(url: &str, offset: u64) -> anyhow::Result<UrlStream> {
        let rest = url
            .strip_prefix("http://")
            .context("only http:// URLs are supported")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let addr = if authority.contains(':') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .with_context(|| format!("HTTP with {addr}"))?;
        tokio::spawn(connection);
        let mut req = http::Request::get(path).header(http::header::HOST, authority);
        if offset > 0 {
            req = req.header(http::header::RANGE, format!("bytes={offset}-"));
        }
        let req = req
            .body(http_body_util::Empty::<Bytes>::new())
            .context("building the request")?;
        let response = sender
            .send_request(req)
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = response.status();
        let length = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let mut stream = UrlStream {
            body: response.into_body(),
            buffer: bytes::BytesMut::new(),
            total: 0,
        };
        match status {
            http::StatusCode::PARTIAL_CONTENT if offset > 0 => {
                stream.total = offset + length.context("no Content-Length")?;
            }
            http::StatusCode::OK => {
                stream.total = length.with_context(|| format!("{url}: no Content-Length"))?;
                let mut skip = offset;
                while skip > 0 {
                    let piece = stream.read(skip.min(CHUNK as u64) as usize).await?;
                    skip -= piece.len() as u64;
                }
            }
            s => bail!("GET {url} answered {s}"),
        }
        Ok(stream)
    }

    /// Exactly `n` bytes (fewer only at the end of the body).
    async fn read(&mut self, n: usize) -> anyhow::Result<Bytes> {
        while self.buffer.len() < n {
            match self.body.frame().await {
                Some(frame) => {
                    if let Some(data) = frame.context("reading the download")?.data_ref() {
                        self.buffer.extend_from_slice(data);
                    }
                }
                None => break,
            }
        }
        if self.buffer.is_empty() {
            bail!("the download ended early");
        }
        let take = n.min(self.buffer.len());
        Ok(self.buffer.split_to(take).freeze())
    }
}
