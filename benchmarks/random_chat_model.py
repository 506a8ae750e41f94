"""A random-weight model of SmolLM2-135M's shape whose tokenizer covers its whole vocabulary, for serving
tests on machines where the real checkpoint cannot be carried: the bench prompts' words are tokens, and
every id the model can emit decodes to visible text (so streaming clients see each token).

    python benchmarks/random_chat_model.py DIR
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def write(folder: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from benchmarks.engine import write_random_model
    from tokenworks.bench.workloads import WORDS

    write_random_model(folder)
    with open(os.path.join(folder, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    vocab = {"[UNK]": 0}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    tok.save(os.path.join(folder, "tokenizer.json"))
    return folder


if __name__ == "__main__":
    print(write(sys.argv[1]))
