"""Benchmark session setup: options, markers, thread count, measured bandwidths, and
the extra fields (versions, device, command, bandwidths) put into --benchmark-json.

Subsets:  -m cpu | -m gpu | -m op | -m model | -m timm  (combine: -m "gpu and op"),
or -k on the ids, which start with the device (``cpu-...`` / ``cuda-...``).
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import _util  # noqa: E402

CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "needs a CUDA device (none visible here); GPU numbers come from the GPU machine"

_BANDWIDTH: dict[str, float] = {}


def pytest_addoption(parser):
    group = parser.getgroup("hires-bench")
    group.addoption("--bench-threads", type=int, default=2,
                    help="torch CPU threads for the CPU benchmarks (default 2)")
    group.addoption("--bench-cpu-compile", action="store_true", default=False,
                    help="also benchmark torch.compile on CPU (slow to compile; off by default)")
    group.addoption("--bench-full", action="store_true", default=False,
                    help="full matrix: eval fwd+bwd, and every mode for float32 on GPU")


def pytest_configure(config):
    for line in (
        "cpu: runs on the CPU (the subset a CPU-only machine runs)",
        "gpu: needs a CUDA device (skipped without one)",
        "op: op-level projection benchmarks",
        "model: model-level train-step benchmarks",
        "timm: timm ResNet-D train steps before/after hires_kernels.fuse",
        "compile: involves torch.compile",
        "host: host cost per call on tiny CPU tensors (one thread)",
    ):
        config.addinivalue_line("markers", line)
    torch.set_num_threads(config.getoption("--bench-threads"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA_REASON))


def bandwidth_gbps(device: str) -> float:
    """Copy bandwidth of ``device`` measured once in this run (GB/s, read + write)."""
    if device not in _BANDWIDTH:
        _BANDWIDTH[device] = _util.copy_bandwidth_gbps(device)
    return _BANDWIDTH[device]


@pytest.fixture(scope="session")
def copy_bw():
    return bandwidth_gbps


def _versions() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        info["timm"] = None
    if CUDA:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
        info["gpu_sms"] = props.multi_processor_count
        info["cudnn"] = torch.backends.cudnn.version()
    try:
        import hires_kernels

        info["hires_backends"] = hires_kernels.available_backends()
    except Exception as e:  # noqa: BLE001
        info["hires_backends"] = f"unavailable: {e}"
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["hires"] = _versions()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["hires"] = {
        **_versions(),
        "copy_GBps": dict(_BANDWIDTH),
        "command": " ".join(shlex.quote(a) for a in ["pytest", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "options": {"bench_full": config.getoption("--bench-full"),
                    "bench_cpu_compile": config.getoption("--bench-cpu-compile")},
    }
