"""Start numba once per process, without the import it does not need.

numba's first compile, even of a kernel it loads from its on-disk cache, imports its whole
numpy support; one piece of that imports ``scipy.linalg`` only to learn whether BLAS is there
(for np.correlate/np.convolve), about a third of numba's start-up. None of these kernels calls
BLAS, so numba is started with ``scipy.linalg`` hidden for that moment: it then uses its own
loop for np.correlate in this process, and still imports scipy on demand for anything that
calls BLAS (np.dot, np.linalg), so a user's own numba code keeps working.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading

import numba as nb

_lock = threading.Lock()
_started = False


class _HideScipyLinalg(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "scipy.linalg" or name.startswith("scipy.linalg."):
            raise ModuleNotFoundError(f"{name} is hidden while numba starts", name=name)
        return None


@nb.njit(cache=True)
def _first(x):
    return x + 1


def start() -> None:
    global _started
    with _lock:
        if _started:
            return
        hide = None if "scipy.linalg" in sys.modules else _HideScipyLinalg()
        if hide is not None:
            sys.meta_path.insert(0, hide)
        try:
            _first(1)  # loads numba's registries (the import above happens here)
        finally:
            if hide is not None:
                sys.meta_path.remove(hide)
        _started = True
