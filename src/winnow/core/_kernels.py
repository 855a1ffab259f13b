"""The compiled passes of selection, loaded on first use (private).

``import winnow`` does not import numba: the loops of :mod:`winnow.core._compiled` are
loaded (from numba's on-disk cache, or compiled) the first time one is called.
"""


def __getattr__(name: str):
    from winnow.core import _compiled

    value = getattr(_compiled, name)
    globals()[name] = value
    return value
