"""report.json, report.md and the reference-vs-candidate sample grid."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from core.fileio import write_atomic, write_json
from core.ir import DiffusionProgram
from verify.gates import GateResult, gates_table, verdict_line

GRID_FILE = "grid.png"
REPORT_FILES = ("report.json", "report.md")


CHUNK_COLORS = ("royalblue", "darkorange", "seagreen", "crimson", "purple", "saddlebrown")


def _chunk_tile(chunk: torch.Tensor, height: int = 64, step: int = 4) -> Image.Image:
    """A 1-D sample ([horizon, dims], values in [0, 1]) drawn as one line per dimension over the horizon."""
    horizon, dims = chunk.shape
    tile = Image.new("RGB", (max(2, horizon) * step, height), "white")
    draw = ImageDraw.Draw(tile)
    for d in range(dims):
        points = [(i * step, (1 - float(chunk[i, d])) * (height - 1)) for i in range(horizon)]
        draw.line(points, fill=CHUNK_COLORS[d % len(CHUNK_COLORS)], width=1)
    return tile


def save_grid(path: Path, reference: torch.Tensor, candidate: torch.Tensor, columns: int = 20, scale: int = 4) -> None:
    """Rows: reference, candidate, |difference| x10 (values in [0, 1]): images [N, C, H, W] as tiles, 1-D
    samples [N, horizon, dims] (a policy's action chunks) as one line per dimension."""
    n = min(columns, len(reference))
    diff = ((reference[:n] - candidate[:n]).abs() * 10).clamp(0, 1)
    rows = [reference[:n], candidate[:n], diff]
    labels = ["reference (torch)", "candidate (lowered)", "|diff| x10"]
    if reference.dim() == 3:
        tiles = [[_chunk_tile(row[i]) for i in range(n)] for row in rows]
        return _save_tiles(path, tiles, labels, "lightgray")
    _save_tiles(path, [[_image_tile(row[i], scale) for i in range(n)] for row in rows], labels, "white")


def _image_tile(image: torch.Tensor, scale: int) -> Image.Image:
    """An image ([C, H, W], values in [0, 1]) enlarged `scale` times, nearest neighbour."""
    c, h, w = image.shape
    img = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(img[..., 0] if c == 1 else img).resize((w * scale, h * scale), Image.NEAREST).convert("RGB")


def _save_tiles(
    path: Path, tiles: list[list[Image.Image]], labels: list[str], background: str, label_w: int = 130, pad: int = 2
) -> None:
    """Rows of equal tiles, each row labelled on its left."""
    cell_w, cell_h = tiles[0][0].size
    canvas = Image.new("RGB", (label_w + len(tiles[0]) * (cell_w + pad), len(tiles) * (cell_h + pad)), background)
    draw = ImageDraw.Draw(canvas)
    for r, (row, label) in enumerate(zip(tiles, labels, strict=True)):
        y0 = r * (cell_h + pad)
        draw.text((4, y0 + cell_h // 2 - 6), label, fill="black")
        for i, tile in enumerate(row):
            canvas.paste(tile, (label_w + i * (cell_w + pad), y0))
    write_atomic(path, lambda tmp: canvas.save(tmp, format="PNG"))


def json_safe(value: Any) -> Any:
    """A measured NaN/Inf (e.g. the error of a candidate that diverged) is reported as null: report.json
    stays valid JSON, and the gate on it has already failed (NaN compares false to every bound)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def decision_sections(program: DiffusionProgram) -> list[str]:
    """Each applied pass's own report section (its Decision renders it), in the order they ran."""
    lines = []
    for record in program.provenance:
        body = record.decision.markdown()
        if body:
            lines += ["", f"## {record.decision.title or record.name}", *body]
    return lines


def markdown(report: dict[str, Any], gate_results: list[GateResult], sections: Sequence[str] = ()) -> str:
    m, v, lat = report["model"], report["verification"], report["latency"]
    lines = [
        f"# Optimization report: {Path(m['source']['path']).name} -> {report['target']['name']}",
        "",
        f"**Result: {_result(gate_results)} (gates of target `{report['target']['name']}`"
        f"{' with CLI overrides' if report['gate_overrides'] else ''}; a run passes only when every gate that"
        " applies to the model was measured and held)",
        "",
        "## Model",
        f"- source: `{m['source']['path']}` ({m['source']['format']}, digest {m['source']['digest']})",
        *(f"- note: {note}" for note in m["source"].get("notes", [])),
        f"- architecture: {m['family']} (`{m['class']}`), {m['parameters']:,} parameters"
        + (
            f" (artifact: {m['candidate_parameters']:,})"
            if m.get("candidate_parameters", m["parameters"]) != m["parameters"]
            else ""
        ),
        f"- sample shape: {m['sample_shape']}, conditioning: {_conditioning(m)}",
        f"- sizes: input weights {m['input_bytes']:,} B, ONNX {report['artifacts']['onnx_bytes']:,} B"
        + _size_ratio(report["artifacts"]),
        *_stage_lines(m, report["artifacts"]),
        "",
        "## Target",
        f"`{report['target']['name']}`: {report['target']['description']}",
        *_tensorrt(report),
        "",
        "## Sampling plan",
        f"- scheduler: `{report['plan']['scheduler_class']}`, {report['plan']['num_inference_steps']} steps,"
        f" guidance scale {report['plan']['guidance_scale']}",
        *_candidate_loop(report),
        *_flops(report),
        "",
        "## Passes",
    ]
    if report["passes"]:
        lines += [
            "Measured on the calibration set right after each pass: teacher-forced model-output error and the"
            " end-to-end PSNR of its samples vs the original loop's.",
            "",
            "| pass | seconds | eps rel. error mean | calibration PSNR (dB) | FLOPs per image (G) |",
            "|---|---|---|---|---|",
        ]
        lines += [_pass_row(p) for p in report["passes"]]
    else:
        lines.append("None: the target's recipe is empty; what is verified is the lowering itself.")
    lines += sections
    lines += [
        "",
        f"## Verification ({v['samples']} samples, same seeds/{_conditions(m)}/{_loop_words(report)}, on"
        f" {v.get('space', 'model output')};"
        f" reference = original in {_torch_words(m)}, candidate = lowered artifact on {_executed_by(report)};"
        f" floor set = the original on seeds {v.get('floor_seeds', '?')}, same {_conditions(m)})",
        "",
        f"Judges: {', '.join(v.get('judges', []))}. Distribution shifts (`*_shift`, the gated values) are the"
        " candidate's Fréchet distance to the floor set beyond the reference's own distance to it, per"
        " standardized feature, the mean term unbiased from the paired seeds: about 0 for a candidate whose"
        " samples are the original's within its seed-to-seed noise, at any sample count (`*_ratio`: the two"
        " distances' ratio, about 1).",
        "",
        _seed_sets_words(v, report["evaluation"]),
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(val)} |" for k, val in v.items() if not isinstance(val, list)]
    if "precision_floor_psnr_db" in v:
        placed = report["model"]["placement"]
        lines += [
            "",
            f"The reference is the original in {placed['dtype']} on {placed['device']} (--dtype, --device); the"
            " candidate's graphs compute in float32. The original as placed (the same weights) computed in float32"
            " measures"
            f" {v['precision_floor_psnr_db']:.1f} dB mean PSNR against it, largest per-step relative error"
            f" {v['precision_floor_eps_rel_error']:.3g}: the precision floor, where an unchanged float32 lowering"
            " sits. The paired gates still judge the candidate against the reference.",
        ]
    if "loop_sensitivity_psnr_db" in v:
        lines += [
            "",
            f"The lowering matches per step (largest relative error {v['eps_rel_error_max']:.2g}) while the end-to-end"
            f" PSNR is {v['psnr_db_mean']:.1f} dB: this loop amplifies small differences. The original's own loop,"
            f" its model output scaled by (1 + {v['eps_rel_error_max']:.2g}) at every step, measures"
            f" {v['loop_sensitivity_psnr_db']:.1f} dB against itself (random weights or a high guidance scale do"
            " this). The PSNR gate still judges the end-to-end samples.",
        ]
    lines += [
        "",
        "Per-step model-output relative error (candidate network fed the reference's own inputs):",
        "",
        "| step | timestep | relative error |",
        "|---|---|---|",
    ]
    lines += [
        f"| {i} | {t:g} | {e:.3g} |"
        for i, (t, e) in enumerate(zip(v["timesteps"], v["eps_rel_error_per_step"], strict=True))
    ]
    lines += [
        "",
        "## Gates",
        "```",
        gates_table(gate_results),
        "```",
        "",
    ]
    if "skipped" in lat:
        lines += ["## Latency", f"Not measured ({lat['skipped']})."]
    else:
        lines.append(
            f"## Latency (ms, median; batch {lat['batch']}, {lat['threads']} threads, providers"
            f" {', '.join(lat.get('providers', []))}; contenders interleaved in one run)"
        )
        lines += _latency_table(lat, report["target"]["hardware"].get("device", "cpu"))
    lines += ["", "## Samples", f"![reference vs candidate]({GRID_FILE})", ""]
    return "\n".join(lines)


def _result(results: list[GateResult]) -> str:
    """**PASS**, or **FAIL** with the gates that failed or went unmeasured."""
    line = verdict_line(results)
    return "PASS**" if line == "PASS" else f"FAIL** ({line.removeprefix('FAIL: ')})"


def _loop_changed(report: dict[str, Any]) -> bool:
    keys = ("scheduler_class", "scheduler_config", "num_inference_steps", "guidance_scale", "timesteps")
    plan, candidate = report["plan"], report.get("candidate_plan", report["plan"])
    return any(plan.get(k) != candidate.get(k) for k in keys)


def _candidate_loop(report: dict[str, Any]) -> list[str]:
    """The artifact's loop where passes changed it (steps, solver, timesteps, guidance)."""
    if not _loop_changed(report):
        return []
    c = report["candidate_plan"]
    grid = f" at timesteps {[round(t) for t in c['timesteps']]}" if c.get("timesteps") else ""
    return [
        f"- artifact's loop: `{c['scheduler_class']}`, {c['num_inference_steps']} steps{grid}, guidance scale"
        f" {c['guidance_scale']} (changed by the passes; verification compares it with the original loop above)"
    ]


def _loop_words(report: dict[str, Any]) -> str:
    return "the artifact's own loop vs the original's" if _loop_changed(report) else "scheduler/steps"


def _executed_by(report: dict[str, Any]) -> str:
    """What ran the candidate: the backend, or what ran in its place (a TensorRT target's ORT fallback)."""
    details = report.get("backend_details", {})
    if details.get("executed_by"):
        providers = ", ".join(details.get("providers", []))
        return f"{details['executed_by']}{f' ({providers})' if providers else ''}, in place of {report['backend']}"
    return str(report["backend"])


def _pass_row(p: dict[str, Any]) -> str:
    f = p["fidelity"]
    psnr = f.get("calibration_psnr_db")
    flops = f.get("flops_per_image")
    eps = f.get("eps_rel_error_mean", float("nan"))
    return (
        f"| {p['name']} | {p['seconds']} | {'- (new reference)' if eps is None else f'{eps:.4g}'} |"
        f" {'-' if psnr is None else f'{psnr:.2f}'} | {'-' if flops is None else f'{flops / 1e9:.3f}'} |"
    )


def _size_ratio(artifacts: dict[str, Any]) -> str:
    ref = artifacts.get("reference_onnx_bytes")
    if not ref:
        return ""
    ratio = ref / artifacts["onnx_bytes"]
    change = f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"
    files = artifacts.get("onnx", [])
    return f" in {len(files)} graph(s) (fp32 ONNX of the original: {ref:,} B; {change})"


def _tensorrt(report: dict[str, Any]) -> list[str]:
    """The TensorRT lint of every graph, which engines were built, and which runtime ran the verification."""
    trt = report["artifacts"].get("tensorrt")
    if not trt:
        return []
    engines, details = trt["engines"], report.get("backend_details", {})
    lines = ["", "## TensorRT", "| graph | nodes | Q/DQ types (dequantize nodes) | lint errors | lint warnings |"]
    lines.append("|---|---|---|---|---|")
    for graph, lint in trt["lint"].items():
        types = ", ".join(f"{k}: {n}" for k, n in lint["dequantize_nodes"].items()) or "none (fp32)"
        lines.append(f"| {graph} | {lint['nodes']} | {types} | {lint['errors']} | {lint['warnings']} |")
    rules = Counter((f["severity"], f["rule"], f["message"]) for lint in trt["lint"].values() for f in lint["findings"])
    lines += [f"- {sev} `{rule}` ({n} nodes): {message}" for (sev, rule, message), n in sorted(rules.items())[:20]]
    version = next(iter(trt["lint"].values()))["tensorrt_version"] if trt["lint"] else "?"
    lines.append(f"- rules: TensorRT {version}'s ONNX parser and explicit quantization (backends/trt_lint.py)")
    if engines["built"]:
        lines.append(f"- engines: {', '.join(engines['built'])}")
    else:
        lines.append(f"- engines: not built: {engines['reason']}")
    if details.get("why_not_tensorrt"):
        lines.append(
            f"- verified and timed with {details['executed_by']} ({', '.join(details.get('providers', []))})"
            " on the same graphs instead: "
            f"{details['why_not_tensorrt']}"
        )
    return lines


def latency_lines(lat: dict[str, Any], device: str) -> list[str]:
    """The latency table as the report shows it, with what was timed (`optimize bench` prints the same)."""
    return [
        f"Median ms, {lat['images']} image(s) per call, {lat['threads']} torch threads, providers"
        f" {', '.join(lat['providers']) or '-'}; each row on the original's own loop but the artifact's:",
        "",
        *_latency_table(lat, device),
    ]


def _latency_table(lat: dict[str, Any], device: str) -> list[str]:
    names = {"torch": "original, torch", "ort_fp32": "original, ONNX Runtime fp32", "ort": "artifact, ONNX Runtime"}
    present = [k for k in names if f"{k}_per_step_ms" in lat]
    base = "ort_fp32" if "ort_fp32" in present else "torch"
    lines = [f"| | per step | end to end | speedup vs {names[base]} |", "|---|---|---|---|"]
    for k in present:
        step, e2e = lat[f"{k}_per_step_ms"], lat[f"{k}_end_to_end_ms"]
        ratio = lat[f"{base}_per_step_ms"] / step, lat[f"{base}_end_to_end_ms"] / e2e
        lines.append(f"| {names[k]} | {step:.2f} | {e2e:.2f} | {ratio[0]:.2f}x / {ratio[1]:.2f}x |")
    if device == "cuda" and lat.get("providers", ["CPUExecutionProvider"])[0] == "CPUExecutionProvider":
        lines += [
            "",
            "The target is a GPU but no GPU provider was present: these are CPU timings of the Q/DQ graph"
            " (numerics verified, speed not representative).",
        ]
    return lines


def _flops(report: dict[str, Any]) -> list[str]:
    f = report.get("flops")
    if not f:
        return []
    before, after = f["original"], f["candidate"]
    return [
        f"- denoiser FLOPs per image: {after['per_image'] / 1e9:.3f} G in {after['network_evaluations']} network"
        f" evaluations (original: {before['per_image'] / 1e9:.3f} G in {before['network_evaluations']};"
        f" {before['per_image'] / after['per_image']:.2f}x fewer)"
    ]


def write_report(
    folder: Path, report: dict[str, Any], gate_results: list[GateResult], sections: Sequence[str] = ()
) -> None:
    as_json, as_markdown = REPORT_FILES
    write_json(folder / as_json, json_safe(report))
    text = markdown(report, gate_results, list(sections))
    write_atomic(folder / as_markdown, lambda tmp: tmp.write_text(text))


def _conditioning(model: dict[str, Any]) -> str:
    cond = model["conditioning"]
    if cond.get("text"):
        tensors = ", ".join(f"{t['name']} {list(t['shape'])}" for t in cond["text"])
        uncond = model.get("stages", {}).get("unconditional") or "the empty prompt"
        return f"text ({tensors}); unconditional branch: {uncond}"
    if cond["num_classes"]:
        return f"{cond['num_classes']} classes, null class {cond['null_class']}"
    return "none"


def _torch_words(model: dict[str, Any]) -> str:
    """Where the reference ran: "torch", or with its --dtype / --device where they are not fp32 on cpu."""
    placed = model.get("placement") or {"device": "cpu", "dtype": "fp32"}
    if placed == {"device": "cpu", "dtype": "fp32"}:
        return "torch"
    return f"torch {placed['dtype']} on {placed['device']}"


def _conditions(model: dict[str, Any]) -> str:
    return "prompts" if model["conditioning"].get("text") else "classes"


def _stage_lines(model: dict[str, Any], artifacts: dict[str, Any]) -> list[str]:
    """The stages around the denoiser (latent pipelines): lowered beside it, not optimized."""
    stages = model.get("stages") or {}
    if not stages.get("text_encoders") and not stages.get("vae"):
        return ["- output: pixels (no VAE); fidelity is measured on the model's samples"]
    return [
        f"- stages: text encoders {', '.join(stages['text_encoders']) or 'none'}"
        f" ({stages['text_encoder_parameters']:,} parameters), VAE {stages['vae'] or 'none'};"
        f" lowered as {', '.join(artifacts.get('stages', []))} ({artifacts.get('stage_bytes', 0):,} B), not optimized",
        f"- output: {stages['output']}; fidelity measured on decoded images; prompt set: {stages['prompts']} prompts",
    ]


def _seed_sets_words(v: dict[str, Any], evaluation: dict[str, Any]) -> str:
    """Which seed sets the distribution metrics pool (verify.seed_sets)."""
    sets, n, seed = v.get("seed_sets", 1), v["samples"], evaluation["base_seed"]
    if sets < 2:
        return "Seed sets: one (seeds from the first evaluation seed); the shifts' seed noise is not measured."
    prefixes = [k.removesuffix("_shift_sets") for k in v if k.endswith("_shift_sets")]
    shifts = []
    for p in prefixes:
        ci = v.get(f"{p}_shift_ci")
        shown = "n/a" if ci is None else f"+- {ci:.2g}"
        shifts.append(f"{p} {', '.join(f'{x:.3g}' for x in v[f'{p}_shift_sets'])} (95% interval of the mean {shown})")
    open_ = v.get("seed_sets_within_noise") or []
    return (
        f"Seed sets: the distribution metrics are means over {sets} disjoint sets of {n} seeds (set k: seeds"
        f" {seed} + k x {n} onward, each with its own floor set), drawn while a distribution gate's bound lay inside"
        " the mean shift's 95% confidence interval (Student's t over the sets; at least 2, the fewest that measure"
        f" the seed noise); paired and adherence metrics are the first set's. Shift per set: {'; '.join(shifts)}."
        + (
            f" The bound is still inside the interval after the last set (decided by the mean): {', '.join(open_)}."
            if open_
            else ""
        )
    )
