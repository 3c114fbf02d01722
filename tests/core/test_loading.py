"""Item 2: loading our checkpoints and diffusers folders; every bad input gives one clear LoadError."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.errors import LoadError
from core.loading import load_program
from zoo import SHIPPED


def outputs(program, batch=3):
    torch.manual_seed(1)
    x = torch.randn(batch, *program.spec.sample_shape)
    t = torch.tensor([10.0, 500.0, 990.0])[:batch]
    y = torch.tensor([0, 5, 9])[:batch]
    with torch.no_grad():
        return program.denoiser(x, t, class_labels=y).sample


@pytest.mark.parametrize("which", ["dit", "unet"])
def test_shipped_checkpoints_load_with_their_metadata(which):
    program = load_program(SHIPPED[which])
    assert program.spec.family == which
    assert program.spec.sample_shape == (1, 16, 16)
    assert program.spec.conditioning.num_classes == 10 and program.spec.conditioning.null_class == 10
    assert program.spec.blocks and program.spec.attention_sites and program.spec.temporal_modules
    assert program.plan.guidance_scale > 1
    assert not program.denoiser.training


def test_dit_spec_describes_the_architecture(dit_program):
    spec = dit_program.spec
    assert spec.blocks == tuple(f"transformer_blocks.{i}" for i in range(8))
    assert len(spec.attention_sites) == 8
    modules = dict(dit_program.denoiser.named_modules())
    assert all(name in modules for name in spec.blocks + spec.attention_sites + spec.temporal_modules)


def test_torch_ckpt_loads_with_weights_only(tmp_path, dit_program):
    ckpt = tmp_path / "dit.ckpt"
    torch.save({"state_dict": dit_program.denoiser.state_dict()}, ckpt)
    shutil.copy(SHIPPED["dit"].with_suffix(".json"), ckpt.with_suffix(".json"))
    torch.testing.assert_close(outputs(load_program(ckpt)), outputs(dit_program), rtol=0, atol=0)


@pytest.mark.parametrize("which", ["dit", "unet"])
def test_diffusers_model_folder_gives_the_same_network(tmp_path, which):
    program = load_program(SHIPPED[which])
    program.denoiser.save_pretrained(tmp_path / "model")
    loaded = load_program(tmp_path / "model")
    assert loaded.source.format == "diffusers"
    assert loaded.spec.model_class == program.spec.model_class
    torch.testing.assert_close(outputs(loaded), outputs(program), rtol=0, atol=0)


def test_diffusers_pipeline_folder_uses_its_scheduler(tmp_path, dit_program):
    from diffusers import DDIMScheduler

    root = tmp_path / "pipe"
    dit_program.denoiser.save_pretrained(root / "transformer")
    DDIMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DiTPipeline",
                "transformer": ["diffusers", "DiTTransformer2DModel"],
                "scheduler": ["diffusers", "DDIMScheduler"],
            }
        )
    )
    loaded = load_program(root)
    assert loaded.plan.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    assert loaded.spec.conditioning.null_class == 10  # DiT's label table has the extra null row
    torch.testing.assert_close(outputs(loaded), outputs(dit_program), rtol=0, atol=0)


# --- bad inputs ---------------------------------------------------------------------------------


def test_missing_file():
    with pytest.raises(LoadError, match="no such file"):
        load_program("/nonexistent/model.safetensors")


def test_truncated_safetensors(dit_copy):
    data = dit_copy.read_bytes()
    dit_copy.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="corrupt or truncated safetensors"):
        load_program(dit_copy)


def test_garbage_safetensors(dit_copy):
    dit_copy.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(LoadError, match="corrupt or truncated"):
        load_program(dit_copy)


def test_truncated_ckpt(tmp_path, dit_program):
    ckpt = tmp_path / "dit.ckpt"
    torch.save(dit_program.denoiser.state_dict(), ckpt)
    shutil.copy(SHIPPED["dit"].with_suffix(".json"), ckpt.with_suffix(".json"))
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(LoadError, match="corrupt or truncated checkpoint"):
        load_program(ckpt)


class Exploit:
    """Unpickling this would create a file: the loader must refuse it without running it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Exploit(marker)}, ckpt)
    shutil.copy(SHIPPED["dit"].with_suffix(".json"), ckpt.with_suffix(".json"))
    with pytest.raises(LoadError, match="refused") as refused:
        load_program(ckpt)
    assert not marker.exists()
    message = str(refused.value)  # what was refused, and never torch's advice to load it unsafely
    assert "Unsupported global: GLOBAL" in message and "weights_only" not in message and "safe_globals" not in message


def test_unknown_architecture(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UVit2DModel"}))
    save_file({"w": torch.zeros(1)}, str(folder / "diffusion_pytorch_model.safetensors"))
    supported = "ActionTransformer, DiTTransformer2DModel, FluxTransformer2DModel, LeRobotDiffusionUnet, "
    supported += "PixArtTransformer2DModel, SD3Transformer2DModel, UNet1DModel, UNet2DConditionModel, UNet2DModel"
    with pytest.raises(LoadError, match=f"unsupported architecture 'UVit2DModel' \\(supported: {supported}\\)"):
        load_program(folder)


def test_a_text_conditioned_denoiser_needs_its_pipeline_folder(tmp_path, text_folders):
    import shutil

    shutil.copytree(text_folders["sd"] / "unet", tmp_path / "unet")
    with pytest.raises(LoadError, match="text-conditioned; load its pipeline folder"):
        load_program(tmp_path / "unet")


def test_weights_that_do_not_fit_the_config(dit_copy):
    sidecar = dit_copy.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["model"]["config"]["num_layers"] = 4
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(LoadError, match="unexpected"):
        load_program(dit_copy)
    meta["model"]["config"]["num_layers"] = 8
    meta["model"]["config"]["attention_head_dim"] = 8
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(LoadError, match="shapes do not fit"):
        load_program(dit_copy)


def test_missing_or_broken_sidecar(dit_copy):
    sidecar = dit_copy.with_suffix(".json")
    sidecar.write_text("{not json")
    with pytest.raises(LoadError, match="not valid JSON"):
        load_program(dit_copy)
    sidecar.unlink()
    with pytest.raises(LoadError, match=r"single-file layout .*, nor one of ours \(missing config 'dit-digits.json'"):
        load_program(dit_copy)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    with pytest.raises(LoadError, match="unsupported file type"):
        load_program(path)


def test_files_the_loaders_never_read_are_never_hashed_or_opened(tmp_path, text_folders, monkeypatch):
    """A pipeline folder as a user's disk holds it: a 200 GiB sparse file, a FIFO and a /dev/zero link
    beside the component files. The source digest covers what the loaders read, nothing else (reading
    the sparse file took about 250 s, the FIFO and the link never end)."""
    import os

    from core import loading

    folder = tmp_path / "sd"
    shutil.copytree(text_folders["sd"], folder)
    with (folder / "vae" / "notes.bin").open("wb") as f:
        f.truncate(200 << 30)
    os.mkfifo(folder / "text_encoder" / "stray")
    (folder / "unet" / "zero").symlink_to("/dev/zero")
    hashed = []
    real = loading.sha256_files
    monkeypatch.setattr(loading, "sha256_files", lambda paths: hashed.extend(paths) or real(paths))
    program = load_program(folder)
    assert program.source.format == "diffusers" and len(program.source.digest) == 16
    names = {p.relative_to(folder).as_posix() for p in hashed}
    assert "unet/diffusion_pytorch_model.safetensors" in names and "vae/config.json" in names
    assert not names & {"vae/notes.bin", "text_encoder/stray", "unet/zero"}
