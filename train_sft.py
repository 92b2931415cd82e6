"""Supervised fine-tuning with LoRA: loss on assistant tokens only, mixed precision, exact resume, torchrun.

The loop machinery here (`fit`) is shared with train_dpo.py, which supplies its own data and loss.
    python train_sft.py --base default --data data.jsonl --out runs/x   (writes runs/x/model, runs/x/adapter, ...)
    torchrun --nproc_per_node=2 train_sft.py ...   (DistributedDataParallel; gloo on CPU, NCCL on CUDA)
"""
import argparse
import contextlib
import ctypes
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import model as M


@dataclass
class SFTConfig:
    base: str = "default"       # parent model: a Hugging Face directory, or "default" (built-in SmolLM2-135M-Instruct)
    data: str = ""              # JSONL of {"messages": [...]}; may be empty when rows are passed to train()
    out: str = "out"            # output directory: model/ (merged), adapter/ (PEFT), checkpoint/, train.jsonl, summary.json
    epochs: int = 3             # passes over the training split (unless max_steps is set)
    lr: float = 2e-4            # peak learning rate
    min_lr_ratio: float = 0.1   # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0   # AdamW weight decay on the LoRA weights
    grad_clip: float = 1.0      # max gradient norm (0: no clipping)
    lora_r: int = 16            # LoRA rank
    lora_alpha: float = 32.0    # LoRA scale is alpha / r
    lora_dropout: float = 0.0   # dropout on the LoRA input
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # comma-separated module names
    batch_size: int = 4         # rows per micro-batch (per process)
    grad_accum: int = 1         # micro-batches per optimizer step (per process)
    max_len: int = 512          # tokens per row; longer rows are cut, rows left with no target are dropped
    precision: str = "auto"     # auto | fp32 | bf16 | fp16 (auto: bf16 on bf16 GPUs and CPUs with AVX-512 BF16 or AMX, else fp32)
    seed: int = 0               # data order, split, LoRA init and dropout
    warmup: int = 10            # linear warmup steps
    eval_frac: float = 0.05     # share of rows held out for the eval loss
    save_every: int = 100       # checkpoint every N optimizer steps (and always at the end)
    max_steps: int = 0          # stop after N optimizer steps (0: run all epochs)
    log: str = ""               # JSONL log of every step (default <out>/train.jsonl)
    device: str = "auto"        # auto | cpu | cuda
    grad_checkpoint: bool = False  # recompute each block's activations in the backward (less memory)
    overwrite: bool = False     # delete <out>'s training outputs and start over (else a checkpoint or finished output is reused only when made with the same settings, data and base)
    skip_bad: bool = False      # drop malformed rows (counted) instead of stopping with file:line


def _rule(test, want):
    """A check of one setting: None when the value is fine, else what it must be."""
    return lambda v: None if test(v) else f"must be {want}, got {v!r}"


def _device_rule(v):
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(v)):
        return f"must be auto, cpu, cuda or cuda:N, got {v!r}"
    if str(v).startswith("cuda") and not torch.cuda.is_available():
        return f"{v!r} asks for CUDA, which this machine does not have (use cpu or auto)"
    return None


def _finite(v):
    return math.isfinite(v)


RULES = {  # each number a user can set, with the range that makes sense (argparse and train() both check)
    "epochs": _rule(lambda v: v > 0, "> 0"),
    "lr": _rule(lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "min_lr_ratio": _rule(lambda v: 0 <= v <= 1, "in [0, 1]"),
    "weight_decay": _rule(lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "grad_clip": _rule(lambda v: _finite(v) and v >= 0, "a finite number >= 0 (0: no clipping)"),
    "lora_r": _rule(lambda v: v > 0, "> 0"),
    "lora_alpha": _rule(lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "lora_dropout": _rule(lambda v: 0 <= v < 1, "in [0, 1)"),
    "lora_targets": _rule(lambda v: all(re.fullmatch(r"\w+", t) for t in v.split(",")), "comma-separated module names"),
    "batch_size": _rule(lambda v: v > 0, "> 0"),
    "grad_accum": _rule(lambda v: v > 0, "> 0"),
    "max_len": _rule(lambda v: v > 1, "> 1"),
    "precision": _rule(lambda v: v in ("auto", "fp32", "bf16", "fp16"), "auto, fp32, bf16 or fp16"),
    "warmup": _rule(lambda v: v >= 0, ">= 0"),
    "eval_frac": _rule(lambda v: 0 <= v < 1, "in [0, 1)"),
    "save_every": _rule(lambda v: v > 0, "> 0"),
    "max_steps": _rule(lambda v: v >= 0, ">= 0 (0: run all epochs)"),
    "device": _device_rule,
}


def check_config(cfg, rules=RULES):
    """Every setting in range, else a ValueError naming each one that is not."""
    bad = [f"{name}: {msg}" for name, rule in rules.items() if (msg := rule(getattr(cfg, name))) is not None]
    if cfg.precision == "fp16" and (cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())):
        bad.append("precision: fp16 needs CUDA (its gradient scaler); on CPU use bf16 or fp32")
    if bad:
        raise ValueError("bad settings: " + "; ".join(bad))


# ----------------------------------------------------------------------------- data

def read_jsonl(path):
    """The rows of a JSONL file; a line that is not a JSON object is an error naming file:line."""
    rows = []
    for where, row in located_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def located_jsonl(path, keep_bad=False):
    """[(where, row)] with where = "file:line"; a line that is not UTF-8 or not JSON is an error naming it
    (with keep_bad, the error takes the row's place, for the caller to count)."""
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                row = ValueError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)")
            else:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)  # a valid non-object (a list, a number) is refused by encode_rows
                except json.JSONDecodeError as e:
                    row = ValueError(f"{path}:{n}: not JSON ({e.msg})")
            if isinstance(row, ValueError) and not keep_bad:
                raise row
            out.append((f"{path}:{n}", row))
    return out


def load_rows(cfg, rows):
    """[(where, row)] from the rows given in memory or from cfg.data; no rows at all is an error."""
    rows = [(f"rows[{i}]", r) for i, r in enumerate(rows)] if rows is not None else located_jsonl(cfg.data, cfg.skip_bad)
    if not rows:
        raise ValueError(f"{cfg.data or 'rows'}: the data set is empty: nothing to train on")
    return rows


def encode_rows(rows, encode, skip_bad):
    """Encode each row; errors carry file:line, or are counted when skip_bad. Returns (examples, dropped)."""
    examples, dropped = [], {"bad": 0, "no_target": 0}
    for where, row in rows:
        try:
            if isinstance(row, ValueError):
                raise row
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            ex = encode(row)
        except (ValueError, KeyError, TypeError) as e:
            if not skip_bad:
                raise (e if str(e).startswith(where) else ValueError(f"{where}: {e}")) from None
            dropped["bad"] += 1
            continue
        if ex is None:
            dropped["no_target"] += 1  # TRL #6668: a row cut to no target trains on nothing
        else:
            examples.append(ex)
    if not examples:
        raise ValueError(f"no usable rows ({dropped}); check max_len and the data")
    return examples, dropped


def sft_example(tok, max_len):
    def encode(row):
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ValueError('"messages" must be a non-empty list of {"role", "content"}')
        if not all(isinstance(m, dict) for m in msgs):
            raise ValueError("each message must be an object with role and content")
        if not any(m.get("role") == "assistant" for m in msgs):
            raise ValueError("no assistant turn: nothing to learn")
        ids, mask = tok.encode_chat(msgs)
        ids, mask = ids[:max_len], mask[:max_len]
        return {"ids": ids, "mask": mask} if any(mask[1:]) else None
    return encode


def collate(examples, pad_id):
    """Right-padded batch; attention and loss masks built from each row's length, never from token ids."""
    T = max(len(e["ids"]) for e in examples)
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(examples), T, dtype=torch.long)
    loss_mask = torch.zeros(len(examples), T, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["ids"])
        tokens[i, :n], attn[i, :n], loss_mask[i, :n] = torch.tensor(e["ids"]), 1, torch.tensor(e["mask"])
    return {"tokens": tokens, "attention_mask": attn, "loss_mask": loss_mask}


def epoch_batches(lengths, batch_size, seed, epoch):
    """Micro-batches of row indices: a seeded shuffle, sorted by length within windows of 32 batches, so
    a batch holds rows of nearly one length (padding under 5% of the stage-1 seed's tokens at batch 4-16,
    against 24-45% for random batches), then the batches shuffled."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    win, batches = batch_size * 32, []
    for i in range(0, len(order), win):
        w = sorted(order[i:i + win], key=lambda j: -lengths[j])
        batches += [w[k:k + batch_size] for k in range(0, len(w), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def split(examples, frac, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(examples), generator=g).tolist()
    n_eval = min(len(examples) - 1, math.ceil(frac * len(examples))) if frac > 0 else 0
    return [examples[i] for i in idx[n_eval:]], [examples[i] for i in idx[:n_eval]]


# ----------------------------------------------------------------------------- numerics

def sequence_logprobs(logits, labels, mask):
    """Sum over masked positions of log p(label), per row, in fp32 (even when logits are bf16/fp16)."""
    logp = -F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    return (logp.view(labels.shape) * mask).sum(-1)  # (B,)


class _TargetLogprobs(torch.autograd.Function):
    """log p(label) for rows of hidden states h (N, dim) under the head w (V, dim), chunk by chunk.

    The full (N, V) logits never exist: each chunk's softmax is turned into d logp / d h at once
    (the gradient is known in the forward pass, as in Liger's fused linear cross-entropy). On CPU
    this removes most of the loss's cost, which is memory traffic and page faults on the logits.
    """

    @staticmethod
    def forward(ctx, h, w, labels):
        out, grad = torch.empty(len(h), dtype=torch.float32, device=h.device), None
        if ctx.needs_input_grad[0]:
            grad = torch.empty_like(h)
        chunk = max(1, (1 << 22) // w.shape[0])  # ~16 MB of fp32 logits: reused by malloc, no page faults
        for i in range(0, len(h), chunk):
            logits = (h[i:i + chunk] @ w.t()).float()                        # (n, V)
            lse = logits.logsumexp(-1)
            lab = labels[i:i + chunk, None]
            out[i:i + chunk] = logits.gather(1, lab)[:, 0] - lse
            if grad is not None:
                p = logits.sub_(lse[:, None]).exp_().neg_()                 # d logp / d logits = onehot - softmax
                p.scatter_add_(1, lab, torch.ones_like(lab, dtype=p.dtype))
                grad[i:i + chunk] = p.to(w.dtype) @ w
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, g):
        grad, = ctx.saved_tensors
        return grad * g[:, None].to(grad.dtype), None, None


def hidden_logprobs(hidden, head, labels, mask):
    """sequence_logprobs from final hidden states, applying the head only at masked positions. (B,) fp32."""
    rows, cols = mask.nonzero(as_tuple=True)
    lp = _TargetLogprobs.apply(hidden[rows, cols], head, labels[rows, cols])
    return torch.zeros(len(mask), dtype=torch.float32, device=lp.device).index_add(0, rows, lp)


def policy_logprobs(model, batch):
    """Summed log-probs of each row's target tokens (loss_mask shifted to the token predicted)."""
    h = model(batch["tokens"], attention_mask=batch["attention_mask"], hidden=True)
    head = getattr(model, "module", model).lm_head.weight  # under DDP the wrapped model's head
    return hidden_logprobs(h[:, :-1], head, batch["tokens"][:, 1:], batch["loss_mask"][:, 1:])


def sft_loss(model, batch):
    """Summed negative log-likelihood of the targets (the loop divides by the step's target count)."""
    return -policy_logprobs(model, batch).sum(), {}


def sft_count(batch):
    return int(batch["loss_mask"][:, 1:].sum())


def get_lr(step, cfg, total):
    """Linear warmup, then cosine from lr down to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / (cfg.warmup + 1)
    progress = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def resolve(cfg):
    """(device, weight dtype, autocast dtype or None) for cfg.device and cfg.precision."""
    dev = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dist.is_initialized() and dev == "cuda":
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    p = cfg.precision
    if p == "auto":
        # measured on a 2-core EPYC with AVX-512 BF16 and no AMX: LoRA SFT 2x faster in bf16 (bench/bench_train.py)
        fast_bf16 = torch.cuda.is_bf16_supported() if dev.startswith("cuda") else M.cpu_has_bf16()
        p = "bf16" if fast_bf16 else "fp16" if dev.startswith("cuda") else "fp32"
    if p not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision {p!r}: choose auto, fp32, bf16 or fp16")
    if p == "fp16" and not dev.startswith("cuda"):
        raise ValueError("fp16 needs CUDA (its gradient scaler); on CPU use bf16 or fp32")
    # the frozen base is stored in the low precision itself: autocast would re-cast fp32 weights every step
    wdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[p]
    return dev, wdtype, (None if p == "fp32" else wdtype)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, model, opt, scaler, state):
    """Adapter, optimizer moments and RNG in one safetensors file, the rest as JSON in its header: one atomic write.
    Weights that are not all finite are never saved."""
    tensors = dict(M.lora_state_dict(model))
    for i, p in enumerate(M.lora_parameters(model)):
        for k, v in opt.state.get(p, {}).items():
            tensors[f"optimizer.{i}.{k}"] = v.detach().float().cpu().reshape(v.shape).contiguous()
    if (bad := M._nonfinite(tensors)) is not None:
        raise RuntimeError(f"{path}: not saved: tensor {bad} holds NaN or Inf values")
    tensors["rng.cpu"] = torch.get_rng_state()
    if scaler is not None:
        state = {**state, "scaler": {k: v for k, v in scaler.state_dict().items()}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    M._atomic(path, lambda p: save_file(tensors, p, metadata={"state": M.json_text(state)}))


def checkpoint_state(path):
    """The JSON state in a checkpoint's header; a damaged file is an error naming it."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["state"])
    except Exception as e:  # safetensors' own error, a missing key, bad JSON: the file is not one of ours
        raise ValueError(f"{path}: not a readable training checkpoint ({e!r}); pass --overwrite to start over") from None


def load_checkpoint(path, model, opt, scaler):
    state = checkpoint_state(path)
    t = M.read_tensors(path)
    with torch.no_grad():
        for n, m in M.lora_modules(model).items():
            m.lora_A.weight.copy_(t[f"base_model.model.{n}.lora_A.weight"])
            m.lora_B.weight.copy_(t[f"base_model.model.{n}.lora_B.weight"])
    for i, p in enumerate(M.lora_parameters(model)):
        s = {k[len(f"optimizer.{i}."):]: v for k, v in t.items() if k.startswith(f"optimizer.{i}.")}
        if s:
            opt.state[p] = {k: (v if k == "step" else v.to(p.device)) for k, v in s.items()}
    torch.set_rng_state(t["rng.cpu"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return state


# ----------------------------------------------------------------------------- the loop

def keep_freed_memory():
    """glibc hands big freed blocks back to the OS and page-faults them in again next step: measured on
    2 CPU cores, a quarter of a DPO step. Keep them in the heap (mmap only above 32 MB, never trim)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)       # M_MMAP_THRESHOLD (its maximum)
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc


def setup(cfg):
    """Process group (under torchrun), base model in the training precision with a fresh LoRA."""
    if "RANK" in os.environ and not dist.is_initialized():
        # NCCL for CUDA tensors, gloo for the loop's few CPU numbers (loss sums, DPO's reference log-probs)
        cuda = torch.cuda.is_available() and cfg.device != "cpu"
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    dev, wdtype, amp = resolve(cfg)
    if dev.startswith("cuda"):
        torch.cuda.set_device(dev)
    else:
        keep_freed_memory()
    base = M.default_base() if cfg.base == "default" else Path(cfg.base)
    model, tok = M.load(base, device=dev, dtype=wdtype)
    torch.manual_seed(cfg.seed)  # the same LoRA init on every rank
    M.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_targets.split(",")))
    model.checkpointing = cfg.grad_checkpoint
    return model, tok, base, dev, amp


class TrainingStopped(RuntimeError):
    """The weight checks stopped the run: a non-finite loss or weights, or a collapse."""


COLLAPSE_STEPS = 3     # steps in a row at ln(vocab) with a vanishing gradient that count as a collapse
COLLAPSE_GRAD = 1e-6   # "vanishing": a gradient norm at or below this


def _kept(ckpt, saved):
    """Where the run can restart from, for an error message."""
    if saved is None:
        return "no checkpoint was written"
    return f"the last checkpoint whose weights are all finite is kept: {ckpt} (step {saved})"


def log_lines(path, step):
    """The log's lines up to `step`: lines logged after the last checkpoint and a torn last line are dropped."""
    keep = []
    for line in Path(path).read_bytes().decode("utf-8", "replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(line)
    return keep


def fit(cfg, model, tok, base, dev, amp, train_ex, eval_ex, collate_fn, loss_fn, count_fn, fingerprint=None):
    """Train LoRA on train_ex; evaluate on eval_ex; checkpoint, resume, and write the outputs. Returns the summary.
    The weights are checked after every update: non-finite weights or a collapsed model stop the run, and only
    finite weights are ever checkpointed or published. `fingerprint` is recorded in each checkpoint."""
    out = Path(cfg.out)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    ckpt, log_path = out / "checkpoint" / "state.safetensors", Path(cfg.log or out / "train.jsonl")
    per_step = cfg.grad_accum * world
    lengths = [e["length"] if "length" in e else len(e["ids"]) for e in train_ex]
    n_micro = len(epoch_batches(lengths, cfg.batch_size, cfg.seed, 0))
    steps_per_epoch = math.ceil(n_micro / per_step)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    params = M.lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    ctx = (lambda: torch.autocast(dev.split(":")[0], dtype=amp)) if amp is not None else contextlib.nullcontext
    step, tokens, seconds, loss, running = 0, 0, 0.0, float("nan"), {}
    if ckpt.exists():   # train() has checked that it was made by this very training
        st = load_checkpoint(ckpt, model, opt, scaler)
        step, tokens, seconds, loss, running = st["step"], st["tokens"], st["seconds"], st["loss"], st["running"]
    saved, dead = step if ckpt.exists() else None, 0   # the last checkpoint's step; steps in a row that look dead
    uniform = math.log(model.config.vocab_size)        # the loss of a uniform guess over the vocabulary
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if log_path.exists():  # drop lines a killed run logged after its last checkpoint, a torn last line too
            M._atomic_text(log_path, "".join(line + "\n" for line in log_lines(log_path, step)))
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc=f"train {out.name}", unit="step")
    model.train()
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        micro = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch)[k * per_step:(k + 1) * per_step]
        batches = [collate_fn([train_ex[i] for i in b], tok.pad_id) for b in micro]
        n_target = sum(count_fn(b) for b in batches)  # the whole step's targets, over all ranks
        mine = batches[rank::world]
        lr = get_lr(step, cfg, total)
        for g in opt.param_groups:
            g["lr"] = lr
        torch.manual_seed(cfg.seed * 1000003 + step * world + rank)  # dropout masks: a function of the step
        t0 = time.perf_counter()
        sums, stats = torch.zeros(2), {}
        for j, b in enumerate(mine or batches[:1]):  # a rank with no batch still joins DDP's all-reduce
            b = {key: v.to(dev) for key, v in b.items()}
            last = j == max(len(mine), 1) - 1
            with (ddp.no_sync() if world > 1 and not last else contextlib.nullcontext()), ctx():
                lsum, st = loss_fn(ddp, b)
            # DDP averages over ranks: scale by world so the update is the sum over the global step / n_target
            part = lsum * (world / n_target) * (1.0 if mine else 0.0)
            (scaler.scale(part) if scaler else part).backward()
            if mine:
                # tokens/s counts target tokens only: prompts and padding are read, not learned
                sums += torch.tensor([lsum.item(), b["loss_mask"][:, 1:].sum().item()])
                for key, v in st.items():
                    stats[key] = stats.get(key, 0.0) + float(v)
        if world > 1:
            keys = sorted(stats)
            red = torch.cat([sums, torch.tensor([stats[x] for x in keys], dtype=torch.float32)])
            dist.all_reduce(red)
            sums, stats = red[:2], dict(zip(keys, red[2:].tolist()))
        loss = sums[0].item() / n_target
        if not math.isfinite(loss):
            raise TrainingStopped(f"step {step + 1}: loss is {loss}; stopping ({_kept(ckpt, saved)}). "
                                  "Try a lower --lr or --precision fp32.")
        if scaler:
            scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise TrainingStopped(f"step {step + 1}: the update made the adapter weights NaN or Inf; stopping "
                                  f"({_kept(ckpt, saved)}). Try a lower --lr or --precision fp32.")
        # a collapsed model predicts the uniform distribution: its loss sits at ln(vocab) and nothing moves it
        nll = stats["nll_per_token"] / n_target if "nll_per_token" in stats else loss   # DPO logs it; SFT's is the loss
        dead = dead + 1 if float(gnorm) <= COLLAPSE_GRAD and abs(nll - uniform) <= 0.01 * uniform else 0
        dt = time.perf_counter() - t0
        step, tokens, seconds = step + 1, tokens + int(sums[1]), seconds + dt
        stats = {key: v / n_target for key, v in stats.items()}
        # running means (EMA): with one pair a step, DPO's accuracy is 0 or 1 (TRL #2371)
        running = {key: v if key not in running else 0.9 * running[key] + 0.1 * v for key, v in stats.items()}
        rec = {"step": step, "epoch": epoch, "loss": round(loss, 6), "lr": lr, "grad_norm": round(float(gnorm), 6),
               "tokens_per_s": round(float(sums[1]) / dt, 1), **{key: round(v, 6) for key, v in stats.items()},
               **{f"running/{key}": round(v, 6) for key, v in running.items()}}
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(M.json_text(rec) + "\n")
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
            bar.update()
            if (step % cfg.save_every == 0 or step == total) and not dead:   # a suspect model is not saved
                save_checkpoint(ckpt, model, opt, scaler, {"step": step, "tokens": tokens, "seconds": seconds,
                                                           "loss": loss, "running": running, "total": total,
                                                           "config": asdict(cfg), "fingerprint": fingerprint})
                saved = step
        if dead >= COLLAPSE_STEPS or (dead and step == total):   # the last step's model is not published either
            late = saved is not None and saved >= step - dead   # saved after the update that killed the model
            raise TrainingStopped(f"step {step}: training collapsed: the loss has sat at ln(vocab) = {uniform:.3f} "
                                  f"(a uniform guess) with a gradient norm of {float(gnorm):.1e} for {dead} step(s); "
                                  f"stopping ({_kept(ckpt, saved)}"
                                  + (f", but the update of step {step - dead} had already collapsed it" if late else "")
                                  + "). Try a lower --lr.")
    bar.close()
    eval_loss = evaluate(model, tok, eval_ex, collate_fn, loss_fn, count_fn, cfg, dev, ctx, rank, world)
    summary = {"steps": step, "train_loss": loss, "eval_loss": eval_loss, "tokens": tokens,
               "tokens_per_s": tokens / seconds if seconds else 0.0, "seconds": seconds}
    if rank == 0:
        write_outputs(cfg, model, tok, base)
    if world > 1:
        dist.barrier()
    return summary


@torch.no_grad()
def evaluate(model, tok, examples, collate_fn, loss_fn, count_fn, cfg, dev, ctx, rank=0, world=1):
    """Mean loss per target over the held-out rows (each rank takes its share); None without an eval split."""
    if not examples:
        return None
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    mine = examples[rank::world]
    for i in range(0, len(mine), cfg.batch_size):
        b = {k: v.to(dev) for k, v in collate_fn(mine[i:i + cfg.batch_size], tok.pad_id).items()}
        with ctx():
            lsum, _ = loss_fn(model, b)
        sums += torch.tensor([lsum.item(), count_fn(b)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(sums)
    model.train()
    return (sums[0] / sums[1]).item()


def write_outputs(cfg, model, tok, base):
    """<out>/adapter (PEFT layout, its config naming the parent) and <out>/model, the merged model in the precision
    the parent is stored in. Two folders, never one: transformers, finding adapter files beside merged weights,
    would apply the adapter a second time. Each folder is published whole or not at all."""
    out = Path(cfg.out)
    with M.atomic_dir(out / "adapter") as tmp:
        M.save_adapter(model, tmp, base_model_name_or_path=str(Path(base).resolve()))
    hf = M.read_json(Path(base) / "config.json")
    disk = getattr(torch, hf.get("torch_dtype") or hf.get("dtype") or "float32")
    with M.atomic_dir(out / "model") as tmp:
        if model.lm_head.weight.dtype == disk:
            M.save_pretrained(model, tok, tmp)
        else:
            full, _ = M.load(base, device="cpu", dtype=disk)  # merge into full-precision weights, not bf16 copies
            M.load_adapter(full, out / "adapter")
            M.save_pretrained(full, tok, tmp)


class StaleOutput(ValueError):
    """The output folder holds what another training (other settings, data or base) wrote."""


OUTPUTS = ("model", "adapter", "checkpoint", "summary.json", "train_config.json", "train.jsonl", "ref_logps.json")
OLD_LAYOUT = ("adapter_model.safetensors", "adapter_config.json", "model.safetensors", "config.json",
              "tokenizer.json", "tokenizer_config.json")   # merged model and adapter in <out> itself (before model/)
UNFINGERPRINTED = ("base", "data", "out", "log", "overwrite", "save_every")  # named by their sha256, or no effect


def fingerprint(cfg, rows, base):
    """What a training's result depends on: its settings, the sha256 of its data and of its base weights."""
    if rows is not None:
        data = hashlib.sha256(M.json_text(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    else:
        data = M._sha256(cfg.data)
    return {"config": {k: v for k, v in asdict(cfg).items() if k not in UNFINGERPRINTED},
            "data_sha256": data, "base_sha256": M.weights_sha256(base)}


def differences(old, new):
    """How a recorded fingerprint differs from this training's, in words ([] when they are equal)."""
    if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
        return ["it records no fingerprint of its settings and data (written by an older version)"]
    was, now = old["config"], new["config"]
    diff = [f"{k} {was.get(k)!r} (now {now.get(k)!r})" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    for key, what in (("data_sha256", "data sha256"), ("base_sha256", "base weights sha256")):
        if old.get(key) != new[key]:
            diff.append(f"{what} {str(old.get(key))[:12]}... (now {new[key][:12]}...)")
    return diff


def clear_outputs(out, log=""):
    """Delete what a training writes into `out` (and its log), and the files of the older one-folder layout."""
    out = Path(out)
    for name in OUTPUTS + OLD_LAYOUT:
        p = out / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    if log:
        Path(log).unlink(missing_ok=True)


def reusable(cfg, fp):
    """The summary when <out> holds this very training finished; None when there is nothing there or a checkpoint
    of this training to resume. What another training wrote there is a StaleOutput error naming the difference,
    unless cfg.overwrite, which deletes it first."""
    out = Path(cfg.out)
    if cfg.overwrite:
        if dist.is_initialized():   # formed by a caller (bootstrap): all looked at <out> before one clears
            dist.barrier()
        if os.environ.get("RANK", "0") == "0":   # under torchrun one process clears, before the group forms
            clear_outputs(out, cfg.log)
        if dist.is_initialized():
            dist.barrier()
        return None
    records = [(out / "summary.json", "finished output"), (out / "checkpoint" / "state.safetensors", "checkpoint"),
               (out / "train_config.json", "training's settings")]
    found = [(p, what) for p, what in records if p.exists()]
    for p, what in found:
        rec = checkpoint_state(p) if p.suffix == ".safetensors" else M.read_json(p)
        if diff := differences(rec.get("fingerprint"), fp):
            raise StaleOutput(f"{p}: this {what} comes from another training: {'; '.join(diff)}. Pass --overwrite "
                              f"to delete {out}'s training outputs and start over, or choose another --out.")
    if not found and (taken := [n for n in ("model", "adapter") + OLD_LAYOUT if (out / n).exists()]):
        raise StaleOutput(f"{out} already holds {', '.join(taken)}, not written by a training of this version; "
                          "pass --overwrite to replace them, or choose another --out.")
    published = all((out / d).is_dir() for d in ("model", "adapter"))   # else resume: the checkpoint republishes
    return M.read_json(out / "summary.json") if (out / "summary.json").exists() and published else None


def prepare(cfg, rows):
    """Check the settings, read the data, and see what <out> already holds: (located rows, base path, fingerprint,
    finished summary or None)."""
    check_config(cfg)
    located = load_rows(cfg, rows)
    base = M.default_base() if cfg.base == "default" else Path(cfg.base)
    M.load_config(base)   # a wrong --base is an error naming it, before anything is written
    fp = fingerprint(cfg, rows, base)
    return located, base, fp, reusable(cfg, fp)


def begin(cfg, fp):
    """<out>/train_config.json, the settings and fingerprint of the training that owns <out> from now on."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        M._atomic_text(Path(cfg.out) / "train_config.json", M.json_text({**asdict(cfg), "fingerprint": fp}, indent=2))


def train(cfg: SFTConfig, rows: list[dict] | None = None) -> dict:
    """Train a fresh LoRA on cfg.base with the SFT rows (or cfg.data); write <out>/model, <out>/adapter and
    <out>/summary.json. A finished or interrupted training of the same settings, data and base in <out> is
    reused or resumed; anything else there is a StaleOutput error unless cfg.overwrite."""
    located, _, fp, done = prepare(cfg, rows)
    if done:
        return done
    model, tok, base, dev, amp = setup(cfg)
    examples, dropped = encode_rows(located, sft_example(tok, cfg.max_len), cfg.skip_bad)
    begin(cfg, fp)
    train_ex, eval_ex = split(examples, cfg.eval_frac, cfg.seed)
    summary = fit(cfg, model, tok, base, dev, amp, train_ex, eval_ex, collate, sft_loss, sft_count, fingerprint=fp)
    return finish(cfg, summary, dropped, fp)


def finish(cfg, summary, dropped, fp=None):
    summary = {**summary, "dropped": dropped, "config": asdict(cfg), "fingerprint": fp}
    if not dist.is_initialized() or dist.get_rank() == 0:
        M._atomic_text(Path(cfg.out) / "summary.json", M.json_text(summary, indent=2))   # last: marks it finished
    return M._finite_json(summary)


def parse_config(cls, argv=None, description=None, rules=RULES):
    """argparse flags generated from a config dataclass: kebab-case, each with its comment as help.
    A value out of its range (rules) stops argparse with a one-line message and exit status 2."""
    import inspect
    helps = {}
    for c in reversed(cls.__mro__[:-1]):  # a subclass's comments override its parent's
        helps.update(re.findall(r"^\s+(\w+):.*?#\s*(.*)$", inspect.getsource(c), re.M))
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps.get(f.name))
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            p.add_argument(flag, type=_checked(typ, rules.get(f.name)), default=f.default, help=helps.get(f.name),
                           required=f.name in ("data", "out"))
    a = p.parse_args(argv)
    cfg = cls(**vars(a))
    try:
        check_config(cfg, rules)   # what one flag alone cannot tell (fp16 needs CUDA)
    except ValueError as e:
        p.error(str(e))
    return cfg


def _checked(typ, rule):
    """An argparse type: the conversion, then the setting's rule; a failure is argparse's one-line error."""
    def convert(text):
        try:
            value = typ(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n' if typ is int else ''} {typ.__name__}: {text!r}") from None
        if rule is not None and (msg := rule(value)) is not None:
            raise argparse.ArgumentTypeError(msg)
        return value
    convert.__name__ = typ.__name__
    return convert


def cli(cfg, run):
    """Run a training for the command line: an output folder of another training, or a run stopped by the weight
    checks, is a one-line error with exit status 1."""
    try:
        summary = run(cfg)
    except (StaleOutput, TrainingStopped) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(summary, indent=2))


def main(argv=None):
    cli(parse_config(SFTConfig, argv, __doc__.splitlines()[0]), train)


if __name__ == "__main__":
    main()
