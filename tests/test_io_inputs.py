"""Reading input folders: links out, FIFOs, sockets, devices, /proc, HF cache snapshots, BASE specs."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from gainsurgery.errors import CheckpointError, UnsafeInputError
from gainsurgery.io import inputs
from gainsurgery.io.inputs import (
    allowed_roots,
    iter_input_files,
    open_input,
    open_regular,
    resolve_input,
    show_path,
)
from gainsurgery.sources import spec as base_grammar
from gainsurgery.sources.spec import BaseSpec, classify_base_spec


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def in_thread(fn, *args, **kwargs):
    """Run fn in a daemon thread; return ('ok', value) / ('raised', exc) or ('blocked', None).

    The join timeout is only a safety net so a regression cannot hang the suite;
    tests assert on what came back, never on how long it took.
    """
    out: list = []

    def run():
        try:
            out.append(("ok", fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001
            out.append(("raised", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    return out[0] if out else ("blocked", None)


@pytest.fixture
def base(tmp_path):
    b = tmp_path / "base"
    b.mkdir()
    (b / "config.json").write_text('{"model_type": "llama"}')
    (b / "model.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}      ")
    return b


# -- plain folders -------------------------------------------------------------------

def test_regular_file_and_inside_link_accepted(base):
    (base / "tokenizer.json").symlink_to("config.json")
    (base / "sub").mkdir()
    (base / "sub" / "t.model").write_bytes(b"abc")
    assert resolve_input(base, "config.json") == (base / "config.json").resolve()
    assert resolve_input(base, "tokenizer.json") == (base / "config.json").resolve()
    assert resolve_input(base, "sub/t.model") == (base / "sub" / "t.model").resolve()
    with open_input(base, "tokenizer.json") as f:
        assert f.read() == b'{"model_type": "llama"}'
    with open_input(base, "sub/t.model") as f:
        assert f.read() == b"abc"


def test_link_to_proc_environ_refused(base):
    (base / "tokenizer_config.json").symlink_to("/proc/self/environ")
    with pytest.raises(UnsafeInputError) as e:
        open_input(base, "tokenizer_config.json")
    assert one_line(e) == (f"{base}/tokenizer_config.json: resolves to /proc/{os.getpid()}/environ under /proc; "
                           "refusing to read it")


@pytest.mark.parametrize("target", ["/sys/kernel/mm", "/dev/null", "/dev/zero"])
def test_links_to_sys_and_dev_refused(base, target):
    if not os.path.exists(target):
        pytest.skip(f"{target} does not exist here")
    (base / "x.json").symlink_to(target)
    with pytest.raises(UnsafeInputError, match=r"under /(sys|dev); refusing to read it$"):
        resolve_input(base, "x.json")


def test_link_out_of_folder_refused(base, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    (base / "a.json").symlink_to(secret)
    (base / "b.json").symlink_to("../secret.txt")
    (base / "c.json").symlink_to("b.json")  # a chain that ends outside
    for name in ("a.json", "b.json", "c.json"):
        with pytest.raises(UnsafeInputError) as e:
            open_input(base, name)
        assert one_line(e) == f"{base}/{name}: resolves to {secret}, outside {base}; refusing to read it"


def test_link_to_folder_sibling_with_common_prefix_refused(tmp_path):
    # "base-evil" starts with "base" but is not inside it: containment is by path parts.
    b = tmp_path / "base"
    b.mkdir()
    evil = tmp_path / "base-evil"
    evil.mkdir()
    (evil / "x").write_text("x")
    (b / "x").symlink_to(evil / "x")
    with pytest.raises(UnsafeInputError, match="outside"):
        resolve_input(b, "x")


def test_fifo_refused_without_blocking(base):
    os.mkfifo(base / "model-00001-of-00002.safetensors")
    for fn in (resolve_input, open_input):
        kind, value = in_thread(fn, base, "model-00001-of-00002.safetensors")
        assert kind == "raised", f"{fn.__name__} returned or blocked on a FIFO: {kind}"
        assert isinstance(value, UnsafeInputError)
        assert str(value) == (f"{base}/model-00001-of-00002.safetensors: is a FIFO (named pipe), not a regular "
                              "file; refusing to read it")
    kind, value = in_thread(open_regular, base / "model-00001-of-00002.safetensors")
    assert kind == "raised" and isinstance(value, UnsafeInputError)
    assert str(value).endswith("is a FIFO (named pipe), not a regular file; refusing to read it")
    kind, value = in_thread(lambda: list(iter_input_files(base)))
    assert kind == "raised" and isinstance(value, UnsafeInputError)
    assert str(value) == (f"{base}/model-00001-of-00002.safetensors: is a FIFO (named pipe), not a regular "
                          "file; refusing to read or copy it")


def test_fifo_swapped_in_after_check_is_caught_on_the_descriptor(base, tmp_path):
    # The validated inode was a regular file; by open time the path is a FIFO with no
    # writer. O_NONBLOCK keeps the open from hanging; fstat refuses it.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    validated = os.stat(base / "config.json")
    kind, value = in_thread(inputs._open_checked, fifo, validated, "base/config.json", UnsafeInputError)
    assert kind == "raised" and isinstance(value, UnsafeInputError)
    assert str(value) == "base/config.json: is a FIFO (named pipe), not a regular file; refusing to read it"


def test_file_replaced_after_check_is_caught(base):
    validated = os.stat(base / "config.json")
    (base / "other.json").write_text("{}")
    with pytest.raises(UnsafeInputError) as e:
        inputs._open_checked(base / "other.json", validated, "base/config.json", UnsafeInputError)
    assert one_line(e) == "base/config.json: changed while it was being opened; refusing to read it"


def test_last_component_swapped_to_a_link_is_caught(base, tmp_path):
    (tmp_path / "outside").write_text("x")
    validated = os.stat(base / "config.json")
    (base / "config.json").unlink()
    (base / "config.json").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsafeInputError, match=r"^base/config.json: cannot be opened \(.*symbolic links\)"):
        inputs._open_checked(base / "config.json", validated, "base/config.json", UnsafeInputError)


def test_socket_refused(tmp_path):
    # AF_UNIX paths are limited to ~107 bytes: use a short folder.
    b = Path(os.environ.get("TMPDIR", "/tmp")) / f"gs-sock-{os.getpid()}"
    b.mkdir()
    try:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(b / "tok.sock"))
        try:
            with pytest.raises(UnsafeInputError) as e:
                resolve_input(b, "tok.sock")
            assert one_line(e) == f"{b}/tok.sock: is a socket, not a regular file; refusing to read it"
        finally:
            s.close()
    finally:
        for p in b.iterdir():
            p.unlink()
        b.rmdir()


def test_device_node_inside_folder_refused(base):
    try:
        os.mknod(base / "tape", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot create a device node here ({e.strerror})")
    kind, value = in_thread(open_input, base, "tape")
    assert kind == "raised" and isinstance(value, UnsafeInputError)
    assert str(value) == f"{base}/tape: is a character device, not a regular file; refusing to read it"


def test_folder_missing_broken_and_bad_names(base):
    (base / "sub").mkdir()
    with pytest.raises(UnsafeInputError) as e:
        resolve_input(base, "sub")
    assert one_line(e) == f"{base}/sub: is a folder, not a regular file; refusing to read it"
    with pytest.raises(UnsafeInputError) as e:
        resolve_input(base, "generation_config.json")
    assert one_line(e) == f"{base}/generation_config.json: no such file"
    assert resolve_input(base, "generation_config.json", missing_ok=True) is None
    (base / "dangling.json").symlink_to("nowhere.json")
    with pytest.raises(UnsafeInputError) as e:
        resolve_input(base, "dangling.json")
    assert one_line(e) == f"{base}/dangling.json: no such file (a broken symbolic link)"
    (base / "loop").symlink_to("loop")
    with pytest.raises(UnsafeInputError, match=r"^.*/loop: cannot be read \(Too many levels of symbolic links\)$"):
        resolve_input(base, "loop")
    for bad in ("../base/config.json", "/etc/hostname", ""):
        with pytest.raises(UnsafeInputError, match="name"):
            resolve_input(base, bad)


def test_folder_itself_checked(tmp_path):
    with pytest.raises(UnsafeInputError) as e:
        resolve_input(tmp_path / "nope", "config.json")
    assert one_line(e) == f"no such folder: {tmp_path / 'nope'}"
    (tmp_path / "f").write_text("x")
    with pytest.raises(UnsafeInputError, match=r"is a regular file|not a folder"):
        allowed_roots(tmp_path / "f")
    with pytest.raises(UnsafeInputError) as e:
        allowed_roots("/proc/self")
    assert one_line(e) == "/proc/self: lies under /proc, which holds kernel state, not files; refusing to read from it"
    (tmp_path / "procdir").symlink_to("/proc/self")
    with pytest.raises(UnsafeInputError, match="lies under /proc"):
        list(iter_input_files(tmp_path / "procdir"))


def test_newline_in_name_stays_one_line(base):
    (base / "evil\nname").symlink_to("/proc/self/environ")
    with pytest.raises(UnsafeInputError) as e:
        list(iter_input_files(base))
    assert one_line(e).startswith(repr(f"{base}/evil\nname") + ": resolves to")
    assert show_path("a\nb") == "'a\\nb'" and show_path("plain/path") == "plain/path"


# -- iterating extra files -------------------------------------------------------------

def test_iter_input_files_skips_hidden_folders_and_excluded(base, tmp_path):
    (base / ".cache").mkdir()
    (base / ".cache" / "x").symlink_to("/proc/self/environ")  # hidden: never looked at
    (base / ".hidden.json").write_text("{}")
    (base / "original").mkdir()
    (base / "original" / "consolidated.pth").write_bytes(b"x")
    (base / "tokenizer.json").write_text("{}")
    (base / "linked_dir").symlink_to("original")
    got = [(f.name, f.path, f.size) for f in iter_input_files(base, exclude=lambda n: n.endswith(".safetensors"))]
    assert got == [("config.json", (base / "config.json").resolve(), 23),
                   ("tokenizer.json", (base / "tokenizer.json").resolve(), 2)]
    names = [f.name for f in iter_input_files(base, recursive=True)]
    assert names == ["config.json", "model.safetensors", "original/consolidated.pth", "tokenizer.json"]


def test_iter_input_files_raises_on_first_unsafe_entry(base, tmp_path):
    (tmp_path / "outside").mkdir()
    (base / "b_link_dir").symlink_to(tmp_path / "outside")
    (base / "c_environ").symlink_to("/proc/self/environ")
    with pytest.raises(UnsafeInputError) as e:
        list(iter_input_files(base))
    assert one_line(e) == f"{base}/b_link_dir: resolves to {tmp_path / 'outside'}, outside {base}; refusing to read it"
    (base / "b_link_dir").unlink()
    with pytest.raises(UnsafeInputError) as e:
        list(iter_input_files(base))
    assert one_line(e) == f"{base}/c_environ: resolves to /proc/{os.getpid()}/environ under /proc; refusing to read it"
    (base / "c_environ").unlink()
    (base / "sub").mkdir()
    (base / "sub" / "pipe").symlink_to("/dev/stdin")
    assert [f.name for f in iter_input_files(base)] == ["config.json", "model.safetensors"]
    with pytest.raises(UnsafeInputError, match=r"^.*/sub/pipe: resolves to .* under /(proc|dev)"):
        list(iter_input_files(base, recursive=True))


# -- Hugging Face cache snapshots ---------------------------------------------------------

def make_snapshot(cache: Path, repo: str, files: dict[str, bytes], rev: str = "0123abcd" * 5) -> Path:
    """Build ``models--ORG--NAME/{blobs,refs,snapshots/REV}`` the way huggingface_hub does."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(rev)
    snap = folder / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (folder / "blobs" / blob).write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        depth = len(Path(name).parts) + 1  # from snapshots/REV/<dirs> up to the repo folder
        link.symlink_to(Path(*([".."] * depth), "blobs", blob))
    return snap


def test_sharded_snapshot_accepted(tmp_path):
    files = {"config.json": b'{"model_type": "llama"}',
             "model.safetensors.index.json": b'{"weight_map": {}}',
             "model-00001-of-00002.safetensors": b"shard-1",
             "model-00002-of-00002.safetensors": b"shard-2",
             "tokenizer.json": b"{}",
             "original/params.json": b"{}"}
    snap = make_snapshot(tmp_path / "hub", "org/name", files)
    repo = snap.parent.parent
    assert os.readlink(snap / "config.json") == f"../../blobs/{hashlib.sha256(files['config.json']).hexdigest()}"
    assert os.readlink(snap / "original" / "params.json").startswith("../../../blobs/")
    assert allowed_roots(snap) == (snap.resolve(), (repo / "blobs").resolve())
    for name, data in files.items():
        assert resolve_input(snap, name).parent == (repo / "blobs").resolve()
        with open_input(snap, name) as f:
            assert f.read() == data
    assert [f.name for f in iter_input_files(snap, recursive=True)] == sorted(files)
    # A sub-folder of a snapshot (the folder beside a gain file) also reaches blobs.
    with open_input(snap / "original", "params.json") as f:
        assert f.read() == b"{}"
    # Reached through a link the user made to the snapshot.
    (tmp_path / "mybase").symlink_to(snap)
    with open_input(tmp_path / "mybase", "model-00002-of-00002.safetensors") as f:
        assert f.read() == b"shard-2"


def test_snapshot_link_outside_repo_cache_refused(tmp_path):
    snap = make_snapshot(tmp_path / "hub", "org/name", {"config.json": b"{}"})
    other = make_snapshot(tmp_path / "hub", "other/repo", {"secret.json": b"secret"})
    other_blob = next((other.parent.parent / "blobs").iterdir())
    (snap / "stolen.json").symlink_to(Path("../../../models--other--repo/blobs") / other_blob.name)
    (snap / "refs.json").symlink_to("../../refs/main")  # inside the repo cache, but not a blob
    (snap / "env.json").symlink_to("/proc/self/environ")
    (tmp_path / "hub" / "x.txt").write_text("x")
    (snap / "up.json").symlink_to("../../../x.txt")
    with pytest.raises(UnsafeInputError) as e:
        resolve_input(snap, "stolen.json")
    assert one_line(e) == (f"{snap}/stolen.json: resolves to {other_blob}, outside {snap} or "
                           f"{snap.parent.parent / 'blobs'}; refusing to read it")
    for name in ("refs.json", "up.json"):
        with pytest.raises(UnsafeInputError, match="outside"):
            resolve_input(snap, name)
    with pytest.raises(UnsafeInputError, match="under /proc"):
        resolve_input(snap, "env.json")
    with pytest.raises(UnsafeInputError):
        list(iter_input_files(snap))


def test_snapshot_with_linked_blobs_folder_gets_no_blob_allowance(tmp_path):
    snap = make_snapshot(tmp_path / "hub", "org/name", {"config.json": b"{}"})
    repo = snap.parent.parent
    (repo / "blobs").rename(repo / "real-blobs")
    (repo / "blobs").symlink_to("/")  # would otherwise let every file through
    assert allowed_roots(snap) == (snap.resolve(),)
    with pytest.raises(UnsafeInputError, match="outside"):
        resolve_input(snap, "config.json")


def test_not_a_snapshot_without_the_layout(tmp_path):
    # "snapshots" under a folder not named models--... is an ordinary folder.
    f = tmp_path / "project" / "snapshots" / "v1"
    f.mkdir(parents=True)
    assert allowed_roots(f) == (f.resolve(),)


# -- BASE specs ---------------------------------------------------------------------------

@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path


def test_local_spellings_never_go_to_the_hub(in_tmp):
    for spec in ("./ckpt", "../ckpt", "/abs/ckpt", "~/ckpt", "a/b/c", "org/", "/org/name",
                 "org\\name", ".", "..", "checkpoints/final/"):
        if spec in (".", ".."):
            assert classify_base_spec(spec).kind == "local"
            continue
        with pytest.raises(CheckpointError) as e:
            classify_base_spec(spec)
        assert one_line(e) == f"no such folder: {spec}", spec


def test_existing_paths_are_local(in_tmp):
    (in_tmp / "org" / "name").mkdir(parents=True)
    assert classify_base_spec("org/name") == BaseSpec(kind="local", spec="org/name", path=Path("org/name"))
    (in_tmp / "home" / "m").mkdir()
    assert classify_base_spec("~/m").path == in_tmp / "home" / "m"
    (in_tmp / "file.safetensors").write_bytes(b"x")
    assert classify_base_spec("file.safetensors").kind == "local"
    (in_tmp / "dangling").symlink_to("nowhere")
    with pytest.raises(CheckpointError) as e:
        classify_base_spec("dangling")
    assert one_line(e) == "no such folder: dangling (a broken symbolic link)"


def test_hub_specs(in_tmp):
    assert classify_base_spec("openai-community/gpt2") == BaseSpec(
        kind="hub", spec="openai-community/gpt2", repo_id="openai-community/gpt2")
    s = classify_base_spec("Org_1/my.model-v2@refs/pr/3")
    assert (s.kind, s.repo_id, s.revision) == ("hub", "Org_1/my.model-v2", "refs/pr/3")
    assert classify_base_spec("org/name@0123abcd").revision == "0123abcd"


def test_typo_of_local_path_with_existing_parent_is_not_sent_to_hub(in_tmp):
    (in_tmp / "checkpoints").mkdir()
    with pytest.raises(CheckpointError) as e:
        classify_base_spec("checkpoints/fnial")
    assert one_line(e) == ("no such folder: checkpoints/fnial (a local folder checkpoints exists, so this is read "
                           "as a local path and not sent to the Hub; to use the Hub repo, run from another folder)")


@pytest.mark.parametrize("spec", ["org/name\n", "org/name\r\n", "org/name ", " org/name", "org/na me",
                                  "org/name@", "org/name@main\n", "org/na--me", "org/na..me", "org/name.git",
                                  "-org/name", "org/name-", "org/naмe", "org/name@a..b", "org/name@x:y",
                                  "gpt2", "org/" + "n" * 97])
def test_bad_repo_ids_are_refused_in_full(in_tmp, spec):
    with pytest.raises(CheckpointError) as e:
        classify_base_spec(spec)
    assert one_line(e).startswith(f"no such folder: {show_path(spec)}")


def test_repo_id_regex_needs_full_match():
    # The bug this guards against: "$" matches before a final newline.
    import re
    assert re.match(r"^[\w.\-]+/[\w.\-]+$", "org/name\n") is not None
    assert base_grammar.HUB_BASE_RE.fullmatch("org/name\n") is None
    assert base_grammar.HUB_BASE_RE.fullmatch("org/name") is not None


def test_embedded_and_empty(in_tmp):
    assert classify_base_spec("embedded:gemma-3-270m") == BaseSpec(kind="embedded", spec="embedded:gemma-3-270m",
                                                                   name="gemma-3-270m")
    for bad in ("embedded:", "embedded:../x", "embedded:a/b"):
        with pytest.raises(CheckpointError, match="not a valid embedded model name"):
            classify_base_spec(bad)
    for empty in ("", "   "):
        with pytest.raises(CheckpointError) as e:
            classify_base_spec(empty)
        assert one_line(e) == "BASE is empty (an unset variable?); name a folder, embedded:NAME or ORG/NAME"
