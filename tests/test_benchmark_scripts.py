"""The benchmarks the prepared device run calls (benchmarks/gpu_issues.sh), run here on the CPU, small, with the
flags that script gives them: a device is lent rarely and for minutes, so a renamed flag, a figure no longer
written or a run that fails must show here, not there. Each test checks the figures the device run reads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script: str, *args: str, timeout: float = 240) -> str:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_gpu_issues_script_still_calls_these_benchmarks_with_these_flags():
    """If the device script changes its calls, the tests below must follow it."""
    text = open(os.path.join(ROOT, "benchmarks", "gpu_issues.sh")).read()
    assert "benchmarks/engine.py --shape smollm2-135m --device cuda --json" in text
    assert "benchmarks/engine.py --shape llama-3.1-8b --device cuda --batches 1,32 --steps 12" in text
    assert "--skip-floor --long-context 0 --json" in text
    assert "benchmarks/serving_path.py --model /tmp/rand-smollm2 --device cuda" in text
    assert "--concurrency 1,16,64 --output-len 128 --rounds 1 --min-requests 4 --json" in text
    assert "benchmarks/router_path.py --model /tmp/rand-smollm2 --concurrency 64 --output-len 128 --rounds 1" in text


@pytest.mark.slow
def test_engine_benchmark_writes_every_figure_the_device_run_reads(tmp_path):
    out = tmp_path / "smollm2.json"
    text = run("engine.py", "--shape", "smollm2-135m", "--device", "cpu", "--batches", "1,2", "--steps", "2",
               "--prompt-len", "16", "--prefill-len", "16", "--long-context", "64", "--skip-hf",
               "--overlap-schedule", "on", "--json", str(out))
    r = json.loads(out.read_text())
    assert r["shape"] == "smollm2-135m" and r["parameters"] > 1e8
    for key in ("decode_ms_per_step", "floor_ms_per_step", "decode_ms_per_step_not_overlapped"):
        assert sorted(r[key]) == ["1", "2"] and all(v > 0 for v in r[key].values()), key
    case = r["long_context_case"]
    assert case["long"] == 64 and all(case[k] > 0 for k in ("all_short", "one_long", "all_long"))
    assert r["prefill_ms"] > 0
    assert re.search(r"engine / floor throughput: batch 1 [\d.]+x, batch 2 [\d.]+x", text)
    # The 8B step's flags (that shape does not fit a CPU test): no floor, no long-context case.
    out8 = tmp_path / "skip.json"
    run("engine.py", "--shape", "smollm2-135m", "--device", "cpu", "--batches", "1", "--steps", "2",
        "--prefill-len", "16", "--skip-floor", "--long-context", "0", "--skip-hf", "--json", str(out8))
    r8 = json.loads(out8.read_text())
    assert list(r8["decode_ms_per_step"]) == ["1"] and "long_context_case" not in r8


@pytest.mark.slow
def test_router_path_prints_cpu_per_token_and_the_delivered_rate():
    text = run("router_path.py", "--concurrency", "4", "--output-len", "8", "--rounds", "1", "--step", "0.01",
               "--client-processes", "2")
    cpu = re.search(r"router CPU (\d+) us/token .* bare uvicorn floor (\d+)", text)
    rate = re.search(r"tokens/s delivered: router (\d+) .* bare floor (\d+); offered 400 .* 2 client process", text)
    assert cpu and rate, text
    assert int(cpu.group(1)) > 0 and int(rate.group(1)) > 0


@pytest.mark.slow
def test_serving_path_compares_the_server_with_its_engine(tmp_path):
    out = tmp_path / "serving_path.json"
    text = run("serving_path.py", "--device", "cpu", "--concurrency", "1,2", "--output-len", "4", "--rounds", "1",
               "--json", str(out), timeout=400)
    r = json.loads(out.read_text())
    (round_,) = r["rounds"]
    assert sorted(round_["offline"]) == ["1", "2"] and all(v > 0 for v in round_["offline"].values())
    assert all(s["failed"] == 0 and s["tokens_s"] > 0 for s in round_["served"].values())
    assert sorted(r["bare_floor_us_per_token"]) == ["1", "2"]
    assert "1 rounds of 16, 16 requests" in text  # --min-requests: 16 waves at one stream, 8 at two
    assert re.search(r"one stream: served token gap [\d.]+ ms, engine batch-1 step [\d.]+ ms, ratio [\d.]+", text)


@pytest.mark.slow
def test_sampling_benchmark_prints_each_way_against_greedy_and_the_old_draws():
    text = run("sampling.py", "--streams", "1", "--tokens", "4", "--rounds", "1", "--rows", "2")
    assert re.search(r"sampled now / before: [\d.]+x", text)
    for way in ("greedy", "sampled T=1", "sampled, JSON schema", "sampled, logit_bias x20"):
        assert re.search(rf"  {re.escape(way)} +[\d.]+  \([\d.]+x\)", text), way


def test_batch_products_benchmark_prints_each_way_against_the_tiles():
    from tokenworks.model import cpu_native

    if not (cpu_native.bf16_available() or cpu_native.amx_available()):
        pytest.skip("this CPU has neither AVX512-BF16 nor AMX: the benchmark has nothing to compare")
    text = run("batch_products.py", "--batches", "4", "--rounds", "1", "--steps", "3", "--context", "16")
    line = re.search(r"decode batch +4: int16 tiles +[\d.]+ ms;(.*)", text)
    assert line and re.search(r"(avx512-bf16|amx) +[\d.]+ ms \([\d.]+x\)", line.group(1)), text


def test_speculative_benchmark_prints_each_task_against_plain_decoding():
    text = run("speculative.py", "--k", "2", "--rounds", "1", "--max-tokens", "12")
    assert re.search(r"K=2: geometric mean of the tasks' ratios to K=0: [\d.]+x", text), text
    for task in ("repeat", "code edit", "summary", "json", "free answer"):
        assert re.search(rf"{task} +2 +\d+ +[\d.]+ +[\d.]+x .* (same|DIFFERS)", text), task


@pytest.mark.slow
def test_prefill_cap_benchmark_prints_each_figure_with_the_cap_against_none():
    text = run("prefill_cap.py", "--concurrency", "2", "--rounds", "1", "--requests-per-stream", "2",
               "--long-prompt", "60", timeout=400)
    for case in ("2 streams", "1 x 60 words"):
        assert re.search(rf"{case} +TTFT p50 ms [\d.]+ -> [\d.]+ \([\d.]+x\); .*ITL p99 ms [\d.]+ -> [\d.]+ "
                         rf"\([\d.]+x\); tok/s [\d.]+ -> [\d.]+ \([\d.]+x\)", text), (case, text)
