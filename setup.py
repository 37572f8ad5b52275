"""Build hook for the optional CUDA extension in csrc/.

The extension builds when a CUDA toolkit and a CUDA build of torch are importable in the
build environment (use `pip install --no-build-isolation`), or when R1CORE_BUILD_CUDA=1
forces it. R1CORE_BUILD_CUDA=0 skips it. Everything works without it: `impl: cuda` then
raises a clear error that names the build command.
"""

import glob
import os

from setuptools import find_namespace_packages, setup


def _packages():
    """Every folder of r1core/ and conf/ (shipped as r1core.conf), data-only folders too (conf/pipeline,
    r1core/data/builtin): setuptools ships package data only from listed packages."""
    skip = ["*__pycache__*"]
    pkgs = find_namespace_packages(include=["r1core", "r1core.*"], exclude=skip)
    pkgs += ["r1core.conf"] + ["r1core.conf." + p for p in find_namespace_packages("conf", exclude=skip)]
    return pkgs


def _cuda_extensions():
    flag = os.environ.get("R1CORE_BUILD_CUDA")
    if flag == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if flag == "1":
            raise RuntimeError("R1CORE_BUILD_CUDA=1 but torch is not importable: use --no-build-isolation")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        if flag == "1":
            raise RuntimeError(
                f"R1CORE_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
            )
        return [], {}
    sources = sorted(glob.glob("csrc/**/*.cu", recursive=True) + glob.glob("csrc/**/*.cpp", recursive=True))
    if not sources:
        return [], {}
    arch = os.environ.get("R1CORE_CUDA_ARCH", "90")
    ext = CUDAExtension(
        name="r1core._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        # No -std flag: BuildExtension picks the standard torch's own headers were built with (C++20
        # on recent torch); forcing C++17 made c10::Error throws crash across the binding boundary.
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extensions()
setup(packages=_packages(), ext_modules=ext_modules, cmdclass=cmdclass)
