//! The two Linux TCP socket options the link-sharing controller needs and no safe crate in
//! the tree offers: reading `TCP_INFO` (RTT, bytes acknowledged and received, MSS) and
//! setting `TCP_WINDOW_CLAMP` (the largest receive window the box advertises).
//!
//! **This is the only module of the box with `unsafe` code** (the workspace denies it
//! everywhere else): two `libc` calls, each on a descriptor borrowed for the call and a buffer
//! owned by the caller, sized and checked here. `TCP_INFO` is read into a plain byte buffer
//! and decoded field by field at the kernel's documented offsets (`struct tcp_info` in
//! `linux/tcp.h`, which only ever grows at its end): a kernel that fills fewer bytes leaves
//! the newer fields at zero, and no Rust struct is ever transmuted from kernel memory.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// What the controller reads of `struct tcp_info`. Times in microseconds, sizes in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpInfo {
    /// Kernel TCP state (1: established).
    pub state: u8,
    /// The last delivery-rate sample was limited by the application, not the network.
    pub app_limited: bool,
    /// Sending and receiving maximum segment sizes.
    pub snd_mss: u32,
    pub rcv_mss: u32,
    /// Segments sent and not acknowledged yet, and of those the ones thought lost.
    pub unacked: u32,
    pub lost: u32,
    /// Retransmissions over the connection's life.
    pub total_retrans: u32,
    /// Smoothed RTT of the box's own sends (per ACK, gain 1/8) and its variation.
    pub rtt_us: u32,
    pub rttvar_us: u32,
    /// RTT as the receiver sees it: from the box's ACK to the data it let in (timestamps,
    /// 1 ms resolution).
    pub rcv_rtt_us: u32,
    /// Lowest RTT the kernel has seen on this connection (windowed).
    pub min_rtt_us: u32,
    pub snd_cwnd: u32,
    /// Bytes of this side's data the peer acknowledged, and of the peer's data received in
    /// order, since the connection opened.
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// Segments sent (pure ACKs included) and data segments sent, since the connection
    /// opened: their difference counts the ACKs this side sent.
    pub segs_out: u32,
    pub data_segs_out: u32,
    /// Bytes written by the application and not sent yet.
    pub notsent_bytes: u32,
    /// The kernel's delivery-rate estimate of this side's sends, bytes per second.
    pub delivery_rate: u64,
    /// Packets received out of order (a hole: something was lost on the way in).
    pub rcv_ooopack: u32,
    /// The window this side advertises, after scaling (kernels since 6.1; else 0).
    pub rcv_wnd: u32,
}

/// Size of the buffer `TCP_INFO` is read into: larger than any `struct tcp_info` to date.
const INFO_BUF: usize = 512;

fn u32_at(buf: &[u8], len: usize, offset: usize) -> u32 {
    if offset + 4 > len {
        return 0;
    }
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[offset..offset + 4]);
    u32::from_ne_bytes(b)
}

fn u64_at(buf: &[u8], len: usize, offset: usize) -> u64 {
    if offset + 8 > len {
        return 0;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[offset..offset + 8]);
    u64::from_ne_bytes(b)
}

/// Decodes the bytes the kernel filled (`len` of them) at `struct tcp_info`'s offsets.
fn decode(buf: &[u8], len: usize) -> TcpInfo {
    let byte = |offset: usize| if offset < len { buf[offset] } else { 0 };
    TcpInfo {
        state: byte(0),
        app_limited: byte(7) & 1 == 1,
        snd_mss: u32_at(buf, len, 16),
        rcv_mss: u32_at(buf, len, 20),
        unacked: u32_at(buf, len, 24),
        lost: u32_at(buf, len, 32),
        rtt_us: u32_at(buf, len, 68),
        rttvar_us: u32_at(buf, len, 72),
        snd_cwnd: u32_at(buf, len, 80),
        rcv_rtt_us: u32_at(buf, len, 92),
        total_retrans: u32_at(buf, len, 100),
        bytes_acked: u64_at(buf, len, 120),
        bytes_received: u64_at(buf, len, 128),
        segs_out: u32_at(buf, len, 136),
        data_segs_out: u32_at(buf, len, 156),
        notsent_bytes: u32_at(buf, len, 144),
        min_rtt_us: u32_at(buf, len, 148),
        delivery_rate: u64_at(buf, len, 160),
        rcv_ooopack: u32_at(buf, len, 224),
        rcv_wnd: u32_at(buf, len, 232),
    }
}

/// Reads `TCP_INFO` of a TCP socket.
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    let mut buf = [0u8; INFO_BUF];
    let mut len = INFO_BUF as libc::socklen_t;
    // SAFETY: `fd` is an open descriptor for the duration of the call (it is borrowed);
    // `buf` is a live, writable local of `INFO_BUF` bytes and `len` says so, so the kernel
    // writes at most that many bytes into it and stores the count it wrote in `len`, a live
    // local too. No pointer outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(decode(&buf, (len as usize).min(INFO_BUF)))
}

/// Sets `TCP_WINDOW_CLAMP`: the receive window the socket advertises stays at or under
/// `bytes` (the kernel raises anything under half its minimum buffer, about 1.1 KB). The
/// window already offered is never taken back: a smaller clamp holds from the next window.
pub fn set_window_clamp(fd: BorrowedFd<'_>, bytes: u32) -> io::Result<()> {
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP, bytes)
}

/// Reads `TCP_WINDOW_CLAMP` back.
#[cfg(test)]
pub fn window_clamp(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is open for the call (borrowed); `value` and `len` are live locals of the
    // size given, so the kernel writes at most `size_of::<c_int>()` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_WINDOW_CLAMP,
            (&mut value as *mut libc::c_int).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::try_from(value).unwrap_or(0))
}

fn set_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: u32,
) -> io::Result<()> {
    let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fd` is open for the call (borrowed); the kernel reads `size_of::<c_int>()`
    // bytes from `value`, a live local of exactly that size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        (client, server)
    }

    #[test]
    fn tcp_info_counts_what_crossed_the_socket() {
        let (mut client, mut server) = pair();
        let before = tcp_info(client.as_fd()).expect("tcp_info");
        assert_eq!(before.state, 1, "established");
        assert!(before.snd_mss > 0 && before.rcv_mss > 0, "{before:?}");
        client.write_all(&[7u8; 100_000]).expect("write");
        let mut got = vec![0u8; 100_000];
        server.read_exact(&mut got).expect("read");
        server.write_all(&[1u8; 5_000]).expect("write back");
        let mut back = [0u8; 5_000];
        client.read_exact(&mut back).expect("read back");
        // The ACK of the last bytes may still be on its way on loopback.
        let mut info = tcp_info(client.as_fd()).expect("tcp_info");
        for _ in 0..100 {
            if info.bytes_acked >= before.bytes_acked + 100_000 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
            info = tcp_info(client.as_fd()).expect("tcp_info");
        }
        assert!(
            info.bytes_acked >= before.bytes_acked + 100_000,
            "{before:?} {info:?}"
        );
        assert_eq!(
            info.bytes_received,
            before.bytes_received + 5_000,
            "{info:?}"
        );
        assert!(info.rtt_us > 0 && info.min_rtt_us > 0, "{info:?}");
        assert!(
            info.segs_out > info.data_segs_out && info.data_segs_out > 0,
            "{info:?}"
        );
        assert!(info.min_rtt_us <= info.rtt_us + info.rttvar_us, "{info:?}");
        let server_info = tcp_info(server.as_fd()).expect("tcp_info");
        assert_eq!(server_info.bytes_received, 100_000, "{server_info:?}");
    }

    #[test]
    fn the_window_clamp_is_set_and_read_back() {
        let (client, _server) = pair();
        set_window_clamp(client.as_fd(), 20_000).expect("set");
        assert_eq!(window_clamp(client.as_fd()).expect("get"), 20_000);
        // Under the kernel's floor: raised to it, never zero.
        set_window_clamp(client.as_fd(), 10).expect("set");
        let floor = window_clamp(client.as_fd()).expect("get");
        assert!((10..4096).contains(&floor) && floor > 10, "{floor}");
    }

    #[test]
    fn a_short_tcp_info_leaves_newer_fields_at_zero() {
        let mut buf = [0xffu8; INFO_BUF];
        buf[0] = 1;
        // An old kernel filling only the first 104 bytes: the 64-bit counters are absent.
        let info = decode(&buf, 104);
        assert_eq!(info.state, 1);
        assert_eq!(info.rtt_us, u32::MAX);
        assert_eq!(info.bytes_acked, 0);
        assert_eq!(info.min_rtt_us, 0);
        assert_eq!(info.rcv_wnd, 0);
    }

    #[test]
    fn offsets_agree_with_the_c_library() {
        // libc's struct stops before the 64-bit counters; its first fields must sit where
        // this module reads them.
        assert_eq!(std::mem::offset_of!(libc::tcp_info, tcpi_snd_mss), 16);
        assert_eq!(std::mem::offset_of!(libc::tcp_info, tcpi_unacked), 24);
        assert_eq!(std::mem::offset_of!(libc::tcp_info, tcpi_lost), 32);
        assert_eq!(std::mem::offset_of!(libc::tcp_info, tcpi_rtt), 68);
        assert_eq!(std::mem::offset_of!(libc::tcp_info, tcpi_snd_cwnd), 80);
        assert_eq!(std::mem::offset_of!(libc::tcp_info, tcpi_rcv_rtt), 92);
        assert_eq!(
            std::mem::offset_of!(libc::tcp_info, tcpi_total_retrans),
            100
        );
    }
}
