"""How benchmarks/decode_step.py counts kernels per layer: CUDA kernels (checked here on synthetic
profiler events; on a GPU host the benchmark reports the real counts) and the CPU stand-in."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from benchmarks.decode_step import _cpu_kernels, _is_kernel, _kernels_in_gpu_ranges

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def _event(name, device, start, end):
    return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))


def test_kernels_are_counted_inside_each_layers_gpu_range():
    events = [
        _event("decoder_layer_0", CPU, 0, 5),  # the host side of the range: not a window on the GPU
        _event("decoder_layer_0", CUDA, 10, 20),
        _event("decoder_layer_1", CUDA, 20, 30),
        _event("nvjet_gemm", CUDA, 10, 12),  # starts at the range's start: inside
        _event("RMSNormKernel", CUDA, 13, 14),
        _event("Memcpy HtoD (Pinned -> Device)", CUDA, 15, 16),  # a copy, not a kernel
        _event("BatchDecodeKernel", CUDA, 20, 22),  # starts at layer 0's end: layer 1's
        _event("argmax_kernel", CUDA, 31, 32),  # after every layer
        _event("aten::mm", CPU, 11, 12),
    ]
    assert _kernels_in_gpu_ranges(events) == [2, 1]


def test_a_kernel_is_a_cuda_event_that_is_neither_a_copy_nor_a_range():
    assert _is_kernel(_event("vectorized_elementwise_kernel", CUDA, 0, 1))
    assert not _is_kernel(_event("Memset (Device)", CUDA, 0, 1))
    assert not _is_kernel(_event("decoder_layer_3", CUDA, 0, 1))
    assert not _is_kernel(_event("aten::add", CPU, 0, 1))


def test_no_gpu_ranges_gives_no_counts():
    assert _kernels_in_gpu_ranges([_event("aten::mm", CPU, 0, 1)]) == []


def _op(name, *children):
    return SimpleNamespace(name=name, cpu_children=list(children))


def test_cpu_count_takes_each_working_op_once_and_every_compiled_kernel_call():
    linear = _op("aten::linear", _op("aten::t", _op("aten::transpose", _op("aten::as_strided"))),
                 _op("aten::matmul", _op("aten::mm", _op("aten::resolve_conj"), _op("aten::resolve_conj"))))
    norm = _op("cpu_kernel::add_rms_norm_f32")
    silu = _op("cpu_kernel::silu_and_mul_f32", _op("aten::empty"))  # its output buffer is no kernel
    add = _op("aten::add")
    layer = _op("decoder_layer_0", norm, linear, _op("aten::view"), silu, add)
    assert _cpu_kernels(linear) == 1
    assert _cpu_kernels(layer) == 4
