"""One explicit Hub client, built once from a small config resolved at the edge.

The CLI (or an API call that is given no client) resolves a :class:`HubConfig`
from the environment *at call time* (:meth:`HubConfig.from_env`: ``HF_ENDPOINT``,
the HF cache folder; the token through huggingface_hub's own resolution,
``HF_TOKEN`` or the stored ``hf auth login``) and builds one :class:`HubClient`.
Every Hub request of gainsurgery goes through that client: ``HfApi(endpoint=...,
token=...)`` for the API, and ``endpoint=``/``token=``/``cache_dir=`` passed
explicitly to downloads. Nothing relies on huggingface_hub's module constants,
which it reads once at import; that is what lets tests point a client at a
loopback Hub by setting environment variables alone.

huggingface_hub is imported only when the client first talks to the Hub, so
local-only commands never pay for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from gainsurgery.io.secrets import redact_url

#: The public Hub.
DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class HubConfig:
    """Where the Hub is, who we are, where downloads are cached.

    Attributes:
        endpoint: base URL of the Hub, without a trailing slash.
        token: a Hub token; None resolves it through huggingface_hub (``HF_TOKEN``,
            then the stored login) the first time the client needs it. Never
            printed: it is left out of ``repr``.
        cache_dir: the HF cache folder for downloads; None for huggingface_hub's default.

    Example:
        >>> HubConfig("http://127.0.0.1:8080", token="hf_xxx")
        HubConfig(endpoint='http://127.0.0.1:8080', cache_dir=None)
    """

    endpoint: str = DEFAULT_ENDPOINT
    token: str | None = field(default=None, repr=False)
    cache_dir: str | None = None

    def __repr__(self) -> str:
        # The endpoint may carry credentials (http://user:pw@host): never shown.
        return f"HubConfig(endpoint={redact_url(self.endpoint)!r}, cache_dir={self.cache_dir!r})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HubConfig:
        """The config the environment describes now (``HF_ENDPOINT``, ``HF_HUB_CACHE``/``HF_HOME``).

        The token is left to huggingface_hub's resolution (see :attr:`token`).
        """
        env = os.environ if environ is None else environ
        endpoint = (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
        if not cache and env.get("HF_HOME"):
            cache = str(Path(env["HF_HOME"]).expanduser() / "hub")
        return cls(endpoint=endpoint, cache_dir=cache or None)


class HubClient:
    """An explicit Hugging Face Hub client: one ``HfApi(endpoint, token)`` and explicit downloads.

    Args:
        config: endpoint, token and cache folder (default: the public Hub,
            huggingface_hub's token resolution and cache).

    Example:
        >>> client = HubClient(HubConfig("http://127.0.0.1:8080", token="hf_xxx"))  # doctest: +SKIP
        >>> client.api.model_info("org/name").sha  # doctest: +SKIP
    """

    def __init__(self, config: HubConfig | None = None) -> None:
        self.config = config or HubConfig()
        self._token: str | bool | None = None
        self._api: Any = None

    @classmethod
    def from_env(cls) -> HubClient:
        """A client for the Hub the environment names now (see :meth:`HubConfig.from_env`)."""
        return cls(HubConfig.from_env())

    def __repr__(self) -> str:
        return f"HubClient({self.config!r})"

    def __str__(self) -> str:
        return repr(self)

    @property
    def endpoint(self) -> str:
        """The Hub's base URL."""
        return self.config.endpoint

    @property
    def token(self) -> str | bool:
        """The token sent with requests, resolved once; ``False`` (send none) when there is none."""
        if self._token is None:
            token = self.config.token
            if token is None:
                from huggingface_hub import get_token

                token = get_token()
            self._token = token or False
        return self._token

    @property
    def api(self) -> Any:
        """The ``huggingface_hub.HfApi`` bound to this endpoint and token (built once)."""
        if self._api is None:
            from huggingface_hub import HfApi

            self._api = HfApi(endpoint=self.endpoint, token=self.token)
        return self._api

    def download(self, repo_id: str, filename: str, *, revision: str | None = None) -> Path:
        """Download one file into the HF cache (resumable) and return its local path."""
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename, revision=revision, endpoint=self.endpoint,
                                    token=self.token, cache_dir=self.config.cache_dir))

    def file_url(self, repo_id: str, filename: str, *, revision: str | None = None) -> str:
        """The URL that serves ``filename`` of ``repo_id`` at ``revision``."""
        from huggingface_hub import hf_hub_url

        return hf_hub_url(repo_id, filename, revision=revision, endpoint=self.endpoint)

    def headers(self) -> dict[str, str]:
        """HTTP headers for a raw request (user agent, and the token when there is one)."""
        from huggingface_hub.utils import build_hf_headers

        return dict(build_hf_headers(token=self.token))
