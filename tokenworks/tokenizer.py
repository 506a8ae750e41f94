"""Tokenizer, chat template and incremental detokenizer.

The tokenizer itself is the `tokenizers` library's; this module builds one
from GGUF metadata when no tokenizer.json exists, renders chat templates in
a sandboxed Jinja environment, and turns a growing list of token ids into
text deltas that never end in half a UTF-8 character.
"""

from __future__ import annotations

import json
import re
import threading
from array import array
from collections import OrderedDict
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


class SegmentEncoder:
    """``encode`` as the `tokenizers` library's, the text between added tokens kept by its text.

    The library splits a text at its added tokens (``<|im_start|>``, ...) first and encodes each piece between
    them on its own; so a piece seen before need not be encoded again: a chat's system prompt and template, and
    a conversation's earlier turns, which a chat client sends again with every turn. Encoding costs about 3 µs a
    token here (the byte-level regex), so a 2,000-token conversation cost the router about 6 ms a request.

    Used only where pieces are independent as described: added tokens without lstrip/rstrip/single_word/
    normalized, no normalizer or NFC, a pre-tokenizer of Split/Digits/ByteLevel (no prefix space) steps, a BPE
    without dropout; and checked against the library on probe texts when made (``for_tokenizer`` returns None
    otherwise). The pieces kept are bounded by their total characters (4 million: some 16 MB of ids and text).
    """

    PIECE_TYPES = {"Sequence", "Split", "Digits", "ByteLevel"}
    PROBES = ("<|x|> a", "a\n\n<|x|>\n 12  b", " <|x|><|x|>  x<|x|>", "\u00e9\u0301<|x|>\u0301 9x", "<|x|>")

    def __init__(self, hf: HFTokenizer, added: dict[str, int], max_chars: int = 4_000_000) -> None:
        self._hf = hf
        self._added = added
        self._split = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
        self._kept: OrderedDict[str, array] = OrderedDict()
        self._chars, self.max_chars = 0, max_chars
        self._lock = threading.Lock()  # a worker's engine thread and its server may both encode

    @classmethod
    def for_tokenizer(cls, hf: HFTokenizer, tokenizer_json: str) -> SegmentEncoder | None:
        spec = json.loads(tokenizer_json)
        added = spec.get("added_tokens") or []
        if not added or any(a.get(k) for a in added for k in ("lstrip", "rstrip", "single_word", "normalized")):
            return None
        if (spec.get("normalizer") or {}).get("type", "NFC") != "NFC":
            return None
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or model.get("dropout"):
            return None

        def plain(pre: dict | None) -> bool:
            if pre is None:
                return True
            if pre.get("type") not in cls.PIECE_TYPES or pre.get("add_prefix_space"):
                return False
            return all(plain(p) for p in pre.get("pretokenizers", ()))

        if not plain(spec.get("pre_tokenizer")):
            return None
        encoder = cls(hf, {a["content"]: a["id"] for a in added if a.get("content")})
        for probe in cls.PROBES:  # the library's own answer, with each added token in turn in the probes
            for token in list(encoder._added)[:8]:
                text = probe.replace("<|x|>", token)
                if encoder.encode(text, keep=False) != hf.encode(text, add_special_tokens=False).ids:
                    return None
        return encoder

    def encode(self, text: str, keep: bool = True) -> list[int]:
        ids: list[int] = []
        at = 0
        for m in self._split.finditer(text):
            if m.start() > at:
                ids += self._piece(text[at:m.start()], keep)
            ids.append(self._added[m.group()])
            at = m.end()
        if at < len(text):
            ids += self._piece(text[at:], keep)
        return ids

    def _piece(self, text: str, keep: bool) -> Sequence[int]:
        with self._lock:
            ids = self._kept.get(text)
            if ids is not None:
                self._kept.move_to_end(text)
                return ids
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if keep and len(text) <= self.max_chars // 4:
            with self._lock:
                if text not in self._kept:
                    self._kept[text] = array("i", ids)  # 4 bytes a token, not a list of int objects
                    self._chars += len(text)
                while self._chars > self.max_chars:
                    old, _ = self._kept.popitem(last=False)
                    self._chars -= len(old)
        return ids


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
        self._segments = SegmentEncoder.for_tokenizer(self._tok, tokenizer_json)
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

    def to_json(self) -> str:
        """The tokenizer as a Hugging Face tokenizer.json (structured output's grammars read it)."""
        return self._tok.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._segments is not None:
            ids = self._segments.encode(text)
        else:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def template_takes_tools(self) -> bool:
        """Whether the chat template renders a ``tools`` list itself (else router/tools.py writes them in)."""
        return bool(self.chat_template) and "tools" in self.chat_template

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
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
            **({"tools": tools} if tools else {}),
        )

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        # The template writes any BOS itself; do not add a second one.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools), add_special_tokens=False)


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
