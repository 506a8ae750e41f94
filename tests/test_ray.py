"""`tokenworks serve --ray` on a real Ray cluster of two nodes on this machine (Ray's own cluster utility starts
and stops them): the prefill worker on the node that offers `prefill_node`, the decode worker on the one that
offers `decode_node`, the default model, the real `openai` client."""

import asyncio
import os
import signal
import time

import httpx
import openai
import pytest
from ray.cluster_utils import Cluster

from tests.serving import Server
from tokenworks import SamplingParams

pytestmark = pytest.mark.slow

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "Write a long story about a lighthouse keeper and the sea, the storms and the ships."


@pytest.fixture(scope="module")
def ray_cluster():
    store = 80 * 2**20
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "resources": {"prefill_node": 2},
                                                      "include_dashboard": False, "object_store_memory": store})
    decode_node = c.add_node(num_cpus=4, resources={"decode_node": 4}, object_store_memory=store)
    c.wait_for_nodes()
    yield c, {"prefill_node": c.head_node.node_id, "decode_node": decode_node.node_id}
    c.shutdown()


@pytest.fixture(scope="module")
def server(ray_cluster):
    # float32 weights, as in the fault tests: a request that fails over goes on exactly where it was.
    s = Server("--ray", ray_cluster[0].address, "--prefill-workers", "1", "--decode-workers", "1",
               "--prefill-resources", "CPU=1,prefill_node=1", "--decode-resources", "CPU=1,decode_node=1",
               "--kv-transport", "tcp", "--quantization", "none", "--local-prefill-threshold", "4", "--api-key", KEY,
               startup_timeout=240)
    yield s
    s.stop()


def admin(server) -> dict:
    return httpx.get(server.url + "/admin/workers", headers=AUTH, timeout=10).json()["workers"]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=180)


def greedy_offline(llm, prompt, n):
    return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0].text


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_each_pool_lands_on_its_node_and_greedy_output_equals_the_engines(server, ray_cluster, llm):
    nodes = ray_cluster[1]
    workers = admin(server)
    assert workers["prefill-0"]["node"] == nodes["prefill_node"]
    assert workers["decode-0"]["node"] == nodes["decode_node"]
    r = client(server).completions.create(model="default", prompt=PROMPT, max_tokens=24, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert r.choices[0].text == greedy_offline(llm, PROMPT, 24)
    # the prompt went through the prefill worker and its KV from one node's worker to the other's
    assert server.metric("tokenworks:kv_transfer_bytes_total") > 0
    server.wait_idle(20)


def test_decode_worker_killed_mid_stream_the_stream_goes_on(server, llm):
    expected = greedy_offline(llm, PROMPT, 60)
    stream = client(server).completions.create(model="default", prompt=PROMPT, max_tokens=60, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
    text, killed, seen_at = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
        if killed is None and len(text) > 20:
            busy = [w for w in server.workers().values() if w["role"] == "decode" and w.get("running")]
            if busy:
                deaths = server.metric("tokenworks:worker_deaths_total")
                killed = busy[0]["pid"]
                os.kill(killed, signal.SIGKILL)
                t_kill = time.monotonic()
                while server.metric("tokenworks:worker_deaths_total") == deaths and time.monotonic() - t_kill < 10:
                    time.sleep(0.02)
                seen_at = time.monotonic() - t_kill
    assert killed is not None, "no decode worker was seen running the request"
    assert text == expected  # one continuous stream: nothing repeated, nothing lost
    assert seen_at is not None and seen_at < 1.0, f"the death was seen after {seen_at} s"
    # Ray places the new worker on the decode node again, and the router takes it back.
    wait_for(lambda: all(w["alive"] and w["pid"] != killed for w in server.workers().values()), 120, "restart")
    server.wait_idle(20)


def test_a_drained_worker_finishes_its_requests_then_leaves(server, ray_cluster):
    r = httpx.post(server.url + "/admin/workers", headers=AUTH, json={"action": "add", "role": "decode"}, timeout=300)
    assert r.status_code == 200, r.text
    added = r.json()["added"]
    assert r.json()["workers"][added]["node"] == ray_cluster[1]["decode_node"]

    async def main():
        async with httpx.AsyncClient(timeout=180, headers=AUTH) as c:
            bodies = [{"prompt": f"{i} {PROMPT}", "max_tokens": 40, "ignore_eos": True} for i in range(4)]
            tasks = [asyncio.create_task(c.post(server.url + "/v1/completions", json=b)) for b in bodies]
            async with asyncio.timeout(120):  # wait until the new worker holds a request, then take it out
                while not server.workers().get(added, {}).get("running"):
                    await asyncio.sleep(0.05)
            removal = await c.post(server.url + "/admin/workers", json={"action": "remove", "worker_id": added})
            return removal, await asyncio.gather(*tasks)

    removal, results = asyncio.run(main())
    assert removal.status_code == 200, removal.text
    assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40 for r in results)
    assert added not in admin(server) and added not in server.workers()
    refused = httpx.post(server.url + "/admin/workers", headers=AUTH, json={"action": "remove", "worker_id": "decode-0"})
    assert refused.status_code == 409 and "last decode-capable worker" in refused.json()["error"]["message"]
    assert httpx.get(server.url + "/admin/workers", timeout=10).status_code == 401  # behind the API key
    server.wait_idle(20)


def test_a_deployment_file_starts_its_counts_on_ray(ray_cluster, tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text("version: 1\npools:\n"
                    "  - {role: prefill, workers: 1, resources: {CPU: 1, prefill_node: 1}}\n"
                    "  - {role: decode, workers: 2, resources: {CPU: 1, decode_node: 1},"
                    " engine: {max_num_seqs: 8, kv_cache_memory_gib: 0.1}}\n")
    s = Server("--ray", ray_cluster[0].address, "--deployment", str(path), "--kv-transport", "tcp", "--api-key", KEY,
               startup_timeout=240)
    try:
        workers = admin(s)
        assert sorted(workers) == ["decode-0", "decode-1", "prefill-0"]
        assert {w["node"] for k, w in workers.items() if k.startswith("decode")} == {ray_cluster[1]["decode_node"]}
        assert "layout: 1 prefill + 2 decode (from" in s.output()
        r = client(s).completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        s.stop()


def test_a_node_that_leaves_takes_its_worker_and_the_stream_goes_on(server, ray_cluster, llm):
    """Last here: it removes the decode node. A third node offering `decode_node` joins first; when the decode
    worker's node leaves, the router is told at once and the worker starts again on the new node."""
    cluster, nodes = ray_cluster
    joined = cluster.add_node(num_cpus=4, resources={"decode_node": 4}, object_store_memory=80 * 2**20)
    cluster.wait_for_nodes()
    leaving = next(n for n in cluster.worker_nodes if n.node_id == nodes["decode_node"])
    assert admin(server)["decode-0"]["node"] == nodes["decode_node"]
    expected = greedy_offline(llm, PROMPT, 60)
    stream = client(server).completions.create(model="default", prompt=PROMPT, max_tokens=60, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
    text, removed = "", False
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
        if not removed and len(text) > 20:
            cluster.remove_node(leaving)  # its raylet and every process of the node end
            removed = True
    assert removed and text == expected
    wait_for(lambda: admin(server)["decode-0"]["node"] == joined.node_id and
             all(w["alive"] for w in server.workers().values()), 120, "the worker on the new node")
    assert server.metric("tokenworks:worker_deaths_total") >= 2  # the SIGKILL above, and this
