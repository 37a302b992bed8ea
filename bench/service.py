"""Benchmark of the HTTP service (issue 5), through real HTTP against `latprune serve`.

1. Job-status latency: 50 concurrent clients (each its own connection) poll GET /v1/jobs/{id}
   (authenticated, a database read); the baseline in the same run is GET /healthz (no auth, no
   database) at the same concurrency. p50/p99 in ms, with two clients: wrk (C, from Debian's
   package, when installed) for `--seconds`, and Python (httpx + asyncio) for `--requests`.
2. Upload memory: the server's resident memory (RSS, psutil) sampled every 20 ms while a
   ~200 MB ONNX model is uploaded (streamed from disk by the client), against the file size.
   The upload is inspected in a child process; its peak is reported apart.

    python bench/service.py [--clients 50] [--requests 4000] [--upload-mb 200]

Prints a table and writes bench/out/service.json. Client and server share this machine's
cores, so the latencies include the client's own scheduling.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import psutil
from onnx import TensorProto, helper, numpy_helper

from latprune.service.storage import file_sha256

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
LATPRUNE = str(Path(sys.executable).parent / "latprune")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, LATPRUNE_HOME=str(home), LATPRUNE_MAX_UPLOAD_MB="1024")
    env.pop("LATPRUNE_DATABASE_URL", None)
    proc = subprocess.Popen([LATPRUNE, "serve", "--port", str(port), "--log-level", "warning"], env=env,
                            stdout=open(home / "serve.log", "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the service did not start; see " + str(home / "serve.log"))


def token(home: Path) -> str:
    env = dict(os.environ, LATPRUNE_HOME=str(home))
    env.pop("LATPRUNE_DATABASE_URL", None)
    return subprocess.run([LATPRUNE, "token", "create", "bench"], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


async def _hammer(url: str, headers: dict, clients: int, total: int) -> list[float]:
    per_client = total // clients
    lat: list[float] = []

    async def client() -> None:
        async with httpx.AsyncClient(headers=headers, timeout=60) as http:
            for _ in range(per_client):
                t0 = time.perf_counter()
                r = await http.get(url)
                lat.append((time.perf_counter() - t0) * 1e3)
                if r.status_code != 200:
                    raise SystemExit(f"{url}: HTTP {r.status_code} {r.text[:200]}")

    await asyncio.gather(*(client() for _ in range(clients)))
    return lat


def latency_stats(lat: list[float], seconds: float) -> dict:
    a = np.array(lat)
    return {"requests": len(lat), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "throughput_rps": len(lat) / seconds}


def _wrk(url: str, headers: dict, clients: int, seconds: int) -> dict:
    """wrk (Debian's package): one client thread, `clients` connections; p50/p99 in ms."""
    cmd = ["wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--latency", url]
    for k, v in headers.items():
        cmd[1:1] = ["-H", f"{k}: {v}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def pct(p: str) -> float:
        value = out.split(f"{p}%", 1)[1].split()[0]
        num = value.rstrip("usm")
        return float(num) * unit[value[len(num):]]
    non2xx = int(out.split("Non-2xx or 3xx responses:")[1].split()[0]) if "Non-2xx" in out else 0
    if non2xx:
        raise SystemExit(f"{url}: {non2xx} error responses")
    return {"requests": int(out.split(" requests in ")[0].split()[-1]), "p50_ms": pct("50"), "p99_ms": pct("99"),
            "throughput_rps": float(out.split("Requests/sec:")[1].split()[0]), "client": "wrk"}


def status_bench(base: str, auth: dict, job_id: str, clients: int, total: int, seconds: int) -> dict:
    """wrk when installed (a C client: little of the machine goes to the client), and the
    Python client (httpx, asyncio) in any case."""
    import shutil

    out = {}
    for name, url, headers in (("GET /healthz (baseline)", f"{base}/healthz", {}),
                               ("GET /v1/jobs/{id}", f"{base}/v1/jobs/{job_id}", auth)):
        asyncio.run(_hammer(url, headers, clients, clients * 2))  # warm-up: connections, caches
        if shutil.which("wrk"):
            out[f"{name} [wrk, 1 conn]"] = _wrk(url, headers, 1, max(seconds // 3, 3))  # no queueing
            out[f"{name} [wrk]"] = _wrk(url, headers, clients, seconds)
        t0 = time.perf_counter()
        lat = asyncio.run(_hammer(url, headers, clients, total))
        out[f"{name} [httpx]"] = {**latency_stats(lat, time.perf_counter() - t0), "client": "httpx"}
    return out


def big_model(path: Path, megabytes: int) -> int:
    """A valid ONNX model of about `megabytes` MB: one MatMul with a square float32 weight."""
    n = int((megabytes * 2**20 / 4) ** 0.5)
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path.stat().st_size


def upload_memory(base: str, auth: dict, server: psutil.Process, path: Path) -> dict:
    samples: list[tuple[float, float, float]] = []  # (t, server RSS MB, children RSS MB)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                kids = sum(c.memory_info().rss for c in server.children(recursive=True))
                samples.append((time.perf_counter(), server.memory_info().rss / 2**20, kids / 2**20))
            except psutil.Error:
                pass
            time.sleep(0.02)

    def chunks():
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                yield block

    before = server.memory_info().rss / 2**20
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    r = httpx.post(f"{base}/v1/models", params={"name": "big.onnx"}, content=chunks(),
                   headers={**auth, "Content-Type": "application/octet-stream"}, timeout=600)
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    if r.status_code not in (200, 201):
        raise SystemExit(f"upload: HTTP {r.status_code} {r.text[:300]}")
    size_mb = path.stat().st_size / 2**20
    peak = max(s[1] for s in samples)
    return {"file_mb": size_mb, "seconds": seconds, "upload_mb_per_s": size_mb / seconds,
            "server_rss_before_mb": before, "server_rss_peak_mb": peak, "server_rss_growth_mb": peak - before,
            "growth_share_of_file": (peak - before) / size_mb,
            "inspector_child_peak_mb": max(s[2] for s in samples), "samples": len(samples),
            "sha256_matches": r.json()["sha256"] == file_sha256(path)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--upload-mb", type=int, default=200)
    ap.add_argument("--seconds", type=int, default=15, help="duration of each wrk run")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="latprune-bench-") as tmp:
        home = Path(tmp)
        port = free_port()
        proc = start_server(home, port)
        base = f"http://127.0.0.1:{port}"
        try:
            auth = {"Authorization": f"Bearer {token(home)}"}
            sys.path.insert(0, str(HERE.parent / "tests"))
            from onnx_builders import residual_cnn  # a small model for a real job to poll

            m = httpx.post(f"{base}/v1/models", params={"name": "r.onnx"}, headers=auth,
                           content=residual_cnn().SerializeToString(), timeout=60).json()
            job = httpx.post(f"{base}/v1/jobs", headers=auth, timeout=30,
                             json={"kind": "profile", "model_id": m["id"]}).json()
            while httpx.get(f"{base}/v1/jobs/{job['id']}", headers=auth).json()["state"] in ("queued", "running"):
                time.sleep(0.5)
            status = status_bench(base, auth, job["id"], args.clients, args.requests, args.seconds)
            big = home / "big.onnx"
            big_model(big, args.upload_mb)
            memory = upload_memory(base, auth, psutil.Process(proc.pid), big)
        finally:
            proc.terminate()
            proc.wait(30)
    result = {"clients": args.clients, "status": status, "upload": memory,
              "machine": {"cpus": os.cpu_count()}}
    (OUT / "service.json").write_text(json.dumps(result, indent=1))
    print(f"\n{args.clients} concurrent clients (connections) unless marked")
    print(f"{'route [client]':40} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    for name, st in status.items():
        print(f"{name:40} {st['requests']:8d} {st['p50_ms']:8.2f} {st['p99_ms']:8.2f} {st['throughput_rps']:8.0f}")
    u = memory
    print(f"\nupload of a {u['file_mb']:.0f} MB model in {u['seconds']:.1f} s: server RSS "
          f"{u['server_rss_before_mb']:.0f} -> peak {u['server_rss_peak_mb']:.0f} MB "
          f"(+{u['server_rss_growth_mb']:.0f} MB, {100 * u['growth_share_of_file']:.1f}% of the file); "
          f"inspector child peak {u['inspector_child_peak_mb']:.0f} MB; sha256 ok: {u['sha256_matches']}")
    print(f"wrote {OUT / 'service.json'}")


if __name__ == "__main__":
    main()
