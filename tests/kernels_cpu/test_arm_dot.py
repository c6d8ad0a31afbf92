"""The aarch64 dot-product path (simd.HOST_DOT: usdot with i8mm, sdot with dotprod) against the
portable path and gguf-py, and the instructions in the assembly.

Numba compiles only for the machine it runs on, so the kernels' own checks run where this
process targets aarch64: on ARM hardware, and in .ci/aarch64 under qemu once per CPU name
(NUMBA_CPU_NAME=apple-m1, apple-m2, neoverse-n1, cortex-a76, generic, each with
NUMBA_CPU_FEATURES=""). Elsewhere they skip, and llvmlite's own AArch64 backend checks what can
be checked by cross-compiling: the feature probe and the instructions the IR becomes.

Packing is compiled and checked by test_matmul; with LLMAPP_TEST_PACKED naming a file, the
packed weights are saved there by the first run and read back by the others, so the runs for
each CPU name spend their (emulated) compile time on the dot-product path alone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import llvmlite.binding as llb
import numba
import numpy as np
import pytest
from emulation import emulated, needs_child_interpreter
from llvmlite import ir
from numba import njit
from test_matmul import assert_close, make_raw, oracle, quantized_input, type_name

from llmapp.kernels_cpu import matmul as mm
from llmapp.kernels_cpu import simd

TRIPLE = "aarch64-unknown-linux-gnu"
CI_CPUS = {
    "apple-m1": "sdot",  # M1: dotprod, no i8mm
    "apple-m2": "usdot",  # M2 and later: i8mm
    "neoverse-n1": "sdot",  # Graviton2, Ampere Altra
    "cortex-a76": "sdot",  # Raspberry Pi 5
    "generic": "",  # any aarch64: plain NEON
}
"""The CPU names the kernels are checked for, with the instruction each one gets."""
OTHER_CPUS = {"cortex-a72": "", "neoverse-v1": "usdot", "neoverse-n2": "usdot", "apple-m4": "usdot"}

ON_ARM = llb.get_process_triple().startswith(("aarch64", "arm64"))
arm_only = pytest.mark.skipif(
    not ON_ARM,
    reason="Numba compiles for this machine only: runs on aarch64 (hardware, or .ci/aarch64)",
)
QUANT_TYPES = tuple(mm.QUANT_SPECS)
ARRAY_FIELDS = ("lo", "hi", "d", "dm", "sub", "mins", "wf")  # PackedWeight's arrays, in order
ROW_LEN, N_ROWS = 512, 40  # 40 rows: a partial second tile; small enough to stay serial


# ---------------------------------------------------------------------------------------------
# Any host: LLVM's AArch64 backend, cross-compiling


@pytest.mark.parametrize("cpu, want", [*CI_CPUS.items(), *OTHER_CPUS.items()])
def test_cross_probe_names_the_instruction_each_cpu_has(cpu: str, want: str) -> None:
    assert simd.arm_dot_instruction(TRIPLE, cpu, "") == want
    assert simd.arm_dot_instruction("arm64-apple-macosx14.0.0", cpu, "") == want


def test_cross_probe_follows_explicit_features() -> None:
    assert simd.arm_dot_instruction(TRIPLE, "generic", "+dotprod") == "sdot"
    assert simd.arm_dot_instruction(TRIPLE, "generic", "+dotprod,+i8mm") == "usdot"
    assert simd.arm_dot_instruction(TRIPLE, "apple-m2", "-i8mm") == "sdot"
    assert simd.arm_dot_instruction(TRIPLE, "apple-m2", "-dotprod,-i8mm") == ""
    assert simd.arm_dot_instruction("x86_64-unknown-linux-gnu", "znver5", "") == ""


def cross_assembly(cpu: str, instruction: str) -> list[str]:
    """Instructions of `acc + dot(u, s)` as dot_quads' instruction path builds it, compiled by
    LLVM for an aarch64 CPU."""
    module = ir.Module(name="dot")
    module.triple = TRIPLE
    vec = ir.VectorType(ir.IntType(32), simd.LANES)
    fn = ir.Function(module, ir.FunctionType(vec, [vec, vec, vec]), name="dot")
    builder = ir.IRBuilder(fn.append_basic_block())
    builder.ret(simd._dot_arm(builder, *fn.args, instruction))
    llb.initialize_all_targets()
    llb.initialize_all_asmprinters()
    machine = llb.Target.from_triple(TRIPLE).create_target_machine(cpu=cpu, opt=2)
    asm = machine.emit_assembly(llb.parse_assembly(str(module)))
    lines = [line.split() for line in asm.splitlines() if line.startswith("\t")]
    return [words[0] for words in lines if not words[0].startswith(".")]


@pytest.mark.parametrize("cpu", [c for c, i in CI_CPUS.items() if i])
def test_cross_dot_path_compiles_to_four_instructions(cpu: str) -> None:
    # 16 int32 lanes are four 128-bit registers: four dot instructions, no widening multiplies.
    ops = cross_assembly(cpu, CI_CPUS[cpu])
    assert ops.count(CI_CPUS[cpu]) == 4
    assert not {"smull", "smull2", "umull", "addp", "mul"} & set(ops)
    if CI_CPUS[cpu] == "sdot":  # u - 128: one shared constant, one eor per quarter
        assert ops.count("eor") == 4 and "usdot" not in ops
    else:
        assert "eor" not in ops and "sdot" not in ops


# ---------------------------------------------------------------------------------------------
# This process's target, on aarch64


@arm_only
def test_target_takes_the_expected_path() -> None:
    name = numba.config.CPU_NAME  # type: ignore[attr-defined]
    if name in CI_CPUS and numba.config.CPU_FEATURES == "":  # type: ignore[attr-defined]
        assert simd.ARM_DOT == CI_CPUS[name]
    assert simd.HOST_DOT == simd.ARM_DOT and not simd.HOST_VNNI
    assert mm.USE_VNNI == bool(simd.ARM_DOT)
    assert simd.DOT_OFFSET == (128 if simd.ARM_DOT == "sdot" else 0)


def _dot_rows(wu: np.ndarray, xq: np.ndarray, out: np.ndarray, fast: bool) -> None:
    # out[:16] = per lane sum over k of wu (16 lanes x 4 bytes per quad) * xq (int8 [K]) - 7
    acc = simd.i32_splat(np.int32(-7))
    for q in range(xq.size // 4):
        acc = simd.dot_quads(acc, simd.load_quads(wu, 64 * q), simd.broadcast_quad(xq, 4 * q), fast)
    simd.store_f32(out, 0, simd.fma_int(simd.f32_zero(), acc, simd.f32_splat(np.float32(1))))


@arm_only
def test_assembly_has_the_instruction() -> None:
    kernel = njit(_dot_rows)  # not cached: compiled here, so its assembly is at hand
    rng = np.random.default_rng(0)
    w = rng.integers(0, 256, (16, 64)).astype(np.uint8)  # [lane, k]
    w[0] = 255  # the largest products: no saturation
    x = rng.integers(-128, 128, 64).astype(np.int8)
    x[:8] = -128
    wu = np.ascontiguousarray(w.reshape(16, 16, 4).transpose(1, 0, 2)).ravel()
    for fast in (True, False):
        out = np.zeros(16, np.float32)
        kernel(wu, x, out, fast)
        offset = simd.DOT_OFFSET if fast else 0
        want = (w.astype(np.int64) - offset) @ x.astype(np.int64) - 7
        np.testing.assert_array_equal(out, want.astype(np.float32))
    asm = kernel.inspect_asm(kernel.signatures[0])
    found = {op for op in ("sdot", "usdot") if re.search(rf"\b{op}\b", asm)}
    assert found == ({simd.ARM_DOT} if simd.ARM_DOT else set())


# ---------------------------------------------------------------------------------------------
# Parity of the matmul, every quantized type


@pytest.fixture(scope="module")
def weights() -> dict[int, tuple[np.ndarray, mm.PackedWeight]]:
    raws = {kind: make_raw(kind, N_ROWS, ROW_LEN) for kind in QUANT_TYPES}
    store = os.environ.get("LLMAPP_TEST_PACKED")
    if store and Path(store).exists():
        with np.load(store) as saved:
            out = {}
            for kind, raw in raws.items():
                np.testing.assert_array_equal(saved[f"{kind}_raw"], raw)  # not a stale file
                head = [int(v) for v in saved[f"{kind}_head"]]
                arrays = [saved[f"{kind}_{f}"] for f in ARRAY_FIELDS]
                out[kind] = (raw, mm.PackedWeight(*head, *arrays))
            return out
    packed = {kind: (raw, mm.pack_weight(raw, kind, ROW_LEN)) for kind, raw in raws.items()}
    if store:
        fields: dict[str, np.ndarray] = {}
        for kind, (raw, w) in packed.items():
            fields[f"{kind}_raw"] = raw
            fields[f"{kind}_head"] = np.array([w.ggml_type, w.n_rows, w.row_len, w.group])
            fields.update({f"{kind}_{f}": getattr(w, f) for f in ARRAY_FIELDS})
        np.savez(store, **fields)  # type: ignore[arg-type]
    return packed


@arm_only
@pytest.mark.parametrize("kind", QUANT_TYPES, ids=type_name)
def test_dot_path_matches_portable_and_gguf(
    kind: int,
    weights: dict[int, tuple[np.ndarray, mm.PackedWeight]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw, w = weights[kind]
    wf = oracle(raw, kind)
    for m_rows in (1, 3, 4, 6):  # the 1-row kernel, 4-row passes and padding rows
        x = np.random.default_rng(m_rows).standard_normal((m_rows, ROW_LEN)).astype(np.float32)
        fast = mm.matmul(x, w)
        with monkeypatch.context() as patch:
            patch.setattr(mm, "USE_VNNI", False)
            portable = mm.matmul(x, w)
        np.testing.assert_array_equal(fast, portable)  # integer sums: the same bits
        assert_close(fast, mm.matmul_ref(quantized_input(x), wf), 1e-5)


# ---------------------------------------------------------------------------------------------
# Every CI CPU name from one run, where child interpreters start (ARM hardware; qemu with
# binfmt_misc). On hardware only generic and the host's own name: another CPU's code may use
# instructions this one lacks (qemu's default CPU has them all).


def _runnable_here(cpu: str) -> bool:
    return emulated() or cpu in ("generic", llb.get_host_cpu_name())


@arm_only
@needs_child_interpreter
@pytest.mark.parametrize("cpu", CI_CPUS)
def test_kernels_for_each_named_cpu(cpu: str, tmp_path: Path) -> None:
    if not _runnable_here(cpu):
        pytest.skip(f"{cpu}'s code may not run on {llb.get_host_cpu_name()}")
    env = {
        **os.environ,
        "NUMBA_CPU_NAME": cpu,
        "NUMBA_CPU_FEATURES": "",
        "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
    }
    here = Path(__file__).parent
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))]
    args += ["-k", "not cross and not each_named_cpu", "--rootdir", str(here)]
    done = subprocess.run(
        [sys.executable, *args], env=env, cwd=here, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
