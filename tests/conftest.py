import os
import shutil
from pathlib import Path

import pytest
import torch

from core.loading import load_program
from zoo import SHIPPED

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one torch thread each
    torch.set_num_threads(1)


# The longest test files, longest first (measured: --durations=0, 2026-12-07). pytest-xdist's --dist loadfile
# hands files to its two workers in collection order, so these start first and the short files fill in after
# them, instead of one long file running alone at the end while the other worker idles.
LONGEST_FIRST = (
    "tests/passes/test_quantize.py",
    "tests/optimizer/test_cli_recipes.py",
    "tests/core/test_hub_layouts.py",
    "tests/optimizer/test_user_models.py",
    "tests/optimizer/test_search_cli.py",
    "tests/optimizer/test_cli.py",
    "tests/passes/test_caching.py",
    "tests/passes/test_pruning.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: file order kept


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def dit_program():
    return load_program(SHIPPED["dit"])


@pytest.fixture(scope="session")
def unet_program():
    return load_program(SHIPPED["unet"])


@pytest.fixture(scope="session")
def tiny_digits_dit(tmp_path_factory) -> Path:
    """A checkpoint with the shipped DiT's sidecar but 2 blocks of width 64 and random weights: quick to
    lower; for mechanics (bookkeeping, shapes, files, sizes), never for fidelity."""
    import json

    from diffusers import DiTTransformer2DModel

    from core.checkpoint import save_checkpoint

    meta = json.loads(SHIPPED["dit"].with_suffix(".json").read_text())
    meta["model"]["config"].update(num_layers=2, num_attention_heads=4, attention_head_dim=16)
    for key in ("format", "version", "training"):
        meta.pop(key, None)
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**meta["model"]["config"])
    path = tmp_path_factory.mktemp("tiny-digits-dit") / "tiny.safetensors"
    save_checkpoint(path, model.state_dict(), meta)
    return path


@pytest.fixture(scope="session")
def tiny_digits_program(tiny_digits_dit):
    return load_program(tiny_digits_dit)


@pytest.fixture
def dit_copy(tmp_path: Path) -> Path:
    """The shipped DiT checkpoint copied into its own folder (weights + sidecar)."""
    folder = tmp_path / "model"
    folder.mkdir()
    for src in (SHIPPED["dit"], SHIPPED["dit"].with_suffix(".json")):
        shutil.copy(src, folder / src.name)
    return folder / SHIPPED["dit"].name


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: to prove nothing was written or changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def text_folders(tmp_path_factory):
    """Tiny random SD and PixArt pipeline folders (mechanics and equivalence only)."""
    from helpers import tiny_text_pipelines

    return tiny_text_pipelines(tmp_path_factory.mktemp("text-pipelines"))


@pytest.fixture(scope="session")
def user_models(tmp_path_factory):
    """A tiny RGB SD-style pipeline and a 3x32x32 DiT: models no shipped judge knows (mechanics only)."""
    from helpers import tiny_user_models

    return tiny_user_models(tmp_path_factory.mktemp("user-models"))


@pytest.fixture(scope="session")
def flow_folders(tmp_path_factory):
    """Tiny random SD3 and Flux pipeline folders (mechanics only)."""
    from helpers import tiny_flux_pipeline, tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("flow-pipelines")
    return {"sd3": tiny_sd3_pipeline(root), "flux": tiny_flux_pipeline(root)}


@pytest.fixture(scope="session")
def cached_sd_artifact(text_folders, tmp_path_factory):
    """The tiny SD pipeline (6 steps) with the cache pass's schedule, lowered: (program, artifact folder).
    Two denoiser graphs, the prompt encoder and the decoder; shared by the lowering and serving tests."""
    import dataclasses

    from helpers import lower, run_recipe

    from calibration.capture import capture_calibration

    program = load_program(text_folders["sd"])
    program = program.replace(plan=dataclasses.replace(program.plan, num_inference_steps=6))
    cached = run_recipe(program, capture_calibration(program, 2), [{"pass": "cache", "config": {"flops_budget": 0.9}}])
    folder = tmp_path_factory.mktemp("cached-sd") / "artifact"
    lower(cached, folder)
    return cached, folder


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """The hub-layout fixture set (tests/hub_layouts.py), one folder per layout."""
    from hub_layouts import LAYOUTS, build

    root = tmp_path_factory.mktemp("hub")
    return {name: build(name, root) for name in LAYOUTS}


@pytest.fixture(scope="session")
def transformer_checkpoint(tmp_path_factory) -> Path:
    """A tiny PushT action transformer (helpers.tiny_transformer_policy), saved once per worker; read-only."""
    from helpers import tiny_transformer_policy

    weights = tmp_path_factory.mktemp("transformer") / "policy.safetensors"
    tiny_transformer_policy(weights)
    return weights
