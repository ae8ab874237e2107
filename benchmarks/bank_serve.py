"""Thousands of tasks from one folder, through real HTTP: ``heartlora serve --adapter-dir`` against one merged model.

Generates ``--adapters`` one-bit adapters (LoRA rank 8 on q and v, random factors and classifiers, a third of the
heads off in one of eight patterns, 2 to 9 classes) for the offline DINOv2 (``dinov2_small``, pretrained) at
``--img-size`` px into a temporary folder, then starts real server processes on 127.0.0.1 and sends them requests
with a small async client (httpx2), each request a PNG of the image size for a task drawn at random from all of
them:

* **merged**: one task's adapter merged into the backbone's weights, behind the same FastAPI app and batcher
  (this script started as ``--merged-server FILE``): the baseline, every request for its one task;
* **resident**: ``heartlora serve --adapter-dir DIR --preload``, no memory limit: every adapter in memory;
* **cache**: ``heartlora serve --adapter-dir DIR --cache-mb M`` with M the bytes of ``--cache-fraction`` (10 %) of
  the adapters in memory (measured on a probe bank): tasks loaded on first use and evicted, least recently used
  first.

Each server gets a closed loop of ``--concurrency`` clients sending ``--requests`` requests (throughput, latency
p50/p99, requests lost: any answer but 200 or a failed connection). The merged server then gets open loops (Poisson
arrivals) at ``--rates`` fractions of its closed-loop throughput, and the one whose p99 is nearest 100 ms (the
issue's load) is sent to the resident bank as well. Each server runs ``--threads`` torch threads (default 1: on a
CPU shared with other jobs a second thread mostly waits for a core, and every parallel operator waits for it).
Resident memory: the server process's RSS (psutil), the largest of samples every 0.25 s. Results go to ``--out``
as JSON with the machine and command.

    PYTHONPATH=src python benchmarks/bank_serve.py --out benchmarks/records/bank_serve.json
    PYTHONPATH=src python benchmarks/bank_serve.py --smoke            # a tiny random ViT, 12 adapters: seconds
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

import heartlora as hl
from heartlora._paths import atomic_path
from heartlora.bank import AdapterBank, BankTask, backbone_for
from heartlora.serve import latency_summary

HOST = "127.0.0.1"
PATTERNS = 8  # head-off patterns (and class counts) among the generated adapters


def build(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return hl.create_backbone(args.backbone, num_classes=num_classes, img_size=args.img_size,
                              pretrained=args.pretrained)


def make_adapters(folder: Path, args: argparse.Namespace) -> list[Path]:
    """``args.adapters`` one-bit adapters: model ``i % PATTERNS`` (its heads off, 2 + i % PATTERNS classes) with
    factors and classifier drawn from seed i."""
    models = []
    for k in range(PATTERNS):
        model = hl.attach(build(args, 2 + k), hl.HeartLoRAConfig(targets=("q", "v"), rank=args.rank, bits=1),
                          verify=False)
        heads = [(layer.name, h) for layer in hl.attention_layers(model) for h in range(layer.num_heads)]
        off = torch.randperm(len(heads), generator=torch.Generator().manual_seed(k))[:len(heads) // 3].tolist()
        hl.deactivate_heads(model, heads=[heads[j] for j in off])
        models.append(model)
    run = {"pretrained": args.pretrained, "init_seed": 0, "img_size": args.img_size}
    paths = []
    for i in range(args.adapters):
        model = models[i % PATTERNS]
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in [p for p in model.parameters() if p.requires_grad]:  # the factors and the classifier
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        paths.append(folder / f"task{i:04d}.safetensors")
        hl.save_adapter(model, paths[-1], extra_metadata={"heartlora_run": {**run, "task": f"task{i:04d}"}})
    return paths


class MergedBank(AdapterBank):
    """One task, its adapter merged into the backbone's weights (``hl.merge``), answering like a bank of that one
    task: the bank's own tables and wrappers are not made."""

    def __init__(self, path: Path) -> None:
        backbone, self.img_size = backbone_for(path)
        self.model = hl.merge(hl.load_adapter(backbone, path)).eval()
        self._lock = threading.RLock()
        self._linears, self._saved, self.tasks = {}, {}, {}
        info = hl.read_adapter_info(path)
        num = int(info["backbone"]["num_classes"])
        self.tasks[path.stem] = BankTask(path.stem, [str(i) for i in range(num)], str(path), num, self.img_size, 1,
                                         0, 0, int(info["adapter_bytes"]), 0, info)

    def _run(self, images: torch.Tensor, tasks: list[str]) -> list[torch.Tensor]:
        out = self.model(images)
        return [out[i] for i in range(len(images))]


def merged_server(path: str, port: int) -> None:
    from heartlora.serve import serve
    from heartlora.serve_api import create_api

    bank = MergedBank(Path(path))
    serve(bank, bank.img_size, host=HOST, port=port, log_level="warning", app=create_api(bank, bank.img_size))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A server process on a free port, up once /health answers; its log in ``log``."""

    def __init__(self, argv: list[str], log: Path, timeout: float, threads: int) -> None:
        import httpx2

        self.port = free_port()
        self.argv = argv + ["--port", str(self.port)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
        self.log = log.open("w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): see {log}")
            try:
                if httpx2.get(f"http://{HOST}:{self.port}/health", timeout=2).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"the server did not answer within {timeout:.0f} s: see {log}")
            time.sleep(0.2)
        self.start_s = time.perf_counter() - t0
        self.ps = psutil.Process(self.proc.pid)

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def pngs(n: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


async def load(server: Server, tasks: list[str], images: list[bytes], requests: int, *, concurrency: int = 0,
               rate: float = 0.0, seed: int = 0) -> dict:
    """``requests`` requests, each for a random task: a closed loop of ``concurrency`` clients, or (``rate``)
    Poisson arrivals at ``rate`` per second. Throughput, latency percentiles, requests lost, peak RSS."""
    import httpx2

    rng = random.Random(seed)
    plan = [(rng.choice(tasks), rng.randrange(len(images))) for _ in range(requests)]
    lat: list[float] = []
    lost: dict[str, int] = {}
    peak = server.rss()
    url = f"http://{HOST}:{server.port}/predict"
    limits = httpx2.Limits(max_connections=max(concurrency, 256), max_keepalive_connections=max(concurrency, 256))
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(120.0), limits=limits) as client:
        async def one(task: str, image: int) -> None:
            t0 = time.perf_counter()
            try:
                r = await client.post(url, params={"task": task, "top_k": 1}, content=images[image],
                                      headers={"Content-Type": "application/octet-stream"})
                ok = r.status_code == 200
                why = str(r.status_code)
            except httpx2.HTTPError as exc:
                ok, why = False, type(exc).__name__
            if ok:
                lat.append(time.perf_counter() - t0)
            else:
                lost[why] = lost.get(why, 0) + 1

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, server.rss())
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        t0 = time.perf_counter()
        if rate:
            gaps = np.random.default_rng(seed).exponential(1.0 / rate, requests)
            jobs = []
            for (task, image), gap in zip(plan, gaps):
                jobs.append(asyncio.create_task(one(task, image)))
                await asyncio.sleep(gap)
            await asyncio.gather(*jobs)
        else:
            queue = iter(plan)

            async def worker() -> None:
                for task, image in queue:
                    await one(task, image)
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        sampler.cancel()
    peak = max(peak, server.rss())
    row = {"requests": requests, "answered": len(lat), "lost": sum(lost.values()), "lost_by": lost,
           "seconds": wall, "throughput_rps": len(lat) / wall, "peak_rss_mib": peak / 2**20}
    if rate:
        row["offered_rps"] = rate
    else:
        row["concurrency"] = concurrency
    return row | ({f"{k}_ms" if k != "n" else k: v for k, v in latency_summary(lat).items()} if lat else {})


def probe_bytes(paths: list[Path], args: argparse.Namespace) -> int:
    """Mean resident bytes of one adapter in a bank (factors, indices, classifier), over the first PATTERNS."""
    bank = AdapterBank(build(args, 2))
    return int(np.mean([bank.add(p).resident_bytes for p in paths[:PATTERNS]]))


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def show(name: str, row: dict) -> None:
    print(f"{name:>28}: {row['throughput_rps']:6.1f} req/s, p50 {row.get('p50_ms', float('nan')):6.0f} ms, p99 "
          f"{row.get('p99_ms', float('nan')):6.0f} ms, lost {row['lost']}, RSS {row['peak_rss_mib']:.0f} MiB",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=400, help="requests per closed loop")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--open-seconds", type=float, default=20.0, help="length of each open loop (its requests: "
                    "rate × this, at least 20)")
    ap.add_argument("--rates", default="0.1,0.2,0.35,0.5",
                    help="open-loop loads, as fractions of the merged throughput")
    ap.add_argument("--cache-fraction", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server (OMP_NUM_THREADS)")
    ap.add_argument("--backbone", default="dinov2_small")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--no-pretrained", dest="pretrained", action="store_false")
    ap.add_argument("--smoke", action="store_true", help="a tiny random ViT at 32 px, 12 adapters, 24 requests")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--merged-server", metavar="FILE", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.merged_server:
        return merged_server(args.merged_server, args.port)
    if args.smoke:
        args.backbone, args.img_size, args.pretrained, args.rank = "vit_tiny_patch16_224", 32, False, 4
        args.adapters, args.requests, args.concurrency, args.rates, args.open_seconds = 12, 24, 4, "0.5", 1.0
    command = " ".join(shlex.quote(a) for a in sys.argv)
    result: dict = {"settings": vars(args), "command": command, "machine": {
        "cpu": cpu_name(), "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
        "heartlora": hl.__version__}, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    timeout = 120 if args.smoke else 900
    with tempfile.TemporaryDirectory(prefix="bank_serve-") as tmp:
        folder = Path(tmp) / "adapters"
        folder.mkdir()
        t0 = time.perf_counter()
        paths = make_adapters(folder, args)
        result["generate_s"] = time.perf_counter() - t0
        per_task = probe_bytes(paths, args)
        cache_mb = args.cache_fraction * args.adapters * per_task / 2**20
        result |= {"adapter_resident_bytes": per_task, "cache_mb": cache_mb}
        print(f"{args.adapters} adapters in {result['generate_s']:.0f} s; {per_task / 2**10:.0f} KiB each in memory; "
              f"cache {cache_mb:.1f} MiB", flush=True)
        images = pngs(16, args.img_size)
        tasks = [p.stem for p in paths]
        serve = [sys.executable, "-m", "heartlora", "serve", "--adapter-dir", str(folder), "--device", "cpu",
                 "--quiet"]
        phases = {"merged": ([sys.executable, __file__, "--merged-server", str(paths[0])], [tasks[0]]),
                  "resident": (serve + ["--preload"], tasks),
                  "cache": (serve + ["--cache-mb", f"{cache_mb:.3f}"], tasks)}
        rates = [float(r) for r in args.rates.split(",")]

        def open_n(rate: float) -> int:
            return max(20, int(rate * args.open_seconds))
        for name, (argv, names) in phases.items():
            server = Server(argv, Path(tmp) / f"{name}.log", timeout, args.threads)
            try:
                row = {"start_s": server.start_s, "idle_rss_mib": server.rss() / 2**20}
                row["closed"] = asyncio.run(load(server, names, images, args.requests,
                                                 concurrency=args.concurrency))
                show(f"{name} closed loop", row["closed"])
                if name == "merged":
                    row["open"] = []
                    for fraction in rates:
                        rate = fraction * row["closed"]["throughput_rps"]
                        row["open"].append(asyncio.run(load(server, names, images, open_n(rate), rate=rate,
                                                            seed=1)) | {"fraction": fraction})
                        show(f"merged open {rate:.1f} req/s", row["open"][-1])
                    pick = min(row["open"], key=lambda r: abs(r.get("p99_ms", 1e9) - 100.0))
                    result["p99_100ms_rate"] = pick["offered_rps"]
                elif name == "resident":
                    row["open"] = [asyncio.run(load(server, names, images, open_n(result["p99_100ms_rate"]),
                                                    rate=result["p99_100ms_rate"], seed=1))]
                    show(f"resident open {result['p99_100ms_rate']:.1f} req/s", row["open"][0])
            finally:
                server.stop()
            result[name] = row
    merged, resident, cache = result["merged"], result["resident"], result["cache"]
    at_load = resident["open"][0]
    merged_at = min(merged["open"], key=lambda r: abs(r["offered_rps"] - result["p99_100ms_rate"]))
    result["goals"] = {
        "throughput_ratio": resident["closed"]["throughput_rps"] / merged["closed"]["throughput_rps"],
        "throughput_ok": resident["closed"]["throughput_rps"] >= 0.8 * merged["closed"]["throughput_rps"],
        "merged_p99_ms_at_load": merged_at.get("p99_ms"), "bank_p50_ms_at_load": at_load.get("p50_ms"),
        "bank_p99_ms_at_load": at_load.get("p99_ms"),
        "p99_over_p50": at_load.get("p99_ms", float("nan")) / at_load.get("p50_ms", float("nan")),
        "tail_ok": at_load.get("p99_ms", float("inf")) <= 3 * at_load.get("p50_ms", 0.0),
        "cache_lost": cache["closed"]["lost"], "cache_throughput_rps": cache["closed"]["throughput_rps"],
        "cache_ok": cache["closed"]["lost"] == 0}
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    g = result["goals"]
    print(f"throughput bank/merged {g['throughput_ratio']:.2f} ({'met' if g['throughput_ok'] else 'MISSED'}); "
          f"p99/p50 at the merged model's 100 ms load {g['p99_over_p50']:.2f} ({'met' if g['tail_ok'] else 'MISSED'})"
          f"; cache {args.cache_fraction:.0%}: {g['cache_throughput_rps']:.1f} req/s, {g['cache_lost']} lost",
          flush=True)
    if args.out:
        with atomic_path(args.out) as tmp_out:
            tmp_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
