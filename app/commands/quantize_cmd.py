"""`llmapp quantize IN OUT --type T`: write a quantized copy of a model."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from llmapp.app.commands.run_cmds import add_quiet_option, resolve
from llmapp.app.progress import Progress
from llmapp.runtime.files.ggml_types import type_name
from llmapp.runtime.files.quantize import FILE_TYPES, QuantizeReport, TensorResult, quantize_file

EXAMPLES = """\
examples:
  llmapp quantize model-f32.gguf model-q4_k_m.gguf --type Q4_K_M
  llmapp quantize model-q8_0.gguf model-q2_k.gguf --type q2_k --allow-requantize --quiet"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "quantize",
        help="write a quantized copy of a GGUF model (llama.cpp's per-tensor type mix)",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IN", help="model to read: a GGUF file or a catalog name")
    p.add_argument("output", metavar="OUT", help="GGUF file to write (replaced if it exists)")
    p.add_argument(
        "--type",
        required=True,
        type=str.upper,
        choices=list(FILE_TYPES),
        help="file type: Q2_K, Q4_K_M, Q6_K or Q8_0",
    )
    p.add_argument(
        "--pure", action="store_true", help="give every quantizable tensor the base type"
    )
    p.add_argument(
        "--allow-requantize",
        action="store_true",
        help="accept an already-quantized input (dequantized first; quality suffers)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="a line per tensor on stdout even on a terminal (always there in a log or pipe)",
    )
    add_quiet_option(p)
    p.set_defaults(handler=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    src = resolve(args.input, args.quiet)
    # The per-tensor table is the record of what was done, so a log or a pipe keeps it; on a
    # terminal a bar says the same without scrolling. The bar shows unless the two would share
    # one terminal (they would overwrite each other) or one log (the table already counts n/N).
    out_tty, err_tty = sys.stdout.isatty(), sys.stderr.isatty()
    table = not args.quiet and (args.verbose or not out_tty)
    show_bar = not args.quiet and (not table or (err_tty and not out_tty))
    bar = Progress("quantize", None, unit="tensor", quiet=not show_bar)

    def progress(index: int, total: int, r: TensorResult) -> None:
        nonlocal table
        bar.set_total(total)
        bar.update(index, detail=r.name)
        if table:
            try:
                _print_progress(index, total, r)
            except BrokenPipeError:
                # The reader of the table left (`| head`): the file being written is the point,
                # so finish it; the summary's write then ends the command with status 141.
                table = False

    with bar:
        report = quantize_file(
            src,
            args.output,
            args.type,
            pure=args.pure,
            allow_requantize=args.allow_requantize,
            progress=progress,
        )
    _print_summary(report)
    return 0


def _print_progress(index: int, total: int, r: TensorResult) -> None:
    shape = "x".join(str(d) for d in r.shape)
    change = (
        f"{type_name(r.src_type)} -> {type_name(r.dst_type)}"
        if r.converted
        else f"{type_name(r.src_type)} (copied)"
    )
    width = len(str(total))
    print(
        f"[{index:{width}d}/{total}] {r.name:<32s} {shape:>14s}  {change:<18s} "
        f"{_mib(r.src_bytes):>9s} -> {_mib(r.dst_bytes):>9s}",
        flush=True,
    )


def _print_summary(report: QuantizeReport) -> None:
    counts = ", ".join(f"{n} {t}" for t, n in sorted(report.type_counts.items()))
    src_mb, dst_mb = report.src_file_bytes / 1e6, report.dst_file_bytes / 1e6
    ratio = report.dst_file_bytes / report.src_file_bytes if report.src_file_bytes else 0.0
    print(f"wrote {report.dst} ({report.ftype}{', pure' if report.pure else ''})")
    print(f"  tensors: {counts}")
    if report.n_fallback:
        print(f"  {report.n_fallback} tensor(s) fell back to a smaller block (row length)")
    print(
        f"  size: {src_mb:.1f} MB -> {dst_mb:.1f} MB ({ratio:.1%}) in {report.seconds:.1f} s",
        file=sys.stdout,
    )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"
