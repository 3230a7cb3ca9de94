#!/usr/bin/env python3
"""User-space parts of the link emulator (tests/support/linkemu.rs sets up the namespaces).

Subcommands:
  relay       the "wan" delay: reads every packet routed into a TUN device, holds it for a
              fixed delay, writes it back (the kernel then routes it on, through the line's
              tbf); counts bytes per flow into a JSON-lines file. No netem needed.
  tpe-server  a payment terminal's host: answers each 200-byte request with 500 bytes.
  tpe-client  a payment terminal: one request every period on one TCP connection; writes one
              JSON line per round trip (wall time sent, RTT, retransmissions so far).
  bulk        another device's bulk transfer (send or receive) on one TCP connection.
  forward     a TCP port on the caller's loopback forwarded into a network namespace, so the
              tests reach the hub's admin API and the box's LAN API without any address
              outside the namespaces.

Standard library only (Python 3.8+). Every address it uses is given on its command line.
"""

import argparse
import collections
import ctypes
import fcntl
import json
import os
import select
import socket
import struct
import sys
import threading
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000


def tcp_counters(sock):
    """(total_retrans, dsack_dups) of a TCP socket, from TCP_INFO."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return 0, 0
    retrans = struct.unpack_from("I", info, 100)[0] if len(info) >= 104 else 0
    dsack = struct.unpack_from("I", info, 216)[0] if len(info) >= 220 else 0
    return retrans, dsack


def relay(args):
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", args.tun.encode(), IFF_TUN | IFF_NO_PI))
    os.set_blocking(fd, False)
    try:
        os.nice(-10)
    except OSError:
        pass
    delay = args.delay_ms / 1000.0
    queue = collections.deque()
    flows = {}
    stats = open(args.stats, "w", buffering=1)
    every = args.stats_ms / 1000.0
    next_stats = time.monotonic() + every
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            try:
                os.write(fd, queue.popleft()[1])
            except OSError:
                pass
        if now >= next_stats:
            stats.write(json.dumps({"t": time.time(), "flows": flows}) + "\n")
            next_stats += every
            if next_stats < now:
                next_stats = now + every
        timeout = next_stats - now
        if queue:
            timeout = min(timeout, queue[0][0] - now)
        ready, _, _ = select.select([fd], [], [], max(timeout, 0))
        if not ready:
            continue
        while True:
            try:
                packet = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not packet:
                break
            queue.append((time.monotonic() + delay, packet))
            if len(packet) >= 20 and packet[0] >> 4 == 4:
                ihl = (packet[0] & 15) * 4
                proto = packet[9]
                src = socket.inet_ntoa(packet[12:16])
                dst = socket.inet_ntoa(packet[16:20])
                sport = dport = 0
                if proto in (6, 17) and len(packet) >= ihl + 4:
                    sport, dport = struct.unpack_from("!HH", packet, ihl)
                key = "%s:%d>%s:%d" % (src, sport, dst, dport)
                entry = flows.get(key)
                if entry is None:
                    entry = flows[key] = [0, 0]
                entry[0] += len(packet)
                entry[1] += 1


def serve_forever(listen, handler):
    host, port = listen.rsplit(":", 1)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, int(port)))
    server.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()


def read_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def tpe_server(args):
    out = open(args.out, "a", buffering=1) if args.out else None

    def handle(conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        answer = b"A" * args.answer
        last = None
        peer = conn.getpeername()[1]
        while read_exact(conn, args.request) is not None:
            conn.sendall(answer)
            counters = tcp_counters(conn)
            if out and counters != last:
                last = counters
                out.write(
                    json.dumps(
                        {"t": time.time(), "conn": peer, "retrans": counters[0], "dsack": counters[1]}
                    )
                    + "\n"
                )

    serve_forever(args.listen, handle)


def tpe_client(args):
    host, port = args.connect.rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = open(args.out, "a", buffering=1)
    request = b"R" * args.request
    period = args.every_ms / 1000.0
    next_at = time.monotonic() + args.offset_ms / 1000.0
    while True:
        now = time.monotonic()
        if next_at > now:
            time.sleep(next_at - now)
        sent_wall = time.time()
        start = time.monotonic()
        conn.sendall(request)
        if read_exact(conn, args.answer) is None:
            sys.exit("the TPE server closed the connection")
        rtt = time.monotonic() - start
        retrans, dsack = tcp_counters(conn)
        out.write(
            json.dumps(
                {"id": args.id, "t": sent_wall, "rtt_ms": rtt * 1000.0, "retrans": retrans, "dsack": dsack}
            )
            + "\n"
        )
        next_at += period
        if next_at < time.monotonic():
            next_at = time.monotonic()


def bulk(args):
    chunk = b"B" * 65536

    def pump(conn):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        try:
            if args.mode == "send":
                while True:
                    conn.sendall(chunk)
            else:
                while conn.recv(65536):
                    pass
        except OSError:
            pass

    if args.listen:
        serve_forever(args.listen, pump)
    host, port = args.connect.rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.settimeout(None)
    print("ready", flush=True)
    pump(conn)


def forward(args):
    host, port = args.listen.rsplit(":", 1)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((host, int(port)))
    server.listen(64)
    # The listening socket stays in the caller's namespace; everything opened from here on
    # (the connections to the target) is in the target's.
    libc = ctypes.CDLL(None, use_errno=True)
    nsfd = os.open(args.netns, os.O_RDONLY)
    if libc.setns(nsfd, CLONE_NEWNET) != 0:
        sys.exit("setns: %s" % os.strerror(ctypes.get_errno()))
    to_host, to_port = args.to.rsplit(":", 1)
    print(server.getsockname()[1], flush=True)

    def pipe(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    while True:
        client, _ = server.accept()
        try:
            target = socket.create_connection((to_host, int(to_port)), timeout=10)
            target.settimeout(None)
        except OSError:
            client.close()
            continue
        threading.Thread(target=pipe, args=(client, target), daemon=True).start()
        threading.Thread(target=pipe, args=(target, client), daemon=True).start()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("relay")
    p.add_argument("--tun", required=True)
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--stats-ms", type=float, default=100)
    p.set_defaults(run=relay)
    p = sub.add_parser("tpe-server")
    p.add_argument("--listen", required=True)
    p.add_argument("--request", type=int, default=200)
    p.add_argument("--answer", type=int, default=500)
    p.add_argument("--out")
    p.set_defaults(run=tpe_server)
    p = sub.add_parser("tpe-client")
    p.add_argument("--connect", required=True)
    p.add_argument("--every-ms", type=float, default=200)
    p.add_argument("--offset-ms", type=float, default=0)
    p.add_argument("--id", type=int, default=0)
    p.add_argument("--request", type=int, default=200)
    p.add_argument("--answer", type=int, default=500)
    p.add_argument("--out", required=True)
    p.set_defaults(run=tpe_client)
    p = sub.add_parser("bulk")
    p.add_argument("--listen")
    p.add_argument("--connect")
    p.add_argument("--mode", choices=["send", "recv"], required=True)
    p.set_defaults(run=bulk)
    p = sub.add_parser("forward")
    p.add_argument("--listen", required=True)
    p.add_argument("--netns", required=True)
    p.add_argument("--to", required=True)
    p.set_defaults(run=forward)
    args = parser.parse_args()
    try:
        args.run(args)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
