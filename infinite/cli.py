"""The ``infinite`` console script.

``infinite serve`` runs the OpenAI-compatible server of one rank (the whole
cluster of ``--num-instances`` instances sits behind it). With no ``--model``
it serves the embedded default checkpoint. It binds loopback unless told
otherwise, and prints ``infinite: listening on http://HOST:PORT`` once the
socket is open (``--port 0`` picks a free port), then loads the model while
``/health`` answers 503.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from infinite.runtime.config import EngineConfig
from infinite.server.app import serve
from infinite.server.state import DEFAULT_MAX_BODY_BYTES, ServerSettings

log = logging.getLogger("infinite.server")

_DEFAULTS = EngineConfig()  # the CLI's defaults are the engine's


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="checkpoint folder, as in `vllm serve MODEL` (default: the embedded default model)")
    p.add_argument("--model", default=None, help="the same as MODEL")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port; default 8000)")
    p.add_argument("--api-key", default=os.environ.get("INFINITE_API_KEY"), help="require 'Authorization: Bearer KEY' on /v1 (default: $INFINITE_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="model name clients send (default: the checkpoint's)")
    p.add_argument("--num-instances", type=int, default=1, help="instances in the cluster (default 1)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks (GPUs) per instance, Megatron-style; each instance is one to the cluster (default 1)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks per instance (default: sized from memory)")
    p.add_argument("--block-size", type=int, default=_DEFAULTS.block_size,
                   help=f"tokens per KV block (default {_DEFAULTS.block_size})")
    p.add_argument("--dtype", default="auto", help="auto|float32|bfloat16|float16 (default auto)")
    p.add_argument("--device", default=None, help="cpu|cuda[:N] (default: cuda when available)")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt+output (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=_DEFAULTS.max_num_seqs,
                   help=f"largest batch per instance (default {_DEFAULTS.max_num_seqs})")
    p.add_argument("--max-num-batched-tokens", type=int, default=_DEFAULTS.max_num_batched_tokens,
                   help=f"token budget per step (default {_DEFAULTS.max_num_batched_tokens})")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help=f"engine seed (default {_DEFAULTS.seed})")
    p.add_argument("--threads-per-rank", type=int, default=None,
                   help="torch CPU threads of each rank (default: the host's cores / its ranks)")
    p.add_argument("--no-lending", dest="enable_lending", action="store_false",
                   help="instances never lend KV blocks to each other (a static deployment)")
    p.add_argument("--max-lend-fraction", type=float, default=_DEFAULTS.max_lend_fraction,
                   help=f"share of its pool an instance may lend (default {_DEFAULTS.max_lend_fraction})")
    p.add_argument("--max-remote-fraction", type=float, default=_DEFAULTS.max_remote_fraction,
                   help="share of a request's blocks that throughput moves may place on other instances "
                        f"(default {_DEFAULTS.max_remote_fraction})")
    p.add_argument("--eager-lending", action="store_true",
                   help="lend for throughput from the cost model's first fit, before any remote step was "
                        "measured (default: wait for measured remote steps; loans for requests no pool "
                        "can hold are made either way)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run every step eagerly: no CUDA graphs for decode (as vLLM's flag; CPU is always eager)")
    p.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true", default=True,
                   help="reuse the KV of cached prompt prefixes, on an instance and across the cluster (default on)")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn the prefix cache off: every prompt is computed whole")
    p.add_argument("--prefill-groups", dest="prefill_groups", action="store_true", default=_DEFAULTS.prefill_groups,
                   help="let a group of instances prefill a long prompt together when the cost model says it "
                        "ends sooner (default on)")
    p.add_argument("--no-prefill-groups", dest="prefill_groups", action="store_false",
                   help="every prompt is prefilled by its home alone")
    p.add_argument("--group-min-prompt-tokens", type=int, default=_DEFAULTS.group_min_prompt_tokens,
                   help=f"shortest prompt a group may prefill (default {_DEFAULTS.group_min_prompt_tokens})")
    p.add_argument("--group-min-speedup", type=float, default=_DEFAULTS.group_min_speedup,
                   help="a group only when it ends this many times sooner than the home alone "
                        f"(default {_DEFAULTS.group_min_speedup})")
    p.add_argument("--group-min-efficiency", type=float, default=_DEFAULTS.group_min_efficiency,
                   help="in a busy cluster, the home alone's time over the members' time must be at least this "
                        f"(default {_DEFAULTS.group_min_efficiency})")
    p.add_argument("--gpu-memory-utilization", type=float, default=_DEFAULTS.gpu_memory_utilization,
                   help="share of the GPU's memory the instance may use: weights, activations, graphs "
                        f"and the KV pool, which gets what is left (default {_DEFAULTS.gpu_memory_utilization})")
    p.add_argument("--cluster-port", type=int, default=0,
                   help="port of the cluster's store with --num-instances > 1 (0 = any free); "
                        "`infinite join --cluster HOST:PORT` adds instances through it")
    p.add_argument("--max-pending", type=int, default=1024, help="engine requests in flight before 503 (default 1024)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="largest request body; larger gets 413")
    p.add_argument("--log-level", default="info", type=str.lower, choices=["debug", "info", "warning", "error"],
                   help="log level of every rank (default info)")
    p.add_argument("--tool-call-parser", default=None,
                   help="how tool calls are found in the model's text: hermes (Qwen2, Hermes, Mistral "
                        "templates) or llama3_json (Llama 3.1+), as vLLM's flag")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='let the model decide when to call tools (tool_choice "auto"); needs --tool-call-parser')


def engine_config(args: argparse.Namespace) -> EngineConfig:
    if args.model and args.model_tag and args.model != args.model_tag:
        raise ValueError(f"the model is given twice: {args.model_tag!r} and --model {args.model!r}")
    return EngineConfig(
        model=args.model or args.model_tag,
        threads_per_rank=args.threads_per_rank,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
        num_instances=args.num_instances,
        tensor_parallel_size=args.tensor_parallel_size,
        served_model_name=args.served_model_name,
        enable_lending=args.enable_lending,
        max_lend_fraction=args.max_lend_fraction,
        max_remote_fraction=args.max_remote_fraction,
        eager_lending=args.eager_lending,
        enforce_eager=args.enforce_eager,
        enable_prefix_caching=args.enable_prefix_caching,
        prefill_groups=args.prefill_groups,
        group_min_prompt_tokens=args.group_min_prompt_tokens,
        group_min_speedup=args.group_min_speedup,
        group_min_efficiency=args.group_min_efficiency,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )


def server_settings(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        served_model_name=args.served_model_name,
        api_key=args.api_key or None,
        max_pending=args.max_pending,
        max_body_bytes=args.max_request_bytes,
        tool_call_parser=args.tool_call_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
    )


def run_serve(args: argparse.Namespace) -> int:
    """Validate the arguments, then serve until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = engine_config(args)
        settings = server_settings(args)
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    except (ValueError, TypeError) as e:
        print(f"infinite serve: error: {e}", file=sys.stderr)
        return 2

    def listening(host: str, port: int) -> None:
        print(f"infinite: listening on http://{host}:{port}", flush=True)

    if config.num_processes > 1:
        return serve_cluster(config, settings, args.host, args.port, listening, args.log_level, args.cluster_port)

    async def start_engine() -> Any:
        from infinite.runtime.async_engine import AsyncLLMEngine

        return await AsyncLLMEngine.start(config)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        return await serve(start_engine, settings, args.host, args.port, stop, listening)

    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:  # uvloop is a dependency; plain asyncio keeps working without it
        return asyncio.run(main())


def serve_cluster(config: EngineConfig, settings: ServerSettings, host: str, port: int, listening: Any,
                  log_level: str, cluster_port: int = 0) -> int:
    """N instances (of T tensor-parallel ranks each) without torchrun: the other rank processes are
    started here, this process is rank 0 (the first rank of instance 0) and serves."""
    from infinite.cluster.rank import run_rank
    from infinite.cluster.spawn import check_local, local_rendezvous, spawn_ranks, stop_ranks
    from infinite.launch.http import http_front_end
    from infinite.runtime.engine import resolve_model_dir

    config = EngineConfig(**{**config.__dict__, "model": resolve_model_dir(config.model)})
    try:
        check_local(config)
    except ValueError as e:
        print(f"infinite serve: error: {e}", file=sys.stderr)
        return 2
    opts = local_rendezvous(config.num_instances, log_level=log_level, rpc_port=cluster_port,
                            tp_size=config.tensor_parallel_size)
    store = opts[0].init_method[len("tcp://"):]
    print(f"infinite: cluster store at {store} (infinite join --cluster {store} adds an instance)", flush=True)
    workers = spawn_ranks(config, opts[1:])
    try:
        return run_rank(config, opts[0], http_front_end(settings, host, port, listening))
    finally:
        stop_ranks(workers)


def build_parser(prog: str = "infinite") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Infinite: long-context LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    add_serve_args(serve_p)
    serve_p.set_defaults(func=run_serve)
    from infinite.launch.join import add_join_args, run_join

    join_p = sub.add_parser("join", help="add an instance to a running cluster")
    add_join_args(join_p)
    join_p.set_defaults(func=run_join)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
