"""Publishing to the Hub: check what is pushed, then upload it in one commit.

:func:`folder_upload` checks that a merged folder is a complete checkpoint and
lists what to upload; :func:`gain_upload` pairs a gain file with a generated model
card; :func:`push` creates the repo (and branch) and uploads everything in **one
commit**, so a failed upload publishes nothing. :class:`HubPublisher` is the
push step of ``apply --push``: :meth:`~HubPublisher.prepare` runs before any work
(a bad token fails first), :meth:`~HubPublisher.publish` on the finished,
verified output before it is moved into place; without OUT (the Hub-to-Hub
pipeline) :meth:`~HubPublisher.upload_shard` sends each shard as an LFS object and
:meth:`~HubPublisher.commit` makes the one commit (:func:`commit_operations`).
Every path checks for the token the same way (:func:`check_no_token`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping

from gainsurgery import gainfile as gf
from gainsurgery.errors import CheckpointError, GainFileError, HubError
from gainsurgery.hub.cards import CARD_NAME, gain_model_card
from gainsurgery.hub.client import HubClient
from gainsurgery.hub.errors import hub_errors
from gainsurgery.hub.transfer import lfs_objects_present, preupload_file, stored_lfs_operation
from gainsurgery.io.checkpoint import CONFIG_NAME, open_checkpoint
from gainsurgery.io.safetensors import MAX_HEADER_BYTES
from gainsurgery.io.inputs import iter_input_files, open_input, open_regular, resolve_input, show_path
from gainsurgery.io.secrets import contains_secret, current_token

#: Bytes of a ``.safetensors`` file that may hold text (the 8-byte length and the JSON
#: header with ``__metadata__``) are scanned for the token; tensor data is not (see :func:`check_no_token`).
WEIGHT_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class UploadItem:
    """One file of a commit: ``path_in_repo`` from a file of a checked folder, a file the user named, or bytes.

    Attributes:
        path_in_repo: where it goes in the repo.
        size: its size in bytes.
        local: the file to upload (already checked); opened again safely at upload time.
        data: the bytes to upload (a generated model card).
        folder: the input folder ``local`` was found in (it is opened relative to it,
            so a file swapped for a link out meanwhile is refused); None for a file the user named.
        name: ``local``'s name relative to ``folder``.
        text_bytes: for a weights file whose first bytes hold all its text (a GGUF header),
            how many: only those are scanned for the token (see :func:`check_no_token`).
    """

    path_in_repo: str
    size: int
    local: Path | None = None
    data: bytes | None = None
    folder: Path | None = None
    name: str | None = None
    text_bytes: int | None = None

    def open(self) -> BinaryIO:
        """The upload's content as a binary file object, opened safely (the caller closes it)."""
        if self.data is not None:
            import io

            return io.BytesIO(self.data)
        if self.folder is not None and self.name is not None:
            return open_input(self.folder, self.name, error=CheckpointError)
        return open_regular(self.local, error=CheckpointError)  # type: ignore[arg-type]


def text_item(path_in_repo: str, text: str) -> UploadItem:
    """An upload of generated text (a model card, say)."""
    data = text.encode("utf-8")
    return UploadItem(path_in_repo, len(data), data=data)


def folder_upload(folder: str | os.PathLike[str]) -> list[UploadItem]:
    """Check that a checkpoint folder is complete and safe to read; return what to upload.

    Complete means: ``model.safetensors.index.json`` (or a single
    ``model.safetensors``), every shard the index names present with a valid
    header, and ``config.json``. (That each shard is the one an apply wrote is
    checked against its provenance by the caller, see
    :func:`gainsurgery.merge.provenance.check_recorded_shards`.) Every file, in
    sub-folders too, must be a regular file inside the folder: a link out of it (to
    ``/proc/self/environ``, say), a FIFO or a device is refused with one line naming
    it, and nothing is uploaded. Hidden names (``.git``, ``.cache``) are skipped.

    Raises:
        CheckpointError: anything missing or unsafe, with the file named.
    """
    folder = Path(folder)
    open_checkpoint(folder)  # the folder exists, index present, every shard present, headers and sizes valid
    if resolve_input(folder, CONFIG_NAME, missing_ok=True, error=CheckpointError) is None:
        raise CheckpointError(f"{show_path(folder)}: config.json missing; not a complete checkpoint, refusing to push")
    return [UploadItem(f.name, f.size, local=f.path, folder=folder, name=f.name)
            for f in iter_input_files(folder, recursive=True, error=CheckpointError)]


def gain_upload(gain_path: str | os.PathLike[str], repo_id: str, base: Mapping[str, Any] | None = None,
                base_model: str | None = None) -> list[UploadItem]:
    """A validated gain file and its generated model card (README.md).

    The file goes up under its own name, which must end in ``.safetensors`` (a gain
    file named ``README.md`` would replace the card; ``.gitattributes`` the repo's
    settings). ``base``: what is known about a non-Hub base (license, upstream
    model), for the card; ``base_model``: an explicit Hub id for the card.

    Raises:
        GainFileError: the file is not a valid gain file, or its name is unusable.
    """
    path = Path(gain_path)
    name = path.name
    if not name.endswith(WEIGHT_SUFFIX) or name.lower() in (CARD_NAME.lower(), ".gitattributes") \
            or not name.isprintable() or name.startswith("."):
        raise GainFileError(f"{show_path(name)}: a gain file is pushed under its own name, which must end in "
                            f"{WEIGHT_SUFFIX} and not be hidden ({CARD_NAME} is the model card); rename it")
    gain = gf.load(path, allow_negative=True)
    with open_regular(path, error=GainFileError) as f:
        size = os.fstat(f.fileno()).st_size
    return [UploadItem(name, size, local=path),
            text_item(CARD_NAME, gain_model_card(gain, name, repo_id, base, base_model=base_model))]


def check_no_token(items: list[UploadItem], tokens: list[str]) -> None:
    """Refuse the upload when a file would carry a Hub token's value.

    Every non-weight file (config, tokenizer, card, provenance...) is scanned whole,
    in any of :func:`gainsurgery.io.secrets.secret_forms` (UTF-8, UTF-16, base64).
    For ``.safetensors`` files the header (the JSON, where ``__metadata__`` can hold
    text) is scanned, and for a GGUF file its header (every key/value), the tensor data is not: weights are numbers produced from the
    base's and the gain's bytes, which never saw the token, and scanning them would
    read every published byte once more (seconds per GB). A token can only reach an
    upload through a file that read it from the environment, and such files are text.

    Raises:
        HubError: naming the file (never the token).

    Example:
        >>> check_no_token([text_item("notes.txt", "hf_secret_value")], ["hf_secret_value"])
        Traceback (most recent call last):
        ...
        gainsurgery.errors.HubError: notes.txt contains the value of your Hub token; refusing to upload it (nothing was pushed). Remove the token from that file; if it came from a link to /proc or your environment, that link is the problem
    """
    tokens = [t for t in dict.fromkeys(tokens) if t]
    if not tokens:
        return
    for item in items:
        with item.open() as f:
            if item.text_bytes is not None:
                found = any(contains_secret(f.read(item.text_bytes), t) for t in tokens)
            elif item.path_in_repo.endswith(WEIGHT_SUFFIX):
                prefix = f.read(8)
                n = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
                header = prefix + f.read(min(n, MAX_HEADER_BYTES))
                found = any(contains_secret(header, t) for t in tokens)
            else:
                found = _scan_file(f, tokens)
        if found:
            raise HubError(f"{show_path(item.path_in_repo)} contains the value of your Hub token; refusing to upload "
                           "it (nothing was pushed). Remove the token from that file; if it came from a link to "
                           "/proc or your environment, that link is the problem")


def _scan_file(f: BinaryIO, tokens: list[str]) -> bool:
    for t in tokens:
        f.seek(0)
        if contains_secret(f, t):
            return True
    return False


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


def prepare_repo(client: HubClient, repo_id: str, *, private: bool = False, revision: str | None = None) -> None:
    """Create the repo (if missing) and the branch ``revision`` (if missing).

    Cheap, and done first so a bad token or a read-only token fails before
    any heavy work.
    """
    with hub_errors(repo_id, "create or write to", client.endpoint):
        client.api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            client.api.create_branch(repo_id, branch=revision, exist_ok=True)


def push(client: HubClient, items: list[UploadItem], repo_id: str, *, private: bool = False,
         revision: str | None = None, create_pr: bool = False, commit_message: str | None = None) -> PushResult:
    """Upload ``items`` to ``repo_id`` in one commit (creating repo and branch as needed).

    One commit (``HfApi.create_commit``, what ``upload_folder`` does) means all
    files appear together or none do. Before anything is contacted, no file may
    carry the token's value (:func:`check_no_token`). Each file is uploaded from a
    descriptor opened safely (no link followed out of its folder).

    Raises:
        HubError: a file carries the token; auth, not found, rate limit, network;
            nothing is committed.

    Example:
        >>> push(HubClient.from_env(), folder_upload("merged/"), "me/model")  # doctest: +SKIP
    """
    from huggingface_hub import CommitOperationAdd

    own = client.token if isinstance(client.token, str) else None
    check_no_token(items, [t for t in (own, current_token()) if t])
    prepare_repo(client, repo_id, private=private, revision=revision)
    message = commit_message or f"Upload {len(items)} file(s) with gainsurgery"
    with contextlib.ExitStack() as stack:
        ops = [CommitOperationAdd(path_in_repo=i.path_in_repo,
                                  path_or_fileobj=i.data if i.data is not None else stack.enter_context(i.open()))
               for i in items]
        with hub_errors(repo_id, "upload to", client.endpoint):
            info = client.api.create_commit(repo_id, ops, commit_message=message, revision=revision,
                                            create_pr=create_pr)
    return PushResult(repo_id, revision or "main", getattr(info, "commit_url", None), info.pr_url, items)


def commit_operations(client: HubClient, repo_id: str, uploaded: list[Any], items: list[UploadItem], *,
                      revision: str | None = None, create_pr: bool = False,
                      commit_message: str | None = None) -> PushResult:
    """One commit of files already uploaded as LFS objects (``uploaded``: the operations
    :func:`~gainsurgery.hub.transfer.preupload_file` returned) plus small ``items``.

    Nothing is sent again for ``uploaded``: the commit names their sha256 and size
    (their headers were checked for the token before they were uploaded, see
    :meth:`HubPublisher.upload_shard`). The small files are checked like any push
    (:func:`check_no_token`) and uploaded from descriptors opened safely.

    Raises:
        HubError: a file carries the token; auth, not found, rate limit, network; nothing is committed.

    Example:
        >>> commit_operations(client, "me/model", ops, [text_item("README.md", card)])  # doctest: +SKIP
    """
    from huggingface_hub import CommitOperationAdd

    own = client.token if isinstance(client.token, str) else None
    check_no_token(items, [t for t in (own, current_token()) if t])
    message = commit_message or f"Upload {len(uploaded) + len(items)} file(s) with gainsurgery"
    with contextlib.ExitStack() as stack:
        ops = list(uploaded) + [
            CommitOperationAdd(path_in_repo=i.path_in_repo,
                               path_or_fileobj=i.data if i.data is not None else stack.enter_context(i.open()))
            for i in items]
        with hub_errors(repo_id, "upload to", client.endpoint):
            info = client.api.create_commit(repo_id, ops, commit_message=message, revision=revision,
                                            create_pr=create_pr)
    files = [UploadItem(op.path_in_repo, op.upload_info.size) for op in uploaded] + list(items)
    return PushResult(repo_id, revision or "main", getattr(info, "commit_url", None), info.pr_url, files)


@dataclass
class HubPublisher:
    """The push step of an apply: publish the output to ``repo_id`` in one commit.

    With an output folder, :meth:`publish` uploads the finished folder. Without one
    (the Hub-to-Hub pipeline), :meth:`upload_shard` uploads each shard as it is
    made and :meth:`commit` makes the one commit at the end.

    Attributes:
        client: the Hub client.
        repo_id: where to publish.
        private: create the repo private (when it does not exist yet).
        commit_message: the commit title.
        revision: the branch to commit to (created from main if missing); None: main.
        create_pr: open a pull request (against ``revision``) instead of committing.
    """

    client: HubClient
    repo_id: str
    private: bool = False
    commit_message: str | None = None
    revision: str | None = None
    create_pr: bool = False

    @property
    def target(self) -> str:
        """Where this publishes, for plans and messages."""
        return self.repo_id

    def prepare(self) -> None:
        """Create the repo (and branch) now, so a bad or read-only token fails before any work."""
        prepare_repo(self.client, self.repo_id, private=self.private, revision=self.revision)

    def publish(self, folder: Path) -> PushResult:
        """Upload the complete checkpoint in ``folder`` in one commit."""
        return push(self.client, folder_upload(folder), self.repo_id, private=self.private, revision=self.revision,
                    create_pr=self.create_pr, commit_message=self.commit_message)

    def publish_items(self, items: list[UploadItem]) -> PushResult:
        """Upload ``items`` (a finished, verified file and its card) in one commit."""
        return push(self.client, items, self.repo_id, private=self.private, revision=self.revision,
                    create_pr=self.create_pr, commit_message=self.commit_message)

    def check(self, items: list[UploadItem]) -> None:
        """Refuse, before any work, files that would carry the token (:func:`check_no_token`)."""
        own = self.client.token if isinstance(self.client.token, str) else None
        check_no_token(items, [t for t in (own, current_token()) if t])

    def upload_shard(self, path: Path, path_in_repo: str, sha256: str, **kwargs: Any) -> Any:
        """Upload one finished shard as an LFS object (no commit yet); return its operation.

        ``sha256``: computed while the shard was written. Keyword arguments
        (``progress``, ``stop``) go to :func:`~gainsurgery.hub.transfer.preupload_file`.
        """
        self.check([UploadItem(path_in_repo, 0, local=Path(path))])  # a header holds text (__metadata__) too
        return preupload_file(self.client, self.repo_id, path, path_in_repo, sha256, revision=self.revision,
                              create_pr=self.create_pr, **kwargs)

    def stored_shard(self, path_in_repo: str, sha256: str, size: int, sample: bytes) -> Any:
        """The operation of a shard whose LFS object the Hub already stores (nothing is sent)."""
        return stored_lfs_operation(self.client, self.repo_id, path_in_repo, sha256, size, sample,
                                    revision=self.revision, create_pr=self.create_pr)

    def present(self, objects: dict[str, int]) -> set[str]:
        """Which LFS objects (sha256 -> bytes) the Hub already stores for the repo."""
        return lfs_objects_present(self.client, self.repo_id, objects, revision=self.revision)

    def commit(self, uploaded: list[Any], items: list[UploadItem]) -> PushResult:
        """The one commit: the uploaded shards and the small files."""
        return commit_operations(self.client, self.repo_id, uploaded, items, revision=self.revision,
                                 create_pr=self.create_pr, commit_message=self.commit_message)
