"""Random-weight checkpoints written here as safetensors folders, checked against transformers.

They cover the Hugging Face loading path and the variants the default
model lacks: untied embeddings, q/k/v bias (Qwen2), q/k norm (Qwen3) and
Llama 3 RoPE scaling.
"""

import json

import pytest
import torch

from tokenworks import LLM, SamplingParams

VOCAB = 300
CORPUS = ["the quick brown fox jumps over the lazy dog", "paged attention moves blocks of memory"] * 20


def write_tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<eos>",
        "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
    }))


def build(kind, folder):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, eos_token_id=0)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**common, rope_theta=10000.0)
        model = transformers.Qwen2ForCausalLM(config)
    elif kind == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=32, rope_theta=1000000.0)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
        model = transformers.LlamaForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder)
    return model


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama3-rope"])
def test_tiny_checkpoint_matches_transformers(kind, tmp_path, device):
    model = build(kind, tmp_path)
    llm = LLM(model=str(tmp_path), dtype="float32", device=device, block_size=4, max_num_batched_tokens=24)
    if kind == "qwen2":
        assert llm.loaded.model_config.attention_bias
    if kind == "qwen3":
        assert llm.loaded.model_config.qk_norm
    assert not llm.loaded.model_config.tie_word_embeddings
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (1, 3, 7, 20, 45, 90)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    with torch.inference_mode():
        for p, o in zip(prompts, outs):
            ids = torch.tensor([p])
            expected = []
            for _ in range(6):
                nxt = int(model(ids).logits[0, -1].argmax())
                expected.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            assert o.token_ids == expected, (len(p), o.token_ids, expected)
    # Text prompts go through the saved tokenizer.json; the chat template through tokenizer_config.json.
    text_out = llm.generate("the quick brown fox", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(text_out.token_ids) == 3
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<user>hi<assistant>"
    assert llm.pool.num_used_blocks == 0
