"""Builds the optional native extension ``fedlora_kernels._C``; all project metadata lives in pyproject.toml.

The extension (csrc/) registers the FedDoRA reparameterization ops ``torch.ops.fedlora.*``: CPU kernels always, CUDA
kernels too when torch is a CUDA build and a CUDA toolkit is found. Install with
``pip install --no-build-isolation -e .`` so it compiles against the installed torch (add ``-v`` to see the compiler).

It is optional: when torch is not importable at build time or compilation fails, one message says so and the package
installs without it (``fedlora_kernels.native.unavailable_reason()`` tells why at run time). With
``FEDLORA_REQUIRE_NATIVE=1`` (CI) such a build fails the install instead.
"""

import os
import sys

from setuptools import setup

REQUIRE_NATIVE = os.environ.get("FEDLORA_REQUIRE_NATIVE") == "1"


def _not_built(reason: str) -> None:
    """Report that the extension is skipped, or abort when FEDLORA_REQUIRE_NATIVE=1."""
    message = (
        f"fedlora: the native extension fedlora_kernels._C was not built ({reason}); "
        "the Triton/PyTorch backends will be used."
    )
    if REQUIRE_NATIVE:
        raise SystemExit(f"{message} FEDLORA_REQUIRE_NATIVE=1 requires it.")
    print(message, file=sys.stderr)


def native_extension() -> dict:
    """``setup()`` arguments that build fedlora_kernels._C, or none when torch is not importable."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        _not_built(f"torch is not importable at build time: {exc}")
        return {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension (ninja) that reports a failed compilation instead of failing the install."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # any compiler, linker or toolchain failure
                self.extensions = []  # nothing for the (editable) wheel to collect
                _not_built(f"compilation failed: {exc}")

    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    extension = (CUDAExtension if with_cuda else CppExtension)(
        name="fedlora_kernels._C",
        sources=[
            "csrc/feddora_ops.cpp",
            "csrc/feddora_autograd.cpp",
            *(["csrc/feddora_ops_cuda.cu"] if with_cuda else []),
        ],
        define_macros=[("FEDLORA_WITH_CUDA", "1" if with_cuda else "0")],
        extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O2"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(**native_extension())
