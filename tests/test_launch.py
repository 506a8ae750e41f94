"""Launchers' shared parts without a model: deployment files (validation, plan -> file -> counts), Ray resource
flags, and the one-line errors of `serve` for bad deployment files and unreachable Ray clusters."""

import json
import socket
import subprocess
import sys

import pytest

from tokenworks.launch import deployment as D
from tokenworks.launch.launcher import next_worker_id
from tokenworks.launch.ray import parse_resources
from tokenworks.planner.catalog import load_catalog


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def serve(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "tokenworks.cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout)


GOOD = """\
version: 1
pools:
  - role: prefill
    workers: 1
    hardware: CPU-EPYC-1core
    units_per_worker: 2
    resources: {CPU: 2, prefill_node: 1}
    engine: {max_num_batched_tokens: 2048}
  - role: decode
    workers: 2
    resources: {CPU: 1}
local_prefill_threshold: 32
slo: {ttft_ms: 500}
"""


def test_a_deployment_file_round_trips_in_yaml_and_json(tmp_path):
    spec = D.load(write(tmp_path, "d.yaml", GOOD))
    assert [(p.role, p.workers) for p in spec.pools] == [("prefill", 1), ("decode", 2)]
    assert spec.count("decode") == 2 and spec.count("aggregated") == 0 and spec.local_prefill_threshold == 32
    assert spec.pools[0].resources == {"CPU": 2.0, "prefill_node": 1.0}
    assert spec.pools[0].engine == {"max_num_batched_tokens": 2048}
    for name in ("again.json", "again.yml"):
        D.save(spec, str(tmp_path / name))
        assert D.load(str(tmp_path / name)) == spec


@pytest.mark.parametrize("text,says", [
    ("pools:\n  - role: decode\n    workers: 1\n    colour: red\n", "unknown field `colour`"),
    ("pools:\n  - role: decode\n    workers: 1\nextra: 1\n", "unknown field `extra`"),
    ("pools:\n  - role: cook\n    workers: 1\n", "Invalid enum value 'cook'"),
    ("pools:\n  - role: decode\n    workers: -1\n", "workers must be 0 or more"),
    ("pools:\n  - role: prefill\n    workers: 2\n", "at least one decode or aggregated worker"),
    ("pools:\n  - role: decode\n    workers: 0\n", "at least one decode or aggregated worker"),
    ("pools:\n  - role: decode\n    workers: 1\n    units_per_worker: 0\n", "units_per_worker must be 1 or more"),
    ("pools:\n  - role: decode\n    workers: 1\n    hardware: TPU-v9\n", "hardware 'TPU-v9' is not a kind"),
    ("pools:\n  - role: decode\n    workers: 1\n    engine: {block_sise: 8}\n", "unknown engine flag(s) block_sise"),
    ("pools:\n  - role: decode\n    workers: 1\n    engine: {block_size: big}\n", "Expected `int`, got `str`"),
    ("pools:\n  - role: decode\n    workers: 1\n    engine: {model: x}\n", "model cannot differ between pools"),
    ("pools:\n  - role: decode\n    workers: 1\n    resources: {GPU: -1}\n", "must not be negative"),
    ("version: 2\npools:\n  - role: decode\n    workers: 1\n", "version 2 is not supported"),
    ("pools: [\n", "deployment"),
])
def test_bad_deployment_files_get_one_line_naming_the_problem(tmp_path, text, says):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ValueError) as e:
        D.load(path)
    assert says in str(e.value) and str(e.value).startswith(f"deployment {path}:")


def test_serve_refuses_a_bad_deployment_file_with_one_line(tmp_path):
    r = serve("--deployment", write(tmp_path, "bad.yaml", "pools:\n  - role: decode\n    workers: 1\n    hardware: x\n"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "hardware 'x' is not a kind" in lines[0], r.stderr
    r = serve("--deployment", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "No such file" in r.stderr and "Traceback" not in r.stderr
    r = serve("--deployment", write(tmp_path, "ok.yaml", GOOD), "--decode-workers", "3")
    assert r.returncode == 2 and "--deployment gives the worker counts" in r.stderr


def test_serve_refuses_an_unreachable_ray_cluster_with_one_line():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = serve("--ray", f"127.0.0.1:{port}", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in r.stderr.strip().splitlines()[-1]
    r = serve("--ray", "headnode", timeout=120)
    assert r.returncode == 2 and "HOST:PORT" in r.stderr


def test_serve_on_ray_without_ray_installed_says_how_to_install_it():
    code = ("import sys; sys.modules['ray'] = None; from tokenworks.cli import main; "  # `import ray` now fails
            "sys.exit(main(['serve', '--ray', '--port', '0']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "pip install 'tokenworks[ray]'" in r.stderr.strip().splitlines()[-1]


def test_resource_flags_parse_and_refuse_nonsense():
    assert parse_resources("CPU=2,GPU=1,decode_node", "--x") == {"CPU": 2.0, "GPU": 1.0, "decode_node": 1.0}
    assert parse_resources(None, "--x") == {}
    for bad in ("CPU=two", "=1", "GPU=-1"):
        with pytest.raises(ValueError, match="--decode-resources"):
            parse_resources(bad, "--decode-resources")


def test_worker_names_take_the_first_free_number():
    assert next_worker_id("decode", {"decode-0", "decode-2"}) == "decode-1"
    assert next_worker_id("both", set()) == "agg-0"


def test_a_planned_layout_becomes_a_deployment_with_its_counts_and_resources(tmp_path):
    from tokenworks.bench.metrics import SLO
    from tokenworks.planner.planner import Candidate

    catalog = load_catalog()
    cand = Candidate("disaggregated", [("prefill", 2, "H100-SXM-80GB", 1), ("decode", 3, "CPU-EPYC-1core", 4)],
                     deployment=None, price_per_hour=10.0, units=14)
    spec = D.from_candidate(cand, catalog, SLO(ttft=0.5, tpot=0.05), 16, {"rate_req_s": 4})
    path = str(tmp_path / "plan.yaml")
    D.save(spec, path)
    back = D.load(path)
    assert [(p.role, p.workers, p.hardware, p.resources) for p in back.pools] == [
        ("prefill", 2, "H100-SXM-80GB", {"GPU": 1.0}), ("decode", 3, "CPU-EPYC-1core", {"CPU": 4.0})]
    assert back.slo == {"ttft_ms": 500.0, "tpot_ms": 50.0} and back.plan == {"rate_req_s": 4}


def test_plan_emit_deployment_writes_what_it_printed(tmp_path):
    """`plan --emit-deployment` on a profile of the catalog's CPU kind: the file holds the top candidate's pools."""
    from tests.test_planner import make_profile

    prof = make_profile("CPU-EPYC-1core")
    prof_path = tmp_path / "p.json"
    prof.save(str(prof_path))
    out = tmp_path / "deploy.json"
    r = subprocess.run([sys.executable, "-m", "tokenworks.cli", "plan", "--profile", str(prof_path), "--rates", "1,2",
                        "--hardware", "CPU-EPYC-1core", "--input-len", "uniform:20:200", "--output-len", "uniform:8:32",
                        "--slo-ttft-ms", "3000", "--slo-tpot-ms", "500", "--sim-requests", "300", "--top", "1", "--json",
                        "--kv-host-memory-gib", "2", "--kv-cache-memory-gib", "0.5", "--emit-deployment", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    best = json.loads(r.stdout)[-1]["candidates"][0]  # the highest rate's best
    spec = D.load(str(out))
    assert [(p.role if p.role != "aggregated" else "both", p.workers, p.hardware) for p in spec.pools] == \
        [(p["role"], p["workers"], p["hardware"]) for p in best["pools"]]
    assert all(p.engine == {"kv_cache_memory_gib": 0.5, "kv_host_memory_gib": 2.0} for p in spec.pools)  # as planned
    assert spec.plan["rate_req_s"] == 2 and spec.slo == {"ttft_ms": 3000.0, "tpot_ms": 500.0}
