"""`llmapp serve`: the OpenAI-compatible HTTP server on uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from typing import Any

from llmapp.app.commands.run_cmds import (
    add_cache_type_option,
    add_offload_options,
    add_speculative_options,
    speculative_tokens,
)
from llmapp.runtime.errors import LlmappError

EXAMPLES = """\
examples:
  llmapp serve                                   # the default model on http://127.0.0.1:8080/v1
  llmapp serve qwen2.5-coder:0.5b --port 8081 --api-key secret --ctx-size 8192 --parallel 4
  llmapp serve smollm2:135m --ray --replicas 2    # two engines on a local Ray, routed by prefix
  llmapp serve smollm2:135m --ray --ray-address auto --autoscale 1:4 --host 0.0.0.0 --api-key s
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve models over an OpenAI-compatible HTTP API",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=None, help="model served by default")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8080, help="port (0 picks a free one)")
    p.add_argument("--api-key", action="append", default=[], help="required key (repeatable)")
    p.add_argument("--cors-origin", action="append", default=[], help="allowed browser origin")
    p.add_argument("--ctx-size", type=int, default=None, help="longest context of one request")
    p.add_argument("--parallel", type=int, default=1, help="full-length sessions the KV holds")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sessions decoded together")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: cores)")
    add_offload_options(p)
    p.add_argument("--max-loaded-models", type=int, default=1, help="models held at once")
    p.add_argument("--memory-budget", default=None, help="e.g. 4GiB: weights+KV of all models")
    p.add_argument("--kv-memory", default=None, help="e.g. 512MiB of KV cache per model")
    add_cache_type_option(p)
    p.add_argument("--no-pull", action="store_true", help="refuse models not yet pulled")
    add_speculative_options(p)
    p.add_argument("--log-level", default="warning", help="uvicorn's log level")
    _add_ray_options(p)
    p.set_defaults(handler=cmd_serve)


def _add_ray_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('replicas on Ray Serve (pip install "llmapp[cluster]")')
    g.add_argument("--ray", action="store_true", help="serve engine replicas on Ray Serve")
    g.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="join a cluster (auto or HOST:PORT); default: a local Ray on loopback",
    )
    scale = g.add_mutually_exclusive_group()
    scale.add_argument(
        "--replicas", type=int, default=None, metavar="N", help="engine replicas (default 1)"
    )
    scale.add_argument(
        "--autoscale",
        default=None,
        metavar="MIN:MAX",
        help="replicas follow the requests in flight, between MIN and MAX",
    )
    g.add_argument(
        "--replica-cpus",
        type=float,
        default=1.0,
        metavar="C",
        help="CPUs Ray reserves per replica (default 1; threads follow)",
    )
    g.add_argument("--ray-routing", choices=["prefix", "random"], default="prefix",
                   help="prefix (default) or random, a baseline for measurements")  # fmt: skip


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise LlmappError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _config(args: argparse.Namespace) -> Any:
    from llmapp.app.server.app import ServerConfig
    from llmapp.app.server.pool import PoolConfig, env_api_keys, parse_size
    from llmapp.runtime.files.store import default_model_name

    try:
        pool = PoolConfig(
            default_model=args.model or default_model_name(),
            ctx_size=args.ctx_size,
            parallel=args.parallel,
            threads=args.threads,
            n_gpu_layers=args.n_gpu_layers,
            gpu_margin=args.gpu_margin,
            max_queue=args.max_queue,
            max_num_seqs=args.max_num_seqs,
            max_loaded=args.max_loaded_models,
            memory_budget=parse_size(args.memory_budget) if args.memory_budget else None,
            kv_memory=parse_size(args.kv_memory) if args.kv_memory else None,
            speculative_tokens=speculative_tokens(args),
            allow_pull=not args.no_pull,
            cache_type=args.cache_type,
        )
    except ValueError as exc:
        raise LlmappError(str(exc)) from None
    return ServerConfig(
        pool=pool,
        api_keys=tuple(args.api_key or env_api_keys()),
        cors_origins=tuple(args.cors_origin),
        loopback_only=_is_loopback(args.host),
    )


def _cluster_config(args: argparse.Namespace, config: Any) -> Any:
    from llmapp.app.server.cluster import (
        ClusterConfig,
        parse_autoscale,
        prepare_ray_environment,
        require_ray,
    )

    # Serve's proxy binds the port itself, later: check that it is free now (0: pick one).
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    sock.close()
    try:
        cluster = ClusterConfig(
            server=config,
            address=args.ray_address,
            replicas=args.replicas or 1,
            autoscale=parse_autoscale(args.autoscale) if args.autoscale else None,
            replica_cpus=args.replica_cpus,
            host=args.host,
            port=port,
            routing=args.ray_routing,
        )
    except ValueError as exc:
        raise LlmappError(str(exc)) from None
    prepare_ray_environment(args.ray_address)
    require_ray()
    return cluster


def _serve_on_ray(args: argparse.Namespace, config: Any) -> int:
    cluster_config = _cluster_config(args, config)
    from llmapp.app.server.cluster import serve_cluster

    return serve_cluster(cluster_config)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from llmapp.app.server.app import create_app
    from llmapp.app.server.pool import ModelPool

    config = _config(args)
    ray_only = [o for o, v in (("--ray-address", args.ray_address), ("--replicas", args.replicas),
                               ("--autoscale", args.autoscale)) if v is not None]  # fmt: skip
    if ray_only and not args.ray:
        raise LlmappError(f"{ray_only[0]} needs --ray")
    if not config.api_keys and not _is_loopback(args.host):
        print(
            f"llmapp serve: warning: listening on {args.host} without --api-key: anyone who "
            "can reach this address can use the server",
            file=sys.stderr,
        )
    if args.ray:
        return _serve_on_ray(args, config)
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    pool = ModelPool(config.pool)
    app = create_app(config, pool)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"llmapp serve: http://{shown}:{port}/v1 (model {config.pool.default_model})", flush=True)
    logging.getLogger("uvicorn.error").setLevel(args.log_level.upper())
    server = _Server(
        uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5), pool
    )
    server.run(sockets=[sock])
    return 0


class _Server:
    """uvicorn's server, told to end the engines' requests the moment a stop is asked for:
    in-flight streams then finish with an error event instead of holding the shutdown."""

    def __new__(cls, config: Any, pool: Any) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                pool.begin_shutdown()
                super().handle_exit(sig, frame)

        return Server(config)
