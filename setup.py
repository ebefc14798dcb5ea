"""Builds the sven_ext extension against the torch that is installed.

Build switches (environment variables):

    SVEN_EXT_CUDA=auto|0|1   auto (default): compile the CUDA kernels when a CUDA
                             toolkit is found, torch is a CUDA build, and a GPU is
                             visible or TORCH_CUDA_ARCH_LIST is set; 1: require them;
                             0: CPU only.
    CUDA_HOME                the toolkit (default: /usr/local/cuda when it has nvcc).
    TORCH_CUDA_ARCH_LIST     GPU architectures (default when no GPU is visible:
                             "8.0;9.0+PTX").
    SVEN_EXT_DEBUG=1         -O0 -g, device debug info, no optimisation.
    MAX_JOBS                 parallel compile jobs (ninja).

torch extensions must be compiled against the torch that will import them, so
install with `pip install --no-build-isolation .` (pip's isolated build
environment would fetch and compile against another torch). Objects are kept in
build/temp, so a rebuild (`pip install --no-build-isolation -e .` again, or
`python setup.py build_ext --inplace`) only compiles what changed.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

try:
    import torch
except ImportError:
    sys.exit(
        "sven_ext: torch must be installed before building, and the build must see it:\n"
        "    pip install torch && pip install --no-build-isolation .\n"
        "(pip's default isolated build environment hides the installed torch.)"
    )


def _find_cuda_home():
    """The CUDA toolkit root: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, or nvcc's real location."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return str(Path(candidate))
    nvcc = shutil.which("nvcc")
    if nvcc:
        # The nvcc on PATH may be a wrapper script elsewhere; only trust a real toolkit layout.
        root = Path(nvcc).resolve().parent.parent
        if (root / "include" / "cuda_runtime.h").exists():
            return str(root)
    return None


def _use_cuda(cuda_home):
    mode = os.environ.get("SVEN_EXT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"sven_ext: SVEN_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    problems = []
    if cuda_home is None:
        problems.append("no CUDA toolkit found (set CUDA_HOME)")
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    if mode == "1" and problems:
        sys.exit("sven_ext: SVEN_EXT_CUDA=1 but " + "; ".join(problems))
    if problems or mode == "1":
        return not problems
    # auto: the CUDA kernels are most of the compile time, so they are built only for
    # a GPU that can run them or for architectures asked for.
    return bool(os.environ.get("TORCH_CUDA_ARCH_LIST")) or torch.cuda.is_available()


CUDA_HOME = _find_cuda_home()
WITH_CUDA = _use_cuda(CUDA_HOME)
DEBUG = os.environ.get("SVEN_EXT_DEBUG", "0") == "1"
if WITH_CUDA:
    # torch.utils.cpp_extension reads CUDA_HOME when first imported.
    os.environ["CUDA_HOME"] = CUDA_HOME
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"

from torch.utils import cpp_extension  # noqa: E402  (after CUDA_HOME is set)

if WITH_CUDA:
    cpp_extension.CUDA_HOME = CUDA_HOME


def _extension():
    # setuptools wants source paths relative to the project root.
    csrc = Path("csrc")
    sources = [csrc / "ops.cpp", *sorted((ROOT / csrc / "cpu").glob("*.cpp"))]
    cxx_flags = ["-O0", "-g"] if DEBUG else ["-O3"]
    cxx_flags += ["-Wall", "-Wno-unused-parameter"]
    if torch.backends.openmp.is_available():
        cxx_flags.append("-fopenmp")  # at::parallel_for is inline: without it, loops run serially
    kwargs = dict(
        name="sven_ext._C",
        include_dirs=[str(ROOT / csrc / "include")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"] if torch.backends.openmp.is_available() else [],
    )
    if not WITH_CUDA:
        return cpp_extension.CppExtension(sources=_relative(sources), **kwargs)
    sources += sorted((ROOT / csrc / "cuda").glob("*.cu"))
    # No --use_fast_math: the RNG's Box-Muller must keep full-precision log/sin/cos.
    nvcc_flags = ["-O0", "-G", "-g"] if DEBUG else ["-O3", "-lineinfo"]
    nvcc_flags += ["--expt-relaxed-constexpr"]
    kwargs["extra_compile_args"]["nvcc"] = nvcc_flags
    return cpp_extension.CUDAExtension(sources=_relative(sources), **kwargs)


class _BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension compiling into one fixed folder, build/temp.

    pip's editable and wheel builds would compile in a fresh temporary folder each
    time; a fixed one lets ninja reuse every object that is up to date (it rebuilds
    those whose sources or flags changed).
    """

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = str(ROOT / "build" / "temp")


def _relative(paths):
    return [os.path.relpath(ROOT / p, ROOT) for p in paths]


def _write_build_info():
    """Records what the extension was compiled against; checked at import."""
    (ROOT / "sven_ext" / "_build_info.py").write_text(
        "# Generated by setup.py: what the compiled extension was built against.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {WITH_CUDA!r}\n"
        f"CUDA_VERSION = {torch.version.cuda if WITH_CUDA else None!r}\n"
    )


_write_build_info()
print(f"sven_ext: building with CUDA kernels: {WITH_CUDA} (torch {torch.__version__}, CUDA_HOME={CUDA_HOME})")

setup(
    packages=find_packages(include=["sven_ext", "sven_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExtension},
)
