"""pytest fixture ``hub``: a loopback Hugging Face Hub (see ``hubserver.py``) wired into huggingface_hub.

Import it from ``tests/conftest.py`` (``from conftest_hub import hub  # noqa: F401``).

The fixture sets, for the duration of one test (env vars *and* the already-imported
``huggingface_hub.constants``, which read the env only at import time):

* ``HF_ENDPOINT`` -> the server, so ``HfApi()`` / ``hf_hub_download`` without ``endpoint=`` reach it
  (``constants.ENDPOINT`` and the module-level ``huggingface_hub.hf_api.api`` instance are patched too);
* ``HF_TOKEN`` -> ``hub.token`` (write token); ``HF_TOKEN_PATH``/stored tokens -> tmp, so no real token leaks in;
* ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_XET_CACHE`` -> under ``tmp_path`` (``hub.hf_home``, ``hub.cache_dir``);
* ``HF_HUB_DISABLE_XET=1`` (otherwise, with ``hf_xet`` installed, uploads go to Xet, not LFS);
* ``HF_HUB_OFFLINE`` unset, ``HF_HUB_DISABLE_TELEMETRY=1``, ``NO_PROXY`` covering 127.0.0.1/localhost.

It also makes the client's retry back-off instant (``time.sleep`` inside ``huggingface_hub.utils._http``
and ``huggingface_hub.file_download`` only; requested delays are recorded in ``hub.client_sleeps``).
The client still retries: 429/5xx/connection errors on ``http_backoff`` paths (preupload, LFS batch and
PUT, and ``hf_hub_download`` when the file is not cached) are retried 5 times, so to make such a call
*fail* inject ``hub.fail_next(..., times=None)``; plain API calls (``model_info``, ``create_repo``,
``list_repo_files``, ``create_commit``'s final POST) are not retried.
"""

from __future__ import annotations

import time
import types

import pytest

try:
    from hubserver import HubServer
except ImportError:  # tests/ imported as a package
    from tests.hubserver import HubServer


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running ``HubServer`` with ``.endpoint``, ``.token``, ``.read_token``, ``.api``, ``.repos``,
    ``.commits``, ``.requests``, ``.fail_next()``, ``.offline()``, ``.stop()``/``.start()``, ``.add_repo()``,
    ``.hf_home``, ``.cache_dir`` and ``.client_sleeps``."""
    from huggingface_hub import constants

    server = HubServer().start()
    hf_home = tmp_path / "hf_home"
    cache_dir = hf_home / "hub"
    cache_dir.mkdir(parents=True)
    server.hf_home, server.cache_dir = hf_home, cache_dir

    env = {
        "HF_ENDPOINT": server.endpoint,
        "HF_TOKEN": server.token,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(cache_dir),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)

    consts = {
        "ENDPOINT": server.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(cache_dir),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in consts.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)

    # module-level helpers (huggingface_hub.upload_folder, whoami, ...) use an HfApi built at import time
    import huggingface_hub.hf_api as hf_api

    monkeypatch.setattr(hf_api.api, "endpoint", server.endpoint)

    server.client_sleeps = []
    fast_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    fast_time.sleep = server.client_sleeps.append
    import huggingface_hub.file_download as file_download
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(hf_http, "time", fast_time)
    monkeypatch.setattr(file_download, "time", fast_time)

    try:
        yield server
    finally:
        server.stop()
