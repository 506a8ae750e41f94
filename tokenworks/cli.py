"""The ``tokenworks`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace


def _engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="a .gguf file or a Hugging Face folder (default: SmolLM2-135M-Instruct)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"],
                   help="the model's dtype (default: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--kv-cache-memory-gib", type=float, default=None,
                   help="KV pool budget in GiB (default: on CPU two of the model's full contexts, at most 1/16 of the "
                        "machine's memory; 1 GiB on CUDA)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"],
                   help="what the KV pool holds; auto: float16 where the model computes in float32 on the CPU (half "
                        "the memory per token and half the bytes a decode step reads; docs/engine.md), else --dtype; "
                        "int8 (CPU): a byte per value and a scale per head row, about half float16's bytes again, "
                        "at some quality (docs/engine.md); on CUDA only --dtype (default: auto)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    g.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget of one step (default: 512)")
    g.add_argument("--prefill-tokens-while-decoding", type=int, default=None, metavar="TOKENS",
                   help="prompt tokens a step takes at most while requests decode, so that a prompt arriving stalls "
                        "the others' next token for a short step, not a whole budget's; 0: no cap (default: 128 on "
                        "CPU, where it cut ITL p99 to 0.3x at the same throughput, docs/serving.md; no cap on CUDA)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="requests in one step at most (default: 64)")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument("--quantization", choices=["auto", "none"], default="auto",
                   help="auto: a GGUF file's Q4_0/Q4_1 layers and Q8_0 embedding run as stored on CPU, on native "
                        "kernels (the default model's decode step about 4x faster than float32 at one sequence, "
                        "docs/engine.md); none: every weight dequantized to --dtype (default: auto)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--kv-host-memory-gib", type=float, default=0.0, metavar="GIB",
                   help="keep prefix blocks evicted from the KV pool in this much host memory and copy them back on "
                        "a prefix hit instead of recomputing (default: 0, off)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run every step eagerly instead of replaying captured decode CUDA graphs")
    g.add_argument("--overlap-schedule", choices=["auto", "on", "off"], default="auto",
                   help="schedule and launch the next step while the device computes this one (a request that "
                        "stops on a sampled token costs one wasted token); auto: on for CUDA, off on CPU, where "
                        "the step runs on the host anyway (default: auto)")
    g.add_argument("--num-speculative-tokens", type=int, default=0, metavar="K",
                   help="speculative decoding by prompt lookup: a request's decode step also checks up to K draft "
                        "tokens, those that followed the latest earlier occurrence of its last 2-4 tokens in its "
                        "prompt and output, and keeps the ones the model itself chooses (greedy, or sampled: the "
                        "same draw as without drafts); the same text (within the rounding of a many-row step) in "
                        "fewer steps where the output repeats or copies; not for requests with penalties, a "
                        "grammar, logprobs or stop strings, nor while more than 4 requests run (docs/engine.md); "
                        "steps are then not overlapped (default: 0, off)")


def _engine_args(ns: argparse.Namespace):
    from tokenworks.config import EngineArgs

    return EngineArgs(
        model=ns.model,
        device=ns.device,
        dtype=ns.dtype,
        kv_cache_memory_gib=ns.kv_cache_memory_gib,
        kv_cache_dtype=ns.kv_cache_dtype,
        block_size=ns.block_size,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        prefill_tokens_while_decoding=ns.prefill_tokens_while_decoding,
        max_num_seqs=ns.max_num_seqs,
        enable_prefix_caching=not ns.no_prefix_caching,
        num_threads=ns.threads,
        quantization=ns.quantization,
        enforce_eager=ns.enforce_eager,
        overlap_schedule=ns.overlap_schedule,
        kv_host_memory_gib=ns.kv_host_memory_gib,
        num_speculative_tokens=ns.num_speculative_tokens,
    )


def cmd_generate(ns: argparse.Namespace) -> int:
    from tokenworks.llm import build_engine
    from tokenworks.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=ns.max_tokens,
        temperature=ns.temperature,
        top_p=ns.top_p,
        top_k=ns.top_k,
        seed=ns.seed,
        stop=tuple(ns.stop or ()),
    )
    loaded = build_engine(_engine_args(ns))
    engine = loaded.engine
    print(f"[tokenworks] loaded {loaded.model_name} in {loaded.load_seconds:.1f}s"
          + (f"; {loaded.graphs}" if loaded.graphs else ""), file=sys.stderr)
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": ns.prompt}]) if ns.chat else ns.prompt
    t0 = time.perf_counter()
    engine.add_request("cli", prompt, params)
    first = None
    n = 0
    text = ""
    while engine.has_unfinished():
        for out in engine.step():
            first = first or time.perf_counter()
            n += 1
            text += out.new_text
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
            if out.finished:
                reason = out.finish_reason
    t1 = time.perf_counter()
    sys.stdout.write("\n")
    tpot = (t1 - first) / (n - 1) * 1000 if n > 1 else 0.0
    print(f"[tokenworks] {n} tokens, finish_reason={reason}, TTFT {1000 * (first - t0):.0f} ms, "
          f"TPOT {tpot:.1f} ms", file=sys.stderr)
    if not text.strip() and not ns.chat and engine.tokenizer.chat_template:
        # an instruct model given a bare question often ends it at once: say so rather than print nothing
        print("[tokenworks] no text: the prompt went to the model as it is; this model has a chat template, so "
              "for an answer to a question or an instruction add --chat", file=sys.stderr)
    return 0


def _worker_counts(ns: argparse.Namespace) -> tuple[int, int, int]:
    """(prefill, decode, aggregated) workers; with none of the three flags, 1 prefill + 1 decode."""
    counts = (ns.prefill_workers, ns.decode_workers, ns.aggregated_workers)
    if all(c is None for c in counts):
        return 1, 1, 0
    return tuple(c or 0 for c in counts)  # type: ignore[return-value]


def serve_layout(ns: argparse.Namespace, gpus: list[int] | None, cores: int) -> tuple[tuple[int, int, int], str]:
    """(prefill, decode, aggregated) workers for ``serve`` and why: the flags when given, else picked from the
    machine, from what was measured (docs/disagg-vs-agg.md, docs/serving.md)."""
    if any(c is not None for c in (ns.prefill_workers, ns.decode_workers, ns.aggregated_workers)):
        return _worker_counts(ns), "as asked"
    if gpus:
        return (1, 1, 0), (f"{len(gpus)} GPU(s): 1 prefill + 1 decode worker; on one H200 this served 0.86-0.90x "
                           "the tokens/s of one aggregated worker at half its TTFT and ITL p99 (docs/serving.md)")
    if cores < 4:
        return (0, 0, 1), (f"{cores} CPU cores: 1 aggregated worker on all of them; split in two, each phase runs on "
                           "too few cores (one stream on a 2-core Zen 5: 3.6 ms/token aggregated vs 5.0 ms split; "
                           "docs/serving.md, benchmarks/layout_single_stream.py)")
    return (1, 1, 0), (f"{cores} CPU cores: 1 prefill + 1 decode worker, the cores split between them, so prompts "
                       "never stall decoding (pass --aggregated-workers 1 for one worker on all cores)")


def _listen_socket(host: str, port: int):
    """The API's socket, bound before the workers start (their own ports cannot take it meanwhile)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror} (another server there? pick --port)") from None
    sock.set_inheritable(False)
    return sock


def cmd_serve(ns: argparse.Namespace) -> int:
    import asyncio
    import os

    import uvicorn

    from tokenworks.launch.launcher import WorkersNotReady
    from tokenworks.launch.local import LocalCluster, plan_workers
    from tokenworks.launch.ray import parse_resources
    from tokenworks.model.weights import load_tokenizer_files, resolve_model_path
    from tokenworks.router.api import create_app
    from tokenworks.router.router import Router
    from tokenworks.tokenizer import Tokenizer

    secret = (ns.internal_secret or os.environ.get("TOKENWORKS_INTERNAL_SECRET", "")).encode() or None
    loopback = ns.internal_host in ("127.0.0.1", "localhost", "::1")
    if not loopback and secret is None:
        raise ValueError(f"--internal-host {ns.internal_host} exposes the router-worker plane: set --internal-secret "
                         "(or $TOKENWORKS_INTERNAL_SECRET) so that every internal message is authenticated")
    if not loopback and ns.kv_transport == "nixl":
        raise ValueError("NIXL transfers are not authenticated: use --kv-transport tcp with a non-loopback "
                         "--internal-host")
    cpu_sets = [[int(c) for c in part.split(",")] for part in ns.cpu_sets.split(":")] if ns.cpu_sets else None
    gpus = [int(g) for g in ns.gpus.split(",")] if ns.gpus else None
    if gpus is None and ns.device.startswith("cuda"):  # --device cuda[:N] alone: every worker on that GPU
        gpus = [int(ns.device.partition(":")[2] or 0)]
    deployment = None
    if ns.deployment:
        from tokenworks.launch import deployment as deployments

        deployment = deployments.load(ns.deployment)
        if any(c is not None for c in (ns.prefill_workers, ns.decode_workers, ns.aggregated_workers)):
            raise ValueError("--deployment gives the worker counts: drop --prefill/--decode/--aggregated-workers")
        if deployment.local_prefill_threshold is not None:
            ns.local_prefill_threshold = deployment.local_prefill_threshold
        prefill, decode, agg = (deployment.count(r) for r in ("prefill", "decode", "aggregated"))
        why = f"from {ns.deployment}: {deployment.describe()}"
    else:
        (prefill, decode, agg), why = serve_layout(ns, gpus, len(os.sched_getaffinity(0)))
    autoscale_profile = None
    if ns.autoscale:  # checked before any worker starts
        from tokenworks.launch.autoscale import check
        from tokenworks.planner.profile import Profile

        autoscale_profile = Profile.load(ns.autoscale)
        check({"prefill": prefill, "decode": decode, "both": agg}, _slo(ns), ns.max_workers)
    parts = [f"{n} {role}" for n, role in ((prefill, "prefill"), (decode, "decode"), (agg, "aggregated")) if n]
    print(f"[tokenworks] layout: {' + '.join(parts)} ({why})", file=sys.stderr)
    on_ray = ns.ray is not None
    specs = plan_workers(prefill, decode, agg, cpu_sets=None if on_ray else cpu_sets, gpus=gpus)
    resources = {"prefill": parse_resources(ns.prefill_resources, "--prefill-resources"),
                 "decode": parse_resources(ns.decode_resources, "--decode-resources"),
                 "both": parse_resources(ns.aggregated_resources, "--aggregated-resources")}
    if deployment is not None:  # each pool's resources and engine flags, in the order plan_workers named them
        from tokenworks.launch.deployment import ROLE_OF

        queue = {r: [] for r in ("prefill", "decode", "both")}
        for pool in deployment.pools:
            queue[ROLE_OF[pool.role]] += [pool] * pool.workers
        for spec in specs:
            pool = queue[spec.role].pop(0)
            spec.engine = dict(pool.engine)
            spec.resources = dict(pool.resources)
    for spec in specs:
        spec.resources = resources[spec.role] or spec.resources
    args = _engine_args(ns)
    prefill_budget = ns.prefill_max_num_batched_tokens or (max(4096, args.max_num_batched_tokens) if gpus
                                                           else args.max_num_batched_tokens)
    if prefill_budget < 1:
        raise ValueError("--prefill-max-num-batched-tokens must be positive")
    t0 = time.perf_counter()
    model_path = resolve_model_path(args.model)
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"model {args.model!r} not found (models are not downloaded from a hub; give a local "
                                ".gguf file or Hugging Face folder)")

    listener = _listen_socket(ns.host, ns.port)  # taken now: a busy port fails before any model loads

    def tokenizer_files():
        files = load_tokenizer_files(args.model, args.cache_dir)
        return files, Tokenizer(files.tokenizer_json, files.chat_template, files.bos_token, files.eos_token,
                                files.add_bos_token)

    async def main() -> None:
        # The router reads the tokenizer while the workers load the weights (a GGUF's first parse takes seconds).
        loading = asyncio.get_running_loop().run_in_executor(None, tokenizer_files)
        router = Router(block_size=args.block_size, local_prefill_threshold=ns.local_prefill_threshold,
                        max_inflight=ns.max_inflight_requests, max_queue_wait=ns.max_queue_wait,
                        internal_host=ns.internal_host, secret=secret, price_per_worker_hour=ns.price_per_worker_hour,
                        tokenizer=None, overlap_weight=ns.router_overlap_weight, routing=ns.routing)
        router.start()
        launcher_args = dict(lease_seconds=ns.lease_seconds, prefill_nice=ns.prefill_nice,
                             # prefill-only workers never run a decode step: no decode graphs to capture
                             prefill_args=replace(args, max_num_batched_tokens=prefill_budget, enforce_eager=True),
                             internal_host=ns.internal_host, secret=secret)
        if on_ray:
            from tokenworks.launch.ray import RayCluster

            cluster = RayCluster(router, args, ns.kv_transport, address=ns.ray or None, **launcher_args)
            print(f"[tokenworks] workers on a {cluster.describe()}", file=sys.stderr)
        else:
            cluster = LocalCluster(router, args, ns.kv_transport, **launcher_args)

        shown, tty = [-1], sys.stderr.isatty()

        def progress(ready: int, total: int) -> None:
            if ready != shown[0]:  # one line rewritten on a terminal; a line each in a log
                shown[0] = ready
                line = f"[tokenworks] workers ready: {ready}/{total}"
                print("\r" + line if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

        try:
            try:
                await cluster.start(specs, progress=progress)
                scaler = None
                if autoscale_profile is not None:
                    from tokenworks.launch.autoscale import Autoscaler

                    scaler = Autoscaler(cluster, autoscale_profile, _slo(ns), ns.attainment,
                                        interval=ns.autoscale_interval, window=ns.autoscale_window,
                                        max_workers=ns.max_workers)
            except WorkersNotReady:
                if tty:
                    print(file=sys.stderr)  # end the progress line
                raise
            files, tokenizer = await loading
            router.tokenizer = tokenizer
            if tty:
                print(file=sys.stderr)
            for spec in specs:
                w = router.workers[spec.worker_id].ready
                where = (f"CPUs {','.join(map(str, w.cpus))}" if spec.device == "cpu" else spec.device) if not on_ray \
                    else cluster.where(spec.worker_id)
                print(f"[tokenworks]   {spec.worker_id:<10} role={spec.role:<8} pid={w.pid:<8} {where}, "
                      f"{w.num_blocks} KV blocks of {w.block_size} tokens"
                      + (f" ({w.kv_dtype})" if w.kv_dtype else "")
                      + (f", warmed up in {w.warmup_seconds:.1f} s" if w.warmup_seconds else "")
                      + (f"; {w.graphs}" if w.graphs else ""), file=sys.stderr)
            print(f"[tokenworks] model {files.name}, KV transport {ns.kv_transport}, local prefill up to "
                  f"{ns.local_prefill_threshold} uncached tokens; ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            if ns.price_per_worker_hour is not None:
                print(f"[tokenworks] {len(specs)} workers at ${ns.price_per_worker_hour:g}/hour each = "
                      f"${ns.price_per_worker_hour * len(specs):g}/hour; cost per million tokens on /metrics "
                      "(tokenworks:cost_per_million_output_tokens)", file=sys.stderr)
            port = listener.getsockname()[1]
            print(f"[tokenworks] listening on http://{ns.host}:{port}/v1 (OpenAI API; /metrics, /health)",
                  file=sys.stderr, flush=True)
            supervisor = asyncio.get_running_loop().create_task(cluster.supervise(restart=not ns.no_restart))
            if scaler is not None:
                scaling = asyncio.get_running_loop().create_task(scaler.run())
                print(f"[tokenworks] autoscaling every {scaler.interval:g} s on the last {scaler.window:g} s of "
                      f"traffic, up to {scaler.max_workers} workers, SLO {scaler.slo.describe()}", file=sys.stderr)
            app = create_app(router, tokenizer, files.name, api_key=ns.api_key or os.environ.get("TOKENWORKS_API_KEY"),
                             launcher=cluster)
            server = uvicorn.Server(uvicorn.Config(app, host=ns.host, port=ns.port, log_level="warning",
                                                   timeout_graceful_shutdown=3))
            await server.serve(sockets=[listener])
            supervisor.cancel()
            if scaler is not None:
                scaling.cancel()
        finally:
            print("[tokenworks] shutting down: stopping the workers", file=sys.stderr, flush=True)
            cluster.stopping = True
            try:
                await asyncio.wait_for(router.shutdown_workers(), 1.0)
            except Exception:  # noqa: BLE001
                pass
            cluster.stop()

    import signal

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # stop the workers on SIGTERM too, not only on Ctrl-C
    try:
        import uvloop  # a faster event loop where installed (uvicorn also picks httptools by itself)

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main())
    except KeyboardInterrupt:
        pass
    print("[tokenworks] stopped", file=sys.stderr, flush=True)
    return 0


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _count(text: str) -> int:
    """A whole number of things, at least one (argparse's type for counts)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return n


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _system_prompt_flags(p) -> None:
    """bench's, simulate's and plan's: the system prompts that shared-prefix and multi-turn prompts start with."""
    p.add_argument("--num-prefixes", type=_count, default=4,
                   help="shared-prefix, multi-turn: distinct system prompts (default: 4)")
    p.add_argument("--prefix-len", type=_count, default=512,
                   help="shared-prefix, multi-turn: tokens per system prompt (default: 512)")


def _simulated_pool_flags(p: argparse.ArgumentParser) -> None:
    """simulate's and plan's: the simulated workers' KV pool and host tier, as serve's flags of the same names."""
    p.add_argument("--kv-cache-memory-gib", type=float, default=None, metavar="GIB",
                   help="each worker's KV pool, as serve's flag (default: the profile's, as measured or projected)")
    p.add_argument("--kv-host-memory-gib", type=float, default=0.0, metavar="GIB",
                   help="a host-memory KV tier per worker behind its pool, as serve's (default: 0, none): blocks "
                        "evicted from the pool are kept there and found again where prompts share blocks")


def _bench_flags(p: argparse.ArgumentParser, out: str = "results/bench") -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--workload", default="synthetic",
                   choices=["synthetic", "shared-prefix", "multi-turn", "mixed", "sharegpt", "mooncake", "azure"])
    w.add_argument("--file", default=None, help="ShareGPT JSON, Mooncake JSONL or Azure CSV file")
    w.add_argument("--num-requests", type=_count, default=50, help="requests per load level (default: 50)")
    w.add_argument("--input-len", default="uniform:50:400",
                   help="N (each N tokens) | fixed:N | uniform:A:B | normal:MU:SIGMA | sharegpt:MEDIAN "
                        "(default: uniform:50:400)")
    w.add_argument("--output-len", default="uniform:16:128", help="same forms as --input-len (default: uniform:16:128)")
    _system_prompt_flags(w)
    w.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation (default: 4); "
                   "--input-len is each user message, --output-len each answer")
    w.add_argument("--session-rate", type=float, default=0.5,
                   help="multi-turn: conversations starting per second, Poisson (default: 0.5)")
    w.add_argument("--think-time", type=float, default=3.0,
                   help="multi-turn: seconds between a conversation's turns (default: 3)")
    w.add_argument("--time-scale", type=float, default=1.0, help="traces: multiply arrival times (default: 1)")
    w.add_argument("--length-scale", type=float, default=1.0, help="traces: multiply token counts (default: 1)")
    w.add_argument("--seed", type=int, default=0)
    l = p.add_argument_group("load (one of; default: the trace's own timing)")
    l.add_argument("--rates", type=_floats, default=None, metavar="R[,R...]",
                   help="open loop at these request rates, in req/s (a sweep when several)")
    l.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals; 1 = Poisson")
    l.add_argument("--concurrency", type=_ints, default=None, metavar="C[,C...]", help="closed loop at these concurrencies")
    s = p.add_argument_group("SLOs and output")
    _slo_flags(s)
    s.add_argument("--api", choices=["completions", "chat"], default="completions")
    s.add_argument("--timeout", type=float, default=300.0, help="seconds per request before it counts as failed")
    s.add_argument("--max-duration", type=float, default=None, help="seconds per load level at most")
    s.add_argument("--price-per-hour", type=float, default=None,
                   help="the whole server's cost per hour, for cost per million tokens (default: --price-per-worker-hour "
                        "x --workers, else what a tokenworks server started with --price-per-worker-hour reports)")
    s.add_argument("--price-per-worker-hour", type=float, default=None, metavar="USD", help="price of one worker-hour")
    s.add_argument("--workers", type=_count, default=1, help="workers behind the server, with --price-per-worker-hour")
    s.add_argument("--out", default=out, help=f"folder for the report (default: {out})")


def _slo_flags(p, ttft: float | None = None, tpot: float | None = None, itl: bool = True) -> None:
    """--slo-ttft-ms, --slo-tpot-ms, --slo-itl-ms (unless ``itl`` is False), --slo-e2e-ms and --attainment."""
    p.add_argument("--slo-ttft-ms", type=float, default=ttft, help="time-to-first-token target")
    p.add_argument("--slo-tpot-ms", type=float, default=tpot, help="time-per-output-token target")
    if itl:
        p.add_argument("--slo-itl-ms", type=float, default=None, help="every gap between tokens of a request")
    p.add_argument("--slo-e2e-ms", type=float, default=None, help="whole-request latency target")
    p.add_argument("--attainment", type=float, default=0.9, help="fraction of requests that must meet the SLOs (0.9)")


def _slo(ns: argparse.Namespace):
    from tokenworks.bench.metrics import SLO

    ms = lambda v: None if v is None else v / 1000.0  # noqa: E731
    return SLO(ttft=ms(ns.slo_ttft_ms), tpot=ms(ns.slo_tpot_ms), itl=ms(ns.slo_itl_ms), e2e=ms(ns.slo_e2e_ms))


CLIENT_BUSY = 0.85  # a load generator busier than this may be what the figures measure


def _cached_part(s: dict) -> str:
    """"  prompt cached 31%" where the run counted prefix-cache hits (a server that reports them; a simulation)."""
    cached = s.get("cached_prompt_tokens")
    if cached is None or not s.get("input_tokens"):
        return ""
    return f"  prompt cached {cached / s['input_tokens']:.0%}"


def _print_summary(doc: dict) -> None:
    for name, runs in doc["runs"].items():
        for s in runs:
            t, i = s["ttft_s"], s["itl_s"]
            fmt = lambda v: "-" if v is None else f"{v * 1000:.0f}"  # noqa: E731
            cost = s.get("cost_per_million_output_tokens")
            failed = ", ".join(f"{n} {kind}" for kind, n in s.get("errors", {}).items())  # "4 HTTP 429"
            print(f"{name:<24} {s['load']:<28} done {s['completed']}/{s['requests']}"
                  + (f" ({failed})" if failed else "")
                  + (f" ({s['not_sent']} not sent)" if s.get("not_sent") else "") + "  "
                  f"TTFT p50 {fmt(t['median'])} ms p99 {fmt(t['p99'])} ms  ITL p99 {fmt(i['p99'])} ms  "
                  f"{s['output_token_throughput']:.1f} tok/s" + (f" (${cost:.3g}/M tokens)" if cost else "") +
                  f"  SLO met {s['slo_attainment']:.0%}" + _cached_part(s))
            if s.get("client_cpu_busy", 0.0) > CLIENT_BUSY:
                print(f"{'':<24} the load generator used {s['client_cpu_busy']:.0%} of its cores: these figures may "
                      "be its limit, not the server's (more --client-processes, on cores the server does not use)")
        print(f"{name:<24} goodput: {doc['goodput'][name]}")
    print(f"report: {doc['report']}")


def _server_price(url: str) -> float | None:
    """The fleet price a tokenworks server publishes on /metrics, if it does (other servers: None)."""
    import httpx

    try:
        text = httpx.get(url.rstrip("/") + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("tokenworks:fleet_price_per_hour "):
            return float(line.split()[1])
    return None


def cmd_bench(ns: argparse.Namespace) -> int:
    from tokenworks.bench.sweep import Target, build_workload, loads_from, run_session

    requests, problems = build_workload(ns)
    for p in problems:
        print(f"tokenworks bench: {ns.file}:{p.line}: skipped ({p.message})", file=sys.stderr)
    price = ns.price_per_hour
    if price is None and ns.price_per_worker_hour is not None:
        price = ns.price_per_worker_hour * ns.workers
    if price is None:
        price = _server_price(ns.url)
    doc = run_session([Target(ns.name, ns.url, ns.model, price)], requests, loads_from(ns), _slo(ns),
                      ns.attainment, ns.out, ns.api, ns.timeout, ns.max_duration,
                      f"tokenworks bench: {ns.workload} against {ns.url}",
                      [f"{len(requests)} requests per load, seed {ns.seed}"] +
                      ([f"{len(problems)} trace lines skipped"] if problems else []) +
                      ([f"{ns.client_processes} client processes"] if ns.client_processes > 1 else []),
                      client_processes=ns.client_processes)
    _print_summary(doc)
    return 0


def cmd_experiment(ns: argparse.Namespace) -> int:
    """disagg-vs-agg: the same seeded mixed workload against an aggregated and a disaggregated server."""
    import os
    import signal
    import subprocess
    import urllib.request

    from tokenworks.bench import workloads as W
    from tokenworks.bench.loadgen import Load
    from tokenworks.bench.sweep import Target, run_session

    layouts = [("aggregated (1 worker, all cores)", ["--aggregated-workers", "1"]),
               ("disaggregated (1 prefill + 1 decode, cores split)", ["--prefill-workers", "1", "--decode-workers", "1",
                                                                   "--kv-transport", ns.kv_transport])]
    requests = W.mixed(ns.num_requests, ns.seed)
    loads = [Load(rate=r, seed=ns.seed) for r in ns.rates]
    slo = _slo(ns)
    targets, procs = [], []
    try:
        for k, (name, flags) in enumerate(layouts):
            port = ns.base_port + k
            cmd = [sys.executable, "-m", "tokenworks.cli", "serve", "--port", str(port), *flags]
            print(f"[experiment] starting {name}: {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
            procs.append(subprocess.Popen(cmd))
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 180
            while True:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if procs[-1].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start")
                time.sleep(0.5)
            targets.append(Target(name, url, None, ns.price_per_hour))
        for extra in ns.extra_url or []:
            name, _, url = extra.partition("=")
            targets.append(Target(name, url or name))
        doc = run_session(targets, requests, loads, slo, ns.attainment, ns.out, "completions", ns.timeout, None,
                          "disaggregated vs aggregated, same seeded mixed workload",
                          [f"{ns.num_requests} requests per rate from the mixed workload (seed {ns.seed}): 85 % short "
                           "prompts of 20-120 words, 15 % long prompts of 800-1,400 words, outputs of 32-96 tokens "
                           "(ignore_eos)", f"machine: {os.cpu_count()} CPUs; Poisson arrivals"])
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    _print_summary(doc)
    return 0


def cmd_profile(ns: argparse.Namespace) -> int:
    import os

    from tokenworks.planner.profiler import Plan, profile_engine

    if ns.refit:
        from tokenworks.planner.profile import Profile

        prof = Profile.load(ns.refit).refit()
        prof.save(ns.out)
        print(prof.describe())
        print(f"profile: {ns.out}")
        return 0
    if ns.cpus:
        os.sched_setaffinity(0, {int(c) for c in ns.cpus.split(",")})
        ns.threads = ns.threads or len(ns.cpus.split(","))
    random_config = None
    if ns.random_weights:
        from tokenworks.model.weights import read_hf_config

        random_config = read_hf_config(ns.random_weights)
    cuda = ns.device.startswith("cuda")
    plan = Plan.quick() if ns.quick else (Plan.thorough(ns.max_num_seqs, 65536, (32, 256, 1024, 4096)) if cuda
                                          else Plan.thorough(ns.max_num_seqs, 16384))
    prof = profile_engine(_engine_args(ns), plan, random_config=random_config, hardware=ns.hardware,
                          transport=ns.kv_transport)
    prof.save(ns.out)
    print(prof.describe())
    print(f"profile: {ns.out}")
    return 0


def _sim_workload(ns: argparse.Namespace) -> tuple[list[tuple[int, int]], list[list[float]], list[str], list[float],
                                                   tuple[list, int] | None]:
    """(prompt, output) lengths and, per load, arrival times: the same seeded workload ``bench`` would send; and
    the prompts' shared blocks, (ids per request, tokens a block), where the workload states them (Mooncake's
    hash_ids; shared-prefix's and multi-turn's system prompts and conversations)."""
    from tokenworks.bench import workloads as W
    from tokenworks.bench.loadgen import arrival_times
    from tokenworks.bench.sweep import build_workload, loads_from

    if ns.concurrency:
        raise ValueError("the simulator runs open-loop loads: give --rates (or a trace's own timing), not --concurrency")
    if ns.workload == "synthetic" and ns.num_requests > 100_000:  # lengths only, drawn at once
        lengths = list(zip(W.sample_lengths(ns.input_len, ns.num_requests, ns.seed).tolist(),
                           W.sample_lengths(ns.output_len, ns.num_requests, ns.seed + 1).tolist()))
        trace_times = prefix = None
    else:
        requests, problems = build_workload(ns)
        for p in problems:
            print(f"tokenworks simulate: {ns.file}:{p.line}: skipped ({p.message})", file=sys.stderr)
        lengths = [(r.input_tokens, r.max_tokens) for r in requests]
        trace_times = [r.arrival for r in requests] if requests and requests[0].arrival is not None else None
        prefix = W.shared_blocks(requests)
    loads = loads_from(ns)  # as bench: one per rate, or the trace's own timing
    if loads[0].rate:
        arrivals = [arrival_times(len(lengths), load.rate, load.burstiness, load.seed) for load in loads]
        return lengths, arrivals, [load.describe() for load in loads], [load.rate for load in loads], prefix
    if trace_times is None:
        raise ValueError(f"--workload {ns.workload} has no arrival times of its own: give --rates")
    return lengths, [trace_times], [loads[0].describe()], [len(lengths) / max(trace_times[-1], 1e-9)], prefix


def _deployment(ns: argparse.Namespace):
    from tokenworks.planner.catalog import load_catalog, project
    from tokenworks.planner.profile import Profile
    from tokenworks.planner.simulator import Deployment, Pool, host_tier_tokens, with_kv_pool

    catalog = load_catalog(ns.catalog)

    def load(path: str) -> Profile:
        prof = Profile.load(path)
        if prof.warning(path):
            print(f"tokenworks simulate: warning: {prof.warning(path)}", file=sys.stderr)
        return with_kv_pool(project(prof, catalog, ns.hardware, ns.units) if ns.hardware else prof,
                            ns.kv_cache_memory_gib)

    base = load(ns.profile)
    agg = load(ns.aggregated_profile) if ns.aggregated_profile else base
    prefill, decode, both = _worker_counts(ns)

    def price(prof: Profile) -> float | None:
        if ns.price_per_worker_hour is not None:
            return ns.price_per_worker_hour
        return prof.units * catalog[prof.hardware].price_per_hour if prof.hardware in catalog else None

    pools = tuple(Pool(role, n, prof, price(prof), host_tier_tokens(prof, ns.kv_host_memory_gib)) for role, n, prof in
                  (("prefill", prefill, base), ("decode", decode, base), ("both", both, agg)) if n)
    return Deployment(pools, local_prefill_threshold=ns.local_prefill_threshold,
                      max_inflight=ns.max_inflight_requests, overhead_s=ns.overhead_ms / 1000.0,
                      step_overhead_s=ns.step_overhead_ms / 1000.0, token_overhead_s=ns.token_overhead_ms / 1000.0)


def _caching_note(prefix: tuple | None, profiles) -> str:
    """How the simulation treats the workload's shared blocks ("" where it states none)."""
    if not prefix:
        return ""
    if not any(p.prefix_caching for p in profiles):
        return "no prefix caching (the profiles' engines ran with --no-prefix-caching), although prompts share blocks"
    return f"prefix caching from the workload's blocks of {prefix[1]} tokens"


def cmd_simulate(ns: argparse.Namespace) -> int:
    from dataclasses import replace

    from tokenworks.planner.simulator import simulate_session

    dep = _deployment(ns)
    lengths, arrivals, labels, xs, prefix = _sim_workload(ns)
    if ns.price_per_hour is not None:  # the whole fleet's price, as in bench
        dep = replace(dep, pools=tuple(replace(p, price_per_hour=ns.price_per_hour / dep.num_workers) for p in dep.pools))
    caching = _caching_note(prefix, [pool.profile for pool in dep.pools]) or \
        "no prefix caching (the workload does not say which prompts share blocks)"
    doc = simulate_session({ns.name: dep}, lengths, arrivals, labels, xs, _slo(ns), ns.attainment, ns.out,
                           f"tokenworks simulate: {ns.workload} on {dep.describe()}",
                           [f"{len(lengths)} requests per load, seed {ns.seed}; simulated, not measured",
                            f"deployment: {dep.describe()}, local prefill up to {dep.local_prefill_threshold} tokens",
                            caching], prefix=prefix)
    _print_summary(doc)
    for runs in doc["runs"].values():
        for s in runs:
            sim = s["simulated"]
            print(f"simulated {s['requests']} requests, {sim['events']} events in {sim['wall_s']:.2f} s "
                  f"({sim['events'] / max(sim['wall_s'], 1e-9):,.0f} events/s)"
                  + (f"; prefix cache: {sim['cached_prompt_tokens']:,} of {s['input_tokens']:,} prompt tokens "
                     f"({sim['cached_prompt_tokens'] / max(1, s['input_tokens']):.0%})" if prefix else ""))
    return 0


def cmd_plan(ns: argparse.Namespace) -> int:
    import json

    import numpy as np

    from tokenworks.bench import workloads as W
    from tokenworks.planner.catalog import load_catalog
    from tokenworks.planner.planner import Planner, Traffic, profiles_for
    from tokenworks.planner.profile import Profile

    catalog = load_catalog(ns.catalog)
    base = [Profile.load(p) for p in ns.profile]
    for path, prof in zip(ns.profile, base):
        if prof.warning(path):
            print(f"[plan] warning: {prof.warning(path)}", file=sys.stderr)
    kinds = ns.hardware.split(",") if ns.hardware else None
    profiles, notes = profiles_for(base, catalog, kinds, ns.units)
    if ns.kv_cache_memory_gib is not None:
        from tokenworks.planner.simulator import with_kv_pool

        profiles = {kind: with_kv_pool(p, ns.kv_cache_memory_gib) for kind, p in profiles.items()}
    for note in notes:
        print(f"[plan] {note}", file=sys.stderr)
    if not profiles:
        raise ValueError("no hardware kind can hold this model")
    if ns.workload in ("mooncake", "azure", "sharegpt") and not ns.file:
        raise ValueError(f"--workload {ns.workload} takes its lengths from a trace: give --file")
    if ns.file and ns.workload not in ("mooncake", "azure", "sharegpt"):
        raise ValueError("--file is a trace: give --workload mooncake, azure or sharegpt with it")
    if ns.workload == "multi-turn" and ns.think_time < 0:
        raise ValueError("--think-time must be >= 0")

    def sample(rate: float):
        """(prompt lengths, output lengths, shared blocks or None) of the traffic at ``rate``, in arrival order."""
        if ns.workload == "shared-prefix":  # one pass of the simulations' length: the system prompts stay the same
            reqs = W.shared_prefix(ns.sim_requests, ns.num_prefixes, ns.prefix_len, ns.input_len, ns.output_len,
                                   ns.seed)
        elif ns.workload == "multi-turn":  # conversations starting at rate / turns: their turns come at ``rate``
            reqs = W.multi_turn(ns.sim_requests, ns.turns, rate / ns.turns, ns.think_time, ns.num_prefixes,
                                ns.prefix_len, ns.input_len, ns.output_len, ns.seed)
        elif ns.file:
            ns.num_requests = ns.num_requests or None
            from tokenworks.bench.sweep import build_workload

            reqs, _ = build_workload(ns)
        else:
            return (W.sample_lengths(ns.input_len, 4096, ns.seed), W.sample_lengths(ns.output_len, 4096, ns.seed + 1),
                    None)
        return (np.array([r.input_tokens for r in reqs]), np.array([r.max_tokens for r in reqs]),
                W.shared_blocks(reqs))

    slo = _slo(ns)
    results, chosen = [], []
    for rate in ns.rates:
        prompt, output, prefix = sample(rate)
        traffic = Traffic(rate, prompt, output, ns.burstiness, ns.seed, *(prefix or (None, 0)))
        planner = Planner(profiles, catalog, traffic, slo, ns.attainment, ns.sim_requests, ns.local_prefill_threshold,
                          ns.max_units, ns.budget, progress=not ns.json, host_kv_gib=ns.kv_host_memory_gib)
        best = planner.search(list(profiles), ns.top, aggregated=ns.layouts in ("both", "aggregated"),
                              disaggregated=ns.layouts in ("both", "disaggregated"))
        chosen.append(best[0] if best else None)
        results.append({"rate_req_s": rate, "mean_prompt_tokens": float(prompt.mean()),
                        "mean_output_tokens": float(output.mean()), "slo": slo.describe(),
                        "attainment_target": ns.attainment, "simulations": planner.simulations,
                        "prefix_caching": prefix is not None and any(p.prefix_caching for p in profiles.values()),
                        "profiles": {k: {"projected_from": p.projected_from, "date": p.date} for k, p in profiles.items()},
                        "candidates": [c.to_json() for c in best]})
        if not ns.json:
            print(f"\n{rate:g} req/s, prompts {prompt.mean():.0f} / outputs {output.mean():.0f} tokens on average, "
                  f"SLO {slo.describe()} for {ns.attainment:.0%} of requests ({planner.simulations} simulations"
                  + (f"; {_caching_note(prefix, profiles.values())}" if prefix else "") + "):")
            if not best:
                print("  no layout meets the SLOs within the limits")
                for kind in profiles:
                    share, ttft, tpot = planner.idle(kind)
                    if share < ns.attainment:
                        print(f"  {kind}: one request at a time on one worker gives p90 TTFT {1e3 * ttft:.0f} ms, "
                              f"TPOT {1e3 * (tpot or 0):.1f} ms; {share:.0%} meet the SLOs: no count of it can")
            for k, c in enumerate(best, 1):
                gp = "-" if c.goodput is None else ((">=" if c.goodput_is_lower_bound else "") + f"{c.goodput:.3g}")
                print(f"  {k}. {c.layout:<13} {c.describe():<58} {c.units:>5} units  ${c.price_per_hour:>9.2f}/h  "
                      f"${c.cost_per_million_output:.3g}/M out tok  goodput {gp} req/s  "
                      f"p90 TTFT {1e3 * (c.ttft_p90 or 0):.0f} ms TPOT {1e3 * (c.tpot_p90 or 0):.1f} ms"
                      + (f"  {c.cached_share:.0%} of prompt tokens cached" if prefix else ""))
    if ns.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    if ns.emit_deployment:
        from tokenworks.launch import deployment as deployments

        top = max(zip(ns.rates, chosen), key=lambda rc: rc[0])
        if top[1] is None:
            raise ValueError(f"no layout meets the SLOs at {top[0]:g} req/s: no deployment written")
        plan = {"rate_req_s": top[0], **{k: v for k, v in top[1].to_json().items() if k not in ("pools", "layout")},
                "layout": top[1].layout, "profiles": sorted(profiles)}
        assumed = {k: v for k, v in (("kv_cache_memory_gib", ns.kv_cache_memory_gib),
                                     ("kv_host_memory_gib", ns.kv_host_memory_gib)) if v} or None
        spec = deployments.from_candidate(top[1], catalog, slo, ns.local_prefill_threshold, plan, assumed)
        deployments.save(spec, ns.emit_deployment)
        print(f"[plan] wrote {ns.emit_deployment}: {spec.describe()} (tokenworks serve --deployment "
              f"{ns.emit_deployment})", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenworks", description="Disaggregated LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt, streamed to stdout",
                       description="Generate text for one prompt on one engine in this process, streamed to stdout.")
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user message")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="a stop string (repeatable)")
    _engine_flags(g)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="start the OpenAI-compatible server with prefill and decode workers",
                       description="Start a router (OpenAI API over HTTP: /v1/chat/completions with tool calling and "
                                   "structured output, /v1/responses, /v1/completions, /v1/models; /tokenize, /detokenize, "
                                   "/health, /metrics) "
                                   "and worker processes. With no worker flags "
                                   "the layout is picked from the machine and printed with the reason: one aggregated "
                                   "worker on fewer than 4 CPU cores, else (or with --gpus) one prefill and one decode "
                                   "worker, the cores split between them.")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    s.add_argument("--prefill-workers", type=int, default=None, metavar="N", help="prefill-only workers")
    s.add_argument("--decode-workers", type=int, default=None, metavar="M", help="decode workers")
    s.add_argument("--aggregated-workers", type=int, default=None, metavar="K",
                   help="workers that do both phases (the baseline); may be combined with the others")
    s.add_argument("--cpu-sets", default=None, metavar="SETS",
                   help="CPU ids per worker, workers separated by ':' in prefill, decode, aggregated order, "
                        "e.g. '0:1' (default: split the machine's cores)")
    s.add_argument("--gpus", default=None, metavar="IDS", help="GPU ids to place workers on, e.g. '0,1' (CUDA)")
    s.add_argument("--prefill-max-num-batched-tokens", type=int, default=None, metavar="TOKENS",
                   help="token budget of a prefill worker's step, so that queued prompts are prefilled together "
                        "(default: 4096 with --gpus, where one batched step costs little more than one prompt's; "
                        "else --max-num-batched-tokens)")
    s.add_argument("--prefill-nice", type=int, default=0, metavar="N",
                   help="run prefill workers at lower CPU priority (nice N), so that where CPU sets overlap "
                        "decode runs first (default: 0)")
    s.add_argument("--kv-transport", choices=["nixl", "tcp"], default="nixl",
                   help="how KV moves from prefill to decode workers (default: nixl)")
    s.add_argument("--local-prefill-threshold", type=int, default=16, metavar="TOKENS",
                   help="prefill on the decode worker when the uncached prompt is at most this long (default: 16, "
                        "from benchmarks/local_prefill_threshold.py on a 2-CPU machine)")
    s.add_argument("--router-overlap-weight", type=float, default=1.0, metavar="W",
                   help="routing cost = (prompt tokens queued on a worker for prefill + W x this prompt's tokens not in "
                        "its prefix cache) / its measured prefill rate: the predicted wait for the first token; "
                        "0 routes by queued prefill alone (default: 1.0; see /debug/routing)")
    s.add_argument("--routing", default="kv", choices=["kv", "prefix", "least-loaded", "round-robin"],
                   help="kv: the cost above (default); prefix: longest prefix hit first; least-loaded: fewest "
                        "requests in flight; round-robin (baselines for benchmarks/routing.py)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $TOKENWORKS_API_KEY, else none)")
    s.add_argument("--max-inflight-requests", type=int, default=256,
                   help="answer 429 beyond this many requests in flight (default: 256)")
    s.add_argument("--max-queue-wait", type=float, default=30.0, metavar="SECONDS",
                   help="answer 429 when a new request's predicted wait for prefill exceeds this (default: 30)")
    s.add_argument("--no-restart", action="store_true", help="do not restart workers that exit")
    s.add_argument("--price-per-worker-hour", type=float, default=None, metavar="USD",
                   help="what one worker costs per hour: /metrics then shows the fleet's price and the cost per "
                        "million generated tokens (tokenworks bench reads it from there)")
    s.add_argument("--internal-host", default="127.0.0.1",
                   help="address of the router-worker plane and the TCP KV sources (default: 127.0.0.1); any other "
                        "needs --internal-secret")
    s.add_argument("--internal-secret", default=None,
                   help="shared secret: every internal message is signed with HMAC-SHA256 "
                        "(default: $TOKENWORKS_INTERNAL_SECRET, else unsigned on loopback)")
    s.add_argument("--lease-seconds", type=float, default=30.0,
                   help="how long a prefill worker holds KV for a decode worker that never comes (default: 30)")
    d = s.add_argument_group("deployment: where the workers run")
    d.add_argument("--deployment", default=None, metavar="FILE",
                   help="start the layout of a deployment file (YAML or JSON; `tokenworks plan --emit-deployment`): "
                        "its pools' worker counts, engine flags and resources")
    d.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="place the workers on a Ray cluster: the head's HOST:PORT, 'auto' (RAY_ADDRESS or the one "
                        "running here), or nothing to start a Ray cluster on this machine (needs `pip install ray`)")
    for role in ("prefill", "decode", "aggregated"):
        d.add_argument(f"--{role}-resources", default=None, metavar="NAME=N,...",
                       help=f"with --ray: what each {role} worker reserves on its node, e.g. CPU=2,GPU=1,{role}_node=1 "
                            "(default: GPU=1 on CUDA, else CPU=1)")
    a = s.add_argument_group("autoscaling: the planner sizes the running fleet to its traffic")
    a.add_argument("--autoscale", default=None, metavar="PROFILE",
                   help="a profile of one worker (tokenworks profile): every --autoscale-interval the planner sizes "
                        "the fleet for the traffic of the last --autoscale-window against the SLOs below, and "
                        "workers are added (or, after 3 looks asking for fewer, drained) one a role at a time")
    a.add_argument("--autoscale-interval", type=float, default=30.0, metavar="SECONDS",
                   help="seconds between looks (default: 30)")
    a.add_argument("--autoscale-window", type=float, default=60.0, metavar="SECONDS",
                   help="the traffic looked at: requests finished in these last seconds (default: 60)")
    a.add_argument("--max-workers", type=_count, default=8, help="most workers in all (default: 8)")
    _slo_flags(a, itl=False)
    _engine_flags(s)
    s.set_defaults(func=cmd_serve, slo_itl_ms=None)

    pr = sub.add_parser("profile", help="measure a worker's step latencies and KV transfer; write a profile (JSON)",
                        description="Measure this machine's engine: prefill step time against tokens and prompt "
                                    "lengths, decode step time against batch and context, KV transfer time against "
                                    "bytes; fit latency models (error on held-out points shown) and write a profile "
                                    "for tokenworks simulate and plan.")
    pr.add_argument("--out", default="profile.json", help="where to write the profile (default: profile.json)")
    pr.add_argument("--quick", action="store_true", help="a few points (seconds), for tests; default: thorough")
    pr.add_argument("--cpus", default=None, metavar="IDS",
                    help="pin to these CPU ids with one thread each, as a worker would be (e.g. '0')")
    pr.add_argument("--hardware", default=None,
                    help="the catalog name of this hardware (default: guessed; needed to project to other kinds)")
    pr.add_argument("--random-weights", default=None, metavar="CONFIG",
                    help="time a random-weight model of this Hugging Face config.json's shape instead of --model")
    pr.add_argument("--kv-transport", choices=["nixl", "tcp"], default="nixl", help="transport to time (default: nixl)")
    pr.add_argument("--refit", default=None, metavar="PROFILE",
                    help="measure nothing: fit this profile's stored points again and write the result to --out")
    _engine_flags(pr)
    pr.set_defaults(func=cmd_profile)

    b = sub.add_parser("bench", help="drive any OpenAI-compatible server and report latency and goodput",
                       description="Drive an OpenAI-compatible server over streaming HTTP and report TTFT, TPOT, "
                                   "ITL, E2E, throughput, SLO attainment and goodput (JSONL, JSON, Markdown, PNG).")
    b.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL (default: http://127.0.0.1:8000)")
    b.add_argument("--model", default=None, help="model name to send (default: none, the server's default)")
    b.add_argument("--name", default="server", help="label for this server in the report")
    _bench_flags(b)
    b.add_argument("--client-processes", type=_count, default=1, metavar="N",
                   help="load generator processes (default: 1). One client core parses some 20,000 streamed tokens "
                        "a second; against a faster server, use more (on cores the server does not need)")
    b.set_defaults(func=cmd_bench)

    sm = sub.add_parser("simulate", help="simulate a deployment on a workload from measured profiles; bench's report",
                        description="Simulate a deployment (prefill, decode and aggregated pools, router, KV "
                                    "transfers) step by step from profiles written by 'tokenworks profile', on the "
                                    "same seeded workloads as 'tokenworks bench', and write the same report. Where "
                                    "prompts share blocks (a Mooncake trace's hash_ids; the system prompts of "
                                    "shared-prefix and the conversations of multi-turn) the prefix cache is "
                                    "modelled (workers' LRU block caches, routing to the cheapest (queued + "
                                    "uncached) worker); the other workloads share nothing.")
    sm.add_argument("--profile", required=True, help="profile of one worker (from tokenworks profile)")
    sm.add_argument("--aggregated-profile", default=None, help="profile for the aggregated workers (default: --profile)")
    sm.add_argument("--hardware", default=None, help="project the profiles to this catalog kind first")
    sm.add_argument("--units", type=_count, default=1, help="with --hardware: accelerators per worker (default: 1)")
    sm.add_argument("--catalog", default=None, help="hardware catalog JSON (default: the shipped one)")
    sm.add_argument("--prefill-workers", type=int, default=None, metavar="N")
    sm.add_argument("--decode-workers", type=int, default=None, metavar="M")
    sm.add_argument("--aggregated-workers", type=int, default=None, metavar="K",
                    help="default with none of the three: 1 prefill + 1 decode")
    sm.add_argument("--local-prefill-threshold", type=int, default=16, metavar="TOKENS")
    _simulated_pool_flags(sm)
    sm.add_argument("--max-inflight-requests", type=int, default=0, help="reject beyond this many (default: no limit)")
    sm.add_argument("--overhead-ms", type=float, default=0.0,
                    help="added to every request's first and last token: the serving path's delivery cost (default: 0)")
    sm.add_argument("--step-overhead-ms", type=float, default=0.0,
                    help="added to every engine step: the worker loop's cost beyond Engine.step (default: 0)")
    sm.add_argument("--token-overhead-ms", type=float, default=0.0,
                    help="added to a decode step per request in it: per-token messages and streaming (default: 0)")
    sm.add_argument("--name", default="simulated", help="label in the report")
    _bench_flags(sm, out="results/simulate")
    sm.set_defaults(func=cmd_simulate)

    pl = sub.add_parser("plan", help="find the cheapest prefill/decode layouts and hardware that meet SLOs",
                        description="Search aggregated and disaggregated layouts, prefill:decode counts and the "
                                    "hardware kind of each pool (mixed kinds included) by simulation, and print the "
                                    "cheapest that meet the SLOs, with cost per hour and per million output tokens.")
    pl.add_argument("--profile", action="append", required=True,
                    help="a measured profile (repeatable: one per hardware kind measured; others are projected)")
    pl.add_argument("--hardware", default=None, help="comma-separated catalog kinds to consider (default: all)")
    pl.add_argument("--units", type=_count, default=1, help="accelerators per projected worker (default: 1)")
    pl.add_argument("--catalog", default=None, help="hardware catalog JSON (default: the shipped one)")
    pl.add_argument("--rates", type=_floats, required=True, metavar="R[,R...]",
                    help="request rates to plan for, e.g. 100,200 (what if traffic doubles)")
    pl.add_argument("--input-len", default="uniform:50:400",
                    help="prompt lengths, as in bench; shared-prefix: what follows the system prompt "
                         "(default: uniform:50:400)")
    pl.add_argument("--output-len", default="uniform:16:128", help="output lengths (default: uniform:16:128)")
    pl.add_argument("--workload", default="synthetic", choices=["synthetic", "shared-prefix", "multi-turn", "mooncake",
                                                                "azure", "sharegpt"],
                    help="synthetic: --input-len and --output-len; shared-prefix: each prompt starts with one of "
                         "--num-prefixes system prompts; multi-turn: conversations of --turns turns, each resending "
                         "the conversation so far (--input-len: each user message); both with prefix caching "
                         "modelled; the others take the lengths from a trace --file")
    _system_prompt_flags(pl)
    pl.add_argument("--turns", type=_count, default=4,
                    help="multi-turn: turns per conversation (default: 4); conversations start at rate / turns")
    pl.add_argument("--think-time", type=float, default=3.0,
                    help="multi-turn: seconds between a conversation's turns at the planned rate (default: 3)")
    pl.add_argument("--file", default=None, help="trace file for the length distribution (a Mooncake trace's "
                                                 "hash_ids: prefix caching modelled too)")
    pl.add_argument("--num-requests", type=_count, default=None, help="trace lines to read (default: all)")
    pl.add_argument("--time-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    pl.add_argument("--length-scale", type=float, default=1.0, help="traces: multiply token counts")
    pl.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals; 1 = Poisson")
    pl.add_argument("--seed", type=int, default=0, help="seed of the simulated arrivals and lengths")
    _slo_flags(pl, itl=False)  # the simulator models TPOT, not single gaps
    pl.add_argument("--budget", type=float, default=None, metavar="USD_PER_HOUR", help="most the fleet may cost")
    pl.add_argument("--max-units", type=int, default=None, help="most accelerators (or CPU cores) in all")
    pl.add_argument("--layouts", choices=["both", "aggregated", "disaggregated"], default="both")
    pl.add_argument("--local-prefill-threshold", type=int, default=16, metavar="TOKENS")
    _simulated_pool_flags(pl)
    pl.add_argument("--sim-requests", type=_count, default=3000, help="requests per simulation (default: 3000)")
    pl.add_argument("--top", type=_count, default=5, help="layouts to print (default: 5)")
    pl.add_argument("--json", action="store_true", help="print JSON only")
    pl.add_argument("--emit-deployment", default=None, metavar="FILE",
                    help="write the best layout for the highest rate as a deployment file (YAML for .yaml/.yml, else "
                         "JSON) for `tokenworks serve --deployment FILE`")
    pl.set_defaults(func=cmd_plan, slo_itl_ms=None, concurrency=None)

    e = sub.add_parser("experiment", help="run a prepared comparison (disagg-vs-agg) and write one report",
                       description="disagg-vs-agg: start an aggregated server (one worker on all cores) and a "
                                   "disaggregated one (one prefill and one decode worker, cores split), drive both with "
                                   "the same seeded mixed workload at each rate, and write one comparison report.")
    e.add_argument("name", choices=["disagg-vs-agg"])
    e.add_argument("--rates", type=_floats, default=[0.15, 0.3, 0.5, 0.8], metavar="R[,R...]",
                   help="request rates to sweep (default: 0.15,0.3,0.5,0.8)")
    e.add_argument("--num-requests", type=_count, default=16, help="requests per rate (default: 16)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--kv-transport", choices=["nixl", "tcp"], default="nixl")
    e.add_argument("--extra-url", action="append", metavar="NAME=URL",
                   help="another OpenAI-compatible server to include, e.g. llama.cpp=http://127.0.0.1:8080")
    e.add_argument("--base-port", type=int, default=8100, help="ports for the servers started (default: 8100, 8101)")
    _slo_flags(e, ttft=8000.0, tpot=100.0)
    e.add_argument("--timeout", type=float, default=600.0)
    e.add_argument("--price-per-hour", type=float, default=None)
    e.add_argument("--out", default="results/disagg-vs-agg")
    e.set_defaults(func=cmd_experiment)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tokenworks.launch.launcher import WorkersNotReady

    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (ValueError, FileNotFoundError, NotImplementedError, WorkersNotReady) as e:
        print(f"tokenworks: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
