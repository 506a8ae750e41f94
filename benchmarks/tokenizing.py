"""What tokenizing a request's prompt costs the router: the `tokenizers` library's encode against the segment
encoder (tokenizer.py ``SegmentEncoder``: the text between added tokens kept by its text), in one run, on the
default model's tokenizer. Three kinds of request, each prompt new to both:

- a completion's prompt (no added tokens: one piece, never seen before);
- a one-turn chat (the template's system prompt repeats; the user's text is new);
- a conversation as a chat client sends it, every turn again with all earlier turns (20 turns).

    python benchmarks/tokenizing.py [--requests 200]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + rng.choice((".", "?", "!")) + f" {rng.randint(0, 999)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="requests of each kind (default: 200)")
    ns = ap.parse_args()
    from tokenworks.model.weights import load_tokenizer_files
    from tokenworks.tokenizer import Tokenizer

    files = load_tokenizer_files(None)
    tok = Tokenizer(files.tokenizer_json, files.chat_template, files.bos_token, files.eos_token, files.add_bos_token)
    if tok._segments is None:
        print("this tokenizer does not qualify for the segment encoder")
        return 1
    rng = random.Random(0)
    completions = [sentence(rng, 40) for _ in range(ns.requests)]
    chats = [tok.apply_chat_template([{"role": "user", "content": sentence(rng, 40)}]) for _ in range(ns.requests)]
    conversations = []
    for _ in range(max(1, ns.requests // 20)):
        messages: list[dict] = []
        for _turn in range(20):
            messages.append({"role": "user", "content": sentence(rng, 30)})
            conversations.append(tok.apply_chat_template(messages))
            messages.append({"role": "assistant", "content": sentence(rng, 60)})
    library = lambda text: tok._tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    print(f"{'request kind':<34} {'tokens':>7} {'library µs':>11} {'segments µs':>12} {'ratio':>6}")
    for name, texts in (("completion prompt (new)", completions), ("one-turn chat", chats),
                        ("conversation, turn after turn", conversations)):
        times = {"library": [], "segments": []}
        for text in texts:  # alternated per request, in the order a server would see them
            for which, fn in (("library", library), ("segments", tok._segments.encode)):
                t0 = time.perf_counter()
                ids = fn(text)
                times[which].append(time.perf_counter() - t0)
            assert ids == library(text)
        lib, seg = (statistics.median(times[k]) * 1e6 for k in ("library", "segments"))
        tokens = statistics.median(len(library(t)) for t in texts)
        print(f"{name:<34} {tokens:>7.0f} {lib:>11.0f} {seg:>12.0f} {seg / lib:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
