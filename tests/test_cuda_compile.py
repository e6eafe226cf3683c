"""The CUDA kernels (csrc/cuda/*.cu) compile for Hopper (sm_90), and for sm_80 (setup.py's
other default arch, without thread-block clusters), with the flags that
torch's CUDAExtension passes in setup.py, even where no GPU (or only a CPU torch) is
present: a compile-only check (nvcc -c into a temporary directory, nothing is linked
or loaded). Skipped only where nvcc is missing.

The same compile's reports are checked too: ptxas (-v) reports no spills in any kernel
and at most 128 registers for the 256-thread tile kernels (2 blocks per SM), and the PTX
of the bf16 / fp16 tile kernels runs their GEMMs on the tensor cores (mma.sync), that of
the float32 ones has the TF32 mma.sync they take where torch allows TF32, and every
row kernel and the dW kernel have 16-byte vector loads (ld.global.v4), every row kernel
16-byte cp.async copies, the apply and dy passes 16-byte stores, for channels in aligned
runs; the dW kernel shares its operands across a thread-block cluster (barrier.cluster,
mapa)."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sysconfig
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME / $CUDA_PATH, then PATH, then /usr/local/cuda (torch's own order)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.exists(default) else None


def cuda_include_dir(nvcc: str) -> str | None:
    """The CUDA toolkit's include directory (cuda_runtime.h), next to nvcc or in /usr/local/cuda."""
    real = os.path.realpath(nvcc)
    for home in (os.path.dirname(os.path.dirname(real)), os.path.dirname(os.path.dirname(nvcc)), "/usr/local/cuda"):
        inc = os.path.join(home, "include")
        if os.path.exists(os.path.join(inc, "cuda_runtime.h")):
            return inc
    return None


def torch_include_dirs() -> list[str]:
    """torch.utils.cpp_extension.include_paths() without the CUDA part (with a CPU
    torch and no CUDA_HOME it raises asking for one); torch/include holds the
    ATen/cuda and c10/cuda headers either way."""
    from torch.utils import cpp_extension

    try:
        return list(cpp_extension.include_paths())
    except OSError:  # pragma: no cover - torch versions whose default asks for CUDA_HOME
        base = os.path.join(os.path.dirname(torch.__file__), "include")
        return [base, os.path.join(base, "torch", "csrc", "api", "include")]


NVCC = find_nvcc()


needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found ($CUDA_HOME, $CUDA_PATH, PATH, "
                                                    "/usr/local/cuda): the CUDA kernels cannot be compiled here")
each_source = pytest.mark.parametrize("source", SOURCES, ids=[os.path.basename(s) for s in SOURCES])


def compile_cuda(source: str, arch: str, tmp_path) -> str:
    """nvcc -c of source for one arch (e.g. "90"), with setup.py's and CUDAExtension's flags,
    the ptxas report and the PTX kept in tmp_path; asserts it compiles and returns the log."""
    includes = torch_include_dirs() + [sysconfig.get_paths()["include"]]
    cuda_inc = cuda_include_dir(NVCC)
    if cuda_inc:
        includes.append(cuda_inc)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    extra = []
    if not any(os.path.exists(os.path.join(d, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for d in includes):
        # A CPU build of torch ships the c10/cuda headers but not this generated one
        # (in a CUDA build it only defines C10_CUDA_BUILD_SHARED_LIBS, which matters
        # on Windows alone); c10 has a switch for exactly this case.
        extra.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    cmd = [
        NVCC, "-c", source, "-o", str(tmp_path / (os.path.basename(source) + ".o")),
        # what setup.py asks for
        "-O3", "-std=c++17", "-lineinfo", "-DHIRES_WITH_CUDA",
        "-gencode", f"arch=compute_{arch},code=sm_{arch}",
        # what torch's CUDAExtension adds (COMMON_NVCC_FLAGS and the extension defines)
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr", "--compiler-options", "-fPIC",
        "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        # resource report in the log (registers, shared memory, spills), and the PTX kept
        "-Xptxas", "-v", "--keep", "--keep-dir", str(tmp_path),
    ] + extra + [f"-I{d}" for d in includes]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    took = time.monotonic() - start
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed ({took:.0f} s):\n{' '.join(cmd)}\n{log[-20000:]}"
    print(f"{os.path.basename(source)}: compiled for sm_{arch} in {took:.0f} s")
    return log


@needs_nvcc
@each_source
def test_cuda_source_compiles_for_sm80_without_clusters(source, tmp_path):
    """setup.py builds for sm_80 too (TORCH_CUDA_ARCH_LIST 8.0;9.0): there the cluster
    helpers are the block's own barrier and memory, the kernels spill nothing, and no
    cluster instruction is emitted (the host launches no clusters to such code)."""
    kernels = ptxas_report(compile_cuda(source, "80", tmp_path))
    assert kernels and not {name: spill for name, (_, spill) in kernels.items()
                            if spill and ("rows_kernel" in name or "dw_partial_kernel" in name)}
    ptx = "".join(open(p).read() for p in glob.glob(str(tmp_path / "*.ptx")))
    assert "barrier.cluster" not in ptx and "mapa" not in ptx


@needs_nvcc
@each_source
def test_cuda_source_compiles_for_sm90(source, tmp_path):
    log = compile_cuda(source, "90", tmp_path)
    kernels = ptxas_report(log)
    for name, (regs, spill) in sorted(kernels.items()):
        print(f"  {regs:4d} registers, {spill:3d} spill bytes  {name}")
    assert kernels, "no ptxas report in the log"
    spilling = {name: spill for name, (_, spill) in kernels.items() if spill}
    assert not spilling, f"kernels with spills: {spilling}"
    heavy = {name: regs for name, (regs, _) in kernels.items()
             if ("rows_kernel" in name or "dw_partial_kernel" in name) and regs > 128}
    assert not heavy, f"tile kernels over 128 registers (fewer than 2 blocks of 256 threads per SM): {heavy}"
    ptx = "".join(open(p).read() for p in glob.glob(str(tmp_path / "*.ptx")))
    for entry, body in ptx_entries(ptx).items():
        # The pooling kernels move x (pool_many) and grad_x (unpool_sum) in 16-byte vectors in
        # both layouts: runs of channels (V > 1), or in NCHW runs of a row's columns (V = 1).
        vector = r"\.(v4\.(u32|b32|f32)|v2\.(f64|u64|b64))"
        if "pool_many_kernel" in entry:
            assert re.search(r"ld\.global(\.nc)?" + vector, body), f"no 16-byte load in {entry}"
        if "unpool_sum_kernel" in entry:
            assert re.search(r"st\.global" + vector, body), f"no 16-byte store in {entry}"
        if ("rows_kernel" in entry or "dw_partial_kernel" in entry) and ("BFloat16" in entry or "Half" in entry):
            kind = "bf16" if "BFloat16" in entry else "f16"
            assert f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32" in body, f"no tensor-core mma in {entry}"
        if ("rows_kernel" in entry or "dw_partial_kernel" in entry) and re.search(r"(<float,|Iff)", entry):
            # float32: TF32 on the tensor cores where torch allows it (a run-time choice)
            assert "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32" in body, f"no TF32 mma in {entry}"
            assert "cvt.rna.tf32.f32" in body, f"no TF32 rounding in {entry}"
        if "rows_kernel" in entry or "dw_partial_kernel" in entry:
            # The run paths: 16-byte vectors (of channels or positions) from global memory.
            wide = r"(v4\.(u32|b32|f32)|v2\.(f64|u64|b64))"
            assert re.search(r"ld\.global(\.nc)?\." + wide, body), f"no 16-byte global load in {entry}"
            if "rows_kernel" in entry:  # the input tile stored to shared memory in vectors too
                assert re.search(r"st\.shared\." + wide, body), f"no 16-byte shared store in {entry}"
                # tiles staged as they are: global -> shared by cp.async, 16 bytes at a time
                assert "cp.async.cg.shared.global" in body and "cp.async.wait_all" in body, f"no cp.async in {entry}"
            # FWD_APPLY, BWD_DX (demangled or not): out, dy and grad_x stored in vectors
            if "rows_kernel" in entry and re.search(r"(, [13]>|Li[13]EE)", entry):
                assert re.search(r"st\.global\." + wide, body), f"no 16-byte global store in {entry}"
        if "dw_partial_kernel" in entry:
            # Thread-block clusters: the cluster barrier (arrive with release, wait with
            # acquire) and peers' shared memory mapped into this block's address space.
            assert "barrier.cluster.arrive" in body and "barrier.cluster.wait" in body, f"no cluster barrier in {entry}"
            assert "mapa" in body, f"no distributed shared memory mapping in {entry}"


def demangle(name: str) -> str:
    """The kernel's C++ name (c++filt), shortened to the kernel and its template arguments."""
    if shutil.which("c++filt"):
        name = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
    return re.sub(r"\(.*", "", name).replace("void ", "").replace("hires_cuda::", "").replace("c10::", "")


def ptxas_report(log: str) -> dict[str, tuple[int, int]]:
    """kernel -> (registers, spill store + load bytes) from nvcc -Xptxas -v."""
    kernels, current = {}, None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?(\w+)'?", line)
        if m:
            current = demangle(m.group(1)) if "_kernel" in m.group(1) else None
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            kernels[current] = (kernels.get(current, (0, 0))[0], int(m.group(1)) + int(m.group(2)))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            kernels[current] = (int(m.group(1)), kernels.get(current, (0, 0))[1])
    return kernels


def ptx_entries(ptx: str) -> dict[str, str]:
    """PTX .entry name -> its body."""
    parts = re.split(r"\.visible \.entry (\w+)\(", ptx)
    return {demangle(parts[i]): parts[i + 1] for i in range(1, len(parts) - 1, 2)}
