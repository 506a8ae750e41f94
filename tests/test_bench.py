"""The load generator and report against a stub server with known timings, parsers on the shipped samples."""

import asyncio
import importlib.resources
import json
import os

import pytest

from tests.stub_server import StubServer
from tokenworks.bench import workloads as W
from tokenworks.bench.loadgen import Load, arrival_times, drive, run_load
from tokenworks.bench.metrics import NOT_SENT, SLO, goodput, summarize

SAMPLES = importlib.resources.files("tokenworks.bench") / "samples"


def run(url, reqs, load, **kw):
    return asyncio.run(run_load(url, reqs, load, **kw))


@pytest.fixture(scope="module")
def stub():
    s = StubServer(ttft=0.10, itl=0.02)
    yield s
    s.stop()


def test_metrics_match_the_stub_delays(stub):
    reqs = [W.BenchRequest(f"hello {i}", 6) for i in range(6)]
    results, wall = run(stub.url, reqs, Load(concurrency=3))
    assert all(r.ok for r in results), [r.error for r in results]
    s = summarize(results, wall, SLO())
    assert s["completed"] == 6 and s["output_tokens"] == 36
    assert s["ttft_s"]["median"] == pytest.approx(0.10, abs=0.03)
    assert s["itl_s"]["median"] == pytest.approx(0.02, abs=0.01)
    assert s["tpot_s"]["median"] == pytest.approx(0.02, abs=0.01)
    assert s["e2e_s"]["median"] == pytest.approx(0.10 + 5 * 0.02, abs=0.04)
    assert all(len(r.itls) == 5 for r in results)


def test_prompt_tokens_the_server_found_cached_are_summed_and_reported(stub):
    from tokenworks.bench.report import markdown

    reqs = [W.BenchRequest("CACHED a b c d e", 3) for _ in range(4)] + [W.BenchRequest("x y", 3)]
    results, wall = run(stub.url, reqs, Load(concurrency=5))
    assert [r.cached_tokens for r in results] == [3, 3, 3, 3, None]
    s = summarize(results, wall, SLO())
    assert s["input_tokens"] == 26 and s["cached_prompt_tokens"] == 12
    assert "| prefix cache | 12 of 26 prompt tokens cached (46%) |" in markdown("t", {"s": [("1", s)]}, {}, [])
    plain, wall = run(stub.url, reqs[4:], Load(concurrency=1))  # a server that does not say: not zero, unknown
    s = summarize(plain, wall, SLO())
    assert s["cached_prompt_tokens"] is None and "prefix cache" not in markdown("t", {"s": [("1", s)]}, {}, [])


def test_goodput_from_a_server_of_known_capacity():
    # Serial stub: each request holds it ~0.1 s (TTFT 0.05 s + 5 gaps of 0.01 s): capacity ~10 req/s.
    s = StubServer(ttft=0.05, itl=0.01, serial=True)
    try:
        reqs = [W.BenchRequest(f"q {i}", 6) for i in range(20)]  # at 0.9 attainment, room for 2 hiccups
        slo = SLO(ttft=0.4)  # at 2 req/s a request rarely waits; at 40 req/s request k waits ~0.075 k s
        run(s.url, reqs[:2], Load(concurrency=1))  # first-request costs (connections, imports) out of the way
        sweep = []
        for rate in (2.0, 40.0):
            results, wall = run(s.url, reqs, Load(rate=rate, seed=1))
            sweep.append((rate, summarize(results, wall, slo)))
        low, high = sweep[0][1], sweep[1][1]
        assert low["slo_attainment"] >= 0.9
        assert high["slo_attainment"] < 0.5  # 20 requests in ~0.5 s queue for ~2 s
        assert goodput(sweep, 0.9) == 2.0
    finally:
        s.stop()


def test_the_client_keeps_its_connections():
    """Each stream is read to its end, so its connection goes back to the pool: a closed loop of 3 opens 3
    connections for 12 requests (it opened one per request when it stopped reading at [DONE])."""
    s = StubServer(ttft=0.01, itl=0.005)
    try:
        results, _ = run(s.url, [W.BenchRequest(f"hello {i}", 3) for i in range(12)], Load(concurrency=3))
        assert all(r.ok for r in results), [r.error for r in results]
        assert len(s.client_ports) <= 3, s.client_ports
    finally:
        s.stop()


def test_errors_are_reported_per_request_and_never_crash_the_run(stub):
    reqs = [W.BenchRequest("fine", 3), W.BenchRequest("FAIL500 please", 3), W.BenchRequest("CLOSE early", 5)]
    results, wall = run(stub.url, reqs, Load(concurrency=3))
    assert results[0].ok
    assert results[1].error.startswith("HTTP 500")
    assert results[2].error == "stream closed before [DONE]"
    s = summarize(results, wall, SLO(ttft=10))
    assert s["failed"] == 2 and s["slo_attainment"] == pytest.approx(1 / 3)
    dead, _ = run("http://127.0.0.1:9", [W.BenchRequest("x", 2)], Load(concurrency=1), timeout=3)
    assert not dead[0].ok and "Connect" in dead[0].error


def test_a_closed_loop_user_refused_with_retry_after_waits_before_its_next_request(stub):
    """A cold server refuses past its first few requests (429, Retry-After): a closed loop that sent the next
    request at once ran through all 40 of a run in the time the refusals took (4 served, 36 refused)."""
    reqs = [W.BenchRequest("BUSY now", 3), W.BenchRequest("fine", 3), W.BenchRequest("fine too", 3)]
    results, wall = run(stub.url, reqs, Load(concurrency=1))
    assert results[0].error.startswith("HTTP 429") and results[0].retry_after == 1.0
    assert results[1].ok and results[2].ok and results[1].retry_after is None
    assert results[1].start - results[0].start >= 0.95  # it waited the second it was told
    # the wait never outlasts the run's time limit: the rest are then not sent
    cut, wall = run(stub.url, [W.BenchRequest("BUSY", 3), W.BenchRequest("fine", 3)], Load(concurrency=1),
                    max_duration=0.3)
    assert wall < 0.9 and not cut[1].ok and cut[1].error.startswith(NOT_SENT)


def test_the_summary_line_says_how_the_unfinished_requests_failed(capsys):
    from tokenworks.bench.client import RequestResult
    from tokenworks.cli import _print_summary

    results = [RequestResult(index=i, scheduled=0.0, start=0.0, ttft=0.1, e2e=0.2, output_tokens=2)
               for i in range(5)]
    results[1].error = results[3].error = "HTTP 429: server is at capacity; retry in 1s"
    results[4].error = f"{NOT_SENT}: time limit reached"
    s = summarize(results, 1.0, SLO(ttft=10)) | {"load": "concurrency 2"}
    _print_summary({"runs": {"server": [s]}, "goodput": {"server": "none"}, "report": "r.md"})
    assert "done 2/4 (2 HTTP 429) (1 not sent)" in capsys.readouterr().out


def test_arrivals_are_seeded_and_have_the_asked_rate():
    a = arrival_times(4000, rate=5.0, burstiness=1.0, seed=3)
    assert a == arrival_times(4000, rate=5.0, burstiness=1.0, seed=3)
    assert len(a) / a[-1] == pytest.approx(5.0, rel=0.08)
    bursty = arrival_times(4000, rate=5.0, burstiness=0.3, seed=3)
    gaps = [y - x for x, y in zip(bursty, bursty[1:])]
    poisson_gaps = [y - x for x, y in zip(a, a[1:])]
    import statistics

    assert statistics.pstdev(gaps) > 1.3 * statistics.pstdev(poisson_gaps)


def test_length_distributions_and_synthetic_workloads():
    import random

    rng = random.Random(0)
    assert W.sample_length("fixed:7", rng) == 7 and W.sample_length("7", rng) == 7  # a bare N: fixed
    assert all(10 <= W.sample_length("uniform:10:20", rng) <= 20 for _ in range(100))
    assert W.synthetic(5, "fixed:30", "fixed:4", seed=1)[0].prompt == W.synthetic(5, "fixed:30", "fixed:4", seed=1)[0].prompt
    with pytest.raises(W.WorkloadError):
        W.sample_length("zipf:3", rng)
    shared = W.shared_prefix(20, num_prefixes=2, prefix_len=50, suffix_len="fixed:5", output_len="fixed:3", seed=0)
    prefixes = {" ".join(r.prompt.split()[:51]) for r in shared}
    assert len(prefixes) == 2
    mixed = W.mixed(200, seed=0)
    long = [r for r in mixed if r.input_tokens >= 800]
    assert 10 < len(long) < 60


def test_multi_turn_conversations_resend_their_history():
    reqs = W.multi_turn(40, turns=4, session_rate=0.5, think_time=3.0, num_prefixes=2, prefix_len=30,
                        user_len="uniform:5:10", output_len="fixed:6", seed=2)
    assert len(reqs) == 40 and all(a.arrival <= b.arrival for a, b in zip(reqs, reqs[1:]))
    sessions: dict[str, list] = {}
    for r in reqs:
        sessions.setdefault(r.prompt.split("\nUser: ")[1].split()[0][:-2], []).append(r)  # "s<k>t0" -> "s<k>"
    full = [turns for turns in sessions.values() if len(turns) == 4]
    assert len(full) >= 9
    for turns in full:
        assert [round(t.arrival - turns[0].arrival, 6) for t in turns] == [0.0, 3.0, 6.0, 9.0]
        for a, b in zip(turns, turns[1:]):  # each turn extends the previous prompt by its answer and a new message
            assert b.prompt.startswith(a.prompt) and b.input_tokens > a.input_tokens
        assert all(t.prompt.endswith("\nAssistant:") and t.max_tokens == 6 for t in turns)
    assert len({t[0].prompt.split("\n")[0] for t in full}) == 2  # two system prompts shared across sessions
    with pytest.raises(W.WorkloadError):
        W.multi_turn(4, turns=0, session_rate=1, think_time=1, num_prefixes=1, prefix_len=5, user_len="fixed:3",
                     output_len="fixed:3", seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenworks.model.weights import load_tokenizer_files
    from tokenworks.tokenizer import Tokenizer

    f = load_tokenizer_files(None)
    return Tokenizer(f.tokenizer_json, f.chat_template, f.bos_token, f.eos_token, f.add_bos_token)


def _leading_equal(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _check_blocks_match_the_text(reqs, tok):
    """The ids a workload states for the simulator say what the default model's tokenizer sees: a request's
    estimated length is its token count, it lists one id per whole block, and two prompts' leading equal ids are
    their leading equal whole blocks of tokens (no more; one fewer where the framing after a system prompt, such as
    the " q" of every question, happens to complete a block)."""
    ids = [tok.encode(r.prompt) for r in reqs]
    bt = W.BLOCK_TOKENS
    for r, t in zip(reqs, ids):
        assert r.block_tokens == bt and r.input_tokens == len(t) and len(r.prefix_blocks) == len(t) // bt
    shared = 0
    for i, (a, ta) in enumerate(zip(reqs, ids)):
        for b, tb in zip(reqs[i + 1:], ids[i + 1:]):
            same = _leading_equal(a.prefix_blocks, b.prefix_blocks)
            real = min(_leading_equal(ta, tb) // bt, len(a.prefix_blocks), len(b.prefix_blocks))
            assert real - 1 <= same <= real
            shared += same > 0
    return shared


def test_shared_prefix_prompts_state_the_blocks_they_share(tokenizer):
    reqs = W.shared_prefix(24, num_prefixes=3, prefix_len=70, suffix_len="uniform:1:40", output_len="fixed:3",
                           seed=4)
    assert _check_blocks_match_the_text(reqs, tokenizer) > 0
    heads = {r.prompt.split()[0]: r.prefix_blocks[:4] for r in reqs}  # 72 tokens of system prompt: 4 whole blocks
    assert len(heads) == 3 and len({h for h in heads.values()}) == 3
    for r in reqs:
        assert r.prefix_blocks[:4] == heads[r.prompt.split()[0]]
    tails = [b for r in reqs for b in r.prefix_blocks[4:]]
    assert tails and len(tails) == len(set(tails))  # each suffix's blocks are its own
    assert W.shared_blocks(reqs) == ([r.prefix_blocks for r in reqs], W.BLOCK_TOKENS)
    assert W.shared_blocks(W.synthetic(3, "fixed:40", "fixed:3", seed=0)) is None  # nothing shared, nothing stated


def test_multi_turn_prompts_state_the_blocks_of_their_conversation(tokenizer):
    reqs = W.multi_turn(30, turns=3, session_rate=1.0, think_time=2.0, num_prefixes=2, prefix_len=40,
                        user_len="uniform:5:30", output_len="uniform:10:40", seed=3)
    _check_blocks_match_the_text(reqs, tokenizer)
    sessions: dict[str, list] = {}
    for r in reqs:
        sessions.setdefault(r.prompt.split("\nUser: ")[1].split()[0][:-2], []).append(r)
    for turns in sessions.values():
        for a, b in zip(turns, turns[1:]):  # a later turn holds every whole block of the earlier one
            assert b.prefix_blocks[: len(a.prefix_blocks)] == a.prefix_blocks
            assert len(b.prefix_blocks) > len(a.prefix_blocks)


def test_sample_files_parse():
    sg = W.sharegpt_file(str(SAMPLES / "sharegpt.json"), None, seed=0)
    assert len(sg) == 8 and all(r.prompt and r.max_tokens >= 1 for r in sg)
    mc, problems = W.mooncake_jsonl(str(SAMPLES / "mooncake.jsonl"))
    assert len(mc) == 12 and not problems
    assert mc[0].arrival == 0.0 and all(b.arrival >= a.arrival for a, b in zip(mc, mc[1:]))
    # Requests sharing hash ids [1, 2] share their first 2 blocks of text.
    firsts = [r.prompt.split()[:1025] for i, r in enumerate(mc) if i % 3 == 0]
    assert all(f == firsts[0] for f in firsts)
    # the simulator's prefix caching reads the ids of the whole blocks in each prompt (1,049 tokens: 2 of 512)
    assert (mc[0].prefix_blocks, mc[0].block_tokens, mc[1].prefix_blocks) == ((1, 2), 512, (11,))
    az, problems = W.azure_csv(str(SAMPLES / "azure.csv"))
    assert len(az) == 12 and not problems and az[1].arrival > 0


def test_malformed_trace_lines_are_reported(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": []}\n'
                 'not json\n{"timestamp": 5}\n{"timestamp": 9, "input_length": 4, "output_length": 1}\n')
    reqs, problems = W.mooncake_jsonl(str(p))
    assert len(reqs) == 2 and [x.line for x in problems] == [2, 3]
    c = tmp_path / "bad.csv"
    c.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,10,2\nyesterday,1,1\n")
    reqs, problems = W.azure_csv(str(c))
    assert len(reqs) == 1 and problems[0].line == 3
    with pytest.raises(W.WorkloadError):
        W.azure_csv(str(p))


def test_cli_writes_the_report(stub, tmp_path):
    from tokenworks.cli import main

    out = tmp_path / "report"
    rc = main(["bench", "--url", stub.url, "--num-requests", "6", "--input-len", "fixed:10", "--output-len", "fixed:4",
               "--rates", "20,40", "--slo-ttft-ms", "500", "--out", str(out)])
    assert rc == 0
    files = set(os.listdir(out))
    assert {"summary.json", "report.md", "latency_cdf.png", "goodput.png", "itl_timeline.png"} <= files
    doc = json.loads((out / "summary.json").read_text())
    assert doc["goodput_req_s"]["server"] == 40.0
    assert len([f for f in files if f.startswith("requests-")]) == 2
    lines = (out / "requests-server-0.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["ttft"] > 0


def test_closed_loop_goodput_names_the_concurrency_and_the_measured_rate(stub, tmp_path, capsys):
    from tokenworks.cli import main

    out = tmp_path / "closed"
    rc = main(["bench", "--url", stub.url, "--num-requests", "6", "--input-len", "fixed:10", "--output-len", "fixed:4",
               "--concurrency", "1,3", "--slo-ttft-ms", "500", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "summary.json").read_text())
    best = doc["runs"]["server"][-1]
    assert doc["goodput"]["server"].startswith("concurrency 3 (")
    assert doc["goodput_req_s"]["server"] == pytest.approx(best["request_throughput"])  # a rate, not "3"
    assert doc["goodput_req_s"]["server"] != 3
    assert all(0.0 < r["client_cpu_busy"] < 1.5 for r in doc["runs"]["server"])  # measured, per load
    assert "goodput: concurrency 3 (" in capsys.readouterr().out
    assert "goodput concurrency 3 (" in (out / "report.md").read_text()


@pytest.mark.parametrize("processes", [1, 2])
def test_requests_cut_before_sending_are_not_counted_as_misses(stub, processes):
    reqs = [W.BenchRequest(f"q {i}", 4) for i in range(40)]
    results, wall = drive(stub.url, reqs, Load(rate=20.0, seed=2), processes=processes, max_duration=0.5)
    assert [r.index for r in results] == list(range(40))  # the unsent too, from every client process
    s = summarize(results, wall, SLO())
    assert s["not_sent"] > 0 and s["requests"] + s["not_sent"] == 40
    assert s["failed"] == 0 and s["errors"] == {}
    assert s["slo_attainment"] == 1.0  # no SLOs: every sent request that completed meets them


@pytest.mark.parametrize("load", [Load(concurrency=4), Load(rate=40.0, seed=4)], ids=["closed", "open"])
def test_client_processes_share_a_run_and_give_back_every_result_in_request_order(stub, load):
    """Two real client processes: each request's result comes back under its own index (the stub counts its
    prompt's words), every request ends once, progress is told for each, and the run is as long as one
    process's: the same load, not twice it."""
    reqs = [W.BenchRequest(" ".join(["w"] * (i + 1)), 3 + i % 3) for i in range(12)]
    seen: list[int] = []
    results, wall = drive(stub.url, reqs, load, processes=2, progress=lambda r: seen.append(r.index))
    assert all(r.ok for r in results), [r.error for r in results]
    assert [r.index for r in results] == list(range(12)) and sorted(seen) == list(range(12))
    assert [r.prompt_tokens for r in results] == [i + 1 for i in range(12)]
    assert [r.output_tokens for r in results] == [3 + i % 3 for i in range(12)]
    assert all(len(r.itls) == r.output_tokens - 1 for r in results)
    if load.rate:  # each request sent at the arrival time one process would have used
        times = arrival_times(12, 40.0, 1.0, 4)
        assert [r.scheduled for r in results] == times
        assert all(r.start >= t - 0.05 for r, t in zip(results, times))
    # Closed loop, 4 streams over 12 requests of ~0.16 s: three waves; open loop: the last arrival plus one request.
    assert 0.3 < wall < 3.0


def test_a_busy_load_generator_is_reported_with_what_to_do(capsys):
    from tokenworks.cli import _print_summary

    def run_summary(busy: float) -> dict:
        lat = {"median": 0.01, "p99": 0.02}
        return {"load": "concurrency 64", "completed": 64, "requests": 64, "ttft_s": lat, "itl_s": lat,
                "output_token_throughput": 9000.0, "slo_attainment": 1.0, "client_cpu_busy": busy}

    doc = {"runs": {"server": [run_summary(0.4), run_summary(0.97)]}, "goodput": {"server": "concurrency 64"},
           "report": "r.md"}
    _print_summary(doc)
    lines = capsys.readouterr().out.splitlines()
    advice = [i for i, line in enumerate(lines) if "the load generator used" in line]
    assert advice == [2] and "97% of its cores" in lines[2] and "--client-processes" in lines[2]
