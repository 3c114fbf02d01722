"""Run by tests/core/test_torchrun.py, alone or under torchrun: recovery and progressive distillation
on the shipped DiT with tiny budgets; rank 0 saves the trained weights to ARGV[1]."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.capture import capture_calibration
from core.loading import load_program
from core.training import world
from passes import progressive_distill, recover
from passes.analyses import CALIBRATION, Analyses
from passes.base import Context
from zoo import SHIPPED


def main(out: Path) -> None:
    torch.set_num_threads(1)
    program = load_program(SHIPPED["dit"])
    analyses = Analyses()
    analyses.provide(CALIBRATION, program, capture_calibration(program, 4))
    ctx = Context(program, analyses, frozenset({"fp32"}), rng=torch.Generator().manual_seed(0))
    recovered = recover.run(program, recover.Config(steps=3, batch=8, samples=16, teacher_samples=0), ctx).program
    config = progressive_distill.Config(sampling_steps=10, round_steps=3, batch=8, samples=8)
    distilled = progressive_distill.run(program, config, ctx).program
    if world().is_main:
        weights = {f"recover.{k}": v for k, v in recovered.denoiser.state_dict().items()}
        weights.update({f"distill.{k}": v for k, v in distilled.denoiser.state_dict().items()})
        save_file({k: v.contiguous() for k, v in weights.items()}, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
