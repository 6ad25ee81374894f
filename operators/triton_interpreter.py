"""Run Triton kernels (fla's GLA) on CPU tensors through Triton's interpreter, for tests.

``TRITON_INTERPRET=1`` makes ``triton.jit`` return an interpreted function that executes the
kernel in NumPy, program by program, on CPU tensors: slow, but enough to run fla's
``chunk_gla`` / ``fused_recurrent_gla`` at tiny shapes in CI, with no GPU. The variable is read
when a kernel is *decorated* (when fla is imported), so it must be set before fla is imported
in the process; the tests run in a subprocess that sets it first (``docs/BACKENDS.md``).

Two gaps between the interpreter and compiled Triton stop fla's kernels there; the shims of
:func:`install_shims` close them without editing any installed file:

- Autotuning benchmarks every candidate config, which needs a GPU driver ("0 active
  drivers"). Timing is meaningless in the interpreter, so each autotuned kernel runs its first
  remaining candidate (after any filtering such as ``operators.maca``'s MetaX table).
- A ``for i in range(n)`` index is a Python ``int`` in the interpreter but a Triton scalar
  when compiled, and fla calls ``i.to(tl.int64)`` on it. The interpreter rewrites each kernel's
  source (AST) before running it; we extend that rewrite so a loop over ``range`` /
  ``tl.range`` / ``tl.static_range`` yields an ``int`` subclass that also has ``.to``. It stays
  an int everywhere else, so nothing the interpreter already does changes.

Known limit, not shimmed: ``tl.dot`` on bf16 operands is computed wrongly by the interpreter
(NumPy has no bf16), so bf16 results under the interpreter are meaningless; tests skip them.

Only torch is imported here; triton is imported by the functions that need it.
"""

from __future__ import annotations

import ast
import importlib.util
import os

_installed = False


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set and triton is importable: Triton kernels then
    run on CPU tensors (slowly), so the fla backends may take CPU calls."""
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() not in ("1", "true", "yes", "on"):
        return False
    return importlib.util.find_spec("triton") is not None


class _LoopIndex(int):
    """A loop index that is still an ``int`` but also answers ``.to(dtype)`` like a Triton
    scalar (compiled Triton hands loops Triton scalars; the interpreter hands plain ints)."""

    __slots__ = ()

    def to(self, dtype, fp_downcast_rounding=None, bitcast=False, **_):
        from triton.language import core
        from triton.runtime.interpreter import interpreter_semantic

        scalar = interpreter_semantic.to_tensor(int(self))
        return core.cast(scalar, dtype, fp_downcast_rounding, bitcast, _semantic=interpreter_semantic)


def _loop_indices(iterable):
    """What the rewritten kernels iterate instead of ``range(...)``: ints become _LoopIndex."""
    for item in iterable:
        yield _LoopIndex(item) if type(item) is int else item


# The name the rewritten kernel source calls; the interpreter copies its module globals into
# each kernel's globals before exec, which is how the rewritten code finds it.
_LOOP_HELPER = "_sbtrain_loop_indices"
_RANGE_NAMES = {"range", "static_range"}


def _is_range_call(node) -> bool:
    if not isinstance(node, ast.Call):
        return False
    fn = node.func
    return (isinstance(fn, ast.Name) and fn.id in _RANGE_NAMES) or (
        isinstance(fn, ast.Attribute) and fn.attr in _RANGE_NAMES
    )


def _make_transformer(base):
    class LoopIndexTransformer(base):
        """The interpreter's own rewrite, plus ``for i in range(...)`` -> ``_loop_indices(range(...))``."""

        def visit_For(self, node):
            node = self.generic_visit(node)
            if _is_range_call(node.iter):
                node.iter = ast.copy_location(
                    ast.Call(func=ast.Name(id=_LOOP_HELPER, ctx=ast.Load()), args=[node.iter], keywords=[]), node.iter
                )
            return node

    return LoopIndexTransformer


def install_shims() -> None:
    """Make fla's kernels run under the interpreter (idempotent; a no-op when already done).

    Call before the first kernel runs: kernels the interpreter has already rewritten are
    cached, so the cache is cleared here to rewrite them again with the loop-index shim."""
    global _installed
    if _installed:
        return
    from triton.runtime import autotuner, interpreter

    needed = ("FunctionRewriter", "InterpretedFunction", "ASTTransformer")
    missing = [name for name in needed if not hasattr(interpreter, name)]
    missing += [f"Autotuner.{name}" for name in ("prune_configs", "_bench") if not hasattr(autotuner.Autotuner, name)]
    if missing:
        raise RuntimeError(f"this triton lacks {', '.join(missing)}; the interpreter shims know triton 3.7.1 and 3.9.0")

    original_prune = autotuner.Autotuner.prune_configs

    def first_config_only(self, kwargs):
        # One candidate left: triton 3.9 runs it without benchmarking (no GPU timer needed).
        return original_prune(self, kwargs)[:1]

    def no_timing(self, *args, config, **meta):
        # Older triton (3.7) benchmarks even a single candidate; "time" it without running it.
        return [0.0, 0.0, 0.0]

    autotuner.Autotuner.prune_configs = first_config_only
    autotuner.Autotuner._bench = no_timing

    setattr(interpreter, _LOOP_HELPER, _loop_indices)
    rewriter = interpreter.FunctionRewriter
    rewriter.ast_transformer = _make_transformer(type(rewriter.ast_transformer))()
    interpreter.InterpretedFunction.rewritten_fn.clear()
    _installed = True


def shims_installed() -> bool:
    return _installed
