"""The asynchronous streaming interface on the real default model."""

import asyncio

import pytest

from tokenworks import AsyncLLM, SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def async_llm():
    engine = AsyncLLM(dtype="float32")
    yield engine
    engine.shutdown()


async def collect(engine, prompt, params, **kw):
    outs = []
    async for out in engine.generate(prompt, params, **kw):
        outs.append(out)
    return outs


def test_concurrent_streams_match_offline_greedy(async_llm, llm):
    prompts = ["The capital of France is", "List three colors:", "def add(a, b):"]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(prompts, params)]

    async def main():
        return await asyncio.gather(*(collect(async_llm, p, params) for p in prompts))

    results = asyncio.run(main())
    for outs, exp in zip(results, expected):
        assert [t for o in outs for t in o.new_token_ids] == exp
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert "".join(o.new_text for o in outs) == outs[-1].text


def test_leaving_early_aborts_and_frees_blocks(async_llm):
    async def main():
        gen = async_llm.generate("Tell me a long story.", SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
        got = 0
        async for _ in gen:
            got += 1
            if got == 3:
                break
        await gen.aclose()
        for _ in range(100):  # the engine thread handles the abort between steps
            if async_llm.loaded.pool.num_used_blocks == 0 and not async_llm.engine.has_unfinished():
                return got
            await asyncio.sleep(0.02)
        return got

    assert asyncio.run(main()) == 3
    assert async_llm.loaded.pool.num_used_blocks == 0


def test_bad_input_raises_and_engine_keeps_serving(async_llm):
    async def main():
        with pytest.raises(ValueError):
            await collect(async_llm, [], SamplingParams())
        return await collect(async_llm, "Hi", SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))

    outs = asyncio.run(main())
    assert len(outs) == 2
