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

Folders are claimed and published whole (:func:`gainsurgery.io.claims.claim_folder`),
so a kill mid-write leaves the previous checkpoint as the latest; the newest
:data:`KEEP` are kept.

Trust boundaries (docs/security.md). Writing: CHECKPOINT_DIR is an output like any
other — :meth:`gainsurgery.training.config.TrainConfig.check_checkpoint_folder`
keeps it apart from every input and from ``-o`` and the log before the run starts,
and :class:`CheckpointLock` holds it for the run. Inside it, a checkpoint's two
files are written only into the claimed temp folder of its ``step-*`` name (mode
0700, an unguessable name made by this run under the held lock), so no link planted
by someone else can redirect them; that folder is published whole. Reading: ``--resume`` is an
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
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from gainsurgery.errors import TrainingError
from gainsurgery.io import jsonsafe
from gainsurgery.io.atomic import create_file, open_folder_nofollow
from gainsurgery.io.claims import claim_folder, clean_leftovers_in
from gainsurgery.io.inputs import allowed_roots, open_input, resolve_input, show_name, show_path
from gainsurgery.io.locks import NotAPlainFile, lock_file
from gainsurgery.io.mounts import remove_tree
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

    Held for the whole run by the process that writes checkpoints
    (:func:`gainsurgery.io.locks.lock_file`); the kernel drops it when that process
    dies (kill -9 included), so a stale lock never blocks a resume. With it held,
    what killed runs left in the folder is removed: the leftovers of a checkpoint
    claim (:func:`gainsurgery.io.claims.clean_leftovers_in`) and the temporary
    ``.step-*.tmp`` folders of earlier versions.

    Raises:
        TrainingError: another live run holds the folder.
    """

    def __init__(self, checkpoint_dir: Path) -> None:
        self._fd = -1
        self.folder = Path(checkpoint_dir)
        self.created = False
        shown = show_path(self.folder)
        try:
            try:
                self.folder.mkdir()  # its parent exists: checked with the other outputs
                self.created = True
            except FileExistsError:
                pass
            # The folder itself, never through a link (one may have been planted since the check).
            dir_fd = open_folder_nofollow(self.folder)
        except OSError as e:
            raise TrainingError(f"--checkpoint-dir {shown} cannot be used ({e.strerror}); it must be a real "
                                "folder, not a link") from None
        try:
            fd = lock_file(".lock", dir_fd=dir_fd)
        except NotAPlainFile:
            raise TrainingError(f"--checkpoint-dir {shown}: its .lock is not a plain file; remove it") from None
        except OSError as e:
            raise TrainingError(f"--checkpoint-dir {shown}: cannot create its .lock ({e.strerror}); "
                                "remove it if it is not a plain file") from None
        finally:
            os.close(dir_fd)
        if fd is None:
            raise TrainingError(f"another training run is writing checkpoints to {shown}; "
                                f"wait for it or give --checkpoint-dir another folder")
        self._fd = fd
        clean_leftovers_in(self.folder)  # a kill while a checkpoint was written
        for stale in self.folder.glob(".step-*.tmp"):  # the same, by a version before claims (or unprovable)
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

    The folder is claimed and published whole (:func:`gainsurgery.io.claims.claim_folder`,
    mode 0700): a kill mid-write leaves the previous checkpoint as the latest.

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
    if os.path.islink(final):  # not ours to follow: only the name is replaced
        os.unlink(final)
    # A rerun from an earlier checkpoint writes this step again: replaced whole.
    with claim_folder(final, overwrite=True, what="the checkpoint", error=TrainingError, mode=0o700) as claim:
        save_file(tensors, str(claim.tmp / "state.safetensors"), metadata={"format": FORMAT})
        with create_file(claim.tmp / "state.json") as f:
            f.write((json.dumps(body, indent=1) + "\n").encode("utf-8"))
        claim.publish()
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
    step = record.get("step") if isinstance(record, dict) else None
    if not isinstance(record, dict) or record.get("format") != FORMAT or type(step) is not int or step < 0:
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
            raise TrainingError(f"--resume {folder}: it was made with {key}={show_name(saved.get(key))}, "
                                f"this run has {key}={show_name(_jsonable(settings[key]))}; resume with the same "
                                "settings")


def restore(record: Mapping[str, Any], tensors: Mapping[str, Any], named_params: Sequence[tuple[str, Any]],
            optimizer: Any, folder: Path) -> None:
    """Put a checkpoint's parameters, optimizer state and CPU generator back (in place).

    Everything is checked against this run's own objects before anything is changed:
    the trainable parameters (names and shapes), each optimizer tensor (a known Adam
    slot of a known parameter, of that parameter's shape), the parameter groups (the
    same fields with the same JSON types as this optimizer's), the generator state.

    Raises:
        TrainingError: the checkpoint's trainable parameters are not this model's, or it is damaged.
    """
    import torch

    names = [n for n, _ in named_params]
    saved = sorted(k[len("param/"):] for k in tensors if k.startswith("param/"))
    if saved != sorted(names):
        raise TrainingError(f"--resume {folder}: its trainable parameters are not this model's "
                            f"({len(saved)} saved, {len(names)} here)")
    params = dict(named_params)
    for name, p in named_params:
        value = tensors[f"param/{name}"]
        if value.shape != p.shape:
            raise TrainingError(f"--resume {folder}: {name} has shape {tuple(value.shape)}, "
                                f"this model {tuple(p.shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise TrainingError(f"--resume {folder}: the checkpoint is damaged ({name} holds NaN or infinity)")
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            name, _, slot = key[len("optim/"):].rpartition("/")
            if name not in index or slot not in _ADAM_SLOTS or not value.is_floating_point() \
                    or value.shape != (() if slot == "step" else params[name].shape):
                raise TrainingError(f"--resume {folder}: the checkpoint is damaged (optimizer tensor "
                                    f"{show_path(key)} is not one of this run's)")
            # Adam's step count and second moments are never negative (a square root is taken of them).
            if not bool(torch.isfinite(value).all()) or (slot != "exp_avg" and bool((value < 0).any())):
                raise TrainingError(f"--resume {folder}: the checkpoint is damaged (optimizer tensor "
                                    f"{show_path(key)} holds values Adam never makes)")
            state.setdefault(index[name], {})[slot] = value
        elif key == "rng/cpu":
            if value.dtype != torch.uint8 or value.shape != torch.get_rng_state().shape:
                raise TrainingError(f"--resume {folder}: the checkpoint is damaged (rng/cpu)")
        elif not key.startswith("param/"):
            raise TrainingError(f"--resume {folder}: the checkpoint is damaged (unknown tensor {show_path(key)})")
    opt = record["optimizer"]
    scalars = opt.get("scalars", {})
    if not isinstance(scalars, dict) or not all(
            n in index and isinstance(v, dict) and all(_fits(x, 0.0) for x in v.values())
            for n, v in scalars.items()):
        raise TrainingError(f"--resume {folder}: the checkpoint is damaged (optimizer.scalars)")
    for name, values in scalars.items():
        state.setdefault(index[name], {}).update(values)
    live = optimizer.state_dict()["param_groups"]
    groups = opt["param_groups"]
    if len(groups) != len(live):
        raise TrainingError(f"--resume {folder}: the checkpoint is damaged (optimizer.param_groups)")
    loaded = []
    for g, mine in zip(groups, live):
        template = {k: v for k, v in _jsonable(mine).items() if k != "params"}
        # The run's settings (checked equal) made both optimizers: every hyperparameter is this run's
        # (betas of 1.5 would make Adam take the root of a negative number), except the scheduled lr.
        ceiling = template.get("initial_lr", template.get("lr"))
        if (not isinstance(g, dict) or not _fits({k: v for k, v in g.items() if k != "params"}, template)
                or any(g[k] != v for k, v in template.items() if k != "lr" and k in g)
                or ("lr" in g and not 0 <= g["lr"] <= ceiling * (1 + 1e-6))
                or sorted(g.get("params") if isinstance(g.get("params"), list) else [None], key=str)
                != sorted(names[i] for i in mine["params"])):
            raise TrainingError(f"--resume {folder}: the checkpoint is damaged (optimizer.param_groups)")
        # A field this torch has and the checkpoint's did not keeps this run's value.
        group = {**template, **g, "params": [index[n] for n in g["params"]]}
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        loaded.append(group)
    with torch.no_grad():
        for name, p in named_params:
            p.copy_(tensors[f"param/{name}"].to(device=p.device, dtype=p.dtype))
    optimizer.load_state_dict({"state": state, "param_groups": loaded})
    if "rng/cpu" in tensors:
        torch.set_rng_state(tensors["rng/cpu"])


#: The optimizer state tensors a checkpoint may hold per parameter (AdamW's).
_ADAM_SLOTS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _fits(value: Any, template: Any) -> bool:
    """True when parsed JSON ``value`` has the shape of ``template`` (a live object's state, as JSON).

    Objects: only keys the template has (a field missing from ``value`` is allowed: an
    older torch may not have written it), each fitting; arrays: the same length, each
    item fitting. An integer matches an integer below 2**62; a float any number that is
    a finite float (JSON writes ``1.0`` as ``1.0``, but a person may write ``1``); never a
    boolean. Strings, booleans and ``null`` match only their own kind.
    """
    if isinstance(template, bool) or template is None or isinstance(template, str):
        return type(value) is type(template)
    if isinstance(template, int):  # a count or a step: an integer torch can hold
        return type(value) is int and abs(value) < 2**62
    if isinstance(template, float):
        try:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
        except OverflowError:  # an integer past any float
            return False
    if isinstance(template, list):
        return isinstance(value, list) and len(value) == len(template) and all(
            _fits(v, t) for v, t in zip(value, template))
    if isinstance(template, dict):
        return isinstance(value, dict) and value.keys() <= template.keys() and all(
            _fits(v, template[k]) for k, v in value.items())
    return False


def resume(record: Mapping[str, Any], tensors: Mapping[str, Any], named_params: Sequence[tuple[str, Any]],
           optimizer: Any, scheduler: Any, scaler: Any, batches: Any, *, rank: int, streaming: bool, steps: int,
           max_windows: int, folder: Path) -> tuple[int, list[dict[str, Any]], float, float]:
    """Continue a run from a checkpoint read by :func:`load`: restore everything, return where it stood.

    Restores the parameters and optimizer (:func:`restore`), the schedule, the fp16
    scaler and the data position. The checkpoint is hostile input: the scheduler's and
    scaler's state must have the shape of this run's own (only its fields, with their
    JSON types: a hostile ``state_dict`` would otherwise set arbitrary attributes), the data
    position must lie within the run (at most ``steps`` steps done, ``max_windows`` windows consumed).
    Fields a newer torch added and an older checkpoint lacks keep this run's values.

    Returns:
        (step, evaluations so far, last loss, seconds of training so far).

    Raises:
        TrainingError: the checkpoint does not fit this run, or it is damaged.
    """
    def damaged(what: str) -> TrainingError:
        return TrainingError(f"--resume {folder}: the checkpoint is damaged ({what})")

    if record["step"] > steps:
        raise damaged(f"step {record['step']} of a {steps}-step run")
    restore(record, tensors, named_params, optimizer, folder)
    sched = record["scheduler"]
    if not _fits(sched, _jsonable(scheduler.state_dict())):
        raise damaged("scheduler")
    scheduler.load_state_dict(sched)
    if scaler is not None and record.get("scaler"):
        if not _fits(record["scaler"], _jsonable(scaler.state_dict())):
            raise damaged("scaler")
        scaler.load_state_dict(record["scaler"])
    data_pos = record["data"]
    if streaming:
        procs = data_pos.get("processes")
        if not isinstance(procs, list) or not 0 <= rank < len(procs):
            raise damaged("data.processes")
        data_pos = procs[rank]
    try:
        batches.restore(data_pos, max_windows=max_windows)
    except ValueError as exc:
        raise damaged(f"data: {exc}") from None
    evals = record.get("evals", [])
    if not all(isinstance(e, dict) for e in evals):
        raise damaged("evals")
    last_loss, seconds = record.get("last_loss"), record.get("seconds", 0)
    if not (last_loss is None or _fits(last_loss, 0.0)) or not _fits(seconds, 0.0):
        raise damaged("last_loss, seconds")
    return record["step"], list(evals), float("nan") if last_loss is None else float(last_loss), float(seconds)


def _jsonable(value: Any) -> Any:
    """A setting as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))
