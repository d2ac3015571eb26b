"""`verify BASE G OUT` passes only when OUT equals apply(BASE, G), file set included (issue 18, item 3e).

Every byte of the shards was already compared; these tests change only the files
around them, through the real CLI: a shard the index does not name, missing files,
extra files, folders, links and FIFOs (never opened), hidden names, a copied file
edited. A download of a pushed output (a Hugging Face cache snapshot: links into
``blobs/`` and the Hub's ``.gitattributes``) still verifies.
"""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import random_gain

# huggingface_hub's own LFS PUT passes `data=<file>` to httpx2, which warns; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def merged(tiny_ckpt, tmp_path, cli):
    """(base, gain, OUT): a fresh apply of a random gain on a tiny three-shard llama with a tokenizer file."""
    base = tmp_path / "base"
    shutil.copytree(tiny_ckpt("llama", "bfloat16"), base)
    (base / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    gain = random_gain(base, "gain-ffn", seed=5).save(tmp_path / "g.safetensors")
    out = tmp_path / "out"
    res = cli("apply", base, gain, out)
    assert res.exit_code == 0, res.stderr
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded: an extra shard can hide beside the others
    res = cli("verify", base, gain, out)
    assert res.exit_code == 0 and res.output.startswith("ok: "), res.stderr
    return base, gain, out


def failed(res, *fragments: str) -> list[str]:
    """A verify that failed: exit 1, every fragment among the mismatch lines, no traceback."""
    assert res.exit_code == 1, (res.output, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("verification failed: ")
    for fragment in fragments:
        assert any(fragment in line for line in lines[:-1]), (fragment, lines)
    return lines[:-1]


def test_an_extra_shard_the_index_does_not_name_fails(merged, cli):
    base, gain, out = merged
    shards = sorted(out.glob("model-*.safetensors"))
    shutil.copy(shards[0], out / "model-00009-of-00009.safetensors")
    lines = failed(cli("verify", base, gain, out), "extra file model-00009-of-00009.safetensors")
    assert len(lines) == 1 and "verification failed: 1 problem" in cli("verify", base, gain, out).stderr


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "gainsurgery.json", "README.md",
                                  "model.safetensors.index.json"])
def test_a_missing_file_fails(merged, cli, name):
    base, gain, out = merged
    (out / name).unlink()
    res = cli("verify", base, gain, out)
    if name == "model.safetensors.index.json":  # then OUT is no checkpoint at all
        assert res.exit_code == 1 and "no model.safetensors.index.json or model.safetensors found" in res.stderr
    else:
        failed(res, f"missing file {name}")


def test_extra_files_folders_links_and_fifos_fail_without_being_opened(merged, cli, tmp_path):
    base, gain, out = merged
    (out / "notes.txt").write_text("hello")
    (out / ".hidden").write_text("hidden names count too")
    (out / "sub").mkdir()
    (out / "sub" / "model-00001-of-00003.safetensors").write_bytes(b"x")
    os.symlink("config.json", out / "alias.json")
    os.symlink(tmp_path / "elsewhere", out / "dangling")
    os.mkfifo(out / "pipe")  # opening it would block: verify must judge it without opening
    lines = failed(cli("verify", base, gain, out), "extra file notes.txt", "extra file .hidden",
                   "extra folder sub", "extra a symbolic link alias.json", "extra a symbolic link dangling",
                   "extra a FIFO (named pipe) pipe")
    assert len(lines) == 6


def test_a_copied_file_replaced_by_a_link_or_a_folder_fails(merged, cli):
    base, gain, out = merged
    (out / "tokenizer_config.json").rename(out / "tok.json")
    os.symlink("tok.json", out / "tokenizer_config.json")  # same bytes, but apply writes no links
    (out / "README.md").unlink()
    (out / "README.md").mkdir()
    failed(cli("verify", base, gain, out), "tokenizer_config.json is a symbolic link",
           "README.md is a folder", "extra file tok.json")


def test_a_copied_file_edited_fails(merged, cli):
    base, gain, out = merged
    (out / "tokenizer_config.json").write_text('{"model_max_length": 129}\n')  # same size, other bytes
    lines = failed(cli("verify", base, gain, out), "tokenizer_config.json differs from the base's")
    assert len(lines) == 1


def test_many_extra_files_are_listed_in_bounded_lines(merged, cli):
    base, gain, out = merged
    for i in range(1200):
        (out / f"junk-{i:04d}").write_bytes(b"")
    res = cli("verify", base, gain, out)
    assert len(failed(res, "extra file junk-0000")) == 20  # the CLI shows 20, and counts them all
    assert res.stderr.strip().splitlines()[-1] == "verification failed: 1001 problem(s)"
    from gainsurgery import api

    problems = api.verify(base, [gain], out).problems
    assert len(problems) == 1001 and problems[-1] == "... and 200 more problems with the folder's files"


def test_a_download_of_a_pushed_output_verifies(merged, cli, hub):
    """A Hugging Face cache snapshot: its files are links into blobs/, and the Hub added .gitattributes."""
    from huggingface_hub import snapshot_download

    base, gain, out = merged
    res = cli("push", out, "testuser/merged")
    assert res.exit_code == 0, res.stderr
    snap = snapshot_download("testuser/merged", endpoint=hub.endpoint, token=hub.token, cache_dir=hub.cache_dir)
    assert os.path.islink(os.path.join(snap, "config.json")) and os.path.exists(os.path.join(snap, ".gitattributes"))
    res = cli("verify", base, gain, snap)
    assert res.exit_code == 0 and res.output.startswith("ok: "), res.stderr
    # An extra shard in the snapshot is still one (a link into blobs/ counts as the file it is).
    name = sorted(p for p in os.listdir(snap) if p.startswith("model-"))[0]
    os.symlink(os.readlink(os.path.join(snap, name)), os.path.join(snap, "model-00009-of-00009.safetensors"))
    failed(cli("verify", base, gain, snap), "extra file model-00009-of-00009.safetensors")


def test_apply_verify_checks_its_own_file_set(merged, cli, tmp_path):
    base, gain, _ = merged
    res = cli("apply", base, gain, tmp_path / "again", "--verify")
    assert res.exit_code == 0, res.stderr
