"""Commands on the Hub: ``push``."""

from __future__ import annotations

import click

from gainsurgery import api
from gainsurgery.cli.group import emit_json, human_bytes, hub_client, main, opt_base_model, opt_json, shown


@main.command()
@click.argument("source", metavar="FOLDER_OR_GAINFILE")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (if it does not exist yet).")
@click.option("--revision", default=None, metavar="BRANCH", help="Branch to commit to (created if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--commit-message", default=None, metavar="MSG", help="Commit title.")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded; contact nothing.")
@opt_base_model
@opt_json
def push(source, repo_id, private, revision, create_pr, commit_message, dry_run, base_model, as_json):
    """Publish a merged folder, a gain file or an adapted GGUF file to the Hugging Face Hub, in one commit.

    A folder must be complete: index (or model.safetensors), every shard with
    the sha256 recorded in gainsurgery.json, config.json. A gain file goes up
    with a generated model card (README.md), and so does a GGUF file adapted by
    apply (its card made from its gainsurgery.record metadata). The token comes from HF_TOKEN or
    `hf auth login`; no file that holds its value is uploaded, nor a link out of
    the folder.

    \b
    Example:
      gainsurgery push merged/ me/qwen-legal --private
      gainsurgery push legal.safetensors me/qwen-legal-gain
    """
    plan = api.push(source, repo_id, private=private, revision=revision, create_pr=create_pr,
                    commit_message=commit_message, dry_run=dry_run, base_model=base_model, hub=hub_client())
    kind, items, total = plan.kind, plan.items, plan.bytes
    if dry_run:
        if as_json:
            emit_json({"dry_run": True, "repo_id": repo_id, "revision": revision or "main", "create_pr": create_pr,
                       "kind": kind, "bytes": total,
                       "files": [{"path": i.path_in_repo, "bytes": i.size} for i in items]})
        else:
            click.echo(f"would push {kind} {shown(source)} to {repo_id} ({revision or 'main'}"
                       f"{', as a pull request' if create_pr else ''}): {len(items)} files, {human_bytes(total)}")
            for i in items:
                click.echo(f"  {i.path_in_repo:<48} {human_bytes(i.size):>10}")
            click.echo("dry run: nothing uploaded")
        return
    result = plan.result
    if as_json:
        emit_json({"kind": kind, "bytes": total, **result.as_dict()})
    else:
        where = f"pull request {result.pr_url}" if result.pr_url else (result.commit_url or result.revision)
        click.echo(f"pushed {kind} to {repo_id} ({len(items)} files, {human_bytes(total)}): {where}")
