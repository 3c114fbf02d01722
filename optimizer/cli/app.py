"""The `optimize` command group: exit codes for every outcome, signals, progress and log lines, and the options
several commands share. Each command lives in a module of this package (optimizer.cli)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from core.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_PASS,
    EXIT_SIGNAL_BASE,
    InternalError,
    Interrupted,
    LoadError,
    OptimizerError,
    describe_environment_error,
    is_environment_error,
    one_line,
)
from core.limits import MAX_SAMPLES, MAX_SEED
from core.outputs import write_error_log

HELP = """Optimize a trained diffusion model for a deployment target, verify it, write a report.

\b
  optimize MODEL --target cpu-fp32 --out DIR    (same as `optimize run ...`)
  optimize inspect MODEL
  optimize targets
"""


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class OptimizeGroup(click.Group):
    """`optimize MODEL ...` means `optimize run MODEL ...`; every outcome maps to one documented exit code."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> None:  # type: ignore[override]
        extra.pop("standalone_mode", None)
        with _signals_raise():
            try:
                code = super().main(args, prog_name, standalone_mode=False, **extra)
            except SystemExit:
                raise
            except BaseException as exc:  # every outcome gets its exit code
                code = _report(exc)
        sys.exit(code if isinstance(code, int) else EXIT_PASS)


def _report(exc: BaseException) -> int:
    """Print one line on stderr for `exc` and return its exit code (see core.errors)."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        exc.show()
        return EXIT_BAD_INPUT
    if isinstance(exc, click.ClickException):
        hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
        _error(f"{one_line(exc.format_message())}{hint}")
        return EXIT_BAD_INPUT
    if isinstance(exc, OptimizerError):
        _error(one_line(str(exc)))
        return EXIT_BAD_INPUT
    if isinstance(exc, OSError) and is_environment_error(exc):
        _error(describe_environment_error(exc))
        return EXIT_BAD_INPUT
    if isinstance(exc, Interrupted | KeyboardInterrupt | click.Abort):
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        click.echo(f"interrupted by {signal.Signals(signum).name}; unfinished outputs were removed", err=True)
        return EXIT_SIGNAL_BASE + signum
    traceback_file = exc.log if isinstance(exc, InternalError) else write_error_log(exc)
    click.echo(
        f"internal error (a bug, not your input): {one_line(str(exc), 400)}; traceback in {traceback_file}", err=True
    )
    return EXIT_INTERNAL


def _error(message: str) -> None:
    click.echo(f"error: {message}", err=True)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP raise `Interrupted`, so a job's cleanup runs; later ones are ignored until the
    cleanup is done. Only the main thread can own signal handlers (tests may call from elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def show_progress(iterable: Any, **kwargs: Any) -> Any:
    """tqdm on a terminal; in a CI log, start/end lines and a line every 30 s (core.progress)."""
    from core.progress import progress

    return progress(iterable, log=log, **kwargs)


def log(message: str) -> None:
    click.echo(f"[optimize] {message}", err=True)


@click.group(cls=OptimizeGroup, help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="diffusion-optimizer")
def main() -> None:
    pass


ALLOW_LARGE = click.option(
    "--allow-large", is_flag=True, help="Run even when the memory estimate exceeds the memory available now."
)
PROMPTS = click.option(
    "--prompts",
    type=click.Path(path_type=Path),
    default=None,
    help="Prompt set of a text-to-image model: one prompt per line (default: the pipeline folder's prompts.txt).",
)

VARIANT = click.option(
    "--variant",
    default=None,
    help="Weight variant of a diffusers folder, as diffusers' from_pretrained(variant=...): fp16 reads"
    " *.fp16.safetensors (default: the plain files, or the folder's only variant).",
)

DEVICE = click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where the torch side runs (the original as the reference, calibration, the passes): cpu, cuda or cuda:N.",
)

DTYPE = click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="The precision the original's modules run in (the reference the candidate is verified against, as"
    " `pipe.to(torch.bfloat16)` runs it); the artifact's precision is the target's.",
)

SINGLE_FILE_CONFIG = click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path),
    default=None,
    help="A single-file checkpoint's family as a local diffusers folder (configs and tokenizers, no weights"
    " needed), as diffusers' from_single_file(config=...). Default for SD 1.x, SD 2.x and SDXL base: the"
    " configs shipped in-tree with the tokenizers of the local Hugging Face cache.",
)


JUDGE_OPTIONS_LIST = (
    click.option(
        "--clip",
        type=click.Path(path_type=Path),
        default=None,
        help="A transformers CLIP model folder: CLIP score and CLIP-feature FD gates (max_clip_score_drop,"
        " max_fd_clip_shift).",
    ),
    click.option(
        "--inception",
        type=click.Path(path_type=Path),
        default=None,
        help="pytorch-fid's Inception-v3 FID weights (pt_inception-2015-12-05-*.pth or .safetensors): FID gate"
        " (max_fid_shift).",
    ),
    click.option(
        "--env",
        "environment",
        default=None,
        help="Policies: the environment they are judged in, closed loop (pusht; default: the policy's training"
        " config's env.type).",
    ),
    click.option(
        "--episodes",
        type=click.IntRange(1, 10_000),
        default=100,
        show_default=True,
        help="Policies: closed-loop episodes the original and the candidate each run (success-rate gate).",
    ),
)


def judge_options(fn: Any) -> Any:
    """--clip and --inception (the user-supplied feature models of the judges that need them), --env and --episodes."""
    for option in reversed(JUDGE_OPTIONS_LIST):
        fn = option(fn)
    return fn


SAMPLES = click.IntRange(1, MAX_SAMPLES)
SEED = click.IntRange(0, MAX_SEED)


@contextlib.contextmanager
def artifact_errors(artifact: Path, backend: Any) -> Iterator[None]:
    """The runtime failing on a user's artifact (checked, but e.g. a label its graph cannot embed) is bad
    input, not a bug of ours."""
    try:
        yield
    except backend.runtime_errors() as exc:
        raise LoadError(f"{artifact}: {backend.name} cannot run this artifact ({one_line(str(exc), 300)})") from None
