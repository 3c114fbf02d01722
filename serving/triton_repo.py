"""Export an `optimize` output as a Triton model repository.

One model per graph of the plan (denoiser variants, prompt encoder, decoder), either `onnxruntime_onnx`
(a server with the ONNX Runtime backend), a Python-backend model running the graph with onnxruntime
(`graphs="python"`: servers without that backend, such as the one in the nvidia-pytriton wheel), or, for
the denoiser graphs of a TensorRT artifact whose engines were built, `tensorrt_plan` (`graphs="tensorrt"`;
the engines only run on the GPU model and TensorRT version that built them); and a
Python-backend `pipeline` model that runs the plan (scheduler, guidance, cache carry-over between the
graph variants, decoder) through BLS calls to them, with dynamic batching of one-image requests; for a
policy's artifact the `pipeline` model takes one decision's observations and returns the action chunk.
The pipeline model needs this package, torch and diffusers in the server's Python environment.
"""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx

from backends.onnx_export import data_file
from backends.plan import read_plan
from backends.trt_files import engine_path
from core.errors import ConfigError
from core.outputs import check_out_dir, input_paths

MODELS = Path(__file__).parent / "triton_models"
TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}
PIPELINE = "pipeline"
GRAPHS = ("onnxruntime", "python", "tensorrt")


def _tensor_lines(kind: str, values: list[tuple[str, str, list[int]]]) -> list[str]:
    lines = [f"{kind} ["]
    for i, (name, dtype, dims) in enumerate(values):
        comma = "," if i < len(values) - 1 else ""
        lines.append(f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ] }}{comma}')
    return [*lines, "]"]


def _graph_config(name: str, model: onnx.ModelProto, platform: str, instances: int) -> str:
    """Full tensors with their batch dimension (-1): the pipeline model batches the requests itself."""

    def io(values):
        out = []
        for v in values:
            dims = [d.dim_value if d.dim_value > 0 else -1 for d in v.type.tensor_type.shape.dim]
            if v.type.tensor_type.elem_type not in TYPES:
                raise ConfigError(f"{name}: tensor '{v.name}' has a type Triton configs here do not map")
            out.append((v.name, TYPES[v.type.tensor_type.elem_type], dims))
        return out

    head = [f'name: "{name}"', 'backend: "python"' if platform == "python" else f'platform: "{platform}"']
    lines = [*head, "max_batch_size: 0", *_tensor_lines("input", io(model.graph.input))]
    lines += _tensor_lines("output", io(model.graph.output))
    kind = "KIND_GPU" if platform == "tensorrt_plan" else "KIND_CPU"
    lines += [f"instance_group [ {{ kind: {kind} count: {instances} }} ]"]
    return "\n".join(lines) + "\n"


def _pipeline_config(plan: Any, max_batch: int, instances: int, delay_us: int) -> str:
    channels, height, width = plan.sample_shape
    inputs = [("seed", "TYPE_INT64", [1])]
    if plan.conditioning.text:
        inputs.append(("prompt", "TYPE_STRING", [1]))
    elif plan.conditioning.num_classes:
        inputs.append(("class_label", "TYPE_INT64", [1]))
    image = [-1, -1, -1]  # a latent pipeline decodes to another size
    lines = [f'name: "{PIPELINE}"', 'backend: "python"', f"max_batch_size: {max_batch}"]
    lines += _tensor_lines("input", inputs)
    lines += _tensor_lines(
        "output", [("image", "TYPE_UINT8", image), ("latents", "TYPE_FP32", [channels, height, width])]
    )
    lines += [f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}"]
    lines += [f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]"]
    return "\n".join(lines) + "\n"


def _policy_config(plan: Any, max_batch: int, delay_us: int) -> str:
    """One decision of one episode per request: seed, episode, decision and the observation history in, the
    action chunk out. One instance: it keeps the episodes' last chunks (warm starts)."""
    inputs = [(name, "TYPE_INT64", [1]) for name in ("seed", "episode", "decision")]
    inputs += [(c.name, "TYPE_FP32", list(c.shape)) for c in plan.conditioning.observation]
    lines = [f'name: "{PIPELINE}"', 'backend: "python"', f"max_batch_size: {max_batch}"]
    lines += _tensor_lines("input", inputs)
    lines += _tensor_lines("output", [("action", "TYPE_FP32", list(plan.sample_shape))])
    lines += [f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}"]
    lines += ["instance_group [ { kind: KIND_CPU count: 1 } ]"]
    return "\n".join(lines) + "\n"


def export_repository(
    artifact: Path,
    repo: Path,
    graphs: str = "python",
    max_batch: int = 8,
    instances: int = 1,
    delay_us: int = 2000,
) -> dict[str, Any]:
    """Write the repository into `repo` (which must not exist, nor be in or over the artifact; written
    beside it, then renamed)."""
    if graphs not in GRAPHS:
        raise ConfigError(f"graphs must be one of {', '.join(GRAPHS)}, not {graphs!r}")
    if not 1 <= max_batch <= 1024 or not 1 <= instances <= 64:
        raise ConfigError("max_batch must be in 1..1024 and instances in 1..64")
    if repo.exists() or repo.is_symlink():
        raise ConfigError(f"{repo} exists; choose a new folder for the repository")
    check_out_dir(repo, input_paths(Path(artifact)), overwrite=False, flag="--repo")
    plan = read_plan(artifact)
    if plan.backend.get("name") not in ("onnxruntime", "tensorrt"):
        raise ConfigError(f"{artifact}: built for backend {plan.backend.get('name')!r}; export needs its ONNX graphs")
    entries = {**plan.document["graphs"], **plan.stages}
    models = {entry["file"]: Path(entry["file"]).stem for entry in entries.values()}
    engines = {g["file"]: engine_path(plan.folder / g["file"]) for g in plan.document["graphs"].values()}
    if graphs == "tensorrt" and not all(p.is_file() for p in engines.values()):
        raise ConfigError(
            f"{artifact}: no TensorRT engines beside its graphs (built by the tensorrt backend only where "
            "TensorRT and a GPU exist; see the report's TensorRT section); export --graphs onnxruntime instead"
        )

    repo.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{repo.name}.", dir=repo.parent))
    try:
        for file, name in models.items():
            version = tmp / name / "1"
            version.mkdir(parents=True)
            source = plan.folder / file
            model = onnx.load(str(source), load_external_data=False)
            if graphs == "tensorrt" and file in engines:
                shutil.copy2(engines[file], version / "model.plan")
                platform = "tensorrt_plan"
            else:
                shutil.copy2(source, version / "model.onnx")
                if data_file(source).exists():  # weights beside a large graph keep their recorded name
                    shutil.copy2(data_file(source), version / data_file(source).name)
                platform = "python" if graphs == "python" else "onnxruntime_onnx"
            if platform == "python":
                shutil.copy2(MODELS / "graph_model.py", version / "model.py")
            (tmp / name / "config.pbtxt").write_text(_graph_config(name, model, platform, instances))
        version = tmp / PIPELINE / "1"
        (version / "artifact").mkdir(parents=True)
        shutil.copy2(plan.folder / "plan.json", version / "artifact" / "plan.json")
        for tokenizer in plan.stages.get("prompt_encoder", {}).get("tokenizers", []):
            (version / "artifact" / tokenizer["folder"]).mkdir()
            for file in tokenizer["files"]:  # read_plan checked them: regular files, their recorded sha256
                name = Path(tokenizer["folder"]) / file
                shutil.copyfile(plan.folder / name, version / "artifact" / name, follow_symlinks=False)
        (version / "artifact" / "models.json").write_text(json.dumps(models, indent=1))
        if plan.chunking is not None:  # a policy: observations in, action chunks out
            shutil.copy2(MODELS / "policy_model.py", version / "model.py")
            config = _policy_config(plan, max_batch, delay_us)
        else:
            shutil.copy2(MODELS / "pipeline_model.py", version / "model.py")
            config = _pipeline_config(plan, max_batch, instances, delay_us)
        (tmp / PIPELINE / "config.pbtxt").write_text(config)
        tmp.rename(repo)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # shutil names the source file; the full disk is the repo's
            raise OSError(exc.errno, exc.strerror, str(repo)) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"repository": str(repo), "models": [*models.values(), PIPELINE], "graphs": graphs}
