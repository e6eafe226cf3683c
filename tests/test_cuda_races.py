"""Data races in the CUDA kernels, found on the CPU by ThreadSanitizer.

The emulation (cuda_emulation.h) runs each CUDA thread of a block, or of every block of a
thread-block cluster, as a std::thread: __syncthreads, __syncwarp and cluster.sync() are
barriers that order their participants alone (EmuBarrier), and shared memory (a cluster's
distributed shared memory too) is memory those threads share. Built with -fsanitize=thread,
the kernels then have ThreadSanitizer report any two accesses to one address, one of them a
write, that no barrier orders. On a GPU that is a missing barrier: a tile restaged while
another warp still reads it, a peer's shared memory read before it is written, or after the
peer block has exited (the emulation refills a block's shared memory as it exits). The
oracle tests see such a bug only where the CPU's thread schedule happens to expose it;
ThreadSanitizer sees it from the order of the accesses alone, whatever the schedule.

What it cannot see: races between blocks outside one cluster, which the emulation runs one
after another. No kernel here lets such blocks share data: each writes its own outputs and
partials (test_cuda_traffic.py counts every output byte written once). Warps are threads
scheduled independently here, as on sm_70 and later, so warp-synchronous code without
__syncwarp would be reported too, as it should be.

The sanitizer's runtime must be loaded before anything else, so each check runs this file as
a child process with LD_PRELOAD set: it builds the kernels with -fsanitize=thread and runs
small problems that reach every kernel and launch choice (clusters, half clusters, single
blocks, large row tiles; dW z-ranks, dW and row clusters; every dtype's code path, both
layouts, train and eval; a source pooled once for its targets). A mutated build, with three
barriers removed, shows that the check bites.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_cuda_emulated import SOURCE, Problem, Source, build_emulated_ops  # noqa: E402

bf16, cl = torch.bfloat16, "channels_last"

# name -> (inputs, device settings to run them under). dW: one split of 4 z-ranks of two steps
# each (a 1 x 1 x 4 cluster; halved, 1 x 1 x 2 and a dw_reduce of two partials), a 2 x 2
# cluster over two steps; row tiles shared by a cluster of 2 blocks, and 64-row tiles.
CASES = {
    "dw-z-ranks": (lambda: Problem(4, 64, 128, 8, 8, 1, how=cl, dtype=bf16, seed=8),
                   ("clusters", "half clusters", "single blocks")),
    "dw-2x2-cluster": (lambda: Problem(2, 128, 256, 8, 8, 1, how="nchw", dtype=bf16, seed=8), ("clusters",)),
    "row-cluster": (lambda: Problem(2, 32, 128, 8, 8, 2, how=cl, dtype=bf16, seed=9),
                    ("clusters", "large tiles")),
    "float64-odd": (lambda: Problem(2, 70, 65, 7, 9, 2, how=cl, dtype=torch.float64, seed=3),
                    ("clusters", "large tiles")),
    "float32-eval": (lambda: Problem(2, 20, 24, 8, 8, 2, how="nchw", dtype=torch.float32, training=False, seed=3),
                     ("clusters",)),
    "source-bf16": (lambda: Source(2, 70, 7, 9, [(5, 2), (4, 4)], ceil=True, how=cl, dtype=bf16),
                    ("clusters", "large tiles")),
    "source-float32-nchw": (lambda: Source(2, 3, 9, 17, [(5, 2), (4, 4), (6, 8)], how="nchw", dtype=torch.float32),
                            ("clusters",)),
}
SETTINGS = {"clusters": {}, "half clusters": {"set_max_cluster": 2}, "single blocks": {"set_max_cluster": 1},
            "large tiles": {"set_sm_count": 1}}
DEFAULTS = {"set_max_cluster": 16, "set_sm_count": 132}

# Three barriers whose loss is a race, and what names its report: the row kernel's publication
# of each row's geometry before it loads its rows; the dW kernel's cluster barrier before a
# step's shares are restaged; and the one that keeps each dW block, and so its shared memory,
# until z-rank 0 has read the accumulators parked there, whose loss races with the block's exit.
MUTATIONS = [("  __syncthreads();\n  load_rows(", "  load_rows(", ("rows_kernel",)),
             ("    cluster_sync();  // every block done with the step's shares before they are restaged\n", "",
              ("dw_partial_kernel", "mma_chunk")),
             ("    cluster_sync();  // a block's shared memory stays until rank 0 has read it\n", "",
              ("dw_partial_kernel", "emu_block_exit"))]
# (kernel, blocks per cluster) the cases must launch: dW z-ranks (4, and 2 halved) and a 2 x 2
# dW cluster (4), row tiles shared by 2 blocks, and single blocks.
LAUNCH_CHOICES = {("dw_partial_kernel", 4), ("dw_partial_kernel", 2), ("dw_partial_kernel", 1), ("rows_kernel", 2),
                  ("rows_kernel", 1)}


def without_barriers(cu: str) -> str:
    for barrier, rest, _ in MUTATIONS:
        assert cu.count(barrier) == 1, f"the mutation's barrier is no longer in the source: {barrier!r}"
        cu = cu.replace(barrier, rest)
    return cu


def kernels() -> set[str]:
    with open(SOURCE) as f:
        return set(re.findall(r"__global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(", f.read()))


def tsan_runtime() -> str | None:
    """The ThreadSanitizer runtime of the compiler that builds the extension, if it has one."""
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        return None
    path = subprocess.run([cxx, "-print-file-name=libtsan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def run_sanitized(build_dir: str, mutated: bool, cases) -> tuple[subprocess.CompletedProcess, list | None]:
    """The child's result and what it launched, [kernel, blocks per cluster] each (None where
    it did not get through its cases)."""
    runtime = tsan_runtime()
    if runtime is None:
        pytest.skip("the compiler has no ThreadSanitizer runtime (libtsan)")
    if shutil.which("ninja") is None:
        pytest.skip("ninja is needed to build the emulated CUDA kernels")
    # Every race reported once per pair of stacks, not once per address: the mutations' races
    # share addresses (the dW kernel parks its accumulators where it staged its steps).
    env = dict(os.environ, LD_PRELOAD=runtime, TSAN_OPTIONS="halt_on_error=0 exitcode=66 suppress_equal_addresses=0")
    command = [sys.executable, os.path.abspath(__file__), build_dir, "mutated" if mutated else "clean", *cases]
    # ThreadSanitizer needs the address-space layout it expects, which randomisation of more than
    # 28 bits breaks on some kernels: without it (setarch -R) where that is possible.
    setarch = shutil.which("setarch")
    if setarch is not None and subprocess.run([setarch, os.uname().machine, "-R", "true"]).returncode == 0:
        command = [setarch, os.uname().machine, "-R", *command]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if "FATAL: ThreadSanitizer: unexpected memory mapping" in result.stderr:
        pytest.skip("ThreadSanitizer cannot run on this kernel's memory layout")
    last = result.stdout.strip().splitlines()[-1:]
    return result, (json.loads(last[0]) if last and last[0].startswith("[") else None)


def races(stderr: str) -> list[str]:
    """ThreadSanitizer's reports, each with both accesses' stacks."""
    return [r for r in stderr.split("==================") if "WARNING: ThreadSanitizer" in r]


@pytest.mark.slow
def test_emulated_kernels_have_no_data_races(tmp_path):
    result, launched = run_sanitized(str(tmp_path / "tsan"), False, list(CASES))
    assert "ThreadSanitizer" not in result.stderr, "\n".join(races(result.stderr)[:3]) or result.stderr[-3000:]
    assert result.returncode == 0 and launched is not None, result.stderr[-3000:]
    assert {name for name, _ in launched} == kernels()
    assert LAUNCH_CHOICES <= {tuple(r) for r in launched}


@pytest.mark.slow
def test_removed_barriers_are_reported_as_races(tmp_path):
    result, launched = run_sanitized(str(tmp_path / "tsan-mutated"), True, ["dw-z-ranks"])
    reports = races(result.stderr)
    assert result.returncode == 66 and launched is not None, result.stderr[-3000:]
    assert all("data race" in r for r in reports)
    for _, _, names in MUTATIONS:
        assert any(all(n in r for n in names) for r in reports), \
            f"no race reported naming {names}: {[r[:300] for r in reports[:3]]}"


def main(build_dir: str, mode: str, names: list[str]) -> None:
    """The child process: build with ThreadSanitizer, run the cases, print what they launched."""
    os.environ.pop("LD_PRELOAD")  # the compiler must not run under the sanitizer
    torch.set_num_threads(1)  # torch's own thread pool is not instrumented: no false reports
    ops = build_emulated_ops(build_dir, ("-fsanitize=thread", "-g"), without_barriers if mode == "mutated" else None)
    launched = set()
    for name in names:
        make, settings = CASES[name]
        problem = make()
        for setting in settings:
            for call, value in SETTINGS[setting].items():
                getattr(ops, call)(value)
            try:
                if isinstance(problem, Source):
                    problem.backward(ops, problem.forward(ops)[0])
                else:
                    problem.run_kernels(ops)
            finally:
                for call, value in DEFAULTS.items():
                    getattr(ops, call)(value)
            launched |= {(r[0], int(r[12])) for r in (line.split() for line in ops.traffic().splitlines())}
            print(f"{name}, {setting}: done", file=sys.stderr, flush=True)
    print(json.dumps(sorted(launched)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
