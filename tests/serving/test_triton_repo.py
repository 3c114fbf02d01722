"""`optimize export-triton`: the repository's layout and configs (no server; tests/serving/test_triton.py
serves one)."""

import hashlib
import json
import shutil

import pytest
from click.testing import CliRunner
from helpers import lower

from optimizer.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_export_writes_graph_models_and_the_pipeline(tiny_digits_program, tmp_path):
    lower(tiny_digits_program, tmp_path / "artifact")
    result = invoke("export-triton", tmp_path / "artifact", "--repo", tmp_path / "repo", "--instances", 2)
    assert result.exit_code == 0, result.output
    repo = tmp_path / "repo"
    graph = (repo / "denoiser" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in graph and "count: 2" in graph and "TYPE_INT64" in graph
    graph_file = (tmp_path / "artifact" / "denoiser.onnx").read_bytes()
    assert (repo / "denoiser" / "1" / "model.onnx").read_bytes() == graph_file
    pipeline = (repo / "pipeline" / "config.pbtxt").read_text()
    assert 'backend: "python"' in pipeline and "dynamic_batching" in pipeline and "max_batch_size: 8" in pipeline
    assert 'name: "class_label"' in pipeline and 'name: "image"' in pipeline
    artifact = repo / "pipeline" / "1" / "artifact"
    assert json.loads((artifact / "models.json").read_text()) == {"denoiser.onnx": "denoiser"}
    assert (artifact / "plan.json").read_bytes() == (tmp_path / "artifact" / "plan.json").read_bytes()
    assert (repo / "pipeline" / "1" / "model.py").is_file() and not (repo / "denoiser" / "1" / "model.py").exists()

    python = invoke("export-triton", tmp_path / "artifact", "--repo", tmp_path / "py", "--graphs", "python")
    assert python.exit_code == 0 and (tmp_path / "py" / "denoiser" / "1" / "model.py").is_file()
    assert 'backend: "python"' in (tmp_path / "py" / "denoiser" / "config.pbtxt").read_text()

    again = invoke("export-triton", tmp_path / "artifact", "--repo", repo)
    assert again.exit_code == 2 and "exists" in again.output
    bad = invoke("export-triton", tmp_path / "artifact", "--repo", tmp_path / "r2", "--max-batch", 0)
    assert bad.exit_code == 2 and "max_batch" in bad.output and not (tmp_path / "r2").exists()
    assert not list(tmp_path.glob(".r2.*")) and not list(tmp_path.glob(".repo.*"))


def test_tensorrt_graphs_export_the_built_engines_as_tensorrt_plan_models(tiny_digits_program, tmp_path):
    from backends.registry import get_backend

    artifact = tmp_path / "artifact"
    written = get_backend({"name": "tensorrt"}).lower(tiny_digits_program, artifact)
    if written["tensorrt"]["engines"]["built"]:
        pytest.skip("engines were built here (GPU): tests/backends/test_tensorrt.py covers them")
    refused = invoke("export-triton", artifact, "--repo", tmp_path / "repo", "--graphs", "tensorrt")
    assert refused.exit_code == 2 and "no TensorRT engines" in refused.output and not (tmp_path / "repo").exists()

    # Layout only: these bytes stand in for the engine a GPU would build (no server loads them here).
    (artifact / "denoiser.plan").write_bytes(b"engine bytes")
    result = invoke("export-triton", artifact, "--repo", tmp_path / "repo", "--graphs", "tensorrt")
    assert result.exit_code == 0, result.output
    model = tmp_path / "repo" / "denoiser"
    assert (model / "1" / "model.plan").read_bytes() == b"engine bytes" and not (model / "1" / "model.onnx").exists()
    config = (model / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config and "KIND_GPU" in config and 'name: "class_labels"' in config
    assert (tmp_path / "repo" / "pipeline" / "1" / "artifact" / "plan.json").is_file()


def test_bench_serving_without_a_server_is_one_clear_line(tiny_digits_program, tmp_path):
    lower(tiny_digits_program, tmp_path / "artifact")
    result = invoke("bench-serving", tmp_path / "artifact", "--url", "127.0.0.1:1")
    assert result.exit_code == 2 and "no Triton server answers at 127.0.0.1:1" in result.output
    result = invoke("bench-serving", tmp_path / "artifact", "--env", tmp_path / "none")
    assert result.exit_code == 2 and "optimize serving-env" in result.output


def test_a_text_to_image_export_copies_exactly_the_recorded_tokenizer_files(cached_sd_artifact, tmp_path):
    _, artifact = cached_sd_artifact
    outside = tmp_path / "secret.txt"
    outside.write_text("not the artifact's")
    folder = shutil.copytree(artifact, tmp_path / "artifact")
    result = invoke("export-triton", folder, "--repo", tmp_path / "repo")
    assert result.exit_code == 0, result.output
    plan = json.loads((folder / "plan.json").read_text())
    (tokenizer,) = plan["stages"]["prompt_encoder"]["tokenizers"]
    copied = tmp_path / "repo" / "pipeline" / "1" / "artifact" / tokenizer["folder"]
    assert sorted(p.name for p in copied.iterdir()) == sorted(tokenizer["files"])
    for name, digest in tokenizer["files"].items():
        assert hashlib.sha256((copied / name).read_bytes()).hexdigest() == digest
    (folder / tokenizer["folder"] / "extra.txt").symlink_to(outside)  # a link to a file outside
    refused = invoke("export-triton", folder, "--repo", tmp_path / "repo2")
    assert refused.exit_code == 2 and not (tmp_path / "repo2").exists()
    line = refused.stderr.strip()
    assert line.endswith("holds ['extra.txt'] not recorded in plan.json, lacks nothing"), line


def test_a_full_disk_during_export_names_the_repository_not_the_artifact(tiny_digits_program, tmp_path, monkeypatch):
    import errno

    from serving import triton_repo

    lower(tiny_digits_program, tmp_path / "artifact")

    def full(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(src))

    monkeypatch.setattr(triton_repo.shutil, "copy2", full)
    result = invoke("export-triton", tmp_path / "artifact", "--repo", tmp_path / "repo")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: No space left on device: {tmp_path / 'repo'}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
