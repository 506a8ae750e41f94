"""The ``tokenworks`` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="a .gguf file or a Hugging Face folder (default: SmolLM2-135M-Instruct)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV dtype (default: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--kv-cache-memory-gib", type=float, default=1.0, help="KV pool budget in GiB (default: 1.0)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    g.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget of one step (default: 512)")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


def _engine_args(ns: argparse.Namespace):
    from tokenworks.config import EngineArgs

    return EngineArgs(
        model=ns.model,
        device=ns.device,
        dtype=ns.dtype,
        kv_cache_memory_gib=ns.kv_cache_memory_gib,
        block_size=ns.block_size,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        enable_prefix_caching=not ns.no_prefix_caching,
        num_threads=ns.threads,
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
    print(f"[tokenworks] loaded {loaded.model_name} in {loaded.load_seconds:.1f}s", file=sys.stderr)
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": ns.prompt}]) if ns.chat else ns.prompt
    t0 = time.perf_counter()
    engine.add_request("cli", prompt, params)
    first = None
    n = 0
    while engine.has_unfinished():
        for out in engine.step():
            first = first or time.perf_counter()
            n += 1
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
            if out.finished:
                reason = out.finish_reason
    t1 = time.perf_counter()
    sys.stdout.write("\n")
    tpot = (t1 - first) / (n - 1) * 1000 if n > 1 else 0.0
    print(f"[tokenworks] {n} tokens, finish_reason={reason}, TTFT {1000 * (first - t0):.0f} ms, "
          f"TPOT {tpot:.1f} ms", file=sys.stderr)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"tokenworks: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
