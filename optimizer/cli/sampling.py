"""`optimize calibrate` (reference trajectories of a model) and `optimize sample` (images from an artifact)."""

from __future__ import annotations

from pathlib import Path

import click

from core.errors import ConfigError
from optimizer.cli.app import (
    ALLOW_LARGE,
    PROMPTS,
    SAMPLES,
    SEED,
    SINGLE_FILE_CONFIG,
    VARIANT,
    artifact_errors,
    log,
    main,
    show_progress,
)


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
    save(capture(program, seeds, conditions, progress=lambda it: show_progress(it, desc="calibration")), out)
    log(f"wrote {out}")


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
    from core.pixels import to_pixels

    check_out_file(out, [artifact])
    if len(seeds) > 1024:
        raise ConfigError("sample: at most 1024 --seed values per call")
    backend = get_backend(read_plan(artifact).backend)
    with artifact_errors(artifact, backend):
        runner = backend.runner(artifact)
        conditioning = runner.plan.conditioning
        if conditioning.text:
            if len(prompts) == 1:
                prompts = prompts * len(seeds)
            conditions: list | None = list(prompts)
        else:
            conditions = (list(labels) or [0] * len(seeds)) if conditioning.num_classes else None
        final = runner.sample(list(seeds), conditions, progress=lambda it: show_progress(it, desc="sample"))
        pixels = to_pixels(runner.decode(final))
    row = np.concatenate(list(pixels), axis=1)
    picture = Image.fromarray(row[..., 0] if row.shape[-1] == 1 else row)
    write_atomic(out, lambda tmp: picture.save(tmp, format="PNG"))
    log(f"wrote {out}")
