#!/usr/bin/env python
"""What checking a Hugging Face cache snapshot's blobs costs `gainsurgery apply`.

Builds a synthetic llama-shaped bf16 checkpoint of about --size-mb MB, lays the same
files out twice: as a plain folder, and as a Hugging Face cache snapshot (files are
links into ``blobs/``, each blob named after its sha256 or git blob id, as
huggingface_hub names them). ``apply`` reads the plain folder as it is; the snapshot's
blobs it hashes first and compares with their names (issue 18: every byte that came
from the Hub is checked). Both are applied --repeats times, alternating, in their own
processes; the medians and the difference are printed.

Example:
    python scripts/bench_snapshot_check.py --size-mb 300 --workdir /tmp/bench-snap --repeats 5
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def blob_name(path: Path) -> str:
    """The name huggingface_hub gives a blob: sha256 for weights (LFS), the git blob id otherwise."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def make_snapshot(plain: Path, cache: Path) -> Path:
    """``cache/models--bench--base/snapshots/<rev>``: links to blobs holding ``plain``'s files."""
    repo = cache / "models--bench--base"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(plain.iterdir()):
        name = blob_name(f)
        shutil.copyfile(f, repo / "blobs" / name)
        os.symlink(f"../../blobs/{name}", snap / f.name)
    return snap


def time_apply(base: Path, gain: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gainsurgery.cli", "apply", str(base), str(gain), str(out)], check=True,
                   env=env, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=300)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import random_gain  # noqa: E402 - the tests' helpers build the model
    from models import synthetic_llama  # noqa: E402

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    layers = max(1, round(args.size_mb / 35))  # ~35 MB per layer at hidden 1024, inter 4096 (bf16)
    plain = synthetic_llama(work / "plain", layers=layers, hidden=1024, inter=4096, vocab=4096,
                            shard_bytes=50 << 20)
    size = sum(p.stat().st_size for p in plain.glob("*.safetensors"))
    gain = random_gain(plain, "gain-ffn").save(work / "g.safetensors")
    snap = make_snapshot(plain, work / "cache")
    times: dict[str, list[float]] = {"plain folder": [], "cache snapshot (checked)": []}
    for _ in range(args.repeats):
        times["plain folder"].append(time_apply(plain, gain, work / "out"))
        times["cache snapshot (checked)"].append(time_apply(snap, gain, work / "out"))
    print(f"{size / 1e6:.0f} MB in {len(list(plain.glob('*.safetensors')))} shards, {args.repeats} runs each")
    print("| base | median wall (s) | min | max |\n|---|---:|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {min(ts):.2f} | {max(ts):.2f} |")
    extra = statistics.median(times["cache snapshot (checked)"]) - statistics.median(times["plain folder"])
    print(f"check: +{extra:.2f} s, {extra / (size / 1e9):.2f} s per GB")


if __name__ == "__main__":
    main()
