"""Hub failures as one-line :class:`~gainsurgery.errors.HubError` messages that say what to do.

``huggingface_hub`` raises a family of exceptions (and, for downloads, reports a
failed request as "not in the local cache" with the HTTP error as its cause).
:func:`hub_errors` turns any of them into one line naming the repo, the status
and the fix; anything it does not recognise is a bug and propagates.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Iterator

from gainsurgery.errors import HubError
from gainsurgery.hub.client import DEFAULT_ENDPOINT
from gainsurgery.io.inputs import show_path
from gainsurgery.io.secrets import redact_url


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


_WRITE_ACTIONS = ("create or write to", "upload to")


def describe_hub_failure(exc: BaseException, what: str, action: str,
                         endpoint: str = DEFAULT_ENDPOINT) -> str | None:
    """One line for a Hub failure while ``action``-ing ``what`` (``org/name``...), or None if not one.

    Looks through the exception chain: ``hf_hub_download`` reports a failed
    request as "not in the local cache" with the HTTP error as its cause.
    """
    import httpx2
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = show_path(what)  # a repo file's name comes from the Hub's listing: bounded, control characters escaped
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, OfflineModeIsEnabled):
            return f"cannot {action} {what}: HF_HUB_OFFLINE is set; unset it, or use a local folder"
        if isinstance(e, RevisionNotFoundError):
            return f"404: revision not found while trying to {action} {what}; check the branch, tag or commit"
        if isinstance(e, RepositoryNotFoundError):
            return (f"{_status(e) or 404}: repo not found while trying to {action} {what} (or it is private or "
                    "gated and your token cannot see it); check the name, or run `hf auth login` / set HF_TOKEN")
        if isinstance(e, EntryNotFoundError) and _status(e) == 404:
            return f"404: file not found while trying to {action} {what}; check the path in the repo"
        if isinstance(e, HfHubHTTPError) and _status(e) is not None:
            code = _status(e)
            if code == 401:
                return (f"401: token invalid or missing while trying to {action} {what}; "
                        "run `hf auth login` or set HF_TOKEN")
            if code == 403 and action in _WRITE_ACTIONS:
                return (f"403: your token may not {action} {what} (read-only or fine-grained token without "
                        "access?); use a token with write access (`hf auth login`) or ask for access")
            if code == 403:
                return (f"403: no access to {what} (gated repo, or a fine-grained token without it?); "
                        "request access on the repo page or log in with another token (`hf auth login`)")
            if code == 404:
                return f"404: not found while trying to {action} {what}; check the repo id, revision and path"
            if code == 429:
                return (f"429: rate limited by the Hub while trying to {action} {what} (still limited after "
                        "retries); wait a few minutes and run the command again")
            if code >= 500:
                return f"{code}: Hub server error while trying to {action} {what}; try again later"
            server = (getattr(e, "server_message", None) or "").strip().splitlines()
            return f"{code}: the Hub refused to {action} {what}" + (f" ({server[0]})" if server else "")
    for e in chain:
        if isinstance(e, httpx2.InvalidURL):  # built from names the Hub listed: too long, or not a URL's text
            return f"cannot {action} {what}: its URL is not valid ({show_path(str(e).strip()[:80])})"
        if isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return (f"could not reach the Hub at {redact_url(endpoint)} to {action} {what} "
                    f"({type(e).__name__}); check your network, proxy or HF_ENDPOINT and try again")
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, LocalEntryNotFoundError):
        return (f"could not {action} {what}: the Hub did not answer and the file is not in the local cache; "
                "check your network and try again")
    return None


@contextlib.contextmanager
def hub_errors(what: str, action: str, endpoint: str = DEFAULT_ENDPOINT) -> Iterator[None]:
    """Turn Hub client failures inside the block into one-line :class:`HubError`\\ s.

    ``endpoint`` names the Hub in messages about an unreachable server.

    Example:
        >>> with hub_errors("org/name", "download", client.endpoint):  # doctest: +SKIP
        ...     client.download("org/name", "config.json")
    """
    _quiet_enter()
    try:
        yield
    except HubError:
        raise
    except Exception as exc:
        message = describe_hub_failure(exc, what, action, endpoint)
        if message is None:
            raise
        raise HubError(message) from None
    finally:
        _quiet_exit()


@contextlib.contextmanager
def hub_answer(what: str, action: str, endpoint: str = DEFAULT_ENDPOINT) -> Iterator[None]:
    """Around code that reads what the Hub answered: a malformed answer is one :class:`HubError` line.

    The Hub is trusted to serve the files it lists, not to answer well-formed:
    huggingface_hub turns an answer that is not JSON, or JSON of another shape, into
    ``ValueError``/``KeyError``/``TypeError``/``AttributeError`` while parsing it (and a
    deeply nested one into ``RecursionError``: its JSON parser has no depth limit). Put
    only the request and the reading of its answer inside (nothing of ours that
    could hide a bug).

    Example:
        >>> with hub_answer("org/name", "list the files of", client.endpoint):  # doctest: +SKIP
        ...     entries = list(client.api.list_repo_tree("org/name"))
    """
    try:
        yield
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        raise HubError(f"the Hub at {redact_url(endpoint)} sent a malformed answer while trying to {action} "
                       f"{show_path(what)} ({type(exc).__name__}); try again, or check HF_ENDPOINT") from None


# Like our own bars: huggingface_hub's show on a terminal only, so logs and captured stderr
# hold just the result (or the one error line). Its switch is process-wide and the Hub-to-Hub
# pipeline talks to the Hub from several threads at once, so the blocks are counted: the bars
# come back only when the last one ends (and only if we turned them off).
_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_ours = False


def _quiet_enter() -> None:
    global _quiet_depth, _quiet_ours
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_ours = not sys.stderr.isatty() and not are_progress_bars_disabled()
            if _quiet_ours:
                disable_progress_bars()
        _quiet_depth += 1


def _quiet_exit() -> None:
    global _quiet_depth, _quiet_ours
    from huggingface_hub.utils import enable_progress_bars

    with _quiet_lock:
        _quiet_depth -= 1
        if _quiet_depth == 0 and _quiet_ours:
            enable_progress_bars()
            _quiet_ours = False
