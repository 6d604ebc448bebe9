"""Errors as the host shows them: a builtin type and the message, not this pack's module path.

The host prints a failed node's exception as ``<module>.<class>: message``, and it loads this pack
under a module name that is its folder's path, so a ``DatasetError`` read
``/…/custom_nodes/sd3_lora_trainer.trainer.data.DatasetError: …``. The nodes' functions re-raise
the pack's own exception types as their builtin base (ValueError, OSError...), same message, with
the original chained for the traceback.
"""
from __future__ import annotations

import builtins
import functools

_PACKAGE = __name__.rsplit(".nodes", 1)[0]


def _builtin_base(error: BaseException) -> type:
    return next(t for t in type(error).__mro__ if getattr(builtins, t.__name__, None) is t)


def plain_errors(fn):
    """``fn``, raising this pack's exception types as their builtin base class."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not type(e).__module__.startswith(_PACKAGE):
                raise
            raise _builtin_base(e)(str(e)) from e
    return wrapper


def install(classes: dict) -> None:
    """Wrap the FUNCTION of every node class in ``classes`` ({name: class}) with :func:`plain_errors`."""
    for cls in classes.values():
        method = getattr(cls, cls.FUNCTION)
        if not getattr(method, "__wrapped__", None):
            setattr(cls, cls.FUNCTION, plain_errors(method))
