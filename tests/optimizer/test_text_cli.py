"""`optimize` on text-to-image pipeline folders: one run end to end (tiny random pipeline: mechanics of
stages, report and artifact) and every bad prompt or folder input refused with one line, exit 2."""

import json
import os
import shutil

import pytest
from click.testing import CliRunner
from helpers import assert_exit_matches_report

from core.errors import EXIT_BAD_INPUT
from optimizer.cli import main
from zoo import PIPELINES, SHIPPED

FAST = ["--samples", "2", "--calibration-samples", "1", "--latency-repeats", "1", "--steps", "3"]


def test_cpu_fp32_on_a_text_pipeline_lowers_every_stage(text_folders, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(text_folders["sd"]), "--out", str(out), *FAST], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    files = {p.name for p in out.iterdir()}
    assert {"denoiser.onnx", "prompt_encoder.onnx", "decoder.onnx", "tokenizer", "plan.json"} <= files
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["space"] == "decoded images" and report["verification"]["psnr_db_mean"] >= 60
    assert report["model"]["stages"]["prompts"] == 3 and report["model"]["stages"]["vae"] == "AutoencoderKL"
    text = (out / "report.md").read_text()
    assert "same seeds/prompts/scheduler/steps, on decoded images" in text and "prompt_encoder.onnx" in text
    png = tmp_path / "x.png"
    args = ["sample", str(out), "--seed", "0", "--seed", "1", "--prompt", "a thin one", "--out", str(png)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0 and png.stat().st_size > 0, result.output


def _copy(text_folders, tmp_path, drop_prompts=False):
    folder = tmp_path / "pipe"
    shutil.copytree(text_folders["sd"], folder)
    if drop_prompts:
        (folder / "prompts.txt").unlink()
    return folder


CASES = [
    ("no-prompt-set", lambda f, t: [_copy(f, t, drop_prompts=True)], "needs a prompt set: pass --prompts FILE"),
    ("missing-prompts-file", lambda f, t: [f["sd"], "--prompts", t / "none.txt"], "no such prompts file"),
    ("empty-prompts-file", lambda f, t: [f["sd"], "--prompts", _write(t / "p.txt", "\n# x\n")], "holds no prompts"),
    (
        "prompt-over-the-token-limit",
        lambda f, t: [f["sd"], "--prompts", _write(t / "p.txt", "a thin one " * 10)],
        "text encoder 1 takes at most 16",
    ),
    (
        "prompts-for-a-class-model",
        lambda f, t: [SHIPPED["dit"], "--prompts", _write(t / "p.txt", "a one")],
        "is not text-conditioned",
    ),
    ("prompts-is-a-folder", lambda f, t: [f["sd"], "--prompts", t], "the prompts file is not a regular file"),
    ("prompts-is-a-fifo", lambda f, t: [f["sd"], "--prompts", _fifo(t / "p.fifo")], "prompts file is not a regular"),
    (
        "fifo-in-a-component",
        lambda f, t: [_special(_copy(f, t), lambda p: os.mkfifo(p))],
        "the component file is not a regular file",
    ),
    (
        "dev-zero-link-in-a-component",
        lambda f, t: [_special(_copy(f, t), lambda p: p.symlink_to("/dev/zero"))],
        "the component file is not a regular file",
    ),
    (
        "unknown-scheduler-class",
        lambda f, t: [_scheduler(_copy(f, t), _class_name="NoSuchScheduler")],
        "scheduler/scheduler_config.json: scheduler.class",
    ),
    ("no-denoiser", lambda f, t: [_without(_copy(f, t), "unet")], "names no 'transformer' or 'unet' component"),
    ("unsupported-family", lambda f, t: [_renamed(_copy(f, t))], "unsupported architecture 'UVit2DModel' (supported:"),
    (
        "unknown-text-encoder-class",
        lambda f, t: [_index(_copy(f, t), text_encoder=["transformers", "BertModel"])],
        "unsupported text_encoder class 'BertModel'",
    ),
]


def _special(folder, make):
    """The pipeline with its tokenizer's first JSON file replaced by a special file (`make(path)`)."""
    path = sorted((folder / "tokenizer").glob("*.json"))[0]
    path.unlink()
    make(path)
    return folder


def _scheduler(folder, **changes):
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


def _fifo(path):
    os.mkfifo(path)
    return path


def _write(path, text):
    path.write_text(text)
    return path


def _index(folder, **entries):
    index = json.loads((folder / "model_index.json").read_text())
    index.update(entries)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _without(folder, component):
    return _index(folder, **{component: None})


def _renamed(folder):
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "UVit2DModel"}))
    return folder


@pytest.mark.parametrize(("case", "build", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_text_inputs_are_one_line_exit_2(text_folders, tmp_path, case, build, fragment):
    args = [str(a) for a in build(text_folders, tmp_path)]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out"), *FAST], catch_exceptions=False)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_cpu_int8_on_the_trained_sd_pipeline_keeps_prompt_adherence(tmp_path):
    """The shipped trained SD-style pipeline (small budget; BENCHMARKS.md has both pipelines at full size):
    INT8 stays close on decoded images, the original follows its prompts (the prompted digit, judged by
    the digits classifier) and so does the artifact. The FD gate needs more than 12 samples: not asserted."""
    out = tmp_path / "out"
    args = ["--samples", "12", "--calibration-samples", "4", "--latency-repeats", "0", "--steps", "10"]
    result = CliRunner().invoke(
        main, [str(PIPELINES["sd-digits"]), "--target", "cpu-int8", "--out", str(out), *args], catch_exceptions=False
    )
    report = assert_exit_matches_report(result, out)
    v = report["verification"]
    assert v["space"] == "decoded images" and v["class_agreement_reference"] >= 0.85
    assert v["class_agreement_drop"] <= 0.02 and v["psnr_db_mean"] >= 35 and v["ssim_mean"] >= 0.99
    kept = report["decisions"]["quantize"]["kept_fp32"]
    assert any(name.endswith("attn2.to_k") for name in kept)  # cross-attention K/V of the prompt: fp32 by default


def _tokenizer(artifact):
    """The artifact's tokenizer folder and the first file plan.json records in it."""
    (tokenizer,) = json.loads((artifact / "plan.json").read_text())["stages"]["prompt_encoder"]["tokenizers"]
    return artifact / tokenizer["folder"], sorted(tokenizer["files"])[0]


def _tamper(how):
    def build(artifact, outside):
        folder, name = _tokenizer(artifact)
        path = folder / name
        if how == "plan-link":
            shutil.move(artifact / "plan.json", outside)
            (artifact / "plan.json").symlink_to(outside)
            return
        path.unlink()
        if how == "swapped":
            path.write_text("{}")
        elif how == "fifo":
            os.mkfifo(path)
        elif how == "dev-zero-link":
            path.symlink_to("/dev/zero")
        elif how == "moved":
            (folder / "elsewhere").write_text("x")

    return build


TAMPERED = [
    ("deleted", "not recorded in plan.json, lacks ['"),
    ("swapped", "does not match its recorded sha256; refusing to read it"),
    ("fifo", "is a link or not a regular file; refusing to read it"),
    ("dev-zero-link", "is a link or not a regular file; refusing to read it"),
    ("moved", "holds ['elsewhere'] not recorded in plan.json"),
    ("plan-link", "is a link; an artifact's files are read only from inside its folder"),
]


@pytest.mark.parametrize(("how", "fragment"), TAMPERED, ids=[t[0] for t in TAMPERED])
def test_sample_refuses_a_tampered_tokenizer_or_plan(cached_sd_artifact, tmp_path, how, fragment):
    """Every file an artifact reads is recorded with its sha256 and read only from inside its folder:
    a changed, missing, special or linked tokenizer file (or plan.json) is one line, exit 2, in seconds."""
    _, artifact = cached_sd_artifact
    folder = shutil.copytree(artifact, tmp_path / "artifact")
    _tamper(how)(folder, tmp_path / "outside.json")
    args = ["sample", str(folder), "--seed", "0", "--prompt", "a thin one", "--out", str(tmp_path / "x.png")]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert not (tmp_path / "x.png").exists()
