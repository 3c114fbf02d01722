"""The judges on graded candidates: are their distribution metrics ordered as the damage is, and how far
from 0 (the shift; 1 for the ratio) does a perfect candidate land by chance? Every row's samples are
judged against the original's (same seeds) and its floor set (other seeds), as verification does.

Rows: fresh draws of the original on seeds of their own (the null: what a candidate whose distribution
is exactly the original's, but whose samples do not track the reference's seeds, gets; a distribution
bound must leave room for it), then model-agnostic degradations of the original's weights: a good
candidate (INT8 round-to-nearest weights, per output channel), a mildly degraded one (every weight
tensor + 5% of its standard deviation in Gaussian noise) and a broken one (+ 20%); and, not graded, INT4
round-to-nearest weights and half the sampling steps (the loop changed, same network).

With several seed sets (`seed_sets`), the candidates are judged again on disjoint evaluation sets
(seeds k x samples.., each with its own floor set): how far one candidate's ratio moves with the set
alone, which is what a single set's gate decides by chance."""

from __future__ import annotations

import copy
import dataclasses
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from calibration.capture import capture, evaluation_set
from core.ir import DiffusionProgram
from core.variants import sample_program
from verify.judges import JudgeOptions
from verify.verdict import Verdict, floor_cell, null_seeds

GRADED = ("good", "mild", "broken")
PREFIXES = ("fd_self", "fd_digits", "fd_clip", "fid")


def rounded(program: DiffusionProgram, bits: int) -> DiffusionProgram:
    """Every Linear/Conv weight rounded to `bits`-bit integers (symmetric, one scale per output channel)."""
    model = copy.deepcopy(program.denoiser)
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
                w = module.weight
                scale = w.abs().flatten(1).amax(1).clamp_min(1e-12).view(-1, *([1] * (w.dim() - 1))) / levels
                w.copy_((w / scale).round().clamp(-levels, levels) * scale)
    return program.replace(denoiser=model.eval())


def noisy(program: DiffusionProgram, level: float, seed: int = 1) -> DiffusionProgram:
    """Every parameter tensor + `level` x its standard deviation of Gaussian noise (seeded)."""
    model = copy.deepcopy(program.denoiser)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            spread = p.std().nan_to_num(0.0) if p.numel() > 1 else p.abs()
            p.add_(torch.randn(p.shape, generator=generator) * spread * level)
    return program.replace(denoiser=model.eval())


def candidates(program: DiffusionProgram) -> list[tuple[str, str, DiffusionProgram]]:
    half = max(1, program.plan.num_inference_steps // 2)
    return [
        ("good", "INT8 weights (round to nearest, per channel)", rounded(program, 8)),
        ("mild", "weights + 5% noise", noisy(program, 0.05)),
        ("broken", "weights + 20% noise", noisy(program, 0.2)),
        ("info", "INT4 weights (round to nearest, per channel)", rounded(program, 4)),
        (
            "info",
            f"half the steps ({half})",
            program.replace(plan=dataclasses.replace(program.plan, num_inference_steps=half)),
        ),
    ]


def compare_judges(
    program: DiffusionProgram,
    samples: int,
    nulls: int,
    options: JudgeOptions,
    log: Callable[[str], None],
    seed_sets: int = 1,
) -> list[dict[str, Any]]:
    graded, rows = candidates(program), []
    for k in range(seed_sets):
        seeds, conditions = evaluation_set(program, samples, k * samples)
        log(f"seed set {k + 1} of {seed_sets}: reference and floor set, the original on {samples} seeds each")
        reference = capture(program, seeds, conditions)
        verdict = Verdict.for_program(program, reference, options)
        for draw in range(nulls if k == 0 else 0):
            log(f"null draw {draw + 1} of {nulls}")
            final = sample_program(program, null_seeds(draw, samples), conditions)
            rows.append(_row("null", f"the original, other seeds ({draw + 1})", verdict(final), k))
        for kind, name, candidate in graded:
            log(name)
            rows.append(_row(kind, name, verdict(sample_program(candidate, seeds, conditions)), k))
    return rows


def _row(kind: str, name: str, summary: dict[str, Any], seed_set: int) -> dict[str, Any]:
    values = {k: v for k, v in summary.items() if not isinstance(v, list)}
    return {"kind": kind, "name": name, "seed_set": seed_set, **values}


def ordered(rows: list[dict[str, Any]], prefix: str) -> bool | None:
    """Whether good < mild < broken on `prefix`'s shift (None: the metric was not measured)."""
    values = [next(r.get(f"{prefix}_shift") for r in rows if r["kind"] == kind) for kind in GRADED]
    good, mild, broken = values
    if good is None or mild is None or broken is None:
        return None
    return good < mild < broken


def markdown_table(rows: list[dict[str, Any]]) -> str:
    present = [p for p in PREFIXES if rows[0].get(f"{p}_shift") is not None]
    over_sets = _spread_table([r for r in rows if r["kind"] != "null"], present)
    rows = [r for r in rows if r["seed_set"] == 0]
    head = ["row", "kind", "PSNR mean (dB)", *(f"{p}: shift (ratio: FD / floor)" for p in present), "agreement drop"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        psnr = "n/a" if r["kind"] == "null" else f"{r['psnr_db_mean']:.2f}"
        drop = r.get("class_agreement_drop")
        cells = [r["name"], r["kind"], psnr, *(floor_cell(r, p) for p in present)]
        lines.append("| " + " | ".join([*cells, "n/a" if drop is None else f"{drop:.2f}"]) + " |")
    lines.append("")
    for p in present:
        null = sorted(r[f"{p}_shift"] for r in rows if r["kind"] == "null")
        spread = f"; null shifts {null[0]:.3g} to {null[-1]:.3g} (median {statistics.median(null):.3g})" if null else ""
        lines.append(f"- {p}: good < mild < broken: {'yes' if ordered(rows, p) else 'NO'}{spread}")
    return "\n".join(lines + over_sets)


def _spread_table(rows: list[dict[str, Any]], present: list[str]) -> list[str]:
    """Per candidate and metric, its shift and ratio over the seed sets: min to max (median); none for one set."""
    sets = 1 + max(r["seed_set"] for r in rows)
    if sets == 1:
        return []
    head = ["row"]
    for p in present:
        head += [f"{p}: shift over {sets} seed sets, min to max (median)", f"{p}: ratio, min to max (median)"]
    lines = ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in dict.fromkeys(r["name"] for r in rows):
        cells = [name]
        for p in present:
            shifts = sorted(r[f"{p}_shift"] for r in rows if r["name"] == name)
            cells.append(f"{shifts[0]:.3g} to {shifts[-1]:.3g} ({statistics.median(shifts):.3g})")
            ratios = sorted(r[f"{p}_ratio"] for r in rows if r["name"] == name)
            cells.append(f"{ratios[0]:.2f} to {ratios[-1]:.2f} ({statistics.median(ratios):.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines
