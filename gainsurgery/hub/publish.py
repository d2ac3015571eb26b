"""Publishing to the Hub: check what is pushed, then upload it in one commit.

:func:`folder_upload` checks that a merged folder is a complete checkpoint and
lists what to upload; :func:`gain_upload` pairs a gain file with a generated model
card; :func:`push` creates the repo (and branch) and uploads everything in **one
commit**, so a failed upload publishes nothing. :class:`HubPublisher` is the
push step of ``apply --push``: :meth:`~HubPublisher.prepare` runs before any work
(a bad token fails first), :meth:`~HubPublisher.publish` on the finished,
verified output before it is moved into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from gainsurgery.errors import CheckpointError
from gainsurgery.hub.cards import CARD_NAME, gain_model_card
from gainsurgery.hub.client import HubClient
from gainsurgery.hub.errors import hub_errors
from gainsurgery.io.checkpoint import open_checkpoint


@dataclass(frozen=True)
class UploadItem:
    """One file of a commit: ``path_in_repo`` from a local file or from bytes."""

    path_in_repo: str
    size: int
    local: Path | None = None
    data: bytes | None = None


def text_item(path_in_repo: str, text: str) -> UploadItem:
    """An upload of generated text (a model card, say)."""
    data = text.encode("utf-8")
    return UploadItem(path_in_repo, len(data), data=data)


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


def folder_upload(folder: str | os.PathLike[str]) -> list[UploadItem]:
    """Check that a checkpoint folder is complete; return what to upload.

    Complete means: ``model.safetensors.index.json`` (or a single
    ``model.safetensors``), every shard the index names present with a valid
    header, and ``config.json``. (That each shard is the one an apply wrote is
    checked against its provenance by the caller, see
    :func:`gainsurgery.merge.provenance.check_recorded_shards`.)

    Raises:
        CheckpointError: anything missing, with the file named.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"not a folder: {folder}")
    open_checkpoint(folder)  # index present, every shard present, headers and sizes valid
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: config.json missing; not a complete checkpoint, refusing to push")
    return [UploadItem(p.relative_to(folder).as_posix(), p.stat().st_size, local=p) for p in _walk(folder)]


def gain_upload(gain_path: str | os.PathLike[str], repo_id: str,
                base: Mapping[str, Any] | None = None) -> list[UploadItem]:
    """A validated gain file and its generated model card (README.md).

    ``base``: what is known about a non-Hub base (license, upstream model), for the card.
    """
    from gainsurgery import gainfile as gf

    path = Path(gain_path)
    gain = gf.load(path, allow_negative=True)
    return [UploadItem(path.name, path.stat().st_size, local=path),
            text_item(CARD_NAME, gain_model_card(gain, path.name, repo_id, base))]


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
    files appear together or none do.

    Raises:
        HubError: auth, not found, rate limit, network; nothing is committed.

    Example:
        >>> push(HubClient.from_env(), folder_upload("merged/"), "me/model")  # doctest: +SKIP
    """
    from huggingface_hub import CommitOperationAdd

    prepare_repo(client, repo_id, private=private, revision=revision)
    ops = [CommitOperationAdd(path_in_repo=i.path_in_repo,
                              path_or_fileobj=str(i.local) if i.local is not None else i.data) for i in items]
    message = commit_message or f"Upload {len(items)} file(s) with gainsurgery"
    with hub_errors(repo_id, "upload to", client.endpoint):
        info = client.api.create_commit(repo_id, ops, commit_message=message, revision=revision,
                                        create_pr=create_pr)
    return PushResult(repo_id, revision or "main", getattr(info, "commit_url", None), info.pr_url, items)


def commit_operations(client: HubClient, repo_id: str, uploaded: list[Any], items: list[UploadItem], *,
                      revision: str | None = None, create_pr: bool = False,
                      commit_message: str | None = None) -> PushResult:
    """One commit of files already uploaded as LFS objects (``uploaded``: the operations
    :func:`~gainsurgery.hub.transfer.preupload_file` returned) plus small ``items``.

    Nothing is sent again for ``uploaded``: the commit names their sha256 and size.

    Raises:
        HubError: auth, not found, rate limit, network; nothing is committed.
    """
    from huggingface_hub import CommitOperationAdd

    from gainsurgery.io.secrets import contains_secret

    token = client.token if isinstance(client.token, str) else None
    for item in items:  # the small files (config, tokenizer, card...): never the token
        if contains_secret(item.local if item.local is not None else item.data, token):
            raise CheckpointError(f"{item.path_in_repo} contains your Hub token; refusing to upload it "
                                  "(nothing was committed)")
    ops = list(uploaded) + [
        CommitOperationAdd(path_in_repo=i.path_in_repo,
                           path_or_fileobj=str(i.local) if i.local is not None else i.data) for i in items]
    message = commit_message or f"Upload {len(ops)} file(s) with gainsurgery"
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

    def upload_shard(self, path: Path, path_in_repo: str, sha256: str, **kwargs: Any) -> Any:
        """Upload one finished shard as an LFS object (no commit yet); return its operation.

        ``sha256``: computed while the shard was written. Keyword arguments
        (``progress``, ``stop``) go to :func:`~gainsurgery.hub.transfer.preupload_file`.
        """
        from gainsurgery.hub.transfer import preupload_file

        return preupload_file(self.client, self.repo_id, path, path_in_repo, sha256, revision=self.revision,
                              create_pr=self.create_pr, **kwargs)

    def stored_shard(self, path_in_repo: str, sha256: str, size: int, sample: bytes) -> Any:
        """The operation of a shard whose LFS object the Hub already stores (nothing is sent)."""
        from gainsurgery.hub.transfer import stored_lfs_operation

        return stored_lfs_operation(self.client, self.repo_id, path_in_repo, sha256, size, sample,
                                    revision=self.revision, create_pr=self.create_pr)

    def present(self, objects: dict[str, int]) -> set[str]:
        """Which LFS objects (sha256 -> bytes) the Hub already stores for the repo."""
        from gainsurgery.hub.transfer import lfs_objects_present

        return lfs_objects_present(self.client, self.repo_id, objects, revision=self.revision)

    def commit(self, uploaded: list[Any], items: list[UploadItem]) -> PushResult:
        """The one commit: the uploaded shards and the small files."""
        return commit_operations(self.client, self.repo_id, uploaded, items, revision=self.revision,
                                 create_pr=self.create_pr, commit_message=self.commit_message)
