"""The analysis notebooks execute headless (nbclient) with their small parameters, write their figures,
and the gradient-correctness notebook reproduces the paper's ordering (Table 3). Outputs are never
committed."""
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
EXPECTED = {
    "gradient_correctness.ipynb": ["gradient_correctness.png", "gradient_correctness_start.png",
                                   "gradient_correctness_by_error.png", "gradient_correctness.json"],
    "averaging_toy.ipynb": ["averaging_scalar.png", "averaging_pnp_directions.png", "averaging_pnp_descent.png"],
    "linearization.ipynb": ["linearization_std.png", "linearization_ratio.png", "linearization_samples.png"],
}
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


# ----------------------------------------------------------------------------------------------
# The helpers behind the notebooks (lcpose.analysis): fast checks against definitions
# ----------------------------------------------------------------------------------------------


def test_box_scenes_are_exact_surface_correspondences():
    import numpy as np

    from lcpose import analysis

    sc = analysis.box_scenes(3, 4, 32)
    assert sc.x2d.shape == (4, 32, 2) and sc.x3d.shape == (4, 32, 3) and sc.K.shape == (4, 3, 3)
    # x2d are pixel centres of the 64x64 output grid, and x3d projects exactly onto them.
    assert np.all(sc.x2d == np.round(sc.x2d)) and sc.x2d.min() >= 0 and sc.x2d.max() <= 63
    xc = np.einsum("bij,bnj->bni", sc.R, sc.x3d) + sc.t[:, None]
    uvw = np.einsum("bij,bnj->bni", sc.K, xc)
    np.testing.assert_allclose(uvw[..., :2] / uvw[..., 2:], sc.x2d, atol=1e-8)
    # On the box surface: some coordinate at +-half extent, all within it.
    half = sc.extent / 2
    assert np.all(np.abs(sc.x3d) <= half + 1e-9)
    assert np.all(np.min(np.abs(np.abs(sc.x3d) - half), axis=-1) < 1e-8)
    # Pairs are distinct pixels.
    for b in range(4):
        assert len({tuple(p) for p in sc.x2d[b]}) == 32


def test_scalar_toy_gradients_match_the_closed_form():
    import numpy as np

    from lcpose import analysis

    x = np.array([0.9, 1.0, 1.1, 2.5])
    w = np.array([1.0, 2.0, 1.0, 0.5])
    y, g_pose, g_corr = analysis.scalar_toy(x, 1.0, w)
    y_ref = np.sum(w * x) / np.sum(w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6)
    # d/dx_i 0.5 (y - 1)^2 = (y - 1) w_i / sum(w): one sign for every correspondence.
    np.testing.assert_allclose(g_pose, (y_ref - 1.0) * w / np.sum(w), rtol=1e-5)
    np.testing.assert_allclose(g_corr, x - 1.0, rtol=1e-6)


def test_mahalanobis_ratio_of_gaussian_samples_is_one():
    import numpy as np

    from lcpose import analysis

    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 6))
    C = A @ A.T + np.eye(6)
    d = rng.multivariate_normal(np.zeros(6), C, size=20000)
    assert abs(analysis.mahalanobis_ratio(d, C) - 1.0) < 0.03
    assert abs(analysis.mahalanobis_ratio(d, 4.0 * C) - 0.25) < 0.01


def test_notebook_settings_read_the_environment(tmp_path, monkeypatch):
    from lcpose import analysis

    monkeypatch.delenv("LCPOSE_NOTEBOOK_FULL", raising=False)
    monkeypatch.delenv("LCPOSE_NOTEBOOK_OUT", raising=False)
    assert analysis.notebook_settings(False, str(tmp_path)) == (False, str(tmp_path))
    monkeypatch.setenv("LCPOSE_NOTEBOOK_FULL", "1")
    monkeypatch.setenv("LCPOSE_NOTEBOOK_OUT", str(tmp_path / "out"))
    assert analysis.notebook_settings(False, ".") == (True, str(tmp_path / "out"))
    assert (tmp_path / "out").is_dir()


# ----------------------------------------------------------------------------------------------
# The notebooks
# ----------------------------------------------------------------------------------------------


def test_every_notebook_is_present_and_known():
    assert {p.name for p in NOTEBOOKS} == set(EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_outputs_committed(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {i} has stored outputs (strip them)"
            assert cell.execution_count is None, f"{path.name}: cell {i} has an execution count (strip it)"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernel spec that runs this very interpreter (ipykernel's own writer, argv = sys.executable),
    found through JUPYTER_PATH: independent of the kernels installed (or not) in the environment."""
    from ipykernel.kernelspec import write_kernel_spec

    base = tmp_path_factory.mktemp("jupyter")
    name = "lcpose-notebook-test"
    write_kernel_spec(path=str(base / "kernels" / name))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(base) + (os.pathsep + old if old else "")
    try:
        yield name
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old


def _execute(path, out_dir, kernel_name, monkeypatch):
    from nbclient import NotebookClient

    # The kernel inherits this environment: small setting, outputs into out_dir, lcpose importable.
    monkeypatch.setenv("LCPOSE_NOTEBOOK_FULL", "0")
    monkeypatch.setenv("LCPOSE_NOTEBOOK_OUT", str(out_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=900, kernel_name=kernel_name, resources={"metadata": {"path": str(out_dir)}}
    )
    client.execute()  # raises CellExecutionError (with the traceback) on any error
    return nb


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED), ids=lambda n: n.split(".")[0])
def test_notebook_executes(name, tmp_path, kernel_name, monkeypatch):
    assert sys.executable  # the kernel runs this interpreter
    _execute(NOTEBOOK_DIR / name, tmp_path, kernel_name, monkeypatch)
    for produced in EXPECTED[name]:
        f = tmp_path / produced
        assert f.is_file() and f.stat().st_size > 0, f"{name} did not write {produced}"
    if name == "gradient_correctness.ipynb":
        with open(tmp_path / "gradient_correctness.json") as fh:
            result = json.load(fh)
        assert set(result) == {"lc", "bpnp", "epropnp"}
        assert all(0.0 <= v <= 1.0 for v in result.values()), result
        # The paper's ordering (Table 3): LC keeps ~all gradients correct, the peers clearly fewer.
        assert result["lc"] >= 0.99, result
        assert result["bpnp"] < result["lc"] and result["epropnp"] < result["lc"], result
