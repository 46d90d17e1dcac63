"""Building and loading fxfuse's CPU kernels (``*.cpp`` beside this file) with ``torch.utils.cpp_extension``.

They are compiled once per PyTorch version into PyTorch's extension cache
(``make install`` runs :func:`main`; a first use builds them otherwise, in
about a minute), without ``-march`` flags: the
binary runs on any CPU of its architecture and picks its vector kernels at
run time. Where they cannot be built (no C++ compiler, no ninja),
:func:`available` is False, :func:`unavailable_reason` says why, and the
callers keep their ATen and oneDNN kernels.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Optional

log = logging.getLogger("fxfuse")

SOURCES = [Path(__file__).with_name(name) for name in ("bindings.cpp", "skinny_gemm.cpp", "rows.cpp")]
_STATE: dict[str, object] = {}


def build(verbose: bool = False) -> ModuleType:
    """Compile (or load from PyTorch's extension cache) the kernels' module; raises where that fails."""
    from torch.utils.cpp_extension import load

    # -fopenmp: at::parallel_for is inlined from ATen's headers and runs serially without it; the
    # library it links, libgomp.so.1, is the one PyTorch has already loaded (same soname).
    return load(name="fxfuse_cpu_kernels", sources=[str(s) for s in SOURCES], extra_cflags=["-O3", "-fopenmp"],
                extra_ldflags=["-fopenmp"], verbose=verbose)


def module() -> Optional[ModuleType]:
    """The kernels' module, built on first call; None where it cannot be built."""
    if "module" not in _STATE:
        try:
            _STATE["module"] = build()
        except Exception as e:  # no compiler, no ninja, a failed build: callers keep their other kernels
            _STATE["module"] = None
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _STATE["reason"] = f"{type(e).__name__}: {first}"
            log.warning("fxfuse: the CPU kernels could not be built (%s); decode steps use ATen and oneDNN",
                        _STATE["reason"])
    return _STATE["module"]  # type: ignore[return-value]


def available() -> bool:
    """True if the kernels are built (building them on first call)."""
    return module() is not None


def unavailable_reason() -> Optional[str]:
    """Why the kernels could not be built, or None if they are available."""
    module()
    return _STATE.get("reason")  # type: ignore[return-value]


def isa() -> Optional[str]:
    """The instruction set the GEMM kernels picked on this CPU ("avx2+fma" or "generic"); None if unbuilt."""
    built = module()
    return None if built is None else built.isa()


def require() -> ModuleType:
    """The kernels' module; raises, saying why, where it cannot be built."""
    built = module()
    if built is None:
        raise RuntimeError(f"fxfuse's CPU kernels are not built ({unavailable_reason()}); check available() "
                           "first, or install a C++ compiler and ninja")
    return built


def main() -> None:
    """``make install``'s step: build the kernels now rather than on first use, and say what came of it."""
    logging.basicConfig()
    if available():
        print(f"fxfuse: CPU kernels built ({isa()})")
    else:
        print(f"fxfuse: CPU kernels not built ({unavailable_reason()}); decode steps will use ATen and oneDNN")
