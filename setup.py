"""Builds hires_kernels._C: the CPU kernels always, the CUDA kernels when possible.

HIRES_BUILD_CUDA=1 forces the CUDA build (and fails loudly if it cannot happen),
HIRES_BUILD_CUDA=0 skips it; unset, CUDA is built when torch has CUDA and nvcc exists.
Install with ``pip install -e . --no-build-isolation`` after installing torch, so the
extension is built against the torch you run.
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - explains the usual build-isolation mistake
    raise SystemExit(
        "hires-kernels needs torch installed before it is built: `pip install torch` first, then "
        "`pip install -e . --no-build-isolation`"
    ) from e


def cuda_build_reason():
    """(build?, why) for the CUDA kernels."""
    switch = os.environ.get("HIRES_BUILD_CUDA", "").strip()
    if switch == "0":
        return False, "HIRES_BUILD_CUDA=0"
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    why = (f"torch {torch.__version__} with CUDA {torch.version.cuda}, nvcc in {CUDA_HOME}" if possible
           else "torch has no CUDA" if torch.version.cuda is None else "nvcc not found (CUDA_HOME unset)")
    if switch == "1" and not possible:
        raise SystemExit(f"HIRES_BUILD_CUDA=1 but the CUDA kernels cannot be built: {why}")
    return possible, why


def link_args():
    """-fopenmp, and on Linux ``--exclude-libs,ALL``: a toolchain that links libstdc++
    statically (seen on a GPU image whose g++ does) would otherwise export that copy's
    symbols, and Python's ``-Bsymbolic-functions`` binds its functions locally while its
    data (the locale facets' ids) resolve to the libstdc++ torch loaded: formatting a
    number in an error message then crashes. Hidden, the copy stays self-consistent."""
    return ["-fopenmp"] + (["-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else [])


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-std=c++17"]
    with_cuda, why = cuda_build_reason()
    if with_cuda:
        print(f"hires-kernels: building CPU + CUDA kernels ({why})")
        nvcc = ["-O3", "-std=c++17", "-lineinfo", "-DHIRES_WITH_CUDA"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        return CUDAExtension(
            "hires_kernels._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": cxx + ["-DHIRES_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link_args())
    print(f"hires-kernels: building CPU kernels only ({why})")
    return CppExtension("hires_kernels._C", sources, extra_compile_args={"cxx": cxx},
                        extra_link_args=link_args())


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
