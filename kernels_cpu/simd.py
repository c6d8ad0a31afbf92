"""Explicit 16-lane vectors for the Numba kernels: LLVM vector values, not arrays.

Numba's auto-vectorizer decides alone whether a loop becomes SIMD, and for a kernel that keeps
several rows' accumulators in registers it did not (it hoisted and spilled broadcasts, or
vectorized the wrong loop: 10-26 Gmac/s where the hardware gives ~200). These intrinsics let a
kernel hold `<16 x i32>` / `<16 x float>` values in local variables, which LLVM keeps in
registers, and use the one instruction that matters for int8 matmuls: VNNI's vpdpbusd (64
unsigned-by-signed byte products summed into 16 int32 lanes), which Numba never emits by itself.
The byte-lane ones (load_bytes, the integer operators on I32X16, lookup16, put_lanes) decode
quantized blocks 16 elements at a time (blocks.py).

Portability: `dot_quads` emits the host's byte dot-product instruction (HOST_DOT) only when its
`vnni` argument is true: vpdpbusd where the CPU has AVX512-VNNI, usdot on aarch64 with i8mm
(Apple M2+, Graviton3+), sdot on aarch64 with dotprod (Apple M1, Graviton2, Cortex-A76 / Pi 5).
Otherwise it is the same sum in generic LLVM IR (widen, multiply, add pairs), which LLVM lowers
for any target (AVX-512BW: vpmaddwd, ~2.2x slower here from 4 rows on; NEON: smull/addp), and
which LLVM never turns into those instructions by itself. Likewise `lookup16` emits vpermd only
where the host has AVX-512F. Numba's cache is keyed by the target CPU name and features, so
code compiled with an instruction is never loaded on a CPU without it.

No bounds checks: callers index inside their arrays (64 bytes from a byte index, 16 float32).
Note for the cache: `cache=True` keys on the calling file only; after editing this file, clear
the kernels' caches (`__pycache__/*.nbi|nbc` of kernels_cpu).
"""

from __future__ import annotations

import operator
import os
import re
from typing import Any

import llvmlite.binding as llb
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic, models, overload, register_model

LANES = 16


class VecType(types.Type):  # type: ignore[misc]
    """A Numba type for one LLVM vector of 16 int32 or float32 lanes."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        super().__init__(name=f"vec16_{kind}")


I32X16 = VecType("i32")
F32X16 = VecType("f32")
_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_VI = ir.VectorType(_I32, LANES)
_VF = ir.VectorType(ir.FloatType(), LANES)
_VB = ir.VectorType(_I8, LANES)
_FAST = ("contract",)  # fused multiply-adds, no reordering: the same result in every kernel


@register_model(VecType)
class _VecModel(models.PrimitiveModel):  # type: ignore[misc]
    def __init__(self, dmm: Any, fe_type: VecType) -> None:
        super().__init__(dmm, fe_type, _VI if fe_type.kind == "i32" else _VF)


def _host_has(feature: str) -> bool:
    # Numba compiles for the host unless told otherwise; an explicit target must name the feature.
    features = os.environ.get("NUMBA_CPU_FEATURES")
    if features is not None or os.environ.get("NUMBA_CPU_NAME", "host") != "host":
        return f"+{feature}" in (features or "").split(",")
    try:
        return bool(llb.get_host_cpu_features().get(feature, False))
    except RuntimeError:  # LLVM cannot read this host's features (some ARM hosts): none known
        return False


HOST_VNNI = _host_has("avx512vnni")
"""Whether dot_quads may use vpdpbusd on this machine."""
HOST_AVX512 = _host_has("avx512f")
"""Whether lookup16 may use vpermd on this machine."""


# Generic IR that LLVM's AArch64 backend turns into sdot (with dotprod) and usdot (with i8mm):
# compiled for a CPU name and features, it tells which of the two that target has.
_ARM_PROBE = """
define i32 @signed_dot(<16 x i8> %a, <16 x i8> %b) {
  %x = sext <16 x i8> %a to <16 x i32>
  %y = sext <16 x i8> %b to <16 x i32>
  %p = mul <16 x i32> %x, %y
  %r = call i32 @llvm.vector.reduce.add.v16i32(<16 x i32> %p)
  ret i32 %r
}
define i32 @mixed_dot(<16 x i8> %a, <16 x i8> %b) {
  %x = zext <16 x i8> %a to <16 x i32>
  %y = sext <16 x i8> %b to <16 x i32>
  %p = mul <16 x i32> %x, %y
  %r = call i32 @llvm.vector.reduce.add.v16i32(<16 x i32> %p)
  ret i32 %r
}
declare i32 @llvm.vector.reduce.add.v16i32(<16 x i32>)
"""


def arm_dot_instruction(triple: str, cpu_name: str, features: str) -> str:
    """The dot-product instruction dot_quads uses when compiling for this LLVM target: "usdot"
    (i8mm), "sdot" (dotprod) or "" (neither, or not aarch64).

    LLVM is asked rather than a table of CPU names kept here: llvmlite has no query for the
    features a CPU name implies, and an intrinsic the target lacks aborts the process in
    instruction selection ("Cannot select"), so a wrong guess would crash, not slow down.
    """
    if not triple.startswith(("aarch64", "arm64")):
        return ""
    if triple == llb.get_process_triple():
        llb.initialize_native_target()
        llb.initialize_native_asmprinter()
    else:  # a cross-compiling check (tests on x86)
        llb.initialize_all_targets()
        llb.initialize_all_asmprinters()
    module = llb.parse_assembly(f'target triple = "{triple}"\n{_ARM_PROBE}')
    machine = llb.Target.from_triple(triple).create_target_machine(
        cpu=cpu_name, features=features, opt=2
    )
    asm = machine.emit_assembly(module)
    mixed = asm[asm.index("mixed_dot:") :] if "mixed_dot:" in asm else ""
    if re.search(r"\busdot\b", mixed):
        return "usdot"
    return "sdot" if re.search(r"\bsdot\b", asm) else ""


def _numba_arm_dot() -> str:
    # The target Numba compiles for (numba.core.codegen: NUMBA_CPU_NAME or the host's name,
    # NUMBA_CPU_FEATURES or the host's features; "" where LLVM cannot read them, as on macOS,
    # where the host CPU name carries them).
    triple = llb.get_process_triple()
    if not triple.startswith(("aarch64", "arm64")):
        return ""
    name = numba.config.CPU_NAME or llb.get_host_cpu_name()  # type: ignore[attr-defined]
    features = numba.config.CPU_FEATURES  # type: ignore[attr-defined]
    if features is None:
        features = get_host_cpu_features()
    return arm_dot_instruction(triple, name, features)


ARM_DOT = _numba_arm_dot()
"""The aarch64 dot-product instruction of the target Numba compiles for, or ""."""
HOST_DOT = "vpdpbusd" if HOST_VNNI else ARM_DOT
"""The instruction dot_quads emits when asked to (its `vnni` argument), or "" for none."""
DOT_OFFSET = 128 if HOST_DOT == "sdot" else 0
"""What dot_quads' instruction path subtracts from every unsigned byte of u (module docstring
of matmul: the kernels start their sums at -(bias - DOT_OFFSET) * sum(x) instead of -bias *
sum(x)). sdot multiplies signed bytes only: u - 128 is a signed byte, u is not."""


def _addr(context: Any, builder: Any, aryty: Any, ary: Any, idx: Any, elt: Any) -> Any:
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [idx]), elt.as_pointer())


def _load(vty: Any, align: int, extend: str = "") -> Any:
    """Codegen of `(arr, idx) -> vector`: the vty at arr[idx], widened to int32 lanes by
    `extend` ("sext" or "zext") when vty is bytes."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        ptr = _addr(context, builder, sig.args[0], args[0], args[1], vty)
        value = builder.load(ptr, align=align)
        return getattr(builder, extend)(value, _VI) if extend else value

    return codegen


def _store(vty: Any, align: int) -> Any:
    """Codegen of `(arr, idx, vector) -> None`: the vector at arr[idx] as vty (truncating int32
    lanes when vty is bytes)."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        value = args[2] if args[2].type == vty else builder.trunc(args[2], vty)
        builder.store(
            value, _addr(context, builder, sig.args[0], args[0], args[1], vty), align=align
        )
        return context.get_dummy_value()

    return codegen


def _to_i32(builder: Any, v: Any) -> Any:
    if v.type.width > 32:
        return builder.trunc(v, _I32)
    return builder.sext(v, _I32) if v.type.width < 32 else v


def _splat(builder: Any, vty: Any, scalar: Any) -> Any:
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined), ir.Constant(_VI, None))


@intrinsic
def i32_splat(typingctx: Any, value: Any) -> Any:
    """All lanes = int(value) (an integer scalar, truncated to 32 bits)."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return _splat(builder, _VI, _to_i32(builder, args[0]))

    if not isinstance(value, types.Integer):
        return None
    return I32X16(value), codegen


@intrinsic
def f32_splat(typingctx: Any, value: Any) -> Any:
    """All lanes = value (a float32 scalar)."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return _splat(builder, _VF, args[0])

    return F32X16(types.float32), codegen


@intrinsic
def f32_zero(typingctx: Any) -> Any:
    return F32X16(), lambda context, builder, sig, args: ir.Constant(_VF, None)


@intrinsic
def load_quads(typingctx: Any, arr: Any, idx: Any) -> Any:
    """The 64 bytes at arr[idx:idx+64] (uint8/int8 array), 4 per lane (byte j = k offset j)."""
    return I32X16(arr, idx), _load(_VI, 1)


@intrinsic
def broadcast_quad(typingctx: Any, arr: Any, idx: Any) -> Any:
    """The 4 bytes at arr[idx:idx+4] in every lane."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        word = builder.load(_addr(context, builder, sig.args[0], args[0], args[1], _I32), align=1)
        return _splat(builder, _VI, word)

    return I32X16(arr, idx), codegen


def _pairs(builder: Any, v: Any, n: int, first: int) -> Any:
    # lanes first, first+2, ... of v: n of them
    mask = ir.Constant(ir.VectorType(_I32, n), [first + 2 * i for i in range(n)])
    return builder.shuffle_vector(v, v, mask)


def _dot_generic(builder: Any, acc: Any, u: Any, s: Any) -> Any:
    wide = ir.VectorType(_I32, 4 * LANES)
    bytes_ty = ir.VectorType(_I8, 4 * LANES)
    a = builder.zext(builder.bitcast(u, bytes_ty), wide)
    b = builder.sext(builder.bitcast(s, bytes_ty), wide)
    prod = builder.mul(a, b)
    two = builder.add(_pairs(builder, prod, 2 * LANES, 0), _pairs(builder, prod, 2 * LANES, 1))
    four = builder.add(_pairs(builder, two, LANES, 0), _pairs(builder, two, LANES, 1))
    return builder.add(acc, four)


_V4I = ir.VectorType(_I32, 4)
_V16B = ir.VectorType(_I8, 16)


def _quarters(builder: Any, v: Any) -> list[Any]:
    # <16 x i32> as four 128-bit NEON registers (LLVM splits the wide vector so anyway: free)
    return [
        builder.shuffle_vector(v, v, ir.Constant(_V4I, list(range(4 * i, 4 * i + 4))))
        for i in range(4)
    ]


def _dot_arm(builder: Any, acc: Any, u: Any, s: Any, instruction: str) -> Any:
    """acc + per lane sum of 4 byte products by aarch64's usdot (u unsigned) or sdot (u - 128,
    DOT_OFFSET). The intrinsics exist for 128-bit vectors only: one call per quarter."""
    if instruction == "sdot":  # u - 128 as a signed byte: the top bit flipped
        u = builder.xor(u, _splat(builder, _VI, ir.Constant(_I32, 0x80808080 - (1 << 32))))
    fnty = ir.FunctionType(_V4I, [_V4I, _V16B, _V16B])
    name = f"llvm.aarch64.neon.{instruction}.v4i32.v16i8"
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    parts = [
        builder.call(fn, [a, builder.bitcast(x, _V16B), builder.bitcast(y, _V16B)])
        for a, x, y in zip(
            _quarters(builder, acc), _quarters(builder, u), _quarters(builder, s), strict=True
        )
    ]
    low = builder.shuffle_vector(
        parts[0], parts[1], ir.Constant(ir.VectorType(_I32, 8), list(range(8)))
    )
    high = builder.shuffle_vector(
        parts[2], parts[3], ir.Constant(ir.VectorType(_I32, 8), list(range(8)))
    )
    return builder.shuffle_vector(low, high, ir.Constant(_VI, list(range(LANES))))


def _dot_instruction(builder: Any, acc: Any, u: Any, s: Any, instruction: str) -> Any:
    if instruction == "vpdpbusd":
        fnty = ir.FunctionType(_VI, [_VI, _VI, _VI])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [acc, u, s])
    return _dot_arm(builder, acc, u, s, instruction)


@intrinsic
def dot_quads(typingctx: Any, acc: Any, u: Any, s: Any, vnni: Any) -> Any:
    """acc + per lane sum of 4 products (unsigned bytes of u) * (signed bytes of s); with
    `vnni` true and HOST_DOT == "sdot", of (u - DOT_OFFSET) * s.

    No saturation (255 * 128 * 4 fits int32). `vnni` (a runtime bool, loop-invariant, so LLVM
    moves the branch out of the loop) picks the host's instruction (HOST_DOT: vpdpbusd, usdot,
    sdot) where it has one; tests pass False for the portable code.
    """

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        acc, u, s, use_vnni = args
        if not HOST_DOT:
            return _dot_generic(builder, acc, u, s)
        with builder.if_else(use_vnni) as (then, otherwise):
            with then:
                fast = _dot_instruction(builder, acc, u, s, HOST_DOT)
                fast_block = builder.block
            with otherwise:
                slow = _dot_generic(builder, acc, u, s)
                slow_block = builder.block
        phi = builder.phi(_VI)
        phi.add_incoming(fast, fast_block)
        phi.add_incoming(slow, slow_block)
        return phi

    return I32X16(I32X16, I32X16, I32X16, types.boolean), codegen


@intrinsic
def load_f32(typingctx: Any, arr: Any, idx: Any) -> Any:
    """arr[idx:idx+16] of a float32 array."""
    return F32X16(arr, idx), _load(_VF, 4)


@intrinsic
def store_f32(typingctx: Any, arr: Any, idx: Any, value: Any) -> Any:
    """arr[idx:idx+16] = value, into a float32 array."""
    return types.none(arr, idx, F32X16), _store(_VF, 4)


@intrinsic
def store_quads(typingctx: Any, arr: Any, idx: Any, value: Any) -> Any:
    """arr[idx:idx+64] = the 4 bytes of each lane (load_quads' inverse), into a byte array."""
    return types.none(arr, idx, I32X16), _store(_VI, 1)


@intrinsic
def load_f16(typingctx: Any, arr: Any, idx: Any) -> Any:
    """arr[idx:idx+16] of a uint16 array of IEEE half bit patterns, widened to float32 (exact:
    every half is a float32; vcvtph2ps on x86, fcvtl on aarch64)."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        vh = ir.VectorType(ir.HalfType(), LANES)
        ptr = _addr(context, builder, sig.args[0], args[0], args[1], vh)
        return builder.fpext(builder.load(ptr, align=2), _VF)

    if not (isinstance(arr, types.Array) and arr.dtype == types.uint16):
        return None
    return F32X16(arr, idx), codegen


@intrinsic
def to_f32(typingctx: Any, ints: Any) -> Any:
    """float32 of each int32 lane."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.sitofp(args[0], _VF)

    return F32X16(I32X16), codegen


@intrinsic
def mul_exact(typingctx: Any, a: Any, b: Any) -> Any:
    """a * b, rounded on its own: no fast-math flag lets LLVM fuse it into a later add (a scale
    computed so is bit for bit the scalar float32 product)."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.fmul(args[0], args[1])

    return F32X16(F32X16, F32X16), codegen


@intrinsic
def fma_int(typingctx: Any, acc: Any, ints: Any, scale: Any) -> Any:
    """acc + float(ints) * scale."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        product = builder.fmul(builder.sitofp(args[1], _VF), args[2], flags=_FAST)
        return builder.fadd(args[0], product, flags=_FAST)

    return F32X16(F32X16, I32X16, F32X16), codegen


@intrinsic
def fma(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """a * b + c."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.fadd(builder.fmul(args[0], args[1], flags=_FAST), args[2], flags=_FAST)

    return F32X16(F32X16, F32X16, F32X16), codegen


@intrinsic
def mul(typingctx: Any, a: Any, b: Any) -> Any:
    """a * b."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.fmul(args[0], args[1], flags=_FAST)

    return F32X16(F32X16, F32X16), codegen


@intrinsic
def quad_byte(typingctx: Any, quads: Any, j: Any) -> Any:
    """float of unsigned byte j (a constant 0..3) of every lane."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        shift = _splat(
            builder, _VI, builder.mul(builder.trunc(args[1], _I32), ir.Constant(_I32, 8))
        )
        byte = builder.and_(
            builder.lshr(args[0], shift), _splat(builder, _VI, ir.Constant(_I32, 255))
        )
        return builder.sitofp(byte, _VF)

    return F32X16(I32X16, j), codegen


def _call(builder: Any, name: str, ret: Any, args: list[Any]) -> Any:
    # An LLVM intrinsic by its full overloaded name (e.g. llvm.fabs.v16f32).
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


@intrinsic
def abs_max(typingctx: Any, a: Any, b: Any) -> Any:
    """max over the 32 lanes of a and b of |lane| (float32 scalar)."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        # |x| has the sign bit clear, so its bits order as integers do: an integer max tree
        # (a float one is lowered lane by lane to keep maxnum's NaN rules). NaN wins, as inf.
        fa = builder.bitcast(_call(builder, "llvm.fabs.v16f32", _VF, [args[0]]), _VI)
        fb = builder.bitcast(_call(builder, "llvm.fabs.v16f32", _VF, [args[1]]), _VI)
        both = _call(builder, "llvm.smax.v16i32", _VI, [fa, fb])
        top = _call(builder, "llvm.vector.reduce.smax.v16i32", _I32, [both])
        return builder.bitcast(top, ir.FloatType())

    return types.float32(F32X16, F32X16), codegen


@intrinsic
def round_i32(typingctx: Any, v: Any) -> Any:
    """Each lane rounded to the nearest integer, ties to even (as np.rint), as int32."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.fptosi(_call(builder, "llvm.rint.v16f32", _VF, [args[0]]), _VI)

    return I32X16(F32X16), codegen


@intrinsic
def store_i8(typingctx: Any, arr: Any, idx: Any, value: Any) -> Any:
    """arr[idx:idx+16] = the low bytes of value's lanes, into an int8 array."""
    return types.none(arr, idx, I32X16), _store(_VB, 1)


@intrinsic
def lane_sum(typingctx: Any, v: Any) -> Any:
    """Sum of the 16 int32 lanes (wrapping), as int32."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return _call(builder, "llvm.vector.reduce.add.v16i32", _I32, [args[0]])

    return types.int32(I32X16), codegen


# ---------------------------------------------------------------------------------------------
# Byte lanes and integer lane arithmetic, for decoding quantized blocks (blocks.py)


@intrinsic
def load_bytes(typingctx: Any, arr: Any, idx: Any) -> Any:
    """The 16 bytes at arr[idx:idx+16], one per int32 lane: sign-extended from an int8 array,
    zero-extended from any other byte array."""
    return I32X16(arr, idx), _load(_VB, 1, "sext" if arr.dtype == types.int8 else "zext")


@intrinsic
def lane_index(typingctx: Any) -> Any:
    """Lanes 0, 1, ..., 15."""
    return I32X16(), lambda context, builder, sig, args: ir.Constant(_VI, list(range(LANES)))


@intrinsic
def lookup16(typingctx: Any, table: Any, idx: Any) -> Any:
    """table[idx & 15] in each lane (table, idx: I32X16): one vpermd where the host has
    AVX-512, else lane by lane in generic LLVM IR."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        table, idx = args
        if HOST_AVX512:
            return _call(builder, "llvm.x86.avx512.permvar.si.512", _VI, [table, idx])
        idx = builder.and_(idx, _splat(builder, _VI, ir.Constant(_I32, 15)))
        out = ir.Constant(_VI, ir.Undefined)
        for lane in range(LANES):
            pos = ir.Constant(_I32, lane)
            value = builder.extract_element(table, builder.extract_element(idx, pos))
            out = builder.insert_element(out, value, pos)
        return out

    return I32X16(I32X16, I32X16), codegen


@intrinsic
def put_lanes(typingctx: Any, dst: Any, idx: Any, v: Any, s: Any, m: Any) -> Any:
    """Lanes v, integers of elements idx..idx+15, into dst[idx:idx+16]: as the float32 s * v - m
    into a float32 array, as their low bytes into an int8 one (s and m unused then).

    s * v is rounded before m is subtracted (no fused multiply-add, no fast-math flags), so
    each lane is bit for bit the scalar float32 expression. The kind of store is settled when
    the caller compiles, by dst's type: no branch, and no array passed that is not written.
    """
    to_float = dst.dtype == types.float32

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        arr, index, lanes, scale, low = args
        if to_float:
            value = builder.fsub(builder.fmul(builder.sitofp(lanes, _VF), scale), low)
            builder.store(value, _addr(context, builder, sig.args[0], arr, index, _VF), align=4)
        else:
            ptr = _addr(context, builder, sig.args[0], arr, index, _VB)
            builder.store(builder.trunc(lanes, _VB), ptr, align=1)
        return context.get_dummy_value()

    if dst.dtype not in (types.float32, types.int8):
        return None
    return types.none(dst, idx, I32X16, F32X16, F32X16), codegen


def _lane_operator(pyop: Any, method: str) -> None:
    """Python's binary operator `pyop` on I32X16 lanes, as the llvmlite builder's `method`:
    vector op vector, or vector op integer (the integer taken into every lane as int32)."""

    def typer(typingctx: Any, a: Any, b: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            lhs, rhs = args
            if sig.args[1] != I32X16:  # an integer, the same in every lane
                rhs = _splat(builder, _VI, _to_i32(builder, rhs))
            return getattr(builder, method)(lhs, rhs)

        return I32X16(a, b), codegen

    typer.__name__ = f"lanes_{method}"
    lanes = intrinsic(typer)

    @overload(pyop, inline="always")
    def _lanes_op(a, b):  # unannotated: Numba matches it to the lambda's signature
        if a == I32X16 and (b == I32X16 or isinstance(b, types.Integer)):
            return lambda a, b: lanes(a, b)
        return None


# &, |, ^, +, - and the shifts work lane by lane on I32X16 values (>> is arithmetic, as on
# Python's and numpy's signed integers; lanes wrap at 32 bits).
for _pyop, _method in (
    (operator.and_, "and_"),
    (operator.or_, "or_"),
    (operator.xor, "xor"),
    (operator.add, "add"),
    (operator.sub, "sub"),
    (operator.lshift, "shl"),
    (operator.rshift, "ashr"),
):
    _lane_operator(_pyop, _method)
