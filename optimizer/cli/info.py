"""`optimize inspect`, `optimize gates`, `optimize targets`: what a model, the gates and the targets are."""

from __future__ import annotations

import json
from pathlib import Path

import click

from optimizer.cli.app import ALLOW_LARGE, SINGLE_FILE_CONFIG, VARIANT, main


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
    from optimizer.tasks import stage_summary

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
