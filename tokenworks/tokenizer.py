"""Tokenizer, chat template and incremental detokenizer.

The tokenizer itself is the `tokenizers` library's; this module builds one
from GGUF metadata when no tokenizer.json exists, renders chat templates in
a sandboxed Jinja environment, and turns a growing list of token ids into
text deltas that never end in half a UTF-8 character.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Sequence

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4
# Pre-tokenizer regexes per llama.cpp "tokenizer.ggml.pre" value (the ones whose models we support).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def tokenizer_json_from_gguf(reader: Any) -> str:
    """Build a `tokenizers` BPE tokenizer (as JSON) from a GGUF file's metadata."""

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens: list[str] = field("tokenizer.ggml.tokens")
    types: list[int] = field("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tok = HFTokenizer(bpe)
    pre = field("tokenizer.ggml.pre", "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "llama3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _GGUF_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _GGUF_USER_DEFINED]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok.to_str()


class Tokenizer:
    """Text <-> token ids, plus the model's chat template."""

    def __init__(
        self,
        tokenizer_json: str,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos_token: bool = False,
    ) -> None:
        self._tok = HFTokenizer.from_str(tokenizer_json)
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos_token = add_bos_token
        self.bos_token_id = self._tok.token_to_id(bos_token) if bos_token else None
        self._template = None
        self.special_token_ids = {
            i for i, t in self._tok.get_added_tokens_decoder().items() if getattr(t, "special", False)
        }

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        if not messages:
            raise ValueError("messages must not be empty")
        if self._template is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # The template writes any BOS itself; do not add a second one.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


_CONTEXT = 6  # tokens of context a detokenizer decodes with the new one


class IncrementalDetokenizer:
    """Turns token ids, fed one at a time, into text deltas.

    The `tokenizers` library's ``DecodeStream`` does the decoding (primed with
    the prompt's last tokens, so the first token decodes with its leading
    space; it holds back an incomplete UTF-8 character until the next token).
    A stop string ends the text before it, and text that could still become a
    stop string is held back, so no stream ever shows it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True) -> None:
        self._hf = tokenizer._tok
        self._skip_special = skip_special_tokens
        self._recent = list(prompt_token_ids[-_CONTEXT:])
        self._stream = self._new_stream()
        self.stop = tuple(stop)
        self.text = ""  # all output text so far (stop string excluded once found)
        self._emitted = 0  # characters of self.text already returned
        self.stopped = False
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def add_token(self, token_id: int, final: bool = False) -> str:
        """Append one token; return the text that is now safe to show."""
        if self.stopped:
            return self._take(True)
        self._recent.append(token_id)
        if len(self._recent) > 2 * _CONTEXT:
            del self._recent[:-_CONTEXT]
        try:
            piece = self._stream.step(self._hf, token_id)
        except Exception:  # noqa: BLE001 - the decoder found the text so far is not a prefix of the longer text
            piece = self._hf.decode([token_id], skip_special_tokens=self._skip_special)
            self._stream = self._new_stream()
        if not self.stop:  # the common case: every decoded piece is shown at once
            if piece:
                self.text += piece
                self._emitted = len(self.text)
            return piece or ""
        if piece:
            self.text += piece
            self._check_stop()
        return self._take(final or self.stopped)

    def _new_stream(self) -> decoders.DecodeStream:
        context = self._recent[-_CONTEXT:]
        try:
            return decoders.DecodeStream(ids=context, skip_special_tokens=self._skip_special)
        except TypeError:  # tokenizers < 0.22 (an older image): prime it by hand
            stream = decoders.DecodeStream(skip_special_tokens=self._skip_special)
            for t in context:
                stream.step(self._hf, t)
            return stream

    def flush(self) -> str:
        return self._take(True)

    def _check_stop(self) -> None:
        if not self.stop:
            return
        best = -1
        search_from = max(0, self._emitted - self._hold)
        for s in self.stop:
            i = self.text.find(s, search_from)
            if i != -1 and (best == -1 or i < best):
                best = i
        if best != -1:
            self.text = self.text[:best]
            self.stopped = True

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the text that is the start of a stop string."""
        for k in range(min(self._hold, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _take(self, final: bool) -> str:
        end = len(self.text) if final else max(self._emitted, len(self.text) - self._partial_stop_len())
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
