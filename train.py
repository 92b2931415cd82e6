"""The training loop that SFT and DPO share: LoRA on a frozen base, mixed precision, exact resume, torchrun.

A recipe (train_sft.py, train_dpo.py) reads its rows into examples and gives `fit` a `Recipe`: how to batch
them, the summed loss of a batch and its number of targets. Everything else lives here: the settings and their
checks, the length-bucketed batch order, the chunked target log-probabilities, the learning-rate schedule, the
precision, checkpoints, the weight checks, the output folders and the command line made from a config class.
"""
import argparse
import contextlib
import ctypes
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

import builtin
import files
import model as M


@dataclass
class TrainConfig:
    base: str = "default"       # parent model: a Hugging Face directory, or "default" (the built-in SmolLM2)
    data: str = ""              # JSONL of {"messages": [...]}; may be empty when rows are passed to train()
    out: str = "out"            # output folder: model/ (merged), adapter/ (PEFT), checkpoint/, logs
    epochs: int = 3             # passes over the training split (unless max_steps is set)
    lr: float = 2e-4            # peak learning rate
    min_lr_ratio: float = 0.1   # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0   # AdamW weight decay on the LoRA weights
    grad_clip: float = 1.0      # max gradient norm (0: no clipping)
    lora_r: int = 16            # LoRA rank
    lora_alpha: float = 32.0    # LoRA scale is alpha / r
    lora_dropout: float = 0.0   # dropout on the LoRA input
    lora_targets: str = ",".join(M.LORA_TARGETS)  # comma-separated module names
    batch_size: int = 4         # rows per micro-batch (per process)
    grad_accum: int = 1         # micro-batches per optimizer step (per process)
    max_len: int = 512          # tokens per row; longer rows are cut, rows left with no target are dropped
    precision: str = "auto"     # auto | fp32 | bf16 | fp16 (auto: bf16 on bf16 GPUs and CPUs, else fp32)
    seed: int = 0               # data order, split, LoRA init and dropout
    warmup: int = 10            # linear warmup steps
    eval_frac: float = 0.05     # share of rows held out for the eval loss
    save_every: int = 100       # checkpoint every N optimizer steps (and always at the end)
    max_steps: int = 0          # stop after N optimizer steps (0: run all epochs)
    log: str = ""               # JSONL log of every step (default <out>/train.jsonl)
    device: str = "auto"        # auto | cpu | cuda
    grad_checkpoint: bool = False  # recompute each block's activations in the backward (less memory)
    overwrite: bool = False     # delete <out>'s training outputs first (else only its own are reused)


    skip_bad: bool = False      # drop malformed rows (counted) instead of stopping with file:line


def rule(test, want):
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
    "epochs": rule(lambda v: v > 0, "> 0"),
    "lr": rule(lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "min_lr_ratio": rule(lambda v: 0 <= v <= 1, "in [0, 1]"),
    "weight_decay": rule(lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "grad_clip": rule(lambda v: _finite(v) and v >= 0, "a finite number >= 0 (0: no clipping)"),
    "lora_r": rule(lambda v: v > 0, "> 0"),
    "lora_alpha": rule(lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "lora_dropout": rule(lambda v: 0 <= v < 1, "in [0, 1)"),
    "lora_targets": rule(lambda v: all(re.fullmatch(r"\w+", t) for t in v.split(",")),
                         "comma-separated module names"),
    "batch_size": rule(lambda v: v > 0, "> 0"),
    "grad_accum": rule(lambda v: v > 0, "> 0"),
    "max_len": rule(lambda v: v > 1, "> 1"),
    "precision": rule(lambda v: v in ("auto", "fp32", "bf16", "fp16"), "auto, fp32, bf16 or fp16"),
    "warmup": rule(lambda v: v >= 0, ">= 0"),
    "eval_frac": rule(lambda v: 0 <= v < 1, "in [0, 1)"),
    "save_every": rule(lambda v: v > 0, "> 0"),
    "max_steps": rule(lambda v: v >= 0, ">= 0 (0: run all epochs)"),
    "device": _device_rule,
}


def check_config(cfg, rules=RULES):
    """Every setting in range, else a ValueError naming each one that is not."""
    bad = [f"{name}: {msg}" for name, rule in rules.items() if (msg := rule(getattr(cfg, name))) is not None]
    if cfg.precision == "fp16" and (cfg.device == "cpu" or (cfg.device == "auto"
                                                            and not torch.cuda.is_available())):
        bad.append("precision: fp16 needs CUDA (its gradient scaler); on CPU use bf16 or fp32")
    if bad:
        raise ValueError("bad settings: " + "; ".join(bad))


# ----------------------------------------------------------------------------- data


def load_rows(cfg, rows):
    """[(where, row)] from the rows given in memory or from cfg.data; no rows at all is an error."""
    rows = [(f"rows[{i}]", r)
            for i, r in enumerate(rows)] if rows is not None else files.located_jsonl(cfg.data, cfg.skip_bad)
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
                # d logp / d logits = onehot - softmax
                p = logits.sub_(lse[:, None]).exp_().neg_()
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


def get_lr(step, cfg, total):
    """Linear warmup, then cosine from lr down to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / (cfg.warmup + 1)
    progress = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def resolve_precision(cfg):
    """(device, weight dtype, autocast dtype or None) for cfg.device and cfg.precision."""
    dev = M.pick_device(cfg.device)
    if dist.is_initialized() and dev == "cuda":
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    p = cfg.precision
    if p == "auto":
        # measured on a 2-core EPYC with AVX-512 BF16 and no AMX: LoRA SFT 2x faster in bf16
        # (bench/bench_train.py)
        fast_bf16 = torch.cuda.is_bf16_supported() if dev.startswith("cuda") else M.cpu_has_bf16()
        p = "bf16" if fast_bf16 else "fp32"
        if not fast_bf16 and dev.startswith("cuda"):
            p = "fp16"

    if p not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision {p!r}: choose auto, fp32, bf16 or fp16")
    if p == "fp16" and not dev.startswith("cuda"):
        raise ValueError("fp16 needs CUDA (its gradient scaler); on CPU use bf16 or fp32")
    # the frozen base is stored in the low precision itself: autocast would re-cast fp32 weights every step
    wdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[p]
    return dev, wdtype, (None if p == "fp32" else wdtype)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, model, opt, scaler, state):
    """Adapter, optimizer moments and RNG in one safetensors file, the rest as JSON in its header: one atomic
    write. Weights that are not all finite are never saved."""
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
    files.atomic_write(path, lambda p: save_file(tensors, p, metadata={"state": files.json_text(state)}))


def checkpoint_state(path):
    """The JSON state in a checkpoint's header; a damaged file is an error naming it."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["state"])
    except Exception as e:  # safetensors' own error, a missing key, bad JSON: the file is not one of ours
        raise ValueError(f"{path}: not a readable training checkpoint ({e!r}); "
                         "pass --overwrite to start over") from None


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


@dataclass
class Recipe:
    """What a training recipe (train_sft.py, train_dpo.py) gives the shared loop."""
    collate: Callable   # (examples, pad_id) -> a batch of tensors
    loss: Callable      # (model, batch) -> (summed loss, {statistic: summed value})
    count: Callable     # batch -> its number of targets: a step's loss is divided by its whole count


@dataclass
class Job:
    """The model being trained and where it runs (setup() makes it)."""
    model: nn.Module
    tok: object
    base: Path              # the parent model's folder
    dev: str
    amp: torch.dtype | None  # the autocast dtype, None in fp32

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dev.split(":")[0], dtype=self.amp)


def setup(cfg):
    """Process group (under torchrun), base model in the training precision with a fresh LoRA."""
    if "RANK" in os.environ and not dist.is_initialized():
        # NCCL for CUDA tensors, gloo for the loop's few CPU numbers (loss sums, DPO's reference log-probs)
        cuda = torch.cuda.is_available() and cfg.device != "cpu"
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    dev, wdtype, amp = resolve_precision(cfg)
    if dev.startswith("cuda"):
        torch.cuda.set_device(dev)
    else:
        keep_freed_memory()
    base = builtin.default_base() if cfg.base == "default" else Path(cfg.base)
    model, tok = M.load(base, device=dev, dtype=wdtype)
    torch.manual_seed(cfg.seed)  # the same LoRA init on every rank
    M.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_targets.split(",")))
    model.checkpointing = cfg.grad_checkpoint
    return Job(model, tok, base, dev, amp)


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
    """The log's lines up to `step`: lines logged after the last checkpoint and a torn last line are
    dropped."""
    keep = []
    for line in Path(path).read_bytes().decode("utf-8", "replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(line)
    return keep


@dataclass
class Loop:
    """One training loop: what start() sets up, and the progress each step moves on."""
    cfg: TrainConfig
    job: Job
    recipe: Recipe
    train_ex: list
    fingerprint: dict | None
    rank: int
    world: int
    lengths: list            # tokens of each training example: batches group similar lengths
    steps_per_epoch: int
    total: int               # optimizer steps of the whole training
    params: list             # the LoRA weights
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None   # fp16 only
    ddp: nn.Module           # the model, wrapped in DistributedDataParallel under torchrun
    step: int = 0
    tokens: int = 0          # target tokens trained on
    seconds: float = 0.0
    loss: float = math.nan   # of the last step
    running: dict = field(default_factory=dict)   # running means (EMA) of the recipe's statistics
    saved: int | None = None  # the step of the last checkpoint
    dead: int = 0            # steps in a row that look collapsed

    @property
    def ckpt(self):
        return Path(self.cfg.out) / "checkpoint" / "state.safetensors"

    @property
    def log_path(self):
        return Path(self.cfg.log or Path(self.cfg.out) / "train.jsonl")


def start(cfg, job, recipe, train_ex, fingerprint):
    """The loop's optimizer and step plan, resumed from <out>'s checkpoint when there is one (train() has
    checked that it was made by this very training); the log cut back to that checkpoint."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    lengths = [e["length"] if "length" in e else len(e["ids"]) for e in train_ex]
    n_micro = len(epoch_batches(lengths, cfg.batch_size, cfg.seed, 0))
    steps_per_epoch = math.ceil(n_micro / (cfg.grad_accum * world))
    params = M.lora_parameters(job.model)
    loop = Loop(cfg, job, recipe, train_ex, fingerprint, rank, world, lengths, steps_per_epoch,
                total=cfg.max_steps or steps_per_epoch * cfg.epochs, params=params,
                opt=torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95)),
                scaler=torch.amp.GradScaler("cuda") if job.amp == torch.float16 else None,
                ddp=torch.nn.parallel.DistributedDataParallel(job.model) if world > 1 else job.model)
    if loop.ckpt.exists():
        st = load_checkpoint(loop.ckpt, job.model, loop.opt, loop.scaler)
        loop.step, loop.tokens, loop.seconds, loop.loss = st["step"], st["tokens"], st["seconds"], st["loss"]
        loop.running, loop.saved = st["running"], st["step"]
    if rank == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        # drop lines a killed run logged after its last checkpoint, a torn last line too
        if loop.log_path.exists():
            lines = log_lines(loop.log_path, loop.step)
            files.atomic_text(loop.log_path, "".join(line + "\n" for line in lines))
    return loop


def step_batches(loop):
    """The micro-batches of this optimizer step over all ranks: a slice of the epoch's seeded order."""
    cfg, per_step = loop.cfg, loop.cfg.grad_accum * loop.world
    epoch, k = divmod(loop.step, loop.steps_per_epoch)
    micro = epoch_batches(loop.lengths, cfg.batch_size, cfg.seed, epoch)[k * per_step:(k + 1) * per_step]
    return [loop.recipe.collate([loop.train_ex[i] for i in b], loop.job.tok.pad_id) for b in micro]


def accumulate(loop, batches, n_target):
    """Forward and backward over this rank's share of the step's micro-batches, each loss divided by the whole
    step's target count. Returns the summed (loss, target tokens) and statistics, over all ranks."""
    world, mine = loop.world, batches[loop.rank::loop.world]
    sums, stats = torch.zeros(2), {}
    for j, b in enumerate(mine or batches[:1]):  # a rank with no batch still joins DDP's all-reduce
        b = {key: v.to(loop.job.dev) for key, v in b.items()}
        last = j == max(len(mine), 1) - 1
        with (loop.ddp.no_sync() if world > 1 and not last
              else contextlib.nullcontext()), loop.job.autocast():
            lsum, st = loop.recipe.loss(loop.ddp, b)
        # DDP averages over ranks: scale by world so the update is the sum over the global step / n_target
        part = lsum * (world / n_target) * (1.0 if mine else 0.0)
        (loop.scaler.scale(part) if loop.scaler else part).backward()
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
    return sums, stats


def update(loop, loss):
    """Unscale, clip and apply the gradients; a non-finite loss or update stops the run. Returns the gradient
    norm."""
    if not math.isfinite(loss):
        raise TrainingStopped(f"step {loop.step + 1}: loss is {loss}; stopping "
                              f"({_kept(loop.ckpt, loop.saved)}). "
                              "Try a lower --lr or --precision fp32.")
    if loop.scaler:
        loop.scaler.unscale_(loop.opt)
    clip = loop.cfg.grad_clip if loop.cfg.grad_clip > 0 else float("inf")
    gnorm = torch.nn.utils.clip_grad_norm_(loop.params, clip)
    if loop.scaler:
        loop.scaler.step(loop.opt)
        loop.scaler.update()
    else:
        loop.opt.step()
    loop.opt.zero_grad(set_to_none=True)
    if not bool(torch.stack([torch.isfinite(p).all() for p in loop.params]).all()):
        raise TrainingStopped(f"step {loop.step + 1}: the update made the adapter weights NaN or Inf; "
                              f"stopping "
                              f"({_kept(loop.ckpt, loop.saved)}). Try a lower --lr or --precision fp32.")
    return float(gnorm)


def record(loop, loss, sums, stats, n_target, gnorm, lr, dt):
    """Move the progress on by one step; returns the step's log record."""
    # a collapsed model predicts the uniform distribution: its loss sits at ln(vocab) and nothing moves it
    uniform = math.log(loop.job.model.config.vocab_size)
    # DPO logs it; SFT's is the loss
    nll = stats["nll_per_token"] / n_target if "nll_per_token" in stats else loss
    loop.dead = loop.dead + 1 if gnorm <= COLLAPSE_GRAD and abs(nll - uniform) <= 0.01 * uniform else 0
    epoch = loop.step // loop.steps_per_epoch
    loop.step, loop.tokens = loop.step + 1, loop.tokens + int(sums[1])
    loop.seconds, loop.loss = loop.seconds + dt, loss

    stats = {key: v / n_target for key, v in stats.items()}
    # running means (EMA): with one pair a step, DPO's accuracy is 0 or 1 (TRL #2371)
    loop.running = {key: v if key not in loop.running else 0.9 * loop.running[key] + 0.1 * v
                    for key, v in stats.items()}
    return {"step": loop.step, "epoch": epoch, "loss": round(loss, 6), "lr": lr, "grad_norm": round(gnorm, 6),
            "tokens_per_s": round(float(sums[1]) / dt, 1), **{key: round(v, 6) for key, v in stats.items()},
            **{f"running/{key}": round(v, 6) for key, v in loop.running.items()}}


def publish(loop, rec, bar):
    """Rank 0: the step's log line and progress bar, and a checkpoint every save_every steps and at the end
    (never of a model that looks collapsed)."""
    with open(loop.log_path, "a") as f:
        f.write(files.json_text(rec) + "\n")
    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
    bar.update()
    if (loop.step % loop.cfg.save_every == 0 or loop.step == loop.total) and not loop.dead:
        state = {"step": loop.step, "tokens": loop.tokens, "seconds": loop.seconds, "loss": loop.loss,
                 "running": loop.running, "total": loop.total, "config": asdict(loop.cfg),
                 "fingerprint": loop.fingerprint}
        save_checkpoint(loop.ckpt, loop.job.model, loop.opt, loop.scaler, state)
        loop.saved = loop.step


def check_collapse(loop, gnorm):
    """Stop when the model has sat at a uniform guess for COLLAPSE_STEPS steps (or at the last step: its model
    is not published either)."""
    if loop.dead >= COLLAPSE_STEPS or (loop.dead and loop.step == loop.total):
        uniform = math.log(loop.job.model.config.vocab_size)
        late = loop.saved is not None and loop.saved >= loop.step - loop.dead   # saved after the fatal update
        raise TrainingStopped(
            f"step {loop.step}: training collapsed: the loss has sat at ln(vocab) = {uniform:.3f} (a uniform "
            f"guess) with a gradient norm of {gnorm:.1e} for {loop.dead} step(s); stopping "
            f"({_kept(loop.ckpt, loop.saved)}"
            + (f", but the update of step {loop.step - loop.dead} had already collapsed it" if late else "")
            + "). Try a lower --lr.")


def fit(cfg, job, recipe, train_ex, eval_ex, fingerprint=None):
    """Train LoRA on train_ex; evaluate on eval_ex; checkpoint, resume, and write the outputs. Returns the
    summary. The weights are checked after every update: non-finite weights or a collapsed model stop the run,
    and only finite weights are ever checkpointed or published. `fingerprint` is recorded in each
    checkpoint."""
    loop = start(cfg, job, recipe, train_ex, fingerprint)
    bar = tqdm(total=loop.total, initial=loop.step, disable=loop.rank != 0,
               desc=f"train {Path(cfg.out).name}",
               unit="step")
    job.model.train()
    while loop.step < loop.total:
        batches = step_batches(loop)
        n_target = sum(recipe.count(b) for b in batches)  # the whole step's targets, over all ranks
        lr = get_lr(loop.step, cfg, loop.total)
        for g in loop.opt.param_groups:
            g["lr"] = lr
        # dropout: a function of the step
        torch.manual_seed(cfg.seed * 1000003 + loop.step * loop.world + loop.rank)
        t0 = time.perf_counter()
        sums, stats = accumulate(loop, batches, n_target)
        loss = sums[0].item() / n_target
        gnorm = update(loop, loss)
        rec = record(loop, loss, sums, stats, n_target, gnorm, lr, time.perf_counter() - t0)
        if loop.rank == 0:
            publish(loop, rec, bar)
        check_collapse(loop, gnorm)
    bar.close()
    summary = {"steps": loop.step, "train_loss": loop.loss,
               "eval_loss": eval_loss(job, recipe, eval_ex, cfg.batch_size, loop.rank, loop.world),
               "tokens": loop.tokens, "tokens_per_s": loop.tokens / loop.seconds if loop.seconds else 0.0,
               "seconds": loop.seconds}
    if loop.rank == 0:
        write_outputs(cfg, job.model, job.tok, job.base)
    if loop.world > 1:
        dist.barrier()
    return summary


@torch.no_grad()
def eval_loss(job, recipe, examples, batch_size, rank=0, world=1):
    """Mean loss per target over the held-out rows (each rank takes its share); None without an eval split."""
    if not examples:
        return None
    job.model.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    mine = examples[rank::world]
    for i in range(0, len(mine), batch_size):
        b = {k: v.to(job.dev) for k, v in recipe.collate(mine[i:i + batch_size], job.tok.pad_id).items()}
        with job.autocast():
            lsum, _ = recipe.loss(job.model, b)
        sums += torch.tensor([lsum.item(), recipe.count(b)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(sums)
    job.model.train()
    return (sums[0] / sums[1]).item()


# ----------------------------------------------------------------------------- the output folder

def write_outputs(cfg, model, tok, base):
    """<out>/adapter (PEFT layout, its config naming the parent) and <out>/model, the merged model in the
    precision the parent is stored in. Two folders, never one: transformers, finding adapter files beside
    merged weights, would apply the adapter a second time. Each folder is published whole or not at all."""
    out = Path(cfg.out)
    with files.atomic_dir(out / "adapter") as tmp:
        M.save_adapter(model, tmp, base_model_name_or_path=str(Path(base).resolve()))
    hf = files.read_json(Path(base) / "config.json")
    disk = getattr(torch, hf.get("torch_dtype") or hf.get("dtype") or "float32")
    with files.atomic_dir(out / "model") as tmp:
        if model.lm_head.weight.dtype == disk:
            M.save_pretrained(model, tok, tmp)
        else:
            # merge into full-precision weights, not bf16 copies
            full, _ = M.load(base, device="cpu", dtype=disk)
            M.load_adapter(full, out / "adapter")
            M.save_pretrained(full, tok, tmp)


class StaleOutput(ValueError):
    """The output folder holds what another training (other settings, data or base) wrote."""


OUTPUTS = ("model", "adapter", "checkpoint", "summary.json", "train_config.json", "train.jsonl",
           "ref_logps.json")
OLD_LAYOUT = ("adapter_model.safetensors", "adapter_config.json", "model.safetensors", "config.json",
              # merged model and adapter in <out> itself (before model/)
              "tokenizer.json", "tokenizer_config.json")
# named by their sha256, or no effect
UNFINGERPRINTED = ("base", "data", "out", "log", "overwrite", "save_every")


def fingerprint(cfg, rows, base):
    """What a training's result depends on: its settings, the sha256 of its data and of its base weights."""
    if rows is not None:
        data = hashlib.sha256(files.json_text(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    else:
        data = files.sha256_file(cfg.data)
    return {"config": {k: v for k, v in asdict(cfg).items() if k not in UNFINGERPRINTED},
            "data_sha256": data, "base_sha256": files.weights_sha256(base)}


def differences(old, new):
    """How a recorded fingerprint differs from this training's, in words ([] when they are equal)."""
    if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
        return ["it records no fingerprint of its settings and data (written by an older version)"]
    was, now = old["config"], new["config"]
    diff = [f"{k} {was.get(k)!r} (now {now.get(k)!r})" for k in sorted(set(was) | set(now))
            if was.get(k) != now.get(k)]
    for key, what in (("data_sha256", "data sha256"), ("base_sha256", "base weights sha256")):
        if old.get(key) != new[key]:
            diff.append(f"{what} {str(old.get(key))[:12]}... (now {new[key][:12]}...)")
    return diff


def clear_outputs(out, log=""):
    """Delete what a training writes into `out` (and its log), and the files of the older one-folder
    layout."""
    out = Path(out)
    for name in OUTPUTS + OLD_LAYOUT:
        p = out / name
        files.remove(p)
    if log:
        Path(log).unlink(missing_ok=True)


def reusable(cfg, fp):
    """The summary when <out> holds this very training finished; None when there is nothing there or a
    checkpoint of this training to resume. What another training wrote there is a StaleOutput error naming the
    difference, unless cfg.overwrite, which deletes it first."""
    out = Path(cfg.out)
    if cfg.overwrite:
        if dist.is_initialized():   # formed by a caller (bootstrap): all looked at <out> before one clears
            dist.barrier()
        if os.environ.get("RANK", "0") == "0":   # under torchrun one process clears, before the group forms
            clear_outputs(out, cfg.log)
        if dist.is_initialized():
            dist.barrier()
        return None
    records = [(out / "summary.json", "finished output"),
               (out / "checkpoint" / "state.safetensors", "checkpoint"),
               (out / "train_config.json", "training's settings")]
    found = [(p, what) for p, what in records if p.exists()]
    for p, what in found:
        rec = checkpoint_state(p) if p.suffix == ".safetensors" else files.read_json(p)
        if diff := differences(rec.get("fingerprint"), fp):
            raise StaleOutput(f"{p}: this {what} comes from another training: {'; '.join(diff)}. Pass "
                              f"--overwrite "
                              f"to delete {out}'s training outputs and start over, or choose another --out.")
    if not found and (taken := [n for n in ("model", "adapter") + OLD_LAYOUT if (out / n).exists()]):
        raise StaleOutput(f"{out} already holds {', '.join(taken)}, not written by a training of this "
                          f"version; "
                          "pass --overwrite to replace them, or choose another --out.")
    # else resume: the checkpoint republishes
    published = all((out / d).is_dir() for d in ("model", "adapter"))
    return files.read_json(out / "summary.json") if (out / "summary.json").exists() and published else None


def prepare(cfg, rows):
    """Check the settings, read the data, and see what <out> already holds: (located rows, base path,
    fingerprint, finished summary or None)."""
    check_config(cfg)
    located = load_rows(cfg, rows)
    base = builtin.default_base() if cfg.base == "default" else Path(cfg.base)
    M.load_config(base)   # a wrong --base is an error naming it, before anything is written
    fp = fingerprint(cfg, rows, base)
    return located, base, fp, reusable(cfg, fp)


def start_owning(cfg, fp):
    """<out>/train_config.json, the settings and fingerprint of the training that owns <out> from now on."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        files.atomic_text(Path(cfg.out) / "train_config.json",
                          files.json_text({**asdict(cfg), "fingerprint": fp}, indent=2))


def write_summary(cfg, summary, dropped, fp=None):
    """<out>/summary.json, written last: its presence marks the training finished. Returns the summary."""
    summary = {**summary, "dropped": dropped, "config": asdict(cfg), "fingerprint": fp}
    if not dist.is_initialized() or dist.get_rank() == 0:
        # last: marks it finished
        files.atomic_text(Path(cfg.out) / "summary.json", files.json_text(summary, indent=2))
    return files.finite_json(summary)


# ----------------------------------------------------------------------------- the command line

def parse_config(cls, argv=None, description=None, rules=RULES):
    """argparse flags generated from a config dataclass: kebab-case, each with its comment as help.
    A value out of its range (rules) stops argparse with a one-line message and exit status 2."""
    import inspect
    helps = {}
    for c in reversed(cls.__mro__[:-1]):  # a subclass's comments override its parent's
        helps.update(re.findall(r"^\s+(\w+):.*?#\s*(.*)$", inspect.getsource(c), re.M))
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                           help=helps.get(f.name))
        else:
            typ = {"int": int, "float": float,
                   "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            p.add_argument(flag, type=_checked(typ, rules.get(f.name)), default=f.default,
                           help=helps.get(f.name),
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
            article = "an" if typ is int else "a"
            raise argparse.ArgumentTypeError(f"not {article} {typ.__name__}: {text!r}") from None

        if rule is not None and (msg := rule(value)) is not None:
            raise argparse.ArgumentTypeError(msg)
        return value
    convert.__name__ = typ.__name__
    return convert


def cli(cfg, run):
    """Run a training for the command line: an output folder of another training, or a run stopped by the
    weight checks, is a one-line error with exit status 1."""
    try:
        summary = run(cfg)
    except (StaleOutput, TrainingStopped) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(summary, indent=2))

