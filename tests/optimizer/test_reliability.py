"""Issue 12: hostile and careless input. Every case gets its documented exit code and one line on stderr;
no input file changes (sha256 before and after); nothing is left beside --out; a runner reads nothing
outside its artifact folder."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from core import limits, outputs
from core.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, LoadError
from core.footprint import footprint
from optimizer.cli import main
from zoo import SHIPPED

FAST = ["--samples", "2", "--calibration-samples", "1", "--latency-repeats", "0"]
DOCUMENTED_MACHINE = 24 << 30  # the 2-core, 24 GiB machine the issue was filed on


@dataclass
class Workspace:
    """A copy of a checkpoint (weights + sidecar; the shipped DiT unless `source` names another, e.g. the tiny
    DiT where a job runs to its end) in `root/model/`; outputs go under `root/outs/`."""

    root: Path
    monkeypatch: pytest.MonkeyPatch
    source: Path = SHIPPED["dit"]
    model: Path = field(init=False)
    outs: Path = field(init=False)

    def __post_init__(self) -> None:
        (self.root / "model").mkdir()
        self.outs = self.root / "outs"
        self.outs.mkdir()
        for src in (self.source, self.source.with_suffix(".json")):
            shutil.copy(src, self.root / "model" / src.name)
        self.model = self.root / "model" / self.source.name

    @property
    def sidecar(self) -> Path:
        return self.model.with_suffix(".json")

    @property
    def out(self) -> Path:
        return self.outs / "result"

    def edit_sidecar(self, edit: Callable[[dict], None]) -> Path:
        meta = json.loads(self.sidecar.read_text())
        edit(meta)
        self.sidecar.write_text(json.dumps(meta))
        return self.model

    def edit_config(self, **changes: object) -> Path:
        return self.edit_sidecar(lambda meta: meta["model"]["config"].update(changes))

    def target(self, edit: Callable[[dict], None] | None = None, text: str | bytes | None = None) -> Path:
        path = self.root / "target.json"
        if text is None:
            data = json.loads((Path(__file__).parents[2] / "optimizer/targets/cpu-fp32.json").read_text())
            data["name"] = "mine"
            if edit:
                edit(data)
            text = json.dumps(data)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def diffusers_folder(self) -> Path:
        """The same DiT as a diffusers `save_pretrained` folder (config.json + safetensors)."""
        folder = self.root / "dit-diffusers"
        folder.mkdir()
        config = {"_class_name": "DiTTransformer2DModel", **json.loads(self.sidecar.read_text())["model"]["config"]}
        (folder / "config.json").write_text(json.dumps(config))
        shutil.copy(self.model, folder / "diffusion_pytorch_model.safetensors")
        return folder

    def artifact(self, built: Path) -> Path:
        folder = self.root / "artifact"
        shutil.copytree(built, folder)
        return folder

    def inputs(self) -> dict[str, str]:
        """sha256 of every file under root except outs/ (inputs, targets, artifacts)."""
        files = [p for p in sorted(self.root.rglob("*")) if p.is_file() and self.outs not in p.parents]
        return {str(p.relative_to(self.root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def built_artifact(tmp_path_factory, tiny_digits_program) -> Path:
    """An artifact of ours (the tiny DiT lowered by cpu-fp32's backend): what --out may replace."""
    from helpers import lower

    folder = tmp_path_factory.mktemp("artifact")
    lower(tiny_digits_program, folder)
    return folder


def edit_plan(artifact: Path, edit: Callable[[dict], None]) -> Path:
    plan = json.loads((artifact / "plan.json").read_text())
    edit(plan)
    (artifact / "plan.json").write_text(json.dumps(plan))
    return artifact


def set_graph_file(artifact: Path, file: str) -> Path:
    return edit_plan(artifact, lambda plan: plan["graphs"]["denoiser"].update(file=file))


def swap_graph(artifact: Path) -> Path:
    data = bytearray((artifact / "denoiser.onnx").read_bytes())
    data[-100] ^= 0xFF  # a different graph under the recorded name
    (artifact / "denoiser.onnx").write_bytes(bytes(data))
    return artifact


def graph_with_external_data(artifact: Path) -> Path:
    """A graph whose first initializer points at a file outside the folder, with an honest digest."""
    from backends.plan import sha256

    (artifact.parent / "secret.bin").write_bytes(b"\0" * 4096)
    model = onnx.load(str(artifact / "denoiser.onnx"))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        tensor.external_data.add(key=key, value=value)
    onnx.save(model, str(artifact / "denoiser.onnx"))
    digest = sha256(artifact / "denoiser.onnx")
    return edit_plan(artifact, lambda plan: plan["graphs"]["denoiser"].update(sha256=digest))


def graph_symlink_outside(artifact: Path) -> Path:
    outside = artifact.parent / "outside.onnx"
    shutil.move(artifact / "denoiser.onnx", outside)
    (artifact / "denoiser.onnx").symlink_to(outside)
    return artifact


def forged_calibration(ws: Workspace) -> Path:
    """A capture of this very model and plan (so the fingerprint matches) with its step tensors cut short."""
    from calibration import capture as calib
    from core.loading import load_program

    traj = calib.capture(load_program(ws.model), [0], [1])
    path = ws.root / "forged.safetensors"
    calib.save(dataclasses.replace(traj, x=traj.x[:3], output=traj.output[:3]), path)
    return path


def poisoned_weights(value: float, dtype: torch.dtype | None = None) -> Callable[[Workspace], list]:
    def build(ws: Workspace) -> list:
        state = load_file(str(ws.model))
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        key = next(k for k in state if k.endswith("weight"))
        state[key].view(-1)[3] = value
        save_file(state, str(ws.model))
        return [ws.model, "--out", ws.out, *FAST]

    return build


def pipeline_folder(ws: Workspace, index: dict) -> Path:
    folder = ws.root / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def dit_pipeline(ws: Workspace, scheduler: dict | None = None, weights: Callable | None = None) -> Path:
    """The DiT as a hub-style pipeline folder (model_index.json, transformer/, scheduler/), its scheduler
    config and weights edited as given (weights: state dict -> {file name: state dict})."""
    from safetensors.torch import load_file, save_file

    folder = ws.root / "dit-pipe"
    (folder / "transformer").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    index = {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]}
    index["scheduler"] = ["diffusers", "DPMSolverMultistepScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    config = {"_class_name": "DiTTransformer2DModel", **json.loads(ws.sidecar.read_text())["model"]["config"]}
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    files = (weights or (lambda state: {"diffusion_pytorch_model.safetensors": state}))(load_file(ws.model))
    for name, state in files.items():
        if isinstance(state, dict):
            save_file(state, folder / "transformer" / name)
        else:
            (folder / "transformer" / name).write_text(state)
    sched = {"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": float("-inf"), **(scheduler or {})}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    return folder


def _recast(dtype: torch.dtype) -> Callable:
    """Weights with every floating tensor cast to `dtype` (bool, int32, complex: kinds no model weight is)."""
    return lambda state: {"diffusion_pytorch_model.safetensors": {k: v.to(dtype) for k, v in state.items()}}


def _sharded(shard: str) -> Callable:
    """Weights in two shards and an index, the second shard named `shard` in the index."""

    def split(state: dict) -> dict:
        keys = sorted(state)
        half = len(keys) // 2
        first, second = dict.fromkeys(keys[:half], "a.safetensors"), dict.fromkeys(keys[half:], shard)
        index = json.dumps({"metadata": {}, "weight_map": {**first, **second}})
        return {
            "a.safetensors": {k: state[k] for k in first},
            "b.safetensors": {k: state[k] for k in second},
            "diffusion_pytorch_model.safetensors.index.json": index,
        }

    return split


def _variants(*names: str) -> Callable:
    return lambda state: {f"diffusion_pytorch_model.{n}.safetensors": state for n in names}


def symlink_loop(ws: Workspace) -> Path:
    a, b = ws.root / "loop-a", ws.root / "loop-b"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


def low_memory(ws: Workspace, available: int = DOCUMENTED_MACHINE) -> None:
    ws.monkeypatch.setattr(limits, "available_memory", lambda: available)


def read_only_parent(ws: Workspace) -> None:
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(ws.outs))

    ws.monkeypatch.setattr(outputs.tempfile, "mkdtemp", refuse)


def disk_full_at_grid(ws: Workspace) -> None:
    from optimizer import report

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    ws.monkeypatch.setattr(report, "save_grid", full)


# (id, args built from a workspace and the built artifact, exit code, fragment of the one stderr line)
CASES: list[tuple[str, Callable[[Workspace, Path], list], int, str]] = [
    # 1. --out never is, contains or replaces an input, or anything we did not create
    ("out-is-the-model", lambda ws, a: [ws.model, "--out", ws.model, "--overwrite"], 2, "over the input"),
    ("out-is-the-sidecar", lambda ws, a: [ws.model, "--out", ws.sidecar, "--overwrite"], 2, "over the input"),
    ("out-is-the-model-folder", lambda ws, a: [ws.model, "--out", ws.model.parent, "--overwrite"], 2, "the input"),
    ("out-contains-the-model", lambda ws, a: [ws.model, "--out", ws.root, "--overwrite"], 2, "the input"),
    (
        "out-inside-a-diffusers-model",
        lambda ws, a: [ws.diffusers_folder(), "--out", ws.root / "dit-diffusers" / "o"],
        2,
        "the input",
    ),
    (
        "out-symlink-to-the-model-folder",
        lambda ws, a: [ws.model, "--out", _link(ws.outs / "l", ws.model.parent), "--overwrite"],
        2,
        "the input",
    ),
    ("out-is-a-device", lambda ws, a: [ws.model, "--out", "/dev/null", "--overwrite"], 2, "is not a folder"),
    ("out-is-a-file", lambda ws, a: [ws.model, "--out", _file(ws.outs / "f"), "--overwrite"], 2, "is not a folder"),
    (
        "overwrite-a-folder-we-did-not-create",
        lambda ws, a: [ws.model, "--out", _file(ws.outs / "mine" / "notes.txt").parent, "--overwrite"],
        2,
        "not an `optimize` output folder",
    ),
    (
        "overwrite-an-output-holding-the-calibration-input",
        lambda ws, a: [ws.model, "--out", (d := ws.artifact(a)), "--calibration", _file(d / "cal.st"), "--overwrite"],
        2,
        "the input",
    ),
    ("out-not-empty", lambda ws, a: [ws.model, "--out", ws.artifact(a)], 2, "use --overwrite"),
    (
        "overwrite-an-output-holding-a-file-we-never-write",
        lambda ws, a: [ws.model, "--out", _file(ws.artifact(a) / "notes.txt").parent, "--overwrite"],
        2,
        "it holds notes.txt, which optimize never writes",
    ),
    (
        "overwrite-an-output-with-a-folder-in-its-tokenizer",
        lambda ws, a: [ws.model, "--out", _with_tokenizer(ws.artifact(a), "photos/"), "--overwrite"],
        2,
        "it holds tokenizer/photos, which optimize never writes",
    ),
    (
        "overwrite-a-folder-with-a-one-line-plan",
        lambda ws, a: [ws.model, "--out", _one_line_plan(ws.outs / "mine"), "--overwrite"],
        2,
        "no complete plan.json of ours",
    ),
    (
        "overwrite-an-output-whose-plan-is-a-symlink",
        lambda ws, a: [ws.model, "--out", _plan_symlink(ws.artifact(a)), "--overwrite"],
        2,
        "no complete plan.json of ours",
    ),
    (
        "out-inside-a-linked-entry-of-the-model-folder",
        lambda ws, a: [_linked_entry(ws), "--out", ws.root / "dit-diffusers" / "sub" / "o"],
        2,
        "would write onto, into or over the input",
    ),
    (
        "export-triton-repo-inside-the-artifact",
        lambda ws, a: ["export-triton", (d := ws.artifact(a)), "--repo", d / "repo"],
        2,
        "--repo",
    ),
    ("storage-unknown-scheme", lambda ws, a: _search(ws, "redis://localhost/0"), 2, "unknown scheme 'redis'"),
    (
        "storage-missing-driver",
        lambda ws, a: _search(ws, "postgresql+nosuchdriver://u@localhost/db"),
        2,
        "--storage: postgresql cannot be used here",
    ),
    ("storage-missing-folder", lambda ws, a: _search(ws, str(ws.root / "nope" / "j.log")), 2, "does not exist"),
    (
        "storage-garbage-journal",
        lambda ws, a: _search(ws, str(_file(ws.root / "j.log"))),
        2,
        "is not an Optuna journal",
    ),
    (
        "storage-not-a-database",
        lambda ws, a: _search(ws, f"sqlite:///{_file(ws.root / 's.db')}"),
        2,
        "is not an SQLite database",
    ),
    ("storage-is-the-weights", lambda ws, a: _search(ws, f"sqlite:///{ws.model}"), 2, "over the input"),
    (
        "storage-journal-is-a-fifo",
        lambda ws, a: _search(ws, str(_fifo(ws.root / "j.log"))),
        2,
        "not a regular file",
    ),
    (
        "search-state-is-a-link",
        lambda ws, a: _search(ws, None, _link(ws.outs / ".result.search", _dir(ws.root / "elsewhere"))),
        2,
        "is a link or not a folder",
    ),
    (
        "search-state-without-resume",
        lambda ws, a: _search(ws, None, _file(ws.outs / ".result.search" / "study.sqlite3")),
        2,
        "--resume continues it, --overwrite starts over",
    ),
    (
        "search-state-a-fifo",
        lambda ws, a: _search(ws, None, _fifo(_dir(ws.outs / ".result.search") / "study.sqlite3")),
        2,
        "is a link or not a regular file",
    ),
    (
        "search-state-a-folder",
        lambda ws, a: _search(ws, None, _dir(_dir(ws.outs / ".result.search") / "study.sqlite3")),
        2,
        "is a link or not a regular file",
    ),
    (
        "search-state-a-file-where-its-folder-goes",
        lambda ws, a: _search(ws, None, _file(ws.outs / ".result.search")),
        2,
        "is a link or not a folder",
    ),
    (
        "search-state-with-a-trigger-on-resume",
        lambda ws, a: [
            *_search(ws, None, _state_db(ws, "CREATE TRIGGER t AFTER INSERT ON trials BEGIN SELECT 1; END")),
            "--resume",
        ],
        2,
        "holds triggers, which a study never has",
    ),
    (
        "search-state-of-a-future-schema-on-resume",
        lambda ws, a: [
            *_search(ws, None, _state_db(ws, "UPDATE alembic_version SET version_num = 'v9.9.9'")),
            "--resume",
        ],
        2,
        "study schema 'v9.9.9' is unknown to this Optuna",
    ),
    (
        "search-state-with-a-million-running-trials-on-resume",
        lambda ws, a: [*_search(ws, None, _state_db(ws, RUNNING_TRIALS)), "--resume"],
        2,
        "holds 1,000,000 unfinished trials (at most 10,000)",
    ),
    (
        "search-state-truncated-on-resume",
        lambda ws, a: [*_search(ws, None, _truncated(_state_db(ws, None))), "--resume"],
        2,
        "is not a readable study",
    ),
    (
        "search-state-not-a-database-on-resume",
        lambda ws, a: [*_search(ws, None, _file(ws.outs / ".result.search" / "study.sqlite3")), "--resume"],
        2,
        "is not an SQLite database",
    ),
    (
        "calibration-is-a-fifo",
        lambda ws, a: [ws.model, "--out", ws.out, "--calibration", _fifo(ws.root / "c.safetensors")],
        2,
        "the calibration file is not a regular file",
    ),
    ("calibrate-onto-the-model", lambda ws, a: ["calibrate", ws.model, "--out", ws.model], 2, "over the input"),
    ("calibrate-onto-a-device", lambda ws, a: ["calibrate", ws.model, "--out", "/dev/null"], 2, "not a regular file"),
    (
        "json-out-onto-the-sidecar",
        lambda ws, a: ["prune-compare", ws.model, "--json-out", ws.sidecar],
        2,
        "over the input",
    ),
    (
        "sample-into-the-artifact",
        lambda ws, a: ["sample", (d := ws.artifact(a)), "--out", d / "plan.json"],
        2,
        "over the input",
    ),
    ("sample-onto-a-device", lambda ws, a: ["sample", ws.artifact(a), "--out", "/dev/null"], 2, "not a regular file"),
    (
        "plan-backend-threads-over-the-cores",
        lambda ws, a: _sample(edit_plan(ws.artifact(a), lambda plan: plan["backend"].update(threads=4000)), ws),
        2,
        "backend.threads must be <= ",
    ),
    (
        "plan-backend-threads-a-string",
        lambda ws, a: _sample(edit_plan(ws.artifact(a), lambda plan: plan["backend"].update(threads="8")), ws),
        2,
        "backend.threads must be an integer",
    ),
    (
        "plan-tensorrt-max-batch-a-string",
        lambda ws, a: _sample(edit_plan(ws.artifact(a), lambda plan: plan.update(backend=_trt("16"))), ws),
        2,
        "tensorrt: max_batch must be an integer",
    ),
    (
        "plan-sample-shape-huge-in-product",
        lambda ws, a: _sample(edit_plan(ws.artifact(a), lambda plan: plan.update(sample_shape=[1, 65536, 65536])), ws),
        2,
        "elements per sample",
    ),
    # 2. a runner reads nothing outside its folder and runs only the graphs the plan recorded
    (
        "graph-path-escapes",
        lambda ws, a: ["sample", set_graph_file(ws.artifact(a), "../x.onnx"), "--out", ws.outs / "s.png"],
        2,
        "not a file name inside the artifact folder",
    ),
    (
        "graph-path-absolute",
        lambda ws, a: ["sample", set_graph_file(ws.artifact(a), str(a / "denoiser.onnx")), "--out", ws.outs / "s.png"],
        2,
        "not a file name inside the artifact folder",
    ),
    (
        "graph-path-etc-passwd",
        lambda ws, a: [
            "sample",
            set_graph_file(ws.artifact(a), "../../../../etc/passwd"),
            "--out",
            ws.outs / "s.png",
        ],
        2,
        "not a file name inside the artifact folder",
    ),
    (
        "plan-files-entry-escapes",
        lambda ws, a: [
            "sample",
            edit_plan(ws.artifact(a), lambda plan: plan.update(files={"../calibration.safetensors": "0" * 64})),
            "--out",
            ws.outs / "s.png",
        ],
        2,
        "files lists '../calibration.safetensors', which is not a file name with its sha256",
    ),
    (
        "graph-swapped",
        lambda ws, a: ["sample", swap_graph(ws.artifact(a)), "--out", ws.outs / "s.png"],
        2,
        "does not match its recorded sha256",
    ),
    (
        "graph-symlink-outside",
        lambda ws, a: ["sample", graph_symlink_outside(ws.artifact(a)), "--out", ws.outs / "s.png"],
        2,
        "is a link",
    ),
    (
        "graph-external-data-outside",
        lambda ws, a: ["sample", graph_with_external_data(ws.artifact(a)), "--out", ws.outs / "s.png"],
        2,
        "refers to external data",
    ),
    (
        "plan-graphs-not-an-object",
        lambda ws, a: ["sample", edit_plan(ws.artifact(a), lambda p: p.update(graphs=[])), "--out", ws.outs / "s.png"],
        2,
        "'graphs' must be an object",
    ),
    (
        "plan-with-nan",
        lambda ws, a: [
            "sample",
            edit_plan(ws.artifact(a), lambda p: p["sampling"].update(guidance_scale=float("nan"))),
            "--out",
            ws.outs / "s.png",
        ],
        2,
        "not valid JSON",
    ),
    (
        "calibration-with-the-right-fingerprint-but-wrong-shapes",
        lambda ws, a: [ws.model, "--out", ws.out, "--calibration", forged_calibration(ws)],
        2,
        "tensor 'x' must be finite floats of shape",
    ),
    # 3. sizes that cost memory or time are bounded before anything is built
    ("num-layers-1e9", lambda ws, a: [ws.edit_config(num_layers=10**9), "--out", ws.out], 2, "'num_layers'"),
    (
        "heads-3000",
        lambda ws, a: [ws.edit_config(num_attention_heads=3000), "--out", ws.out],
        2,
        "'num_attention_heads'",
    ),
    (
        "width-too-large-for-memory",
        lambda ws, a: [
            (low_memory(ws), ws.edit_config(num_attention_heads=1024, attention_head_dim=256))[1],
            "--out",
            ws.out,
        ],
        2,
        "GiB of memory",
    ),
    ("sample-size-1e9", lambda ws, a: [ws.edit_config(sample_size=10**9), "--out", ws.out], 2, "'sample_size'"),
    (
        "train-timesteps-1e9-inspect",
        lambda ws, a: [
            "inspect",
            ws.edit_sidecar(lambda m: m["scheduler"]["config"].update(num_train_timesteps=10**9)),
        ],
        2,
        "num_train_timesteps",
    ),
    (
        "samples-10000-in-4-gib",
        lambda ws, a: [(low_memory(ws, 4 << 30), ws.model)[1], "--out", ws.out, "--samples", 10000],
        2,
        "use fewer --samples",
    ),
    (
        "samples-over-a-seed-family",
        lambda ws, a: [ws.model, "--out", ws.out, "--samples", 10001],
        2,
        "--samples must be <= 10000",
    ),
    (
        "recipe-with-huge-calibration-set",
        lambda ws, a: [
            ws.model,
            "--out",
            ws.out,
            "--target",
            ws.target(lambda t: t.update(recipe=[{"pass": "prune", "config": {"samples": 10**7}}])),
        ],
        2,
        "samples and batch must be in",
    ),
    # 4. NaN/Inf weights
    ("nan-weights", lambda ws, a: poisoned_weights(float("nan"))(ws), 2, "NaN/Inf"),
    (
        "float64-weights-beyond-float32",
        lambda ws, a: poisoned_weights(1e300, torch.float64)(ws),
        2,
        "values beyond float32's range; refusing it",
    ),
    ("out-with-a-newline", lambda ws, a: [ws.model, "--out", ws.outs / "r\nerror: x"], 2, "a newline or control"),
    ("out-is-a-mount-point", lambda ws, a: [ws.model, "--out", "/proc", "--overwrite"], 2, "is a mount point"),
    (
        "calibrate-disk-full-inside-safetensors",
        lambda ws, a: [_safetensors_disk_full(ws), "calibrate", ws.model, "--out", ws.outs / "c.safetensors"][1:],
        2,
        "No space left on device",
    ),
    ("inf-weights", lambda ws, a: poisoned_weights(float("inf"))(ws), 2, "NaN/Inf"),
    # 5. malformed sidecars, targets and options: one line, exit 2
    (
        "conditioning-a-list",
        lambda ws, a: [ws.edit_sidecar(lambda m: m.update(conditioning=[10, 10])), "--out", ws.out],
        2,
        "'conditioning' must be an object",
    ),
    (
        "conditioning-missing-key",
        lambda ws, a: [ws.edit_sidecar(lambda m: m["conditioning"].pop("num_classes")), "--out", ws.out],
        2,
        "missing 'num_classes'",
    ),
    (
        "steps-abc",
        lambda ws, a: [ws.edit_sidecar(lambda m: m["sampling"].update(num_inference_steps="abc")), "--out", ws.out],
        2,
        "num_inference_steps must be an integer",
    ),
    (
        "steps-0",
        lambda ws, a: [ws.edit_sidecar(lambda m: m["sampling"].update(num_inference_steps=0)), "--out", ws.out],
        2,
        "num_inference_steps must be >= 1",
    ),
    (
        "steps-1e9",
        lambda ws, a: [ws.edit_sidecar(lambda m: m["sampling"].update(num_inference_steps=10**9)), "--out", ws.out],
        2,
        "num_inference_steps must be <= 1000",
    ),
    (
        "guidance-null",
        lambda ws, a: [ws.edit_sidecar(lambda m: m["sampling"].update(guidance_scale=None)), "--out", ws.out],
        2,
        "guidance_scale must be a finite number",
    ),
    (
        "null-class-out-of-range",
        lambda ws, a: [ws.edit_sidecar(lambda m: m["conditioning"].update(null_class=50)), "--out", ws.out],
        2,
        "null_class 50 is out of range",
    ),
    (
        "sidecar-nan-literal",
        lambda ws, a: [_replace(ws.sidecar, '"guidance_scale": 2.0', '"guidance_scale": NaN'), "--out", ws.out],
        2,
        "NaN is not a JSON number",
    ),
    (
        "target-is-5",
        lambda ws, a: [ws.model, "--target", ws.target(text="5"), "--out", ws.out],
        2,
        "a target is a JSON object",
    ),
    (
        "target-is-a-string",
        lambda ws, a: [ws.model, "--target", ws.target(text='"x"'), "--out", ws.out],
        2,
        "a target is a JSON object",
    ),
    (
        "target-is-a-folder",
        lambda ws, a: [ws.model, "--target", _dir(ws.root / "t.json"), "--out", ws.out],
        2,
        "not a file",
    ),
    (
        "target-not-utf8",
        lambda ws, a: [ws.model, "--target", ws.target(text=b"\xff\xfe{"), "--out", ws.out],
        2,
        "not valid JSON",
    ),
    (
        "target-hardware-a-list",
        lambda ws, a: [ws.model, "--target", ws.target(lambda t: t.update(hardware=["fp32"])), "--out", ws.out],
        2,
        "'hardware' must be an object",
    ),
    (
        "target-gate-a-string",
        lambda ws, a: [ws.model, "--target", ws.target(lambda t: t["gates"].update(min_psnr_db="40")), "--out", ws.out],
        2,
        "must be a finite number",
    ),
    (
        "sampler-steps-negative-before-calibration",
        lambda ws, a: [
            ws.model,
            "--out",
            ws.out,
            "--target",
            ws.target(lambda t: t.update(recipe=[{"pass": "sampler", "config": {"sampling_steps": -1}}])),
        ],
        2,
        "sampler: sampling_steps must be in [0, 1000]",
    ),
    (
        "sampler-steps-over-train-timesteps",
        lambda ws, a: [
            ws.edit_sidecar(lambda m: m["scheduler"]["config"].update(num_train_timesteps=100)),
            "--out",
            ws.out,
            "--target",
            ws.target(lambda t: t.update(recipe=[{"pass": "sampler", "config": {"sampling_steps": 500}}])),
        ],
        2,
        "must be in [1, 100] (the scheduler's train timesteps)",
    ),
    ("steps-5000", lambda ws, a: [ws.model, "--out", ws.out, "--steps", 5000], 2, "--steps must be <= 1000"),
    (
        "steps-over-train-timesteps",
        lambda ws, a: [
            ws.edit_sidecar(lambda m: m["scheduler"]["config"].update(num_train_timesteps=100)),
            "--out",
            ws.out,
            "--steps",
            500,
        ],
        2,
        "the scheduler's train timesteps",
    ),
    (
        "scheduler-mixin",
        lambda ws, a: [ws.model, "--out", ws.out, "--scheduler", "SchedulerMixin"],
        2,
        "unknown scheduler 'SchedulerMixin'",
    ),
    ("seed-1e20", lambda ws, a: [ws.model, "--out", ws.out, "--seed", 10**20], 2, "--seed must be <="),
    ("seed-1e20-float", lambda ws, a: [ws.model, "--out", ws.out, "--seed", "1e20"], 2, "not a valid integer"),
    ("guidance-inf", lambda ws, a: [ws.model, "--out", ws.out, "--guidance", "inf"], 2, "--guidance must be a finite"),
    ("guidance-nan", lambda ws, a: [ws.model, "--out", ws.out, "--guidance", "nan"], 2, "--guidance must be a finite"),
    ("latency-repeats-neg", lambda ws, a: [ws.model, "--out", ws.out, "--latency-repeats", -5], 2, "--latency-repeats"),
    ("seed-sets-0", lambda ws, a: [ws.model, "--out", ws.out, "--seed-sets", 0], 2, "--seed-sets must be >= 1"),
    (
        "read-only-out",
        lambda ws, a: [(read_only_parent(ws), ws.model)[1], "--out", ws.out, *FAST],
        2,
        "Permission denied",
    ),
    (
        "disk-full-writing-grid",
        lambda ws, a: [(disk_full_at_grid(ws), ws.model)[1], "--out", ws.out, *FAST],
        2,
        "No space left on device",
    ),
    ("model-symlink-loop", lambda ws, a: [symlink_loop(ws), "--out", ws.out], 2, "cannot be resolved"),
    ("out-symlink-loop", lambda ws, a: [ws.model, "--out", symlink_loop(ws)], 2, "cannot be resolved"),
    # 6. late or misleading checks
    (
        "pipeline-without-its-transformer-folder",
        lambda ws, a: [pipeline_folder(ws, {"transformer": ["diffusers", "DiTTransformer2DModel"]}), "--out", ws.out],
        2,
        "transformer/config.json is missing",
    ),
    (
        "pipeline-without-a-denoiser",
        lambda ws, a: [pipeline_folder(ws, {"vae": ["diffusers", "AutoencoderKL"]}), "--out", ws.out],
        2,
        "names no 'transformer' or 'unet'",
    ),
    # 7. third-party configs and weights as they ship (issue 33): bounded, checked field by field, one line
    (
        "scheduler-solver-order-huge",
        lambda ws, a: [dit_pipeline(ws, {"solver_order": 10**9}), "--out", ws.out],
        2,
        "solver_order must be an integer in [1, 4], got 1000000000",
    ),
    (
        "scheduler-infinity-not-its-default",
        lambda ws, a: [dit_pipeline(ws, {"beta_start": float("inf")}), "--out", ws.out],
        2,
        "scheduler beta_start is inf, which is not finite (only its class default may be)",
    ),
    (
        "weights-bool",
        lambda ws, a: [dit_pipeline(ws, weights=_recast(torch.bool)), "--out", ws.out],
        2,
        "is bool; the model holds floating-point weights there",
    ),
    (
        "weights-int32",
        lambda ws, a: [dit_pipeline(ws, weights=_recast(torch.int32)), "--out", ws.out],
        2,
        "is int32; the model holds floating-point weights there",
    ),
    (
        "weights-complex",
        lambda ws, a: [dit_pipeline(ws, weights=_recast(torch.complex64)), "--out", ws.out],
        2,
        "is complex; a diffusion model's weights are real",
    ),
    (
        "shard-missing",
        lambda ws, a: [dit_pipeline(ws, weights=_sharded("c.safetensors")), "--out", ws.out],
        2,
        "names shard 'c.safetensors', which is missing",
    ),
    (
        "shard-outside-the-folder",
        lambda ws, a: [dit_pipeline(ws, weights=_sharded("../b.safetensors")), "--out", ws.out],
        2,
        "shard '../b.safetensors' is not a file name inside the folder",
    ),
    (
        "variant-not-in-the-folder",
        lambda ws, a: [dit_pipeline(ws), "--variant", "bf16", "--out", ws.out],
        2,
        "no variant 'bf16' (diffusion_pytorch_model; weights held: plain)",
    ),
    (
        "variants-and-no-plain-weights",
        lambda ws, a: [dit_pipeline(ws, weights=_variants("fp16", "bf16")), "--out", ws.out],
        2,
        "holds the variants bf16, fp16 and no plain weights; choose one with --variant",
    ),
    (
        "component-file-a-fifo",
        lambda ws, a: [_component_file(dit_pipeline(ws), "tokenizer_config.json", fifo=True), "--out", ws.out],
        2,
        "tokenizer/tokenizer_config.json: the component file is not a regular file (a folder, FIFO or device)",
    ),
    (
        "component-file-sparse-over-256-mib",  # the same check refuses a 200 GB one; this test hashes its inputs
        lambda ws, a: [_component_file(dit_pipeline(ws), "vocab.json", size=300 << 20), "--out", ws.out],
        2,
        "tokenizer/vocab.json: 314,572,800 bytes is too large for a config or vocabulary file",
    ),
    (
        "single-file-zip-bomb",
        lambda ws, a: [_zip_bomb(ws.root / "model.ckpt"), "--out", ws.out],
        2,
        "entry 'archive/data.pkl' is compressed",
    ),
]


def _component_file(folder: Path, name: str, fifo: bool = False, size: int = 0) -> Path:
    """A pipeline folder with a tokenizer component whose `name` is a FIFO (a read would block) or a sparse
    file of `size` bytes (a read would take minutes)."""
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "tokenizer": ["transformers", "CLIPTokenizer"]}))
    path = folder / "tokenizer" / name
    path.parent.mkdir()
    if fifo:
        os.mkfifo(path)
    else:
        with path.open("wb") as f:
            f.truncate(size)
    return folder


def _zip_bomb(path: Path) -> Path:
    """A .ckpt zip whose one entry is 4 MiB of zeros deflated to a few KB (torch stores entries uncompressed)."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * (1 << 22))
    return path


FAILS_DURING_WORK = {"read-only-out", "disk-full-writing-grid", "calibrate-disk-full-inside-safetensors"}


def _link(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


def _file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("user data")
    return path


def _search(ws: Workspace, storage: str | None, *_made: object) -> list:
    """A search target's command line, with --storage when given (`_made`: what the case built first)."""
    return [ws.model, "--target", "cpu-auto", "--out", ws.out, *(["--storage", storage] if storage else [])]


def _safetensors_disk_full(ws: Workspace) -> None:
    """safetensors' own error for a full disk, as it raises it."""
    from safetensors import SafetensorError

    from calibration import capture

    def full(*args, **kwargs):
        raise SafetensorError(
            "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
            '"No space left on device" }) (os error 28)'
        )

    ws.monkeypatch.setattr(capture, "save_file", full)


def _sample(artifact: Path, ws: Workspace) -> list:
    return ["sample", artifact, "--seed", "0", "--out", ws.outs / "s.png"]


def _trt(max_batch: object) -> dict:
    return {"name": "tensorrt", "max_batch": max_batch, "fallback_providers": ["CPUExecutionProvider"]}


RUNNING_TRIALS = (
    "INSERT INTO trials (number, study_id, state, datetime_start) WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL "
    "SELECT i + 1 FROM n WHERE i < 999999) SELECT i, 1, 'RUNNING', '2026-01-01 00:00:00' FROM n"
)


def _state_db(ws: Workspace, sql: str | None) -> Path:
    """The local search state beside --out: a real Optuna study file, then `sql` run on it."""
    import sqlite3

    import optuna

    db = ws.outs / ".result.search" / "study.sqlite3"
    db.parent.mkdir()
    optuna.create_study(storage=f"sqlite:///{db}", study_name="s")
    if sql:
        with sqlite3.connect(db) as con:
            con.execute(sql)
    return db


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _linked_entry(ws: Workspace) -> Path:
    """The DiT as a diffusers folder with an entry that links to a folder elsewhere."""
    folder = ws.diffusers_folder()
    (folder / "sub").symlink_to(_dir(ws.root / "elsewhere"))
    return folder


def _one_line_plan(folder: Path) -> Path:
    """A user's folder with a one-line plan.json beside their own files."""
    _file(folder / "photos" / "holiday.jpg")
    (folder / "plan.json").write_text('{"format": "diffusion-plan"}')
    return folder


def _with_tokenizer(artifact: Path, extra: str) -> Path:
    """The artifact as a text-to-image output records it: a tokenizer folder in plan.json; plus `extra`."""
    encoder = {"file": "prompt_encoder.onnx", "sha256": "0" * 64, "tokenizers": [{"folder": "tokenizer"}]}
    edit_plan(artifact, lambda plan: plan["stages"].update(prompt_encoder=encoder))
    _file(artifact / "prompt_encoder.onnx")
    _file(artifact / "tokenizer" / "tokenizer.json")
    (artifact / "tokenizer" / extra).mkdir() if extra.endswith("/") else _file(artifact / "tokenizer" / extra)
    return artifact


def _plan_symlink(artifact: Path) -> Path:
    outside = artifact.parent / "plan-outside.json"
    shutil.move(artifact / "plan.json", outside)
    (artifact / "plan.json").symlink_to(outside)
    return artifact


def _dir(path: Path) -> Path:
    path.mkdir()
    return path


def _replace(path: Path, old: str, new: str) -> Path:
    text = json.dumps(json.loads(path.read_text()))
    assert old in text
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize("case,build,code,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(tmp_path, monkeypatch, built_artifact, tiny_digits_dit, case, build, code, fragment):
    ws = Workspace(tmp_path, monkeypatch, tiny_digits_dit if case in FAILS_DURING_WORK else SHIPPED["dit"])
    args = [str(a) for a in build(ws, built_artifact)]
    before, outs_before = ws.inputs(), sorted(p.name for p in ws.outs.iterdir())
    devnull = os.stat("/dev/null")
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    *progress, line = result.stderr.strip().splitlines()
    assert result.exit_code == code, result.output
    assert fragment in line and line.startswith("error: ") and "Traceback" not in result.output
    # Input checks all run before any work, so their error is the only line; an environment failure
    # during the work follows the job's own progress lines.
    assert all(p.startswith("[optimize] ") for p in progress) and (case in FAILS_DURING_WORK or not progress)
    assert ws.inputs() == before  # no input file changed
    assert sorted(p.name for p in ws.outs.iterdir()) == outs_before  # nothing left beside --out
    assert os.stat("/dev/null").st_rdev == devnull.st_rdev and Path("/dev/null").is_char_device()


def test_overwrite_replaces_only_an_earlier_output(tmp_path, monkeypatch, built_artifact, tiny_digits_dit):
    """--overwrite over an output of ours works, and the old folder is gone afterwards."""
    ws = Workspace(tmp_path, monkeypatch, tiny_digits_dit)
    out = ws.artifact(built_artifact)
    (out / "report.md").write_text("the earlier run's report")
    result = CliRunner().invoke(main, [str(ws.model), "--out", str(out), "--overwrite", *FAST])
    assert result.exit_code == 0, result.output  # the lowering alone: every gate holds
    assert (out / "plan.json").is_file() and (out / "report.md").read_text().startswith("# ")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".artifact.")]


def test_not_ours_accepts_every_file_a_text_to_image_output_records(tmp_path, built_artifact):
    artifact = _with_tokenizer(shutil.copytree(built_artifact, tmp_path / "a"), "vocab.json")
    (artifact / "denoiser.plan").write_text("an engine")  # TensorRT's, named after its graph
    own = ("report.md", "report.json", "grid.png", "calibration.safetensors")
    for name in own:
        (artifact / name).write_text("ours")
    assert outputs.not_ours(artifact, own, (".plan",)) is None
    never = "which optimize never writes"
    assert outputs.not_ours(artifact, own[:3], (".plan",)) == f"it holds calibration.safetensors, {never}"
    assert outputs.not_ours(artifact, own, ()) == f"it holds denoiser.plan, {never}"


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path, monkeypatch):
    ws = Workspace(tmp_path, monkeypatch)
    with outputs.claim(ws.out.resolve()):  # the first run's
        result = CliRunner().invoke(main, [str(ws.model), "--out", str(ws.out), *FAST])
        assert [p.name for p in ws.outs.iterdir()] == [".result.lock"]  # the refused run leaves it alone
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        f"error: --out {ws.out}: another optimize run (pid {os.getpid()}) is writing it; wait for it or choose another"
        " folder"
    )
    assert list(ws.outs.iterdir()) == []  # the first run's lock goes with it


@pytest.mark.parametrize("earlier", [False, True], ids=["new-out", "overwrite"])
def test_a_folder_written_at_out_during_the_run_is_left_as_it_is(
    tmp_path, monkeypatch, built_artifact, tiny_digits_dit, earlier
):
    """What appears at (or changes in) --out while the job runs is never replaced: the result is kept beside it."""
    from optimizer import report

    ws = Workspace(tmp_path, monkeypatch, tiny_digits_dit)
    out = shutil.copytree(built_artifact, ws.out) if earlier else ws.out
    save_grid = report.save_grid

    def user_writes_at_out(*args, **kwargs):
        _file(out / "notes.txt")
        return save_grid(*args, **kwargs)

    monkeypatch.setattr(report, "save_grid", user_writes_at_out)
    result = CliRunner().invoke(main, [str(ws.model), "--out", str(out), *FAST, *(["--overwrite"] * earlier)])
    kept = ws.outs / f"result.unpublished-{os.getpid()}"
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --out {out} changed during the run (something else was written there); it was left as it is and the"
        f" result is in {kept}"
    )
    assert (out / "notes.txt").read_text() == "user data" and (out / "plan.json").exists() == earlier
    assert (kept / "plan.json").is_file() and (kept / "report.md").is_file()
    assert sorted(p.name for p in ws.outs.iterdir()) == ["result", kept.name]  # no staging, no lock


def test_internal_error_is_exit_3_with_the_traceback_in_the_staging_folder(tmp_path, monkeypatch):
    from optimizer import tasks

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug in a stage")

    monkeypatch.setattr(tasks, "calibrate", broken)
    ws = Workspace(tmp_path, monkeypatch)
    before = ws.inputs()
    result = CliRunner().invoke(main, [str(ws.model), "--out", str(ws.out), *FAST], catch_exceptions=False)
    assert result.exit_code == EXIT_INTERNAL
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("internal error") and "simulated bug in a stage" in line and "Traceback" not in line
    log = Path(line.rsplit("traceback in ", 1)[1])
    assert "Traceback" in log.read_text() and "simulated bug in a stage" in log.read_text()
    assert [p.name for p in log.parent.iterdir()] == ["error.log"]  # everything else was removed
    assert not ws.out.exists() and ws.inputs() == before


def test_stale_staging_of_a_dead_process_is_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = outputs._HOST
    stale = tmp_path / f".result.staging-{host}-{dead.pid}-abc123"
    live = tmp_path / f".result.staging-{host}-{os.getpid()}-def456"  # ours: kept
    foreign = tmp_path / f".result.staging-00000000-{dead.pid}-ghi789"  # another host, recent: kept
    old_foreign = tmp_path / f".result.old-00000000-{dead.pid}-jkl012"  # another host, a week old: removed
    for folder in (stale, live, foreign, old_foreign):
        folder.mkdir()
        (folder / "x").write_text("x")
    week = time.time() - outputs.STALE_AFTER_S - 60
    os.utime(old_foreign, (week, week))
    removed = outputs.clean_stale(tmp_path)
    assert sorted(removed) == sorted([stale, old_foreign])
    assert live.exists() and foreign.exists()


def test_a_failed_runs_error_log_outlives_a_run_into_a_sibling(tmp_path):
    """`optimized/a` exits 3 naming its error.log; a run into `optimized/b` keeps it (a week), a rerun into
    `optimized/a` replaces it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    failed = tmp_path / f".a.staging-{outputs._HOST}-{dead.pid}-abc123"
    failed.mkdir()
    (failed / outputs.ERROR_LOG).write_text("Traceback ...")
    sibling = outputs.create_staging(tmp_path / "b")
    assert (failed / outputs.ERROR_LOG).read_text() == "Traceback ..."
    sibling.rmdir()
    again = outputs.create_staging(tmp_path / "a")
    assert not failed.exists() and again.exists()


def test_memory_estimate_scales_and_allow_large_skips_it(monkeypatch, dit_program):
    spec = dit_program.spec
    fp = footprint(spec.model_class, spec.model_config)
    assert fp.parameters == sum(p.numel() for p in dit_program.denoiser.parameters())
    small = limits.job_memory(fp, spec.sample_shape, 20, True, 100)
    large = limits.job_memory(fp, spec.sample_shape, 20, True, 100_000)
    assert small < (1 << 30) < DOCUMENTED_MACHINE < large
    monkeypatch.setattr(limits, "available_memory", lambda: DOCUMENTED_MACHINE)
    with pytest.raises(limits.LimitError, match="--allow-large"):
        limits.require_memory(large, "this run", "use fewer --samples", allow_large=False)
    limits.require_memory(large, "this run", "use fewer --samples", allow_large=True)


def test_the_memory_estimate_counts_every_search_worker(monkeypatch, dit_program):
    from optimizer.prepare import check_job_memory

    monkeypatch.setattr(limits, "available_memory", lambda: 3 << 30)
    check_job_memory(dit_program, 100, allow_large=False, processes=1)
    with pytest.raises(limits.LimitError, match="use fewer --samples / --calibration-samples or --workers"):
        check_job_memory(dit_program, 100, allow_large=False, processes=24)


@pytest.mark.parametrize(
    "version,limit,usage,expected",
    [
        ("v2", "1073741824", "268435456", 805306368),
        ("v2", "max", "268435456", None),
        ("v1", "1073741824", "1073741999", 0),
        ("v1", "9223372036854771712", "1", None),  # v1's "no limit"
    ],
)
def test_the_memory_check_reads_the_cgroup_limit(tmp_path, version, limit, usage, expected):
    """A 10.4 GiB job in a 6 GiB container was OOM-killed: the headroom is the cgroup's limit minus usage."""
    membership = tmp_path / "cgroup"
    if version == "v2":
        membership.write_text("0::/job\n")
        folder, files = tmp_path / "fs" / "job", ("memory.max", "memory.current")
    else:
        membership.write_text("4:memory:/job\n1:cpu:/\n")
        folder, files = tmp_path / "fs" / "memory" / "job", ("memory.limit_in_bytes", "memory.usage_in_bytes")
    folder.mkdir(parents=True)
    (folder / files[0]).write_text(limit + "\n")
    (folder / files[1]).write_text(usage + "\n")
    assert limits.cgroup_headroom(tmp_path / "fs", membership) == expected
    assert limits.cgroup_headroom(tmp_path / "fs", tmp_path / "none") is None


def test_a_search_worker_dies_with_its_parent_even_a_sigkilled_one(tmp_path):
    """Spawned trial workers call die_with_parent: SIGKILL the parent and the worker is gone in seconds."""
    child = (
        "import sys, time; from optimizer.search_job import die_with_parent; "
        "die_with_parent(int(sys.argv[1])); print('ready', flush=True); time.sleep(120)"
    )
    parent = (
        "import os, subprocess, sys, time; "
        f"c = subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())], stdout=-1, text=True); "
        "assert c.stdout.readline() == 'ready\\n'; print(c.pid, flush=True); time.sleep(120)"
    )
    repo = Path(__file__).parents[2]
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, cwd=repo)
    worker = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _running(worker):
        time.sleep(0.1)
    assert not _running(worker)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_removes_the_staging_folder_and_exits_128_plus_n(tmp_path, signum):
    model = tmp_path / "model" / SHIPPED["dit"].name
    model.parent.mkdir()
    for src in (SHIPPED["dit"], SHIPPED["dit"].with_suffix(".json")):
        shutil.copy(src, model.parent / src.name)
    out = tmp_path / "outs" / "result"
    command = [sys.executable, "-m", "optimizer.cli", str(model), "--out", str(out), "--samples", "50"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    lines = []
    for line in proc.stderr:  # wait until the job has a staging folder and is working
        lines.append(line)
        if "calibrating" in line:
            break
    assert list((tmp_path / "outs").glob(".result.staging-*")), lines
    proc.send_signal(signum)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signum, [*lines, rest]
    assert f"interrupted by {signal.Signals(signum).name}" in rest.strip().splitlines()[-1]
    assert not out.exists() and not list((tmp_path / "outs").iterdir())


def test_exit_codes_are_documented():
    """The README's exit-code table lists exactly the codes the CLI exits with, each with its meaning."""
    import re
    import signal as signals

    from core.errors import EXIT_GATE_FAILED, EXIT_PASS, EXIT_SIGNAL_BASE

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme.split("### Exit codes", 1)[1].split("\n### ", 1)[0]
    rows = {m[0]: m[1] for m in re.findall(r"^\| `(\d+)`(?: / `\d+`)? \| ([^|]+) \|", table, re.M)}
    signal_codes = re.findall(r"^\| `(\d+)` / `(\d+)` \|", table, re.M)
    assert sorted(map(int, rows)) == [EXIT_PASS, EXIT_GATE_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, 130]
    assert "measured and held" in rows[str(EXIT_PASS)] and "not measured" in rows[str(EXIT_GATE_FAILED)]
    assert "bad input" in rows[str(EXIT_BAD_INPUT)] and "internal error" in rows[str(EXIT_INTERNAL)]
    assert signal_codes == [(str(EXIT_SIGNAL_BASE + signals.SIGINT), str(EXIT_SIGNAL_BASE + signals.SIGTERM))]


def test_a_huge_weights_file_is_refused_by_size_before_it_is_hashed(tmp_path, monkeypatch):
    """A 64 GiB sparse weights file: the memory check refuses it from its size alone, naming the file's
    size and the config's parameter count, without reading a byte of it."""
    from core import loading

    model = tmp_path / SHIPPED["dit"].name
    shutil.copy(SHIPPED["dit"].with_suffix(".json"), model.with_suffix(".json"))
    with model.open("wb") as f:
        f.truncate(64 << 30)
    monkeypatch.setattr(limits, "available_memory", lambda: DOCUMENTED_MACHINE)

    def never(paths):
        raise AssertionError(f"hashed {paths}")

    monkeypatch.setattr(loading, "file_digest", never)
    result = CliRunner().invoke(main, [str(model), "--out", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    parameters = f"{footprint('DiTTransformer2DModel', _dit_config()).parameters:,}"
    assert result.stderr.strip() == (
        f"error: loading {model.name} (64.0 GiB on disk, {parameters} parameters by config) needs about 128.0 GiB"
        " of memory and 24.0 GiB is available; this machine cannot hold the model (or pass --allow-large to try"
        " anyway)"
    )


def _dit_config() -> dict:
    return json.loads(SHIPPED["dit"].with_suffix(".json").read_text())["model"]["config"]


def test_every_file_we_add_after_lowering_is_recorded_and_checked_before_it_is_loaded(tmp_path, built_artifact):
    """Engines and the calibration set are listed in plan.json's `files` with their sha256; a reader
    (the TensorRT runner for an engine) opens one only as a regular file inside the folder with that digest."""
    from backends.plan import read_plan, record_files, recorded_files, sha256
    from core.fileio import recorded_file

    artifact = shutil.copytree(built_artifact, tmp_path / "a")
    (artifact / "denoiser.engine").write_bytes(b"engine bytes")
    record_files(artifact, ["denoiser.engine"])
    files = recorded_files(read_plan(artifact).document, "plan.json")
    assert files == {"denoiser.engine": sha256(artifact / "denoiser.engine")}
    engine = recorded_file(artifact, "denoiser.engine", files["denoiser.engine"], "engine")
    assert engine == artifact / "denoiser.engine"
    (artifact / "denoiser.engine").write_bytes(b"another engine")
    with pytest.raises(LoadError, match=r"engine: denoiser\.engine does not match its recorded sha256"):
        recorded_file(artifact, "denoiser.engine", files["denoiser.engine"], "engine")
    (artifact / "denoiser.engine").unlink()
    (artifact / "denoiser.engine").symlink_to(tmp_path / "elsewhere.engine")
    with pytest.raises(LoadError, match=r"engine: denoiser\.engine is a link or not a regular file"):
        recorded_file(artifact, "denoiser.engine", files["denoiser.engine"], "engine")
    with pytest.raises(LoadError, match=r"engine: other\.engine is missing"):
        recorded_file(artifact, "other.engine", files["denoiser.engine"], "engine")
