"""A candidate's final samples judged against the original's on the same seeds and conditions."""

from __future__ import annotations

from typing import Any

import torch

from core.ir import DiffusionProgram
from core.stages import decode
from verify.fidelity import DigitsJudge, compare


class Verdict:
    """verify.fidelity.compare of a candidate's finals against the original's, on decoded images for a
    latent pipeline: the original's VAE decodes every candidate (so candidates differ by their denoising
    loop alone) and the reference once."""

    def __init__(self, program: DiffusionProgram, reference: Any, judge: DigitsJudge | None) -> None:
        self.reference, self.judge, self.stages = reference, judge, program.stages
        self.reference_images = None if program.stages.vae is None else decode(program.stages, reference.final)

    @classmethod
    def for_program(cls, program: DiffusionProgram, reference: Any) -> Verdict:
        """With the digits judge where it applies to `program`."""
        return cls(program, reference, DigitsJudge.load() if DigitsJudge.applies(program) else None)

    def __call__(self, final: torch.Tensor, errors: list[float]) -> dict[str, Any]:
        images = None if self.reference_images is None else (self.reference_images, decode(self.stages, final))
        return compare(self.reference, final, errors, self.judge, images=images)
