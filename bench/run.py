#!/usr/bin/env python3
"""The benchmark suite of issue 5: every comparison in one run, against one mock upstream.

Called by bench/run.sh (which installs the tools and builds the binaries). Runs only on
127.0.0.1, every step bounded in time, and writes target/bench/<run>/results.json; then
bench/report.py turns that into BENCHMARKS.md and bench/charts/*.svg.

Layout on the 2-core machine: the load generator (wrk or bench_load) and the mock upstream
are pinned to CPU 0, the proxy under test to CPU 1. Every proxy gets that one core: ours
(one CPU, so tokio's current-thread scheduler), nginx with `worker_processes 1`, HAProxy with
`nbthread 1`. "direct" means the load generator talks to the mock itself.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import residence  # noqa: E402  (bench/residence.py)
from report import unheld  # noqa: E402  (bench/report.py: one test of a held rate)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
REL = os.path.join(ROOT, "target", "release")
PROXY_BIN = os.path.join(REL, "openai-stream-proxy")
MOCK_BIN = os.path.join(REL, "examples", "bench_upstream")
LOAD_BIN = os.path.join(REL, "examples", "bench_load")
FLOOR_BIN = os.path.join(REL, "examples", "hyper_floor")

CPU_LOAD = "0"   # load generator + mock
CPU_PROXY = "1"  # proxy under test

MOCK_PORT = 19100
# Targets that are the mock itself: "direct" (the mock on the load generator's core) and "hop"
# (the mock moved onto the proxy's core for the run: one cross-core hop and no proxy).
DIRECT = ("direct", "hop")
# "floor": hyper's server and client with nothing of ours between them (examples/hyper_floor.rs),
# the least a hyper-based relay costs; a reference, not a competitor.
PORTS = {"ours": 19201, "nginx": 19202, "haproxy": 19203, "floor": 19209}
PORT_OURS_INFO = 19204
PORT_MEM = 19205
PORT_WS = 19206
PORT_STARTUP = 19207
PORT_CALLGRIND = 19208

CHAT = "/v1/chat/completions"
RESP = "/v1/responses"
BODY_STREAM = '{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello"}],"stream":true}'
BODY_PLAIN = '{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello"}]}'
BODY_RESP_STREAM = '{"model":"gpt-4o","input":"Say hello","stream":true}'
BODY_RESP_PLAIN = '{"model":"gpt-4o","input":"Say hello"}'
CLK_TCK = os.sysconf("SC_CLK_TCK")
# `--nice N` runs every benchmark process at that niceness (root only): on a machine shared
# with other work it keeps the measurement from being preempted. Off by default, because it
# slows whatever else runs on the machine.
NICE = []


def log(*args):
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


# ---------------------------------------------------------------------------------------
# processes

def children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def system_ticks():
    """(process time: user+nice+system, softirq+irq, steal) of the whole machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2], v[5] + v[6], v[7])


def repin(proc, cpu):
    for pid in proc.pids():
        subprocess.run(["taskset", "-a", "-p", "-c", cpu, str(pid)], capture_output=True)


class Proc:
    def __init__(self, name, cmd, cpu=None, env=None, logfile=None):
        self.name = name
        full = NICE + (["taskset", "-c", cpu] if cpu is not None else []) + cmd
        self.log = open(logfile, "w") if logfile else subprocess.DEVNULL
        e = dict(os.environ)
        e.update(env or {})
        self.popen = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=self.log,
                                      stderr=self.log, env=e, start_new_session=True)
        self.pid = self.popen.pid

    def pids(self):
        return [self.pid] + children(self.pid)

    def rss_kib(self):
        return sum(status_kib(p, "VmRSS:") for p in self.pids())

    def stop(self):
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)


def wait_port(port, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def http(method, url, body=None, timeout=10):
    req = urllib.request.Request(url, method=method, data=body.encode() if body else None,
                                 headers={"Content-Type": "application/json",
                                          "Authorization": "Bearer sk-bench"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def run_measured(cmd, cpu, env=None, timeout=120, watch=()):
    """Runs a load command pinned to `cpu`; returns its exit status and the CPU seconds
    used by it, by every process in `watch`, and by the rest of the machine meanwhile."""
    full = NICE + ["taskset", "-c", cpu] + cmd
    e = dict(os.environ)
    e.update(env or {})
    watch_pids = [p for w in watch for p in w.pids()]
    t0 = time.time()
    sys0, watched0 = system_ticks(), cpu_ticks(watch_pids)
    p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env=e)
    deadline = t0 + timeout
    status = None
    while status is None:
        pid, st, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            status = os.waitstatus_to_exitcode(st)
            break
        if time.time() > deadline:
            p.kill()
            pid, st, ru = os.wait4(p.pid, 0)
            status = -9
            break
        time.sleep(0.02)
    out = p.stdout.read().decode(errors="replace")
    wall = time.time() - t0
    sys1 = system_ticks()
    proc_time, irq, steal = ((b - a) / CLK_TCK for a, b in zip(sys0, sys1))
    watched = (cpu_ticks(watch_pids) - watched0) / CLK_TCK
    load = ru.ru_utime + ru.ru_stime
    pct = (lambda x: max(0.0, x / wall * 100.0)) if wall > 0 else (lambda x: 0.0)
    return {
        "status": status,
        "output": out[-2000:],
        "wall_s": wall,
        "load_cpu_s": load,
        "watched_cpu_s": watched,
        # CPU used meanwhile by processes outside the benchmark (other users of the box),
        # in % of one core; softirq and steal are reported apart.
        "foreign_cpu_pct": pct(proc_time - watched - load),
        "softirq_pct": pct(irq),
        "steal_pct": pct(steal),
    }


# ---------------------------------------------------------------------------------------
# the suite

class Suite:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.dir = os.path.join(ROOT, "target", "bench", f"run-{stamp}{'-quick' if self.quick else ''}")
        self.raw = os.path.join(self.dir, "raw")
        os.makedirs(self.raw, exist_ok=True)
        self.results = {"meta": {}, "sections": {}}
        self.procs = []
        self.counter = 0
        self.started = time.time()

    # -- helpers -----------------------------------------------------------------------

    def path(self, name):
        self.counter += 1
        return os.path.join(self.raw, f"{self.counter:03d}-{name}.json")

    def url(self, target, path, query, port=None):
        p = MOCK_PORT if target in DIRECT else (port or PORTS[target])
        return f"http://127.0.0.1:{p}{path}?{query}"

    def watch_for(self, target):
        if target in DIRECT:
            return [self.mock]
        return [self.mock, self.proxies[target]]

    def proxy_for(self, target):
        return None if target in DIRECT else self.proxies[target]

    def measured(self, target, run_fn):
        """`cpu_split`, with the mock moved onto the proxy's core for the `hop` control."""
        if target != "hop":
            return self.cpu_split(target, run_fn)
        repin(self.mock, CPU_PROXY)
        try:
            return self.cpu_split(target, run_fn)
        finally:
            repin(self.mock, CPU_LOAD)

    def wrk(self, label, target, url, body, conns, duration, port=None):
        out = self.path(f"wrk-{label}")
        r = run_measured(["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--timeout", "10s",
                          "-s", os.path.join(BENCH, "wrk.lua"), url], CPU_LOAD,
                         env={"BENCH_BODY": body or "", "BENCH_OUT": out},
                         timeout=duration + 30, watch=self.watch_for(target))
        try:
            with open(out) as f:
                res = json.load(f)
        except (OSError, ValueError):
            raise RuntimeError(f"wrk {label} failed: {r['output']}")
        secs = res["duration_us"] / 1e6
        errors = sum(res["errors"].values())
        res.update({
            "tool": "wrk", "label": label, "target": target, "conns": conns,
            "rps": res["requests"] / secs, "errors_total": errors,
            "mean_bytes": res["bytes"] / max(1, res["requests"]),
            "foreign_cpu_pct": r["foreign_cpu_pct"], "load_cpu_s": r["load_cpu_s"],
            "steal_pct": r["steal_pct"], "softirq_pct": r["softirq_pct"],
        })
        res["watched_cpu_s"] = r["watched_cpu_s"]
        return res

    def load(self, mode, label, target, args, timeout=120, watch=None):
        out = self.path(f"{mode}-{label}")
        r = run_measured([LOAD_BIN, mode, "--out", out, "--label", label] + args, CPU_LOAD,
                         timeout=timeout,
                         watch=watch if watch is not None else self.watch_for(target))
        try:
            with open(out) as f:
                res = json.load(f)
        except (OSError, ValueError):
            raise RuntimeError(f"bench_load {mode} {label} failed: {r['output']}")
        res.update({"target": target, "foreign_cpu_pct": r["foreign_cpu_pct"],
                    "steal_pct": r["steal_pct"], "softirq_pct": r["softirq_pct"],
                    "watched_cpu_s": r["watched_cpu_s"], "load_cpu_s": r["load_cpu_s"]})
        return res

    def cpu_split(self, target, run_fn):
        """Runs `run_fn` and adds the CPU time of the proxy alone per request."""
        proxy = self.proxy_for(target)
        pids = proxy.pids() if proxy else []
        before = cpu_ticks(pids)
        mock_before = cpu_ticks(self.mock.pids())
        res = run_fn()
        used = (cpu_ticks(pids) - before) / CLK_TCK
        mock_used = (cpu_ticks(self.mock.pids()) - mock_before) / CLK_TCK
        n = res.get("requests") or res.get("events") or 0
        res["proxy_cpu_s"] = used if proxy else 0.0
        res["proxy_cpu_us_per_req"] = (used / n * 1e6) if (proxy and n) else None
        res["mock_cpu_us_per_req"] = (mock_used / n * 1e6) if n else None
        return res

    # -- start and stop ------------------------------------------------------------------

    def start_mock(self):
        self.mock = Proc("mock", [MOCK_BIN, "--listen", f"127.0.0.1:{MOCK_PORT}", "--threads", "1"],
                         cpu=CPU_LOAD, logfile=os.path.join(self.dir, "mock.log"))
        self.procs.append(self.mock)
        wait_port(MOCK_PORT)

    def ours_config(self, port, extra=None):
        cfg = {"timeoutSeconds": 600, "rules": [{"listenPort": port, "listenAddress": "127.0.0.1",
                                                 "upstreamUrl": f"http://127.0.0.1:{MOCK_PORT}"}]}
        if extra:
            cfg.update(extra)
        path = os.path.join(self.dir, f"ours-{port}.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        return path

    def start_ours(self, port, log_level="warn", cpu=CPU_PROXY, name=None):
        p = Proc(name or f"ours-{port}", [PROXY_BIN, "-c", self.ours_config(port)], cpu=cpu,
                 env={"RUST_LOG": log_level}, logfile=os.path.join(self.dir, f"ours-{port}.log"))
        self.procs.append(p)
        wait_port(port)
        return p

    def nginx_config(self, port, master="on"):
        with open(os.path.join(BENCH, "nginx.conf.in")) as f:
            text = f.read()
        for k, v in {"@DIR@": self.dir, "@PORT@": str(port), "@UPSTREAM_PORT@": str(MOCK_PORT),
                     "@MASTER@": master}.items():
            text = text.replace(k, v)
        for d in ("nginx-tmp-body", "nginx-tmp-proxy"):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        path = os.path.join(self.dir, f"nginx-{port}.conf")
        with open(path, "w") as f:
            f.write(text)
        return path

    def haproxy_config(self, port):
        with open(os.path.join(BENCH, "haproxy.cfg.in")) as f:
            text = f.read()
        text = text.replace("@PORT@", str(port)).replace("@UPSTREAM_PORT@", str(MOCK_PORT))
        path = os.path.join(self.dir, f"haproxy-{port}.cfg")
        with open(path, "w") as f:
            f.write(text)
        return path

    def start_fresh(self, target, port):
        """A fresh instance of a proxy (one core, as in the main runs) on `port`."""
        if target == "ours":
            return self.start_ours(port, name=f"ours-{port}")
        if target == "nginx":
            p = Proc(f"nginx-{port}", ["nginx", "-c", self.nginx_config(port), "-p", self.dir, "-e",
                                       os.path.join(self.dir, f"nginx-{port}-stderr.log")],
                     cpu=CPU_PROXY, logfile=os.path.join(self.dir, f"nginx-{port}.log"))
        else:
            p = Proc(f"haproxy-{port}", ["haproxy", "-db", "-f", self.haproxy_config(port)],
                     cpu=CPU_PROXY, logfile=os.path.join(self.dir, f"haproxy-{port}.log"))
        self.procs.append(p)
        wait_port(port)
        return p

    def floor_cmd(self, port):
        return [FLOOR_BIN, "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{MOCK_PORT}"]

    def start_all(self):
        self.start_mock()
        self.proxies = {}
        self.proxies["ours"] = self.start_ours(PORTS["ours"], name="ours")
        time.sleep(0.3)
        self.results["sections"]["idle_rss_main_kib"] = self.proxies["ours"].rss_kib()
        conf = self.nginx_config(PORTS["nginx"])
        self.proxies["nginx"] = Proc("nginx", ["nginx", "-c", conf, "-p", self.dir, "-e",
                                               os.path.join(self.dir, "nginx-stderr.log")],
                                     cpu=CPU_PROXY, logfile=os.path.join(self.dir, "nginx.log"))
        self.procs.append(self.proxies["nginx"])
        self.proxies["haproxy"] = Proc("haproxy", ["haproxy", "-db", "-f", self.haproxy_config(PORTS["haproxy"])],
                                       cpu=CPU_PROXY, logfile=os.path.join(self.dir, "haproxy.log"))
        self.procs.append(self.proxies["haproxy"])
        self.proxies["floor"] = Proc("floor", self.floor_cmd(PORTS["floor"]), cpu=CPU_PROXY,
                                     logfile=os.path.join(self.dir, "floor.log"))
        self.procs.append(self.proxies["floor"])
        for port in PORTS.values():
            wait_port(port)

    def stop_all(self):
        for p in reversed(self.procs):
            p.stop()

    # -- checks ---------------------------------------------------------------------------

    def sanity(self):
        """Every path answers 200 with the same bytes as the mock itself."""
        q = "events=20"
        _, direct = http("POST", self.url("direct", CHAT, q), BODY_STREAM)
        checks = {}
        for t in PORTS:
            status, body = http("POST", self.url(t, CHAT, q), BODY_STREAM)
            checks[f"{t} passthrough"] = status == 200 and body == direct
        status, body = http("POST", self.url("ours", CHAT, q), BODY_PLAIN)
        conv = json.loads(body)
        checks["ours conversion (chat)"] = status == 200 and conv["choices"][0]["message"]["content"].startswith("The quick brown")
        status, body = http("POST", self.url("ours", RESP, q), BODY_RESP_PLAIN)
        conv = json.loads(body)
        checks["ours conversion (responses)"] = status == 200 and conv["status"] == "completed"
        self.results["sections"]["sanity"] = checks
        log("sanity:", checks)
        if not all(checks.values()):
            raise RuntimeError(f"sanity check failed: {checks}")

    # -- 1. passthrough -------------------------------------------------------------------

    def passthrough(self):
        a = self.args
        targets = ["direct", "ours", "nginx", "haproxy", "floor"]
        sizes = [20] if self.quick else [20, 200, 2000]
        rows = []
        # Warm every path once (connection pools, caches).
        for t in targets:
            self.wrk("warm", t, self.url(t, CHAT, "events=20"), BODY_STREAM, a.conns, 1)
        for events in sizes:
            rounds = a.rounds if events == 20 else 1
            duration = a.duration if events == 20 else max(2, a.duration - 1)
            for rnd in range(rounds):
                for t in targets:
                    label = f"pass-{events}ev-{t}-r{rnd}"
                    res = self.cpu_split(t, lambda: self.wrk(label, t, self.url(t, CHAT, f"events={events}"),
                                                             BODY_STREAM, a.conns, duration))
                    res.update({"events": events, "round": rnd})
                    rows.append(res)
                    log(f"passthrough {events:>4} ev {t:>8} r{rnd}: {res['rps']:9.0f} req/s "
                        f"p50 {res['latency_us']['p50']} µs p99 {res['latency_us']['p99']} µs "
                        f"proxy {fmt(res['proxy_cpu_us_per_req'])} µs CPU/req errors {res['errors_total']} "
                        f"foreign {res['foreign_cpu_pct']:.0f}%")
        self.results["sections"]["passthrough"] = {"conns": a.conns, "duration_s": a.duration,
                                                   "rounds": a.rounds, "runs": rows}

    def concurrency1(self):
        """Gateway methodology: added latency at concurrency 1 (passthrough, conversion)."""
        a = self.args
        rows = []
        d = a.c1_duration
        # "split": the proxy on its own core (every hop is a cross-core wake-up);
        # "shared": the proxy moved onto the load generator's and mock's core for the run.
        # "hop" (split only): the client straight to the mock moved onto the proxy's core, the
        # one cross-core hop with no proxy, a control for what the layout itself costs.
        for layout in ["split", "shared"]:
            for rnd in range(a.rounds):
                for t, kind in [("direct", "passthrough"), ("hop", "passthrough"),
                                ("ours", "passthrough"), ("nginx", "passthrough"),
                                ("haproxy", "passthrough"), ("floor", "passthrough"),
                                ("ours", "conversion")]:
                    if layout == "shared" and t == "hop":
                        continue
                    if layout == "shared" and t not in DIRECT:
                        repin(self.proxies[t], CPU_LOAD)
                    body = BODY_PLAIN if kind == "conversion" else BODY_STREAM
                    try:
                        res = self.measured(t, lambda: self.load(
                            "closed", f"c1-{layout}-{kind}-{t}-r{rnd}", t,
                            ["--url", self.url(t, CHAT, "events=20"), "--body", body,
                             "--concurrency", "1", "--duration", str(d), "--warmup", "0.5"]))
                    finally:
                        if layout == "shared" and t not in DIRECT:
                            repin(self.proxies[t], CPU_PROXY)
                    res.update({"kind": kind, "round": rnd, "layout": layout})
                    rows.append(res)
                    log(f"c=1 {layout:>6} {kind:>11} {t:>8} r{rnd}: p50 {res['latency_us']['p50']:.1f} µs "
                        f"p99 {res['latency_us']['p99']:.1f} µs ({res['requests']} req, "
                        f"foreign {res['foreign_cpu_pct']:.0f}%)")
        self.results["sections"]["c1"] = {"duration_s": d, "runs": rows}

    def logging_cost(self):
        a = self.args
        info = self.start_ours(PORT_OURS_INFO, log_level="info", name="ours-info")
        self.proxies["ours-info"] = info
        rows = []
        for t, port in [("ours", PORTS["ours"]), ("ours-info", PORT_OURS_INFO)]:
            url = f"http://127.0.0.1:{port}{CHAT}?events=20"
            self.wrk("warm", t, url, BODY_STREAM, a.conns, 1)
            res = self.cpu_split(t, lambda: self.wrk(f"log-{t}", t, url, BODY_STREAM, a.conns, a.duration))
            rows.append(res)
            c1 = self.load("closed", f"log-c1-{t}", t, ["--url", url, "--body", BODY_STREAM,
                                                         "--concurrency", "1", "--duration",
                                                         str(a.c1_duration), "--warmup", "0.5"])
            res["c1_latency_us"] = c1["latency_us"]
            log(f"logging {t:>9}: {res['rps']:.0f} req/s, proxy {fmt(res['proxy_cpu_us_per_req'])} µs CPU/req, "
                f"c=1 p50 {c1['latency_us']['p50']:.1f} µs")
        info.stop()
        del self.proxies["ours-info"]
        self.results["sections"]["logging"] = {"runs": rows}

    # -- 2. conversion --------------------------------------------------------------------

    def conversion(self):
        a = self.args
        rows = []
        sizes = [20] if self.quick else [20, 2000]
        for events in sizes:
            q = f"events={events}"
            for rnd in range(a.rounds if events == 20 else 1):
                for t, body in [("direct", BODY_STREAM), ("ours", BODY_PLAIN)]:
                    res = self.cpu_split(t, lambda: self.wrk(f"conv-max-{events}ev-{t}-r{rnd}", t,
                                                             self.url(t, CHAT, q), body, a.conns, a.duration))
                    res.update({"events": events, "round": rnd, "api": "chat",
                                "kind": "stream direct" if t == "direct" else "conversion"})
                    rows.append(res)
                    log(f"conversion max {events:>4} ev {t:>6} r{rnd}: {res['rps']:.0f} req/s "
                        f"p99 {res['latency_us']['p99']} µs errors {res['errors_total']}")
        # Responses API, 20 events, once.
        for t, body in [("direct", BODY_RESP_STREAM), ("ours", BODY_RESP_PLAIN)]:
            res = self.cpu_split(t, lambda: self.wrk(f"conv-max-resp-{t}", t, self.url(t, RESP, "events=20"),
                                                     body, a.conns, a.duration))
            res.update({"events": 20, "round": 0, "api": "responses",
                        "kind": "stream direct" if t == "direct" else "conversion"})
            rows.append(res)
            log(f"conversion max responses {t:>6}: {res['rps']:.0f} req/s p99 {res['latency_us']['p99']} µs")
        ours_max = [r["rps"] for r in rows
                    if r["target"] == "ours" and r["events"] == 20 and r["api"] == "chat"]
        max_rps = max(ours_max)
        # Half of the median round, not of the best one: one lucky 5-second round (10.7 k
        # against 8.3 k in the other, 03:40 run) would set an offered load the proxy cannot
        # hold at half its CPU, and the step would measure queueing instead of added latency.
        median_rps = statistics.median(ours_max)
        # "Max load" for an open-loop step is the highest rate the proxy holds open loop, per
        # layout (`open_loop_max`). Half of wrk's closed-loop maximum sat at or past
        # saturation: at 64 connections one wake-up serves many ready requests, while
        # open-loop arrivals each pay their own (about 25 µs of CPU on this VM, for every
        # relay alike), and in some runs the direct path collapsed too.
        split_max, split_capped, split_ramp = self.open_loop_max(median_rps, "split")
        shared_max, shared_capped, shared_ramp = self.open_loop_max(median_rps, "shared")
        rate = max(100.0, round(split_max / 2.0, -1))
        rate_shared = max(100.0, round(shared_max / 2.0, -1))
        half = []
        for rnd in range(a.rounds):
            # `hop`: direct, with the mock alone on the proxy's core (control, see c=1).
            # `shared`: the proxy moved onto the load generator's and mock's core, as in the
            # c=1 step: no cross-core wake-ups, whose cost on this VM the `hop` row shows. Each
            # layout runs at half of its own open-loop maximum (the shared one leaves the
            # proxy a share of one core), and the direct stream is measured at both rates.
            for t, body, layout, offered in [("direct", BODY_STREAM, "split", rate),
                                             ("hop", BODY_STREAM, "split", rate),
                                             ("ours", BODY_PLAIN, "split", rate),
                                             ("direct", BODY_STREAM, "shared", rate_shared),
                                             ("ours", BODY_PLAIN, "shared", rate_shared)]:
                if layout == "shared" and t == "ours":
                    repin(self.proxies[t], CPU_LOAD)
                try:
                    res = self.measured(t, lambda: self.load(
                        "open", f"conv-half-{t}-{layout}-r{rnd}", t,
                        ["--url", self.url(t, CHAT, "events=20"), "--body", body, "--rate", str(offered),
                         "--duration", str(a.open_duration), "--warmup", "1"]))
                finally:
                    if layout == "shared" and t == "ours":
                        repin(self.proxies[t], CPU_PROXY)
                res.update({"round": rnd, "layout": layout})
                half.append(res)
                log(f"conversion @ {offered:.0f} req/s {t:>6} {layout:>6} r{rnd}: p50 {res['latency_us']['p50']:.1f} µs "
                    f"p99 {res['latency_us']['p99']:.1f} µs achieved {res['achieved_rps']:.0f} "
                    f"errors {res['errors']} dropped {res['dropped']}")
        self.results["sections"]["conversion"] = {"max_runs": rows, "half_rate": rate,
                                                  "half_rate_shared": rate_shared,
                                                  "half_runs": half, "max_rps_ours": max_rps,
                                                  "median_rps_ours": median_rps,
                                                  "open_loop_max_rps": split_max,
                                                  "open_loop_max_rps_shared": shared_max,
                                                  "open_loop_capped": split_capped,
                                                  "open_loop_capped_shared": shared_capped,
                                                  "open_loop_held": any(r["held"] for r in split_ramp),
                                                  "open_loop_held_shared": any(r["held"] for r in shared_ramp),
                                                  "open_loop_ramp": split_ramp + shared_ramp}

    def open_loop_max(self, median_rps, layout):
        """The highest conversion rate ours holds open loop in `layout`: 2-second steps at
        rising fractions of the closed-loop median, each held by `report.unheld`'s test
        (nothing errors or drops, >= 97 % achieved, p99 within 10 ms: a saturated queue grows
        past that within the 2 s). A failing step is tried once more, after a pause that lets the last
        step's backlog drain, so one noisy moment does not end the ramp. Returns the rate
        (the first step's when none held), whether every step held (the rate is then a lower
        bound), and the steps."""
        if layout == "shared":
            # One core for the generator, the mock and the proxy: its maximum is far lower.
            fractions = [0.1, 0.2] if self.quick else [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5]
            repin(self.proxies["ours"], CPU_LOAD)
        else:
            fractions = [0.3, 0.5] if self.quick else [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
        ramp, held, capped = [], None, False
        try:
            for frac in fractions:
                offered = max(100.0, round(median_rps * frac, -1))
                ok = False
                for attempt in range(2):
                    time.sleep(0.5)
                    res = self.load("open", f"conv-ramp-{layout}-{int(frac * 100)}-{attempt}", "ours",
                                    ["--url", self.url("ours", CHAT, "events=20"), "--body", BODY_PLAIN,
                                     "--rate", str(offered), "--duration", "2", "--warmup", "0.5"])
                    ok = not unheld(res, offered)
                    ramp.append({"layout": layout, "fraction": frac, "offered_rps": offered,
                                 "attempt": attempt, "achieved_rps": res["achieved_rps"],
                                 "p50_us": res["latency_us"]["p50"], "p99_us": res["latency_us"]["p99"],
                                 "dropped": res["dropped"], "errors": res["errors"], "held": ok})
                    log(f"conversion open-loop ramp {layout} {offered:.0f} req/s (try {attempt + 1}): "
                        f"achieved {res['achieved_rps']:.0f} p99 {res['latency_us']['p99']:.0f} µs "
                        f"dropped {res['dropped']} -> {'held' if ok else 'not held'}")
                    if ok:
                        break
                if not ok:
                    break
                held = offered
            else:
                capped = True
        finally:
            if layout == "shared":
                repin(self.proxies["ours"], CPU_PROXY)
        if held is None:
            held = max(100.0, round(median_rps * fractions[0], -1))
        return held, capped, ramp

    # -- 6. paced streaming ---------------------------------------------------------------

    def streaming(self):
        a = self.args
        q = "events=64&pace_ms=20&ts=1"
        rows = []
        for rnd in range(a.rounds):
            # `hop`: direct, with the mock alone on the proxy's core (control, see c=1).
            for t in ["direct", "hop", "ours", "nginx", "haproxy", "floor"]:
                res = self.measured(t, lambda: self.load(
                    "stream", f"paced-{a.paced_streams}-{t}-r{rnd}", t,
                    ["--url", self.url(t, CHAT, q), "--body", BODY_STREAM,
                     "--streams", str(a.paced_streams), "--ramp-ms", "500",
                     "--stall-ms", "200", "--mock", f"http://127.0.0.1:{MOCK_PORT}",
                     "--deadline", "30"], timeout=60))
                res["round"] = rnd
                rows.append(res)
                log(f"paced x{a.paced_streams} {t:>8} r{rnd}: ttft p99 {res['ttft_us']['p99']:.0f} µs, "
                    f"event delay p50 {res['event_delay_us']['p50']:.0f} p99 {res['event_delay_us']['p99']:.0f} µs, "
                    f"stalled {res['stalled']} failed {res['failed']}")
        sweep = []
        # Longer streams (150 deltas, 3 s) so that every stream overlaps every other even
        # when a path is slow to open them; starts spread over 1 s.
        q_sweep = "events=150&pace_ms=20&ts=1"
        plan = [("ours", n) for n in a.sweep] + [(t, a.sweep[-1]) for t in ["direct", "nginx", "haproxy"]]
        for t, n in plan:
            res = self.cpu_split(t, lambda: self.load(
                "stream", f"sweep-{n}-{t}", t,
                ["--url", self.url(t, CHAT, q_sweep), "--body", BODY_STREAM, "--streams", str(n),
                 "--ramp-ms", "1000", "--stall-ms", "200",
                 "--mock", f"http://127.0.0.1:{MOCK_PORT}", "--deadline", "45"], timeout=75))
            sweep.append(res)
            log(f"sweep {n:>5} streams {t:>8}: proxy {fmt(res['proxy_cpu_us_per_req'])} µs CPU/event, "
                f"completed {res['completed']} stalled {res['stalled']} "
                f"failed {res['failed']} mock peak {res['mock_peak_concurrent']} "
                f"max gap p99 {res['max_gap_per_stream_us']['p99'] / 1000:.1f} ms, "
                f"event delay p99 {res['event_delay_us']['p99']:.0f} µs")
            time.sleep(1)
        self.results["sections"]["streaming"] = {"paced_streams": a.paced_streams, "runs": rows,
                                                 "sweep": sweep}

    def frame_residence(self):
        """How long each relay holds a streamed frame, from its syscalls (bench/residence.py):
        one more paced run per relay with `perf record` attached to it. A relay that fails
        is recorded with its error; the others are still measured."""
        a = self.args
        if shutil.which("perf") is None:
            raise RuntimeError("perf not found (bench/run.sh installs linux-perf)")
        out = {}
        self.results["sections"]["residence"] = out
        for t in ["ours", "nginx", "haproxy", "floor"]:
            try:
                out[t] = self.residence_of(t, a.paced_streams)
            except Exception as e:  # noqa: BLE001  (one relay's failure is reported, not fatal)
                out[t] = {"target": t, "error": str(e)[-500:]}
                log(f"residence {t:>8}: failed: {e}")
                continue
            w, u = out[t]["read_to_write_us"], out[t]["user_us"]
            log(f"residence {t:>8}: {w['frames']} frames of {out[t]['events']} events "
                f"({out[t]['lost']} lost), read->write p50 {w['p50']:.1f} p99 {w['p99']:.1f} µs, "
                f"own code p50 {u['p50']:.1f} p99 {u['p99']:.1f} µs")

    def residence_of(self, t, streams):
        q = "events=64&pace_ms=20&ts=1"
        data = os.path.join(self.raw, f"perf-{t}.data")
        pids = self.proxies[t].pids()
        sockets = {pid: residence.socket_fds(pid) for pid in pids}
        # perf itself on the load generator's core, so that it never preempts the relay.
        rec = subprocess.Popen(NICE + ["taskset", "-c", CPU_LOAD, "perf", "record", "-q",
                                       "-e", "raw_syscalls:sys_enter,raw_syscalls:sys_exit",
                                       "-p", ",".join(str(p) for p in pids), "-o", data],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
        try:
            # Attached once it has written its header; bounded.
            for _ in range(100):
                if rec.poll() is not None or (os.path.exists(data) and os.path.getsize(data) > 0):
                    break
                time.sleep(0.02)
            time.sleep(0.2)
            if rec.poll() is not None:
                raise RuntimeError(f"perf record failed: {rec.stderr.read().decode(errors='replace')[-500:]}")
            res = self.load("stream", f"residence-{t}", t,
                            ["--url", self.url(t, CHAT, q), "--body", BODY_STREAM,
                             "--streams", str(streams), "--ramp-ms", "500",
                             "--stall-ms", "200", "--mock", f"http://127.0.0.1:{MOCK_PORT}",
                             "--deadline", "30"], timeout=60)
            if rec.poll() is None:
                rec.send_signal(signal.SIGINT)
            rec.wait(timeout=30)
            script = subprocess.run(["perf", "script", "-i", data, "--show-lost-events",
                                     "-F", "pid,tid,time,event,trace", "--ns"],
                                    capture_output=True, text=True, timeout=180)
        finally:
            if rec.poll() is None:
                rec.kill()
                rec.wait(timeout=5)
            if os.path.exists(data):
                os.remove(data)
        if script.returncode != 0:
            raise RuntimeError(f"perf script failed: {script.stderr[-500:]}")
        lines = script.stdout.splitlines()
        times = residence.analyse(lines, sockets)
        if not times["read_to_write_us"]["frames"]:
            raise RuntimeError(f"no frame found in the syscalls of {t}")
        times.update({"target": t, "event_delay_us": res["event_delay_us"],
                      "events": res["events"], "stalled": res["stalled"], "streams": res["streams"],
                      "lost": sum(1 for line in lines if "LOST" in line)})
        return times

    # -- 4. memory ------------------------------------------------------------------------

    def memory(self):
        a = self.args
        out = {}
        # Idle RSS of a fresh proxy: pinned to one core (one tokio worker) and unpinned.
        p = self.start_ours(PORT_MEM, name="ours-mem")
        time.sleep(0.5)
        out["idle_rss_kib"] = p.rss_kib()
        http("POST", f"http://127.0.0.1:{PORT_MEM}{CHAT}?events=20", BODY_PLAIN)
        time.sleep(0.2)
        out["rss_after_one_conversion_kib"] = p.rss_kib()
        # 1000 concurrent aggregations of a ~100 KiB body (400 deltas x 256 B), paced by the
        # mock over ~1 s so that they are all in flight together.
        n = a.aggregations
        q = "events=400&delta=256&pace_ms=100&burst=40"
        http("POST", f"http://127.0.0.1:{MOCK_PORT}/stats?reset=1")
        res = self.load("burst", f"mem-aggregations-{n}", "ours",
                        ["--url", f"http://127.0.0.1:{PORT_MEM}{CHAT}?{q}", "--body", BODY_PLAIN,
                         "--requests", str(n), "--pids", str(p.pid), "--deadline", "60"], timeout=90)
        _, stats = http("GET", f"http://127.0.0.1:{MOCK_PORT}/stats")
        res["mock_peak_concurrent"] = json.loads(stats)["peak"]
        _, one = http("POST", f"http://127.0.0.1:{MOCK_PORT}{CHAT}?events=400&delta=256", BODY_STREAM)
        res["sse_bytes_per_stream"] = len(one)
        out["aggregations"] = res
        log(f"memory: idle {out['idle_rss_kib']} KiB; {n} aggregations: peak {res['rss_peak_sampled_kib']} KiB "
            f"(HWM {res['hwm_after_kib']} KiB), responses {res['response_bytes_total'] / 1024:.0f} KiB total, "
            f"completed {res['completed']}, mock peak {res['mock_peak_concurrent']}")
        p.stop()
        # Unpinned idle RSS (tokio starts one worker per core).
        p = self.start_ours(PORT_MEM, cpu=None, name="ours-mem-unpinned")
        time.sleep(0.5)
        out["idle_rss_unpinned_kib"] = p.rss_kib()
        p.stop()
        # Idle WebSocket sessions: a fresh proxy of ours; nginx and HAProxy as they run.
        ws_rows = []
        for t in ["ours", "nginx", "haproxy"]:
            port = PORT_WS
            proc = self.start_fresh(t, port)
            time.sleep(0.3)
            pids = ",".join(str(x) for x in proc.pids())
            res = self.load("ws", f"ws-{a.ws_sessions}-{t}", t,
                            ["--url", f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-4o-realtime-preview",
                             "--sessions", str(a.ws_sessions), "--pids", pids, "--settle", "1",
                             "--deadline", "60"], timeout=100, watch=[])
            ws_rows.append(res)
            log(f"websocket {t:>8}: {res['open']} open, failed {res['failed']}, "
                f"{res['rss_per_session_bytes'] / 1024:.1f} KiB RSS/session "
                f"({res['rss_before_kib']} -> {res['rss_open_kib']} KiB)")
            proc.stop()
            time.sleep(0.5)
        out["websocket"] = ws_rows
        self.results["sections"]["memory"] = out

    # -- 5. start-up ----------------------------------------------------------------------

    def startup(self):
        a = self.args
        rows = []
        cfg = self.ours_config(PORT_STARTUP)
        cmds = [("ours", [PROXY_BIN, "-c", cfg]),
                ("nginx", ["nginx", "-c", self.nginx_config(PORT_STARTUP, master="off"), "-p", self.dir,
                           "-e", os.path.join(self.dir, "nginx-startup-stderr.log")]),
                ("haproxy", ["haproxy", "-db", "-f", self.haproxy_config(PORT_STARTUP)])]
        for t, cmd in cmds:
            res = self.load("startup", f"startup-{t}", t,
                            ["--runs", str(a.startup_runs), "--port", str(PORT_STARTUP), "--"] + cmd,
                            timeout=120, watch=[])
            rows.append(res)
            log(f"startup {t:>8}: p50 {res['startup_us']['p50'] / 1000:.2f} ms, "
                f"max {res['startup_us']['max'] / 1000:.2f} ms, failures {res['failures']}")
        self.results["sections"]["startup"] = rows

    # -- 3. Criterion ---------------------------------------------------------------------

    def criterion(self):
        env = dict(os.environ)
        if self.quick:
            env["BENCH_QUICK"] = "1"
        crit_dir = os.path.join(ROOT, "target", "criterion")
        shutil.rmtree(crit_dir, ignore_errors=True)
        log("criterion: cargo bench --bench aggregate")
        t0 = time.time()
        r = subprocess.run(["taskset", "-c", CPU_PROXY, "cargo", "bench", "--bench", "aggregate"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        with open(os.path.join(self.dir, "criterion.log"), "w") as f:
            f.write(r.stdout + r.stderr)
        if r.returncode != 0:
            raise RuntimeError("cargo bench failed; see criterion.log")
        inputs_path = os.path.join(ROOT, "target", "bench", "aggregate_inputs.json")
        with open(inputs_path) as f:
            inputs = json.load(f)
        rows = {}
        for group, meta in inputs.items():
            row = dict(meta)
            for fn in ("aggregate", "serde_value", "serde_ignored"):
                est = os.path.join(crit_dir, group, fn, "new", "estimates.json")
                with open(est) as f:
                    e = json.load(f)
                ns = e["mean"]["point_estimate"]
                row[fn] = {"ns": ns, "mb_s": meta["sse_bytes"] / ns * 1e3,
                           "lo_ns": e["mean"]["confidence_interval"]["lower_bound"],
                           "hi_ns": e["mean"]["confidence_interval"]["upper_bound"]}
            rows[group] = row
            log(f"criterion {group:>30}: aggregate {row['aggregate']['mb_s']:.0f} MB/s, "
                f"serde Value {row['serde_value']['mb_s']:.0f} MB/s, IgnoredAny {row['serde_ignored']['mb_s']:.0f} MB/s")
        fixtures = any(k.endswith("_fixtures") for k in rows)
        self.results["sections"]["criterion"] = {"groups": rows, "fixtures_present": fixtures,
                                                 "seconds": time.time() - t0}

    # -- callgrind ------------------------------------------------------------------------

    def callgrind(self):
        if shutil.which("valgrind") is None:
            self.results["sections"]["callgrind"] = {"skipped": "valgrind not installed"}
            return
        rows = []
        self.start_mock()
        cfg = self.ours_config(PORT_CALLGRIND)
        cmds = [("ours", [PROXY_BIN, "-c", cfg], {"RUST_LOG": "warn"}),
                ("nginx", ["nginx", "-c", self.nginx_config(PORT_CALLGRIND, master="off"), "-p", self.dir,
                           "-e", os.path.join(self.dir, "nginx-cg-stderr.log")], {}),
                ("haproxy", ["haproxy", "-db", "-f", self.haproxy_config(PORT_CALLGRIND)], {}),
                ("floor", self.floor_cmd(PORT_CALLGRIND), {})]
        for t, cmd, env in cmds:
            outfile = os.path.join(self.dir, f"callgrind.{t}.out")
            p = Proc(f"callgrind-{t}", ["valgrind", "--tool=callgrind", f"--callgrind-out-file={outfile}",
                                         "--dump-instr=no"] + cmd, cpu=CPU_PROXY, env=env,
                     logfile=os.path.join(self.dir, f"callgrind-{t}.log"))
            self.procs.append(p)
            try:
                wait_port(PORT_CALLGRIND, timeout=60)
                url = f"http://127.0.0.1:{PORT_CALLGRIND}{CHAT}?events=20"
                self.load("closed", f"cg-warm-{t}", t, ["--url", url, "--body", BODY_STREAM,
                                                        "--concurrency", "1", "--duration", "2", "--warmup", "0"],
                          watch=[])
                z = subprocess.run(["callgrind_control", "-z", str(p.pid)], capture_output=True, text=True,
                                   timeout=30)
                res = self.load("closed", f"cg-{t}", t, ["--url", url, "--body", BODY_STREAM,
                                                         "--concurrency", "1", "--duration",
                                                         str(self.args.callgrind_seconds), "--warmup", "0"],
                                watch=[])
                d = subprocess.run(["callgrind_control", "-d", "measured", str(p.pid)], capture_output=True,
                                   text=True, timeout=30)
                time.sleep(1)
                total = None
                dumps = sorted(f for f in os.listdir(self.dir) if f.startswith(f"callgrind.{t}.out."))
                for name in dumps:
                    with open(os.path.join(self.dir, name)) as f:
                        text = f.read()
                    if "Trigger: dump measured" in text:
                        m = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
                        if m:
                            total = int(m.group(1))
                n = res["requests"]
                if res.get("errors", 0) > max(10, n // 100):
                    raise RuntimeError(f"{res['errors']} failed requests under callgrind")
                rows.append({"target": t, "requests": n, "errors": res.get("errors", 0), "instructions": total,
                             "instructions_per_request": (total / n) if (total and n) else None,
                             "zero_ok": z.returncode == 0, "dump_ok": d.returncode == 0})
                log(f"callgrind {t:>8}: {n} requests, "
                    f"{(total / n) if (total and n) else float('nan'):,.0f} instructions/request")
            except Exception as e:  # a missing measurement is reported, not fatal
                rows.append({"target": t, "error": str(e)})
                log(f"callgrind {t}: {e}")
            finally:
                p.stop()
        self.results["sections"]["callgrind"] = rows

    # -- meta -----------------------------------------------------------------------------

    def meta(self):
        def cmd(c):
            try:
                r = subprocess.run(c, capture_output=True, text=True, timeout=10)
                return (r.stdout + r.stderr).strip().splitlines()[0]
            except Exception:
                return "unknown"
        model = "unknown"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            mem_kib = int(f.readline().split()[1])
        rev = cmd(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "src"],
                               capture_output=True, text=True).stdout.strip() != ""
        self.results["meta"] = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "quick": self.quick,
            "cpu": model,
            "cores": os.cpu_count(),
            "mem_gib": round(mem_kib / 1024 / 1024, 1),
            "kernel": platform.release(),
            "os": cmd(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
            "rustc": cmd(["rustc", "--version"]),
            "proxy_rev": rev + (" (with uncommitted changes under src/)" if dirty else ""),
            "nginx": cmd(["nginx", "-v"]),
            "haproxy": cmd(["haproxy", "-v"]),
            "wrk": cmd(["wrk", "-v"]),
            "valgrind": cmd(["valgrind", "--version"]),
            "args": vars(self.args),
            "loadavg_start": open("/proc/loadavg").read().split()[:3],
            "run_dir": os.path.relpath(self.dir, ROOT),
        }

    def run(self):
        self.meta()
        steps = [("start", self.start_all), ("sanity", self.sanity),
                 ("passthrough", self.passthrough), ("c1", self.concurrency1),
                 ("logging", self.logging_cost), ("conversion", self.conversion),
                 ("streaming", self.streaming), ("residence", self.frame_residence),
                 ("memory", self.memory), ("startup", self.startup)]
        errors = {}
        try:
            for name, fn in steps:
                t0 = time.time()
                log(f"== {name}")
                try:
                    fn()
                except Exception as e:
                    if name in ("start", "sanity"):
                        raise
                    errors[name] = str(e)
                    log(f"!! {name} failed: {e}")
                self.results["meta"].setdefault("step_seconds", {})[name] = round(time.time() - t0, 1)
        finally:
            self.stop_all()
        for name, fn in [("criterion", self.criterion)] + ([] if self.quick or self.args.no_callgrind
                                                           else [("callgrind", self.callgrind)]):
            t0 = time.time()
            log(f"== {name}")
            try:
                fn()
            except Exception as e:
                errors[name] = str(e)
                log(f"!! {name} failed: {e}")
            finally:
                self.stop_all()
            self.results["meta"]["step_seconds"][name] = round(time.time() - t0, 1)
        self.results["meta"]["errors"] = errors
        self.results["meta"]["total_seconds"] = round(time.time() - self.started, 1)
        self.results["meta"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        path = os.path.join(self.dir, "results.json")
        with open(path, "w") as f:
            json.dump(self.results, f, indent=1)
        latest = os.path.join(ROOT, "target", "bench", "latest")
        if os.path.islink(latest) or os.path.exists(latest):
            os.remove(latest)
        os.symlink(os.path.basename(self.dir), latest)
        log(f"results: {os.path.relpath(path, ROOT)} ({self.results['meta']['total_seconds']} s)")
        return path


def fmt(v):
    return "-" if v is None else f"{v:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a ~2 minute smoke run")
    ap.add_argument("--no-callgrind", action="store_true")
    ap.add_argument("--nice", type=int, default=None,
                    help="run every benchmark process at this niceness, e.g. -10 (root only)")
    args = ap.parse_args()
    if args.nice is not None:
        NICE[:] = ["nice", "-n", str(args.nice)]
    q = args.quick
    args.conns = 64
    args.duration = 2 if q else 5
    args.rounds = 1 if q else 2
    args.c1_duration = 1.5 if q else 2.5
    args.open_duration = 2 if q else 4
    args.paced_streams = 100
    args.sweep = [1000] if q else [1000, 2500, 5000]
    args.aggregations = 200 if q else 1000
    args.ws_sessions = 500 if q else 5000
    args.startup_runs = 5 if q else 20
    args.callgrind_seconds = 6
    for tool in ("wrk", "nginx", "haproxy", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"error: {tool} not found (bench/run.sh installs it)")
    for b in (PROXY_BIN, MOCK_BIN, LOAD_BIN):
        if not os.path.exists(b):
            sys.exit(f"error: {b} missing (bench/run.sh builds it)")
    path = Suite(args).run()
    print(path)


if __name__ == "__main__":
    main()
