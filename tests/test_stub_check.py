"""The load-time check that the Python-backend stub's numpy and its C++ side agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minisgl_backend.triton.adapter import TritonAdapter
from minisgl_backend.triton.stub_check import stub_numpy_problem
from tests.test_triton_adapter import FakePb, FakeTensor


class StrideZeroTensor(FakeTensor):
    """What the numpy-1.x stub does under numpy 2: every element reads as the first."""

    @classmethod
    def from_dlpack(cls, name, source):
        array = source.as_numpy()
        return cls(name, np.lib.stride_tricks.as_strided(array, array.shape, (0,)))


class BrokenPb(FakePb):
    Tensor = StrideZeroTensor


def test_a_faithful_stub_passes():
    assert stub_numpy_problem(FakePb) is None


def test_a_stub_that_garbles_arrays_is_named_with_the_fix():
    problem = stub_numpy_problem(BrokenPb)
    assert problem is not None
    assert f"numpy {np.__version__}" in problem and "[1 1 1 1 1 1 1 1]" in problem
    assert "numpy<2" in problem


def test_a_failing_round_trip_is_a_problem_too():
    class NoDlpack(FakePb):
        class Tensor(FakeTensor):
            @classmethod
            def from_dlpack(cls, name, source):
                raise TypeError("no dlpack here")

    assert "no dlpack here" in stub_numpy_problem(NoDlpack)


def test_initialize_refuses_to_load_on_a_garbling_stub():
    config = {"model_transaction_policy": {"decoupled": True}, "parameters": {}}
    with pytest.raises(RuntimeError, match="garbles arrays"):
        TritonAdapter(BrokenPb).initialize({"model_config": json.dumps(config), "model_name": "m",
                                            "model_version": "1"})


def test_stub_python_hides_numpy2_only_packages(tmp_path):
    """scripts/stub_python.sh: the stub's venv sees numpy 1.x (from the tarball) and the host's
    packages, but not the host's numpy / scipy / scikit-learn (built for numpy 2, they break
    `from transformers import AutoTokenizer` under numpy 1.x); .pth files still apply."""
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    numpy_dir = tmp_path / "np" / "numpy"
    numpy_dir.mkdir(parents=True)
    (numpy_dir / "__init__.py").write_text('__version__ = "1.26.4"\n')
    tarball = tmp_path / "stub-numpy.tar.xz"
    with tarfile.open(tarball, "w:xz") as tar:
        tar.add(numpy_dir, arcname="numpy")
    host = tmp_path / "host"
    for pkg in ("goodpkg", "scipy", "sklearn", "numpy"):
        (host / pkg).mkdir(parents=True)
        (host / pkg / "__init__.py").write_text("raise ImportError('numpy 2 only')\n" if pkg != "goodpkg" else "")
    for extra in ("scikit_learn-1.9.1.dist-info", "scipy.libs", "numpy-2.5.2.dist-info", "goodpkg-1.0.dist-info"):
        (host / extra).mkdir()
    (tmp_path / "editable").mkdir()
    (tmp_path / "editable" / "editablepkg.py").write_text("")
    (host / "editable.pth").write_text(str(tmp_path / "editable") + "\n")
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "venv"
    subprocess.run(["bash", str(root / "scripts" / "stub_python.sh"), sys.executable, str(out), str(tarball),
                    str(host)], check=True, capture_output=True)
    probe = ("import importlib.util as u, numpy, goodpkg, editablepkg; "
             "print(numpy.__version__, [n for n in ('scipy', 'sklearn') if u.find_spec(n)])")
    got = subprocess.run([str(out / "bin" / "python"), "-c", probe], check=True, capture_output=True, text=True)
    assert got.stdout.split() == ["1.26.4", "[]"], got.stdout + got.stderr
    assert not (out / "host-site-1" / "scikit_learn-1.9.1.dist-info").exists()
    assert (out / "host-site-1" / "goodpkg-1.0.dist-info").exists()
