#!/usr/bin/env python3
"""User-space instructions per request of icp-gate builds, side by side in one run.

The load harness measures CPU time, which on this shared 2-vCPU VM moves by ±10 % between rounds
of the same binary: a change worth 3 % of a request cannot be seen there, and the VM exposes no
hardware counters for `perf stat -e instructions`. Valgrind's callgrind counts every instruction
a process executes, whatever else the machine is doing, so the same build gives the same count
to within a fraction of a percent.

For each build and each host, icp-gate runs under callgrind on a copy of the shipped demo config
(`config/icp-gate.toml`, access log off as in the harness: `RUST_LOG=warn`; every run with a
registry state directory of its own, so every start-up is the same) and is sent `--small`
and then `--large` keep-alive requests, one at a time over 4 connections, in two runs; the
difference of the two runs' totals divided by the difference of the request counts is the cost
of one request, start-up and shutdown cancelled out. `--top N` also lists the N functions that
cost the most per request (for the first build).

Hosts: `unfiled.example` (blocked: the built-in ~2 KB page) and `www.filed-example.com.cn`
(forwarded to an HTTP origin outside the process: this script, which answers every request on a
keep-alive connection with the same small response the demo origin gives; until 2026-12-06 the
row used the shipped config's demo origin, which runs in icp-gate's process, and so also
counted a hyper server's work per request, about 12 600 instructions).
A third row counts one TLS passthrough tunnel, per connection: a ClientHello naming
`www.filed-example.com.cn` is sent to the TLS listener, which connects to a byte origin outside
the process (this script: it answers the hello with 3 KiB, as a server's first flight, and
closes once the client has), the client closes on the answer, and both sides' FINs end the
tunnel. No TLS is computed anywhere, so the count is the proxy's own work per tunnel: accept,
ClientHello, decision, origin connect, relay, teardown.

    benches/load/instructions.py --binary target/release/icp-gate --before-binary OLD

Needs valgrind (Debian: `apt-get install valgrind`); a build with symbols (`CARGO_PROFILE_RELEASE_DEBUG=line-tables-only`) for `--top`.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOSTS = ["unfiled.example", "www.filed-example.com.cn"]
CONNS = 4
WARMUP = 300
TUNNEL = "tls tunnel"
FIRST_FLIGHT = 3 * 1024


def client_hello(sni: str) -> bytes:
    """A TLS 1.2 ClientHello record with one cipher suite and a server_name extension."""
    name = sni.encode()
    server_name = struct.pack("!HBH", len(name) + 3, 0, len(name)) + name
    ext = struct.pack("!HH", 0, len(server_name)) + server_name
    body = (b"\x03\x03" + bytes(32) + b"\x00" + struct.pack("!HH", 2, 0x1301) + b"\x01\x00"
            + struct.pack("!H", len(ext)) + ext)
    handshake = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


def recv_exactly(sock: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit(f"closed after {got} of {n} bytes")
        got += len(chunk)


def byte_origin(listener: socket.socket, hello_len: int) -> None:
    """Answers each tunnelled ClientHello with a first flight, then waits for the close."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            recv_exactly(conn, hello_len)
            conn.sendall(b"\x16" * FIRST_FLIGHT)
            while conn.recv(65536):
                pass


ORIGIN_BODY = (b"Hello from the icp-gate demo origin.\nhost: www.filed-example.com.cn\npath: /\n"
               b"x-forwarded-for: 127.0.0.1\n")
ORIGIN_ANSWER = (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\n"
                 b"content-length: %d\r\ndate: Sun, 06 Dec 2026 10:00:00 GMT\r\n\r\n"
                 % len(ORIGIN_BODY)) + ORIGIN_BODY


def http_origin(listener: socket.socket) -> None:
    """Answers every request head on each keep-alive connection (a thread per connection)."""
    def serve(conn: socket.socket) -> None:
        with conn:
            buf = b""
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
                while (end := buf.find(b"\r\n\r\n")) >= 0:
                    buf = buf[end + 4:]
                    conn.sendall(ORIGIN_ANSWER)
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def tunnels(port: int, proc: subprocess.Popen, count: int) -> None:
    hello = client_hello(HOSTS[1])
    for _ in range(count):
        with connect(port, proc) as sock:
            sock.sendall(hello)
            recv_exactly(sock, FIRST_FLIGHT)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass


def answer(sock: socket.socket, request: bytes) -> int:
    """Sends one request and reads its whole answer; returns the status."""
    sock.sendall(request)
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("icp-gate closed the connection")
        buf += chunk
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            continue
        m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", buf[:end])
        if m is None:
            raise SystemExit(f"answer without content-length: {buf[:end]!r}")
        if len(buf) >= end + 4 + int(m.group(1)):
            return int(buf.split(b" ", 2)[1])


def connect(port: int, proc: subprocess.Popen) -> socket.socket:
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"icp-gate exited with {proc.returncode} before listening")
        try:
            return socket.create_connection(("127.0.0.1", port))
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def run(binary: str, host: str, requests: int, out: Path, config: Path) -> int:
    """Total instructions of one icp-gate process that answers `requests` requests (+ warm-up)."""
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", binary,
         "run", "--config", str(config)],
        cwd=REPO, env=dict(os.environ, RUST_LOG="warn"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if host == TUNNEL:
            # Each tunnel must deliver the origin's whole first flight (a refusal would not).
            tunnels(8443, proc, WARMUP // 10 + requests)
        else:
            socks = [connect(8080, proc) for _ in range(CONNS)]
            request = (f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: instructions.py\r\n"
                       "Accept: */*\r\n\r\n").encode()
            statuses = {answer(socks[i % CONNS], request) for i in range(WARMUP + requests)}
            for s in socks:
                s.close()
            if len(statuses) != 1:
                raise SystemExit(f"{host}: mixed statuses {statuses}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise SystemExit("icp-gate did not stop within 120 s of SIGTERM")
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SystemExit(f"{out}: no totals (did icp-gate run under valgrind?)")


def per_function(path: Path) -> dict[str, int]:
    text = subprocess.run(["callgrind_annotate", "--auto=no", "--threshold=100", str(path)],
                          capture_output=True, text=True, check=True).stdout
    costs: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*?)(?: \[.*\])?$", line)
        if m and "PROGRAM TOTALS" not in line:
            name = m.group(2).split(":", 1)[-1]
            costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def fresh_config(tmp: str, origin_port: int, http_origin_port: int | None = None) -> Path:
    """The shipped config, copied into a directory of its own, with the TLS route's origin at the
    byte origin (and the HTTP route's at `http_origin_port`, when given). Every run gets one: its
    registry state starts empty, so each start-up imports the seed the same way. With one state
    directory for all runs, the first start imported the seed and the later ones recovered it
    instead, a different start-up cost that the small and large runs did not cancel (the tunnel
    row moved by up to 10 % with the order of the builds)."""
    config = Path(tempfile.mkdtemp(dir=tmp), "config")
    shutil.copytree(REPO / "config", config)
    toml = config / "icp-gate.toml"
    text = toml.read_text()
    if 'tls_origin = "127.0.0.1:9443"' not in text:
        raise SystemExit(f"{toml}: no tls_origin = \"127.0.0.1:9443\" to point at the byte origin")
    text = text.replace('tls_origin = "127.0.0.1:9443"', f'tls_origin = "127.0.0.1:{origin_port}"')
    if http_origin_port is not None:
        if 'http_origin = "127.0.0.1:9080"' not in text:
            raise SystemExit(f"{toml}: no http_origin = \"127.0.0.1:9080\" to point elsewhere")
        text = text.replace('http_origin = "127.0.0.1:9080"',
                            f'http_origin = "127.0.0.1:{http_origin_port}"')
    toml.write_text(text)
    return toml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", required=True)
    ap.add_argument("--before-binary")
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=4000)
    ap.add_argument("--top", type=int, default=0)
    ap.add_argument("--rows", default="blocked,forwarded,tunnel",
                    help="which rows to count (default all: blocked,forwarded,tunnel)")
    args = ap.parse_args()
    rows = {"blocked": HOSTS[0], "forwarded": HOSTS[1], "tunnel": TUNNEL}
    try:
        hosts = [rows[r] for r in args.rows.split(",")]
    except KeyError as e:
        raise SystemExit(f"--rows: unknown row {e}; known: {', '.join(rows)}")
    builds = [("icp-gate", args.binary)]
    if args.before_binary:
        builds.append(("before", args.before_binary))
    print(f"instructions per request (valgrind Ir; {args.large} - {args.small} requests, "
          f"{CONNS} keep-alive connections, access log off; the tunnel row: per connection, "
          f"{args.large // 5} - {args.small // 5} connections)\n")
    print("| host | " + " | ".join(name for name, _ in builds)
          + (" | icp-gate ÷ before |" if len(builds) == 2 else " |"))
    print("|---|" + "---:|" * (len(builds) + (len(builds) == 2)))
    with tempfile.TemporaryDirectory() as tmp:
        origin = socket.create_server(("127.0.0.1", 0))
        hello_len = len(client_hello(HOSTS[1]))
        threading.Thread(target=byte_origin, args=(origin, hello_len), daemon=True).start()
        port = origin.getsockname()[1]
        web = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=http_origin, args=(web,), daemon=True).start()
        web_port = web.getsockname()[1]
        tops = {}
        for host in hosts:
            row = []
            small_n, large_n = (args.small, args.large) if host != TUNNEL \
                else (args.small // 5, args.large // 5)
            for name, binary in builds:
                small = Path(tmp, f"{name}-{host}-small.out")
                large = Path(tmp, f"{name}-{host}-large.out")
                cost = (run(binary, host, large_n, large, fresh_config(tmp, port, web_port))
                        - run(binary, host, small_n, small, fresh_config(tmp, port, web_port))) \
                    / (large_n - small_n)
                row.append(cost)
                if args.top and name == "icp-gate":
                    a, b = per_function(small), per_function(large)
                    tops[host] = sorted(((b.get(k, 0) - a.get(k, 0)) / (large_n - small_n), k)
                                        for k in set(a) | set(b))[::-1][:args.top]
            cells = " | ".join(f"{c:,.0f}" for c in row)
            ratio = f" | {row[0] / row[1]:.3f}×" if len(row) == 2 else ""
            print(f"| {host} | {cells}{ratio} |", flush=True)
        origin.close()
        web.close()
        for host, top in tops.items():
            print(f"\nicp-gate, {host}: the {args.top} costliest functions, instructions per request")
            for cost, name in top:
                print(f"{cost:8.0f}  {name[:140]}")


if __name__ == "__main__":
    sys.exit(main())
