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


PIPELINES = {"sd15": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline}


@pytest.fixture(scope="module")
def single(hub, tmp_path_factory):
    """The SD 1.5 layout as model.safetensors and model.ckpt, the SDXL base layout as sdxl.safetensors, and
    each one's configs-only folder (configs and tokenizers of its hub layout)."""
    root = tmp_path_factory.mktemp("single-file")
    out = {}
    for layout, cls in PIPELINES.items():
        kwargs = {"safety_checker": None} if layout == "sd15" else {}
        state = ldm_checkpoint(cls.from_pretrained(hub[layout], dtype=torch.float32, **kwargs))
        stem = "model" if layout == "sd15" else layout
        save_file(state, root / f"{stem}.safetensors")
        config = root / f"{layout}-configs"
        for path in hub[layout].rglob("*"):
            if path.is_file() and path.suffix in (".json", ".txt") and "fp16" not in path.name:
                (config / path.relative_to(hub[layout])).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, config / path.relative_to(hub[layout]))
        out[f"{layout}-config"] = config
        if layout == "sd15":
            torch.save({"state_dict": state}, root / "model.ckpt")
    return {"safetensors": root / "model.safetensors", "ckpt": root / "model.ckpt", "config": out["sd15-config"]} | {
        "sdxl": root / "sdxl.safetensors",
        "sdxl-config": out["sdxl-config"],
    }


@pytest.mark.parametrize(
    ("kind", "layout", "found", "scheduler", "steps"),
    [
        ("safetensors", "sd15", "v1", "PNDMScheduler", 50),
        ("ckpt", "sd15", "v1", "PNDMScheduler", 50),
        ("sdxl", "sdxl", "xl_base", "EulerDiscreteScheduler", 50),
    ],
)
def test_a_single_file_checkpoint_reproduces_the_pipeline_it_came_from(
    hub, single, kind, layout, found, scheduler, steps
):
    config = single["config" if layout == "sd15" else f"{layout}-config"]
    program = load_program(single[kind], config=config)
    assert program.source.format == "single-file" and program.source.path == str(single[kind])
    assert program.source.notes[0].startswith(
        f"single-file {found} checkpoint, converted by diffusers' from_single_file"
    )
    assert program.plan.scheduler_class == scheduler and program.plan.num_inference_steps == steps
    reference = load_program(hub[layout])
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


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache (this machine's real one is not the test's input)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_without_config_and_a_cached_tokenizer_it_is_one_line(single, hf_cache):
    result = CliRunner().invoke(main, ["inspect", str(single["safetensors"])])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert (
        "a single-file v1 checkpoint carries no tokenizer, and the Hugging Face cache holds none of"
        " stable-diffusion-v1-5/stable-diffusion-v1-5 (tokenizer; a vocabulary, not shipped here): pass --config"
    ) in line


def test_without_config_the_shipped_configs_and_the_cached_tokenizer_are_used(hub, single, hf_cache):
    """The shipped v1 configs are SD 1.5's full size: the tiny checkpoint does not fit them, and the one line
    says which configs diffusers was given (the cached tokenizer found offline, nothing fetched)."""
    snapshot = hf_cache / "models--stable-diffusion-v1-5--stable-diffusion-v1-5" / "snapshots" / ("0" * 40)
    shutil.copytree(hub["sd15"] / "tokenizer", snapshot / "tokenizer")
    (hf_cache / "models--stable-diffusion-v1-5--stable-diffusion-v1-5" / "refs").mkdir()
    (hf_cache / "models--stable-diffusion-v1-5--stable-diffusion-v1-5" / "refs" / "main").write_text("0" * 40)
    with pytest.raises(LoadError) as error:
        load_program(single["safetensors"])
    assert (
        "diffusers cannot load it as StableDiffusionPipeline with the shipped v1 configs and the cached tokenizers"
        " of stable-diffusion-v1-5/stable-diffusion-v1-5 ("
    ) in str(error.value)
    assert "\n" not in str(error.value)


# Parameter counts of the published models (their model cards and diffusers' own loading logs): the shipped
# configs build exactly these networks, so every size and repetition count in them is the hub's.
PUBLISHED = {
    ("v1", "unet"): 859_520_964,
    ("v1", "vae"): 83_653_863,
    ("v1", "text_encoder"): 123_060_480,
    ("v2", "unet"): 865_910_724,
    ("v2", "text_encoder"): 340_387_840,
    ("xl_base", "unet"): 2_567_463_684,
    ("xl_base", "vae"): 83_653_863,
    ("xl_base", "text_encoder"): 123_060_480,
    ("xl_base", "text_encoder_2"): 694_659_840,
}


@pytest.mark.parametrize(("layout", "component"), sorted(PUBLISHED))
def test_the_shipped_configs_build_the_published_networks(layout, component):
    import transformers

    from core.single_file import SHIPPED

    config = json.loads((SHIPPED / layout / component / "config.json").read_text())
    with torch.device("meta"):
        if "_class_name" in config:
            model = getattr(diffusers, config["_class_name"]).from_config(config)
        else:
            cls = getattr(transformers, config["architectures"][0])
            model = cls(cls.config_class.from_dict(config))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[(layout, component)]
    index = json.loads((SHIPPED / layout / "model_index.json").read_text())
    assert index[component][1] == type(model).__name__


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
