"""The ``gainsurgery`` command group and what every command shares: one-line errors, output, options.

Errors a user can cause (:class:`GainSurgeryError`) are printed as one line, exit
status 1; a closed stdout (``gainsurgery inspect G | head -1``) is a normal end,
exit status 0; every message passes :func:`one_line` (no credentials, no fake lines).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import click
from tqdm import tqdm

from gainsurgery import __version__
from gainsurgery.errors import GainSurgeryError
from gainsurgery.hub.client import HubClient
from gainsurgery.io.inputs import show_path
from gainsurgery.io.secrets import current_token, install_redaction, redact
from gainsurgery.io.write_errors import no_room_errno, no_room_message
from gainsurgery.training.distributed import end_launched_process

MiB = 1 << 20


class _Group(click.Group):
    """Turns user errors into one-line messages and SIGTERM into a clean exit."""

    def invoke(self, ctx: click.Context) -> Any:
        signal.signal(signal.SIGTERM, _on_sigterm)
        install_redaction()  # what libraries log or warn, and a bug's traceback, lose credentials too
        try:
            result = self._invoke(ctx)
        except click.exceptions.Exit as done:
            end_launched_process(done.exit_code)  # under torchrun: see there; elsewhere returns
            raise
        end_launched_process(0)
        return result

    def _invoke(self, ctx: click.Context) -> Any:
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
            return result
        except BrokenPipeError:  # the reader went away (`| head`): a normal end for a CLI
            _silence_stdout()
            ctx.exit(0)
        except GainSurgeryError as exc:
            error(str(exc))
            ctx.exit(1)
        except OSError as exc:  # the environment refused (permissions, missing paths, a full disk...)
            where = f": {exc.filename}" if exc.filename else ""
            code = no_room_errno(exc)
            error(f"{exc.strerror or exc}{where}" if code is None else
                  no_room_message(code, "the output", os.path.dirname(exc.filename) if exc.filename else None))
            ctx.exit(1)
        except Exception as exc:
            # A library that wraps a full disk or a file-size limit in its own error (safetensors):
            # the command's cleanup has run; say what happened in one line. Anything else is a bug.
            code = no_room_errno(exc)
            if code is None:
                raise
            error(no_room_message(code, "the output", None))
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was left half-written", err=True)
            ctx.exit(130)


def one_line(message: str) -> str:
    """``message`` on one line, without credentials: every message the CLI prints passes here.

    URL user-info (``http://user:pw@host``), the current token's value, Bearer
    credentials and ``hf_...`` tokens are masked (:func:`gainsurgery.io.secrets.redact`);
    line breaks and control characters cannot fake a second line.
    """
    text = " ".join(redact(message, current_token()).split())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown(path: Any) -> str:
    """A path the user chose, as a success message shows it (a newline in it cannot fake a line)."""
    return show_path(str(path))


def error(message: str) -> None:
    click.echo("error: " + one_line(message), err=True)


def warn(message: str) -> None:
    click.echo("warning: " + one_line(message), err=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (e.g. under a test runner)
        pass


def _on_sigterm(signum, frame):  # pragma: no cover - exercised in a subprocess test
    # SystemExit unwinds through the apply's cleanup, removing temporary output.
    raise SystemExit(143)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gainsurgery")
def main() -> None:
    """GAIN model surgery: train, share, stack and apply diagonal gain vectors.

    A gain file scales chosen weights of a base checkpoint: W_new = W·diag(s)
    (arXiv 2604.04516). Commands stream over sharded safetensors checkpoints in
    constant memory.
    """


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


#: Lines of the progress bars shown at once (the Hub-to-Hub pipeline shows one per stage).
_BAR_LINES = {"download": 0, "apply": 1, "upload": 2}


def progress_bar(desc: str, total: int):
    """A byte progress bar (bytes and rate) on stderr, shown on a terminal only; one line per stage."""
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{desc:<8}", disable=None,
                file=sys.stderr, leave=False, position=_BAR_LINES.get(desc, 0), dynamic_ncols=True)


def hub_client():
    """The Hub client for this command: HF_ENDPOINT and the HF cache read now, the token on first use."""
    return HubClient.from_env()


def rms_text(value: Any) -> str:
    """An RMS error as a message shows it (``-`` when there is none)."""
    return f"{value:.2e}" if isinstance(value, (int, float)) else str(value if value is not None else "-")


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


opt_allow_negative = click.option("--allow-negative", is_flag=True, help="Accept negative gains (sign flips).")
opt_allow_saturation = click.option(
    "--allow-saturation", is_flag=True,
    help="Accept weights that scaling turns into ±inf or 0 (the product leaves the dtype's range); recorded.")
opt_allow_base_mismatch = click.option(
    "--allow-base-mismatch", is_flag=True,
    help="Apply a gain whose recorded base fingerprint differs from BASE's weights; warned and recorded.")
opt_base_model = click.option(
    "--base-model", default=None, metavar="ORG/NAME",
    help="The Hub repo the model card names as base_model (default: a Hub BASE; never a local folder).")
opt_json = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
