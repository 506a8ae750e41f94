"""The converted copy of a GGUF file fills in as it is needed, and what it holds equals a direct conversion."""

import os

import pytest
import torch
from safetensors import safe_open

from tokenworks.model.weights import (_load_gguf, gguf_quantized_weights, load_model_files, load_tokenizer_files,
                                      resolve_model_path)


@pytest.mark.slow
def test_copy_fills_in_tokenizer_first_then_the_float_weights_a_worker_needs_then_the_rest(tmp_path):
    cache = str(tmp_path)
    files = load_tokenizer_files(cache_dir=cache)  # the router: config and tokenizer, no weights converted
    (folder,) = [os.path.join(cache, d) for d in os.listdir(cache)]
    assert sorted(os.listdir(folder)) == ["tokenizer.json", "tokenworks.json"]
    assert files.weights == {} and len(files.tensor_names) == 272

    with open(os.path.join(folder, "q4.safetensors"), "wb") as f:  # what an older version left there
        f.write(b"stale")
    q4 = gguf_quantized_weights(resolve_model_path(None), files.config, cache)  # a worker running GGUF's blocks
    assert "q4.safetensors" not in os.listdir(folder) and "quantized.safetensors" in os.listdir(folder)
    worker = load_model_files(cache_dir=cache, skip=frozenset(q4))
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert stored == set(worker.weights) and not stored & set(q4) and len(stored) == 272 - len(q4)

    full = load_model_files(cache_dir=cache)  # --quantization none: the rest converted, the copy complete
    assert set(full.weights) == set(files.tensor_names)
    direct = _load_gguf(resolve_model_path(None)).weights
    for name in ("model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.weight", "model.norm.weight",
                 "model.layers.29.mlp.down_proj.weight"):
        assert torch.equal(full.weights[name], direct[name]), name
    # the Q8_0 embedding kept as its blocks decodes to gguf's own float32 values, bit for bit
    assert len(q4) == 211 and torch.equal(q4["model.embed_tokens.weight"].dequantize(), direct["model.embed_tokens.weight"])
    again = load_model_files(cache_dir=cache, skip=frozenset(q4))  # nothing left to convert
    assert set(again.weights) == stored
