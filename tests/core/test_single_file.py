"""Issue 33: single-file checkpoints (`optimize model.ckpt`). An SD 1.5-layout single file (the tiny hub-layout
SD pipeline's weights under the original LDM key names, tests/ldm_layout.py) is detected as diffusers detects
it, converted by diffusers' from_single_file with --config a local folder of configs and tokenizers (no
weights), and reproduces the diffusers pipeline it came from. Random weights: mechanics only."""

import dataclasses
import json
import shutil
import zipfile

import diffusers
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_exit_matches_report, shortened
from ldm_layout import ldm_checkpoint
from safetensors.torch import save_file

from core.errors import LoadError
from core.loading import load_program
from core.variants import sample_program
from optimizer.cli import main

PROMPTS = ["a thick seven", "a thin one"]


@pytest.fixture(scope="module")
def single(hub, tmp_path_factory):
    """The SD 1.5 layout as model.safetensors and model.ckpt, and its configs-only folder."""
    root = tmp_path_factory.mktemp("single-file")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(hub["sd15"], dtype=torch.float32, safety_checker=None)
    state = ldm_checkpoint(pipe)
    save_file(state, root / "model.safetensors")
    torch.save({"state_dict": state}, root / "model.ckpt")
    config = root / "sd15-configs"
    for path in hub["sd15"].rglob("*"):
        if path.is_file() and path.suffix in (".json", ".txt"):
            (config / path.relative_to(hub["sd15"])).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, config / path.relative_to(hub["sd15"]))
    return {"safetensors": root / "model.safetensors", "ckpt": root / "model.ckpt", "config": config}


@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_a_single_file_checkpoint_reproduces_the_pipeline_it_came_from(hub, single, kind):
    program = load_program(single[kind], config=single["config"])
    assert program.source.format == "single-file" and program.source.path == str(single[kind])
    assert program.source.notes[0].startswith("single-file v1 checkpoint, converted by diffusers' from_single_file")
    assert program.plan.scheduler_class == "PNDMScheduler" and program.plan.num_inference_steps == 50
    reference = load_program(hub["sd15"])
    ours, theirs = (p.replace(plan=dataclasses.replace(p.plan, num_inference_steps=3)) for p in (program, reference))
    torch.testing.assert_close(sample_program(ours, [0, 1], PROMPTS), sample_program(theirs, [0, 1], PROMPTS))


def test_optimize_model_ckpt_runs_cpu_fp32_and_h100_fp4(single, tmp_path):
    fast = ["--samples", "2", "--calibration-samples", "1", "--latency-repeats", "0", "--config", str(single["config"])]
    out = tmp_path / "fp32"
    result = CliRunner().invoke(main, [str(single["ckpt"]), "--out", str(out), "--steps", "3", *fast])
    assert result.exit_code == 0, result.output
    assert "note: single-file v1 checkpoint" in result.output
    assert json.loads((out / "report.json").read_text())["model"]["source"]["format"] == "single-file"
    # The GPU target plans and runs on this CPU (its Q/DQ graphs in ONNX Runtime), budgets cut for mechanics.
    out = tmp_path / "fp4"
    target = shortened("h100-fp4", tmp_path)
    result = CliRunner().invoke(
        main, [str(single["ckpt"]), "--target", target, "--out", str(out), "--steps", "8", *fast]
    )
    report = assert_exit_matches_report(result, out)
    assert report["backend_details"]["executed_by"].startswith("onnxruntime")


def test_a_single_file_without_its_configs_is_one_line(single, tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(single["safetensors"])])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert (
        "a single-file v1 checkpoint (StableDiffusionPipeline) carries no configs or tokenizer: pass --config" in line
    )


def test_unknown_layouts_and_zip_bombs_are_refused_before_loading(tmp_path):
    odd = tmp_path / "odd.safetensors"
    save_file({"some.weight": torch.zeros(2, 2)}, odd)
    with pytest.raises(LoadError, match=r"not a single-file layout this tool loads \(detected .*keys like some.weight"):
        load_program(odd)
    bomb = tmp_path / "bomb.ckpt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * (1 << 22))  # 4 MiB of zeros in a few KB
    with pytest.raises(
        LoadError, match=r"entry .archive/data.pkl. is compressed.*torch stores checkpoints uncompressed"
    ):
        load_program(bomb)
