"""A GGUF BASE: a local ``.gguf`` file, an embedded model's original GGUF, or a file of a Hub repo.

:func:`opened_gguf` opens one (pre-checked within limits, opened as a regular file)
and says where it came from; :func:`gguf_targets` lists the GAIN targets of one
under checkpoint names, with the route a gain there takes; :func:`inspect_gguf`
summarizes what one holds. The engine is :mod:`gainsurgery.formats.gguf`; applying
gains to one is :mod:`gainsurgery.applying.gguf_sink`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from gainsurgery.architectures import Target
from gainsurgery.architectures.registry import METHODS, SIDES
from gainsurgery.errors import ArchitectureError
from gainsurgery.formats.gguf import GGUFFile, make_plan, open_gguf
from gainsurgery.formats.gguf.engine import digest_tensor
from gainsurgery.formats.gguf.library import gguf_module
from gainsurgery.formats.gguf.names import NameMap
from gainsurgery.formats.gguf.provenance import is_ours, read_record
from gainsurgery.gainfile import GainFile
from gainsurgery.hub.client import HubClient
from gainsurgery.hub.refs import HubRef
from gainsurgery.io.fingerprint import combine
from gainsurgery.sources.base import fetch_gain_file
from gainsurgery.sources.embedded import embedded_gguf, embedded_model
from gainsurgery.sources.spec import BaseSpec, classify_gguf_spec


@dataclass
class OpenedGGUF:
    """A GGUF base, opened, and what provenance says about where it came from.

    Attributes:
        spec: the BASE argument as given.
        file: the opened, pre-checked file.
        path: the local file it is read from.
        facts: where it came from beyond the file itself (a Hub repo and commit, an embedded model).
    """

    spec: str
    file: GGUFFile
    path: Path
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The base as messages show it."""
        return self.spec

    @property
    def hub_id(self) -> str | None:
        """The Hub repo the base comes from, if any (a card's ``base_model``)."""
        return self.facts.get("hub")

    def provenance(self) -> dict[str, Any]:
        """What the record says about the base (its file name, never its folder)."""
        return {"name": self.file.name, "bytes": self.file.size, **self.facts}


@contextlib.contextmanager
def opened_gguf(spec: str | os.PathLike[str] | BaseSpec, hub: HubClient | None = None) -> Iterator[OpenedGGUF]:
    """Open a GGUF BASE: ``with opened_gguf("model.gguf") as base: ...``.

    ``spec`` (classified by :func:`gainsurgery.sources.spec.classify_gguf_spec`, or
    already) is a local ``.gguf`` file; ``embedded:NAME.gguf``, an embedded model's
    original GGUF (assembled once into the cache, its sha256 checked by its package);
    or ``ORG/NAME[@REV]:path/model.gguf``, a file of a Hub repo, downloaded into the
    Hugging Face cache. Anything that reads like a local path is never sent to the Hub.

    Raises:
        CheckpointError: missing, not a GGUF file, outside the limits.
        HubError: a Hub file cannot be downloaded.
    """
    base = spec if isinstance(spec, BaseSpec) else classify_gguf_spec(os.fspath(spec))
    facts: dict[str, Any] = {}
    if base.kind == "embedded":
        model = embedded_model(base.name)  # type: ignore[arg-type]
        path = embedded_gguf(model.name)
        facts = {**model.facts(), "embedded": base.spec, "description": f"{model.upstream} (the original GGUF file)"}
    elif base.kind == "hub":
        ref = HubRef(base.repo_id, base.revision, base.file)  # type: ignore[arg-type]
        path = fetch_gain_file(ref, hub if hub is not None else HubClient.from_env())
        facts = {"hub": ref.repo_id, "revision": ref.revision or "main", "path": ref.path}
        parts = path.parts
        if "snapshots" in parts[:-1]:
            facts["commit"] = parts[parts.index("snapshots") + 1]
    else:
        path = base.path  # type: ignore[assignment]
    with open_gguf(path) as g:
        yield OpenedGGUF(base.spec, g, path, facts)


@dataclass
class GGUFTargets:
    """The GAIN targets of a GGUF base (see :func:`gguf_targets`).

    Attributes:
        model_type: the transformers model type the file's architecture is.
        targets: the targets, keyed by checkpoint names (what a gain file holds).
        where: gain key -> the GGUF tensor, its type, and the route a gain there takes.
        structure: a short identity of the file's tensors (names, types, shapes).
        content: ``base_tensors_sha256`` of the targets (the F32 dequantization), when asked for.
        path: the local file read.
    """

    model_type: str
    targets: list[Any]
    where: dict[str, dict[str, Any]]
    structure: str
    content: str | None
    path: Path


def gguf_targets(base: str | os.PathLike[str], method: str = "gain-ffn", side: str = "in", *,
                 hub: HubClient | None = None, fingerprint: bool = False) -> GGUFTargets:
    """Which tensors a GAIN method scales on a GGUF base, under their checkpoint names, and each one's route.

    The route is the one a gain with distinct values per feature would take (moved
    exactly onto another tensor's rows, folded, or re-quantized).

    Raises:
        ArchitectureError: an architecture the registry does not support as GGUF, or
            a block without the expected tensors.
    """
    if method not in METHODS:
        raise ArchitectureError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if side not in SIDES:
        raise ArchitectureError(f"unknown side {side!r}; choose 'in' or 'out'")
    with opened_gguf(base, hub) as opened:
        g = opened.file
        names = NameMap(g)
        kinds = {"attn_out": "ATTN_OUT", **({"ffn_down": "FFN_DOWN"} if method == "gain-ffn" else {})}
        targets, vectors, dims = [], {}, {}
        for block in range(names.blocks):
            for kind, tensor_kind in kinds.items():
                name = names.gguf_name(tensor_kind, block)
                entry = g.by_name.get(name)
                if entry is None or len(entry.ne) != 2:
                    raise ArchitectureError(f"{g.name}: block {block} has no 2-D {name}")
                key = names.checkpoint_name(entry, kind)
                dim = 1 if side == "in" else 0
                targets.append(Target(key, dim, entry.shape[dim], kind, block, "linear"))
                # Distinct values per feature: the general case a trained gain is.
                vectors[key] = np.linspace(0.9, 1.1, entry.shape[dim], dtype=np.float32)
                dims[key] = dim
        plan = make_plan(g, GainFile(vectors, dims, {}))
        where = {line["key"]: {k: v for k, v in line.items() if k != "key"} for line in plan.routes()}
        spec = {t.name: [t.type_name, list(t.shape)] for t in g.tensors}
        structure = "sha256:" + hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":"))
                                               .encode()).hexdigest()[:16]
        content = None
        if fingerprint:
            digests = {t.key: digest_tensor(g, g.by_name[plan.keys[t.key]]).digests()["F32"] for t in targets}
            content = combine(digests)
        return GGUFTargets(names.arch.model_type, targets, where, structure, content, opened.path)


def inspect_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a GGUF file holds: architecture, tensor types and sizes, metadata, and its gainsurgery record.

    Long values are summarized (arrays by their length and item type, strings cut at
    200 characters); nothing is decoded beyond that.

    Example:
        >>> inspect_gguf("legal.gguf")["types"]["Q4_K"]  # doctest: +SKIP
        {'tensors': 18, 'bytes': 6635520}
    """
    with opened_gguf(path) as opened:
        g = opened.file
        types: dict[str, dict[str, int]] = {}
        for t in g.tensors:
            entry = types.setdefault(t.type_name, {"tensors": 0, "bytes": 0, "weights": 0})
            entry["tensors"] += 1
            entry["bytes"] += t.nbytes
            entry["weights"] += t.n_elements
        meta: dict[str, Any] = {}
        for key in g.keys:
            if is_ours(key):
                continue
            meta[key] = _summary(g, key)
        return {"file": g.name, "bytes": g.size, "version": g.version, "architecture": g.arch,
                "tensors": len(g.tensors), "weights": sum(t.n_elements for t in g.tensors),
                "types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])), "metadata": meta,
                "gainsurgery": read_record(g)}


def _summary(g: GGUFFile, key: str) -> Any:
    f = g.field(key)
    kinds = [int(t) for t in f.types]
    if kinds[0] == 8:
        text = g.string(key) or ""
        return text if len(text) <= 200 else text[:200] + f"... ({len(text)} characters)"
    if kinds[0] == 9:
        item = gguf_module().GGUFValueType(int(f.parts[3][0])).name
        return f"[{len(f.data)} {item} items]"
    return f.parts[-1].tolist()[0]
