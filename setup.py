"""Build of vllm-bipolar: the pure-Python package, plus the CUDA kernels (csrc/) as the extension
module ``vllm_bipolar._C`` when a CUDA build of torch and nvcc are present.

    pip install --no-build-isolation -e .          # editable, kernels built against the installed torch
    python setup.py build_ext --inplace            # kernels only, next to the sources

The extension must be compiled against the torch it will run with, hence --no-build-isolation
(pyproject.toml deliberately does not list torch as a build requirement).

Environment:
    VLLM_BIPOLAR_SKIP_CUDA=1   install the pure-Python package only
    TORCH_CUDA_ARCH_LIST       e.g. "9.0a" or "8.0;8.9;9.0a+PTX" (default: 8.0, 8.9, 9.0a)
    CUDA_HOME                  toolkit whose nvcc builds the kernels (torch's default lookup otherwise)
    MAX_JOBS                   parallel compile jobs (torch's ninja build)
"""

from __future__ import annotations

import glob
import os
import re
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "vllm_bipolar._C"
DEFAULT_ARCHS = ("8.0", "8.9", "9.0a")  # A100, L4/L40/RTX 40, H100/H200 (sm_90a: wgmma for later kernels)


def _log(msg: str) -> None:
    print(f"vllm-bipolar: {msg}", file=sys.stderr, flush=True)


def _gencode_flags(arch_list: str | None) -> list[str]:
    """TORCH_CUDA_ARCH_LIST syntax ("8.0;8.9 9.0a+PTX") -> nvcc -gencode flags."""
    entries = [a for a in re.split(r"[;\s,]+", arch_list or "") if a] or list(DEFAULT_ARCHS)
    flags = []
    for entry in entries:
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if not m:
            raise SystemExit(
                f"vllm-bipolar: cannot read TORCH_CUDA_ARCH_LIST entry {entry!r}; use compute capabilities "
                "such as '8.0;8.9;9.0a' (optionally with +PTX), not architecture names")
        cc = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    return flags


def _cxx_std(torch_version: str) -> str:
    """C++17, except where torch's own headers need C++20 (torch >= 2.13 requires it of extensions)."""
    m = re.match(r"(\d+)\.(\d+)", torch_version)
    return "-std=c++20" if m and (int(m.group(1)), int(m.group(2))) >= (2, 13) else "-std=c++17"


def _cuda_extensions():
    """([CUDAExtension], cmdclass) when the kernels can be built here, else ([], {}) after one line."""
    if os.environ.get("VLLM_BIPOLAR_SKIP_CUDA", "").strip() not in ("", "0"):
        reason = "VLLM_BIPOLAR_SKIP_CUDA is set"
    else:
        try:
            import torch
            from torch.utils import cpp_extension
        except ImportError as exc:
            reason = (f"torch is not importable at build time ({exc}); install torch first and build with "
                      "`pip install --no-build-isolation`")
        else:
            cuda_home = cpp_extension.CUDA_HOME
            nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
            if torch.version.cuda is None:
                reason = f"torch {torch.__version__} is not a CUDA build"
            elif not nvcc or not os.path.exists(nvcc):
                reason = "nvcc was not found (set CUDA_HOME to a CUDA toolkit)"
            else:
                return _make_extension(cpp_extension, nvcc), {"build_ext": cpp_extension.BuildExtension}
    _log(f"skipping the CUDA extension {EXT_NAME}: {reason}; installing the pure-Python package")
    return [], {}


def _make_extension(cpp_extension, nvcc: str):
    import torch

    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    std = _cxx_std(torch.__version__)
    # torch's std::string ABI, stated explicitly (recent torch no longer passes it; a compiler
    # with the other default would build an extension that breaks where strings cross into torch).
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    nvcc_flags = [
        "-O3", std, "-lineinfo", abi,
        # no --use_fast_math: the decode builds exact integers in fp32, and the sums stay IEEE
        "--expt-relaxed-constexpr",
        "-Xptxas=-warn-spills",
        *_gencode_flags(os.environ.get("TORCH_CUDA_ARCH_LIST")),
    ]
    _log(f"building {EXT_NAME} with {nvcc} for {' '.join(f for f in nvcc_flags if f.startswith('-gencode'))}")
    return [cpp_extension.CUDAExtension(
        name=EXT_NAME,
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3", std, abi], "nvcc": nvcc_flags},
    )]


ext_modules, cmdclass = _cuda_extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
