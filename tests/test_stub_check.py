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
