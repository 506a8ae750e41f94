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


PIECES = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>", " ", "  ", "\n", "\n\n", "\t", "12", "3",
          "hello", " world", "Hello", "'s", "don't", "é", "e\u0301", "\u0301", "日本語", "🙂", "<|im_", "|>", "<", ">",
          "user", "assistant", "x" * 40, ".", "!?", "  \n ", "0.5", "-7"]


def test_pieces_between_added_tokens_encode_as_the_library_does(tokenizer):
    """The segment encoder (pieces between added tokens kept by their text) gives the library's own ids, on texts
    made of added tokens, partial ones, whitespace, digits, combining marks and emoji, fresh and then kept."""
    from hypothesis import given, settings, strategies as st

    assert tokenizer._segments is not None  # the default model's tokenizer qualifies

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.lists(st.sampled_from(PIECES) | st.text(max_size=6), max_size=14))
    def check(parts):
        text = "".join(parts)
        want = tokenizer._tok.encode(text, add_special_tokens=False).ids
        assert tokenizer._segments.encode(text) == want  # fresh, or kept from an earlier example
        assert tokenizer._segments.encode(text) == want  # kept

    check()


def test_a_conversation_encodes_the_same_turn_after_turn_and_keeps_its_earlier_turns(tokenizer):
    messages, seen = [], 0
    for turn in range(6):
        messages += [{"role": "user", "content": f"Question {turn}: what is {turn} + {turn * 7}?\n  Think."},
                     {"role": "assistant", "content": f"It is {turn * 8}. 🙂 Done"}]
        text = tokenizer.apply_chat_template(messages[:-1])
        assert tokenizer.encode_chat(messages[:-1]) == tokenizer._tok.encode(text, add_special_tokens=False).ids
        kept = len(tokenizer._segments._kept)
        assert kept > seen  # each turn adds its new pieces; the earlier ones are found, not added again
        seen = kept


def test_the_kept_pieces_are_bounded_by_their_characters(tokenizer):
    from tokenworks.tokenizer import SegmentEncoder

    enc = SegmentEncoder(tokenizer._tok, {"<|im_start|>": 1}, max_chars=400)
    for i in range(50):
        enc.encode(f"<|im_start|>piece number {i} " + "y" * 20)
    assert enc._chars <= 400 and enc._chars == sum(len(t) for t in enc._kept)
    assert "piece number 49 " + "y" * 20 in enc._kept and "piece number 0 " + "y" * 20 not in enc._kept


def test_tokenizers_whose_pieces_depend_on_their_place_are_encoded_whole():
    """A Metaspace pre-tokenizer (a space put before the first piece only) or an added token that strips spaces:
    the pieces are not independent, so no segment encoder; encode is the library's."""
    import json

    from tokenizers import Tokenizer as HF, models, pre_tokenizers

    hf = HF(models.BPE(vocab={"a": 0, "▁": 1, "▁a": 2, "<s>": 3}, merges=[("▁", "a")]))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    hf.add_special_tokens(["<s>"])
    assert Tokenizer(hf.to_str())._segments is None
    spec = json.loads(hf.to_str())
    spec["pre_tokenizer"] = None
    spec["added_tokens"][0]["lstrip"] = True
    assert Tokenizer(json.dumps(spec))._segments is None
    spec["added_tokens"][0]["lstrip"] = False
    tok = Tokenizer(json.dumps(spec))
    assert tok._segments is not None and tok.encode("a<s>a", add_special_tokens=False) == [0, 3, 0]
