"""Compatibility of the Triton CPU interpreter (``TRITON_INTERPRET=1``) with NumPy >= 2.4.

The interpreter turns a scalar kernel value (a loop bound such as ``tl.cdiv(N, BLOCK)``
or a runtime ``int`` argument) into a Python int with ``int(handle.data)``, where
``data`` is a one-element array of shape (1,). NumPy 2.4 made that conversion an error
("only 0-dimensional arrays can be converted to Python scalars"), so every kernel with a
runtime ``range`` bound fails under the interpreters of Triton 3.2 to 3.7; Triton 3.8
converts with ``data.squeeze()`` instead (triton-lang/triton#9171).

:func:`patch_scalar_index` makes the interpreter's ``tensor.__index__`` read one-element
arrays with ``.item()`` (larger arrays still raise as before). It only touches the
interpreter, is a no-op where that module is missing, and is applied once per process
by the kernel modules when the interpreter is on.
"""

from __future__ import annotations

__all__ = ["patch_scalar_index"]


def _scalar_index(self) -> int:
    data = self.handle.data
    return int(data.item()) if getattr(data, "size", 0) == 1 else int(data)


def patch_scalar_index() -> bool:
    """Patch the interpreter's scalar ``__index__``; True if the patch is (now) installed."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return False
    if getattr(original, "_lewm_fast_scalar_index", False):
        return True

    def patched(tensor, *args, **kwargs):
        result = original(tensor, *args, **kwargs)
        scope = args[0] if args else kwargs.get("scope")
        if hasattr(scope, "set_attr"):  # Triton >= 3.3 patches through a scope it later undoes
            scope.set_attr(tensor, "__index__", _scalar_index)
        else:  # Triton 3.2 sets the attribute directly
            tensor.__index__ = _scalar_index
        return result

    patched._lewm_fast_scalar_index = True
    interpreter._patch_lang_tensor = patched
    return True
