"""Training across processes: data parallel, and FSDP2 sharding of the frozen base.

One picture for every launcher (``torchrun``, ``accelerate launch``) and device:

- every process reads its own slice of each global batch;
- the *trainable* numbers (gain vectors, a PEFT adapter, or every weight for
  ``full``) are whole in every process, and their gradients are averaged with one
  all-reduce per optimizer step (:func:`average_gradients`). That is DDP's
  arithmetic; for 55K gains, or a few million adapter numbers, there is nothing
  to overlap, and keeping them whole means the hooks, the optimizer state, the
  checkpoints and the saved file are exactly those of one process;
- without ``--fsdp`` each process holds the whole frozen base (DDP);
- with ``--fsdp`` the frozen base is sharded with torch's FSDP2 ``fully_shard``
  (:func:`shard_frozen_base`): each decoder layer is one unit whose weights are
  split across the processes and gathered only while that layer runs; untied
  input embeddings and LM head are units too; the rest (final norm, a tied
  embedding) is the root unit. The trainable parameters are
  ``ignored_params``: FSDP neither shards nor reduces them (the all-reduce above
  does), so the gain holder the hooks read is a plain, whole tensor.

Per process, the base takes ``1/N`` of its bytes plus one gathered layer at a time;
see docs/training.md for what that means for 1B/8B/70B models.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterable, Sequence, TypeVar

from gainsurgery.errors import GainSurgeryError, TrainingError

T = TypeVar("T")
#: Longest failure message passed from the main process to the others, in bytes.
MAX_MESSAGE_BYTES = 4096


def world_size() -> int:
    """Processes in the default process group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def close_process_group() -> None:
    """End this process's part in the default process group, if it has one; call it as the process ends.

    Left to interpreter exit, a run that did everything right can still die: gloo's
    worker threads let go of a finished collective's tensors a moment *after* the
    waiting thread has gone on, and freeing a tensor Python has seen needs the GIL.
    On a loaded machine that moment can come after the interpreter began to shut
    down; CPython then ends the worker thread inside a C++ destructor, which aborts
    the process ("terminate called without an active exception", SIGABRT) once its
    outputs are written, and torchrun reports the run as failed. Destroying the
    group joins those threads while the interpreter still runs.

    Call it only where this process has no collective in flight (the run finished, or it
    stopped with one line between collectives): a pending one would be waited for here.

    Example:
        >>> close_process_group()  # nothing to do without torchrun / accelerate launch
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launched() -> bool:
    """True in a process started by ``torchrun`` / ``accelerate launch`` (one of several workers).

    Example:
        >>> launched()  # a plain `gainsurgery train`
        False
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return True
    size = os.environ.get("WORLD_SIZE", "").strip()
    return size.isdigit() and int(size) > 1  # a stray non-number is no launcher's: not launched


def end_launched_process(code: int) -> None:
    """In a launched worker, end the process now with exit status ``code``; elsewhere return.

    The command has finished: its files are closed and published, its messages
    written. What remains is interpreter shutdown, and there a finished
    distributed run can still die: gloo's and the TCP store's C++ threads may let
    go of their last objects while CPython tears down, and a thread left joinable
    then calls ``std::terminate`` ("terminate called without an active
    exception", SIGABRT), which torchrun reports as a failed run (seen a few times
    in a hundred under load, on both ranks). So a launched worker closes its
    process group while the interpreter still runs (:func:`close_process_group`),
    flushes what it wrote, and leaves with :func:`os._exit`, skipping that teardown.
    A bug's traceback never reaches here: it ends the process as usual.
    """
    if not launched():
        return
    import logging

    close_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away: nothing left to say to it
            pass
    os._exit(code)


def average_gradients(params: Sequence[Any]) -> None:
    """Average the gradients of ``params`` over every process, in place (one all-reduce per dtype).

    A parameter without a gradient on this process counts as a zero gradient, so
    every process takes part in the same collective whatever its batch touched.
    """
    import torch
    import torch.distributed as dist

    n = world_size()
    if n == 1:
        return
    by_dtype: dict[Any, list[Any]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for dtype in sorted(by_dtype, key=str):  # the same order on every process
        group = by_dtype[dtype]
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= n
        offset = 0
        for p in group:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def on_main_process(is_main: bool, device: Any, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on the main process only; every process then goes on together, or stops together.

    Outputs are the main process's job (claiming ``-o``, locking the checkpoint folder,
    opening the log, writing a checkpoint, saving the result). If that fails there, the
    other processes must not walk on into the next collective and die on a closed
    connection with a traceback: the outcome is broadcast from the main process (a
    one-line message as UTF-8 bytes in a tensor; nothing is pickled) and every other
    process raises :class:`TrainingError` with the same message, so each one ends with
    one line. The call is also a barrier behind the main process.

    Returns ``fn()`` on the main process, None elsewhere; with one process it is just ``fn()``.

    Example:
        >>> log = on_main_process(accelerator.is_main_process, accelerator.device,
        ...                       lambda: open_log_file(path))  # doctest: +SKIP
    """
    failure: BaseException | None = None
    result: T | None = None
    if is_main:
        try:
            result = fn()
        except BaseException as exc:  # told to the others below, then raised here as it was
            failure = exc
    if world_size() > 1:
        message = None if failure is None else _one_line(failure)
        shared = _broadcast_text(message if is_main else None, device, is_main)
        if not is_main and shared is not None:
            raise TrainingError(f"stopped: the main process failed: {shared}")
    if failure is not None:
        raise failure
    return result


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, GainSurgeryError):
        return str(exc)
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _broadcast_text(text: str | None, device: Any, is_main: bool) -> str | None:
    """Send ``text`` (or None) from process 0 to every process; return what process 0 sent."""
    import torch
    import torch.distributed as dist

    data = b"" if text is None else text.encode("utf-8", "replace")[:MAX_MESSAGE_BYTES]
    head = torch.tensor([-1 if text is None else len(data)], dtype=torch.int64, device=device)
    dist.broadcast(head, src=0)
    n = int(head.item())
    if n < 0:
        return None
    body = torch.zeros(max(n, 1), dtype=torch.uint8, device=device)
    if is_main and n:
        body[:n] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    dist.broadcast(body, src=0)
    return bytes(body[:n].cpu().tolist()).decode("utf-8", "replace")


def layer_classes(model: Any) -> set[str]:
    """Class names of the model's repeated blocks (transformers' ``_no_split_modules``)."""
    found: set[str] = set()
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            found.update(names)
    return found


def shard_frozen_base(model: Any, device: Any, keep: Iterable[Any], *, reshard_after_forward: bool = True) -> int:
    """Shard ``model``'s parameters across processes with FSDP2, except ``keep`` (kept whole).

    Each repeated block (decoder layer) becomes one FSDP unit, so do untied input
    embeddings and LM head; the rest of the model is the root unit. ``keep`` (the
    trainable parameters) are moved to ``device`` and left to :func:`average_gradients`.

    Args:
        model: the model, after the gains or adapter are attached.
        device: this process's device (``accelerator.device``).
        keep: parameters FSDP must not shard.
        reshard_after_forward: free each layer's gathered weights after its forward
            (ZeRO-3; gathered again in backward) — False keeps them until backward (ZeRO-2 for
            parameters: faster, more memory).

    Returns:
        The number of FSDP units made (layers, embeddings, head, root).

    Raises:
        TrainingError: no process group, or a model whose blocks cannot be found.

    Example:
        >>> shard_frozen_base(model, accelerator.device, trainable)  # doctest: +SKIP
        19
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise TrainingError("--fsdp needs several processes: launch with torchrun or accelerate launch")
    classes = layer_classes(model)
    if not classes:
        raise TrainingError(f"--fsdp: {type(model).__name__} names no repeated blocks (_no_split_modules) to shard")
    keep = list(keep)
    for p in keep:  # FSDP moves what it manages; what it ignores must be placed here
        p.data = p.data.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    ignored = set(keep)
    units = 0
    for module in list(model.modules()):
        if type(module).__name__ in classes:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
            units += 1
    if units == 0:
        raise TrainingError(f"--fsdp: none of {sorted(classes)} found in the model")
    # Untied embeddings and head are the largest single weights of a model (2 x 1.05B numbers
    # for Llama 3 70B); as units of their own they are gathered only while they run, instead
    # of for the whole step as part of the root unit. A tied pair stays in the root.
    embed, head = _embeddings(model)
    for module in (embed, head):
        if module is not None and getattr(module, "weight", None) is not None and \
                (embed is None or head is None or embed.weight is not head.weight):
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
            units += 1
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    return units + 1


def _embeddings(model: Any) -> tuple[Any, Any]:
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    return (get_in() if get_in else None), (get_out() if get_out else None)


def parameter_bytes(model: Any) -> int:
    """Bytes of parameters this process holds: its local shard of sharded ones, all of the others.

    Example:
        >>> parameter_bytes(torch.nn.Linear(4, 4))  # doctest: +SKIP
        80
    """
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
