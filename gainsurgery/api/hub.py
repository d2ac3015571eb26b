"""The Hub: publish a merged folder, a gain file or an adapted GGUF file, in one commit."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gainsurgery import gainfile as gf
from gainsurgery.errors import GainSurgeryError
from gainsurgery.hub import publish as pub
from gainsurgery.hub.cards import CARD_NAME, merged_model_card
from gainsurgery.hub.client import HubClient
from gainsurgery.hub.publish import PushResult, UploadItem
from gainsurgery.hub.refs import check_repo_id
from gainsurgery.io.checkpoint import open_checkpoint
from gainsurgery.io.inputs import show_path
from gainsurgery.merge.provenance import PROVENANCE_NAME, check_recorded_shards
from gainsurgery.sources.local import base_facts
from gainsurgery.sources.spec import names_gguf


@dataclass
class PushPlan:
    """What :func:`push` uploads (or, with ``dry_run``, would upload).

    Attributes:
        kind: ``merged checkpoint`` or ``gain file``.
        repo_id: the target repo.
        items: the files of the commit.
        result: where they went (None for a dry run).
    """

    kind: str
    repo_id: str
    items: list[UploadItem]
    result: PushResult | None = None

    @property
    def bytes(self) -> int:
        """Total size of the upload."""
        return sum(i.size for i in self.items)


def push(source: str | os.PathLike[str], repo_id: str, *, private: bool = False, revision: str | None = None,
         create_pr: bool = False, commit_message: str | None = None, dry_run: bool = False,
         base_model: str | None = None, hub: HubClient | None = None) -> PushPlan:
    """Publish a merged folder or a gain file to the Hugging Face Hub, in one commit.

    A folder must be complete: index (or ``model.safetensors``), every shard with
    the sha256 its ``gainsurgery.json`` records, ``config.json``; a model card is
    added when it has none. A gain file goes up with a generated model card, and so
    does a GGUF file adapted by ``apply`` (its card made from its ``gainsurgery.record``).

    Args:
        source: a merged checkpoint folder, a gain file, or an adapted ``.gguf`` file.
        repo_id: ``org/name``.
        private: create the repo private (if it does not exist yet).
        revision: branch to commit to (created if missing).
        create_pr: open a pull request instead of committing to the branch.
        commit_message: the commit title.
        dry_run: check and list the files; contact nothing.
        base_model: the Hub repo id the model card names as ``base_model``; for a
            folder, its card is regenerated from its ``gainsurgery.json`` with it.
        hub: the Hub client (default: from ``HF_ENDPOINT``/``HF_TOKEN``/login, read now).

    Every file of a folder must be a regular file inside it (a link out, a FIFO or a
    device is refused, naming it), and no file may hold the current token's value.

    Returns:
        A :class:`PushPlan` with the files and, unless ``dry_run``, the push result.

    Raises:
        CheckpointError: the folder is incomplete, unsafe or differs from its provenance.
        HubError: a file holds the token; auth, not found, rate limit, network; nothing is committed.

    Example:
        >>> push("merged/", "me/qwen-legal", private=True).result.commit_url  # doctest: +SKIP
    """
    check_repo_id(repo_id)
    if base_model is not None:
        check_repo_id(base_model, what="--base-model")
    path = Path(source)
    if names_gguf(source) and not path.is_dir():
        from gainsurgery.applying.gguf_sink import gguf_upload  # the gguf library: only for a GGUF file

        items = gguf_upload(path, base_model=base_model)
        kind = "GGUF file"
    elif path.is_dir():
        items = pub.folder_upload(path)  # a complete checkpoint: index, shards, config; every file safe
        provenance = check_recorded_shards(path, list(open_checkpoint(path).shards))
        has_card = any(i.path_in_repo == CARD_NAME for i in items)
        if base_model is not None and provenance is None:
            raise GainSurgeryError(f"--base-model rewrites the model card from {PROVENANCE_NAME}, which "
                                   f"{show_path(source)} does not have; edit its {CARD_NAME} instead")
        if provenance is not None and (not has_card or base_model is not None):
            items = [i for i in items if i.path_in_repo != CARD_NAME]
            items.append(pub.text_item(CARD_NAME, merged_model_card(provenance, provenance_file=PROVENANCE_NAME,
                                                                    base_model=base_model)))
        kind = "merged checkpoint"
    elif path.is_file():
        recorded = gf.load(path, allow_negative=True).metadata.get("base_model")
        items = pub.gain_upload(path, repo_id, base_facts(recorded if isinstance(recorded, str) else None),
                                base_model=base_model)
        kind = "gain file"
    else:
        raise GainSurgeryError(f"nothing to push: {show_path(source)} is neither a folder nor a gain file")
    plan = PushPlan(kind, repo_id, items)
    if not dry_run:
        client = hub if hub is not None else HubClient.from_env()
        plan.result = pub.push(client, items, repo_id, private=private, revision=revision, create_pr=create_pr,
                               commit_message=commit_message or f"Upload {kind} with gainsurgery")
    return plan
