"""plan.json: everything a runner needs to execute the loop around the exported graphs."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from core.errors import ConfigError, LoadError, one_line
from core.fileio import recorded_file, sha256_files, write_json
from core.ir import (
    IMAGE_AXES,
    Chunking,
    Conditioning,
    DiffusionProgram,
    ModelSpec,
    Normalization,
    SamplingPlan,
    check_sample_axes,
)
from core.limits import MAX_SAMPLE_ELEMENTS, MAX_STEPS
from core.outputs import PLAN_FILE, PLAN_FORMAT, PLAN_VERSIONS, resolve
from core.sampling import uses_guidance
from core.schedulers import build_scheduler
from core.validate import get, integer, is_int, of_type, read_json_object, string_list

from .onnx_export import LOOP_INPUTS, data_file
from .pipeline_stages import read_stages

FORMAT = PLAN_FORMAT
VERSION = PLAN_VERSIONS[-1]  # 2: per-step graph variants with carried tensors (v1 files still load)


@dataclasses.dataclass(frozen=True)
class GraphFile:
    path: Path
    inputs: list[str]
    outputs: list[str]


def sha256(path: Path) -> str:
    return sha256_files([path])


def graph_files(path: Path) -> dict[str, Any]:
    """plan.json's record of a graph file: its name and sha256, and its weights file's when it has one."""
    entry: dict[str, Any] = {"file": path.name, "sha256": sha256(path)}
    data = data_file(path)
    if data.exists():
        entry["data"] = {"file": data.name, "sha256": sha256(data)}
    return entry


def graph_bytes(path: Path) -> int:
    data = data_file(path)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def plan_document(
    program: DiffusionProgram,
    graphs: dict[str, GraphFile],
    backend: dict[str, Any],
    stages: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Describe the loop: scheduler, resolved timesteps, guidance, and which graph runs at each step,
    with the tensors it reads from and writes to the carry (the loop keeps the latest of each); and the
    pipeline's stages around it (prompt encoder, decoder; see pipeline_stages)."""
    plan = program.plan
    timesteps = [float(t) for t in build_scheduler(plan).timesteps]
    guided = uses_guidance(plan, program.spec.conditioning)
    fed = (*LOOP_INPUTS, *program.spec.conditioning.input_names)
    steps = []
    for i, t in enumerate(timesteps):
        graph = graphs[plan.variant(i)]
        reads = [n for n in graph.inputs if n not in fed]
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
        "backend": dict(backend),  # which backend runs the graphs, with its options
        "model": {
            "family": program.spec.family,
            "class": program.spec.model_class,
            "source": dataclasses.asdict(program.source),
            "fingerprint": program.fingerprint(),
        },
        "sample_shape": list(program.spec.sample_shape),
        "sample_axes": list(program.spec.sample_axes),
        "output": _output(program.spec, stages),
        **_policy(program),
        "stages": dict(stages or {}),
        "conditioning": program.spec.conditioning.to_dict(),
        "sampling": plan.to_dict(),
        "timesteps": timesteps,
        "guidance": {
            "scale": plan.guidance_scale,
            "enabled": guided,
            "batch": "[cond, uncond] concatenated on the batch axis" if guided else None,
            "unguided_steps": "cond half only; carried tensors from a guided step are cut to their cond half",
        },
        "graphs": {
            name: {**graph_files(g.path), "inputs": g.inputs, "outputs": g.outputs} for name, g in graphs.items()
        },
        "steps": steps,
    }


def _output(spec: ModelSpec, stages: dict[str, Any] | None) -> dict[str, Any]:
    """What a final sample becomes: an image (decoded first by a latent pipeline), or the sample
    un-normalized (a policy's actions), or the sample as is."""
    if spec.output_normalization is not None:
        norm = spec.output_normalization
        return {"space": "normalized", "to_output": "x * spread + center", **dataclasses.asdict(norm)}
    if not spec.image_like:
        return {"space": "model", "to_output": "x"}
    space = "latent (decoder.onnx -> [-1, 1])" if stages and "decoder" in stages else "model ([-1, 1])"
    return {"space": space, "to_image": "clamp(x / 2 + 0.5, 0, 1)"}


def write_plan(folder: Path, document: dict[str, Any]) -> Path:
    path = folder / PLAN_FILE
    write_json(path, document)
    return path


def record_files(folder: Path, names: list[str]) -> None:
    """List more of the artifact's files (TensorRT engines, the calibration set) with their sha256 under
    plan.json's `files`: every file we write is recorded; a reader checks one before it loads it."""
    path = folder / PLAN_FILE
    doc = read_json_object(path, LoadError, PLAN_FILE)
    doc["files"] = {**doc.get("files", {}), **{name: sha256(folder / name) for name in names}}
    write_plan(folder, doc)


def record_original_loop(folder: Path, plan: SamplingPlan) -> None:
    """The original's sampling plan, against which the job verified and timed the artifact (`optimize bench`
    times the same baseline: the original network on its own loop, not on the artifact's)."""
    path = folder / PLAN_FILE
    doc = read_json_object(path, LoadError, PLAN_FILE)
    doc["model"]["original_sampling"] = plan.to_dict()
    write_plan(folder, doc)


def original_loop(doc: dict[str, Any], where: str) -> SamplingPlan | None:
    """plan.json's record of the original's loop (None in artifacts that predate it), every field checked."""
    data = doc.get("model", {}).get("original_sampling")
    if data is None:
        return None
    try:
        plan = SamplingPlan.from_dict(of_type(data, dict, f"{where}: model.original_sampling", LoadError))
        build_scheduler(plan)
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise LoadError(f"{where}: invalid model.original_sampling ({one_line(str(exc))})") from None
    return plan


def recorded_files(doc: dict[str, Any], where: str) -> dict[str, str]:
    """plan.json's `files` ({name: sha256}), its shape checked (the files are hashed where they are loaded)."""
    files = get(doc, "files", dict, where, {}, error=LoadError)
    for name, digest in files.items():
        if Path(name).name != name or name in ("", ".", "..") or not _is_sha256(digest):
            raise LoadError(f"{where}: files lists {name!r}, which is not a file name with its sha256")
    return files


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclasses.dataclass(frozen=True)
class LoadedPlan:
    folder: Path
    document: dict[str, Any]
    sampling: SamplingPlan
    conditioning: Conditioning
    sample_shape: tuple[int, ...]
    backend: dict[str, Any]  # the backend that built it, with its options (v2 plans before it: onnxruntime)
    stages: dict[str, Any]  # the prompt encoder and decoder graphs, checked like the denoiser's
    sample_axes: tuple[str, ...] = IMAGE_AXES
    output_normalization: Normalization | None = None  # final samples un-normalized by it (a policy's actions)
    chunking: Chunking | None = None  # a policy's (which actions of a chunk it executes)
    environment: str | None = None  # where a policy acts (core.environments)

    def graph_path(self, name: str) -> Path:
        """The graph file, which read_plan checked to be a regular file inside the folder with its digest."""
        return self.folder / self.document["graphs"][name]["file"]


def read_plan(folder: Path, files: bool = True) -> LoadedPlan:
    """Read and check plan.json completely: a runner then reads nothing outside `folder`, and only
    graphs whose sha256 matches what the plan recorded. `files=False`: the graphs are elsewhere (a serving
    pipeline calls them as models), so only their recorded inputs and outputs are checked."""
    check = _check_graph if files else _check_io
    folder = resolve(folder, "artifact")
    path = folder / PLAN_FILE
    if not path.is_file():
        raise LoadError(f"{folder}: no {PLAN_FILE} (is this an `optimize` output folder?)")
    if path.is_symlink():
        raise LoadError(f"{path} is a link; an artifact's files are read only from inside its folder")
    doc = read_json_object(path, LoadError, PLAN_FILE)
    where = str(path)
    if doc.get("format") != FORMAT or doc.get("version") not in PLAN_VERSIONS:
        raise LoadError(f"{path}: not a {FORMAT} v1 or v{VERSION} file")
    backend = get(doc, "backend", dict, where, {"name": "onnxruntime"}, error=LoadError)
    get(backend, "name", str, f"{where}: backend", error=LoadError)
    string_list(backend.get("providers", []), f"{where}: backend.providers", LoadError)
    graphs = get(doc, "graphs", dict, where, error=LoadError)
    if not graphs:
        raise LoadError(f"{where}: lists no graphs")
    for name, graph in graphs.items():
        check(folder, name, of_type(graph, dict, f"{where}: graphs.{name}", LoadError), where)
    try:
        sampling = SamplingPlan.from_dict(get(doc, "sampling", dict, where, error=LoadError))
        integer(sampling.num_inference_steps, "num_inference_steps", 1, MAX_STEPS, LoadError)
        resolved = [float(t) for t in build_scheduler(sampling).timesteps]
        conditioning = Conditioning.from_dict(get(doc, "conditioning", dict, where, error=LoadError))
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise LoadError(f"{where}: invalid sampling plan or conditioning ({one_line(str(exc))})") from None
    _check_conditioning(graphs, conditioning, sampling, where)
    shape, axes, output = _sample(doc, where)
    if resolved != doc.get("timesteps"):
        raise LoadError(f"{where}: this diffusers version resolves different timesteps than the plan records")
    steps = get(doc, "steps", list, where, error=LoadError)
    if len(steps) != len(resolved):
        raise LoadError(f"{where}: {len(steps)} steps listed for a plan of {len(resolved)} model calls")
    for i, step in enumerate(steps):
        graph = of_type(step, dict, f"{where}: steps[{i}]", LoadError).get("graph")
        if graph != sampling.variant(i) or graph not in graphs:
            raise LoadError(f"{where}: step {i} names graph {graph!r}, which the plan does not provide")
    recorded_files(doc, where)
    stages = read_stages(doc, folder, where, check)
    if conditioning.text and "prompt_encoder" not in stages:
        raise LoadError(f"{where}: a text-conditioned plan needs its prompt encoder stage")
    chunking, environment = _read_policy(doc, where)
    return LoadedPlan(folder, doc, sampling, conditioning, shape, backend, stages, axes, output, chunking, environment)


def _policy(program: DiffusionProgram) -> dict[str, Any]:
    """A policy's chunking and environment (plan.json's `policy`; absent for other models)."""
    chunking = program.spec.chunking
    if chunking is None:
        return {}
    steps = {"n_obs_steps": chunking.n_obs_steps, "n_action_steps": chunking.n_action_steps}
    return {"policy": {**steps, "first_action": chunking.first, "environment": program.stages.environment}}


def _read_policy(doc: dict[str, Any], where: str) -> tuple[Chunking | None, str | None]:
    policy = get(doc, "policy", (dict, type(None)), where, None, error=LoadError)
    if policy is None:
        return None, None
    here = f"{where}: policy"
    n_obs = integer(policy.get("n_obs_steps"), f"{here}.n_obs_steps", 1, 64, LoadError)
    n_act = integer(policy.get("n_action_steps"), f"{here}.n_action_steps", 1, 4096, LoadError)
    environment = get(policy, "environment", (str, type(None)), here, None, error=LoadError)
    try:
        return Chunking(n_obs, n_act), environment
    except ConfigError as exc:
        raise LoadError(f"{here}: {exc}") from None


def _sample(doc: dict[str, Any], where: str) -> tuple[tuple[int, ...], tuple[str, ...], Normalization | None]:
    """The sample's shape and axis names (plans before named axes hold images: channels, height, width),
    and the normalization the output stage undoes."""
    shape = get(doc, "sample_shape", list, where, error=LoadError)
    axes = get(doc, "sample_axes", list, where, list(IMAGE_AXES), error=LoadError)
    if not all(is_int(d) and 0 < d <= 65536 for d in shape):
        raise LoadError(f"{where}: sample_shape must be positive integers, got {shape!r}")
    if math.prod(shape) > MAX_SAMPLE_ELEMENTS:
        raise LoadError(f"{where}: sample_shape {shape} has over {MAX_SAMPLE_ELEMENTS:,} elements per sample")
    output = get(doc, "output", dict, where, {}, error=LoadError)
    try:
        check_sample_axes(tuple(shape), tuple(axes), f"{where}: sample_shape")
        normalized = output.get("space") == "normalized"
        norm = Normalization.from_dict(output, f"{where}: output") if normalized else None
        if norm is not None:
            norm.check_fits(tuple(shape), f"{where}: output")
    except ConfigError as exc:
        raise LoadError(str(exc)) from None
    return tuple(shape), tuple(axes), norm


def _check_conditioning(graphs: dict[str, Any], conditioning: Conditioning, sampling: SamplingPlan, where: str) -> None:
    """Every graph takes (sample, timestep, the conditioning's tensors in order, carried tensors...), and
    the null class of guidance follows the real classes."""
    fed = [*LOOP_INPUTS, *conditioning.input_names]
    for name, graph in graphs.items():
        inputs = graph["inputs"]
        if inputs[: len(fed)] != fed or "class_labels" in inputs[len(fed) :]:
            raise LoadError(f"{where}: graph '{name}' inputs {inputs} do not match the conditioning ({fed} first)")
        if not graph["outputs"]:
            raise LoadError(f"{where}: graph '{name}' has no output")
    null = conditioning.null_class
    if uses_guidance(sampling, conditioning) and null is not None and null < conditioning.num_classes:
        raise LoadError(f"{where}: conditioning.null_class {null} is one of the {conditioning.num_classes} classes")


def _check_graph(folder: Path, name: str, graph: dict[str, Any], where: str) -> None:
    """A bare file name, a regular file (no symlink) directly in `folder`, the recorded sha256; external
    data only in the weights file recorded beside it (`data`: `<file>.data`, its own sha256)."""
    path = _checked_file(folder, name, graph, where)
    _check_io(folder, name, graph, where)
    data = get(graph, "data", (dict, type(None)), f"{where}: graphs.{name}", None, LoadError)
    allowed = None
    if data is not None:
        allowed = _checked_file(folder, f"{name} weights", data, where).name
        if allowed != data_file(path).name:
            raise LoadError(f"{where}: graph '{name}' weights file must be {data_file(path).name}, not {allowed}")
    _check_external_data(path, allowed)


def _check_io(folder: Path, name: str, graph: dict[str, Any], where: str) -> None:
    string_list(get(graph, "inputs", list, f"{where}: graphs.{name}", error=LoadError), "inputs", LoadError)
    string_list(get(graph, "outputs", list, f"{where}: graphs.{name}", error=LoadError), "outputs", LoadError)


def _checked_file(folder: Path, name: str, entry: dict[str, Any], where: str) -> Path:
    file = get(entry, "file", str, f"{where}: graphs.{name}", error=LoadError)
    return recorded_file(folder, file, entry.get("sha256"), f"{where}: graph '{name}'")


def _check_external_data(path: Path, allowed: str | None) -> None:
    """A graph that points at external data files could read any file on the machine: its tensors may
    only refer to `allowed`, the checked weights file beside it (None: no external data at all)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError
        raise LoadError(f"{path}: not a readable ONNX graph ({one_line(str(exc), 200)})") from None
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
            location = {e.key: e.value for e in tensor.external_data}.get("location")
            if allowed is None or location != allowed:
                raise LoadError(f"{path}: tensor '{tensor.name}' refers to external data; refusing to run it")


def _all_tensors(graph: Any) -> Any:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)
