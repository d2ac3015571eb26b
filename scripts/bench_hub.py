#!/usr/bin/env python
"""Benchmark Hub-to-Hub apply: the streaming pipeline against today's path and the network floor.

Builds a synthetic llama-shaped bf16 checkpoint of about --size-gb GB in --shards
shards and a GAIN-FFN gain file, serves the checkpoint from the loopback Hub of
``tests/hubserver.py`` in its own process (LFS objects kept as files, a byte-rate
throttle of --rate-mb MB/s each way, uploads stored without being hashed again:
the real Hub hashes on its own machines), then measures, in separate processes:

- ``streaming``: ``gainsurgery apply ORG/BASE G --push ORG/NEW`` (no OUT);
- ``today``:     ``gainsurgery apply ORG/BASE G OUT --push ORG/NEW`` (every shard
  into the HF cache, all of OUT written and verified, then one upload);
- ``floor``:     downloading every shard and uploading as many bytes of new LFS
  objects (through huggingface_hub's ``preupload_lfs_files``, sha256 known), both
  at once on two threads: the transfers alone, overlapped.

For each: wall seconds, peak RSS (``/usr/bin/time``), and the peak extra disk
(allocated bytes under the work folder, the HF cache and OUT, sampled every 20 ms).
The server forgets uploaded objects between runs, so every run uploads everything.

Example:
    python scripts/bench_hub.py --size-gb 4 --shards 8 --rate-mb 200 --workdir /tmp/bench-hub
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_apply import build_checkpoint, write_gain  # noqa: E402

FLOOR = r"""
import hashlib, os, sys, threading, time
from pathlib import Path
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.utils import get_session
endpoint, token, repo, src_repo, up_dir = sys.argv[1:6]
names = sys.argv[6:]
api = HfApi(endpoint=endpoint, token=token)
api.create_repo(repo, exist_ok=True)
errors = []

def download():
    try:
        for name in names:
            url = f"{endpoint}/{src_repo}/resolve/main/{name}"
            with get_session().stream("GET", url, headers={"authorization": f"Bearer {token}"},
                                      follow_redirects=True, timeout=60) as r:
                r.raise_for_status()
                with open(os.devnull, "wb") as sink:
                    for chunk in r.iter_bytes():
                        sink.write(chunk)
    except BaseException as e:
        errors.append(e)

def upload():
    try:
        for p in sorted(Path(up_dir).iterdir()):
            op = CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p))
            op.upload_info.sha256 = bytes.fromhex((Path(up_dir + ".sha") / p.name).read_text())
            api.preupload_lfs_files(repo, [op], num_threads=1)
    except BaseException as e:
        errors.append(e)

t = [threading.Thread(target=download), threading.Thread(target=upload)]
for x in t: x.start()
for x in t: x.join()
if errors:
    raise errors[0]
"""


def allocated(paths: list[Path]) -> int:
    total = 0
    for root in paths:
        for here, _, files in os.walk(root):
            for f in files:
                try:
                    total += os.lstat(os.path.join(here, f)).st_blocks * 512
                except FileNotFoundError:
                    pass
    return total


class DiskSampler:
    """Peak allocated bytes under ``paths()`` (a function: folders appear while a run goes)."""

    def __init__(self, paths, every: float = 0.02) -> None:
        self.paths, self.every, self.peak = paths, every, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, allocated(self.paths()))
            self.stop.wait(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def timed(cmd: list[str], env: dict, disk) -> dict:
    """Run ``cmd`` under /usr/bin/time: wall s, peak RSS MiB, peak allocated bytes under ``disk``."""
    with DiskSampler(disk) as sampler:
        t0 = time.perf_counter()
        res = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    rss = int(res.stderr.strip().splitlines()[-1]) / 1024
    return {"wall_s": wall, "rss_mib": rss, "disk_bytes": sampler.peak, "stdout": res.stdout}


def http(endpoint: str, method: str, path: str) -> dict:
    import urllib.request

    req = urllib.request.Request(endpoint + path, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req) as r:  # noqa: S310 - loopback only
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=4.0, help="checkpoint size in GB (1e9 bytes)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rate-mb", type=float, default=200.0, help="MB/s (1e6 bytes) down and up, each")
    ap.add_argument("--workdir", type=Path, default=Path("bench-hub-tmp"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--skip-today", action="store_true", help="skip today's path (download all, apply, upload)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = work / f"base-{args.size_gb:g}gb-{args.shards}"
    if not (base / "config.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        per_shard = int(args.size_gb * 1e9 / args.shards * 1.02)
        build_checkpoint(base, args.size_gb, shard_bytes=per_shard)
    shards = sorted(p for p in base.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards)
    storage = work / "storage"
    shutil.rmtree(storage, ignore_errors=True)
    storage.mkdir()
    rate = args.rate_mb * 1e6
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "hubserver.py"), "--serve", "--storage", str(storage),
         "--seed", f"bench/base={base}", "--rate-down", str(rate), "--rate-up", str(rate), "--no-verify-uploads"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    info = json.loads(server.stdout.readline())
    endpoint, token = info["endpoint"], info["token"]
    exe = shutil.which("gainsurgery") or "gainsurgery"
    hf_home = work / "hf"
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_TOKEN": token, "HF_HOME": str(hf_home),
           "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_DISABLE_XET": "1", "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost", "HF_HUB_DISABLE_TELEMETRY": "1"}
    # Upload files for the floor: as many bytes as the outputs, new content for every run.
    up = work / "floor-up"
    up_sha = work / "floor-up.sha"
    if not up.exists():
        up.mkdir()
        for p in shards:
            shutil.copyfile(p, up / p.name)
    up_sha.mkdir(exist_ok=True)

    results: dict[str, list[dict]] = {"floor": [], "streaming": [], "today": []}
    try:
        for r in range(args.repeats):
            # floor: fresh content (the first 8 bytes differ per run), hashes computed beforehand
            import hashlib

            for p in sorted(up.iterdir()):
                with open(p, "r+b") as f:
                    f.write(os.urandom(8))  # the header length bytes: new content, same size
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while piece := f.read(8 << 20):
                        h.update(piece)
                (up_sha / p.name).write_text(h.hexdigest())
            subprocess.run(["sync"])
            http(endpoint, "POST", "/_test/forget")
            results["floor"].append(timed([sys.executable, "-c", FLOOR, endpoint, token, f"bench/floor-{r}",
                                           "bench/base", str(up), *[p.name for p in shards]], env, lambda: []))
            print(f"run {r + 1}: floor {results['floor'][-1]['wall_s']:.1f} s", file=sys.stderr)

            gain = work / f"gain-{r}.safetensors"
            write_gain(base, gain, seed=100 + r)
            http(endpoint, "POST", "/_test/forget")
            wdir = work / "work"
            shutil.rmtree(wdir, ignore_errors=True)
            wdir.mkdir()
            shutil.rmtree(hf_home, ignore_errors=True)
            subprocess.run(["sync"])
            res = timed([exe, "apply", "bench/base", str(gain), "--push", f"bench/stream-{r}", "--work-dir",
                         str(wdir), "--json"], env, lambda: [wdir, hf_home])
            res["report"] = json.loads(res.pop("stdout"))
            results["streaming"].append(res)
            print(f"run {r + 1}: streaming {res['wall_s']:.1f} s, disk {res['disk_bytes'] / 1e9:.2f} GB, "
                  f"rss {res['rss_mib']:.0f} MiB", file=sys.stderr)

            if not args.skip_today:
                http(endpoint, "POST", "/_test/forget")
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(hf_home, ignore_errors=True)
                subprocess.run(["sync"])
                res = timed([exe, "apply", "bench/base", str(gain), str(out), "--push", f"bench/today-{r}"], env,
                            lambda: [hf_home, out, *work.glob(".out.*")])  # the cache, OUT and its staging
                res.pop("stdout")
                results["today"].append(res)
                print(f"run {r + 1}: today {res['wall_s']:.1f} s, disk {res['disk_bytes'] / 1e9:.2f} GB, "
                      f"rss {res['rss_mib']:.0f} MiB", file=sys.stderr)
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(hf_home, ignore_errors=True)
        stats = http(endpoint, "GET", "/_test/stats")
    finally:
        server.stdin.close()
        server.wait(timeout=60)

    largest = max(p.stat().st_size for p in shards)
    floor = statistics.median(x["wall_s"] for x in results["floor"])
    print(f"\ncheckpoint: {total / 1e9:.2f} GB bf16 in {len(shards)} shards (largest {largest / 1e9:.2f} GB); "
          f"throttle {args.rate_mb:g} MB/s down and up; {os.cpu_count()} CPUs; "
          f"repeats: {args.repeats} (median)\n")
    print("| contender | wall (s) | vs floor | peak extra disk | in shards | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = {}
    for name, runs in results.items():
        if not runs:
            continue
        wall = statistics.median(x["wall_s"] for x in runs)
        disk = max(x["disk_bytes"] for x in runs)
        rss = max(x["rss_mib"] for x in runs)
        rows[name] = {"wall_s": wall, "vs_floor": wall / floor, "disk_bytes": disk, "rss_mib": rss,
                      "runs": [{k: v for k, v in x.items() if k != "report"} for x in runs]}
        disk_text = f"{disk / 1e9:.2f} GB" if name != "floor" else "0 (not written)"
        shards_text = f"{disk / largest:.2f}" if name != "floor" else "-"
        print(f"| {name} | {wall:.1f} | {wall / floor:.2f}x | {disk_text} | {shards_text} | {rss:.0f} |")
    if results["streaming"]:
        rep = results["streaming"][-1]["report"]
        print(f"\nstreaming: budget's peak {rep['peak_disk_bytes'] / 1e9:.2f} GB; server sent "
              f"{stats['bytes_sent'] / 1e9:.2f} GB and received {stats['bytes_received'] / 1e9:.2f} GB in all runs")
    if args.json:
        args.json.write_text(json.dumps({"bytes": total, "shards": len(shards), "largest": largest,
                                         "rate_mb": args.rate_mb, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
