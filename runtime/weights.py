"""Load a local Hugging Face-format Llama checkpoint into :class:`runtime.model.LlamaModel`.

A checkpoint directory holds ``config.json`` and one or more ``*.safetensors`` files
(sharded checkpoints list their shards in ``model.safetensors.index.json``; every
``*.safetensors`` file in the directory is read either way). Tensor names are the
standard ``LlamaForCausalLM`` ones; q/k/v are concatenated into the fused QKV weight and
gate/up into the fused MLP weight. Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch

from runtime.models import ModelConfig

__all__ = ["WeightsError", "config_from_hf", "load_hf_weights", "load_model", "hf_tensor_names", "save_hf_weights"]


class WeightsError(ValueError):
    """A checkpoint that is missing, incomplete or shaped unlike the model."""


_REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def _read_config(weights_dir: str | Path) -> dict[str, Any]:
    path = Path(weights_dir) / "config.json"
    if not Path(weights_dir).is_dir():
        raise WeightsError(f"checkpoint directory {weights_dir} does not exist")
    if not path.is_file():
        raise WeightsError(f"{path} is missing; a Hugging Face checkpoint directory needs config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from e


def config_from_hf(weights_dir: str | Path, name: str | None = None) -> ModelConfig:
    """Read ``config.json`` of a Llama checkpoint into a :class:`ModelConfig`.

    Reads hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads
    (default: num_attention_heads), intermediate_size, vocab_size, rope_theta (default
    10000), rms_norm_eps (default 1e-6, as Hugging Face), max_position_embeddings
    (default 4096) and torch_dtype (for ``dtype_bytes``; default 2).

    Raises:
        WeightsError: missing file or key, a non-SiLU activation, a head_dim other than
            hidden_size / num_attention_heads, or rope_scaling (not modelled).
    """
    raw = _read_config(weights_dir)
    where = Path(weights_dir) / "config.json"
    missing = [k for k in _REQUIRED_KEYS if k not in raw]
    if missing:
        raise WeightsError(f"{where} lacks required keys {missing}")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise WeightsError(f"{where}: hidden_act={act!r}; only Llama's 'silu' gated MLP is supported")
    d, H = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    if d % H:
        raise WeightsError(f"{where}: hidden_size {d} is not a multiple of num_attention_heads {H}")
    if raw.get("head_dim") not in (None, d // H):
        raise WeightsError(f"{where}: head_dim {raw['head_dim']} != hidden_size / num_attention_heads = {d // H}")
    if raw.get("rope_scaling"):
        raise WeightsError(f"{where}: rope_scaling {raw['rope_scaling']} is not modelled; outputs would be wrong")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise WeightsError(f"{where}: attention_bias/mlp_bias checkpoints are not supported")
    dtype_name = str(raw.get("torch_dtype", "float16"))
    model_name = name or raw.get("_name_or_path") or Path(weights_dir).resolve().name
    return ModelConfig(
        name=str(model_name),
        hf_name=str(raw.get("_name_or_path") or model_name),
        n_layers=int(raw["num_hidden_layers"]),
        d_model=d,
        n_heads=H,
        n_kv_heads=int(raw.get("num_key_value_heads") or H),
        d_ff=int(raw["intermediate_size"]),
        vocab_size=int(raw["vocab_size"]),
        max_seq_len=int(raw.get("max_position_embeddings", 4096)),
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        gated_mlp=True,
        dtype_bytes=_DTYPE_BYTES.get(dtype_name, 2),
    )


def hf_tensor_names(cfg: ModelConfig) -> list[str]:
    """The tensor names a complete ``LlamaForCausalLM`` checkpoint of shape ``cfg`` holds."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    return names


class _Shards:
    """Lazy access to tensors spread over the ``*.safetensors`` files of a directory."""

    def __init__(self, weights_dir: Path) -> None:
        from safetensors import safe_open

        files = sorted(weights_dir.glob("*.safetensors"))
        if not files:
            raise WeightsError(f"no *.safetensors files in {weights_dir}")
        self.dir = weights_dir
        self._handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        self._where: dict[str, Any] = {}
        for h in self._handles:
            for k in h.keys():
                self._where[k] = h

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise WeightsError(f"tensor {name!r} is missing from the safetensors files in {self.dir}")
        return self._where[name].get_tensor(name)


def _check_config(cfg: ModelConfig, file_cfg: ModelConfig, where: Path) -> None:
    fields = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size")
    bad = [(f, getattr(cfg, f), getattr(file_cfg, f)) for f in fields if getattr(cfg, f) != getattr(file_cfg, f)]
    if bad:
        desc = "; ".join(f"{f}: model {a}, config.json {b}" for f, a, b in bad)
        raise WeightsError(f"{where}/config.json does not match model {cfg.name!r}: {desc}")
    for f in ("rope_theta", "norm_eps"):
        a, b = getattr(cfg, f), getattr(file_cfg, f)
        if abs(a - b) > 1e-9 * max(abs(a), abs(b)):
            raise WeightsError(f"{where}/config.json does not match model {cfg.name!r}: {f}: model {a}, config.json {b}")


def _pairs(model: torch.nn.Module, shards: _Shards) -> Iterator[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """Yield (hf name(s), our parameter, checkpoint tensor) in load order."""
    yield "model.embed_tokens.weight", model.embed.weight, shards.get("model.embed_tokens.weight")
    yield "model.norm.weight", model.final_norm.weight, shards.get("model.norm.weight")
    if "lm_head.weight" in shards:
        yield "lm_head.weight", model.lm_head.weight, shards.get("lm_head.weight")
    else:  # tied embeddings (tie_word_embeddings=True) store no separate head
        yield "lm_head.weight (tied to model.embed_tokens.weight)", model.lm_head.weight, shards.get(
            "model.embed_tokens.weight"
        )
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        qkv = [shards.get(p + f"self_attn.{x}_proj.weight") for x in "qkv"]
        _expect(p + "self_attn.q_proj.weight", qkv[0], (layer.qkv.n_heads * layer.qkv.head_dim, model.cfg.d_model))
        for x, t in zip("kv", qkv[1:]):
            _expect(p + f"self_attn.{x}_proj.weight", t, (layer.qkv.n_kv_heads * layer.qkv.head_dim, model.cfg.d_model))
        yield p + "self_attn.{q,k,v}_proj.weight", layer.qkv.weight, torch.cat(qkv, dim=0)
        yield p + "self_attn.o_proj.weight", layer.o_proj.weight, shards.get(p + "self_attn.o_proj.weight")
        gate, up = shards.get(p + "mlp.gate_proj.weight"), shards.get(p + "mlp.up_proj.weight")
        for x, t in (("gate", gate), ("up", up)):
            _expect(p + f"mlp.{x}_proj.weight", t, (model.cfg.d_ff, model.cfg.d_model))
        yield p + "mlp.{gate,up}_proj.weight", layer.mlp.gate_up.weight, torch.cat([gate, up], dim=0)
        yield p + "mlp.down_proj.weight", layer.mlp.down.weight, shards.get(p + "mlp.down_proj.weight")
        yield p + "input_layernorm.weight", layer.attn_norm.weight, shards.get(p + "input_layernorm.weight")
        yield p + "post_attention_layernorm.weight", layer.mlp_norm.weight, shards.get(
            p + "post_attention_layernorm.weight"
        )


def _expect(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise WeightsError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, weights_dir: str | Path) -> None:
    """Copy a Hugging Face Llama checkpoint into ``model`` (a :class:`LlamaModel`) in place.

    Checks ``config.json`` against ``model.cfg`` and every tensor's shape; converts to the
    model's dtype and device.

    Raises:
        WeightsError: missing directory/file/tensor, config or shape mismatch (the message
            names the tensor and gives expected vs got).
    """
    wdir = Path(weights_dir)
    file_cfg = config_from_hf(wdir)
    if not getattr(model.cfg, "gated_mlp", True):
        raise WeightsError(f"model {model.cfg.name!r} has a plain MLP; Llama checkpoints need gated_mlp=True")
    _check_config(model.cfg, file_cfg, wdir)
    shards = _Shards(wdir)
    for name, param, tensor in _pairs(model, shards):
        _expect(name, tensor, tuple(param.shape))
        param.copy_(tensor.to(dtype=param.dtype, device=param.device))


def load_model(
    weights_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
):
    """Build a :class:`runtime.model.LlamaModel` whose shape comes from ``config.json``."""
    from runtime.model import build_model

    cfg = config_from_hf(weights_dir, name=name)
    return build_model(cfg, device=device, dtype=dtype, weights_dir=str(weights_dir))


@torch.no_grad()
def save_hf_weights(model: torch.nn.Module, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a Hugging Face Llama checkpoint (``config.json`` + ``model.safetensors``).

    The inverse of :func:`load_hf_weights` (fused QKV and gate/up are split back into the
    standard tensor names). ``dtype`` converts on the way out (default: the model's).
    Returns the directory.
    """
    from safetensors.torch import save_file

    cfg: ModelConfig = model.cfg
    if not cfg.gated_mlp:
        raise WeightsError(f"model {cfg.name!r} has a plain MLP; only gated (Llama) models can be saved")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hd, H, KV = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": model.embed.weight,
        "model.norm.weight": model.final_norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.qkv.weight.split([H * hd, KV * hd, KV * hd], dim=0)
        gate, up = layer.mlp.gate_up.weight.split(cfg.d_ff, dim=0)
        tensors.update({
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": layer.o_proj.weight,
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": layer.mlp.down.weight,
            p + "input_layernorm.weight": layer.attn_norm.weight,
            p + "post_attention_layernorm.weight": layer.mlp_norm.weight,
        })
    tensors = {k: v.detach().to(device="cpu", dtype=dtype or v.dtype).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"))
    dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "_name_or_path": cfg.hf_name,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": H,
        "num_key_value_heads": KV, "intermediate_size": cfg.d_ff, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": dtype_name,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
