#!/usr/bin/env python3
"""Resident memory per open TLS passthrough tunnel or WebSocket, of icp-gate builds side by side.

An edge node may hold tens of thousands of long-lived tunnels (HTTP/2, WebSocket over TLS), most
of them idle at any moment, so what one costs while nothing moves is what bounds a node. For each
build, icp-gate runs on the shipped demo config with its TLS route pointed at a byte origin in
this script. After a warm-up (tunnels opened and closed, so the allocator has its arenas), N
tunnels are opened one after another and held: the client sends a ClientHello naming
`www.filed-example.com.cn`, the origin answers 3 KiB (a server's first flight), the client sends
1 KiB and the origin answers 1 KiB (its Finished, a request and an answer); then nothing moves.
The growth of icp-gate's resident set (VmRSS) over those N tunnels, divided by N, is the memory
one idle tunnel holds in the process (the kernel's socket buffers are not in it).

`--kind websocket` does the same with upgraded HTTP connections: the HTTP route's origin is this
script, the client sends a WebSocket upgrade request for `www.filed-example.com.cn` to the HTTP
listener, the origin answers `101 Switching Protocols`, then 1 KiB goes on and 1 KiB comes back.

    benches/load/tunnel_memory.py --binary target/release/icp-gate --before-binary OLD

Needs Python 3 and a file-descriptor limit above 2 × N + 100 (each tunnel holds a client and an
origin socket in this script, and two sockets in icp-gate).
"""

import argparse
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from instructions import (FIRST_FLIGHT, HOSTS, REPO, client_hello, connect, recv_exactly,
                          fresh_config)

HOST = HOSTS[1]  # the filed name of the shipped config
CLIENT_MORE = 1024
ORIGIN_MORE = 1024
WARMUP = 200


UPGRADE = (f"GET /chat HTTP/1.1\r\nHost: {HOSTS[1]}\r\nConnection: Upgrade\r\n"
           "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode()
SWITCHED = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")


def recv_head(sock: socket.socket) -> bytes:
    """Reads an HTTP head, up to its blank line (nothing follows it until the peer is answered)."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise SystemExit(f"connection closed inside a head: {head!r}")
        head += chunk
    return head


class Kind:
    """How one kind of connection opens: the client's side (`start`) on icp-gate's `port`, and
    the origin's (`greet`). Then both kinds move the same bytes and stay open."""

    def __init__(self, websocket: bool):
        self.websocket = websocket
        self.port = 8080 if websocket else 8443
        self.hello = b"" if websocket else client_hello(HOST)

    def start(self, sock: socket.socket) -> None:
        if self.websocket:
            sock.sendall(UPGRADE)
            head = recv_head(sock)
            if not head.startswith(b"HTTP/1.1 101"):
                raise SystemExit(f"upgrade refused: {head!r}")
        else:
            sock.sendall(self.hello)
            recv_exactly(sock, FIRST_FLIGHT)

    def greet(self, conn: socket.socket) -> None:
        if self.websocket:
            recv_head(conn)
            conn.sendall(SWITCHED)
        else:
            recv_exactly(conn, len(self.hello))
            conn.sendall(b"\x16" * FIRST_FLIGHT)


def holding_origin(listener: socket.socket, kind: Kind, held: list) -> None:
    """Plays each connection's origin side, in accept order, then keeps the connection open."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        kind.greet(conn)
        recv_exactly(conn, CLIENT_MORE)
        conn.sendall(b"\x17" * ORIGIN_MORE)
        held.append(conn)


def open_one(kind: Kind, proc: subprocess.Popen) -> socket.socket:
    sock = connect(kind.port, proc)
    kind.start(sock)
    sock.sendall(b"\x17" * CLIENT_MORE)
    recv_exactly(sock, ORIGIN_MORE)
    return sock


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/{pid}/status: no VmRSS")


def measure(binary: str, config: Path, tunnels: int, kind: Kind, held: list) -> tuple:
    """(RSS KiB after the warm-up, RSS KiB with `tunnels` open) of one fresh icp-gate."""
    proc = subprocess.Popen([binary, "run", "--config", str(config)], cwd=REPO,
                            env=dict(os.environ, RUST_LOG="warn"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clients = []
    try:
        for _ in range(WARMUP):
            open_one(kind, proc).close()
        time.sleep(0.5)
        for conn in held:
            conn.close()
        held.clear()
        time.sleep(0.5)
        before = rss_kib(proc.pid)
        clients = [open_one(kind, proc) for _ in range(tunnels)]
        time.sleep(1.0)
        if proc.poll() is not None:
            raise SystemExit(f"{binary} exited with {proc.returncode}")
        return before, rss_kib(proc.pid)
    finally:
        for sock in clients:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise SystemExit(f"{binary} did not stop within 60 s of SIGTERM")
        for conn in held:
            conn.close()
        held.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", required=True)
    ap.add_argument("--before-binary")
    ap.add_argument("--tunnels", type=int, default=3000, help="tunnels held open (default 3000)")
    ap.add_argument("--rounds", type=int, default=1, help="fresh starts per build, in turn")
    ap.add_argument("--kind", choices=["tls", "websocket"], default="tls",
                    help="TLS passthrough tunnels (default) or upgraded HTTP connections")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * args.tunnels + 100
    if soft < need:
        if hard < need:
            raise SystemExit(f"file-descriptor limit {hard} < {need}: lower --tunnels")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    builds = [("icp-gate", args.binary)]
    if args.before_binary:
        builds.append(("before", args.before_binary))
    kind = Kind(websocket=args.kind == "websocket")
    if kind.websocket:
        print(f"resident memory per open, idle WebSocket ({args.tunnels} held; each moved an "
              f"upgrade request, the 101 answer, {CLIENT_MORE} B on, {ORIGIN_MORE} B back)\n")
    else:
        print(f"resident memory per open, idle TLS tunnel ({args.tunnels} tunnels held; each "
              f"moved a {len(kind.hello)}-byte ClientHello, {FIRST_FLIGHT} B back, {CLIENT_MORE} "
              f"B on, {ORIGIN_MORE} B back)\n")
    print("| build | round | RSS before, KiB | RSS with the tunnels, KiB | per tunnel, KiB |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        origin = socket.create_server(("127.0.0.1", 0), backlog=1024)
        held: list = []
        threading.Thread(target=holding_origin, args=(origin, kind, held), daemon=True).start()
        port = origin.getsockname()[1]
        for r in range(1, args.rounds + 1):
            for name, binary in builds:
                config = fresh_config(tmp, port, port if kind.websocket else None)
                before, after = measure(binary, config, args.tunnels, kind, held)
                print(f"| {name} | {r} | {before:,} | {after:,} | "
                      f"{(after - before) / args.tunnels:.2f} |", flush=True)
        origin.close()


if __name__ == "__main__":
    sys.exit(main())
