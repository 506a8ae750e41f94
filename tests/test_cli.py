"""`tokenworks generate` on the real default model, as a newcomer first runs it: a question answered with --chat,
and never an empty line without a word of why."""

import subprocess
import sys


def generate(*args):
    r = subprocess.run([sys.executable, "-m", "tokenworks.cli", "generate", *args, "--max-tokens", "24"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout, r.stderr


def test_generate_answers_a_question_with_chat_and_says_why_when_a_bare_prompt_gives_nothing():
    out, err = generate("What is the capital of France?", "--chat")
    assert "Paris" in out and "finish_reason=" in err and "add --chat" not in err
    out, err = generate("What is the capital of France?")  # the bare question: this model ends it at once here
    hint = "this model has a chat template, so for an answer to a question or an instruction add --chat"
    assert (hint in err) == (not out.strip()), (out, err)
    out, err = generate("The capital of France is")  # a text to continue: text, and no hint
    assert out.strip() and hint not in err
