"""`optimize MODEL --target T --out DIR`, plus `inspect`, `targets`, `calibrate`, `sample`, `bench`, the comparisons."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from core.errors import (
    EXIT_BAD_INPUT,
    EXIT_GATE_FAILED,
    EXIT_INTERNAL,
    EXIT_PASS,
    EXIT_SIGNAL_BASE,
    ConfigError,
    InternalError,
    Interrupted,
    LoadError,
    OptimizerError,
    describe_environment_error,
    is_environment_error,
    one_line,
)
from core.limits import MAX_REPEATS, MAX_SAMPLES, MAX_SEED
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
    if is_environment_error(exc):
        _error(describe_environment_error(exc))
        return EXIT_BAD_INPUT
    if isinstance(exc, Interrupted | KeyboardInterrupt | click.Abort):
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        click.echo(f"interrupted by {signal.Signals(signum).name}; unfinished outputs were removed", err=True)
        return EXIT_SIGNAL_BASE + signum
    log = exc.log if isinstance(exc, InternalError) else write_error_log(exc)
    click.echo(f"internal error (a bug, not your input): {one_line(str(exc), 400)}; traceback in {log}", err=True)
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


def _progress(iterable: Any, **kwargs: Any) -> Any:
    """tqdm on a terminal; in a CI log, start/end lines and a line every 30 s (core.progress)."""
    from core.progress import progress

    return progress(iterable, log=_log, **kwargs)


def _log(message: str) -> None:
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
)


def judge_options(fn: Any) -> Any:
    """--clip and --inception, the user-supplied feature models of the judges that need them."""
    for option in reversed(JUDGE_OPTIONS_LIST):
        fn = option(fn)
    return fn


def _named_gates(items: tuple[str, ...]) -> dict[str, float]:
    """--gate NAME=BOUND values (names and bounds are checked with the rest of the options)."""
    gates: dict[str, float] = {}
    for item in items:
        name, sep, bound = item.partition("=")
        try:
            value = float(bound)
        except ValueError:
            value = None
        if not sep or value is None:
            raise click.BadParameter(f"{item!r}: expected NAME=BOUND, e.g. max_fd_self_shift=1.5", param_hint="--gate")
        gates[name.strip()] = value
    return gates


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", "-t", default="cpu-fp32", show_default=True, help="Target name or target JSON file.")
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder (default: optimized/<model>-<target>).",
)
@click.option("--samples", default=100, show_default=True, help="Evaluation samples (seeds) for verification.")
@click.option(
    "--seed-sets",
    default=4,
    show_default=True,
    help="Most disjoint --samples seed sets a distribution gate is judged on: at least 2 (the shift's seed noise), "
    "more while its bound lies inside the mean shift's 95% interval, 10,000 seeds in all; 1: one set, noise not "
    "measured.",
)
@click.option("--calibration-samples", default=20, show_default=True, help="Seeds captured for calibration.")
@click.option("--seed", default=0, show_default=True, help="First evaluation seed.")
@click.option("--scheduler", default=None, help="ddpm, ddim, dpmsolver++, euler or a diffusers scheduler class.")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the model's plan).")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale.")
@click.option(
    "--calibration",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="Reuse a calibration.safetensors captured earlier for the same model and plan.",
)
@click.option("--min-psnr", type=float, default=None, help="Gate: minimum mean PSNR (dB) vs the original.")
@click.option("--min-ssim", type=float, default=None, help="Gate: minimum mean SSIM vs the original.")
@click.option("--max-eps-error", type=float, default=None, help="Gate: maximum per-step model-output relative error.")
@click.option("--max-agreement-drop", type=float, default=None, help="Gate: maximum class-agreement drop.")
@click.option(
    "--max-fd-shift",
    type=float,
    default=None,
    help="Gate: maximum distribution shift (FD beyond the original's floor, per feature), denoiser features.",
)
@click.option(
    "--gate",
    "extra_gates",
    multiple=True,
    metavar="NAME=BOUND",
    help="Gate by name (any of `optimize gates`), e.g. max_fid_shift=1.2; repeatable.",
)
@judge_options
@click.option("--overwrite", is_flag=True, help="Replace --out when it is an earlier `optimize` output folder.")
@click.option(
    "--latency-repeats",
    default=20,
    show_default=True,
    help="Timed calls per latency measurement (0: no latency measurement).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the verification summary as JSON on stdout.")
@click.option("--resume", is_flag=True, help="Search targets: continue the interrupted search kept beside --out.")
@click.option(
    "--workers", default=1, show_default=True, help="Search targets: processes running trials on this machine."
)
@click.option(
    "--storage",
    default=None,
    help="Search targets: an Optuna storage URL (sqlite:///FILE, postgresql://...) or journal FILE.log shared by "
    "processes on several machines (default: a SQLite file beside --out).",
)
@click.option(
    "--trials-only",
    is_flag=True,
    help="Search targets: run trials of the shared --storage study and exit; the job without it finishes the search.",
)
@PROMPTS
@VARIANT
@SINGLE_FILE_CONFIG
@ALLOW_LARGE
def run(
    model: Path,
    target: str,
    out: Path | None,
    samples: int,
    seed_sets: int,
    calibration_samples: int,
    seed: int,
    scheduler: str | None,
    steps: int | None,
    guidance: float | None,
    calibration: Path | None,
    min_psnr: float | None,
    min_ssim: float | None,
    max_eps_error: float | None,
    max_agreement_drop: float | None,
    max_fd_shift: float | None,
    extra_gates: tuple[str, ...],
    clip: Path | None,
    inception: Path | None,
    overwrite: bool,
    latency_repeats: int,
    as_json: bool,
    resume: bool,
    workers: int,
    storage: str | None,
    trials_only: bool,
    prompts: Path | None,
    variant: str | None,
    config: Path | None,
    allow_large: bool,
) -> None:
    """Optimize MODEL for TARGET. Exit 0: gates pass; 1: a gate failed; 2: bad input; 3: internal error;
    130/143: interrupted."""
    from optimizer.job import run_job
    from optimizer.options import JobOptions
    from verify.gates import gates_table, verdict_line
    from verify.judges import JudgeOptions

    overrides = {
        "min_psnr_db": min_psnr,
        "min_ssim": min_ssim,
        "max_eps_rel_error": max_eps_error,
        "max_class_agreement_drop": max_agreement_drop,
        "max_fd_self_shift": max_fd_shift,
        **_named_gates(extra_gates),
    }
    stem = model.name.split(".")[0] or "model"
    opts = JobOptions(
        target=target,
        out=out or Path("optimized") / f"{stem}-{Path(target).stem}",
        samples=samples,
        seed_sets=seed_sets,
        calibration_samples=calibration_samples,
        seed=seed,
        scheduler=scheduler,
        steps=steps,
        guidance=guidance,
        gates={k: v for k, v in overrides.items() if v is not None},
        calibration=calibration,
        overwrite=overwrite,
        latency_repeats=latency_repeats,
        allow_large=allow_large,
        prompts=prompts,
        variant=variant,
        config=config,
        resume=resume,
        workers=workers,
        storage=storage,
        trials_only=trials_only,
        judges=JudgeOptions(clip=clip, inception=inception),
    )
    result = run_job(model, opts, _progress, _log)
    if not result.report:  # a torchrun worker (rank > 0): rank 0 writes and reports
        sys.exit(EXIT_PASS)
    graphs = ", ".join(result.report["artifacts"]["onnx"])
    _log(f"wrote {result.out}/ ({graphs}, plan.json, report.md, report.json, grid.png)")
    if as_json:
        from optimizer.report import json_safe

        click.echo(json.dumps(json_safe(result.report["verification"]), indent=2, allow_nan=False))
    click.echo(gates_table(result.gates))
    click.echo(verdict_line(result.gates))
    sys.exit(EXIT_PASS if result.passed else EXIT_GATE_FAILED)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@VARIANT
@SINGLE_FILE_CONFIG
@ALLOW_LARGE
def inspect(model: Path, variant: str | None, config: Path | None, allow_large: bool) -> None:
    """Describe MODEL: architecture, blocks, attention sites, conditioning, sampling plan."""
    import dataclasses

    from core.adapters import parameter_count
    from core.loading import load_program
    from optimizer.stages import stage_summary

    program = load_program(model, allow_large, variant=variant, config=config)
    spec = dataclasses.asdict(program.spec)
    spec.pop("model_config")
    info = {
        "source": dataclasses.asdict(program.source),
        "spec": spec,
        "plan": program.plan.to_dict(),
        "parameters": parameter_count(program.denoiser),
        "stages": stage_summary(program),
    }
    click.echo(json.dumps(info, indent=2))


@main.command()
def gates() -> None:
    """List the gates, the metric each bounds, and the judges that compute them (and what they apply to)."""
    from verify.gates import GATES
    from verify.judges import judges, source_of

    for g in GATES.values():
        judge = source_of(g.metric)
        op = ">=" if g.kind == "min" else "<="
        click.echo(f"{g.name:<26} {g.metric} {op} bound; judge {judge.name if judge else '-'}\n{'':<27}{g.description}")
    click.echo("")
    for j in judges().values():
        click.echo(f"judge {j.name}: applies to {j.applies_to}")


@main.command()
def targets() -> None:
    """List the targets, their backend and status."""
    from optimizer.targets import list_targets

    for t in list_targets():
        status = "available" if t.status == "available" else f"planned ({t.planned_in})"
        providers = ", ".join(t.backend.get("providers", []))
        backend = f"{t.backend['name']} ({providers})" if providers else t.backend["name"]
        click.echo(f"{t.name:<10} {status}; backend {backend}\n           {t.description}")


SAMPLES = click.IntRange(1, MAX_SAMPLES)
SCALE_GEOMETRIES = (
    "dit-b2",
    "dit-b2-512",
    "dit-xl2",
    "unet-sd",
)  # bench.scale.GEOMETRIES (named here so --help needs no torch import)
SCALE_REPEATS = 5  # whole loops at a realistic size take seconds each
SEED = click.IntRange(0, MAX_SEED)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="calibration .safetensors file")
@click.option("--samples", type=SAMPLES, default=20, show_default=True)
@click.option("--seed", type=SEED, default=10_000, show_default=True)
@PROMPTS
@VARIANT
@SINGLE_FILE_CONFIG
@ALLOW_LARGE
def calibrate(
    model: Path,
    out: Path,
    samples: int,
    seed: int,
    prompts: Path | None,
    variant: str | None,
    config: Path | None,
    allow_large: bool,
) -> None:
    """Capture reference trajectories (x_t, t, condition, output per step) for reuse with --calibration."""
    from calibration.capture import capture, evaluation_set, save
    from core.outputs import check_out_file, input_paths
    from optimizer.prepare import check_job_memory, load_for_job

    check_out_file(out, [*input_paths(model), *([prompts] if prompts else [])])
    program = load_for_job(model, allow_large, prompts, variant, config)
    check_job_memory(program, samples, allow_large)
    seeds, conditions = evaluation_set(program, samples, seed)
    save(capture(program, seeds, conditions, progress=lambda it: _progress(it, desc="calibration")), out)
    _log(f"wrote {out}")


@contextlib.contextmanager
def _artifact_errors(artifact: Path, backend: Any) -> Iterator[None]:
    """The runtime failing on a user's artifact (checked, but e.g. a label its graph cannot embed) is bad
    input, not a bug of ours."""
    try:
        yield
    except backend.runtime_errors() as exc:
        raise LoadError(f"{artifact}: {backend.name} cannot run this artifact ({one_line(str(exc), 300)})") from None


@main.command("export-triton")
@click.argument("artifact", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--repo", type=click.Path(path_type=Path), required=True, help="New folder for the repository.")
@click.option(
    "--graphs",
    type=click.Choice(["onnxruntime", "python", "tensorrt"]),
    default="onnxruntime",
    show_default=True,
    help="Graph models on the server's onnxruntime backend, run by onnxruntime inside Python-backend "
    "models (servers without that backend, e.g. nvidia-pytriton's), or the denoiser graphs as the "
    "TensorRT engines a GPU target built (tensorrt_plan).",
)
@click.option("--max-batch", default=8, show_default=True, help="Images the pipeline batches from its queue.")
@click.option("--instances", default=1, show_default=True, help="Instances of each model.")
def export_triton(artifact: Path, repo: Path, graphs: str, max_batch: int, instances: int) -> None:
    """Export an `optimize` output as a Triton model repository: the graphs, and a `pipeline` model that
    runs the whole plan (requests: seed + class label or prompt; responses: image, latents)."""
    from serving.triton_repo import export_repository

    written = export_repository(artifact, repo, graphs, max_batch, instances)
    _log(f"wrote {repo}/ (models: {', '.join(written['models'])})")


@main.command("serving-env")
@click.argument("folder", type=click.Path(path_type=Path))
def serving_env(folder: Path) -> None:
    """Create a Python environment with a Triton server (nvidia-pytriton's) that serves exported
    repositories on this machine, CPU included (what the serving tests use)."""
    from serving.local_server import create_env

    _log(f"python: {create_env(folder, _log)}")


@main.command("bench-serving")
@click.argument("artifact", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option(
    "--env",
    type=click.Path(path_type=Path, file_okay=False),
    default=".venv-triton",
    show_default=True,
    help="The server environment (optimize serving-env DIR).",
)
@click.option("--clients", type=click.IntRange(1, 64), default=8, show_default=True, help="Concurrent clients.")
@click.option("--requests", type=click.IntRange(1, 10_000), default=50, show_default=True, help="Requests per client.")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=8, show_default=True)
@click.option(
    "--instances",
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    help="Instances of each model (graph models run one ORT thread each: 2 keeps 2 cores busy).",
)
@click.option("--prompt", "prompts", multiple=True, help="Prompts to send to a text-to-image artifact (repeat).")
@click.option("--url", default=None, help="HOST:PORT of a running Triton server that already serves ARTIFACT (HTTP).")
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the result here.")
def bench_serving(
    artifact: Path,
    env: Path,
    clients: int,
    requests: int,
    max_batch: int,
    instances: int,
    prompts: tuple[str, ...],
    url: str | None,
    json_out: Path | None,
) -> None:
    """Serve an `optimize` output on a local Triton server (graphs in onnxruntime inside Python-backend
    models) or use one that serves it (--url), check served images against the in-process runner, and
    load it with concurrent clients; exit 1 when a request failed."""
    from core.fileio import write_json
    from core.outputs import check_out_file
    from serving.bench import bench_serving as run_bench

    if json_out is not None:
        check_out_file(json_out, [artifact], "--json-out")
    if url is None and not (env / "bin" / "python").exists():
        raise ConfigError(f"no server environment at {env}: create it with 'optimize serving-env {env}'")
    result = run_bench(artifact, env, clients, requests, max_batch, instances, prompts, _log, url)
    load = result["load"]
    rates = ", ".join(f"{name} {rate['images_per_s']:.2f}" for name, rate in result["in_process"].items())
    if load["succeeded"]:
        _log(
            f"{load['requests']} requests, {load['failed']} failed: p50 {load['p50_ms']:.1f} ms, "
            f"p90 {load['p90_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms, {load['images_per_s']:.2f} images/s "
            f"(in-process runner, images/s: {rates})"
        )
    else:
        _log(f"all {load['requests']} requests failed, e.g. {load['failures'][0]}")
    if json_out is not None:
        write_json(json_out, result)
    click.echo(json.dumps(result, indent=2))
    if load["failed"]:
        raise SystemExit(1)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--seed", "seeds", type=SEED, multiple=True, default=(0,), show_default=True)
@click.option("--label", "labels", type=int, multiple=True, help="Class per seed (repeat; default 0).")
@click.option("--prompt", "prompts", multiple=True, help="Prompt per seed of a text-to-image artifact (repeat).")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="PNG file")
def sample(
    artifact: Path, seeds: tuple[int, ...], labels: tuple[int, ...], prompts: tuple[str, ...], out: Path
) -> None:
    """Generate samples from an `optimize` output folder, on the backend its plan.json names."""
    import numpy as np
    from PIL import Image

    from backends.plan import read_plan
    from backends.registry import get_backend
    from core.fileio import write_atomic
    from core.outputs import check_out_file
    from core.sampling import to_pixels

    check_out_file(out, [artifact])
    if len(seeds) > 1024:
        raise ConfigError("sample: at most 1024 --seed values per call")
    backend = get_backend(read_plan(artifact).backend)
    with _artifact_errors(artifact, backend):
        runner = backend.runner(artifact)
        conditioning = runner.plan.conditioning
        if conditioning.text:
            if len(prompts) == 1:
                prompts = prompts * len(seeds)
            conditions: list | None = list(prompts)
        else:
            conditions = (list(labels) or [0] * len(seeds)) if conditioning.num_classes else None
        final = runner.sample(list(seeds), conditions, progress=lambda it: _progress(it, desc="sample"))
        pixels = to_pixels(runner.decode(final))
    row = np.concatenate(list(pixels), axis=1)
    picture = Image.fromarray(row[..., 0] if row.shape[-1] == 1 else row)
    write_atomic(out, lambda tmp: picture.save(tmp, format="PNG"))
    _log(f"wrote {out}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    default=None,
    help="The original model (default: the source path recorded in plan.json).",
)
@click.option(
    "--repeats",
    type=click.IntRange(1, MAX_REPEATS),
    default=50,
    show_default=True,
    help="Timed denoiser calls (end to end: a quarter).",
)
@click.option(
    "--images",
    type=click.IntRange(1, 1024),
    default=1,
    show_default=True,
    help="Images per call (the denoiser batch is 2x with CFG).",
)
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the timings as JSON.")
@click.option(
    "--scale",
    type=click.Choice(sorted(SCALE_GEOMETRIES)),
    default=None,
    help="Replay the artifact's decisions on this realistic geometry (random weights) and time its whole loop "
    f"against the same geometry's original, side by side (--repeats loops each, at most {SCALE_REPEATS}).",
)
@ALLOW_LARGE
def bench(
    artifact: Path,
    model: Path | None,
    repeats: int,
    images: int,
    json_out: Path | None,
    scale: str | None,
    allow_large: bool,
) -> None:
    """Time an `optimize` output on its backend against the original in torch and the original's fp32
    graph on the same backend (each on the original's own loop, as the report times them), interleaved in
    one run; or, with --scale, its decisions at a realistic size."""
    import tempfile

    from backends.plan import original_loop, read_plan
    from backends.registry import get_backend
    from core.fileio import write_json
    from core.loading import load_program
    from core.outputs import check_out_file
    from optimizer.prepare import check_job_memory
    from optimizer.report import latency_lines
    from verify.latency import measure_latency

    if scale is not None:
        _bench_scale(artifact, scale, repeats)
        return
    if json_out is not None:
        check_out_file(json_out, [artifact], "--json-out")
    plan = read_plan(artifact)
    backend = get_backend(plan.backend)
    source = plan.document["model"]["source"]
    program = load_program(model or source["path"], allow_large)
    if program.source.digest != source["digest"]:
        raise ConfigError(f"{program.source.path} is not the model this artifact was built from")
    original = original_loop(plan.document, str(artifact / "plan.json"))
    if original is None:
        _log("this artifact does not record the original's loop: the baselines run the artifact's loop")
    program = program.replace(plan=original or plan.sampling)
    check_job_memory(program, images, allow_large)
    with tempfile.TemporaryDirectory(prefix="bench-fp32-") as tmp:
        backend.lower(program, Path(tmp))
        with _artifact_errors(artifact, backend):
            latency = measure_latency(program, backend.runner(artifact), repeats, backend.runner(Path(tmp)), images)
    for line in latency_lines(latency, "cuda" if plan.backend.get("name") == "tensorrt" else "cpu"):
        click.echo(line)
    if json_out is not None:
        write_json(json_out, latency)


@main.command("attention-sweep")
@click.option(
    "--tokens",
    "sides",
    type=click.IntRange(4, 128),
    multiple=True,
    default=(16, 32, 48, 64),
    show_default=True,
    help="Token grid sides to sweep (16: 256 tokens, 64: 4096).",
)
@click.option("--heads", type=click.IntRange(1, 64), default=12, show_default=True)
@click.option("--head-dim", type=click.IntRange(8, 256), default=64, show_default=True)
@click.option(
    "--radius",
    "radii",
    type=click.FloatRange(1, 64),
    multiple=True,
    default=(4.0, 8.0, 16.0),
    show_default=True,
    help="Local attention window radii (one variant each).",
)
@click.option("--tile", type=click.IntRange(1, 64), default=8, show_default=True, help="Local attention query tile.")
@click.option("--repeats", type=click.IntRange(1, 100), default=5, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the rows here.")
def attention_sweep(
    sides: tuple[int, ...],
    heads: int,
    head_dim: int,
    radii: tuple[float, ...],
    tile: int,
    repeats: int,
    json_out: Path | None,
) -> None:
    """One DiT block (random weights) at growing token counts: softmax self-attention vs linear, linear +
    conv and local attention, lowered and timed side by side in ONNX Runtime; attention FLOPs per image."""
    from bench.attention_sweep import check_memory, markdown, sweep
    from core.fileio import write_json
    from core.limits import available_memory
    from core.outputs import check_out_file

    if json_out is not None:
        check_out_file(json_out, [], "--json-out")
    check_memory(sides, heads, head_dim, radii, tile, available_memory())
    rows = sweep(sides, heads, head_dim, radii, tile, repeats, _log)
    if json_out is not None:
        write_json(json_out, rows)
    click.echo(markdown(rows))


def _bench_scale(artifact: Path, geometry: str, repeats: int) -> None:
    from backends.plan import read_plan
    from bench.scale import GEOMETRIES, compare_at_scale
    from core.validate import read_json_object

    plan = read_plan(artifact)  # the folder is an artifact of ours, checked
    report = read_json_object(artifact / "report.json", ConfigError, "report")
    result = compare_at_scale(report, plan.backend, GEOMETRIES[geometry], min(repeats, SCALE_REPEATS), _log)
    click.echo(json.dumps(result, indent=2))


def _comparison_command(name: str) -> Callable:
    """A side-by-side command: MODEL, --samples, --calibration-samples, --json-out, --allow-large."""

    def decorate(fn: Callable) -> Callable:
        fn = ALLOW_LARGE(fn)
        fn = click.option(
            "--json-out", type=click.Path(path_type=Path), default=None, help="Also write the rows as JSON."
        )(fn)
        fn = click.option("--calibration-samples", type=SAMPLES, default=20, show_default=True)(fn)
        fn = click.option(
            "--samples",
            type=click.IntRange(2, MAX_SAMPLES),
            default=100,
            show_default=True,
            help="Evaluation seeds (classes cycle 0..N-1).",
        )(fn)
        fn = click.argument("model", type=click.Path(path_type=Path))(fn)
        return main.command(name)(fn)

    return decorate


def _run_comparison(
    model: Path,
    samples: int,
    calibration_samples: int,
    json_out: Path | None,
    allow_large: bool,
    compare: Callable[[Any], list[dict[str, Any]]],
    table: Callable[[list[dict[str, Any]]], str],
) -> None:
    """Load, run `compare(program)`, write the rows as JSON if asked, print `table(rows)`."""
    from core.fileio import write_json
    from core.loading import load_program
    from core.outputs import check_out_file, input_paths
    from optimizer.prepare import check_job_memory

    if json_out is not None:
        check_out_file(json_out, input_paths(model), "--json-out")
    program = load_program(model, allow_large)
    check_job_memory(program, max(samples, calibration_samples), allow_large)
    rows = compare(program)
    if json_out is not None:
        write_json(json_out, rows)
    click.echo(table(rows))


@_comparison_command("quant-compare")
@click.option(
    "--rows",
    type=click.Choice(["all", "ours", "peers"]),
    default="all",
    show_default=True,
    help="Our configurations, the peer tools (ONNX Runtime, modelopt), or both.",
)
def quant_compare(
    model: Path, samples: int, calibration_samples: int, json_out: Path | None, allow_large: bool, rows: str
) -> None:
    """Quantization side by side: our calibration vs naive ones, every format, same seeds (markdown table)."""
    from bench.quant_compare import compare_quantization, markdown_table

    def compare(program: Any) -> list[dict[str, Any]]:
        chosen = [] if rows == "peers" else None
        return compare_quantization(
            program, samples, calibration_samples, _progress, _log, rows=chosen, peers=rows != "ours"
        )

    _run_comparison(model, samples, calibration_samples, json_out, allow_large, compare, markdown_table)


@_comparison_command("cache-compare")
def cache_compare(
    model: Path, samples: int, calibration_samples: int, json_out: Path | None, allow_large: bool
) -> None:
    """Our searched cache schedules vs diffusers' cache hooks at matched FLOPs, same seeds (markdown)."""
    from bench.cache_compare import compare_caching, markdown_table

    def compare(program: Any) -> list[dict[str, Any]]:
        return compare_caching(program, samples, calibration_samples, _progress, _log)

    _run_comparison(model, samples, calibration_samples, json_out, allow_large, compare, markdown_table)


@_comparison_command("prune-compare")
def prune_compare(
    model: Path, samples: int, calibration_samples: int, json_out: Path | None, allow_large: bool
) -> None:
    """Pruning and layer removal: our criteria vs naive ones at equal compression, same seeds (markdown)."""
    from bench.prune_compare import compare_pruning, markdown_table

    def compare(program: Any) -> list[dict[str, Any]]:
        return compare_pruning(program, samples, calibration_samples, _progress, _log)

    _run_comparison(model, samples, calibration_samples, json_out, allow_large, compare, markdown_table)


@main.command("judge-compare")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--samples", type=click.IntRange(2, MAX_SAMPLES), default=100, show_default=True)
@click.option("--nulls", type=click.IntRange(0, 64), default=8, show_default=True, help="Fresh draws of the original.")
@click.option(
    "--seed-sets",
    type=click.IntRange(1, 16),
    default=1,
    show_default=True,
    help="Judge the candidates on this many disjoint evaluation sets (the spread one set's gate decides by chance).",
)
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the rows as JSON.")
@judge_options
@PROMPTS
@ALLOW_LARGE
def judge_compare(
    model: Path,
    samples: int,
    nulls: int,
    seed_sets: int,
    json_out: Path | None,
    clip: Path | None,
    inception: Path | None,
    prompts: Path | None,
    allow_large: bool,
) -> None:
    """Every judge that applies to MODEL on graded candidates (fresh draws of the original, INT8 weights,
    weights + 5% and + 20% noise, INT4 weights, half the steps): distribution ratios and their order."""
    from bench.judge_compare import compare_judges, markdown_table
    from core.fileio import write_json
    from core.outputs import check_out_file, input_paths
    from optimizer.prepare import check_job_memory, load_for_job
    from verify.judges import JudgeOptions, plan_judges

    if json_out is not None:
        check_out_file(json_out, input_paths(model), "--json-out")
    options = JudgeOptions(clip=clip, inception=inception)
    program = load_for_job(model, allow_large, prompts)
    plan_judges(program, options)  # a bad feature model: one line before any work
    if seed_sets * samples > MAX_SAMPLES:
        raise ConfigError(f"judge-compare: --seed-sets x --samples must be at most {MAX_SAMPLES}")
    check_job_memory(program, samples, allow_large)
    rows = compare_judges(program, samples, nulls, options, _log, seed_sets)
    if json_out is not None:
        write_json(json_out, rows)
    click.echo(markdown_table(rows))


@_comparison_command("linearize-compare")
def linearize_compare(
    model: Path, samples: int, calibration_samples: int, json_out: Path | None, allow_large: bool
) -> None:
    """Attention linearization as the pass does it vs the naive variants (undistilled, every block), each
    mechanism, same seeds, lowered and timed side by side in ONNX Runtime (markdown table)."""
    from bench.linearize_compare import compare_linearization, markdown_table

    def compare(program: Any) -> list[dict[str, Any]]:
        return compare_linearization(program, samples, calibration_samples, _progress, _log)

    _run_comparison(model, samples, calibration_samples, json_out, allow_large, compare, markdown_table)


@_comparison_command("steps-compare")
@click.option("--nfe", type=click.IntRange(1, 64), default=4, show_default=True, help="Network evaluations per image.")
def steps_compare(
    model: Path, samples: int, calibration_samples: int, json_out: Path | None, allow_large: bool, nfe: int
) -> None:
    """Step reduction at equal network evaluations: plain DDIM, searched schedules and the distilled
    students (cpu-steps recipe), fidelity and whole-loop ORT latency side by side (markdown)."""
    from bench.steps_compare import compare_steps, markdown_table, rows_for
    from optimizer.targets import get_target

    recipe = [dict(step) for step in get_target("cpu-steps").recipe]
    for step in recipe:
        if step["pass"] == "progressive_distill":
            step["config"] = {**step.get("config", {}), "steps": nfe}

    def compare(program: Any) -> list[dict[str, Any]]:
        return compare_steps(program, rows_for(nfe, recipe), samples, calibration_samples, _progress, _log)

    _run_comparison(model, samples, calibration_samples, json_out, allow_large, compare, markdown_table)


if __name__ == "__main__":  # last: every command above is registered before `python -m optimizer.cli` runs
    main()
