"""The decoder (Llama family), its KV cache, LoRA, and checkpoints.

One `Transformer` covers Llama 2/3 (incl. llama3 rope scaling), Mistral, Qwen2 (q/k/v bias),
Qwen3 (q/k RMSNorm) and SmolLM/SmolLM2 (tied embeddings). Module names match the Hugging Face
checkpoints, so weights load with a strict `load_state_dict` and no renaming.
"""
import math
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer

from chat import Tokenizer
from files import atomic_text, atomic_write, json_text, need_file, read_json

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


# ----------------------------------------------------------------------------- precision

def cpu_has_bf16():
    """The CPU computes bf16 natively (AVX-512 BF16 or AMX): Linux only, read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def pick_device(device="auto"):
    """auto: cuda when this machine has it, else cpu; any other name as it is."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def fast_dtype(device="cpu"):
    """The weight dtype that decodes fastest: bf16 on a bf16 GPU or a native-bf16 CPU, else fp32. On a 2-core
    EPYC with AVX-512 BF16 (no AMX), bf16 decoded faster at every batch size (bench/bench_generate.py)."""
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


# ----------------------------------------------------------------------------- RMSNorm

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32: the mean of squares loses too much in bf16 (one fused op, same result as by hand)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


# ----------------------------------------------------------------------------- RoPE

def rope_frequencies(cfg: Config) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/hd), (head_dim/2,), with Llama 3's long-context rescaling when
    configured."""
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


def rope_cos_sin(cfg: Config, n, device):
    """The rotation table for positions 0..n-1: cos (n, hd) and sin (n, hd) with its first half negated, so
    that apply_rope needs no rotate_half. Angle of position m, pair i: m * inv_freq[i]."""
    inv = rope_frequencies(cfg).to(device)
    ang = torch.arange(n, device=device).float()[:, None] * inv                # (n, hd/2)
    return torch.cat((ang.cos(), ang.cos()), -1), torch.cat((-ang.sin(), ang.sin()), -1)


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+hd/2}) of x (B, heads, T, hd) by its position's angle: HF's
    x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1) written as roll(x) = (x2, x1) times the
    sin table whose first half is negated (exactly the same numbers, two ops fewer)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


# ----------------------------------------------------------------------------- masks and positions

def causal_pad_mask(attention_mask, B, T, dev):
    """Positions (B, T) and attention mask for a forward without cache. Right padding (or none) is plain
    causal attention (mask None): a real token never sees a later pad. Left padding needs an explicit mask,
    and each row's positions count only its real tokens, so the pads do not shift RoPE."""
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


def cache_slots(start, rows, B, T, dev):
    """Positions, attention mask and cache write target for T new tokens after each row's `start` filled
    slots. A slot is its token's position; a query sees its row's slots up to its own."""
    rows = rows or slice(0, B)
    slots = start[:, None] + torch.arange(T, device=dev)          # (B, T)
    lo, hi = start.aminmax()
    lo, hi = int(lo), int(hi)
    S = hi + T
    if lo == hi and (T == 1 or lo == 0):
        mask = None                                               # every key, or plain causal from slot 0
    else:
        mask = (torch.arange(S, device=dev) <= slots[..., None])[:, None]      # (B, 1, T, S)
    row_ids = torch.arange(rows.start, rows.stop, device=dev)[:, None]         # (B, 1)
    return slots, mask, (rows, row_ids, slots, S)


# ----------------------------------------------------------------------------- KV cache

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
        """Write k, v (B, n_kv, T, hd) at `where`; return the rows' keys and values in their filled slots."""
        rows, row_ids, slots, S = where                # slice, (B, 1), (B, T), int
        # (B, T, n_kv, hd) into (rows, n_kv, slots, hd)
        self.k[row_ids, :, slots] = k.transpose(1, 2).to(self.k.dtype)
        self.v[row_ids, :, slots] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[rows, :, :S], self.v[rows, :, :S]  # (B, n_kv, S, hd): attend to the filled part only

    def copy_rows(self, src, dst, n):
        """Slots [0, n) of row src into rows dst (a slice): a shared prefix, or a row moved elsewhere."""
        self.k[dst, :, :n] = self.k[src, :, :n]
        self.v[dst, :, :n] = self.v[src, :, :n]


# ----------------------------------------------------------------------------- attention

SMALL_ATTENTION = 1 << 20  # score elements (B * heads * T * S) up to which attention runs as plain matmuls


def attention(q, k, v, mask):
    """softmax(q k^T / sqrt(hd) + mask) v: q (B, nh, T, hd) over k, v (B, n_kv, S, hd) -> (B, nh, T, hd) in
    q's dtype. mask (B, 1, T, S) bool (True: may attend), or None: causal with queries and keys from slot 0
    (T > 1), every key (T == 1).

    Small problems (decode steps, short training rows) run as fp32 matmuls, the query heads that share
    a kv head stacked as rows of one matmul so keys are never repeated. On 2 CPU cores, for 8 training
    rows of 40 tokens, forward and backward took 0.9 ms against 1.4 ms (fp32) and 4.7 ms (bf16) with
    SDPA's flash kernel; a decode step over the fp32 cache costs the same either way. Large problems go
    to SDPA, which never holds the (T, S) scores.
    """
    B, nh, T, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    if B * nh * T * S > SMALL_ATTENTION:
        return F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask,
                                              is_causal=mask is None and T > 1,
                                              enable_gqa=nkv != nh).to(q.dtype)
    autocast_on = torch.is_autocast_enabled(q.device.type)
    with torch.autocast(q.device.type, enabled=False) if autocast_on else nullcontext():
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
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
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
    """Two residual lines: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, where=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, where)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- the decoder

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

    def forward(self, tokens, attention_mask=None, start=None, rows=None, last_only=False, hidden=False):
        """tokens (B, T) -> logits (B, T, vocab): embed -> blocks -> norm -> head.

        Without a cache: attention_mask (B, T) is 1 for real tokens, 0 for padding (right or left);
        see causal_pad_mask. With a cache (setup_cache): start (B,) is how many slots each row has filled;
        the tokens go to slots start..start+T-1, which are also their positions, in cache rows `rows` (a
        slice, default 0..B-1). Rows shorter than T are right-padded: their pads land past the row's end,
        unseen by its real tokens, and are overwritten by the row's next tokens.
        hidden: return the final-norm states (B, T, dim) instead, for a loss that applies lm_head in chunks.
        """
        B, T = tokens.shape
        if start is None:
            where, n = None, T
            pos, mask = causal_pad_mask(attention_mask, B, T, tokens.device)
        else:
            pos, mask, where = cache_slots(start, rows, B, T, tokens.device)
            n = where[3]
        x = self.model.embed_tokens(tokens)                           # (B, T, dim)
        cos, sin = self.rope(pos, n, x.dtype)                         # (B or 1, 1, T, hd)
        for layer in self.model.layers:
            if self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, where)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        return x if hidden else self.lm_head(x)                       # (B, T, vocab)

    def rope(self, pos, n, dtype):
        """cos and signed sin (B, 1, T, hd) for positions pos (B, T) below n, from a table built once (and
        grown, doubling, when a longer position is asked for)."""
        if self._rope is None or self._rope[0].shape[0] < n or self._rope[0].device != pos.device:
            size = max(n, 2 * (0 if self._rope is None else self._rope[0].shape[0]), 256)
            # a plain tensor even when first built under inference_mode: training uses the same table
            with torch.inference_mode(False), torch.no_grad():
                self._rope = rope_cos_sin(self.config, size, pos.device)
        return tuple(t[pos][:, None].to(dtype) for t in self._rope)

    def setup_cache(self, batch, max_len, dtype=None):
        """Give every layer a preallocated cache for `batch` rows of up to `max_len` tokens. On CPU the cache
        is fp32 whatever the weights: attention over a bf16 cache measured 2-8x slower at batch 16-64 (SDPA's
        bf16 kernel, or converting the cache every step), over an fp32 one it is a small part of a step."""
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

    def keep_cache_rows(self, order, lens):
        """Close up the cache: row i takes old row order[i] (its lens[order[i]] filled slots), for each i
        whose row moves; the rows past len(order) are left to be refilled."""
        for dst, src in enumerate(order):
            if src != dst:
                self.copy_cache_rows(src, slice(dst, dst + 1), lens[src])


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
        h = self.lora_B(self.lora_A(self.dropout(x).to(a.dtype) if not torch.is_autocast_enabled()
                                    else self.dropout(x)))
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
    atomic_write(path / "adapter_model.safetensors", lambda p: save_file(sd, p))
    atomic_text(path / "adapter_config.json", json_text(cfg, indent=2))


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
                    raise ValueError(f"{path}: {n}.{part} has shape {tuple(t.shape)}, model wants "
                                     f"{tuple(w.shape)}")
                w.copy_(t)
    return model


def _nonfinite(sd):
    """The first floating tensor name holding a NaN or an infinity, else None."""
    return next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())),
                None)


def read_tensors(path):
    """A safetensors file's tensors; a damaged file or a NaN/Inf tensor is an error naming the file."""
    path = need_file(path)
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if (bad := _nonfinite(sd)) is not None:
        raise ValueError(f"{path}: tensor {bad} holds NaN or Inf values (a damaged file, or saved from a "
                         f"diverged run)")
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
    hint = _output_folder_hint(path)
    if pickles:
        hint = f" (found {', '.join(pickles)}: pickle checkpoints are never loaded; convert them to " \
               "safetensors)"
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
        bf16_gpu = str(device).startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16_gpu else torch.float32
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
            raise ValueError(f"{path}: tensor {k} has shape {tuple(sd[k].shape)}, "
                             f"config wants {tuple(shape)}")
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
    atomic_write(path / "model.safetensors", lambda p: save_file(sd, p, metadata={"format": "pt"}))
    atomic_text(path / "config.json", json_text(hf, indent=2))
    atomic_text(path / "tokenizer.json", tokenizer.tok.to_str())
    atomic_text(path / "tokenizer_config.json", json_text(tokenizer.config, indent=2))
