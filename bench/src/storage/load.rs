//! Load generation shared by every series of the storage benchmark, whatever serves it (the
//! box, nginx, SQLite in this process): OS threads, one per till or client, each with its own
//! state (a keep-alive connection, or nothing), started together.
//!
//! - **Open loop** ([`Pace::Open`]): operation `k` is scheduled at `t0 + k / rate`, handed to
//!   worker `k % workers`. A worker that falls behind sends the next one as soon as it can,
//!   and every latency runs from the *scheduled* time to the answer, so a server that makes
//!   clients queue is charged for the queueing (no coordinated omission).
//! - **Closed loop** ([`Pace::Closed`]): every worker back to back for a duration; latency
//!   from send to answer.
//!
//! Threads, not async tasks, so that pacing has the precision of `nanosleep` (tens of µs)
//! rather than a runtime's millisecond timer wheel, for every series alike.
//!
//! [`HttpConn`] is a minimal blocking HTTP/1.1 keep-alive client: the same code talks to the
//! box and to nginx.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::common::Lat;

/// How operations are paced.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// `count` operations at `rate` per second in total.
    Open { rate: f64, count: u64 },
    /// Back to back for `run`.
    Closed { run: Duration },
}

/// What a series did.
pub struct Outcome {
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub lat: Lat,
    /// The series' window: from its first scheduled operation to its last answer (for an open
    /// loop, at least the schedule's own length).
    pub secs: f64,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.ok as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// Runs one series: `make(w)` builds worker `w`'s state before the clock starts (connecting
/// is not measured), then `op(state, k)` performs operation `k` (unique across workers) and
/// says whether it succeeded.
pub fn drive<S, M, O>(workers: usize, pace: Pace, make: M, op: O) -> anyhow::Result<Outcome>
where
    S: Send,
    M: Fn(usize) -> anyhow::Result<S>,
    O: Fn(&mut S, u64) -> anyhow::Result<bool> + Sync,
{
    let mut states = Vec::with_capacity(workers);
    for w in 0..workers {
        states.push(make(w)?);
    }
    // A common start a little ahead, so that every thread is waiting when it comes.
    let t0 = Instant::now() + Duration::from_millis(20);
    let op = &op;
    let results: Vec<Worker> = std::thread::scope(|scope| {
        let handles: Vec<_> = states
            .into_iter()
            .enumerate()
            .map(|(w, mut state)| {
                scope.spawn(move || {
                    let mut me = Worker::default();
                    match pace {
                        Pace::Open { rate, count } => {
                            let mut k = w as u64;
                            while k < count {
                                let at = t0 + Duration::from_secs_f64(k as f64 / rate);
                                sleep_until(at);
                                let result = op(&mut state, k);
                                me.record(result, at);
                                k += workers as u64;
                            }
                        }
                        Pace::Closed { run } => {
                            sleep_until(t0);
                            let mut k = w as u64;
                            while Instant::now() < t0 + run {
                                let at = Instant::now();
                                let result = op(&mut state, k);
                                me.record(result, at);
                                k += workers as u64;
                            }
                        }
                    }
                    me
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Worker::panicked()))
            .collect()
    });
    let mut out = Outcome {
        ok: 0,
        errors: 0,
        first_error: None,
        lat: Lat(Vec::new()),
        secs: 0.0,
    };
    let mut end = t0;
    for r in results {
        out.ok += r.lat.len() as u64;
        out.errors += r.errors;
        out.first_error = out.first_error.or(r.first_error);
        out.lat.0.extend(r.lat);
        end = end.max(r.last_done);
    }
    let window = (end.max(t0) - t0).as_secs_f64();
    out.secs = match pace {
        Pace::Open { rate, count } => window.max(count as f64 / rate),
        Pace::Closed { .. } => window,
    };
    Ok(out)
}

struct Worker {
    lat: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
    last_done: Instant,
}

impl Default for Worker {
    fn default() -> Worker {
        Worker {
            lat: Vec::new(),
            errors: 0,
            first_error: None,
            last_done: Instant::now(),
        }
    }
}

impl Worker {
    fn record(&mut self, result: anyhow::Result<bool>, from: Instant) {
        let done = Instant::now();
        self.last_done = done;
        match result {
            Ok(true) => self.lat.push(done.saturating_duration_since(from)),
            Ok(false) => {
                self.errors += 1;
                self.first_error
                    .get_or_insert_with(|| "an unexpected answer".into());
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }

    fn panicked() -> Worker {
        Worker {
            errors: 1,
            first_error: Some("a load thread panicked".into()),
            ..Worker::default()
        }
    }
}

fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

/// A blocking HTTP/1.1 keep-alive connection. It reconnects (and says so in `reconnects`) if
/// the server closed it, and retries the request once: every request sent through it is a
/// lookup or an activity post with its idempotency key, so a retry is safe.
pub struct HttpConn {
    addr: SocketAddr,
    host: String,
    stream: Option<BufReader<TcpStream>>,
    request: Vec<u8>,
    line: String,
    pub reconnects: u64,
}

/// Longest wait for one answer: a stuck server fails the request, it does not hang the run.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

impl HttpConn {
    pub fn open(addr: SocketAddr) -> anyhow::Result<HttpConn> {
        let mut conn = HttpConn {
            addr,
            host: addr.to_string(),
            stream: None,
            request: Vec::with_capacity(1024),
            line: String::new(),
            reconnects: 0,
        };
        conn.connect()?;
        Ok(conn)
    }

    fn connect(&mut self) -> anyhow::Result<()> {
        let tcp = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT)
            .with_context(|| format!("connecting to {}", self.addr))?;
        // Small requests, latency measured: no Nagle delay.
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(IO_TIMEOUT))?;
        tcp.set_write_timeout(Some(IO_TIMEOUT))?;
        self.stream = Some(BufReader::with_capacity(16 * 1024, tcp));
        Ok(())
    }

    /// Sends one request and reads the whole answer: its status and body.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        self.request.clear();
        write!(
            self.request,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n",
            self.host
        )?;
        if !body.is_empty() || method == "POST" {
            write!(
                self.request,
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )?;
        }
        self.request.extend_from_slice(b"\r\n");
        self.request.extend_from_slice(body);
        let reused = self.stream.is_some();
        match self.exchange() {
            Ok(answer) => Ok(answer),
            // A kept-alive connection the server closed since: once more on a new one.
            Err(_) if reused => {
                self.stream = None;
                self.reconnects += 1;
                self.connect()?;
                self.exchange().inspect_err(|_| self.stream = None)
            }
            Err(e) => Err(e),
        }
    }

    fn exchange(&mut self) -> anyhow::Result<(u16, Vec<u8>)> {
        if self.stream.is_none() {
            self.connect()?;
        }
        let result = self.exchange_inner();
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    fn exchange_inner(&mut self) -> anyhow::Result<(u16, Vec<u8>)> {
        let Some(stream) = self.stream.as_mut() else {
            bail!("not connected");
        };
        stream.get_mut().write_all(&self.request)?;
        let line = &mut self.line;
        line.clear();
        if stream.read_line(line)? == 0 {
            bail!("the server closed the connection");
        }
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        loop {
            line.clear();
            if stream.read_line(line)? == 0 {
                bail!("the server closed the connection in the headers");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>().context("bad Content-Length")?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                stream.read_line(line)?;
                let size_text = line.trim_end().split(';').next().unwrap_or("");
                let size = usize::from_str_radix(size_text, 16)
                    .with_context(|| format!("bad chunk size {size_text:?}"))?;
                if size == 0 {
                    // Trailers, then the empty line.
                    loop {
                        line.clear();
                        if stream.read_line(line)? == 0 || line.trim_end().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                stream.read_exact(&mut body[start..])?;
                let mut crlf = [0u8; 2];
                stream.read_exact(&mut crlf)?;
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            stream.read_exact(&mut body)?;
        } else if status != 204 && status != 304 {
            // No length: the body runs to the end of the connection.
            stream.read_to_end(&mut body)?;
            close = true;
        }
        if close {
            self.stream = None;
        }
        Ok((status, body))
    }
}
