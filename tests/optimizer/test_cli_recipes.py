"""The shipped CPU recipes (cpu-int8, cpu-cache, cpu-prune, cpu-steps) end to end on the shipped DiT, budgets
shortened: in a file of their own, so that pytest-xdist (--dist loadfile) can run them beside
tests/optimizer/test_cli.py's other runs."""

import json
import math

import pytest
from helpers import assert_exit_matches_report, invoke

from bench.scale import Geometry, compare_at_scale, dit_config
from optimizer.targets import TARGETS_DIR, get_target

# A DiT geometry other than the shipped one's, small enough to lower in seconds (bench --scale's replay).
SMALL_DIT = Geometry("small-dit", "DiTTransformer2DModel", dit_config(4, 4, 16, latent=8), 1000, "test geometry")


def test_cpu_int8_on_the_shipped_dit_passes_its_default_gates(tmp_path, dit_copy):
    out = tmp_path / "out"
    args = ["--samples", "12", "--calibration-samples", "2", "--latency-repeats", "1", "--seed-sets", "1"]
    result = invoke(dit_copy, "--target", "cpu-int8", "--out", out, *args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["gates"] == get_target("cpu-int8").gates and not report["gate_overrides"]
    notes = report["decisions"]["quantize"]
    assert notes["quantized_layers"] >= 45 and notes["calibration"]["method"] == "timestep"
    assert report["artifacts"]["onnx_bytes"] < 0.75 * report["artifacts"]["reference_onnx_bytes"]
    assert {"ort_per_step_ms", "ort_fp32_per_step_ms", "torch_per_step_ms"} <= set(report["latency"])
    text = (out / "report.md").read_text()
    assert "## Quantization" in text and "ONNX Runtime fp32" in text
    assert not (out / ".reference").exists()

    # The same decisions on another geometry of the family (random weights): formats and fallback replayed.
    scaled = compare_at_scale(report, {"name": "onnxruntime"}, SMALL_DIT, 1, lambda _: None)
    assert scaled["replayed"] == ["quantize"] and scaled["artifact"]["nfe"] == scaled["original"]["nfe"] == 40
    assert scaled["original"]["quantized_layers"] == 0 and scaled["artifact"]["quantized_layers"] > 20
    assert scaled["artifact"]["onnx_bytes"] < scaled["original"]["onnx_bytes"]
    assert scaled["speedup"] == scaled["original"]["loop_ms"] / scaled["artifact"]["loop_ms"]  # both loops timed


def test_cpu_cache_on_the_shipped_dit_halves_the_flops_and_passes_its_default_gates(tmp_path, dit_copy):
    # The shipped recipes without the cache pass's in-loop distribution check, which relaxes the budget past
    # half on the zoo models (BENCHMARKS.md) and samples 200 seeds per budget; tests/passes test the check.
    data = json.loads((TARGETS_DIR / "cpu-cache.json").read_text())
    for recipe in [data["recipe"], *data["alternatives"]]:
        recipe[-1]["config"]["max_fd_shift"] = 0.0
    target = tmp_path / "cpu-cache.json"
    target.write_text(json.dumps(data))
    out = tmp_path / "out"
    args = ["--samples", "12", "--calibration-samples", "2", "--latency-repeats", "0", "--seed-sets", "1"]
    result = invoke(dit_copy, "--target", target, "--out", out, *args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["gates"] == get_target("cpu-cache").gates and not report["gate_overrides"]
    flops = report["flops"]
    assert flops["candidate"]["per_image"] * 2 <= flops["original"]["per_image"]
    assert report["artifacts"]["onnx"] == ["denoiser_full.onnx", "denoiser_cached.onnx"]
    choice = report["recipe_selection"]
    tried = choice["tried"]
    assert [row["passes"] for row in tried] == ["guidance + cache", "cache"]
    # The kept recipe is the one closer to the original on the calibration seeds, and it is what ran.
    assert choice["chosen"] == max(range(len(tried)), key=lambda i: tried[i]["calibration_psnr_db"])
    assert " + ".join(report["decisions"]) == tried[choice["chosen"]]["passes"]
    text = (out / "report.md").read_text()
    assert "## Cache schedule" in text and "## Guidance policy" in text and "fewer)" in text
    assert "## Recipe selection" in text
    png = tmp_path / "s.png"
    assert invoke("sample", out, "--seed", 1, "--label", 3, "--out", png).exit_code == 0


def test_cpu_prune_recipe_end_to_end_on_the_shipped_dit(tmp_path, dit_copy):
    """The cpu-prune recipe with a shortened recovery: a smaller graph, verified, gated and reported."""
    data = json.loads((TARGETS_DIR / "cpu-prune.json").read_text())
    data["name"] = "cpu-prune-short"
    data["recipe"][-1]["config"].update(steps=20, teacher_samples=8)
    target = tmp_path / "short.json"
    target.write_text(json.dumps(data))
    out = tmp_path / "out"
    args = ["--samples", "12", "--calibration-samples", "8", "--latency-repeats", "0", "--seed-sets", "1", "--json"]
    result = invoke(dit_copy, "--target", target, "--out", out, *args)
    report = assert_exit_matches_report(result, out)
    assert [p["name"] for p in report["passes"]] == ["layer_removal", "prune", "recover"]
    fidelity = [p["fidelity"]["calibration_psnr_db"] for p in report["passes"]]
    assert fidelity[2] > fidelity[1]  # recovery measurably helps, even this short
    assert report["model"]["candidate_parameters"] < 0.75 * report["model"]["parameters"]
    # The original's fp32 graph is 1.18x its weights file; the pruned graph is smaller than that file.
    assert report["artifacts"]["onnx_bytes"] < report["model"]["input_bytes"]
    assert report["flops"]["candidate"]["per_image"] < 0.7 * report["flops"]["original"]["per_image"]
    assert report["gates"] == get_target("cpu-prune").gates
    text = (out / "report.md").read_text()
    assert "## Layer removal" in text and "## Width pruning" in text and "## Recovery distillation" in text


def test_cpu_steps_recipe_end_to_end_and_a_failed_gate_exits_1(tmp_path, dit_copy):
    """The cpu-steps recipe with tiny budgets and a reused calibration file: a 4-step unguided DDIM
    student on a custom grid, lowered, run by the ORT runner from plan.json and reported against the
    original loop; a PSNR bound added on the command line fails (the loop changed), so exit 1."""
    calibration = tmp_path / "cal.safetensors"
    assert invoke("calibrate", dit_copy, "--out", calibration, "--samples", 3).exit_code == 0
    data = json.loads((TARGETS_DIR / "cpu-steps.json").read_text())
    data["name"] = "cpu-steps-short"
    for step in data["recipe"]:
        step["config"].update(batch=8, samples=16, **({"steps": 10} if step["pass"] == "guidance_distill" else {}))
    checked = {"max_fd_shift": 100.0, "check_samples": 4}  # the distribution checks run and keep any student
    data["recipe"][0]["config"].update(max_steps=20, **checked)
    data["recipe"][-1]["config"].update(round_steps=5, **checked)
    target = tmp_path / "short.json"
    target.write_text(json.dumps(data))
    out = tmp_path / "out"
    args = ["--samples", "10", "--calibration", calibration, "--latency-repeats", "0", "--min-psnr", "60"]
    args += ["--seed-sets", "1"]  # the subject is the recipe and the failed PSNR gate, not the distribution
    result = invoke(dit_copy, "--target", target, "--out", out, *args)
    assert result.exit_code == 1
    assert "min_psnr_db" in result.output and "FAIL" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["gates"] == {**get_target("cpu-steps").gates, "min_psnr_db": 60}
    assert [p["name"] for p in report["passes"]] == ["guidance_distill", "progressive_distill"]
    assert report["passes"][1]["config"]["round_steps"] == 5
    (check,) = report["decisions"]["guidance_distill"]["checks"]  # within the bound after one chunk: no more
    assert check["steps"] == 10 and report["decisions"]["guidance_distill"]["steps"] == 10
    rounds = report["decisions"]["progressive_distill"]["rounds"]
    assert [len(r["checks"]) for r in rounds] == [1, 1, 1] and all(r["kept"] for r in rounds)
    assert all(math.isfinite(r["fd_shift"]) and r["fd_shift"] <= 100 for r in rounds)
    assert report["passes"][1]["fidelity"]["eps_rel_error_max"] is None  # the student is its own reference
    assert report["verification"]["psnr_db_mean"] < 60
    plan = json.loads((out / "plan.json").read_text())["sampling"]
    assert plan["scheduler_class"] == "GridDDIMScheduler" and plan["guidance_scale"] == 1.0
    assert len(plan["timesteps"]) == plan["num_inference_steps"] == 4
    assert report["flops"]["candidate"]["per_image"] * 10 == pytest.approx(report["flops"]["original"]["per_image"])
    text = (out / "report.md").read_text()
    assert "**Result: FAIL**" in text and "## Latency\nNot measured (--latency-repeats 0)." in text
    assert "artifact's loop: `GridDDIMScheduler`, 4 steps at timesteps" in text
    assert "## Guidance distillation" in text and "## Progressive distillation" in text
    assert "- (new reference)" in text  # no teacher-forced error against itself
    assert report["latency"] == {"skipped": "--latency-repeats 0"} and "reference_onnx_bytes" not in report["artifacts"]
    assert (out / "calibration.safetensors").read_bytes() == calibration.read_bytes()
    png = tmp_path / "s.png"
    assert invoke("sample", out, "--seed", 1, "--label", 3, "--out", png).exit_code == 0
