"""Secrets: URL user-info and token values never reach messages; push can find a token in a file."""

from __future__ import annotations

import base64
import io
import os
import sys
import threading

import pytest

from gainsurgery.errors import UnsafeInputError
from gainsurgery.io import secrets as gs_secrets
from gainsurgery.io.secrets import MASK, contains_secret, current_token, redact, redact_url, secret_forms

TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"


# -- URLs and messages ------------------------------------------------------------------

@pytest.mark.parametrize("url,want", [
    ("http://user:pw@host", "http://host"),
    ("https://user:pw@hub.example.org:8443/api/models?x=1", "https://hub.example.org:8443/api/models?x=1"),
    ("https://onlyuser@host/x", "https://host/x"),
    ("http://user:pa/ss@host/x", "http://host/x"),  # a "/" in the password is still a secret
    ("http://u%40x:p%3Aw@host", "http://host"),
    ("HTTP://USER:PW@HOST", "HTTP://HOST"),
    ("http://host/path@not-userinfo", "http://host/path@not-userinfo"),
    ("https://huggingface.co/org/name", "https://huggingface.co/org/name"),
])
def test_redact_url(url, want):
    assert redact_url(url) == want


def test_redact_message_with_several_urls_and_the_token():
    msg = (f"cannot reach http://me:{TOKEN}@hub.local:1234/api/models/x (Connection refused); "
           f"retried https://a:b@mirror/x; token was {TOKEN}, again {TOKEN}")
    out = redact(msg, token=TOKEN)
    assert out == ("cannot reach http://hub.local:1234/api/models/x (Connection refused); "
                   f"retried https://mirror/x; token was {MASK}, again {MASK}")
    assert TOKEN not in out and "me:" not in out and "a:b" not in out


def test_redact_any_token_shape_even_without_knowing_it():
    # An HF-looking token, a Bearer header and a token= query value, none of them "the" token.
    other = "hf_" + "Z" * 34
    msg = f"headers={{'authorization': 'Bearer xyz123secret'}} url=https://h/x?token=abc123&y=1 old={other}"
    assert redact(msg) == (f"headers={{'authorization': 'Bearer {MASK}'}} url=https://h/x?token={MASK}&y=1 "
                           f"old={MASK}")


def test_redact_arbitrary_token_value_and_several_tokens():
    assert redact("key s3cr3t-Value! in text", token="s3cr3t-Value!") == f"key {MASK} in text"
    assert redact("a=tok_one b=tok_one_longer", token=["tok_one", "tok_one_longer"]) == f"a={MASK} b={MASK}"
    # Too short to be a credential: left alone rather than garbling every message.
    assert redact("abc abc", token="abc") == "abc abc"
    assert redact("plain message", token=None) == "plain message"
    assert redact("plain message", token="") == "plain message"
    assert redact(f"x {TOKEN}\n", token=f"  {TOKEN}\n") == f"x {MASK}\n"


# -- the current token --------------------------------------------------------------------

@pytest.fixture
def no_token_env(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    return tmp_path


def test_current_token_from_env(no_token_env, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", f" {TOKEN}\r\n")
    assert current_token() == TOKEN
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_older_name_token")
    assert current_token() == "hf_older_name_token"
    assert capsys.readouterr() == ("", "")


def test_current_token_from_login_file(no_token_env, monkeypatch, capsys):
    import huggingface_hub.constants as c
    token_file = no_token_env / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(token_file))
    assert current_token() == TOKEN
    assert capsys.readouterr() == ("", "")


def test_current_token_none_and_failures(no_token_env, monkeypatch):
    assert current_token() is None
    import huggingface_hub

    def broken():
        raise RuntimeError("OIDC exchange failed")

    monkeypatch.setattr(huggingface_hub, "get_token", broken)
    assert current_token() is None


_PROC_OPENS: list[str] = []
_WATCH = threading.local()


def _audit(event, args):
    if event == "open" and getattr(_WATCH, "on", False) and args and isinstance(args[0], (str, bytes)):
        path = os.fsdecode(args[0])
        if path.startswith("/proc"):
            _PROC_OPENS.append(path)


sys.addaudithook(_audit)  # cannot be removed; inert unless a test turns _WATCH.on


def test_nothing_reads_proc(no_token_env, monkeypatch, tmp_path):
    f = tmp_path / "README.md"
    f.write_text("hello")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    _WATCH.on = True
    try:
        tok = current_token()
        redact(f"x {tok}", token=tok)
        contains_secret(f, tok)
        monkeypatch.delenv("HF_TOKEN")
        current_token()
    finally:
        _WATCH.on = False
    assert _PROC_OPENS == []


# -- finding a token in a file -------------------------------------------------------------

def test_contains_secret_bytes_and_files(tmp_path):
    assert contains_secret(f"token: {TOKEN}\n".encode(), TOKEN) is True
    assert contains_secret(b"nothing here", TOKEN) is False
    assert contains_secret(b"hf_abc", None) is False
    assert contains_secret(b"abc", "abc") is False  # too short to be a token
    p = tmp_path / "notes.txt"
    p.write_bytes(os.urandom(3000) + TOKEN.encode() + os.urandom(3000))
    assert contains_secret(p, TOKEN) is True
    assert contains_secret(str(p), TOKEN, chunk_bytes=100) is True
    with open(p, "rb") as f:
        assert contains_secret(f, TOKEN, chunk_bytes=64) is True
    q = tmp_path / "clean.txt"
    q.write_bytes(TOKEN.encode()[:-1] + b"-" + TOKEN.encode()[1:])
    assert contains_secret(q, TOKEN, chunk_bytes=7) is False


def test_token_across_every_chunk_boundary():
    raw = TOKEN.encode()
    for chunk in (1, 2, 5, 16, len(raw) - 1, len(raw), len(raw) + 1):
        for offset in range(0, 2 * chunk + 1):
            data = b"x" * offset + raw + b"y" * 3
            assert contains_secret(io.BytesIO(data), TOKEN, chunk_bytes=chunk) is True, (chunk, offset)
            broken = b"x" * offset + raw[:-1] + b"y" * 3
            assert contains_secret(io.BytesIO(broken), TOKEN, chunk_bytes=chunk) is False, (chunk, offset)


def test_encoded_forms_found():
    for enc in ("utf-16-le", "utf-16-be"):
        assert contains_secret(("note " + TOKEN).encode(enc), TOKEN, chunk_bytes=10) is True
    for pre in range(6):
        data = base64.b64encode(os.urandom(pre) + TOKEN.encode() + os.urandom(pre % 4))
        assert contains_secret(data, TOKEN, chunk_bytes=9) is True, pre
    assert secret_forms(TOKEN)[0] == TOKEN.encode()
    assert all(len(f) >= gs_secrets.MIN_TOKEN_CHARS for f in secret_forms(TOKEN))


def test_contains_secret_refuses_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "README.md"
    os.mkfifo(fifo)
    out: list = []
    t = threading.Thread(target=lambda: out.append(_try(contains_secret, fifo, TOKEN)), daemon=True)
    t.start()
    t.join(30)  # safety net; the assertion is on the result
    assert len(out) == 1, "contains_secret blocked on a FIFO"
    assert isinstance(out[0], UnsafeInputError)
    assert str(out[0]) == f"{fifo}: is a FIFO (named pipe), not a regular file; refusing to read it"


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        return e


def test_chunk_bytes_must_be_positive():
    with pytest.raises(ValueError):
        contains_secret(io.BytesIO(b"x"), TOKEN, chunk_bytes=0)
