"""Pull from and push to the Hugging Face Hub (through ``huggingface_hub``).

Three jobs:

* **Hub references.** ``ORG/NAME[@REV]`` names a base checkpoint on the Hub,
  ``ORG/NAME[@REV]:path/in/repo.safetensors`` a gain file in a Hub repo
  (:func:`parse_base_ref`, :func:`parse_file_ref`, :func:`fetch_file`).
* **A Hub base, one shard at a time.** :func:`open_remote_base` reads only the
  index, the small files and each shard's *header* (HTTP range requests), and
  lays them out in a staging folder as sparse stand-ins for the shards, so the
  ordinary :func:`~gainsurgery.io.checkpoint.open_checkpoint` validates them and
  :func:`~gainsurgery.surgery.make_plan` checks every gain key against every
  header before anything is downloaded or written. During the apply,
  :meth:`RemoteBase.fetch_shard` downloads each shard with ``hf_hub_download``
  (standard HF cache, resumable) just before it is streamed.
* **Publishing.** :func:`folder_upload` checks that a merged folder is complete
  (index, shards and their recorded sha256, config) and lists what to upload;
  :func:`gain_upload` pairs a gain file with a generated model card; :func:`push`
  creates the repo (and branch) and uploads everything in **one commit**, so a
  failed upload publishes nothing.

Every Hub failure becomes a :class:`~gainsurgery.errors.HubError` with one line
naming the repo and what to do (:func:`hub_errors`). The token is resolved by
``huggingface_hub`` (``HF_TOKEN`` or ``hf auth login``) and never printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from gainsurgery.io.checkpoint import (
    INDEX_NAME,
    MAX_HEADER_BYTES,
    SINGLE_NAME,
    WEIGHT_SUFFIXES,
    Checkpoint,
    Shard,
    is_plain_file_name,
    open_checkpoint,
)
from gainsurgery.errors import CheckpointError, HubError

_NAME = r"[A-Za-z0-9][\w.\-]*/[\w.\-]+"
_BASE_RE = re.compile(rf"^(?P<repo>{_NAME})(?:@(?P<rev>[^\s:@]+))?$")
_FILE_RE = re.compile(rf"^(?P<repo>{_NAME})(?:@(?P<rev>[^\s:@]+))?:(?P<path>[^\s]+)$")

#: Bytes asked for first when reading a shard header; most headers fit (one request).
HEADER_PROBE_BYTES = 100_000
#: Top-level non-weight files larger than this are not fetched with a Hub base.
MAX_SMALL_FILE_BYTES = 64 << 20
#: Files of a Hub base never fetched as "small files" (weights, our own outputs, git plumbing).
_NOT_SMALL = (INDEX_NAME, "README.md", "gainsurgery.json", ".gitattributes")
PROVENANCE_NAME = "gainsurgery.json"


@dataclass(frozen=True)
class HubRef:
    """A repo on the Hub, optionally at a revision and a file inside it.

    Attributes:
        repo_id: ``org/name``.
        revision: branch, tag or commit; None for the default branch.
        path: file inside the repo (gain references only).
    """

    repo_id: str
    revision: str | None = None
    path: str | None = None

    def __str__(self) -> str:
        text = self.repo_id + (f"@{self.revision}" if self.revision else "")
        return text + (f":{self.path}" if self.path else "")


def parse_base_ref(spec: str) -> HubRef | None:
    """``ORG/NAME[@REV]`` -> HubRef, else None.

    A spec is a Hub id only when it is not an existing local path and not
    ``embedded:...``: a folder called ``org/name`` always wins.

    Example:
        >>> parse_base_ref("Qwen/Qwen2.5-0.5B@main")  # doctest: +SKIP
        HubRef(repo_id='Qwen/Qwen2.5-0.5B', revision='main', path=None)
    """
    if os.path.exists(spec) or spec.startswith("embedded:"):
        return None
    m = _BASE_RE.match(spec)
    return HubRef(m["repo"], m["rev"]) if m else None


def parse_file_ref(spec: str) -> HubRef | None:
    """``ORG/NAME[@REV]:path/in/repo`` -> HubRef with ``path``, else None (local paths win)."""
    if os.path.exists(spec):
        return None
    m = _FILE_RE.match(spec)
    if not m or m["path"].startswith("/") or ".." in m["path"].split("/"):
        return None
    return HubRef(m["repo"], m["rev"], m["path"])


# --------------------------------------------------------------------------- errors


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


_WRITE_ACTIONS = ("create or write to", "upload to")


def describe_hub_failure(exc: BaseException, what: str, action: str) -> str | None:
    """One line for a Hub failure while ``action``-ing ``what`` (``org/name``...), or None if not one.

    Looks through the exception chain: ``hf_hub_download`` reports a failed
    request as "not in the local cache" with the HTTP error as its cause.
    """
    import httpx2
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, OfflineModeIsEnabled):
            return f"cannot {action} {what}: HF_HUB_OFFLINE is set; unset it, or use a local folder"
        if isinstance(e, RevisionNotFoundError):
            return f"404: revision not found while trying to {action} {what}; check the branch, tag or commit"
        if isinstance(e, RepositoryNotFoundError):
            return (f"{_status(e) or 404}: repo not found while trying to {action} {what} (or it is private or "
                    "gated and your token cannot see it); check the name, or run `hf auth login` / set HF_TOKEN")
        if isinstance(e, EntryNotFoundError) and _status(e) == 404:
            return f"404: file not found while trying to {action} {what}; check the path in the repo"
        if isinstance(e, HfHubHTTPError) and _status(e) is not None:
            code = _status(e)
            if code == 401:
                return (f"401: token invalid or missing while trying to {action} {what}; "
                        "run `hf auth login` or set HF_TOKEN")
            if code == 403 and action in _WRITE_ACTIONS:
                return (f"403: your token may not {action} {what} (read-only or fine-grained token without "
                        "access?); use a token with write access (`hf auth login`) or ask for access")
            if code == 403:
                return (f"403: no access to {what} (gated repo, or a fine-grained token without it?); "
                        "request access on the repo page or log in with another token (`hf auth login`)")
            if code == 404:
                return f"404: not found while trying to {action} {what}; check the repo id, revision and path"
            if code == 429:
                return (f"429: rate limited by the Hub while trying to {action} {what} (still limited after "
                        "retries); wait a few minutes and run the command again")
            if code >= 500:
                return f"{code}: Hub server error while trying to {action} {what}; try again later"
            server = (getattr(e, "server_message", None) or "").strip().splitlines()
            return f"{code}: the Hub refused to {action} {what}" + (f" ({server[0]})" if server else "")
    for e in chain:
        if isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)):
            from huggingface_hub import constants

            return (f"could not reach the Hub at {constants.ENDPOINT} to {action} {what} "
                    f"({type(e).__name__}); check your network, proxy or HF_ENDPOINT and try again")
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, LocalEntryNotFoundError):
        return (f"could not {action} {what}: the Hub did not answer and the file is not in the local cache; "
                "check your network and try again")
    return None


@contextlib.contextmanager
def hub_errors(what: str, action: str) -> Iterator[None]:
    """Turn Hub client failures inside the block into one-line :class:`HubError`\\ s.

    Example:
        >>> with hub_errors("org/name", "download"):  # doctest: +SKIP
        ...     hf_hub_download("org/name", "config.json")
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    # Like our own bars: huggingface_hub's show on a terminal only, so logs and
    # captured stderr hold just the result (or the one error line).
    quiet = not sys.stderr.isatty() and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        yield
    except HubError:
        raise
    except Exception as exc:
        message = describe_hub_failure(exc, what, action)
        if message is None:
            raise
        raise HubError(message) from None
    finally:
        if quiet:
            enable_progress_bars()


def _api():
    from huggingface_hub import HfApi

    return HfApi()  # endpoint and token as huggingface_hub resolves them (HF_ENDPOINT, HF_TOKEN, login)


# --------------------------------------------------------------------------- downloads


def fetch_file(ref: HubRef) -> Path:
    """Download one file (``ref.path``) into the standard HF cache; return its local path."""
    from huggingface_hub import hf_hub_download

    with hub_errors(str(ref), "download"):
        return Path(hf_hub_download(ref.repo_id, ref.path, revision=ref.revision))


def resolve_gain_specs(specs: list[str]) -> tuple[list[str], list[HubRef | None]]:
    """Local paths for GAIN arguments, downloading ``ORG/REPO[@REV]:path`` references.

    Returns:
        (local paths, the Hub reference of each, None for local files).
    """
    paths, refs = [], []
    for spec in specs:
        ref = parse_file_ref(spec)
        paths.append(str(fetch_file(ref)) if ref is not None else spec)
        refs.append(ref)
    return paths, refs


def check_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it reads ``org/name``; raise HubError otherwise."""
    if not re.fullmatch(_NAME, repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise HubError(f"{repo_id!r} is not a Hub repo id; expected ORG/NAME (e.g. myname/my-model)")
    return repo_id


@dataclass
class RemoteBase:
    """A Hub base checkpoint, opened from headers; shards are fetched on demand.

    Attributes:
        ref: the repo and revision as given.
        commit: the commit the revision resolved to; every file comes from it.
        staging: local folder holding the index, small files and sparse
            stand-ins of the shards (headers only; they take no disk space).
        checkpoint: the validated checkpoint; ``shards[name].path`` points at the
            stand-in until :meth:`fetch_shard` replaces it with the download.
        skipped: top-level non-weight files not fetched (too big), in bytes.
    """

    ref: HubRef
    commit: str
    staging: Path
    checkpoint: Checkpoint
    skipped: dict[str, int] = field(default_factory=dict)
    downloaded: list[Path] = field(default_factory=list)

    def fetch_shard(self, shard: Shard) -> None:
        """Download ``shard`` (HF cache, resumable) and point ``shard.path`` at it.

        Raises:
            CheckpointError: the download's size or header differs from the header
                the plan was made from (the repo changed under us).
        """
        from huggingface_hub import hf_hub_download

        what = f"{self.ref.repo_id}@{self.commit[:12]}:{shard.name}"
        with hub_errors(what, "download"):
            local = Path(hf_hub_download(self.ref.repo_id, shard.name, revision=self.commit))
        if local.stat().st_size != shard.file_size:
            raise CheckpointError(f"{what}: downloaded {local.stat().st_size} bytes, its header said "
                                  f"{shard.file_size}; try again (the file changed?)")
        with open(shard.path, "rb") as a, open(local, "rb") as b:
            if a.read(shard.data_start) != b.read(shard.data_start):
                raise CheckpointError(f"{what}: downloaded header differs from the one planned from")
        shard.path = local
        self.downloaded.append(local)

    def provenance(self) -> dict[str, Any]:
        """What to record about this base in ``gainsurgery.json``."""
        out = {"given": str(self.ref), "hub": self.ref.repo_id, "revision": self.ref.revision or "main",
               "commit": self.commit}
        if self.skipped:
            out["files_not_copied"] = self.skipped
        return out

    def close(self) -> None:
        """Remove the staging folder (the HF cache keeps its downloads)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> RemoteBase:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_remote_base(ref: HubRef) -> RemoteBase:
    """Open a Hub base from its index, small files and shard headers only.

    Resolves the revision to a commit once, so headers and shards come from the
    same snapshot. Every header and the index pass the same hostile-input checks
    as a local folder (:func:`~gainsurgery.io.checkpoint.open_checkpoint`).

    Raises:
        HubError: auth, not found, rate limit, network.
        CheckpointError: no safetensors weights, or a hostile index/header.

    Example:
        >>> with open_remote_base(HubRef("Qwen/Qwen2.5-0.5B")) as rb:  # doctest: +SKIP
        ...     len(rb.checkpoint.tensors)
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.hf_api import RepoFile

    api = _api()
    with hub_errors(str(ref), "read"):
        info = api.model_info(ref.repo_id, revision=ref.revision)
        commit = info.sha
        entries = [e for e in api.list_repo_tree(ref.repo_id, revision=commit) if isinstance(e, RepoFile)]
    sizes = {e.path: e.size for e in entries}
    staging = Path(tempfile.mkdtemp(prefix="gainsurgery-hub-"))
    remote = None
    try:
        if INDEX_NAME in sizes:
            if sizes[INDEX_NAME] > MAX_HEADER_BYTES:
                raise CheckpointError(f"{ref}: {INDEX_NAME} is absurdly large ({sizes[INDEX_NAME]} bytes)")
            with hub_errors(f"{ref}:{INDEX_NAME}", "download"):
                index_path = hf_hub_download(ref.repo_id, INDEX_NAME, revision=commit)
            shutil.copyfile(index_path, staging / INDEX_NAME)
            shard_names = _index_shards(staging / INDEX_NAME, ref)
        elif SINGLE_NAME in sizes:
            shard_names = [SINGLE_NAME]
        else:
            kind = "pickle (.bin) weights only" if any(p.endswith(".bin") for p in sizes) else "no safetensors weights"
            raise CheckpointError(f"{ref}: {kind} ({INDEX_NAME} or {SINGLE_NAME} not found); "
                                  "gainsurgery reads safetensors checkpoints only")
        for name in shard_names:
            if name not in sizes:
                raise CheckpointError(f"{ref}: the index names shard {name}, which the repo does not have")
            _write_header_stub(ref, commit, name, sizes[name], staging / name)
        skipped = {}
        for path, size in sorted(sizes.items()):
            if "/" in path or path in _NOT_SMALL or path.endswith(WEIGHT_SUFFIXES) or path in shard_names:
                continue
            if size > MAX_SMALL_FILE_BYTES:
                skipped[path] = size
                continue
            with hub_errors(f"{ref}:{path}", "download"):
                local = hf_hub_download(ref.repo_id, path, revision=commit)
            shutil.copyfile(local, staging / path)
        remote = RemoteBase(ref, commit, staging, open_checkpoint(staging), skipped)
        return remote
    finally:
        if remote is None:
            shutil.rmtree(staging, ignore_errors=True)


def _index_shards(index_path: Path, ref: HubRef) -> list[str]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map")
    except (UnicodeDecodeError, ValueError, AttributeError):
        raise CheckpointError(f"{ref}: {INDEX_NAME} is not valid JSON") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{ref}: {INDEX_NAME} has no 'weight_map' object")
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:  # before we create files named after them
        if not is_plain_file_name(name) or not str(name).endswith(".safetensors"):
            raise CheckpointError(f"{ref}: {INDEX_NAME} names shard {name!r}, not a plain .safetensors file name")
    return names


def _write_header_stub(ref: HubRef, commit: str, name: str, size: int, dst: Path) -> None:
    """Fetch the header of shard ``name`` (range requests) and write it as a sparse file of ``size`` bytes.

    huggingface_hub's ``get_safetensors_metadata`` parses headers the same way
    but drops the header length and padding, which the byte offsets depend on;
    we keep the raw bytes and let :mod:`gainsurgery.io.checkpoint` validate them.
    """
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

    url = hf_hub_url(ref.repo_id, name, revision=commit)
    headers = build_hf_headers()
    what = f"{ref}:{name}"

    def get(first: int, last: int) -> bytes:
        with hub_errors(what, "read the header of"):
            response = http_backoff("GET", url, headers={**headers, "Range": f"bytes={first}-{last}"})
            hf_raise_for_status(response)
        body = response.content
        if response.status_code == 200:  # server ignored Range: it sent the whole file
            body = body[first:last + 1]
        return body

    head = get(0, HEADER_PROBE_BYTES - 1)
    if len(head) < 8:
        raise CheckpointError(f"{what}: truncated (shorter than the 8-byte header length)")
    header_len = int.from_bytes(head[:8], "little")
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(f"{what}: header length {header_len} bytes is absurd (limit {MAX_HEADER_BYTES})")
    if 8 + header_len > size:
        raise CheckpointError(f"{what}: truncated (header claims {header_len} bytes, file has {size})")
    if len(head) < 8 + header_len:
        head += get(len(head), 8 + header_len - 1)
    with open(dst, "wb") as f:
        f.write(head[: 8 + header_len])
        f.truncate(size)  # sparse: the data stays on the Hub until fetch_shard


# --------------------------------------------------------------------------- uploads


@dataclass(frozen=True)
class UploadItem:
    """One file of a commit: ``path_in_repo`` from a local file or from bytes."""

    path_in_repo: str
    size: int
    local: Path | None = None
    data: bytes | None = None


def _walk(folder: Path) -> list[Path]:
    """Files under ``folder``, skipping hidden names (``.cache``, ``.git``...) and symlinks out of it."""
    out = []
    root = folder.resolve()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if root not in p.resolve().parents:
            raise CheckpointError(f"{p} points outside {folder}; refusing to upload it")
        out.append(p)
    return out


def folder_upload(folder: str | os.PathLike[str], card: str | None = None) -> list[UploadItem]:
    """Check that a merged checkpoint folder is complete; return what to upload.

    Complete means: ``model.safetensors.index.json`` (or a single
    ``model.safetensors``), every shard the index names present with a valid
    header, the sha256 of each shard equal to the one recorded in
    ``gainsurgery.json`` (when that file exists), and ``config.json``. When the
    folder has no ``README.md``, ``card`` (if given) is uploaded as one.

    Raises:
        CheckpointError: anything missing or different, with the file named.
    """
    from gainsurgery.io.hashing import sha256_file as file_sha256

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"not a folder: {folder}")
    ckpt = open_checkpoint(folder)  # index present, every shard present, headers and sizes valid
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: config.json missing; not a complete checkpoint, refusing to push")
    prov_path = folder / PROVENANCE_NAME
    if prov_path.is_file():
        try:
            recorded = json.loads(prov_path.read_text(encoding="utf-8")).get("shards") or {}
        except (ValueError, AttributeError):
            raise CheckpointError(f"{prov_path}: not valid JSON; refusing to push") from None
        for name in ckpt.shards:
            if name not in recorded:
                raise CheckpointError(f"{folder}: {PROVENANCE_NAME} records no sha256 for {name}; refusing to push")
        for name, entry in recorded.items():
            path = folder / name
            if not is_plain_file_name(name) or not path.is_file():
                raise CheckpointError(f"{folder}: shard {name} recorded in {PROVENANCE_NAME} is missing; "
                                      "refusing to push an incomplete folder")
            if file_sha256(path) != entry.get("sha256"):
                raise CheckpointError(f"{folder}: {name} does not match the sha256 in {PROVENANCE_NAME} "
                                      "(modified or partly written?); refusing to push")
    items = [UploadItem(p.relative_to(folder).as_posix(), p.stat().st_size, local=p) for p in _walk(folder)]
    if card is not None and not (folder / "README.md").is_file():
        data = card.encode("utf-8")
        items.append(UploadItem("README.md", len(data), data=data))
    return items


def gain_upload(gain_path: str | os.PathLike[str], repo_id: str) -> list[UploadItem]:
    """A validated gain file and its generated model card (README.md)."""
    from gainsurgery import gainfile as gf
    from gainsurgery.cards import gain_model_card

    path = Path(gain_path)
    gain = gf.load(path, allow_negative=True)
    card = gain_model_card(gain, path.name, repo_id).encode("utf-8")
    return [UploadItem(path.name, path.stat().st_size, local=path),
            UploadItem("README.md", len(card), data=card)]


@dataclass
class PushResult:
    """Where :func:`push` put the files."""

    repo_id: str
    revision: str
    commit_url: str | None
    pr_url: str | None
    files: list[UploadItem]

    def as_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit_url": self.commit_url,
                "pr_url": self.pr_url, "files": [{"path": f.path_in_repo, "bytes": f.size} for f in self.files]}


def prepare_repo(repo_id: str, *, private: bool = False, revision: str | None = None) -> None:
    """Create the repo (if missing) and the branch ``revision`` (if missing).

    Cheap, and done first so a bad token or a read-only token fails before
    any heavy work.
    """
    api = _api()
    with hub_errors(repo_id, "create or write to"):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)


def push(items: list[UploadItem], repo_id: str, *, private: bool = False, revision: str | None = None,
         create_pr: bool = False, commit_message: str | None = None) -> PushResult:
    """Upload ``items`` to ``repo_id`` in one commit (creating repo and branch as needed).

    One commit (``HfApi.create_commit``, what ``upload_folder`` does) means all
    files appear together or none do.

    Raises:
        HubError: auth, not found, rate limit, network; nothing is committed.
    """
    from huggingface_hub import CommitOperationAdd

    prepare_repo(repo_id, private=private, revision=revision)
    ops = [CommitOperationAdd(path_in_repo=i.path_in_repo,
                              path_or_fileobj=str(i.local) if i.local is not None else i.data) for i in items]
    message = commit_message or f"Upload {len(items)} file(s) with gainsurgery"
    with hub_errors(repo_id, "upload to"):
        info = _api().create_commit(repo_id, ops, commit_message=message, revision=revision, create_pr=create_pr)
    return PushResult(repo_id, revision or "main", getattr(info, "commit_url", None), info.pr_url, items)
