"""Training checkpoints for exact resume: trainable numbers, optimizer, schedule, data position.

``--save-every N`` writes ``CHECKPOINT_DIR/step-NNNNNNNN/`` every N optimizer steps;
``--resume FOLDER`` (that folder, or ``CHECKPOINT_DIR`` for its latest step) continues
the run as if it had never stopped: same gains, same Adam moments, same
learning-rate schedule step, same next batch. A run resumed at step k of N gives
the gains of an uninterrupted N-step run (bit for bit on one CPU process: the same
operations in the same order; tests/test_training_scale.py).

A checkpoint folder holds two files, no pickles:

- ``state.safetensors``: ``param/NAME`` (each trainable parameter, by its name in
  the model), ``optim/NAME/KEY`` (each tensor of its optimizer state: Adam's
  ``exp_avg``, ``exp_avg_sq``, ``step``), ``rng/cpu`` (torch's CPU generator);
- ``state.json`` (format ``gainsurgery.train-state/1``): the step, the settings a
  resumed run must share (method, data, batch, schedule, process count...), the
  optimizer's hyperparameters, the scheduler's and fp16 scaler's state, the data
  position (windows consumed, or each process's place in its streamed blocks), the
  loss, token count and evaluations so far.

Folders are written under a temporary name and renamed into place when complete,
so a kill mid-write leaves the previous checkpoint as the latest; the newest
:data:`KEEP` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from gainsurgery.errors import TrainingError
from gainsurgery.io import jsonsafe
from gainsurgery.io.atomic import fsync_dir, fsync_files

FORMAT = "gainsurgery.train-state/1"
#: Checkpoint folders kept in CHECKPOINT_DIR (older ones are removed after a newer one is complete).
KEEP = 2
_STEP_DIR = re.compile(r"^step-(\d{8})$")
#: Settings a resumed run must share with the run that wrote the checkpoint.
RESUME_SETTINGS = ("method", "side", "steps", "lr", "batch_size", "grad_accum", "seq_len", "seed", "warmup",
                   "schedule", "text_field", "lora_rank", "lora_alpha", "lora_targets", "streaming",
                   "stream_block_bytes", "processes", "data_fingerprint", "mixed_precision")


def step_dir(checkpoint_dir: Path, step: int) -> Path:
    """``CHECKPOINT_DIR/step-00000042`` (zero-padded so names sort by step)."""
    return Path(checkpoint_dir) / f"step-{step:08d}"


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True for a checkpoint folder, or a folder of them (what ``--resume`` accepts besides a gain file)."""
    p = Path(path)
    return p.is_dir() and ((p / "state.json").is_file() or any(_STEP_DIR.match(c.name) for c in p.iterdir()))


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint folder ``path`` names: itself, or its latest complete ``step-*`` folder.

    Raises:
        TrainingError: no checkpoint there.
    """
    p = Path(path)
    if (p / "state.json").is_file():
        return p
    steps = sorted(c for c in p.iterdir() if _STEP_DIR.match(c.name) and (c / "state.json").is_file()) \
        if p.is_dir() else []
    if not steps:
        raise TrainingError(f"--resume {p}: no training checkpoint there (a step-NNNNNNNN folder with state.json)")
    return steps[-1]


class CheckpointLock:
    """One run at a time writes a checkpoint folder: an exclusive ``flock`` on ``.lock`` in it.

    Held for the whole run by the process that writes checkpoints; the kernel drops it
    when that process dies (kill -9 included), so a stale lock never blocks a resume.
    With it held, temporary folders of killed runs can be removed safely.

    Raises:
        TrainingError: another live run holds the folder.
    """

    def __init__(self, checkpoint_dir: Path) -> None:
        import fcntl

        self._fd = -1
        self.folder = Path(checkpoint_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise TrainingError(f"another training run is writing checkpoints to {self.folder}; "
                                f"wait for it or give --checkpoint-dir another folder") from None
        for stale in self.folder.glob(".step-*.tmp"):  # a kill while a checkpoint was written
            shutil.rmtree(stale, ignore_errors=True)

    def release(self) -> None:
        """Let another run use the folder."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # a run that raised: released when its frame goes
        self.release()


def save(checkpoint_dir: Path, step: int, named_params: Sequence[tuple[str, Any]], optimizer: Any,
         record: Mapping[str, Any]) -> Path:
    """Write the checkpoint of ``step`` (call on one process: the trainable numbers are whole everywhere).

    Args:
        checkpoint_dir: the folder that holds ``step-*`` folders (created if missing).
        step: optimizer steps done.
        named_params: the trainable parameters with their names in the model, in optimizer order.
        optimizer: the optimizer (its state_dict is split into tensors and JSON).
        record: JSON-able state: settings, scheduler, scaler, data position, loss...

    Returns:
        The new folder.
    """
    import torch
    from safetensors.torch import save_file

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in named_params]
    tensors: dict[str, Any] = {f"param/{n}": p.detach().cpu().contiguous() for n, p in named_params}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in opt["state"].items():
        name = names[index]
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    tensors["rng/cpu"] = torch.get_rng_state()
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in opt["param_groups"]]
    body = {"format": FORMAT, "step": step, **record, "optimizer": {"param_groups": groups, "scalars": scalars}}
    final = step_dir(checkpoint_dir, step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=checkpoint_dir))
    try:
        save_file(tensors, str(tmp / "state.safetensors"), metadata={"format": FORMAT})
        (tmp / "state.json").write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
        fsync_files(tmp)
        if final.exists():  # a rerun from an earlier checkpoint writes this step again
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(checkpoint_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(c for c in checkpoint_dir.iterdir() if _STEP_DIR.match(c.name))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(record, tensors) of a checkpoint folder written by :func:`save`.

    Raises:
        TrainingError: not a checkpoint of this format, or unreadable.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    record = jsonsafe.load(Path(folder) / "state.json", error=TrainingError, max_bytes=64 << 20)
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("step"), int):
        raise TrainingError(f"{folder}: not a {FORMAT} checkpoint")
    shapes = {"settings": dict, "scheduler": dict, "data": dict, "optimizer": dict, "evals": list}
    for key, kind in shapes.items():
        if not isinstance(record.get(key), kind):
            raise TrainingError(f"--resume {folder}: the checkpoint is damaged ({key} is missing or not a "
                                f"{'JSON object' if kind is dict else 'list'})")
    if not isinstance(record["optimizer"].get("param_groups"), list):
        raise TrainingError(f"--resume {folder}: the checkpoint is damaged (optimizer.param_groups)")
    try:
        tensors = load_file(str(Path(folder) / "state.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise TrainingError(f"{folder}: unreadable state.safetensors ({str(exc).splitlines()[0][:200]})") from None
    return record, tensors


def check_compatible(record: Mapping[str, Any], settings: Mapping[str, Any], folder: Path) -> None:
    """Refuse to resume a checkpoint made with other settings (the run would not be the same run).

    Raises:
        TrainingError: naming the first setting that differs.
    """
    saved = record.get("settings", {})
    for key in RESUME_SETTINGS:
        if key in settings and saved.get(key) != _jsonable(settings[key]):
            raise TrainingError(f"--resume {folder}: it was made with {key}={saved.get(key)!r}, "
                                f"this run has {key}={_jsonable(settings[key])!r}; resume with the same settings")


def restore(record: Mapping[str, Any], tensors: Mapping[str, Any], named_params: Sequence[tuple[str, Any]],
            optimizer: Any, folder: Path) -> None:
    """Put a checkpoint's parameters, optimizer state and CPU generator back (in place).

    Raises:
        TrainingError: the checkpoint's trainable parameters are not this model's.
    """
    import torch

    names = [n for n, _ in named_params]
    saved = sorted(k[len("param/"):] for k in tensors if k.startswith("param/"))
    if saved != sorted(names):
        raise TrainingError(f"--resume {folder}: its trainable parameters are not this model's "
                            f"({len(saved)} saved, {len(names)} here)")
    with torch.no_grad():
        for name, p in named_params:
            value = tensors[f"param/{name}"]
            if value.shape != p.shape:
                raise TrainingError(f"--resume {folder}: {name} has shape {tuple(value.shape)}, "
                                    f"this model {tuple(p.shape)}")
            p.copy_(value.to(device=p.device, dtype=p.dtype))
    index = {n: i for i, n in enumerate(names)}
    opt = record["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            name, slot = key[len("optim/"):].rsplit("/", 1)
            state.setdefault(index[name], {})[slot] = value
    for name, values in opt.get("scalars", {}).items():
        state.setdefault(index[name], {}).update(values)
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in opt["param_groups"]]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if "rng/cpu" in tensors:
        torch.set_rng_state(tensors["rng/cpu"])


def _jsonable(value: Any) -> Any:
    """A setting as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))
