"""plan.json: everything a runner needs to execute the loop around the exported graphs."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from optimizer.errors import LoadError
from optimizer.fileio import write_json
from optimizer.ir import Conditioning, DiffusionProgram, SamplingPlan
from optimizer.sampling import build_scheduler, uses_guidance

from .ort import STANDARD_INPUTS

FORMAT = "diffusion-plan"
VERSION = 2  # 2: per-step graph variants with carried tensors (v1 files still load)
PLAN_FILE = "plan.json"


@dataclasses.dataclass(frozen=True)
class GraphFile:
    path: Path
    inputs: list[str]
    outputs: list[str]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plan_document(program: DiffusionProgram, graphs: dict[str, GraphFile]) -> dict[str, Any]:
    """Describe the loop: scheduler, resolved timesteps, guidance, and which graph runs at each step,
    with the tensors it reads from and writes to the carry (the loop keeps the latest of each)."""
    plan = program.plan
    timesteps = [float(t) for t in build_scheduler(plan).timesteps]
    guided = uses_guidance(plan, program.spec.conditioning)
    steps = []
    for i, t in enumerate(timesteps):
        graph = graphs[plan.variant(i)]
        reads = [n for n in graph.inputs if n not in STANDARD_INPUTS]
        steps.append(
            {
                "index": i,
                "timestep": t,
                "graph": plan.variant(i),
                "guidance": guided and plan.guided(i),
                "reads": reads,
                "writes": graph.outputs[1:],
            }
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": {
            "family": program.spec.family,
            "class": program.spec.model_class,
            "source": dataclasses.asdict(program.source),
            "fingerprint": program.fingerprint(),
        },
        "sample_shape": list(program.spec.sample_shape),
        "output": {"space": "model ([-1, 1])", "to_image": "clamp(x / 2 + 0.5, 0, 1)"},
        "conditioning": dataclasses.asdict(program.spec.conditioning),
        "sampling": plan.to_dict(),
        "timesteps": timesteps,
        "guidance": {
            "scale": plan.guidance_scale,
            "enabled": guided,
            "batch": "[cond, uncond] concatenated on the batch axis" if guided else None,
            "unguided_steps": "cond half only; carried tensors from a guided step are cut to their cond half",
        },
        "graphs": {
            name: {"file": g.path.name, "sha256": sha256(g.path), "inputs": g.inputs, "outputs": g.outputs}
            for name, g in graphs.items()
        },
        "steps": steps,
    }


def write_plan(folder: Path, document: dict[str, Any]) -> Path:
    path = folder / PLAN_FILE
    write_json(path, document)
    return path


@dataclasses.dataclass(frozen=True)
class LoadedPlan:
    folder: Path
    document: dict[str, Any]
    sampling: SamplingPlan
    conditioning: Conditioning
    sample_shape: tuple[int, int, int]

    def graph_path(self, name: str) -> Path:
        return self.folder / self.document["graphs"][name]["file"]


def read_plan(folder: Path) -> LoadedPlan:
    from optimizer.loading import read_json

    path = folder / PLAN_FILE
    if not path.exists():
        raise LoadError(f"{folder}: no {PLAN_FILE} (is this an `optimize` output folder?)")
    doc = read_json(path)
    if doc.get("format") != FORMAT or doc.get("version") not in (1, VERSION):
        raise LoadError(f"{path}: not a {FORMAT} v1 or v{VERSION} file")
    for name, graph in doc["graphs"].items():
        if not (folder / graph["file"]).exists():
            raise LoadError(f"{path}: graph '{name}' file {graph['file']} is missing")
    try:
        sampling = SamplingPlan.from_dict(doc["sampling"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LoadError(f"{path}: invalid sampling plan ({exc})") from exc
    resolved = [float(t) for t in build_scheduler(sampling).timesteps]
    if resolved != doc["timesteps"]:
        raise LoadError(f"{path}: this diffusers version resolves different timesteps than the plan records")
    for i, step in enumerate(doc["steps"]):
        if step["graph"] != sampling.variant(i) or step["graph"] not in doc["graphs"]:
            raise LoadError(f"{path}: step {i} names graph '{step['graph']}', which the plan does not provide")
    return LoadedPlan(folder, doc, sampling, Conditioning(**doc["conditioning"]), tuple(doc["sample_shape"]))
