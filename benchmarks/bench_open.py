"""Time and memory to open a GGUF model and build its config, ours vs the gguf package's reader.

Each measurement runs in a fresh interpreter, so imports, page-cache state of our own code and
allocator growth count as a user would see them. Memory is VmRSS (and the peak, VmHWM) above
the same interpreter before it imported anything.

    python benchmarks/bench_open.py                 # every .gguf under $LLMAPP_HOME/models
    python benchmarks/bench_open.py a.gguf b.gguf --repeat 5 --json
    python benchmarks/bench_open.py --skip-gguf     # ours only (the oracle takes seconds)

Goal (issue 2): the 0.5B Qwen file opens with its config in < 0.2 s and < 30 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

GOAL_SECONDS = 0.2
GOAL_MB = 30.0

# Runs in the child. Only builtins are touched before the baseline is read.
_CHILD = r"""
import sys, time
def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
rss0, hwm0 = status("VmRSS:"), status("VmHWM:")
t0 = time.perf_counter()
path, reader = sys.argv[1], sys.argv[2]
if reader == "llmapp":
    from llmapp.runtime.execution.models import load_config
    from llmapp.runtime.files.gguf_file import GGUFFile
    t1 = time.perf_counter()
    g = GGUFFile(path)
    config = load_config(g)
    summary = f"{config.arch}, {len(g.tensors)} tensors"
else:
    import gguf
    t1 = time.perf_counter()
    g = gguf.GGUFReader(path)
    summary = f"{len(g.tensors)} tensors"
t2 = time.perf_counter()
print(t1 - t0, t2 - t1, status("VmRSS:") - rss0, status("VmHWM:") - hwm0, summary, sep="\t")
"""


@dataclass
class Result:
    model: str
    reader: str
    import_s: float
    open_s: float  # open + config (ours) or GGUFReader construction (gguf)
    total_s: float
    rss_mb: float  # VmRSS above the bare interpreter after opening
    peak_mb: float  # VmHWM above the bare interpreter
    summary: str


def measure_once(path: Path, reader: str) -> Result:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), reader],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{reader} failed on {path}:\n{out.stderr.strip()}")
    import_s, open_s, rss_kb, hwm_kb, summary = out.stdout.strip().split("\t")
    return Result(
        model=path.name,
        reader=reader,
        import_s=float(import_s),
        open_s=float(open_s),
        total_s=float(import_s) + float(open_s),
        rss_mb=int(rss_kb) / 1024,
        peak_mb=int(hwm_kb) / 1024,
        summary=summary,
    )


def measure(path: Path, reader: str, repeat: int) -> Result:
    """The run with the median total time out of `repeat` fresh processes."""
    runs = sorted((measure_once(path, reader) for _ in range(repeat)), key=lambda r: r.total_s)
    return runs[len(runs) // 2]


def default_models() -> list[Path]:
    home = os.environ.get("LLMAPP_HOME")
    if home:
        models = Path(home) / "models"
    else:
        from llmapp.runtime.files.store import models_dir

        models = models_dir()
    return sorted(models.glob("*.gguf"), key=lambda p: p.stat().st_size)


def print_table(results: list[Result]) -> None:
    header = f"{'model':<44} {'reader':<7} {'import':>8} {'open+cfg':>9} {'total':>8}"
    print(header + f" {'RSS +MB':>8} {'peak +MB':>9}  summary")
    for r in results:
        print(
            f"{r.model:<44} {r.reader:<7} {r.import_s * 1e3:>6.1f}ms {r.open_s * 1e3:>7.1f}ms "
            f"{r.total_s * 1e3:>6.1f}ms {r.rss_mb:>8.1f} {r.peak_mb:>9.1f}  {r.summary}"
        )


def goal_lines(results: list[Result]) -> list[str]:
    lines = []
    for r in results:
        if r.reader == "llmapp" and "qwen" in r.model.lower():
            ok = r.total_s < GOAL_SECONDS and r.rss_mb < GOAL_MB
            lines.append(
                f"goal for {r.model}: {r.total_s:.3f} s < {GOAL_SECONDS} s and "
                f"{r.rss_mb:.1f} MB < {GOAL_MB:.0f} MB: {'met' if ok else 'NOT met'}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, help="GGUF files (default: the store's)")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per figure")
    parser.add_argument("--skip-gguf", action="store_true", help="do not run gguf.GGUFReader")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    models = args.models or default_models()
    if not models:
        parser.error("no models given and none found in the store")
    readers = ["llmapp"] if args.skip_gguf else ["llmapp", "gguf"]
    results = [measure(m, reader, max(1, args.repeat)) for m in models for reader in readers]
    if args.json:
        print(json.dumps({"results": [asdict(r) for r in results]}, indent=2))
    else:
        print_table(results)
        for line in goal_lines(results):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
