"""Incremental detokenizer and stop-string hold-back, on the default model's tokenizer."""

import pytest

from tokenworks.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from tokenworks.model.weights import load_model_files

    files = load_model_files(None)
    return Tokenizer(files.tokenizer_json, files.chat_template, files.bos_token, files.eos_token, files.add_bos_token)


def feed(detok, ids):
    return [detok.add_token(t, final=(i == len(ids) - 1)) for i, t in enumerate(ids)]


def test_multibyte_characters_never_split(tokenizer):
    text = " naïve café 日本語 🙂🚀 done"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # some characters span several tokens
    deltas = feed(IncrementalDetokenizer(tokenizer, [1, 2]), ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_stop_string_held_back_then_cut(tokenizer):
    ids = tokenizer.encode(" alpha beta STOP gamma")
    detok = IncrementalDetokenizer(tokenizer, [1], stop=["STOP"])
    deltas = []
    for t in ids:
        deltas.append(detok.add_token(t))
        if detok.stopped:
            break
    assert detok.stopped and "".join(deltas) == " alpha beta "
    assert "ST" not in "".join(deltas)


def test_partial_stop_prefix_released_when_it_does_not_complete(tokenizer):
    ids = tokenizer.encode(" the end is near")
    detok = IncrementalDetokenizer(tokenizer, [1], stop=["end of story"])
    deltas = feed(detok, ids)
    assert not detok.stopped and "".join(deltas) == " the end is near"


def test_chat_template(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == tokenizer._tok.token_to_id("<|im_start|>")
    with pytest.raises(ValueError):
        tokenizer.apply_chat_template([])


def test_unpermute_inverts_llama_cpp_permutation():
    import torch

    from tokenworks.model.weights import unpermute_qk

    def llama_cpp_permute(w, n_head):  # as the GGUF converter writes q/k
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_qk(llama_cpp_permute(w, 3), 3), w)


def test_streamed_text_equals_decoding_the_whole_output(tokenizer):
    import random

    rng = random.Random(7)
    prompt = tokenizer.encode("The prompt says hi")
    for _ in range(5):  # random ids: broken UTF-8 sequences, special tokens, odd spacing
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(300)]
        for k in rng.sample(range(300), 6):
            ids[k] = rng.choice(sorted(tokenizer.special_token_ids))  # skipped in the text
        streamed = "".join(feed(IncrementalDetokenizer(tokenizer, prompt), ids))
        whole = tokenizer.decode(prompt[-6:] + ids)[len(tokenizer.decode(prompt[-6:])):]
        assert streamed == whole.rstrip("\ufffd")


def test_a_decoder_error_costs_no_text(tokenizer):
    ids = tokenizer.encode(" one two three four")
    detok = IncrementalDetokenizer(tokenizer, [1])

    class Failing:  # the decoder finding the text so far is not a prefix of the longer text, once
        def step(self, hf, token_id):
            raise RuntimeError("invalid prefix")

    deltas = [detok.add_token(ids[0])]
    detok._stream = Failing()
    deltas += [detok.add_token(t) for t in ids[1:]]
    assert "".join(deltas) == " one two three four"
