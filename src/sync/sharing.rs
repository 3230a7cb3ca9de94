//! Link sharing: the box's hub connection uses the shop's Internet line when it is free and
//! gives it back, within about one round trip, as soon as anything else needs it, so the
//! payment terminals on the same line never wait behind sync traffic.
//!
//! The signal is queueing delay: the round-trip time of the connection above its lowest
//! value. A line with nothing queued answers in its base RTT; every byte queued in the
//! modem's buffer adds to the RTT of every packet behind it, a terminal's included. The box
//! keeps what it adds under a few milliseconds ([`SharingParams::yield_above`]), far under
//! LEDBAT's 100 ms:
//!
//! - **downloads**: the box cannot slow the hub's sender, but it decides how much the hub may
//!   send: the TCP receive window, clamped (`TCP_WINDOW_CLAMP`) to the rate the controller
//!   allows times the base RTT, plus one segment. At or under one bandwidth-delay product no
//!   queue forms; the window is never opened beyond what the line carries.
//! - **uploads**: the box writes the TLS stream in segment-sized writes, each waiting for the
//!   pacer ([`Pacer`]) at the controller's rate, from the first byte on: no burst at the start
//!   of a request and nothing for the modem to queue.
//!
//! Each direction has its own [`RateControl`]: once per round trip (an epoch) it looks at
//! the lowest queueing delay seen in the epoch and the bytes delivered, and grows (a queue
//! under `grow_below`, and the transfer limited by the controller itself), holds, or yields
//! (a queue over `yield_above`): down to what was delivered, scaled by how much the queue
//! exceeds the target, so another device's bulk transfer (which fills the modem's buffer)
//! takes the line from the box within a few round trips. The capacity learned when the box
//! had the line to itself is kept, so the box goes back to it quickly once the line is free,
//! and settles at [`SharingParams::headroom`] of it; every few seconds it probes a little
//! above, to follow a line that got faster.
//!
//! Everything here is a pure function of the samples given: the socket reads (`TCP_INFO`),
//! the window clamp and the timers are in `link.rs` and `tcp.rs`. The unit tests drive the
//! controller against a simulated line with a modem buffer and a competing transfer.

use std::collections::VecDeque;
use std::time::Duration;

use super::tcp::TcpInfo;

/// The controller's settings: `[hub] link_sharing` and the configured caps.
#[derive(Debug, Clone, PartialEq)]
pub struct SharingParams {
    /// A transfer limited by the controller may speed up while the queueing delay it sees
    /// stays under this.
    pub grow_below: Duration,
    /// The controller slows down when the queueing delay goes over this.
    pub yield_above: Duration,
    /// The share of the learned line capacity the box settles at.
    pub headroom: f64,
    /// Configured caps, bytes per second: ceilings of the controller's rates.
    pub upload_cap: Option<u64>,
    pub download_cap: Option<u64>,
}

impl Default for SharingParams {
    fn default() -> Self {
        SharingParams {
            grow_below: Duration::from_millis(2),
            yield_above: Duration::from_millis(5),
            headroom: 0.9,
            upload_cap: None,
            download_cap: None,
        }
    }
}

/// Bytes a packet costs the line beyond its TCP payload: IPv4 and TCP headers with
/// timestamps, and the Ethernet header a modem's shaper counts.
pub const PACKET_OVERHEAD: usize = 20 + 32 + 14;

/// The largest receive window the controller opens. The box asks for a receive buffer of
/// about the first window before connecting, so the first window the hub sees is small (the
/// kernel offers the whole buffer at the handshake and never takes an offer back): that
/// leaves the window scale at zero, and the window at most 64 KiB, a bandwidth-delay product
/// of 17 Mbit/s at a 30 ms RTT, 50 Mbit/s at 10 ms.
pub const MAX_WINDOW: u32 = 65_535;

/// The first receive window of a connection: the settled window when the line is known,
/// else eight segments (under one bandwidth-delay product from 3 Mbit/s at a 30 ms RTT).
pub fn first_window(memory: &Memory, params: &SharingParams) -> u32 {
    const SEGMENT: f64 = 1448.0;
    let window = match (memory.download_line, memory.base_rtt) {
        (Some(line), Some(base)) => line * params.headroom * base.as_secs_f64() + SEGMENT,
        _ => 8.0 * SEGMENT,
    };
    (window as u32).clamp(2 * SEGMENT as u32, MAX_WINDOW)
}

/// What a decision was, for the logs and the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Faster: no queue and the transfer held back by the controller.
    Grow,
    /// No change.
    Hold,
    /// Slower: a queue above the target.
    Yield,
}

/// One direction's rate, decided once per epoch (about one round trip).
#[derive(Debug, Clone)]
pub struct RateControl {
    rate: f64,
    floor: f64,
    ceiling: f64,
    /// Highest delivery rate measured with a queue standing: the line's size when nothing
    /// else used it (0: not known yet).
    line: f64,
    /// Startup: the line's size not measured yet; the rate grows by `startup_gain` per
    /// epoch.
    startup: bool,
    startup_gain: f64,
    /// Startup also ends on three samples in a row over `grow_below`.
    exit_on_run: bool,
    epoch: Epoch,
    /// After a cut, until its effect can show (one round trip), and the queue then.
    draining: Option<(Duration, Duration)>,
    /// Epochs at the settled rate since the last cut or probe.
    quiet: u32,
    /// Recent (time, bytes delivered), for the delivery rate over the last round trips.
    deliveries: VecDeque<(Duration, u64)>,
    /// When the transfer was last held back by the controller.
    last_limited: Option<Duration>,
}

#[derive(Debug, Clone, Default)]
struct Epoch {
    start: Duration,
    delivered: u64,
    min_queue: Option<Duration>,
    max_queue: Duration,
    /// Consecutive samples over `yield_above`, over `grow_below`, and all samples.
    over: u32,
    queued: u32,
    samples: u32,
    limited: bool,
    loss: bool,
}

/// Startup growth per epoch: downloads (many RTT samples, from the kernel's estimate) and
/// uploads (one sample per ACK, every other packet: few per epoch on a slow uplink, so a
/// gentler climb keeps the overshoot small).
pub const STARTUP_DOWN: f64 = 1.25;
pub const STARTUP_UP: f64 = 1.1;
/// Growth per epoch recovering towards the learned line, and probing beyond it.
const RECOVER_GAIN: f64 = 1.15;
const PROBE_GAIN: f64 = 1.02;
/// Quiet epochs at the settled rate before probing above it.
const PROBE_AFTER: u32 = 4;
/// Samples over the limit that end an epoch early: a queue is building now.
const OVER_SAMPLES: u32 = 3;

impl RateControl {
    /// A controller starting at `rate` bytes per second, never under `floor` nor over
    /// `ceiling`; `known` is a line capacity learned earlier (then no startup).
    pub fn new(rate: f64, floor: f64, ceiling: f64, known: Option<f64>, now: Duration) -> Self {
        let ceiling = ceiling.max(floor);
        RateControl {
            startup_gain: STARTUP_DOWN,
            exit_on_run: false,
            rate: rate.clamp(floor, ceiling),
            floor,
            ceiling,
            line: known.unwrap_or(0.0),
            startup: known.is_none(),
            epoch: Epoch {
                start: now,
                ..Epoch::default()
            },
            draining: None,
            quiet: 0,
            deliveries: VecDeque::new(),
            last_limited: None,
        }
    }

    /// The same, growing by `gain` per epoch in startup, which also ends on three samples
    /// in a row over `grow_below` (for precise samples).
    pub fn with_gentle_startup(mut self, gain: f64) -> Self {
        self.startup_gain = gain;
        self.exit_on_run = true;
        self
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The line capacity learned so far, if any.
    pub fn line(&self) -> Option<f64> {
        (self.line > 0.0).then_some(self.line)
    }

    #[cfg(test)]
    pub fn in_startup(&self) -> bool {
        self.startup
    }

    /// A queueing-delay sample.
    pub fn queue_sample(&mut self, queue: Duration, params: &SharingParams) {
        let e = &mut self.epoch;
        e.min_queue = Some(e.min_queue.map_or(queue, |m| m.min(queue)));
        e.max_queue = e.max_queue.max(queue);
        e.samples += 1;
        if queue >= params.grow_below {
            e.queued += 1;
        } else {
            e.queued = 0;
        }
        if queue > params.yield_above {
            e.over += 1;
        } else {
            e.over = 0;
        }
    }

    /// The transfer was held back by this controller at `now` (a write waited for the
    /// pacer, or the hub filled the window offered).
    pub fn limited(&mut self, now: Duration) {
        self.epoch.limited = true;
        self.last_limited = Some(now);
    }

    /// A packet was lost on this direction.
    pub fn loss(&mut self) {
        self.epoch.loss = true;
    }

    /// Bytes per second delivered over about `span` before `now`.
    fn delivery_rate(&self, now: Duration, span: Duration) -> Option<f64> {
        let (t1, d1) = *self.deliveries.back()?;
        let (t0, d0) = self
            .deliveries
            .iter()
            .find(|(t, _)| now.saturating_sub(*t) <= span)
            .copied()?;
        let secs = t1.saturating_sub(t0).as_secs_f64();
        (secs >= span.as_secs_f64() / 2.0).then(|| d1.saturating_sub(d0) as f64 / secs)
    }

    /// Ends the epoch when it is `length` old (or early, when a queue builds now or a packet
    /// was lost), given the bytes delivered so far; answers the decision when one was made.
    pub fn tick(
        &mut self,
        now: Duration,
        delivered: u64,
        length: Duration,
        params: &SharingParams,
    ) -> Option<Verdict> {
        self.deliveries.push_back((now, delivered));
        let keep = (4 * length).max(Duration::from_millis(400));
        while self
            .deliveries
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) > keep)
        {
            self.deliveries.pop_front();
        }
        let elapsed = now.saturating_sub(self.epoch.start);
        let building = self.epoch.over >= OVER_SAMPLES && elapsed >= length / 4;
        if elapsed < length && !building && !self.epoch.loss {
            return None;
        }
        let epoch = std::mem::replace(
            &mut self.epoch,
            Epoch {
                start: now,
                delivered,
                ..Epoch::default()
            },
        );
        // What was delivered measures the line only when the controller was what held the
        // transfer back (else it measures the application), over the last two round trips:
        // with a queue standing, the line was busy, and what arrived is what it carries (two,
        // so bunched ACKs do not count twice).
        let span = (2 * length).max(Duration::from_millis(150));
        let measured = self.delivery_rate(now, span).filter(|_| {
            self.last_limited
                .is_some_and(|t| now.saturating_sub(t) <= span / 2)
        });
        if let Some((until, _)) = self.draining {
            if now >= until {
                self.draining = None;
            }
        }
        // Delivered is never more than the line: a measurement above the estimate raises it.
        if let Some(m) = measured {
            if !self.startup && self.line > 0.0 && m > self.line {
                self.line = m;
            }
        }
        let verdict = match epoch.min_queue {
            _ if epoch.loss => {
                self.cut(now, measured, None, length, params);
                Verdict::Yield
            }
            // In startup, the first standing queue ends it: the line is full, and what arrived
            // meanwhile is its size. A whole epoch of it, or for uploads (precise samples of
            // paced packets, few per epoch) three samples in a row; a download's samples
            // also see the hub's bursts.
            Some(q)
                if self.startup
                    && ((q >= params.grow_below && epoch.samples >= 2)
                        || (self.exit_on_run && epoch.queued >= 3)) =>
            {
                self.cut(now, measured, Some(q), length, params);
                Verdict::Yield
            }
            Some(q) if q > params.yield_above && epoch.samples >= 2 => match self.draining {
                // The last cut has not shown yet: wait for it, unless the queue grows on.
                Some((_, at)) if q <= 2 * at + params.yield_above => Verdict::Hold,
                _ => {
                    self.cut(now, measured, Some(q), length, params);
                    Verdict::Yield
                }
            },
            Some(_) if epoch.max_queue < params.grow_below && epoch.limited => {
                if self.draining.is_some() {
                    Verdict::Hold
                } else {
                    self.grow(params);
                    Verdict::Grow
                }
            }
            _ => {
                self.quiet += 1;
                Verdict::Hold
            }
        };
        Some(verdict)
    }

    fn cut(
        &mut self,
        now: Duration,
        measured: Option<f64>,
        queue: Option<Duration>,
        length: Duration,
        params: &SharingParams,
    ) {
        // What the box got through, its allowance in use, while a queue stood is what the
        // line gives it now; when it went at full speed, that is the line's size (which may
        // have shrunk). Without a measurement, the cut is from the current rate.
        // Never more than the box offered: bunched ACKs can show a moment's rate above it.
        let got = measured.filter(|m| *m > 0.0).map(|m| m.min(self.rate));
        if let Some(got) = got {
            if self.startup || self.line == 0.0 {
                self.line = got;
            } else if self.rate >= 0.8 * self.line {
                self.line = got.max(self.line * 0.95);
            }
        }
        self.startup = false;
        let scale = match queue {
            // Back to the target, in proportion to the excess: a few hundred ms of someone
            // else's queue takes the box to a fifth at once.
            Some(q) => {
                let target = params.yield_above.as_secs_f64() / 2.0;
                (1.0 / (1.0 + (q.as_secs_f64() - target).max(0.0) * 20.0)).clamp(0.2, 1.0)
            }
            None => 0.7,
        };
        let from = got.map_or(self.rate, |g| g.min(self.rate));
        self.rate = (from * params.headroom * scale).clamp(self.floor, self.ceiling);
        let q = queue.unwrap_or(Duration::ZERO);
        self.draining = Some((now + length + q, q));
        self.quiet = 0;
    }

    fn grow(&mut self, params: &SharingParams) {
        let settled = params.headroom * self.line;
        let gain = if self.startup {
            self.startup_gain
        } else if self.line == 0.0 {
            // Out of startup without a measurement: slowly, until the next queue measures.
            1.05
        } else if self.rate < settled * 0.98 {
            RECOVER_GAIN
        } else if self.quiet >= PROBE_AFTER {
            PROBE_GAIN
        } else {
            self.quiet += 1;
            1.0
        };
        let mut rate = self.rate * gain;
        if !self.startup && self.rate < settled {
            // Recovering: up to the settled rate, not past it in one step.
            rate = rate.min(settled);
        }
        self.rate = rate.clamp(self.floor, self.ceiling);
    }
}

/// A windowed minimum of RTT samples: the base RTT. Samples older than `span` leave the
/// window, so a route that got longer is learned within it.
#[derive(Debug, Clone)]
pub struct MinFilter {
    span: Duration,
    /// (bucket start, min) per `span / 8`.
    buckets: VecDeque<(Duration, Duration)>,
}

impl MinFilter {
    pub fn new(span: Duration) -> MinFilter {
        MinFilter {
            span,
            buckets: VecDeque::new(),
        }
    }

    pub fn add(&mut self, now: Duration, sample: Duration) {
        let width = self.span / 8;
        while self
            .buckets
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) > self.span)
        {
            self.buckets.pop_front();
        }
        match self.buckets.back_mut() {
            Some((t, m)) if now.saturating_sub(*t) < width => *m = (*m).min(sample),
            _ => self.buckets.push_back((now, sample)),
        }
    }

    pub fn get(&self) -> Option<Duration> {
        self.buckets.iter().map(|(_, m)| *m).min()
    }
}

/// A token bucket in bytes per second that lets one packet through at a time: writes are
/// cut to one segment and spaced by the rate, so the line sees packets, not bursts.
#[derive(Debug, Clone)]
pub struct Pacer {
    tokens: f64,
    last: Duration,
}

impl Pacer {
    /// A pacer that lets the first packet go at once.
    pub fn new(now: Duration) -> Pacer {
        Pacer {
            tokens: 0.0,
            last: now,
        }
    }

    /// None when a write may go now; else how long to wait. Rate in payload bytes per
    /// second. A write may go while the bucket is not in debt; after an idle spell the
    /// bucket holds at most 2 ms of the rate beyond one packet, so a first write never
    /// brings a burst.
    pub fn wait(&mut self, now: Duration, rate: f64, mss: usize) -> Option<Duration> {
        let depth = (rate * 0.002 - mss as f64).max(0.0);
        let elapsed = now.saturating_sub(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(depth);
        self.last = now;
        if self.tokens >= 0.0 {
            return None;
        }
        Some(Duration::from_secs_f64(
            (-self.tokens / rate.max(1.0)).max(0.000_2),
        ))
    }

    /// Charges a write of `n` payload bytes (one packet): a full segment costs `mss`, a
    /// smaller one its share of the line with its headers.
    pub fn spend(&mut self, n: usize, mss: usize) {
        let scale = mss as f64 / (mss + PACKET_OVERHEAD) as f64;
        self.tokens -=
            ((n + PACKET_OVERHEAD) as f64 * scale).min(n.max(1) as f64 + PACKET_OVERHEAD as f64);
    }
}

/// What the controller learned on a connection, kept by the link for the next one.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Memory {
    /// Base RTT of the line.
    pub base_rtt: Option<Duration>,
    /// Line capacity per direction, payload bytes per second.
    pub upload_line: Option<f64>,
    pub download_line: Option<f64>,
}

/// What a connection's controller wants applied to its socket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Targets {
    /// Receive window clamp, bytes.
    pub window: u32,
    /// Upload pacing rate, payload bytes per second.
    pub upload_rate: f64,
}

/// A live view of the controller, for the status.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    pub base_rtt_us: u64,
    pub queue_down_us: u64,
    pub queue_up_us: u64,
    pub window: u32,
    pub upload_rate: u64,
    pub download_rate: u64,
    pub upload_line: u64,
    pub download_line: u64,
}

/// One connection's controller: turns `TCP_INFO` readings and the box's own writes into a
/// receive window and an upload rate.
#[derive(Debug)]
pub struct Meter {
    params: SharingParams,
    mss: usize,
    rcv_mss: usize,
    /// The box's writes: (end offset in bytes written, when, part of a paced stream), to
    /// time each ACK.
    writes: VecDeque<(u64, Duration, bool)>,
    /// When a write last waited for the pacer.
    last_wait: Option<Duration>,
    /// The kernel's receiver RTT estimate last read, and the ACKs sent by then.
    rcv_rtt: (u32, u32),
    written: u64,
    /// `bytes_acked` when the connection opened (the SYN may count).
    acked_base: u64,
    last: TcpInfo,
    base_snd: MinFilter,
    base_rcv: MinFilter,
    queue_up: Duration,
    queue_down: Duration,
    up: RateControl,
    down: RateControl,
    /// Writes waited for the pacer since the last reading.
    backlogged: bool,
    window: u32,
}

/// How long a base RTT is remembered.
const BASE_SPAN: Duration = Duration::from_secs(600);
/// Epochs are never shorter than this: the box's samples come every few milliseconds.
const MIN_EPOCH: Duration = Duration::from_millis(20);

impl Meter {
    /// A controller for a connection that just opened, `info` read right after `connect`.
    pub fn new(params: SharingParams, memory: &Memory, info: &TcpInfo, now: Duration) -> Meter {
        // The path's segment size, both ways: the kernel's receive-side estimate starts at
        // 536 bytes until segments arrive, and a window under one of the hub's segments
        // would stall it (loopback's are 64 KiB).
        let mss = (info.snd_mss as usize).clamp(536, 65_535);
        let rcv_mss = (info.rcv_mss as usize).max(mss).clamp(536, 65_535);
        let handshake =
            (info.min_rtt_us > 0).then(|| Duration::from_micros(info.min_rtt_us.into()));
        let base = match (memory.base_rtt, handshake) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(Duration::from_millis(50)),
        };
        let mut base_snd = MinFilter::new(BASE_SPAN);
        base_snd.add(now, base);
        let base_rcv = MinFilter::new(BASE_SPAN);
        let secs = base.as_secs_f64().max(0.001);
        // Without a learned capacity: a window of eight segments down (under one
        // bandwidth-delay product from 3 Mbit/s at a 30 ms RTT) and two segments per base
        // RTT up, then startup. With one: the settled rate at once.
        let cap = |c: Option<u64>| c.map_or(f64::MAX, |c| c as f64);
        let down_floor = (2 * rcv_mss) as f64 / secs.max(0.02);
        // Four segments a second, at least 4 KB/s: a few percent of the slowest uplink.
        let up_floor = (4 * mss).max(4_000) as f64;
        let down = RateControl::new(
            memory
                .download_line
                .map_or((7 * rcv_mss) as f64 / secs, |l| l * params.headroom),
            down_floor,
            cap(params.download_cap).min(MAX_WINDOW as f64 / secs),
            memory.download_line,
            now,
        );
        let up = RateControl::new(
            memory
                .upload_line
                .map_or((2 * mss) as f64 / secs, |l| l * params.headroom),
            up_floor,
            cap(params.upload_cap),
            memory.upload_line,
            now,
        )
        .with_gentle_startup(STARTUP_UP);
        let mut meter = Meter {
            params,
            mss,
            rcv_mss,
            writes: VecDeque::new(),
            written: 0,
            acked_base: info.bytes_acked,
            last: *info,
            base_snd,
            base_rcv,
            queue_up: Duration::ZERO,
            queue_down: Duration::ZERO,
            up,
            down,
            backlogged: false,
            window: 0,
            last_wait: None,
            rcv_rtt: (0, 0),
        };
        meter.window = meter.window_for(meter.down.rate());
        meter
    }

    /// Segment size of the box's writes.
    pub fn mss(&self) -> usize {
        self.mss
    }

    pub fn targets(&self) -> Targets {
        Targets {
            window: self.window,
            upload_rate: self.up.rate(),
        }
    }

    fn base(&self) -> Duration {
        self.base_snd.get().unwrap_or(Duration::from_millis(50))
    }

    fn window_for(&self, rate: f64) -> u32 {
        let base = self.base_rcv.get().map_or(self.base(), |r| {
            r.min(self.base() + Duration::from_millis(2))
        });
        let w = rate * base.as_secs_f64() + self.rcv_mss as f64;
        let floor = (2 * self.rcv_mss as u32).min(MAX_WINDOW);
        (w as u32).clamp(floor, MAX_WINDOW)
    }

    /// The box wrote `n` bytes at `now`.
    pub fn wrote(&mut self, now: Duration, n: usize) {
        self.written += n as u64;
        if self.writes.len() >= 4096 {
            self.writes.pop_front();
        }
        // Part of a paced stream: the hub acknowledges every other segment at once. A lone
        // write's ACK may wait for the hub's delayed-ACK timer or its answer, and time the
        // hub rather than the line.
        let bulk = self
            .last_wait
            .is_some_and(|w| now.saturating_sub(w) < Duration::from_millis(50));
        self.writes.push_back((self.written, now, bulk));
    }

    /// A write waited for the pacer.
    pub fn backlogged(&mut self, now: Duration) {
        self.backlogged = true;
        self.last_wait = Some(now);
    }

    /// A `TCP_INFO` reading at `now`: updates both directions; answers the targets when
    /// one of them changed.
    pub fn observe(&mut self, now: Duration, info: &TcpInfo) -> Option<Targets> {
        let before = self.targets();
        let last = self.last;
        self.last = *info;
        let params = self.params.clone();

        // Uploads: the box's own paced writes, timed from write to ACK (the latest segment
        // an ACK covers): a precise RTT sample per ACK.
        let acked = info.bytes_acked.saturating_sub(self.acked_base);
        let mut snd_sample = None;
        while let Some(&(end, at, bulk)) = self.writes.front() {
            if end > acked {
                break;
            }
            self.writes.pop_front();
            snd_sample = bulk.then(|| now.saturating_sub(at));
        }
        if self.writes.is_empty() {
            // The last write of a burst: its ACK may have waited for the hub's delayed-ACK
            // timer or its answer.
            snd_sample = None;
        }
        if let Some(rtt) = snd_sample {
            self.base_snd.add(now, rtt);
            let q = rtt.saturating_sub(self.base());
            self.queue_up = q;
            self.up.queue_sample(q, &params);
        }
        // Downloads: the receiver's estimate, per ACK the box sends, from the timestamps
        // the hub echoes on full-sized segments (1 ms resolution). The kernel takes a lower
        // sample at once but smooths a higher one (gain 1/8): the rise is undone here, over
        // the ACKs the box sent meanwhile, so a queue shows within a sample or two rather
        // than eight.
        let acks = info.segs_out.wrapping_sub(info.data_segs_out);
        if info.rcv_rtt_us > 0 && info.rcv_rtt_us != self.rcv_rtt.0 {
            let (before, acks_before) = self.rcv_rtt;
            let sample = if before == 0 || info.rcv_rtt_us < before {
                info.rcv_rtt_us
            } else {
                let k = acks.wrapping_sub(acks_before).clamp(1, 64);
                let rise = 8 * (info.rcv_rtt_us - before) / k;
                (before + rise).clamp(info.rcv_rtt_us, info.rcv_rtt_us + 200_000)
            };
            self.rcv_rtt = (info.rcv_rtt_us, acks);
            if info.bytes_received > last.bytes_received {
                let rtt = Duration::from_micros(sample.into());
                self.base_rcv.add(now, rtt);
                let q = rtt.saturating_sub(self.base_rcv.get().unwrap_or(rtt));
                self.queue_down = q;
                self.down.queue_sample(q, &params);
            }
        } else if info.bytes_received >= last.bytes_received + u64::from(info.rcv_mss.max(536))
            && info.rcv_rtt_us > 0
        {
            // Data flows and the estimate holds: the last sample stands.
            self.down.queue_sample(self.queue_down, &params);
        }
        if info.total_retrans > last.total_retrans || info.lost > last.lost {
            self.up.loss();
        }
        if info.rcv_ooopack > last.rcv_ooopack {
            self.down.loss();
        }

        let base = self.base();
        if std::mem::take(&mut self.backlogged) {
            self.up.limited(now);
        }
        // The hub filled most of the window offered during the last RTT: the window is what
        // limits it.
        let rtt = base + self.queue_down;
        let span = now.saturating_sub(self.down.epoch.start);
        if span >= rtt / 2 {
            let got = info
                .bytes_received
                .saturating_sub(self.down.epoch.delivered) as f64;
            let offered = self.window as f64 * span.as_secs_f64() / rtt.as_secs_f64().max(1e-3);
            if got >= 0.6 * offered {
                self.down.limited(now);
            }
        }
        let down_len = (base + self.queue_down).max(MIN_EPOCH);
        let up_len = (base + self.queue_up).max(MIN_EPOCH);
        let dv = self.down.tick(now, info.bytes_received, down_len, &params);
        let uv = self.up.tick(now, acked, up_len, &params);
        if let Some(v) = dv {
            tracing::trace!(
                "link sharing down {v:?}: queue {:?}, rate {:.0} B/s, window {}",
                self.queue_down,
                self.down.rate(),
                self.window
            );
        }
        if let Some(v) = uv {
            tracing::trace!(
                "link sharing up {v:?}: queue {:?}, rate {:.0} B/s",
                self.queue_up,
                self.up.rate()
            );
        }
        self.window = self.window_for(self.down.rate());
        let after = self.targets();
        (after != before).then_some(after)
    }

    /// What this connection learned, for the next one.
    pub fn memory(&self) -> Memory {
        Memory {
            base_rtt: self.base_snd.get(),
            upload_line: self.up.line(),
            download_line: self.down.line(),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            base_rtt_us: self.base().as_micros() as u64,
            queue_down_us: self.queue_down.as_micros() as u64,
            queue_up_us: self.queue_up.as_micros() as u64,
            window: self.window,
            upload_rate: self.up.rate() as u64,
            download_rate: self.down.rate() as u64,
            upload_line: self.up.line().unwrap_or(0.0) as u64,
            download_line: self.down.line().unwrap_or(0.0) as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A fluid model of the shop's line in one direction: a FIFO buffer drained at `capacity`
    /// bytes per second, a base RTT, the box's flow sent at the controller's rate, and
    /// optionally another device's bulk transfer that keeps the modem buffer full.
    struct Line {
        capacity: f64,
        base: Duration,
        buffer: Duration,
        queue: f64,
        delivered_box: f64,
        delivered_other: f64,
        /// Queue delay history: (time, delay), to compute the delay the RTT reports one
        /// base RTT later.
        history: VecDeque<(Duration, Duration)>,
    }

    impl Line {
        fn new(capacity: f64, base: Duration, buffer: Duration) -> Line {
            Line {
                capacity,
                base,
                buffer,
                queue: 0.0,
                delivered_box: 0.0,
                delivered_other: 0.0,
                history: VecDeque::new(),
            }
        }

        /// One step of `dt`: the box offers `rate`, the other device (when on) offers as much
        /// as the buffer takes. Answers the queueing delay an ACK arriving now reports.
        fn step(&mut self, now: Duration, dt: Duration, rate: f64, other: bool) -> Duration {
            let s = dt.as_secs_f64();
            let limit = self.capacity * self.buffer.as_secs_f64();
            let mut box_in = rate * s;
            let other_in = if other {
                (limit - self.queue + self.capacity * s).max(0.0)
            } else {
                0.0
            };
            let room = (limit - self.queue + self.capacity * s).max(0.0);
            if box_in + other_in > room {
                // Tail drop, shared in proportion.
                let k = room / (box_in + other_in);
                box_in *= k;
            }
            let total_in = box_in + other_in.min(room);
            self.queue += total_in;
            let out = (self.capacity * s).min(self.queue);
            let box_share = if total_in > 0.0 {
                box_in / total_in
            } else {
                1.0
            };
            self.delivered_box += out * box_share;
            self.delivered_other += out * (1.0 - box_share);
            self.queue -= out;
            let delay = Duration::from_secs_f64(self.queue / self.capacity);
            self.history.push_back((now, delay));
            // The RTT seen now is that of a packet that queued one base RTT ago.
            while self.history.len() > 1 && now.saturating_sub(self.history[1].0) >= self.base {
                self.history.pop_front();
            }
            self.history.front().map_or(Duration::ZERO, |(_, d)| *d)
        }
    }

    struct Run {
        rates: Vec<(Duration, f64)>,
        delays: Vec<(Duration, Duration)>,
        box_bytes: Vec<(Duration, f64)>,
    }

    /// The controller against the line, sampled every 2 ms, for `secs`; the other device
    /// transfers during `other`.
    fn run(line: &mut Line, secs: f64, other: std::ops::Range<f64>) -> Run {
        let params = SharingParams::default();
        let dt = 2 * MS;
        let mut c = RateControl::new(20_000.0, 2_000.0, 1e9, None, Duration::ZERO);
        let mut out = Run {
            rates: Vec::new(),
            delays: Vec::new(),
            box_bytes: Vec::new(),
        };
        let mut now = Duration::ZERO;
        while now.as_secs_f64() < secs {
            now += dt;
            let t = now.as_secs_f64();
            let q = line.step(now, dt, c.rate(), other.contains(&t));
            c.queue_sample(q, &params);
            // Backlogged: a bulk transfer always has more to send than the rate allows.
            c.limited(now);
            c.tick(now, line.delivered_box as u64, line.base + q, &params);
            if std::env::var("SHARING_TRACE").is_ok() && (now.as_millis() % 100 == 0) {
                eprintln!(
                    "{:6.2} rate {:8.0} q {:?} startup {}",
                    t,
                    c.rate(),
                    q,
                    c.in_startup()
                );
            }
            out.rates.push((now, c.rate()));
            out.delays
                .push((now, Duration::from_secs_f64(line.queue / line.capacity)));
            out.box_bytes.push((now, line.delivered_box));
        }
        out
    }

    fn between<T: Copy>(v: &[(Duration, T)], from: f64, to: f64) -> Vec<T> {
        v.iter()
            .filter(|(t, _)| (from..to).contains(&t.as_secs_f64()))
            .map(|(_, x)| *x)
            .collect()
    }

    fn p95(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v[(v.len() * 95 / 100).min(v.len() - 1)]
    }

    fn throughput(run: &Run, from: f64, to: f64) -> f64 {
        let b = between(&run.box_bytes, from, to);
        (b[b.len() - 1] - b[0]) / (to - from)
    }

    #[test]
    fn alone_on_the_line_it_fills_it_with_a_queue_of_a_few_ms() {
        for (capacity, base_ms) in [(500_000.0, 40), (125_000.0, 40), (2_500_000.0, 30)] {
            let mut line = Line::new(capacity, base_ms * MS, 400 * MS);
            let r = run(&mut line, 30.0, 0.0..0.0);
            let used = throughput(&r, 5.0, 30.0) / capacity;
            let delay = p95(between(&r.delays, 5.0, 30.0));
            assert!(used >= 0.85, "{capacity}: used {used:.2}");
            assert!(delay <= 8 * MS, "{capacity}: p95 queue {delay:?}");
            // Startup does not flood the buffer either.
            let start = p95(between(&r.delays, 0.0, 5.0));
            assert!(start <= 15 * MS, "{capacity}: startup p95 queue {start:?}");
        }
    }

    #[test]
    fn it_gives_way_to_another_device_within_two_seconds_and_comes_back() {
        let capacity = 500_000.0;
        let mut line = Line::new(capacity, 40 * MS, 400 * MS);
        let r = run(&mut line, 40.0, 10.0..25.0);
        let before = throughput(&r, 5.0, 10.0) / capacity;
        assert!(before >= 0.85, "before: {before:.2}");
        // Within 2 s of the other transfer starting, the box's share is under 20 %.
        let share = throughput(&r, 11.5, 12.5) / capacity;
        assert!(share < 0.2, "share after 1.5-2.5 s: {share:.3}");
        let during = throughput(&r, 12.0, 25.0) / capacity;
        assert!(during < 0.1, "share during: {during:.3}");
        // And back to most of the line within a few seconds of it ending.
        let after = throughput(&r, 28.0, 40.0) / capacity;
        assert!(after >= 0.8, "after: {after:.2}");
    }

    #[test]
    fn the_rate_never_leaves_its_floor_and_ceiling() {
        let params = SharingParams::default();
        let mut c = RateControl::new(1e6, 5_000.0, 50_000.0, None, Duration::ZERO);
        assert_eq!(c.rate(), 50_000.0);
        for i in 1..200u64 {
            c.queue_sample(Duration::ZERO, &params);
            c.limited(MS * (i as u32) * 50);
            c.tick(MS * (i as u32) * 50, i * 1000, 40 * MS, &params);
            assert!(c.rate() <= 50_000.0);
        }
        for i in 200..400u64 {
            c.queue_sample(500 * MS, &params);
            c.queue_sample(500 * MS, &params);
            c.tick(MS * (i as u32) * 50, i * 1000, 40 * MS, &params);
            assert!(c.rate() >= 5_000.0);
        }
        assert_eq!(c.rate(), 5_000.0);
    }

    #[test]
    fn an_application_limited_transfer_does_not_grow() {
        let params = SharingParams::default();
        let mut c = RateControl::new(10_000.0, 1_000.0, 1e9, None, Duration::ZERO);
        for i in 1..100u64 {
            c.queue_sample(Duration::ZERO, &params);
            c.tick(MS * (i as u32) * 50, i * 100, 40 * MS, &params);
        }
        assert_eq!(c.rate(), 10_000.0);
    }

    #[test]
    fn the_pacer_spaces_packets_at_the_rate_without_a_first_burst() {
        let mss = 1448;
        let rate = 100_000.0;
        let mut p = Pacer::new(Duration::ZERO);
        let mut now = Duration::ZERO;
        let mut sent = Vec::new();
        while sent.len() < 50 {
            match p.wait(now, rate, mss) {
                None => {
                    p.spend(mss, mss);
                    sent.push(now);
                }
                Some(w) => now += w,
            }
        }
        // One packet at once, then one every mss / rate.
        assert_eq!(sent[0], Duration::ZERO);
        assert!(sent[1] > 10 * MS, "{:?}", sent[1]);
        let took = sent[49].as_secs_f64();
        let expected = 49.0 * mss as f64 / rate;
        assert!((took - expected).abs() < 0.01, "{took} vs {expected}");
    }

    #[test]
    fn the_min_filter_forgets_old_samples() {
        let mut f = MinFilter::new(Duration::from_secs(80));
        f.add(Duration::ZERO, 10 * MS);
        f.add(Duration::from_secs(5), 30 * MS);
        assert_eq!(f.get(), Some(10 * MS));
        f.add(Duration::from_secs(100), 40 * MS);
        assert_eq!(f.get(), Some(40 * MS));
    }

    #[test]
    fn the_meter_times_acks_of_its_own_writes() {
        let info = TcpInfo {
            state: 1,
            snd_mss: 1448,
            rcv_mss: 1448,
            min_rtt_us: 40_000,
            bytes_acked: 1,
            ..TcpInfo::default()
        };
        let mut m = Meter::new(
            SharingParams::default(),
            &Memory::default(),
            &info,
            Duration::ZERO,
        );
        let w0 = m.targets().window;
        assert!((2 * 1448..=9 * 1448).contains(&w0), "{w0}");
        m.backlogged(Duration::from_millis(5));
        m.wrote(Duration::from_millis(10), 1448);
        m.wrote(Duration::from_millis(20), 1448);
        let mut later = info;
        later.bytes_acked = 1 + 1448;
        later.unacked = 1;
        m.observe(Duration::from_millis(75), &later);
        // 65 ms from write to ACK over a 40 ms base: 25 ms of queue, upwards.
        assert_eq!(m.snapshot().queue_up_us, 25_000);
        assert_eq!(m.snapshot().base_rtt_us, 40_000);
    }
}
