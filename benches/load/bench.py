#!/usr/bin/env python3
"""Load harness: icp-gate against nginx and HAProxy, side by side, on one core each.

Normally started by run.sh (which installs the tools and builds icp-gate); see README.md
beside this file. Python 3 standard library only.

Layout of one run:
  * a work dir (temporary unless --workdir) with the generated registry in three formats,
    the rendered configs, logs, a self-signed certificate and the bulk file;
  * one shared origin (nginx, separate instance) pinned to core 1 with the load generator, so
    core 0 belongs to the contender alone;
  * for every scenario and registry size: rounds x (icp-gate, nginx, haproxy), each contender
    started fresh on core 0, probed for correct answers, warmed up, measured, stopped;
  * a table per scenario on stdout and a Markdown copy in results/.

The figure that compares proxies fairly on a 2-core machine is the server CPU time per
operation: the sum of the first field of /proc/PID/task/*/schedstat (ns on CPU) over every
thread of every process of the contender, delta over the measured interval, divided by the
completed operations. Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import http.client
import json
import os
import platform
import random
import re
import resource
import select
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import astuple, dataclass, field, fields
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CONF = HERE / "conf"

CORE_SERVER = "0"  # the contender's core
CORE_CLIENT = "1"  # load generator and shared origin
THREADS = 1  # --threads: workers per contender; above 1 nothing is pinned to a core

PORTS = {
    "ORIGIN_HTTP": 18080,
    "ORIGIN_TLS": 18443,
    "REFUSE_PORT": 18199,  # nothing listens here: nginx's target for an unfiled SNI
}
CONTENDER_PORTS = {  # (http, tls) per contender: never reuse a port right after a stop
    "icp-gate": (18110, 18111),
    "nginx": (18120, 18121),
    "haproxy": (18130, 18131),
    "icp-gate-ws": (18140, 18141),
    "nginx-tuned": (18150, 18151),
    "haproxy-tuned": (18160, 18161),
    "icp-gate-before": (18170, 18171),
    "floor": (18180, 18181),
}
CONTENDERS = ["icp-gate", "nginx", "haproxy"]
# With --threads N > 1 also icp-gate's other runtime shape: one work-stealing runtime.
SHAPE_CONTENDER = "icp-gate-ws"
# --before-binary: an older icp-gate build measured in the same run (before/after in one sitting).
BEFORE_CONTENDER = "icp-gate-before"
# The anchors with the accept-path levers icp-gate may use too: nginx `listen … deferred
# reuseport`, HAProxy `bind … defer-accept` (TCP_DEFER_ACCEPT: accepted once data is in).
TUNED = ["nginx-tuned", "haproxy-tuned"]
ANCHORS = ["nginx", "haproxy", *TUNED]
# --conns (wrk's keep-alive connections) and --inflight (TLS clients' connections in flight);
# --shape saturated sets both to 64.
CONNS = 50
INFLIGHT = 16
# --page: the block page all three render; "large" is icp-gate's built-in (~2 KB), "small" a
# ~200-byte page (conf/block-small.html), where per-request overhead weighs most.
PAGE = "large"
# The floor (floor.c): a bare epoll loop that answers or relays without a registry, timers or
# logs (a filed name is one with a '-'), so what the kernel costs per operation is measured in
# the same run. Not the bulk transfer: it copies, where icp-gate splices.
FLOOR = "floor"
FLOOR_SCENARIOS = ("blocked", "forwarded", "newconn", "mix", "tls-handshake", "tls-refuse")

NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"

# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "http" or "tls": which listener/config the contenders get
    client: str  # wrk | tls-handshake | tls-refuse | bulk
    unit: str  # what one operation is
    description: str
    expect_4xx: float | None = None  # expected share of 4xx answers (wrk scenarios)


SCENARIOS = [
    Scenario("blocked", "http", "wrk", "req",
             "unfiled Host, {conns} keep-alive connections: every request gets the {page} 403 page",
             expect_4xx=1.0),
    Scenario("forwarded", "http", "wrk", "req",
             "filed Host (www.<entry>), {conns} keep-alive connections, forwarded to the origin",
             expect_4xx=0.0),
    Scenario("newconn", "http", "wrk", "req",
             "unfiled Host with `Connection: close`: one TCP connection per request, {conns} "
             "at a time (wrk's latency starts after connect)", expect_4xx=1.0),
    Scenario("mix", "http", "wrk", "req",
             "Host rotating over 100 000 names, 90 % filed (sub-domains of entries, "
             "forwarded) / 10 % unfiled (403), {conns} keep-alive connections", expect_4xx=0.1),
    Scenario("tls-handshake", "tls", "tls-handshake", "conn",
             "filed SNI: new TCP connection + full TLS 1.3 handshake with the origin through "
             "the proxy + one GET + close, {inflight} at a time (latency: connect to close)"),
    Scenario("tls-refuse", "tls", "tls-refuse", "conn",
             "unfiled SNI: connect, send a ClientHello, wait until the proxy refuses "
             "(alert/close/reset), {inflight} at a time"),
    Scenario("tls-bulk", "tls", "bulk", "MiB",
             "filed SNI: one TLS connection through the proxy downloads a large file "
             "(curl); rate in MiB/s, CPU per MiB"),
]
SCENARIO_BY_NAME = {s.name: s for s in SCENARIOS}

# ---------------------------------------------------------------------------------------------
# Synthetic registry
# ---------------------------------------------------------------------------------------------

SUFFIXES = ["cn", "com.cn", "net.cn", "org.cn", "com", "net", "org", "top", "xyz", "gov.cn"]
SYLLABLES = ["ba", "bei", "chen", "da", "feng", "guo", "hai", "hua", "jia", "jin", "kang",
             "le", "long", "mei", "ming", "ning", "an", "qi", "rui", "shan", "tian", "wei",
             "xin", "yang", "yun", "zhi", "zhong", "shu", "tong", "xue"]
PROVINCES = "京沪粤浙苏鲁川鄂湘闽皖豫冀辽陕渝津黑吉晋赣桂云贵琼甘蒙宁青新藏"
MIX_NAMES = 100_000
UNFILED_HOST = "www.nofilingbench.cn"  # filed labels always carry a '-': never in the registry


def b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def entry_domain(i: int) -> str:
    """Entry i: '<2-3 syllables>-<base36 i>.<suffix>': unique, realistic length, varied suffix."""
    h = (i * 2654435761) & 0xFFFFFFFF
    word = "".join(SYLLABLES[(h >> s) % len(SYLLABLES)] for s in (0, 5, 10)[: 2 + (h >> 20) % 2])
    return f"{word}-{b36(i)}.{SUFFIXES[(h >> 24) % len(SUFFIXES)]}"


def entry_icp(i: int) -> str:
    h = (i * 40503 + 17) & 0xFFFFFFFF
    return f"{PROVINCES[h % len(PROVINCES)]}ICP备{(i * 7919 + 10000000) % 100000000:08d}号-{1 + h % 5}"


@dataclass
class Registry:
    n: int
    ndjson: Path
    nginx_map: Path
    haproxy_map: Path
    mix_hosts: Path
    filed_host: str
    unfiled_host: str = UNFILED_HOST


def generate_registry(n: int, work: Path) -> Registry:
    """Writes the N entries in the three formats plus the 100 000-name mix list (cached)."""
    d = work / f"registry-{n}"
    reg = Registry(n, d / "registry.ndjson", d / "registry.nginx.map", d / "registry.haproxy.map",
                   d / "mix-hosts.txt", filed_host="www." + entry_domain(n // 2))
    if (d / "done").exists():
        return reg
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(reg.ndjson, "w", encoding="utf-8") as nd, \
         open(reg.nginx_map, "w", encoding="utf-8") as ng, \
         open(reg.haproxy_map, "w", encoding="utf-8") as hp:
        for i in range(n):
            dom, icp = entry_domain(i), entry_icp(i)
            nd.write(f'{{"domain":"{dom}","icp":"{icp}","status":"filed","access_here":true}}\n')
            ng.write(f'.{dom} "{icp}";\n')  # `.dom` = dom and every sub-domain (hostnames)
            hp.write(f"{dom} {icp}\n")
    # The mix: 90 % filed names (the entry itself or a sub-domain of it), 10 % unfiled names.
    rng = random.Random(5)
    prefixes = ["", "www.", "m.", "api.", "img.cdn."]
    names = []
    for k in range(MIX_NAMES):
        p = prefixes[rng.randrange(len(prefixes))]
        if k % 10 == 0:
            names.append(f"{p or 'www.'}nf{b36(k)}.{SUFFIXES[k % len(SUFFIXES)]}")
        else:
            names.append(p + entry_domain(rng.randrange(n)))
    rng.shuffle(names)
    reg.mix_hosts.write_text("\n".join(names) + "\n")
    (d / "done").write_text("")
    log(f"registry N={n:,}: generated in {time.monotonic() - t0:.1f}s "
        f"({reg.ndjson.stat().st_size / 2**20:.1f} MiB NDJSON)")
    return reg


# ---------------------------------------------------------------------------------------------
# Block page for nginx and HAProxy, rendered from icp-gate's own template
# ---------------------------------------------------------------------------------------------

# The texts icp-gate puts in the page for reason `unfiled` (src/block_page.rs).
UNFILED_TEXTS = {
    "{reason}": "unfiled",
    "{reason_zh}": "未备案",
    "{reason_en}": "this domain has no ICP filing",
    "{advice_zh}": "网站所有者：请为该域名办理ICP备案，并通过本服务商完成接入后再访问。",
    "{advice_en}": "Site owner: obtain an ICP filing for this domain and add its access (接入) "
                   "through this provider.",
}


def block_template() -> Path:
    """The page every contender renders: icp-gate's built-in one, or the small one (--page)."""
    return REPO / "config" / "block.html" if PAGE == "large" else CONF / "block-small.html"


def block_page(engine: str) -> str:
    """The block page template with the host, request id and time as engine variables."""
    page = block_template().read_text(encoding="utf-8")
    for k, v in UNFILED_TEXTS.items():
        page = page.replace(k, v)
    if engine == "nginx":
        page = page.replace("\\", "\\\\").replace('"', '\\"')
        return page.replace("{host}", "$host").replace("{request_id}", "$request_id") \
                   .replace("{time}", "$time_iso8601")
    # HAProxy log-format: '%' is special, the rest is literal.
    page = page.replace("%", "%%")
    return page.replace("{host}", "%[var(txn.host)]").replace("{request_id}", "%[unique-id]") \
               .replace("{time}", "%[date]")


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def render(template: Path, out: Path, values: dict) -> Path:
    text = template.read_text(encoding="utf-8")
    for k, v in values.items():
        text = text.replace(f"@@{k}@@", str(v))
    left = re.findall(r"@@[A-Z_]+@@", text)
    if left:
        raise SystemExit(f"{template}: unfilled placeholders {sorted(set(left))}")
    out.write_text(text, encoding="utf-8")
    return out


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else max(soft, min(65536, hard))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)
                                                    if hard != resource.RLIM_INFINITY else hard))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def ver(cmd: list[str]) -> str:
    """The first version-looking token a tool prints about itself."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    m = re.search(r"\d+\.\d+[\w.+~-]*", r.stdout + r.stderr)
    return m.group(0) if m else "?"


# ---------------------------------------------------------------------------------------------
# /proc accounting
# ---------------------------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """root and all its descendants (nginx: master + worker)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


@dataclass
class Counters:
    """One thread's counters: on-CPU ns (schedstat), user and system clock ticks (stat fields
    14 and 15) and voluntary context switches (status), each read from /proc."""
    ns: int
    utime: int
    stime: int
    sleeps: int


def thread_counters(pids: list[int]) -> dict[str, Counters]:
    """Counters per thread ('pid/tid') of all the given processes."""
    out = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            d = f"/proc/{pid}/task/{tid}"
            try:
                with open(f"{d}/schedstat") as f:
                    ns = int(f.read().split()[0])
                with open(f"{d}/stat") as f:
                    stat = f.read()
                utime, stime = (int(x) for x in stat[stat.rindex(")") + 2:].split()[11:13])
                with open(f"{d}/status") as f:
                    sleeps = next(int(line.split()[1]) for line in f
                                  if line.startswith("voluntary_ctxt_switches:"))
            except (OSError, ValueError, IndexError, StopIteration):
                continue
            out[f"{pid}/{tid}"] = Counters(ns, utime, stime, sleeps)
    return out


def counters_delta(before: dict[str, Counters], after: dict[str, Counters]) -> Counters:
    """Summed over threads. Threads that appeared count from zero; threads that exited in
    between are lost (icp-gate keeps its threads, nginx and HAProxy never spawn any, so this is
    negligible)."""
    zero = Counters(0, 0, 0, 0)
    pairs = [(astuple(v), astuple(before.get(k, zero))) for k, v in after.items()]
    return Counters(*(sum(a[i] - b[i] for a, b in pairs) for i in range(len(fields(Counters)))))


def memory(pids: list[int]) -> tuple[float, float]:
    """(largest VmHWM of one process, sum of Pss) in MiB. nginx's master holds the same map as
    its worker (fork, copy-on-write), so summing RSS would count it twice; PSS splits it."""
    hwm, pss = 0, 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]))
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except (OSError, ValueError):
            pass
    return hwm / 1024, pss / 1024


# Fewest user + system clock ticks (10 ms each) for which the user/kernel split is reported.
MIN_SPLIT_TICKS = 20


def tcp_out_segments() -> int:
    """TCP segments sent by the whole machine (`Tcp: OutSegs` of /proc/net/snmp). On loopback
    each is also received once, so its delta per operation is the operation's packet count."""
    with open("/proc/net/snmp") as f:
        head, values = [line.split() for line in f if line.startswith("Tcp:")][:2]
    return int(values[head.index("OutSegs")])


def core_busy_ns(core: str) -> tuple[int, int]:
    """(busy, total) jiffies-as-ns of one CPU from /proc/stat: used to report how much of the
    contender's core something else took during a measurement (the noise indicator)."""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + v[4]
                return (sum(v[:8]) - idle) * 10**9 // hz, sum(v[:8]) * 10**9 // hz
    return 0, 0


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


class Proc:
    """One server process we started (and only ever signal by its own PID)."""

    def __init__(self, name: str, argv: list[str], logfile: Path, env: dict | None = None):
        self.name = name
        self.log = open(logfile, "ab")
        self.started = time.monotonic()
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                  preexec_fn=raise_nofile)

    def alive(self) -> bool:
        return self.p.poll() is None

    def pids(self) -> list[int]:
        return process_tree(self.p.pid) if self.alive() else []

    def stop(self) -> None:
        if self.alive():
            family = self.pids()
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
            for pid in family[1:]:  # a worker left behind by a killed master: ours, by PID
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.log.close()


# ---------------------------------------------------------------------------------------------
# Probes: each contender must answer correctly before it is measured
# ---------------------------------------------------------------------------------------------


def http_get(port: int, host: str) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", "/", headers={"Host": host})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def tls_probe(port: int, sni: str) -> str:
    """'ok' when a handshake through the proxy reaches the origin and GET / answers 200."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s, \
             ctx.wrap_socket(s, server_hostname=sni) as t:
            t.sendall(f"GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := t.recv(4096):
                data += chunk
            return "ok" if data.startswith(b"HTTP/1.1 200") else f"answer {data[:40]!r}"
    except (OSError, ssl.SSLError) as e:
        return f"refused ({type(e).__name__})"


def probe(kind: str, port: int, reg: Registry) -> str | None:
    """None when the contender behaves as every contender must; otherwise what is wrong."""
    if kind == "http":
        st, body = http_get(port, reg.unfiled_host)
        size_ok = 1500 < len(body) < 3000 if PAGE == "large" else 150 < len(body) < 400
        if st != 403 or not size_ok or reg.unfiled_host.encode() not in body:
            return f"unfiled host: {st}, {len(body)} bytes"
        st, body = http_get(port, reg.filed_host)
        if st != 200 or body != b"origin ok\n":
            return f"filed host: {st} {body[:40]!r}"
        return None
    if (r := tls_probe(port, reg.filed_host)) != "ok":
        return f"filed SNI: {r}"
    if (r := tls_probe(port, reg.unfiled_host)) == "ok" or r.startswith("answer"):
        return f"unfiled SNI not refused: {r}"
    return None


# ---------------------------------------------------------------------------------------------
# Contenders and the origin
# ---------------------------------------------------------------------------------------------


@dataclass
class Env:
    work: Path
    binary: Path
    before: Path | None = None  # --before-binary


def start_origin(env: Env, bulk_bytes: int) -> Proc:
    w = env.work
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "7", "-subj",
                    "/CN=origin.bench", "-keyout", str(w / "origin.key"), "-out",
                    str(w / "origin.crt")], check=True, capture_output=True)
    with open(w / "big.bin", "wb") as f:  # sparse: reading it costs no disk
        f.truncate(bulk_bytes)
    # Read once, so the page cache holds it: otherwise the first read of each page costs the
    # origin (on the load generator's core) a page allocation, which slowed the run's first bulk
    # transfer — always icp-gate's, as it goes first.
    with open(w / "big.bin", "rb") as f:
        while f.read(8 << 20):
            pass
    conf = render(CONF / "origin-nginx.conf", w / "origin-nginx.conf", {"WORK": w, **PORTS})
    p = Proc("origin", ["taskset", "-c", CORE_CLIENT, "nginx", "-p", str(w), "-c", str(conf)],
             w / "logs" / "origin.out")
    for _ in range(100):
        if port_open(PORTS["ORIGIN_HTTP"]) and port_open(PORTS["ORIGIN_TLS"]):
            break
        if not p.alive():
            raise SystemExit(f"origin nginx failed to start: see {w}/logs/origin.out")
        time.sleep(0.05)
    if http_get(PORTS["ORIGIN_HTTP"], "x")[1] != b"origin ok\n":
        raise SystemExit("origin does not answer")
    if port_open(PORTS["REFUSE_PORT"]):
        raise SystemExit(f"port {PORTS['REFUSE_PORT']} must be closed (nginx's refusal target)")
    return p


def start_contender(env: Env, who: str, kind: str, reg: Registry, tag: str) -> tuple[Proc, int]:
    """Renders the contender's config for this registry and starts it on core 0.
    Returns the process and the port of the listener of `kind`."""
    w = env.work
    http_port, tls_port = CONTENDER_PORTS[who]
    values = {"WORK": w, **PORTS, "PORT_HTTP": http_port, "PORT_TLS": tls_port,
              "BLOCK_TEMPLATE": block_template(),
              # the tuned anchors: accepted once the first bytes are in, a socket per worker
              "NGINX_LISTEN_TUNED": " deferred reuseport" if who == "nginx-tuned" else "",
              # nginx 1.22's stream `listen` has no `deferred` (newer releases do)
              "NGINX_STREAM_LISTEN_TUNED": " reuseport" if who == "nginx-tuned" else "",
              "HAPROXY_BIND_TUNED": " defer-accept" if who == "haproxy-tuned" else ""}
    logfile = w / "logs" / f"{tag}.log"
    unpinned = THREADS > 1  # then each nginx worker gets its own socket, as icp-gate's do
    values.update(WORKERS=THREADS,
                  NGINX_AFFINITY="" if unpinned else "worker_cpu_affinity 01;",
                  REUSEPORT=" reuseport" if unpinned and who != "nginx-tuned" else "",
                  HAPROXY_CPUMAP="" if unpinned else "    cpu-map 1/1 0")
    if who.startswith("icp-gate"):
        state = w / "state" / tag  # fresh every start: the seed is parsed like the others' maps
        shutil.rmtree(state, ignore_errors=True)
        values.update(STATE_DIR=state, NDJSON=reg.ndjson)
        conf = render(CONF / f"icp-gate-{kind}.toml", w / f"icp-gate-{kind}.toml", values)
        envv = dict(os.environ, RUST_LOG="warn")  # warn: the access log (info) is off
        binary = env.before if who == BEFORE_CONTENDER else env.binary
        argv = ["taskset", "-c", CORE_SERVER, str(binary), "run", "--config", str(conf),
                "--threads", str(THREADS)]
        if who == SHAPE_CONTENDER:
            argv += ["--runtime", "work-stealing"]
        proc = Proc(who, argv, logfile, envv)
    elif who == FLOOR:
        if kind == "http":
            page = block_template().read_text(encoding="utf-8")
            for k, v in {**UNFILED_TEXTS, "{host}": reg.unfiled_host,
                         "{request_id}": "0" * 16, "{time}": "2026-12-05T12:00:00Z"}.items():
                page = page.replace(k, v)
            body = page.encode()
            head = ("HTTP/1.1 403 Forbidden\r\ncontent-type: text/html; charset=utf-8\r\n"
                    "cache-control: no-store\r\nicp-gate-reason: unfiled\r\nx-request-id: "
                    f"{'0' * 16}\r\ncontent-length: {len(body)}\r\n"
                    "date: Sat, 05 Dec 2026 12:00:00 GMT\r\n\r\n")
            (w / "floor-page").write_bytes(head.encode() + body)
            argv = [str(w / "floor"), "http", str(http_port), str(w / "floor-page"),
                    str(PORTS["ORIGIN_HTTP"])]
        else:
            argv = [str(w / "floor"), "tls", str(tls_port), str(PORTS["ORIGIN_TLS"])]
        proc = Proc(who, ["taskset", "-c", CORE_SERVER, *argv], logfile)
    elif who.startswith("nginx"):
        values.update(NGINX_MAP=reg.nginx_map, MAP_HASH_MAX=max(4096, 2 * reg.n),
                      NGINX_STREAM_MODULE=NGINX_STREAM_MODULE,
                      BLOCK_PAGE=block_page("nginx"))
        conf = render(CONF / f"nginx-{kind}.conf", w / f"nginx-{kind}.conf", values)
        proc = Proc(who, ["taskset", "-c", CORE_SERVER, "nginx", "-p", str(w), "-c", str(conf)],
                    logfile)
    else:
        lf = w / "block.lf"
        lf.write_text(block_page("haproxy"), encoding="utf-8")
        values.update(HAPROXY_MAP=reg.haproxy_map, HAPROXY_BLOCK_LF=lf)
        conf = render(CONF / f"haproxy-{kind}.cfg", w / f"haproxy-{kind}.cfg", values)
        proc = Proc(who, ["taskset", "-c", CORE_SERVER, "haproxy", "-db", "-f", str(conf)],
                    logfile)
    return proc, (http_port if kind == "http" else tls_port)


def wait_ready(proc: Proc, port: int, timeout: float) -> float | None:
    """Seconds from spawn until the port accepts connections, None if it never did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            return None
        if port_open(port):
            return time.monotonic() - proc.started
        time.sleep(0.02)
    return None


# ---------------------------------------------------------------------------------------------
# Load clients (all pinned to the client core)
# ---------------------------------------------------------------------------------------------


def run_wrk(port: int, scen: Scenario, reg: Registry, seconds: float) -> dict:
    argv = ["taskset", "-c", CORE_CLIENT, "wrk", f"-t{THREADS}", f"-c{CONNS}",
            f"-d{max(1, round(seconds))}s",
            "--timeout", "5s", "-s", str(HERE / "wrk.lua")]
    envv = dict(os.environ, ICP_HOSTS_FILE="")
    if scen.name in ("blocked", "newconn"):
        argv += ["-H", f"Host: {reg.unfiled_host}"]
    elif scen.name == "forwarded":
        argv += ["-H", f"Host: {reg.filed_host}"]
    elif scen.name == "mix":
        envv["ICP_HOSTS_FILE"] = str(reg.mix_hosts)
    if scen.name == "newconn":
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    r = subprocess.run(argv, capture_output=True, text=True, env=envv, preexec_fn=raise_nofile)
    m = re.search(r"^WRKJSON (\{.*\})$", r.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk failed: {r.stdout[-500:]} {r.stderr[-500:]}")
    j = json.loads(m.group(1))
    errs = j["connect_err"] + j["read_err"] + j["write_err"] + j["timeout"]
    return {"ops": j["requests"], "seconds": j["duration_us"] / 1e6,
            "p50_ms": j["p50_us"] / 1000, "p99_ms": j["p99_us"] / 1000, "errors": errs,
            "share_4xx": j["status_err"] / j["requests"] if j["requests"] else 0.0}


def run_tls_client(port: int, mode: str, sni: str, seconds: float) -> dict:
    argv = ["taskset", "-c", CORE_CLIENT, sys.executable, str(Path(__file__).resolve()),
            "_tlsclient", "--port", str(port), "--mode", mode, "--sni", sni,
            "--seconds", str(seconds), "--concurrency", str(INFLIGHT)]
    r = subprocess.run(argv, capture_output=True, text=True, preexec_fn=raise_nofile)
    if r.returncode != 0:
        raise RuntimeError(f"tls client failed: {r.stderr[-800:]}")
    return json.loads(r.stdout)


def run_bulk(port: int, reg: Registry, size: int, first: int | None = None) -> dict:
    """Downloads the bulk file through the proxy; `first`: only its first bytes (warm-up)."""
    url = f"https://{reg.filed_host}:{port}/big"
    argv = ["taskset", "-c", CORE_CLIENT, "curl", "-s", "-k", "--http1.1", "--resolve",
            f"{reg.filed_host}:{port}:127.0.0.1", "-o", "/dev/null", "-w",
            "%{http_code} %{size_download} %{time_total}", url]
    if first is not None:
        argv[-1:-1] = ["-r", f"0-{first - 1}"]
    r = subprocess.run(argv, capture_output=True, text=True)
    code, got, total = r.stdout.split()
    ok = (code, int(got)) == (("200", size) if first is None else ("206", first))
    return {"ops": int(got) / 2**20, "seconds": float(total), "p50_ms": None, "p99_ms": None,
            "errors": 0 if ok else 1}


def run_short(scen: Scenario, port: int, reg: Registry, seconds: float, args) -> dict:
    """A shorter run of the scenario's load, not the measurement (warm-up, the --syscalls pass):
    `seconds` of it, or for bulk a transfer of an eighth of the file."""
    if scen.client == "bulk":
        return run_bulk(port, reg, args.bulk_bytes, first=args.bulk_bytes // 8)
    return run_client(scen, port, reg, seconds, args.bulk_bytes)


def run_client(scen: Scenario, port: int, reg: Registry, seconds: float, bulk: int) -> dict:
    if scen.client == "wrk":
        return run_wrk(port, scen, reg, seconds)
    if scen.client == "tls-handshake":
        return run_tls_client(port, "handshake", reg.filed_host, seconds)
    if scen.client == "tls-refuse":
        return run_tls_client(port, "refuse", reg.unfiled_host, seconds)
    return run_bulk(port, reg, bulk)


# ---------------------------------------------------------------------------------------------
# The TLS connection client (runs as its own process: `bench.py _tlsclient ...`)
# ---------------------------------------------------------------------------------------------


def client_hello(sni: str) -> bytes:
    """A real OpenSSL ClientHello (TLS 1.3, X25519 key share) for `sni`, sent verbatim."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def tls_client_main(argv: list[str]) -> None:
    """Epoll loop keeping `concurrency` connections in flight until `seconds` have passed.

    handshake: connect, full TLS handshake (through the proxy, with the origin), GET /, read to
               the end, close. A connection counts when the origin's 200 arrived.
    refuse:    connect, send a ClientHello, read until the proxy closes; counts when it did not
               let the handshake through (an alert, a plain close, or a reset)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=["handshake", "refuse"], required=True)
    ap.add_argument("--sni", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--concurrency", type=int, default=16)
    a = ap.parse_args(argv)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.options |= ssl.OP_NO_TICKET
    hello = client_hello(a.sni)
    request = f"GET / HTTP/1.1\r\nHost: {a.sni}\r\nConnection: close\r\n\r\n".encode()
    addr = ("127.0.0.1", a.port)
    ep = select.epoll()
    conns: dict[int, dict] = {}
    lat: list[float] = []
    outcomes: dict[str, int] = {}

    def count(what: str) -> None:
        outcomes[what] = outcomes.get(what, 0) + 1

    def open_one() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = time.perf_counter()
        rc = s.connect_ex(addr)
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            count(f"connect:{errno.errorcode.get(rc, rc)}")
            return
        c = {"s": s, "t": t, "state": "connecting", "data": b""}
        conns[s.fileno()] = c
        ep.register(s.fileno(), select.EPOLLOUT)

    def finish(fd: int, what: str, ok: bool) -> None:
        c = conns.pop(fd)
        ep.unregister(fd)
        c["s"].close()
        count(what)
        if ok:
            lat.append(time.perf_counter() - c["t"])

    def flush(c: dict) -> None:
        out = c["out"].read()
        if out and c["s"].send(out) != len(out):
            raise OSError("short send")

    def tls_step(fd: int, c: dict) -> None:
        """Advance the handshake / the response read as far as the bytes allow."""
        obj = c["obj"]
        if c["state"] == "handshake":
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                flush(c)
                return
            obj.write(request)
            flush(c)
            c["state"] = "response"
        while True:
            try:
                chunk = obj.read(65536)
            except ssl.SSLWantReadError:
                return
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                chunk = b""
            if not chunk:
                ok = c["data"].startswith(b"HTTP/1.1 200")
                finish(fd, "ok" if ok else "bad-answer", ok)
                return
            c["data"] += chunk

    start = time.perf_counter()
    end = start + a.seconds
    for _ in range(a.concurrency):
        open_one()
    while conns:
        now = time.perf_counter()
        for fd in [fd for fd, c in conns.items() if now - c["t"] > 10]:
            finish(fd, "timeout", False)
        for fd, ev in ep.poll(0.5):
            c = conns.get(fd)
            if c is None:
                continue
            s = c["s"]
            try:
                if c["state"] == "connecting":
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        finish(fd, f"connect:{errno.errorcode.get(err, err)}", False)
                        continue
                    ep.modify(fd, select.EPOLLIN)
                    if a.mode == "refuse":
                        s.send(hello)
                        c["state"] = "refuse"
                    else:
                        c["inb"], c["out"] = ssl.MemoryBIO(), ssl.MemoryBIO()
                        c["obj"] = ctx.wrap_bio(c["inb"], c["out"], server_hostname=a.sni)
                        c["state"] = "handshake"
                        tls_step(fd, c)
                    continue
                data = s.recv(65536)
                if c["state"] == "refuse":
                    if data:
                        c["data"] += data
                        continue
                    first = c["data"][:1]
                    if first == b"\x16":
                        finish(fd, "NOT-REFUSED", False)
                    else:
                        finish(fd, "alert" if first == b"\x15" else "close", True)
                    continue
                if data:
                    c["inb"].write(data)
                else:
                    c["inb"].write_eof()
                tls_step(fd, c)
            except ConnectionResetError:
                if c["state"] == "refuse" and not c["data"].startswith(b"\x16"):
                    finish(fd, "reset", True)
                else:
                    finish(fd, "reset", False)
            except (OSError, ssl.SSLError) as e:
                finish(fd, f"error:{type(e).__name__}", False)
        while len(conns) < a.concurrency and time.perf_counter() < end:
            open_one()
    seconds = time.perf_counter() - start
    lat.sort()

    def pct(p: float) -> float | None:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else None

    bad = sum(v for k, v in outcomes.items() if k not in ("ok", "alert", "close", "reset")
              or (k == "reset" and a.mode == "handshake"))
    print(json.dumps({"ops": len(lat), "seconds": seconds, "p50_ms": pct(0.50),
                      "p99_ms": pct(0.99), "errors": bad, "outcomes": outcomes}))


# ---------------------------------------------------------------------------------------------
# One measurement
# ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    scenario: str
    n: int
    round: int
    contender: str
    ready_s: float | None = None
    ops: float = 0
    seconds: float = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_us_per_op: float | None = None
    rss_mib: float | None = None
    pss_mib: float | None = None
    errors: int = 0
    share_4xx: float | None = None
    noise_pct: float | None = None  # share of core 0 used by something else
    user_pct: float | None = None  # share of the CPU time spent in user mode
    sleeps_per_op: float | None = None  # voluntary context switches (wake-ups) per operation
    segs_per_op: float | None = None  # TCP segments sent on the machine per operation
    syscalls_per_op: float | None = None  # from the separate --syscalls pass
    outcomes: dict = field(default_factory=dict)
    failure: str | None = None

    @property
    def rate(self) -> float | None:
        return self.ops / self.seconds if self.seconds else None

    @property
    def user_us_per_op(self) -> float | None:
        """CPU µs/op split by the user/system tick shares (ticks are samples, the total is
        exact)."""
        if self.cpu_us_per_op is None or self.user_pct is None:
            return None
        return self.cpu_us_per_op * self.user_pct / 100

    @property
    def kernel_us_per_op(self) -> float | None:
        u = self.user_us_per_op
        return None if u is None else self.cpu_us_per_op - u


def round_order(rnd: int) -> list[str]:
    """The contenders in the order round `rnd` measures them: each round starts one further
    along, so no contender always takes the first place of a scenario (in four runs the first
    measurement of a run, always icp-gate's, cost 1.2-1.3x its second)."""
    k = (rnd - 1) % len(CONTENDERS)
    return CONTENDERS[k:] + CONTENDERS[:k]


def measure(env: Env, scen: Scenario, reg: Registry, rnd: int, who: str, args) -> Result:
    res = Result(scen.name, reg.n, rnd, who)
    tag = f"{scen.name}-n{reg.n}-r{rnd}-{who}"
    proc, port = start_contender(env, who, scen.kind, reg, tag)
    try:
        if wait_ready(proc, port, timeout=300) is None:
            res.failure = f"did not start (see logs/{tag}.log)"
            return res
        # The port may open before the registry is in: probe until the answers are right.
        # `ready` is the time from spawn to the first fully correct answers.
        why, deadline = "no answer", time.monotonic() + 300
        while time.monotonic() < deadline and proc.alive():
            try:
                if (why := probe(scen.kind, port, reg)) is None:
                    res.ready_s = time.monotonic() - proc.started
                    break
            except OSError as e:
                why = f"{type(e).__name__}: {e}"
            time.sleep(0.02)
        if why is not None:
            res.failure = f"wrong answers: {why}"
            return res
        # Warm-up, not measured.
        if run_short(scen, port, reg, args.warmup, args)["errors"] and scen.client == "bulk":
            res.failure = "bulk warm-up transfer failed"
            return res
        pids = proc.pids()
        segs0 = tcp_out_segments()
        busy0, _ = core_busy_ns(CORE_SERVER)
        cpu0 = thread_counters(pids)
        t0 = time.monotonic()
        out = run_client(scen, port, reg, args.duration, args.bulk_bytes)
        wall = time.monotonic() - t0
        delta = counters_delta(cpu0, thread_counters(proc.pids()))
        busy1, _ = core_busy_ns(CORE_SERVER)
        segs1 = tcp_out_segments()
        res.ops, res.seconds = out["ops"], out["seconds"]
        res.p50_ms, res.p99_ms, res.errors = out["p50_ms"], out["p99_ms"], out["errors"]
        res.share_4xx = out.get("share_4xx")
        res.outcomes = out.get("outcomes", {})
        def per_op(total: float) -> float | None:
            return total / res.ops if res.ops else None
        res.cpu_us_per_op = per_op(delta.ns / 1000)
        ticks = delta.utime + delta.stime
        # The split is sampled per clock tick: below MIN_SPLIT_TICKS it says nothing.
        res.user_pct = delta.utime / ticks * 100 if ticks >= MIN_SPLIT_TICKS else None
        res.sleeps_per_op = per_op(delta.sleeps)
        res.segs_per_op = per_op(segs1 - segs0)
        if THREADS == 1:
            res.noise_pct = max(0.0, (busy1 - busy0 - delta.ns) / (wall * 1e9) * 100)
        res.rss_mib, res.pss_mib = memory(proc.pids())
        if args.syscalls and proc.alive():
            res.syscalls_per_op = count_syscalls(env, scen, port, reg, proc.pids(), args)
        if not proc.alive():
            res.failure = "exited during the run"
        return res
    except Exception as e:  # a broken measurement is reported, the run goes on
        res.failure = f"{type(e).__name__}: {e}"
        return res
    finally:
        proc.stop()
        shutil.rmtree(env.work / "state" / tag, ignore_errors=True)  # icp-gate's registry state


SYSCALL_EVENT = "raw_syscalls:sys_enter"


def perf_can_count() -> str | None:
    """None when `perf stat` can count system calls here, else why not."""
    if not shutil.which("perf"):
        return "perf not found (Debian: linux-perf)"
    r = subprocess.run(["perf", "stat", "-x,", "-e", SYSCALL_EVENT, "--", "true"],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"perf stat -e {SYSCALL_EVENT}: {r.stderr.strip()}"


def count_syscalls(env: Env, scen: Scenario, port: int, reg: Registry, pids: list[int],
                   args) -> float | None:
    """System calls per operation, from a second, shorter run of the same load under
    `perf stat` (a tracepoint hit per call slows the contender by a few %, so the timed
    measurement never runs under it)."""
    out_file = env.work / "tmp" / "perf-syscalls.csv"
    perf = subprocess.Popen(["perf", "stat", "-x,", "-e", SYSCALL_EVENT, "-o", str(out_file),
                             "-p", ",".join(map(str, pids))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)  # attached before the load starts
        out = run_short(scen, port, reg, min(3.0, args.duration), args)
    finally:
        perf.send_signal(signal.SIGINT)  # perf prints its counts on SIGINT
        perf.wait(timeout=10)
    for line in out_file.read_text().splitlines():
        f = line.split(",")
        if len(f) > 2 and f[2].startswith(SYSCALL_EVENT) and f[0].isdigit():
            return int(f[0]) / out["ops"] if out["ops"] else None
    return None


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, spec=".1f", none="–"):
    return none if v is None else format(v, spec)


def ratio(a, b, spec=".2f"):
    return "–" if a is None or not b else f"{a / b:{spec}}×"


def ratio_pairs(agg: dict[str, dict]):
    """(contender, its figures, other, its figures) for every ratio row of a table: each
    icp-gate shape against each anchor, its --before-binary build and the floor; the floor
    against each anchor (the least any proxy could cost, as a share of theirs)."""
    for mine in [c for c in agg if c.startswith("icp-gate") and c != BEFORE_CONTENDER]:
        for who in ANCHORS + [BEFORE_CONTENDER, FLOOR]:
            if who in agg:
                yield mine, agg[mine], who, agg[who]
    if FLOOR in agg:
        for who in ANCHORS:
            if who in agg:
                yield FLOOR, agg[FLOOR], who, agg[who]


def scenario_table(scen: Scenario, n: int, results: list[Result]) -> list[str]:
    """Median over rounds per contender, then icp-gate's ratio to each anchor."""
    unit = scen.unit
    rate_h = "MiB/s" if unit == "MiB" else f"{unit}/s"
    cpu_h = f"CPU µs/{unit}"
    desc = scen.description.format(conns=CONNS, inflight=INFLIGHT,
                                   page="~2 KB" if PAGE == "large" else "~200-byte")
    lines = [f"### {scen.name}, N = {n:,}", "", desc, "",
             f"| contender | {rate_h} | p50 ms | p99 ms | {cpu_h} | peak RSS MiB | PSS MiB "
             f"| ready s | errors | core-0 noise % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    agg = {}
    for who in CONTENDERS:
        rs = [r for r in results if r.contender == who and r.failure is None]
        fails = [r.failure for r in results if r.contender == who and r.failure]
        if not rs:
            if fails:
                lines.append(f"| {who} | FAILED: {fails[0]} | | | | | | | | |")
            continue
        a = {k: med([getattr(r, k) for r in rs]) for k in
             ("rate", "p50_ms", "p99_ms", "cpu_us_per_op", "user_us_per_op",
              "kernel_us_per_op", "sleeps_per_op", "segs_per_op", "syscalls_per_op", "rss_mib",
              "pss_mib", "ready_s", "noise_pct")}
        agg[who] = a
        errs = sum(r.errors for r in rs)
        lines.append(f"| {who} | {fmt(a['rate'], ',.0f')} | {fmt(a['p50_ms'], '.2f')} "
                     f"| {fmt(a['p99_ms'], '.2f')} | {fmt(a['cpu_us_per_op'], '.2f')} "
                     f"| {fmt(a['rss_mib'], '.1f')} | {fmt(a['pss_mib'], '.1f')} "
                     f"| {fmt(a['ready_s'], '.2f')} | {errs}{' +' + str(len(fails)) + ' failed' if fails else ''} "
                     f"| {fmt(a['noise_pct'], '.0f')} |")
    for mine, g, who, b in ratio_pairs(agg):
        lines.append(f"| *{mine} ÷ {who}* | {ratio(g['rate'], b['rate'])} "
                     f"| {ratio(g['p50_ms'], b['p50_ms'])} | {ratio(g['p99_ms'], b['p99_ms'])} "
                     f"| {ratio(g['cpu_us_per_op'], b['cpu_us_per_op'])} "
                     f"| {ratio(g['rss_mib'], b['rss_mib'])} | {ratio(g['pss_mib'], b['pss_mib'])} "
                     f"| {ratio(g['ready_s'], b['ready_s'])} | | |")
    lines += [""] + work_table(unit, agg)
    # sanity notes (never assertions): answers of the wrong kind make a row meaningless
    notes = []
    for r in results:
        if scen.expect_4xx is not None and r.share_4xx is not None and r.failure is None \
                and abs(r.share_4xx - scen.expect_4xx) > 0.02:
            notes.append(f"round {r.round} {r.contender}: {r.share_4xx:.1%} 4xx answers, "
                         f"expected {scen.expect_4xx:.0%}")
        if r.errors and r.failure is None:
            notes.append(f"round {r.round} {r.contender}: {r.errors} failed operations "
                         f"{r.outcomes or ''}")
    if notes:
        lines += ["", "Check: " + "; ".join(notes) + "."]
    return lines + [""]


def work_table(unit: str, agg: dict[str, dict]) -> list[str]:
    """Where each contender's CPU per operation goes (medians over rounds): user and kernel
    time, wake-ups, and the TCP segments the operation put on loopback (all peers, from
    /proc/net/snmp). Equal segments and sleeps with unequal kernel time would point at the
    proxy; equal kernel time says the proxies do the same kernel work."""
    lines = [f"Work per {unit}:", "",
             "| contender | CPU µs | user µs | kernel µs | sleeps | TCP segments | syscalls |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    keys = ("cpu_us_per_op", "user_us_per_op", "kernel_us_per_op", "sleeps_per_op",
            "segs_per_op", "syscalls_per_op")
    for who, a in agg.items():
        lines.append(f"| {who} | " + " | ".join(fmt(a[k], ".2f") for k in keys) + " |")
    for mine, g, who, b in ratio_pairs(agg):
        # a ratio of wake-ups is noise when the anchor hardly sleeps (a saturated core)
        cells = [ratio(g[k], b[k]) if k != "sleeps_per_op" or (b[k] or 0) >= 0.05 else "–"
                 for k in keys]
        lines.append(f"| *{mine} ÷ {who}* | " + " | ".join(cells) + " |")
    return lines


def rounds_table(results: list[Result]) -> list[str]:
    lines = ["| scenario | N | round | contender | ops/s | p50 ms | p99 ms | CPU µs/op "
             "| user % | sleeps/op | segments/op | syscalls/op | RSS MiB | ready s | 4xx "
             "| core-0 noise % | outcome |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        oc = r.failure or (", ".join(f"{k} {v}" for k, v in sorted(r.outcomes.items())) or "ok")
        lines.append(f"| {r.scenario} | {r.n:,} | {r.round} | {r.contender} | {fmt(r.rate, ',.0f')} "
                     f"| {fmt(r.p50_ms, '.2f')} | {fmt(r.p99_ms, '.2f')} "
                     f"| {fmt(r.cpu_us_per_op, '.2f')} | {fmt(r.user_pct, '.0f')} "
                     f"| {fmt(r.sleeps_per_op, '.2f')} | {fmt(r.segs_per_op, '.2f')} "
                     f"| {fmt(r.syscalls_per_op, '.2f')} | {fmt(r.rss_mib, '.1f')} "
                     f"| {fmt(r.ready_s, '.2f')} "
                     f"| {'–' if r.share_4xx is None else format(r.share_4xx, '.0%')} "
                     f"| {fmt(r.noise_pct, '.0f')} | {oc} |")
    return lines


def congestion_control() -> str:
    """The system's default TCP congestion control: with `bbr` every sender paces itself with
    timers, which on loopback moves the TLS bulk figures (docs/performance.md, "TLS bulk")."""
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            return f.read().strip()
    except OSError:
        return "?"


def machine_lines(env: Env, args, load_before: str) -> list[str]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
                           capture_output=True, text=True).stdout.strip()
    return [
        f"- date: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}; command: "
        f"`{os.environ.get('ICP_LOAD_COMMAND') or 'bench.py ' + ' '.join(sys.argv[1:])}`",
        f"- machine: {os.cpu_count()} × {cpu}, {platform.platform()}; load average before: "
        f"{load_before}, after: {' '.join(open('/proc/loadavg').read().split()[:3])}; "
        f"TCP congestion control: {congestion_control()}",
        f"- icp-gate {rev}{' (src/ modified)' if dirty else ''}"
        + (f" ({BEFORE_CONTENDER}: {env.before})" if env.before else "") + f", nginx {ver(['nginx', '-v'])}, "
        f"HAProxy {ver(['haproxy', '-v'])}, wrk {ver(['wrk', '-v'])}, "
        f"curl {ver(['curl', '--version'])}, Python {platform.python_version()}",
        (f"- contender on core {CORE_SERVER}; load generator and the shared origin (nginx) on "
         f"core {CORE_CLIENT}" if THREADS == 1 else
         f"- {THREADS} workers per contender (icp-gate: `--threads {THREADS}`, "
         f"{SHAPE_CONTENDER}: the same with `--runtime work-stealing`; nginx: "
         f"`worker_processes {THREADS}` with `reuseport`; HAProxy: `nbthread {THREADS}`), wrk "
         f"with {THREADS} threads; nothing pinned except the origin (one nginx worker, on "
         f"core 1), so contenders and load generator share every core")
        + f"; {args.rounds} round(s) of {', '.join(CONTENDERS)} in turn, "
        f"shape {args.shape} (wrk {CONNS} connections, TLS {INFLIGHT} in flight), "
        f"{'~2 KB' if PAGE == 'large' else '~200-byte'} block page, "
        f"{args.duration:g} s per measurement after {args.warmup:g} s of warm-up; tables show "
        f"the median over rounds",
    ]


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="scenarios: " + ", ".join(s.name for s in SCENARIOS))
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: N=1000 only, one round, 3 s per measurement")
    ap.add_argument("--scenarios", default="all",
                    help="comma-separated scenario names, or all / http / tls (default all)")
    ap.add_argument("--sizes", default=None, help="registry sizes, e.g. 1000,1000000 "
                    "(default 1000,1000000; --quick: 1000)")
    ap.add_argument("--rounds", type=int, default=None, help="default 2 (--quick: 1)")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds per measurement (default 10, --quick 3)")
    ap.add_argument("--warmup", type=float, default=None, help="default 2 (--quick 1)")
    ap.add_argument("--contenders", default=None,
                    help=f"default {','.join(CONTENDERS)} (--threads above 1: also "
                         f"{SHAPE_CONTENDER}; --before-binary: also {BEFORE_CONTENDER}); "
                         f"the tuned anchors: {','.join(TUNED)}; the bare epoll loop: {FLOOR} "
                         f"(only {', '.join(FLOOR_SCENARIOS)})")
    ap.add_argument("--threads", type=int, default=1,
                    help="workers per contender (default 1, each pinned to core 0); above 1 "
                         "nothing is pinned and icp-gate's work-stealing shape runs too")
    ap.add_argument("--shape", choices=["default", "saturated"], default="default",
                    help="default: 50 keep-alive connections (wrk), 16 TLS connections in "
                         "flight; saturated: 64 and 64 (override with --conns / --inflight)")
    ap.add_argument("--conns", type=int, default=None, help="wrk's connections")
    ap.add_argument("--inflight", type=int, default=None,
                    help="TLS client: connections in flight")
    ap.add_argument("--page", choices=["large", "small"], default="large",
                    help="block page: icp-gate's built-in ~2 KB one (default) or a ~200-byte "
                         "one (conf/block-small.html); every contender renders the same")
    ap.add_argument("--binary", type=Path, default=REPO / "target" / "release" / "icp-gate")
    ap.add_argument("--before-binary", type=Path, default=None,
                    help=f"an older icp-gate build, measured as `{BEFORE_CONTENDER}` in the same "
                         "run (before and after in one sitting)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep generated data and logs here (default: a temporary dir, removed)")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--syscalls", action="store_true",
                    help="after each measurement, count the contender's system calls per "
                         "operation in a second, shorter run under `perf stat` (needs perf)")
    a = ap.parse_args()
    a.sizes = [int(x.replace("_", "")) for x in (a.sizes or ("1000" if a.quick
                                                                else "1000,1000000")).split(",")]
    a.rounds = a.rounds or (1 if a.quick else 2)
    a.duration = a.duration or (3.0 if a.quick else 10.0)
    a.warmup = a.warmup if a.warmup is not None else (1.0 if a.quick else 2.0)
    a.bulk_bytes = (256 if a.quick else 1024) * 2**20
    a.scenario_arg = a.scenarios
    if a.scenarios in ("all", "http", "tls"):
        a.scenarios = [s.name for s in SCENARIOS if a.scenarios in ("all", s.kind)]
    else:
        a.scenarios = a.scenarios.split(",")
        unknown = [s for s in a.scenarios if s not in SCENARIO_BY_NAME]
        if unknown:
            ap.error(f"unknown scenario(s) {unknown}; known: {[s.name for s in SCENARIOS]}")
    known = CONTENDERS + [SHAPE_CONTENDER, BEFORE_CONTENDER, *TUNED, FLOOR]
    if a.contenders is None:
        a.contenders = ",".join(CONTENDERS[:1] + [SHAPE_CONTENDER] + CONTENDERS[1:]
                                if a.threads > 1 else CONTENDERS)
        if a.before_binary:
            a.contenders = a.contenders.replace("icp-gate,", f"icp-gate,{BEFORE_CONTENDER},", 1)
    a.contenders = [c for c in a.contenders.split(",") if c]
    if set(a.contenders) - set(known):
        ap.error(f"contenders are {known}")
    if a.threads < 1:
        ap.error("--threads must be at least 1")
    if BEFORE_CONTENDER in a.contenders and not a.before_binary:
        ap.error(f"{BEFORE_CONTENDER} needs --before-binary")
    saturated = a.shape == "saturated"
    a.conns = a.conns or (64 if saturated else 50)
    a.inflight = a.inflight or (64 if saturated else 16)
    return a


def set_name(a) -> str:
    """Results file label: quick, full, or what was picked (e.g. http-n1000)."""
    threads = f"-t{a.threads}" if a.threads > 1 else ""
    threads += ("-saturated" if a.shape == "saturated" else "") + \
        ("-small" if a.page == "small" else "")
    if a.quick and a.scenario_arg == "all" and a.sizes == [1000]:
        return "quick" + threads
    if a.scenario_arg == "all" and a.sizes == [1000, 1000000]:
        return "full" + threads
    return (f"{a.scenario_arg.replace(',', '+')}-n" + "-".join(str(n) for n in a.sizes)
            + threads)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_tlsclient":
        return tls_client_main(sys.argv[2:])
    global CONTENDERS, THREADS, CORE_SERVER, CORE_CLIENT, CONNS, INFLIGHT, PAGE
    args = parse_args()
    CONTENDERS = args.contenders
    CONNS, INFLIGHT, PAGE = args.conns, args.inflight, args.page
    THREADS = args.threads
    if THREADS > 1:
        everywhere = f"0-{os.cpu_count() - 1}"
        CORE_SERVER = CORE_CLIENT = everywhere
    if not args.binary.exists():
        raise SystemExit(f"{args.binary}: not built (run.sh builds it)")
    for tool in ("nginx", "haproxy", "wrk", "curl", "openssl", "taskset"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found (run.sh installs it)")
    if any(SCENARIO_BY_NAME[s].kind == "tls" for s in args.scenarios) and \
            "nginx" in CONTENDERS and not Path(NGINX_STREAM_MODULE).exists():
        raise SystemExit(f"{NGINX_STREAM_MODULE} missing: apt-get install libnginx-mod-stream")
    if os.cpu_count() < 2:
        raise SystemExit("needs two cores: one for the contender, one for the load generator")
    raise_nofile()
    busy = [p for p in [18080, 18443, *[x for pp in CONTENDER_PORTS.values() for x in pp]]
            if port_open(p)]
    if busy:
        raise SystemExit(f"ports {busy} are in use: is another run going on?")

    if args.syscalls and (why := perf_can_count()):
        raise SystemExit(f"--syscalls: {why}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="icp-gate-load."))
    for sub in ("logs", "tmp", "state"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    if args.before_binary and not args.before_binary.exists():
        raise SystemExit(f"{args.before_binary}: no such file")
    env = Env(work, args.binary.resolve(),
              args.before_binary.resolve() if args.before_binary else None)
    load_before = " ".join(open("/proc/loadavg").read().split()[:3])
    planned = len(args.scenarios) * len(args.sizes) * args.rounds * len(CONTENDERS)
    log(f"work dir {work}; {planned} measurements of {args.duration:g}s "
        f"(scenarios {','.join(args.scenarios)}; N {args.sizes}; {args.rounds} round(s))")

    if FLOOR in CONTENDERS:
        subprocess.run(["cc", "-O2", "-o", str(work / "floor"), str(HERE / "floor.c")],
                       check=True)
    regs = {n: generate_registry(n, work) for n in args.sizes}
    origin = start_origin(env, args.bulk_bytes)
    results: list[Result] = []
    out_lines: list[str] = []
    try:
        for n in args.sizes:
            for name in args.scenarios:
                scen = SCENARIO_BY_NAME[name]
                if scen.client == "bulk":
                    # One transfer straight from the origin first (not measured): the first
                    # proxied bulk transfer after a connection-heavy scenario — always icp-gate's,
                    # as it goes first — ran up to twice the CPU per MiB of later ones.
                    if run_bulk(PORTS["ORIGIN_TLS"], regs[n], args.bulk_bytes)["errors"]:
                        log("the settling transfer straight from the origin failed")
                batch = []
                for rnd in range(1, args.rounds + 1):
                    for who in round_order(rnd):  # A B C, B C A, ...
                        if who == FLOOR and name not in FLOOR_SCENARIOS:
                            continue
                        r = measure(env, scen, regs[n], rnd, who, args)
                        batch.append(r)
                        log(f"{name:14} N={n:<9,} round {rnd} {who:15} "
                            + (f"FAILED: {r.failure}" if r.failure else
                               f"{fmt(r.rate, ',.0f'):>10} {scen.unit}/s  "
                               f"{fmt(r.cpu_us_per_op, '.2f'):>8} µs/{scen.unit}  "
                               f"p99 {fmt(r.p99_ms, '.2f')} ms  RSS {fmt(r.rss_mib, '.0f')} MiB"
                               f"  noise {fmt(r.noise_pct, '.0f')}%"))
                results += batch
                table = scenario_table(scen, n, batch)
                print("\n".join(table), flush=True)
                out_lines += table
    finally:
        origin.stop()

    md = ["# icp-gate load harness: icp-gate vs nginx vs HAProxy", ""]
    md += machine_lines(env, args, load_before) + [""]
    md += ["Ratios are icp-gate's figure divided by the anchor's (CPU, latency, memory: lower is "
           "better; rate: higher is better). Compare only inside one run.", ""]
    md += out_lines + ["## Every measurement", ""] + rounds_table(results) + [""]
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{dt.date.today().isoformat()}-{set_name(args)}.md"
    if path.exists():
        path = path.with_name(path.stem + dt.datetime.now().strftime("-%H%M%S") + ".md")
    path.write_text("\n".join(md), encoding="utf-8")
    log(f"written {path}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        log(f"logs and configs kept in {work}")


if __name__ == "__main__":
    main()
