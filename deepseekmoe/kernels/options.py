"""Options of the Triton expert backend: one typed, validated object instead of environment variables.

    from deepseekmoe.kernels import KernelOptions, kernel_options
    with kernel_options(KernelOptions(save="ast")):      # for a block of code (tests, scripts)
        y = experts_triton(x_TD, idx_TK, w_TK, w13, w2)
    y = experts_triton(x_TD, idx_TK, w_TK, w13, w2, options=KernelOptions(down_bwd="fused"))

The defaults follow the measurements in docs/kernels.md; the other values are kept because they
are tested alternatives (same results to rounding) worth re-measuring on new hardware. The options
a forward runs with are also the ones its backward uses, whenever that backward runs.
This module imports no triton, so CPU installs can build and validate options.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from deepseekmoe.errors import ConfigError

SAVE_MODES = {"gu": 1, "ast": 2}  # value -> the kernels' save mode (0 = nothing saved, inference)
DOWN_BWD_PATHS = ("split", "fused")


@dataclass(frozen=True)
class KernelOptions:
    """save: what the forward keeps for backward: "gu" = g|u [S, 2F] (backward recomputes silu;
         least memory) or "ast" = a [S, F] + s|t [S, 2F] (backward epilogue is products only; 1.5x
         the memory).
    down_bwd: backward of the down projection: "split" (a row-tiled GEMM for dA', then one
         elementwise SwiGLU backward pass) or "fused" (one kernel with the SwiGLU backward in its
         epilogue).
    dy_copy: with "split", gather dy into sorted order once (True) or gather its rows inside the
         dA' and dW2 loops (False)."""

    save: str = "gu"
    down_bwd: str = "split"
    dy_copy: bool = True

    def __post_init__(self):
        if self.save not in SAVE_MODES:
            raise ConfigError(f"KernelOptions(save={self.save!r}): choose one of {', '.join(SAVE_MODES)}")
        if self.down_bwd not in DOWN_BWD_PATHS:
            raise ConfigError(f"KernelOptions(down_bwd={self.down_bwd!r}): choose one of "
                              f"{', '.join(DOWN_BWD_PATHS)}")
        if not isinstance(self.dy_copy, bool):
            raise ConfigError(f"KernelOptions(dy_copy={self.dy_copy!r}): must be True or False")

    @property
    def save_mode(self) -> int:
        """The kernels' integer save mode (1 = g|u, 2 = a + s|t)."""
        return SAVE_MODES[self.save]


_current = KernelOptions()


def current_options() -> KernelOptions:
    """The options experts_triton uses when it is not given any: the defaults, or kernel_options'."""
    return _current


@contextlib.contextmanager
def kernel_options(options: KernelOptions):
    """Run the Triton backend with `options` inside the block (restored afterwards, also on error)."""
    global _current
    if not isinstance(options, KernelOptions):
        raise ConfigError(f"kernel_options expects a KernelOptions, got {type(options).__name__}")
    prev, _current = _current, options
    try:
        yield options
    finally:
        _current = prev
