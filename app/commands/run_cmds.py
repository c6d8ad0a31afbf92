"""Verbs that run a model: run, perplexity, bench."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from llmapp.app.progress import Progress, stage_progress
from llmapp.runtime.errors import LlmappError

COMPILE_LABEL = "compiling kernels, once, ~20 s"
# The kernel modules every model's forward pass compiles; one without a fresh cache entry
# means the first run will compile for a while.
_RUN_KERNEL_MODULES = ("matmul", "attention", "ops")


def _numba_cache_dirs(package_dir: Path) -> list[Path]:
    # Where Numba keeps a module's compiled functions (numba.core.caching's locators):
    # $NUMBA_CACHE_DIR/<dir name>_<sha1 of the dir>, else __pycache__ beside the source when it
    # is writable, else the same subfolder of the user-wide cache.
    sub = f"{package_dir.name}_{hashlib.sha1(str(package_dir).encode()).hexdigest()}"
    custom = os.environ.get("NUMBA_CACHE_DIR")
    if custom:
        return [Path(custom) / sub]
    import platformdirs

    user_wide = Path(platformdirs.user_cache_dir("numba", appauthor=False)) / sub
    return [package_dir / "__pycache__", user_wide]


def kernel_cache_is_cold() -> bool:
    """True when the CPU kernels have no compiled copy newer than their source on disk."""
    # find_spec locates the package without running its code (which would import Numba).
    spec = importlib.util.find_spec("llmapp.kernels_cpu")
    if spec is None or not spec.submodule_search_locations:
        return False
    package_dir = Path(os.path.abspath(next(iter(spec.submodule_search_locations))))
    dirs = _numba_cache_dirs(package_dir)
    for module in _RUN_KERNEL_MODULES:
        try:
            stamp = (package_dir / f"{module}.py").stat().st_mtime
        except OSError:
            return False
        indexes = (index for d in dirs for index in d.glob(f"{module}.*.nbi"))
        if not any(index.stat().st_mtime >= stamp for index in indexes):
            return True
    return False


class LoadProgress:
    """From opening a model until its first forward pass is done: the first-ever kernel
    compile (announced at once), or a plain load that only shows when it takes over a second."""

    def __init__(self, model: str, quiet: bool) -> None:
        self.cold = kernel_cache_is_cold()
        label = COMPILE_LABEL if self.cold else f"loading {model}"
        self._start = time.monotonic()
        # Even a compile waits half a second: a file that fails to open says so alone.
        self._progress = Progress(label, None, quiet=quiet, delay=0.5 if self.cold else 1.0)

    def done(self) -> None:
        took = time.monotonic() - self._start
        note = f"kernels compiled in {took:.0f} s (cached for later runs)" if self.cold else ""
        self._progress.close(note)

    def __enter__(self) -> LoadProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.close("")


def resolve(model: str, quiet: bool = False) -> Path:
    """A model argument -> its file; a model not in the store yet is pulled, with progress."""
    from llmapp.runtime.files import store

    with stage_progress(f"pulling {model}", quiet=quiet) as progress:
        return store.resolve_model(model, progress=progress, notify=_notice)


def _notice(message: str) -> None:
    # A bar may own the terminal's current line: clear it first (it redraws itself).
    clear = "\r\x1b[K" if sys.stderr.isatty() else ""
    print(f"{clear}llmapp: {message}", file=sys.stderr)


def physical_cores() -> int:
    from llmapp.runtime.execution.backend import physical_cores as count

    return count()


EXAMPLES = {
    "run": """\
  llmapp run smollm2:135m "Why is the sky blue?"
  llmapp run qwen2.5-coder:0.5b --temperature 0 --max-tokens 64 - < question.txt
  llmapp run qwen2.5-coder:0.5b "A person, as JSON" --json-schema person.schema.json""",
    "perplexity": """\
  llmapp perplexity gemma3:270m text.txt --ctx 256 --chunks 16
  llmapp perplexity smollm2:135m text.txt --json --quiet""",
    "bench": """\
  llmapp bench qwen2.5-coder:0.5b -p 128,512 -n 64 -r 5 --peer
  llmapp bench smollm2:135m --concurrency 8 --shared-prefix 1000 --json""",
}


def _examples(verb: str) -> dict[str, Any]:
    return {
        "epilog": "examples:\n" + EXAMPLES[verb],
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def add_quiet_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress on stderr (loading, compiling)"
    )


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ctx-size", type=int, default=4096, help="KV cache size in tokens")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: cores)")
    add_offload_options(p)
    add_cache_type_option(p)


def add_cache_type_option(p: argparse.ArgumentParser) -> None:
    from llmapp.runtime.core.kv_cache import CACHE_TYPES, DEFAULT_CACHE_TYPE

    p.add_argument(
        "--cache-type",
        choices=CACHE_TYPES,
        default=DEFAULT_CACHE_TYPE,
        help="how the KV cache stores keys and values: f16 (default), f32, or q8_0 (8-bit)",
    )


def add_speculative_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--speculative",
        choices=["ngram"],
        default=None,
        help="draft tokens from the context (prompt lookup) and verify them in one pass",
    )
    p.add_argument(
        "--speculative-tokens",
        type=int,
        default=8,
        metavar="K",
        help="at most K drafts a step (default 8; fewer while drafts are rejected)",
    )


def speculative_tokens(args: argparse.Namespace) -> int:
    """EngineOptions.speculative_tokens from --speculative/--speculative-tokens (0: off)."""
    if getattr(args, "speculative", None) is None:
        return 0
    k = int(args.speculative_tokens)
    if not 1 <= k <= 32:
        raise LlmappError(f"--speculative-tokens must be in [1, 32], got {k}")
    return k


def _n_gpu_layers(text: str) -> Any:
    from llmapp.runtime.execution.placement import parse_n_gpu_layers

    try:
        return parse_n_gpu_layers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _memory_size(text: str) -> int:
    from llmapp.runtime.execution.placement import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_offload_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-ngl",
        "--n-gpu-layers",
        type=_n_gpu_layers,
        default=0,
        metavar="N|auto|all",
        help="layers on the GPU: the output head first, then blocks from the last (default 0)",
    )
    p.add_argument(
        "--gpu-margin",
        type=_memory_size,
        default=512 << 20,
        metavar="SIZE",
        help="device memory --n-gpu-layers auto leaves free (default 512MiB)",
    )


def runner_options(args: argparse.Namespace, ctx_size: int, threads: int | None) -> Any:
    """RunnerOptions from the model and offload flags (a verb without them gets the defaults)."""
    from llmapp.runtime.execution.model_runner import RunnerOptions

    return RunnerOptions(
        ctx_size=ctx_size,
        n_threads=threads,
        n_gpu_layers=getattr(args, "n_gpu_layers", 0),
        gpu_margin=getattr(args, "gpu_margin", 512 << 20),
        cache_type=getattr(args, "cache_type", "f16"),
    )


RUN_MAX_TOKENS = 512
"""`run`'s reply length when neither --max-tokens nor the model's catalog entry sets one."""


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    # None = not given: the model's catalog [defaults] apply, then llama.cpp's (SamplingParams).
    g = p.add_argument_group("sampling (default: the model's catalog defaults, else llama.cpp's)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=None, help="0 = off (default 40)")
    g.add_argument("--top-p", type=float, default=None, help="1 = off (default 0.95)")
    g.add_argument("--min-p", type=float, default=None, help="0 = off (default 0.05)")
    g.add_argument("--repeat-penalty", type=float, default=None, help="1 = off (default 1.0)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument(
        "--max-tokens", type=int, default=None, help=f"reply length (default {RUN_MAX_TOKENS})"
    )
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_parser(sub: Any) -> None:
    _add_run(sub)
    _add_perplexity(sub)
    _add_bench(sub)


def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="generate a reply to a prompt, streamed to stdout", **_examples("run")
    )
    p.add_argument("model", help="catalog name or path to a .gguf file")
    p.add_argument("prompt", nargs="?", default=None, help="prompt text, or - for stdin")
    p.add_argument("--file", type=Path, default=None, help="read the prompt from a file")
    p.add_argument("--system", default=None, help="system message (chat mode)")
    p.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    p.add_argument("--json", action="store_true", help="print one JSON line after generation")
    p.add_argument("--verbose", action="store_true", help="print speeds to stderr")
    p.add_argument(
        "--json-schema",
        type=Path,
        default=None,
        metavar="FILE",
        help="reply as JSON this schema fits",
    )
    p.add_argument(
        "--grammar", type=Path, default=None, metavar="FILE", help="reply in a Lark or GBNF grammar"
    )
    add_quiet_option(p)
    add_sampling_options(p)
    add_model_options(p)
    add_speculative_options(p)
    p.set_defaults(handler=cmd_run)


def _add_perplexity(sub: Any) -> None:
    p = sub.add_parser(
        "perplexity",
        help="perplexity of a text file (llama.cpp's method)",
        **_examples("perplexity"),
    )
    p.add_argument("model", metavar="MODEL", help="catalog name or path to a .gguf file")
    p.add_argument("file", metavar="FILE", type=Path, help="UTF-8 text to score")
    p.add_argument("--ctx", type=int, default=256, help="tokens per chunk (default 256)")
    p.add_argument("--chunks", type=int, default=-1, help="chunks to score (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: cores)")
    add_offload_options(p)
    add_cache_type_option(p)
    add_quiet_option(p)
    p.set_defaults(handler=cmd_perplexity)


def _add_bench(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="prefill and decode speed (like llama-bench)", **_examples("bench")
    )
    p.add_argument("model", metavar="MODEL", help="catalog name or path to a .gguf file")
    p.add_argument("-p", "--prompts", default="128,512", help="prompt lengths, comma separated")
    p.add_argument("-n", "--n-gen", type=int, default=64)
    p.add_argument("-r", "--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: cores)")
    add_offload_options(p)
    add_cache_type_option(p)
    p.add_argument("--json", action="store_true")
    add_quiet_option(p)
    p.add_argument("--peer", action="store_true", help="also measure llama.cpp (llama-cpp-python)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        metavar="N",
        help="also run N sessions at once through the engine (128-token prompts, -n new tokens)",
    )
    p.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        metavar="T",
        help="also time the first token of a request whose T-token prefix is cached vs cold",
    )
    p.set_defaults(handler=cmd_bench)


def read_prompt(args: argparse.Namespace) -> str:
    if args.file is not None:
        try:
            return args.file.read_text(encoding="utf-8")
        except OSError as exc:
            raise LlmappError(f"cannot read prompt file {args.file}: {exc.strerror}") from exc
    if args.prompt is None or args.prompt == "-":
        return sys.stdin.read()
    return str(args.prompt)


def sampling_params(args: argparse.Namespace) -> Any:
    """The flags given over the model's catalog defaults over llama.cpp's."""
    from llmapp.runtime.core.sampling import SamplingParams
    from llmapp.runtime.files.store import catalog_defaults

    explicit = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repeat_penalty": args.repeat_penalty,
        "seed": args.seed,
        "max_tokens": args.max_tokens,
        "stop": tuple(args.stop) or None,
        **constraint_options(args),
    }
    fallback = {"max_tokens": RUN_MAX_TOKENS}
    return SamplingParams.layered(fallback, catalog_defaults(args.model), explicit)


def constraint_options(args: argparse.Namespace) -> dict[str, Any]:
    """--json-schema / --grammar files as SamplingParams fields."""
    out: dict[str, Any] = {}
    for name in ("json_schema", "grammar"):
        path = getattr(args, name, None)
        if path is None:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LlmappError(f"cannot read {path}: {exc}") from None
        if name == "json_schema":
            try:
                out[name] = json.loads(text)
            except json.JSONDecodeError as exc:
                raise LlmappError(f"{path} is not JSON: {exc}") from None
        else:
            out[name] = text
    return out


def open_engine(
    path: Path, ctx_size: int, threads: int | None, args: argparse.Namespace | None = None
) -> Any:
    from llmapp.runtime.core.engine import Engine, EngineOptions

    args = args or argparse.Namespace()
    options = runner_options(args, ctx_size, threads)
    return Engine(path, EngineOptions(runner=options, speculative_tokens=speculative_tokens(args)))


def cmd_run(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    speculative_tokens(args)  # a bad value fails before the model loads
    text = read_prompt(args)
    path = resolve(args.model, args.quiet)
    with LoadProgress(args.model, args.quiet) as loading:
        engine = open_engine(path, args.ctx_size, args.threads, args)
        args.offload = engine.runner.offload
        args.kv_cache = kv_cache_figures(engine.runner)
        try:
            prompt: Any = text
            if not args.raw:
                prompt = [{"role": "system", "content": args.system}] if args.system else []
                prompt.append({"role": "user", "content": text})
            return stream_reply(args, engine.submit(prompt, params), loading)
        finally:
            engine.shutdown()


def stream_reply(args: argparse.Namespace, stream: Any, loading: LoadProgress) -> int:
    pieces: list[str] = []
    ids: list[int] = []
    last = None
    try:
        for delta in stream:
            if last is None:
                loading.done()  # the first token ends the load (and any first-ever compile)
            pieces.append(delta.text)
            ids.extend(delta.token_ids)
            last = delta
            if not args.json and delta.text:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        stream.abort()
        print("", file=sys.stderr)
        return 130
    assert last is not None
    if last.error:
        raise LlmappError(last.error)
    report(args, "".join(pieces), ids, last)
    return 0


def report(args: argparse.Namespace, text: str, ids: list[int], last: Any) -> None:
    prefill_tps, decode_tps = last.timings.tps(last.usage)
    if args.json:
        out = {
            "text": text,
            "token_ids": ids,
            "prompt_tokens": last.usage.prompt_tokens,
            "completion_tokens": last.usage.completion_tokens,
            "finish_reason": last.finish_reason,
            "timings": {
                "prompt_ms": round(last.timings.prompt_ms, 3),
                "decode_ms": round(last.timings.decode_ms, 3),
                "prefill_tps": round(prefill_tps, 2),
                "decode_tps": round(decode_tps, 2),
            },
        }
        offload = getattr(args, "offload", None)
        if offload is not None:
            out["offload"] = offload.as_dict()
        if getattr(args, "speculative", None):
            out["speculative"] = {
                "drafted": last.usage.drafted_tokens,
                "accepted": last.usage.accepted_tokens,
            }
        print(json.dumps(out, ensure_ascii=False))
        return
    print()
    if args.verbose and getattr(args, "offload", None) is not None:
        print(args.offload.describe(), file=sys.stderr)
    if args.verbose and getattr(args, "kv_cache", None):
        print(describe_kv_cache(args.kv_cache), file=sys.stderr)
    if args.verbose:
        print(
            f"prompt {last.usage.prompt_tokens} tokens, {prefill_tps:.1f} t/s; "
            f"generated {last.usage.completion_tokens} tokens, {decode_tps:.1f} t/s",
            file=sys.stderr,
        )
    if args.verbose and getattr(args, "speculative", None):
        drafted, accepted = last.usage.drafted_tokens, last.usage.accepted_tokens
        rate = f"{accepted / drafted:.0%}" if drafted else "-"
        print(f"speculative: {accepted} of {drafted} drafted tokens accepted ({rate})",
              file=sys.stderr)  # fmt: skip


def cmd_perplexity(args: argparse.Namespace) -> int:
    from llmapp.runtime.execution.model_runner import ModelRunner
    from llmapp.runtime.text.tokenizer import Tokenizer

    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LlmappError(f"cannot read {args.file}: {exc}") from exc
    path = resolve(args.model, args.quiet)
    with LoadProgress(args.model, args.quiet) as loading:
        runner = ModelRunner(path, runner_options(args, max(args.ctx, 16), args.threads))
        tokenizer = Tokenizer.from_gguf(runner.gguf)
        result = perplexity_with_progress(runner, tokenizer, text, args, loading)
    if args.json:
        print(json.dumps({"ppl": result.ppl, "tokens": result.tokens, "chunks": result.chunks}))
    else:
        chunks = f"{result.chunks} chunks of {args.ctx}"
        print(f"perplexity: {result.ppl:.4f} ({chunks}, {result.tokens} tokens)")
    return 0


def perplexity_with_progress(
    runner: Any, tokenizer: Any, text: str, args: argparse.Namespace, loading: LoadProgress
) -> Any:
    """runtime.perplexity, showing chunk n/N with the running value."""
    from llmapp.runtime.perplexity import perplexity

    bars: list[Progress] = []  # made at the first report, when the chunk count is known

    def show(done: int, total: int, ppl: float) -> None:
        if not bars:
            loading.done()
            bars.append(Progress("perplexity", total, unit="chunk", quiet=args.quiet))
        bars[0].update(done, detail=f"ppl {ppl:.4f}" if done else None)

    try:
        return perplexity(runner, tokenizer, text, args.ctx, args.chunks, progress=show)
    finally:
        for bar in bars:
            bar.close()


def cmd_bench(args: argparse.Namespace) -> int:
    from llmapp.runtime.bench import DECODE_PROMPT, OurBench, decode_read_bytes, run_bench
    from llmapp.runtime.execution.model_runner import ModelRunner

    try:
        prompts = [int(p) for p in args.prompts.split(",") if p]
    except ValueError as exc:
        raise LlmappError(f"-p takes comma-separated integers, got {args.prompts!r}") from exc
    check_bench_args(args)
    threads = args.threads or physical_cores()
    path = resolve(args.model, args.quiet)
    with LoadProgress(args.model, args.quiet) as loading:
        # The engine goes first, and its compute thread has ended before the main thread runs
        # any kernel: with OpenMP, kernels launched from one thread while another thread that
        # launched some is still alive ran ~1.8x slower here (each thread has its own pool).
        engine_out = (
            engine_figures(path, threads, args, loading)
            if args.concurrency or args.shared_prefix
            else {}
        )
        ctx = max(prompts + [128 + args.n_gen]) + 16
        runner = ModelRunner(path, runner_options(args, ctx, threads))
        loading.done()
    ours = run_bench(OurBench(runner), prompts, args.n_gen, args.repeats)
    offload, kv_cache = runner.offload, kv_cache_figures(runner)
    # What one decode step reads (weights with the head, K/V at the decode's mean context).
    read = decode_read_bytes(runner, DECODE_PROMPT + args.n_gen // 2)
    del runner
    out: dict[str, Any] = {"model": args.model, "threads": threads, **ours.as_dict(), **engine_out}
    out["kv_cache"] = kv_cache
    out["decode_read_bytes"] = read
    if offload is not None:
        out["offload"] = offload.as_dict()
    if args.peer:
        out["peer"] = peer_figures(path, threads, prompts, ctx, args, ours)
        if args.concurrency and out["peer"]["concurrency"]["aggregate_decode_tps"]:
            ratio = out["aggregate_decode_tps"] / out["peer"]["concurrency"]["aggregate_decode_tps"]
            out["peer"]["ratios"]["aggregate_decode"] = round(ratio, 3)
    print_bench(out, args.json)
    return 0


def check_bench_args(args: argparse.Namespace) -> None:
    if args.concurrency is not None and args.concurrency < 1:
        raise LlmappError("--concurrency takes a positive number of sessions")
    if args.shared_prefix < 0:
        raise LlmappError("--shared-prefix takes a number of tokens (0: off)")
    if args.n_gen < 1 or args.repeats < 1:
        raise LlmappError("-n and -r take positive numbers")


def engine_figures(
    path: Path, threads: int, args: argparse.Namespace, loading: LoadProgress
) -> dict[str, Any]:
    """Sessions at once and cached-prefix TTFT, measured through the engine."""
    from llmapp.runtime.bench import (
        DECODE_PROMPT,
        SHARED_PREFIX_SUFFIX,
        EngineBench,
        median_run,
        random_tokens,
    )
    from llmapp.runtime.core.engine import Engine, EngineOptions

    n = args.concurrency or 0
    # Room for every session at once, and for a cold and a cached prefix request side by side.
    ctx = max(n * (DECODE_PROMPT + args.n_gen), 2 * (args.shared_prefix + SHARED_PREFIX_SUFFIX))
    opts = EngineOptions(runner=runner_options(args, ctx + 64, threads), max_num_seqs=max(n, 1))
    repeats = min(args.repeats, 3)
    out: dict[str, Any] = {}
    with Engine(path, opts) as engine:
        bench = EngineBench(engine)
        engine.generate(random_tokens(32, engine.config.n_vocab), None)  # warm-up
        loading.done()
        if n:
            bench.concurrent(n, min(args.n_gen, 4), prompt_len=16)  # warm-up: batched shapes
            out.update(
                median_run([bench.concurrent(n, args.n_gen) for _ in range(repeats)]).as_dict()
            )
        if args.shared_prefix:
            out.update(bench.shared_prefix(args.shared_prefix, repeats))
    return out


def peer_figures(
    path: Path, threads: int, prompts: list[int], ctx: int, args: argparse.Namespace, ours: Any
) -> dict[str, Any]:
    from llmapp.runtime.bench import (
        DECODE_PROMPT,
        PeerBatchedBench,
        PeerBench,
        median_run,
        run_bench,
    )

    try:
        peer_bench = PeerBench(path, threads, ctx)
    except ImportError as exc:
        raise LlmappError("--peer needs llama-cpp-python (pip install llama-cpp-python)") from exc
    peer = run_bench(peer_bench, prompts, args.n_gen, args.repeats)
    del peer_bench
    out: dict[str, Any] = {"name": "llama.cpp", **peer.as_dict(), "ratios": ratios(ours, peer)}
    n = args.concurrency
    if n:
        batched = PeerBatchedBench(path, threads, n, n * (DECODE_PROMPT + args.n_gen) + 16)
        try:
            batched.concurrent(n, min(args.n_gen, 4), prompt_len=16)  # warm-up
            runs = [batched.concurrent(n, args.n_gen) for _ in range(min(args.repeats, 3))]
        finally:
            batched.close()
        out["concurrency"] = median_run(runs).as_dict()
    return out


def ratios(ours: Any, peer: Any) -> dict[str, Any]:
    pre = {
        k: round(v / peer.prefill_tps[k], 3)
        for k, v in ours.prefill_tps.items()
        if peer.prefill_tps.get(k)
    }
    dec = round(ours.decode_tps / peer.decode_tps, 3) if peer.decode_tps else None
    return {"prefill": pre, "decode": dec}


def print_bench(out: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(out))
        return
    print(f"model {out['model']}, {out['threads']} threads")
    peer = out.get("peer")
    for k, v in out["prefill_tps"].items():
        line = f"  prefill {k:>5} tokens: {v:8.1f} t/s"
        if peer:
            ratio = peer["ratios"]["prefill"].get(k)
            line += f"   llama.cpp {peer['prefill_tps'][k]:8.1f} t/s   ratio {ratio}"
        print(line)
    line = f"  decode            : {out['decode_tps']:8.1f} t/s"
    if peer:
        line += f"   llama.cpp {peer['decode_tps']:8.1f} t/s   ratio {peer['ratios']['decode']}"
    print(line)
    if "kv_cache" in out:
        print(f"  {describe_kv_cache(out['kv_cache'])}")
    if "decode_read_bytes" in out:
        read = out["decode_read_bytes"]
        print(
            f"  read per decoded token: {read['total'] / 1e6:.1f} MB "
            f"(weights {read['weights'] / 1e6:.1f} + KV {read['kv'] / 1e6:.2f})"
        )
    print_engine_figures(out)


def kv_cache_figures(runner: Any) -> dict[str, Any]:
    """The runner's KV cache: its type, bytes per token (every layer) and bytes in all."""
    return {
        "type": runner.options.cache_type,
        "bytes_per_token": runner.kv_bytes_per_token,
        "bytes": runner.kv_bytes,
    }


def describe_kv_cache(kv: dict[str, Any]) -> str:
    per_token = kv["bytes_per_token"] / 1024
    return f"KV cache {kv['type']}: {per_token:.1f} KiB per token, {kv['bytes'] / 2**20:.1f} MiB"


def print_engine_figures(out: dict[str, Any]) -> None:
    if "concurrency" in out:
        line = (
            f"  {out['concurrency']} sessions at once: aggregate decode "
            f"{out['aggregate_decode_tps']:8.1f} t/s, per session "
            f"{out['per_session_decode_tps']:.1f} t/s, TTFT p50 {out['ttft_ms_p50']:.0f} ms"
        )
        peer = out.get("peer", {}).get("concurrency")
        if peer:
            ratio = out["peer"]["ratios"].get("aggregate_decode")
            line += f"   llama.cpp {peer['aggregate_decode_tps']:8.1f} t/s   ratio {ratio}"
        print(line)
    if "ttft_ms_cold" in out:
        cold, cached = out["ttft_ms_cold"], out["ttft_ms_cached"]
        new = out["shared_prefix_suffix_tokens"]
        print(
            f"  TTFT with a {out['shared_prefix']}-token prefix (+{new} new): cold {cold:.1f} ms, "
            f"cached {cached:.1f} ms ({cold / max(cached, 1e-9):.1f}x)"
        )
