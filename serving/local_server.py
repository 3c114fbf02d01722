"""A real Triton server on this machine: the `tritonserver` binary of the nvidia-pytriton wheel (with its
Python backend) in a Python environment of its own (the wheel needs numpy < 2), started on 127.0.0.1 and
always stopped by whoever started it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from core.errors import ConfigError

PYTRITON = "nvidia-pytriton==0.7.0"
# What the served models import: graph models onnxruntime; the pipeline model this package (installed
# without its own dependencies), torch, diffusers (schedulers), transformers, onnx and safetensors.
SERVER_PACKAGES = ["torch==2.13.0", "numpy<2", PYTRITON, "onnxruntime", "onnx", "diffusers", "transformers"]
SERVER_PACKAGES += ["safetensors"]
PROJECT = Path(__file__).resolve().parents[1]


def create_env(folder: Path, log=print) -> Path:
    """A venv at `folder` with the server and what the exported models import; returns its python."""
    python = folder / "bin" / "python"
    if python.exists():
        return python
    log(f"creating the Triton server environment in {folder} (a few minutes) ...")
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *SERVER_PACKAGES], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(PROJECT)], check=True)
    return python


def _ask(python: Path, expression: str) -> str:
    """The value of a Python expression in another environment's interpreter."""
    code = f"import sys, sysconfig; print({expression})"
    return subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """`with TritonServer(env, repo, workdir) as server:` ... `server.url` (HTTP); stopped on exit, always."""

    def __init__(self, env: Path, repo: Path, workdir: Path, timeout: float = 120.0) -> None:
        self.env, self.repo, self.workdir, self.timeout = env, repo, workdir, timeout
        self.process: subprocess.Popen | None = None
        self.url = ""

    def _install_binary(self) -> tuple[Path, Path, dict[str, str]]:
        """Copy the wheel's server tree with the Python backend stub of the env's Python version."""
        python = self.env / "bin" / "python"
        site = Path(_ask(python, "sysconfig.get_paths()['purelib']"))
        dist = site / "pytriton" / "tritonserver"
        if not dist.is_dir():
            raise ConfigError(f"{self.env}: no {PYTRITON} in this environment (see serving.local_server.create_env)")
        server = self.workdir / "tritonserver"
        shutil.copytree(dist, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
        version = _ask(python, "f'{sys.version_info[0]}.{sys.version_info[1]}'")
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        shutil.copy2(stub, server / "backends" / "python")
        libdir = _ask(python, "sysconfig.get_config_var('LIBDIR')")
        env = dict(os.environ)
        # The stub must load the env's own libpython (not another build of the same version) and the
        # wheel's bundled libraries.
        env["LD_LIBRARY_PATH"] = f"{libdir}:{site / 'nvidia_pytriton.libs'}"
        env["PATH"] = f"{self.env / 'bin'}:{env['PATH']}"
        return server, site, env

    def __enter__(self) -> TritonServer:
        server, _, env = self._install_binary()
        http, grpc = _free_port(), _free_port()
        args = [str(server / "bin" / "tritonserver"), "--model-repository", str(self.repo)]
        args += ["--backend-directory", str(server / "backends"), "--allow-metrics", "false"]
        args += ["--exit-timeout-secs", "5"]  # in-flight requests get 5 s at stop (default 30)
        args += ["--http-address", "127.0.0.1", "--http-port", str(http)]
        args += ["--grpc-address", "127.0.0.1", "--grpc-port", str(grpc)]
        self.log = self.workdir / "tritonserver.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.url = f"127.0.0.1:{http}"
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import urllib.request

        deadline = time.monotonic() + self.timeout
        assert self.process is not None  # started
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"tritonserver not ready in {self.timeout:.0f} s: {self.log.read_text()[-2000:]}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __exit__(self, *exc) -> None:
        self.stop()
