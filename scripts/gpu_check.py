"""The GPU check (issue 34): what the CPU suite cannot run, on a lent GPU, in about 8 minutes of device time.

    .venv/bin/python scripts/gpu_check.py OUT

1. TensorRT: the shipped DiT quantized to FP8 for an H100-class target with `--device cuda`: calibration and
   the quantize pass run on the GPU, the Q/DQ graph is linted and built into an engine where TensorRT imports
   (else the report says what ran instead), verified against the original on the GPU.
2. Training on CUDA: one short progressive-distillation round (`--device cuda`, bf16 with float32 master
   weights), lowered and verified.
3. `torchrun` with NCCL: two ranks train the same recipe (needs two GPUs; with one, skipped with its reason).

Each step's exit code, seconds and the report's placement, backend and key numbers go to OUT/gpu-check.json.
Without a CUDA GPU nothing runs: one line says so and the exit code is 0 (the suite checks that).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "zoo" / "weights" / "dit-digits.safetensors"
FAST = ["--samples", "20", "--calibration-samples", "4", "--seed-sets", "1", "--latency-repeats", "5"]


def target(folder: Path, name: str, base: str, recipe: list[dict[str, Any]]) -> Path:
    """A shipped target's hardware, backend and gates with a short recipe."""
    data = json.loads((ROOT / "optimizer" / "targets" / f"{base}.json").read_text())
    data.update(name=name, recipe=recipe, alternatives=[])
    data.pop("search", None)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def optimize(args: list[str], out: Path, launcher: list[str] | None = None) -> dict[str, Any]:
    command = [*(launcher or [sys.executable, "-m", "optimizer.cli"]), str(MODEL), *args, "--out", str(out), *FAST]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    row: dict[str, Any] = {
        "command": " ".join(command),
        "exit": done.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "tail": done.stdout.strip().splitlines()[-8:] + done.stderr.strip().splitlines()[-4:],
    }
    report = out / "report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        v = data["verification"]
        row.update(
            placement=data["model"].get("placement"),
            backend=data.get("backend_details"),
            psnr_db_mean=v.get("psnr_db_mean"),
            eps_rel_error_max=v.get("eps_rel_error_max"),
            latency=data.get("latency"),
        )
    return row


def main(out: Path) -> int:
    import torch

    if not torch.cuda.is_available():
        print("skipped: torch sees no CUDA GPU here (the GPU check runs where the device tool lends one)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    gpus = torch.cuda.device_count()
    rows: dict[str, Any] = {"gpus": [torch.cuda.get_device_name(i) for i in range(gpus)], "torch": torch.__version__}
    fp8_config = {"weights": "fp8", "activations": "fp8", "calibration": "timestep", "max_sample_error": 0.05}
    fp8 = target(work, "gpu-check-fp8", "h100-fp8", [{"pass": "quantize", "config": fp8_config}])
    rows["tensorrt_fp8"] = optimize(["--target", str(fp8), "--device", "cuda"], work / "fp8")
    steps = [
        {"pass": "progressive_distill", "config": {"sampling_steps": 10, "round_steps": 20, "samples": 16, "batch": 8}}
    ]
    distill = target(work, "gpu-check-steps", "cpu-steps", steps)
    rows["distill_cuda_bf16"] = optimize(["--target", str(distill), "--device", "cuda", "--dtype", "bf16"], work / "st")
    if gpus >= 2:
        torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "-m", "optimizer.cli"]
        rows["torchrun_nccl"] = optimize(["--target", str(distill), "--device", "cuda"], work / "ddp", torchrun)
    else:
        rows["torchrun_nccl"] = {"skipped": f"NCCL needs a GPU per rank; this machine has {gpus}"}
    (out / "gpu-check.json").write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))
    return 0 if all(r.get("exit", 0) in (0, 1) for r in rows.values() if isinstance(r, dict)) else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "gpu-check-out"))))
