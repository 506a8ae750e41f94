"""Engine benchmark: decode and prefill speed against this machine's own rooflines.

Measured in the same run:
  - memory read bandwidth (a large tensor reduction, best of 15) -> the decode roofline:
    bytes a decode step must read (weights in the dtype used + the KV it attends to);
  - matmul FLOP/s (a 2048^3 matmul, best of 10) -> the prefill roofline;
  - Hugging Face transformers' decode tokens/s on the same weights and prompt.
Prints a table of medians and the ratios the engine issue targets.

    python benchmarks/engine.py [--dtype float32] [--steps 16] [--skip-hf] [--json out.json]
    python benchmarks/engine.py --shape llama-3.1-8b --device cuda     # random weights made on the GPU

Also, in the same run: the floor (benchmarks/floor.py: a plain PyTorch
static-cache decode step of the same shape, a CUDA graph on GPUs), and one
long request among 31 short ones (does a step cost the sum of contexts?).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
import statistics
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this tree's tokenworks
from tokenworks.model.linear import Linear  # noqa: E402
from tokenworks.model.quantized_linear import Int4Linear, wide_products  # noqa: E402


def run_times(fn, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def median_time(fn, reps: int, warmup: int = 1) -> float:
    return statistics.median(run_times(fn, reps, warmup))


def best_time(fn, reps: int) -> float:
    """Rooflines use the best of several runs: the peak this machine can reach, not a typical run."""
    return min(run_times(fn, reps))


def memory_bandwidth(dtype: torch.dtype) -> float:
    x = torch.ones(512 * 2**20 // torch.tensor([], dtype=dtype).element_size(), dtype=dtype)
    return x.numel() * x.element_size() / best_time(x.sum, 15)


def matmul_flops(dtype: torch.dtype, device: str) -> float:
    n = 2048
    a = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run():
        a @ a
        sync()

    return 2 * n**3 / best_time(run, 10)


def linear_layouts(model) -> tuple[float, float]:
    """ms for one pass over the model's layer weights at 1 row: plain F.linear vs the split layout."""
    linears = [layer[k] for layer in model.layers for k in ("qkv", "o", "gate_up", "down")
               if isinstance(layer[k], Linear)]
    if not linears:
        return float("nan"), float("nan")
    plain = []
    for lin in linears:
        w = lin.weight.permute(1, 0, 2).reshape(lin.in_features, -1).t().contiguous() if lin.split else lin.weight
        plain.append(w)
    xs = {n: torch.randn(1, n, dtype=model.dtype, device=model.device) for n in {l.in_features for l in linears}}
    t_plain = median_time(lambda: [F.linear(xs[w.shape[1]], w) for w in plain], 7)
    t_split = median_time(lambda: [lin(xs[lin.in_features]) for lin in linears], 7)
    return t_plain * 1e3, t_split * 1e3


def decode_ms(engine, batch: int, prompt_len: int | list[int], steps: int, tag: str) -> float:
    """Median ms of a decode step of ``batch`` requests, each with ``prompt_len`` tokens of context (or its own)."""
    from tokenworks.sampling_params import SamplingParams

    lens = prompt_len if isinstance(prompt_len, list) else [prompt_len] * batch
    ids = [f"{tag}-{batch}-{i}" for i in range(batch)]
    # rows prefilled early decode while the later ones prefill (chunked prefill): they must not run out of tokens
    # before the timed steps, or the step timed has fewer rows than it says
    preemptions = engine.scheduler.num_preemptions
    max_tokens = steps + 8 + decode_steps_while_prefilling(lens, engine.scheduler.config.max_num_batched_tokens)
    for i, rid in enumerate(ids):
        prompt = [(1000 + 37 * i + 11 * j) % 40000 + 100 for j in range(lens[i])]
        engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    while any(r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    engine.step()
    t = median_time(engine.step, steps, warmup=1)
    running = sum(r.request_id in ids for r in engine.scheduler.running)
    preempted = engine.scheduler.num_preemptions - preemptions
    for rid in ids:
        engine.abort(rid)
    if running != batch or preempted:
        raise RuntimeError(f"decode {tag}: {running} of {batch} rows ran to the last timed step "
                           f"({preempted} preemptions): the KV budget or max_model_len is short")
    return t * 1e3


def decode_steps_while_prefilling(lens: list[int], token_budget: int) -> int:
    """At most how many tokens a row decodes while the rows after it prefill: one a step, and the steps are at most
    one per budget's worth of prompt tokens plus one per row (a prefill's last chunk may end a step)."""
    return -(-sum(lens) // token_budget) + len(lens)


def prefill_ms(engine, prompt_len: int, reps: int) -> float:
    from tokenworks.sampling_params import SamplingParams

    counter = iter(range(10**6))

    def one():
        k = next(counter)
        prompt = [(7 * k + 13 * j) % 40000 + 100 for j in range(prompt_len)]  # never a prefix-cache hit
        engine.add_request(f"prefill-{k}", prompt, SamplingParams(temperature=0, max_tokens=1))
        while engine.has_unfinished():
            engine.step()

    return median_time(one, reps) * 1e3


def hf_decode_tokens_per_s(loaded, model_files_weights, prompt_len: int, new_tokens: int) -> float:
    import transformers

    c = loaded.model_config
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position, tie_word_embeddings=c.tie_word_embeddings,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(model_files_weights, strict=False)
    ids = torch.tensor([[(11 * j) % 40000 + 100 for j in range(prompt_len)]])

    def gen(n):
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))

    t1 = median_time(lambda: gen(1), 3)
    tn = median_time(lambda: gen(new_tokens), 3)
    return (new_tokens - 1) / (tn - t1)


LLAMA_CPP_INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python   # builds llama.cpp: minutes'


class LlamaCpp:
    """llama.cpp on the same GGUF with the same threads: one sequence's decode and a prefill, each timed the way
    ours is (the median of per-token steps; the median of prefills)."""

    def __init__(self, llama_cpp, gguf_path: str, threads: int, prompt_len: int, prefill_len: int) -> None:
        self.prompt_len, self.prefill_len = prompt_len, prefill_len
        self.llm = llama_cpp.Llama(model_path=gguf_path, n_threads=threads, n_threads_batch=threads,
                                   n_ctx=max(2048, prefill_len + 64, prompt_len + 200), n_batch=max(512, prefill_len),
                                   verbose=False)

    def decode_ms(self, steps: int) -> float:
        """Median ms of a decode step of one sequence with ``prompt_len`` tokens of context."""
        self.llm.reset()
        self.llm.eval([(11 * j) % 40000 + 100 for j in range(self.prompt_len)])
        token, times = 1000, []
        for _ in range(steps + 1):
            t = time.perf_counter()
            self.llm.eval([token])
            times.append(time.perf_counter() - t)
            token = (token * 7 + 13) % 40000 + 100
        return statistics.median(times[1:]) * 1e3

    def prefill_ms(self, reps: int) -> float:
        def one() -> None:
            self.llm.reset()
            self.llm.eval([(7 * j + 3) % 40000 + 100 for j in range(self.prefill_len)])

        return median_time(one, reps) * 1e3


def llama_cpp(gguf_path: str, threads: int, prompt_len: int, prefill_len: int) -> LlamaCpp | None:
    """llama.cpp on the GGUF, or None (and a line saying how to install it) when llama_cpp does not import."""
    try:
        import llama_cpp as module
    except ImportError:
        print(f"llama.cpp baseline skipped: llama_cpp does not import ({LLAMA_CPP_INSTALL})", flush=True)
        return None
    return LlamaCpp(module, gguf_path, threads, prompt_len, prefill_len)


def write_random_model(folder: str) -> str:
    """A Hugging Face folder with the default model's shape (configs/smollm2-135m.json) and random weights
    (for machines where the default model's file cannot be carried)."""
    import os
    import shutil

    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tokenworks.model.weights import random_weights, read_hf_config

    config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "smollm2-135m.json")
    os.makedirs(folder, exist_ok=True)
    shutil.copy(config, os.path.join(folder, "config.json"))
    save_file(random_weights(read_hf_config(config), torch.float32, "cpu"), os.path.join(folder, "model.safetensors"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a random model for benchmarks"], trainers.BpeTrainer(vocab_size=300))
    tok.save(os.path.join(folder, "tokenizer.json"))
    return folder


SHAPES = ("smollm2-135m", "llama-3.1-8b")


def shape_config(name: str):
    import os

    from tokenworks.model.weights import read_hf_config

    return read_hf_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", f"{name}.json"))


def long_context_case(engine, short: int, long: int, steps: int, batch: int = 32) -> dict[str, float]:
    """Decode step ms for `batch` short rows, for one long row among batch-1 short ones, and for `batch` long rows.
    If a step costs the sum of the contexts, the second is close to the first; if it pads every row to the
    longest, it is close to the third."""
    return {"all_short": decode_ms(engine, batch, short, steps, "short"),
            "one_long": decode_ms(engine, batch, [long] + [short] * (batch - 1), steps, "mixed"),
            "all_long": decode_ms(engine, batch, long, steps, "long")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the built-in default model)")
    ap.add_argument("--shape", default=None, choices=SHAPES,
                    help="benchmark a model of this public shape with random weights made on the device (no file)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"],
                    help="what the KV pool holds (default: auto, the engine's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per batch size")
    ap.add_argument("--prompt-len", type=int, default=128, help="context of each decoding request")
    ap.add_argument("--batches", default=None, help="decode batch sizes (default: 1,8,32 on CPU; 1,8,32,64,128 on CUDA)")
    ap.add_argument("--prefill-len", type=int, default=None, help="prompt timed for prefill (default: 512 CPU, 4096 CUDA)")
    ap.add_argument("--long-context", type=int, default=None,
                    help="the long request of the 1-long-among-31-short decode case (default: 1024 CPU, 4096 CUDA; 0 skips)")
    ap.add_argument("--enforce-eager", action="store_true", help="CUDA: no decode CUDA graphs")
    ap.add_argument("--overlap-schedule", choices=["auto", "on", "off"], default="auto",
                    help="the engine's overlapped scheduling (auto: on for CUDA); when on, decode is also timed "
                         "with it off in the same run")
    ap.add_argument("--skip-floor", action="store_true", help="skip the plain-PyTorch static-cache floor")
    ap.add_argument("--skip-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--paired-rounds", type=int, default=5,
                    help="with --baseline llama-cpp: rounds of ours (batch 1, and 32) then llama.cpp's one sequence (default 5)")
    ap.add_argument("--baseline", choices=["llama-cpp"], default=None,
                    help="also time llama.cpp on the same GGUF with the same threads (needs llama_cpp: "
                         + LLAMA_CPP_INSTALL + ")")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--random-weights", default=None, metavar="DIR",
                    help="write a random-weight model of the default model's shape to DIR and benchmark it")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    dtype_name = args.dtype or ("bfloat16" if cuda else "float32")
    batches = [int(x) for x in (args.batches or ("1,8,32,64,128" if cuda else "1,8,32")).split(",")]
    prefill_len = args.prefill_len or (4096 if cuda else 512)
    long_ctx = (4096 if cuda else 1024) if args.long_context is None else args.long_context
    if long_ctx and long_ctx <= 2 * args.prompt_len:
        ap.error(f"--long-context {long_ctx} must be well over --prompt-len {args.prompt_len} (at least twice): the "
                 "case compares one long row among short ones with all rows short and all long (0 skips it)")
    if args.random_weights:
        args.model = write_random_model(args.random_weights)

    from tokenworks.config import CacheConfig, EngineArgs
    from tokenworks.llm import build_engine, build_random_engine
    from tokenworks.model.kv_cache import kv_dtype, torch_dtype
    from tokenworks.model.weights import load_model_files

    dtype = torch_dtype(dtype_name)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, dtype {dtype_name}", flush=True)
    bw = memory_bandwidth(dtype) if not cuda else None
    flops = matmul_flops(dtype, args.device)
    config = shape_config(args.shape) if args.shape else load_model_files(args.model, weights=False).config
    kv_elem = kv_dtype(CacheConfig(dtype=args.kv_cache_dtype), dtype, args.device).itemsize
    kv_per_token = config.num_layers * 2 * config.kv_size * kv_elem
    token_budget = max(1024, args.prompt_len * 4, prefill_len)
    extra = max(decode_steps_while_prefilling([args.prompt_len] * max(batches), token_budget),
                decode_steps_while_prefilling([long_ctx] * 32, token_budget) if long_ctx else 0)
    ctx_tokens = (max(batches) * (args.prompt_len + args.steps + 16 + extra)
                  + (32 * (long_ctx + args.steps + 16 + extra) if long_ctx else 0))
    engine_args = EngineArgs(model=args.model, device=args.device, dtype=dtype_name, kv_cache_dtype=args.kv_cache_dtype,
                             max_num_seqs=max(batches + [32]),
                             max_num_batched_tokens=token_budget,
                             kv_cache_memory_gib=max(1.0, 1.25 * ctx_tokens * kv_per_token / 2**30),
                             max_model_len=max(args.prompt_len, long_ctx, prefill_len) + args.steps + 16 + extra,
                             enforce_eager=args.enforce_eager, overlap_schedule=args.overlap_schedule)
    def load(engine_args):
        return build_random_engine(engine_args, config, args.shape) if args.shape else build_engine(engine_args)

    loaded = load(engine_args)
    engine, model = loaded.engine, loaded.runner.model
    if loaded.graphs:
        print(loaded.graphs, flush=True)
    if bw is None:  # CUDA: HBM bandwidth from a device-side reduction
        x = torch.ones(2**28, dtype=dtype, device=args.device)
        bw = x.numel() * x.element_size() / median_time(lambda: (x.sum(), torch.cuda.synchronize()), 10)
        del x
    weight_bytes = model.step_weight_bytes  # as stored: 4-bit layers count their packed bytes
    c = loaded.model_config
    rows = []
    results: dict[str, object] = {
        "dtype": dtype_name, "device": args.device, "shape": args.shape, "threads": torch.get_num_threads(),
        "memory_bandwidth_GBps": bw / 1e9, "matmul_GFLOPs": flops / 1e9,
        "parameters": model.num_parameters, "weight_bytes": weight_bytes, "graphs": loaded.graphs,
    }
    print(f"memory read bandwidth {bw / 1e9:.1f} GB/s; matmul {flops / 1e9:.1f} GFLOP/s; "
          f"{model.num_parameters / 1e6:.1f} M parameters = {weight_bytes / 1e6:.0f} MB; KV {kv_per_token} B/token", flush=True)
    prefill_flops, prefill_dtype = flops, dtype_name
    if not cuda and any(isinstance(layer["qkv"], Int4Linear) for layer in model.layers):
        # the 4-bit layers' prefill products multiply in wide_products()'s dtype (bfloat16 where the CPU has AVX512-BF16):
        # the prefill roofline is the matmul rate in that dtype
        wide = wide_products()[0]
        if wide != dtype:
            prefill_flops, prefill_dtype = matmul_flops(wide, args.device), str(wide).removeprefix("torch.")
            results["prefill_matmul_GFLOPs"] = prefill_flops / 1e9
            print(f"matmul in {prefill_dtype} (the 4-bit layers' prefill products): {prefill_flops / 1e9:.1f} GFLOP/s",
                  flush=True)
    if not cuda and not args.shape:
        t_plain, t_split = linear_layouts(model)
        results["linear_pass_ms"] = {"plain": t_plain, "split": t_split}
        if t_plain == t_plain:  # not NaN: some layers are float
            print(f"layer weights, 1 row: plain F.linear {t_plain:.1f} ms, split layout {t_split:.1f} ms "
                  f"({t_plain / t_split:.2f}x)", flush=True)

    decode, floors, stepwise = {}, {}, {}
    for b in batches:
        if engine.overlap:  # what overlapping buys: the same batch with each step waited for before the next
            engine.overlap = False
            stepwise[b] = decode_ms(engine, b, args.prompt_len, args.steps, "stepwise")
            engine.overlap = True
        try:
            ms = decode_ms(engine, b, args.prompt_len, args.steps, "bench")
        except Exception as e:  # noqa: BLE001 - keep the stepwise figures and the rest of the run
            if not engine.overlap:
                raise
            print(f"overlapped decode failed ({type(e).__name__}: {e}); reloading with --overlap-schedule off",
                  flush=True)
            results["overlap_error"] = f"{type(e).__name__}: {e}"
            del loaded, engine, model
            loaded = load(replace(engine_args, overlap_schedule="off"))
            engine, model = loaded.engine, loaded.runner.model
            ms = stepwise.pop(b)
        ctx = args.prompt_len + args.steps // 2
        roof_ms = (weight_bytes + b * ctx * kv_per_token) / bw * 1e3
        decode[b] = ms
        line = f"roofline {roof_ms:.1f} ms -> {roof_ms / ms:.0%} of it"
        if not args.skip_floor:
            from floor import floor_decode_ms

            floors[b] = floor_decode_ms(c, b, ctx, dtype, args.device)
            line += f"; floor {floors[b]:.2f} ms -> {ms / floors[b]:.2f}x the floor"
        if b in stepwise:
            line += f"; not overlapped {stepwise[b]:.2f} ms -> overlap {stepwise[b] / ms:.2f}x faster"
        rows.append((f"decode batch {b}", f"{ms:.2f} ms/step", f"{b / ms * 1e3:.0f} tok/s", line))
        print(rows[-1], flush=True)
    results["decode_ms_per_step"] = decode
    results["floor_ms_per_step"] = floors
    results["overlap_schedule"] = engine.overlap
    results["decode_ms_per_step_not_overlapped"] = stepwise

    if long_ctx:
        try:
            case = long_context_case(engine, args.prompt_len, long_ctx, args.steps)
        except RuntimeError as e:  # a case that could not run all its rows: say so, keep the rest of the run
            case = None
            results["long_context_error"] = str(e)
            print(f"long-context case not measured: {e}", flush=True)
    if long_ctx and case:
        share = (case["one_long"] - case["all_short"]) / max(1e-9, case["all_long"] - case["all_short"])
        results["long_context_case"] = {**case, "long": long_ctx, "short": args.prompt_len, "share": share}
        rows.append((f"decode 1x{long_ctx} + 31x{args.prompt_len}", f"{case['one_long']:.2f} ms/step", "",
                     f"32x{args.prompt_len} {case['all_short']:.2f} ms, 32x{long_ctx} {case['all_long']:.2f} ms: "
                     f"the long row adds {share:.0%} of what 31 more long rows add (sum of contexts: "
                     f"{1 / 32:.0%}; padded to the longest: 100%)"))
        print(rows[-1], flush=True)

    pre_ms = prefill_ms(engine, prefill_len, 3)
    n = prefill_len
    dense = 2 * (model.num_parameters - c.vocab_size * c.hidden_size) * n + 2 * c.vocab_size * c.hidden_size
    attn = c.num_layers * 2 * 2 * c.num_heads * c.head_dim * n * (n + 1) / 2
    achieved = (dense + attn) / (pre_ms / 1e3)
    rows.append((f"prefill {n} tokens", f"{pre_ms:.0f} ms", f"{n / pre_ms * 1e3:.0f} tok/s",
                 f"{achieved / 1e9:.1f} GFLOP/s = {achieved / prefill_flops:.0%} of {prefill_dtype} matmul"))
    print(rows[-1], flush=True)
    results["prefill_len"] = n
    results["prefill_ms"] = pre_ms
    results["prefill_fraction_of_matmul"] = achieved / prefill_flops

    if not args.skip_hf and not args.shape:
        weights = load_model_files(args.model).weights
        hf = hf_decode_tokens_per_s(loaded, weights, args.prompt_len, 33)
        ours = 1e3 / decode[1] if 1 in decode else float("nan")
        rows.append(("transformers decode batch 1", f"{1e3 / hf:.1f} ms/token", f"{hf:.1f} tok/s",
                     f"tokenworks {ours:.1f} tok/s = {ours / hf:.2f}x"))
        print(rows[-1], flush=True)
        results["hf_decode_tok_s"] = hf
        results["speedup_vs_hf"] = ours / hf

    if args.baseline == "llama-cpp" and not args.shape:
        from tokenworks.model.weights import resolve_model_path

        path = resolve_model_path(args.model)
        lc = llama_cpp(path, torch.get_num_threads(), args.prompt_len, prefill_len) if path.endswith(".gguf") else None
        if lc is not None:
            lc.decode_ms(8)  # warm
            # This machine's steal time moves both engines by tens of percent within minutes: each round times
            # ours (one sequence, and 32 when asked) then llama.cpp's one sequence, and each ratio is the median
            # of the rounds'. Each engine's threads spin for a while after its last step (OpenMP's, ggml's): a
            # pause before each timing lets the other's go idle.
            rounds = []
            for _ in range(args.paired_rounds):
                time.sleep(1.0)
                ours = [decode_ms(engine, b, args.prompt_len, args.steps, "paired") for b in (1, 32) if b in decode]
                time.sleep(1.0)
                rounds.append((*ours, lc.decode_ms(args.steps)))
            ratio1 = statistics.median(r[-1] / r[0] for r in rounds)
            lc_ms = statistics.median(r[-1] for r in rounds)
            lc_pre = lc.prefill_ms(3)
            results["llama_cpp"] = {"decode_ms": lc_ms, "decode_tok_s": 1e3 / lc_ms, "prefill_ms": lc_pre,
                                    "paired_rounds_ms": rounds, "batch1_ratio": ratio1}
            added = [("llama.cpp decode, 1 sequence", f"{lc_ms:.1f} ms/token", f"{1e3 / lc_ms:.1f} tok/s",
                      f"tokenworks batch 1 {ratio1:.2f}x (target >= 1.0)"),
                     ("  rounds, ours / llama.cpp", "", "",
                      " ".join(f"{r[0]:.1f}/{r[-1]:.1f}" for r in rounds) + " ms (ratio: median of the rounds')")]
            if 32 in decode:
                ratio32 = statistics.median(32 * r[-1] / r[1] for r in rounds)
                results["llama_cpp"]["batch32_ratio"] = ratio32
                added.append(("  vs tokenworks batch 32", "", f"{32e3 / statistics.median(r[1] for r in rounds):.0f} tok/s",
                              f"{ratio32:.2f}x llama.cpp's single stream (target >= 3; rounds: "
                              + " ".join(f"{r[1]:.0f}" for r in rounds) + " ms/step)"))
            added.append((f"llama.cpp prefill {prefill_len}", f"{lc_pre:.0f} ms", "",
                          f"tokenworks {lc_pre / pre_ms:.2f}x (target >= 1.0)"))
            for r in added:
                print(r, flush=True)
            rows += added

    print()
    print(f"{'what':<30}{'time':>16}{'rate':>14}   vs baseline")
    for r in rows:
        print(f"{r[0]:<30}{r[1]:>16}{r[2]:>14}   {r[3]}")
    if floors:
        print("\nengine / floor throughput: " + ", ".join(f"batch {b} {floors[b] / decode[b]:.2f}x" for b in floors))
    if 1 in decode and 32 in decode:
        ratio = (32 / decode[32]) / (1 / decode[1])
        results["batch32_over_batch1_throughput"] = ratio
        print(f"\nbatch-32 decode throughput / batch-1: {ratio:.1f}x")
        if not cuda:
            bound = (32 * 2 * model.num_parameters / flops) * 1e3
            print(f"(batch 32 needs {32 * 2 * model.num_parameters / 1e9:.1f} GFLOP per step = {bound:.0f} ms at the "
                  f"measured matmul rate, so this CPU caps the ratio near {32 * (weight_bytes / bw * 1e3) / bound:.1f}x "
                  "when batch 1 runs at its roofline)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
