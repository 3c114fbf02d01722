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

from .onnx_export import OUTPUT_NAME

FORMAT = "diffusion-plan"
VERSION = 1
PLAN_FILE = "plan.json"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plan_document(program: DiffusionProgram, graphs: dict[str, Path], inputs: list[str]) -> dict[str, Any]:
    """Describe the loop: scheduler, resolved timesteps, guidance, and which graph runs at each step."""
    timesteps = [float(t) for t in build_scheduler(program.plan).timesteps]
    guided = uses_guidance(program.plan, program.spec.conditioning)
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
        "sampling": program.plan.to_dict(),
        "timesteps": timesteps,
        "guidance": {
            "scale": program.plan.guidance_scale,
            "enabled": guided,
            "batch": "[cond, uncond] concatenated on the batch axis" if guided else None,
        },
        "graphs": {
            name: {"file": path.name, "sha256": sha256(path), "inputs": inputs, "outputs": [OUTPUT_NAME]}
            for name, path in graphs.items()
        },
        "steps": [
            {"index": i, "timestep": t, "graph": "denoiser", "guidance": guided} for i, t in enumerate(timesteps)
        ],
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
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise LoadError(f"{path}: not a {FORMAT} v{VERSION} file")
    for name, graph in doc["graphs"].items():
        if not (folder / graph["file"]).exists():
            raise LoadError(f"{path}: graph '{name}' file {graph['file']} is missing")
    sampling = SamplingPlan.from_dict(doc["sampling"])
    resolved = [float(t) for t in build_scheduler(sampling).timesteps]
    if resolved != doc["timesteps"]:
        raise LoadError(f"{path}: this diffusers version resolves different timesteps than the plan records")
    if any(step["graph"] != "denoiser" for step in doc["steps"]):
        raise LoadError(f"{path}: per-step graph variants are not supported by this runner version")
    return LoadedPlan(folder, doc, sampling, Conditioning(**doc["conditioning"]), tuple(doc["sample_shape"]))
