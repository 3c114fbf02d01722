"""Our FID network and Fréchet distance equal pytorch-fid's (run in .venv-fid, made by `.ci/fid-env`:
pytorch-fid needs torchvision, which does not import beside this project's CPU torch; see the README).
Same random weights (the ported graph's architecture; no fidelity claim), same images."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from verify.inception_v3 import FIDInceptionV3
from verify.metrics import frechet_distance

SIDE = Path(__file__).resolve().parents[2] / ".venv-fid" / "bin" / "python"

NARROW = 256  # FD on 6 vs 6 samples of the first NARROW features: singular covariances, as in 2048-D, at a
# fraction of the cost (scipy's sqrtm is cubic in the dimension: 2048-D took most of this test's 84 s)

PEER = """
import json, sys, types
import numpy as np, torch
sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
from pytorch_fid import inception
from pytorch_fid.fid_score import calculate_frechet_distance
weights, images, out = sys.argv[1:4]
inception.load_state_dict_from_url = lambda *a, **k: torch.load(weights, weights_only=True)
model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
with torch.no_grad():
    features = model(torch.from_numpy(np.load(images)))[0].squeeze(-1).squeeze(-1).double().numpy()
np.save(out, features)
a, b = features[:6, :NARROW], features[6:, :NARROW]
wide = np.load(images.replace(".npy", "-x.npy")), np.load(images.replace(".npy", "-y.npy"))
fd = {}
for name, (x, y) in {"images": (a, b), "wide": wide}.items():
    moments = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    fd[name] = float(calculate_frechet_distance(*moments))
print(json.dumps(fd))
""".replace("NARROW", str(NARROW))


@pytest.mark.skipif(not SIDE.exists(), reason="no .venv-fid (make it with .ci/fid-env; .ci/run does)")
def test_our_inception_features_and_frechet_distance_equal_pytorch_fid(tmp_path):
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 64, 64))  # batch norms see data: features of a usable scale
    model.eval()
    weights = tmp_path / "fid.pth"
    torch.save(model.state_dict(), weights)
    images = torch.rand(12, 3, 40, 40)  # resized to 299 by both
    np.save(tmp_path / "img.npy", images.numpy())
    rng = np.random.default_rng(0)  # a wide set: more samples than dimensions (scipy's sqrtm path)
    np.save(tmp_path / "img-x.npy", rng.standard_normal((300, 20)))
    np.save(tmp_path / "img-y.npy", 1.5 * rng.standard_normal((300, 20)) + 0.2)
    peer = subprocess.run(
        [str(SIDE), "-c", PEER, str(weights), str(tmp_path / "img.npy"), str(tmp_path / "peer.npy")],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    theirs = np.load(tmp_path / "peer.npy")
    with torch.no_grad():
        ours = model(images).double().numpy()
    assert ours.shape == theirs.shape == (12, 2048) and ours.std() > 1e-3
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())
    fd = json.loads(peer.stdout.strip().splitlines()[-1])
    assert frechet_distance(ours[:6, :NARROW], ours[6:, :NARROW]) == pytest.approx(fd["images"], rel=1e-3)
    x, y = np.load(tmp_path / "img-x.npy"), np.load(tmp_path / "img-y.npy")
    assert frechet_distance(x, y) == pytest.approx(fd["wide"], rel=1e-6)
