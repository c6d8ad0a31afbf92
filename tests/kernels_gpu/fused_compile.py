"""Compile the fused dequantize-GEMV kernel to a CUDA binary for sm_90 without a GPU: Triton's
front end, its MLIR passes, LLVM and ptxas all run on the CPU. The interpreter tests check the
kernel's arithmetic; this checks that the same source lowers for a real GPU.

    python tests/kernels_gpu/fused_compile.py [M_PAD ...]   (run without TRITON_INTERPRET)
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from llmapp.kernels_gpu import fused_gemv

POINTERS_AND_SIZES = {
    "x_ptr": "*fp32",
    "w_ptr": "*u8",
    "out_ptr": "*fp32",
    "M": "i32",
    "N": "i32",
    "K": "i32",
    "row_bytes": "i32",
}


def compile_for(ggml_type: int, m_pad: int, target: GPUTarget) -> int:
    """The size of the cubin built for one type and row count."""
    constants = fused_gemv.compile_options(m_pad, ggml_type)
    signature = {**POINTERS_AND_SIZES, **dict.fromkeys(constants, "constexpr")}
    names = list(signature)
    constexprs = {(names.index(name),): value for name, value in constants.items()}
    source = ASTSource(fn=fused_gemv._gemv_kernel, signature=signature, constexprs=constexprs)
    kernel = triton.compile(source, target=target, options={"enable_fp_fusion": True})
    return len(kernel.asm["cubin"])


def main() -> None:
    assert not fused_gemv.INTERPRETED, "run without TRITON_INTERPRET"
    m_pads = [int(a) for a in sys.argv[1:]] or [1, 2, 4, 8]
    target = GPUTarget("cuda", 90, 32)
    for ggml_type in sorted(fused_gemv.SCALE_FIELDS):
        for m_pad in m_pads:
            size = compile_for(ggml_type, m_pad, target)
            print(f"type {ggml_type} rows {m_pad}: sm_90 cubin of {size} bytes", flush=True)


if __name__ == "__main__":
    main()
