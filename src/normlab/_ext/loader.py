"""normlab's compiled CPU kernels, built on first use and cached.

torch's C++ extension loader compiles ``csrc/*.cpp`` once per machine (about
40 s; the build lands in ``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and later processes load the cached library.
Each kernel has an eager torch path that computes the same quantities; the
layers fall back to it, with one warning saying why, where the build fails
(no C++ compiler or Python headers), on other devices, and under tracing.
``NORMLAB_NATIVE=0`` turns the kernels off.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch

_SOURCES = Path(__file__).parent / "csrc"
_loaded: dict[tuple[str, bool], object] = {}  # by (name, openmp)


def enabled() -> bool:
    """False when the environment variable NORMLAB_NATIVE is 0."""
    return os.environ.get("NORMLAB_NATIVE", "1").strip().lower() not in ("0", "false", "no")


def tracing() -> bool:
    """Whether torch.compile or torch.export is tracing (is_exporting: torch >= 2.5)."""
    is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.compiler.is_compiling() or is_exporting()


def for_tensor(name: str, x: torch.Tensor, openmp: bool = False):
    """`module(name, openmp)` where its kernels serve `x` (a CPU float32 or float64 tensor,
    out of tracing), else None: the caller's eager torch path runs instead."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not tracing():
        return module(name, openmp)
    return None


def module(name: str, openmp: bool = False):
    """The compiled extension ``csrc/<name>.cpp``, or None where it cannot be had.

    `openmp`: compile and link with OpenMP, so that the kernel's ``at::parallel_for``
    runs on torch's intra-op threads (without it, on the calling thread only). The
    runtime is the one torch loaded: libgomp, found by its name, is loaded once.
    """
    key = (name, openmp)
    if key in _loaded:
        return _loaded[key]
    _loaded[key] = None
    if not enabled():
        return None
    try:
        _put_pip_ninja_on_path()
        from torch.utils import cpp_extension
        source = _SOURCES / f"{name}.cpp"
        # no errno from sqrt: its branch to the library call keeps loops from vectorizing;
        # the vector instructions of this CPU (AVX2, AVX-512: all of their width, which
        # GCC otherwise halves), without fused multiply-adds, so that results stay those of
        # the plain x86-64 build
        link_flags = ["-fopenmp"] * openmp
        wide_vectors = ["-mprefer-vector-width=512"] * (platform.machine() in ("x86_64", "AMD64"))
        flags = ["-O3", "-fno-math-errno", "-march=native", *wide_vectors, "-ffp-contract=off",
                 *link_flags]
        # named by content, flags, path and CPU: each version of the source gets its own
        # cached build, and so does each checkout (ninja rebuilds a build folder whose source
        # moved: two checkouts sharing one would rebuild it in turn, each under its lock) and
        # each CPU kind (a build for AVX-512 stops with SIGILL on a CPU without it)
        digest = hashlib.sha256(source.read_bytes() + " ".join(flags).encode()
                                + str(source.resolve()).encode()
                                + _cpu_features().encode()).hexdigest()[:12]
        _loaded[key] = cpp_extension.load(f"normlab_{name}_{digest}", [str(source)],
                                           extra_cflags=flags, extra_ldflags=link_flags,
                                           verbose=False)
    except Exception as error:  # no compiler, no headers, no ninja: the eager path serves
        warnings.warn(f"normlab: the compiled kernel {name!r} could not be built, so the "
                      f"slower torch path runs instead ({type(error).__name__}: {error})",
                      RuntimeWarning, stacklevel=3)
    return _loaded[key]


def _cpu_features() -> str:
    """What `-march=native` compiles for: the CPU's feature flags (Linux), else its name."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _put_pip_ninja_on_path() -> None:
    # torch's loader runs `ninja` from PATH; the pip wheel's binary is not
    # there when the virtual environment is used without being activated.
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
