"""Run Liger's Triton kernels on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1).

triton reads TRITON_INTERPRET when a kernel (its standard library's included) is defined, so the
variable must be set before the process imports triton: `interpreter_env()` sets it around the
spawn of the test ranks, and `enable()`, called first thing in a rank, checks it. Two gaps of Triton 3.8's
interpreter are bridged so that the kernels' own code runs unchanged:

- Python float arguments (eps, offsets) stay Python floats, while compiled Triton passes them as
  fp32 scalars; Liger's RMSNorm calls `eps.to(tl.float32)` on them. They are passed as fp32
  scalars here, as on a GPU.
- `triton.language.extra.libdevice` functions are CUDA/HIP bitcode with no interpreter
  implementation (they return None); Liger's RMSNorm imports `rsqrt` from there. It is bound
  to `tl.math.rsqrt`, the same function in Triton's core language.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def interpreter_env() -> Iterator[None]:
    """TRITON_INTERPRET=1 for the processes started inside (this process's triton is unaffected)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def enable() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("start this process with TRITON_INTERPRET=1 (liger_interpreter.interpreter_env)")
    import numpy as np
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "_qwen2_float_args", False):
        return
    convert = interpreter._implicit_cvt

    def implicit_cvt(arg):
        if isinstance(arg, float):
            ty = tl.str_to_ty(triton.runtime.jit.mangle_type(arg), None)  # "fp32", as compiled Triton
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), ty), ty)
        return convert(arg)

    interpreter._implicit_cvt = implicit_cvt
    interpreter._qwen2_float_args = True

    import liger_kernel.ops.rms_norm as rms_norm

    rms_norm.rsqrt = lambda x: tl.math.rsqrt(x)
