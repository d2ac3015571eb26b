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

Trust boundaries (docs/security.md). Writing: CHECKPOINT_DIR is an output like any
other — :meth:`gainsurgery.training.config.TrainConfig.check_checkpoint_folder`
keeps it apart from every input and from ``-o`` and the log before the run starts,
and :class:`CheckpointLock` holds it for the run. Inside it, a checkpoint's two
files are written only into a fresh ``mkdtemp`` folder (mode 0700, an unguessable
name made by this run under the held lock), so no link planted by someone else can
redirect them; that folder is renamed into place whole. Reading: ``--resume`` is an
input folder (:func:`find_checkpoint`, :func:`load`): its ``step-*`` folders must be
real folders, ``state.json`` and ``state.safetensors`` regular files inside them
(:func:`gainsurgery.io.inputs.open_input`: no link out, no FIFO), the JSON parsed
within limits and the safetensors header held to safetensors' rules before any
tensor byte is read; nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from gainsurgery.errors import TrainingError
from gainsurgery.io import jsonsafe
from gainsurgery.io.inputs import allowed_roots, open_input, resolve_input, show_path
from gainsurgery.io.outputs import fsync_dir, fsync_tree, remove_tree
from gainsurgery.io.safetensors import parse_header

FORMAT = "gainsurgery.train-state/1"
#: Checkpoint folders kept in CHECKPOINT_DIR (older ones are removed after a newer one is complete).
KEEP = 2
_STEP_DIR = re.compile(r"step-(\d{8})", re.ASCII)  # always fullmatch: no trailing newline
#: Settings a resumed run must share with the run that wrote the checkpoint.
RESUME_SETTINGS = ("method", "side", "steps", "lr", "batch_size", "grad_accum", "seq_len", "seed", "warmup",
                   "schedule", "text_field", "lora_rank", "lora_alpha", "lora_targets", "streaming",
                   "stream_block_bytes", "processes", "data_fingerprint", "mixed_precision")


def is_step_name(name: str) -> bool:
    """True for the name of one checkpoint of a checkpoint folder (``step-00000042``).

    Example:
        >>> is_step_name("step-00000042"), is_step_name("step-42")
        (True, False)
    """
    return _STEP_DIR.fullmatch(name) is not None


def step_dir(checkpoint_dir: Path, step: int) -> Path:
    """``CHECKPOINT_DIR/step-00000042`` (zero-padded so names sort by step)."""
    return Path(checkpoint_dir) / f"step-{step:08d}"


def _step_folders(folder: Path) -> list[Path]:
    """The ``step-*`` sub-folders of ``folder`` that are real folders (a link is never followed), oldest first."""
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        raise TrainingError(f"{show_path(folder)}: cannot be read ({e.strerror})") from None
    for entry in entries:
        if _STEP_DIR.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
            found.append(folder / entry.name)
    return sorted(found)


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint folder ``path`` names: itself, or its latest complete ``step-*`` folder.

    ``path`` is an input folder the user named (a link to it is followed, as for any
    path the user typed; one under ``/proc``, ``/sys`` or ``/dev`` is refused). Inside it
    only real ``step-*`` folders count: a ``step-*`` link is ignored, so a checkpoint is
    never read from outside the folder named.

    Raises:
        TrainingError: no checkpoint there, or ``path`` is not a usable folder.

    Example:
        >>> find_checkpoint("legal.checkpoints").name  # doctest: +SKIP
        'step-00000300'
    """
    p = Path(path)
    allowed_roots(p, error=TrainingError)  # a folder, and not kernel state
    if resolve_input(p, "state.json", missing_ok=True, error=TrainingError) is not None:
        return p
    steps = [s for s in _step_folders(p) if resolve_input(s, "state.json", missing_ok=True,
                                                          error=TrainingError) is not None]
    if not steps:
        raise TrainingError(f"--resume {show_path(p)}: no training checkpoint there "
                            "(a step-NNNNNNNN folder with state.json)")
    return steps[-1]


def describe(folder: Path, step: int, state_sha256: str) -> dict[str, Any]:
    """How an output records the checkpoint it resumed from: its folder name, step and content hash.

    Never the local path (it says who and where the user is); the sha256 of
    ``state.safetensors`` identifies the numbers the run continued from.

    Example:
        >>> describe(Path("/home/me/ck/step-00000003"), 3, "ab" * 32)["checkpoint"]
        'step-00000003'
    """
    return {"checkpoint": Path(folder).name, "step": step, "state_sha256": state_sha256}


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
        self.created = False
        shown = show_path(self.folder)
        flags = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            try:
                self.folder.mkdir()  # its parent exists: checked with the other outputs
                self.created = True
            except FileExistsError:
                pass
            # The folder itself, never through a link (one may have been planted since the check).
            dir_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | flags)
        except OSError as e:
            raise TrainingError(f"--checkpoint-dir {shown} cannot be used ({e.strerror}); it must be a real "
                                "folder, not a link") from None
        try:
            fd = os.open(".lock", os.O_RDWR | os.O_CREAT | flags, 0o644, dir_fd=dir_fd)
        except OSError as e:
            raise TrainingError(f"--checkpoint-dir {shown}: cannot create its .lock ({e.strerror}); "
                                "remove it if it is not a plain file") from None
        finally:
            os.close(dir_fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise TrainingError(f"--checkpoint-dir {shown}: its .lock is not a plain file; remove it")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TrainingError(f"another training run is writing checkpoints to {shown}; "
                                f"wait for it or give --checkpoint-dir another folder") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        for stale in self.folder.glob(".step-*.tmp"):  # a kill while a checkpoint was written
            if stale.is_dir() and not stale.is_symlink():
                with contextlib.suppress(OSError):
                    remove_tree(stale)

    def release(self) -> None:
        """Let another run use the folder; a folder this run made and left without a checkpoint goes too.

        A run that fails (a full disk, a bad option found late) before its first
        checkpoint must not leave an empty folder holding only our ``.lock``. The lock
        file is unlinked while still held (a run that opens it meanwhile holds a dead
        inode and finds the folder gone or not empty), then the folder is removed only
        if it is empty: anything someone put there meanwhile keeps it.
        """
        if self._fd >= 0:
            if self.created:
                with contextlib.suppress(OSError):
                    if os.listdir(self.folder) == [".lock"]:
                        os.unlink(self.folder / ".lock")
                        os.rmdir(self.folder)
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
    checkpoint_dir.mkdir(exist_ok=True)
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
        fsync_tree(tmp)
        if os.path.islink(final):  # not ours to follow: only the name is replaced
            os.unlink(final)
        elif final.is_dir():  # a rerun from an earlier checkpoint writes this step again
            remove_tree(final)
        os.rename(tmp, final)
        fsync_dir(checkpoint_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _step_folders(checkpoint_dir)[:-KEEP]:
        with contextlib.suppress(OSError):  # removed by the next save if not now
            remove_tree(old)
    return final


#: safetensors dtype -> torch dtype name, for the tensors a checkpoint holds.
_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def load(folder: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(record, tensors, sha256 of ``state.safetensors``) of a checkpoint folder written by :func:`save`.

    Both files are read as hostile input (see the module docstring): opened inside
    ``folder`` only, the JSON within limits, the safetensors header checked before
    any tensor byte is read, each tensor read by its offsets (no pickle, no mmap of a
    file that could change under us). The sha256 covers every byte of the file.

    Raises:
        TrainingError: not a checkpoint of this format, unsafe, or unreadable.
    """
    import torch

    folder = Path(folder)
    shown = show_path(folder)
    with open_input(folder, "state.json", error=TrainingError) as f:
        record = jsonsafe.load(f, where=f"{shown}/state.json", error=TrainingError, max_bytes=64 << 20)
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("step"), int):
        raise TrainingError(f"{shown}: not a {FORMAT} checkpoint")
    shapes = {"settings": dict, "scheduler": dict, "data": dict, "optimizer": dict, "evals": list}
    for key, kind in shapes.items():
        if not isinstance(record.get(key), kind):
            raise TrainingError(f"--resume {shown}: the checkpoint is damaged ({key} is missing or not a "
                                f"{'JSON object' if kind is dict else 'list'})")
    if not isinstance(record["optimizer"].get("param_groups"), list):
        raise TrainingError(f"--resume {shown}: the checkpoint is damaged (optimizer.param_groups)")
    where = f"{shown}/state.safetensors"
    tensors: dict[str, Any] = {}
    with open_input(folder, "state.safetensors", error=TrainingError) as f:
        size = os.fstat(f.fileno()).st_size
        data_start, infos, _meta = parse_header(f, size, where, error=TrainingError)
        f.seek(0)
        digest = hashlib.sha256(f.read(data_start))
        # parse_header proved the tensors tile the data buffer: reading them in order reads the rest.
        for name, info in sorted(infos.items(), key=lambda kv: kv[1].start):
            dtype = _TORCH_DTYPES.get(info.dtype)
            if dtype is None:
                raise TrainingError(f"{where}: tensor {show_path(name)} has dtype {info.dtype}, "
                                    "which a training checkpoint never holds")
            raw = bytearray(info.nbytes)
            if f.readinto(raw) != info.nbytes:
                raise TrainingError(f"{where}: ended early while reading {show_path(name)} (modified?)")
            digest.update(raw)
            flat = torch.frombuffer(raw, dtype=getattr(torch, dtype)) if raw else \
                torch.empty(0, dtype=getattr(torch, dtype))
            tensors[name] = flat.reshape(info.shape)
    return record, tensors, digest.hexdigest()


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
