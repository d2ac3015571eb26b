"""pytest fixture ``hub``: a loopback Hugging Face Hub (see ``hubserver.py``), reached through the environment.

Import it from ``tests/conftest.py`` (``from conftest_hub import hub  # noqa: F401``).

gainsurgery builds its Hub client explicitly (``HubClient.from_env()`` at the CLI
edge: ``HF_ENDPOINT`` and the HF cache folder read at call time, the token through
huggingface_hub's ``get_token()``, which reads ``HF_TOKEN`` at call time too), so
the fixture only sets environment variables for the duration of one test:

* ``HF_ENDPOINT`` -> the server;
* ``HF_TOKEN`` -> ``hub.token`` (write token);
* ``HF_HUB_CACHE`` -> ``hub.cache_dir`` under ``tmp_path`` (``HF_HOME`` -> ``hub.hf_home``);
* ``NO_PROXY`` covering 127.0.0.1/localhost.

Nothing of huggingface_hub is patched. (``HF_HUB_DISABLE_XET=1``, needed because
with ``hf_xet`` installed uploads would go to Xet rather than LFS, is read by
huggingface_hub at import time, so ``conftest.py`` sets it before anything imports it.)
Injected 429/503 answers carry ``Retry-After: 0``, so the client's retries take
about a second each instead of its default back-off.
"""

from __future__ import annotations

import pytest

try:
    from hubserver import HubServer
except ImportError:  # tests/ imported as a package
    from tests.hubserver import HubServer


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running ``HubServer`` with ``.endpoint``, ``.token``, ``.read_token``, ``.api``, ``.repos``,
    ``.commits``, ``.requests``, ``.fail_next()``, ``.offline()``, ``.stop()``/``.start()``, ``.add_repo()``,
    ``.hf_home`` and ``.cache_dir``."""
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
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    try:
        yield server
    finally:
        server.stop()
