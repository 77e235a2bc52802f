"""Builds catapult_kernels._C: the CPU kernels always, the CUDA kernels whenever
nvcc and a CUDA build of torch are both present (no GPU is needed to compile).

Environment:
  CATAPULT_NO_CUDA=1        build the CPU kernels only
  CUDA_HOME                 the CUDA toolkit (else /usr/local/cuda*, or nvcc on PATH)
  TORCH_CUDA_ARCH_LIST      GPU archs to compile for (default: the visible GPU's, else 9.0)
  CATAPULT_PTXAS_VERBOSE=1  print each CUDA kernel's registers, spills and stack (nvcc -Xptxas=-v)
"""
import glob
import os
import platform
import sys
import sysconfig

from setuptools import setup


def _find_cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    def version(nvcc):  # /usr/local/cuda-13.0/bin/nvcc -> (13, 0); plain /usr/local/cuda first
        tail = nvcc.split("/")[3][len("cuda"):].lstrip("-")
        return tuple(int(x) for x in tail.split(".") if x.isdigit()) if tail else (10**6,)
    toolkits = sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), key=version, reverse=True)
    return os.path.dirname(os.path.dirname(toolkits[0])) if toolkits else None


# cpp_extension reads CUDA_HOME when it is imported.
if _find_cuda_home() and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = _find_cuda_home()

try:
    import torch  # noqa: E402
except ModuleNotFoundError as e:
    if e.name != "torch":
        raise
    # pip's default isolated build lands here too: its fresh environment has no torch
    sys.exit("catapult_kernels setup: torch is not importable here; install torch first, then build "
             "in that environment with: pip install --no-build-isolation .")
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"catapult_kernels setup: {msg}", file=sys.stderr, flush=True)


def _cuda_build_reason():
    """None if the CUDA kernels can be built here, else why not."""
    if os.environ.get("CATAPULT_NO_CUDA") == "1":
        return "CATAPULT_NO_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "nvcc not found (set CUDA_HOME)"
    return None


def _cpu_flags():
    # -fopenmp: at::parallel_for is header-only OpenMP; without it the kernels run on one thread.
    flags = ["-O3", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        with open("/proc/cpuinfo") as f:
            cpu = f.read()
        # ATen's Vectorized<T> picks its implementation from these macros. AVX-512 matters:
        # AdamW's sqrt and division make a 2-core AVX2 build partly compute-bound.
        if all(f" {f} " in cpu for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma")):
            flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                      "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
        elif " avx2 " in cpu and " fma " in cpu:
            flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def _cuda_include_dirs():
    # The pip CUDA toolkit headers (cusparse.h and friends) that torch's headers
    # need and that a bare nvcc install may lack.
    site = sysconfig.get_paths()["purelib"]
    return [d for d in glob.glob(os.path.join(site, "nvidia", "cu*", "include")) if os.path.isdir(d)]


class Build(BuildExtension):
    def build_extensions(self):
        try:
            super().build_extensions()
        except Exception:
            _say("the C++/CUDA build FAILED; the compiler's output above says where. "
                 "CATAPULT_NO_CUDA=1 builds the CPU kernels alone.")
            raise


def extensions():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = _cpu_flags()
    reason = _cuda_build_reason()
    if reason is not None:
        _say(f"building the CPU kernels only ({reason}).")
        return [CppExtension("catapult_kernels._C", sources, include_dirs=[os.path.join(HERE, "csrc")],
                             extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    _say(f"building the CPU and CUDA kernels (nvcc in {CUDA_HOME}, "
         f"archs {os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPU')}).")
    nvcc = ["-O3", "-lineinfo"]
    if os.environ.get("CATAPULT_PTXAS_VERBOSE") == "1":  # registers, spills and stack per kernel (make gpu-check)
        nvcc.append("-Xptxas=-v")
    return [
        CUDAExtension(
            "catapult_kernels._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=[os.path.join(HERE, "csrc")] + _cuda_include_dirs(),
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    ]


# The package's metadata is in pyproject.toml; this file adds the extension.
setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
