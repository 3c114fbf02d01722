"""Issue 34, item 3 (CPU paths): `--dtype bf16` places the original's modules in bfloat16 (as
`pipe.to(torch.bfloat16)`); the loop, calibration files and metrics stay float32 on the host; graphs are
exported in float32 from the placed weights (ONNX Runtime's CPU provider has no bfloat16 kernels), and the
report states where the reference ran and the precision floor it implies. Random weights: mechanics."""

import json

import onnx
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_exit_matches_report, lower, shortened

from backends.registry import open_runner
from core.adapters import torch_denoise
from core.errors import ConfigError
from core.loading import fp32_copy, load_program, place
from core.placement import Placement
from optimizer.cli import main


@pytest.fixture(scope="module")
def programs(tiny_digits_dit):
    fp32 = load_program(tiny_digits_dit)
    return fp32, place(load_program(tiny_digits_dit), Placement("cpu", "bf16"))


def test_a_placement_names_a_device_this_machine_has_and_a_known_dtype():
    assert Placement().is_default and Placement("cpu", "bf16").describe() == "torch bfloat16 on cpu"
    with pytest.raises(ConfigError, match="--dtype must be one of fp32, bf16, fp16"):
        Placement("cpu", "int8")
    with pytest.raises(ConfigError, match="--device must be cpu, cuda or cuda:N"):
        Placement("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="this machine has no CUDA GPU"):
            Placement("cuda:0")


def test_a_bf16_program_runs_in_bf16_and_hands_the_loop_float32(programs):
    fp32, bf16 = programs
    assert next(bf16.denoiser.parameters()).dtype == torch.bfloat16
    assert next(fp32.denoiser.parameters()).dtype == torch.float32  # loaded apart: the fp32 program is untouched
    torch.manual_seed(0)
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([999.0, 600.0, 300.0, 1.0]), torch.tensor([0, 3, 6, 10])
    out = torch_denoise(bf16)(x, t, {"class_labels": y})
    reference = torch_denoise(fp32)(x, t, {"class_labels": y})
    assert out.dtype == torch.float32
    error = float((out - reference).norm() / reference.norm())
    assert 1e-4 < error < 5e-2  # bfloat16's rounding, neither none nor a broken cast
    # The placement is part of the fingerprint (calibration files of one do not serve the other); a default
    # placement leaves the fingerprint what it was.
    assert bf16.fingerprint() != fp32.fingerprint() == fp32_copy(fp32).fingerprint()


def test_graphs_of_a_bf16_program_are_float32_with_its_weights(programs, tmp_path):
    _, bf16 = programs
    lower(bf16, tmp_path)
    graph = onnx.load(str(tmp_path / "denoiser.onnx"))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    torch.manual_seed(1)
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([900.0, 500.0, 10.0]), {"class_labels": torch.tensor([1, 2, 3])}
    expected = torch_denoise(fp32_copy(bf16))(x, t, y)  # the bf16 weights computed in float32
    torch.testing.assert_close(open_runner(tmp_path).denoise(x, t, y), expected, rtol=1e-4, atol=1e-5)
    assert next(bf16.denoiser.parameters()).dtype == torch.bfloat16  # the export copied, never cast the program


@pytest.mark.parametrize("target", ["cpu-fp32", "cpu-int8"])
def test_dtype_bf16_runs_the_cpu_targets_end_to_end_and_states_the_precision_floor(target, tiny_digits_dit, tmp_path):
    out = tmp_path / "out"
    args = ["--samples", "4", "--calibration-samples", "2", "--latency-repeats", "0", "--seed-sets", "1"]
    target_file = shortened(target, tmp_path)
    result = CliRunner().invoke(
        main, [str(tiny_digits_dit), "--target", target_file, "--out", str(out), "--dtype", "bf16", *args]
    )
    report = assert_exit_matches_report(result, out)
    assert report["model"]["placement"] == {"device": "cpu", "dtype": "bf16"}
    v = report["verification"]
    assert v["precision_floor_psnr_db"] > 0 and v["precision_floor_eps_rel_error"] > 0
    if target == "cpu-fp32":
        # The float32 lowering of the unchanged network sits at the precision floor: the artifact is exact, what
        # the paired metrics see is the reference's bfloat16.
        assert v["psnr_db_mean"] == pytest.approx(v["precision_floor_psnr_db"], abs=0.05)
        assert v["eps_rel_error_max"] == pytest.approx(v["precision_floor_eps_rel_error"], rel=1e-3)
    else:
        assert report["decisions"]["quantize"]["quantized_layers"] > 0
    text = (out / "report.md").read_text()
    assert "reference = original in torch bf16 on cpu" in text and "the precision floor" in text
    assert "precision floor (the bf16 original computed in float32" in result.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["model"]["fingerprint"] != load_program(tiny_digits_dit).fingerprint()


def test_a_device_this_machine_lacks_is_one_line_exit_2(tiny_digits_dit, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: --device cuda is valid here")
    result = CliRunner().invoke(main, [str(tiny_digits_dit), "--device", "cuda", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --device cuda: this machine has no CUDA GPU (torch sees none)"
    ]


def test_a_bf16_model_trains_on_float32_master_weights():
    """Updates below bfloat16's resolution accumulate in the float32 masters and reach the model once they add
    up: stepping the bf16 weights directly would lose every one of them."""
    from core.training import Trainer

    model = torch.nn.Linear(4, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)  # bf16 spacing at 1.0 is 2**-7: an update of 1e-3 alone rounds away
    trainer = Trainer(model, lr=1e-3, steps=20, max_seconds=60.0)
    assert trainer.master[0].dtype == torch.float32
    x = torch.ones(8, 4, dtype=torch.bfloat16)
    trainer.run(lambda step: model(x).float().square().mean())  # gradient > 0: every step lowers the weight
    master = trainer.master[0]
    assert float(master.max()) < 1.0 - 2**-7  # 20 AdamW steps of up to lr each (cosine): more than one bf16 spacing
    torch.testing.assert_close(model.weight, master.to(torch.bfloat16), rtol=0, atol=0)
    assert model.weight.dtype == torch.bfloat16 and not model.weight.requires_grad


def test_the_gpu_check_skips_with_its_reason_without_a_gpu(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: run scripts/gpu_check.py itself")
    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("skipped: torch sees no CUDA GPU here"), done.stderr
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


def test_gpu_memory_is_counted_before_a_cuda_run(monkeypatch, programs):
    """Without a GPU here, torch's CUDA queries are stood in for: the estimate is what is tested."""
    from core import limits
    from core.errors import LimitError
    from core.footprint import footprint
    from optimizer.prepare import check_job_memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (16 << 20, 80 << 30))  # 16 MiB free
    fp32, _ = programs
    spec = fp32.spec
    fp = footprint(spec.model_class, spec.model_config)
    full, half = (limits.device_job_memory(fp, size, True, 100) for size in (4, 2))
    assert half * 2 == full and half > 16 << 20
    on_gpu = fp32.replace(placement=Placement("cuda:0", "bf16"))  # placement recorded, nothing moved
    with pytest.raises(LimitError, match=r"GiB on cuda:0 and 0.0 GiB is free there; use fewer --samples"):
        check_job_memory(on_gpu, 100, allow_large=False)
    check_job_memory(on_gpu, 100, allow_large=True)
    check_job_memory(on_gpu, 1, allow_large=False)  # a small batch fits
