"""Direct Preference Optimization with LoRA; the reference is the same model with its adapters switched off.

The loop, checkpoints, resume, precision and torchrun come from train.py (`fit`); this file adds the pair
data, the loss and the reference log-probabilities.
    python train_dpo.py --base DIR --data pairs.jsonl --out runs/x [--beta 0.1] [--loss-type sigmoid]
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import files
import model as M
from train import (RULES as TRAIN_RULES, Recipe, TrainConfig, check_config, cli, collate, encode_rows, fit,
                   parse_config, policy_logprobs, prepare, rule, setup, split, start_owning, write_summary)


@dataclass
class DPOConfig(TrainConfig):
    data: str = ""              # JSONL of {"prompt", "chosen", "rejected"}: message lists or texts (as TRL)
    epochs: int = 1             # passes over the pairs (unless max_steps is set)
    lr: float = 5e-5            # peak learning rate
    batch_size: int = 2         # pairs per micro-batch (per process): 2x rows in one forward
    beta: float = 0.1           # strength of the KL penalty to the reference
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0  # conservative DPO: assumed share of flipped labels (sigmoid only)
    precompute_ref: bool = False  # compute the reference log-probs once, first (<out>/ref_logps.json)



RULES = {**TRAIN_RULES,
         "beta": rule(lambda v: math.isfinite(v) and v > 0,
                      "a finite number > 0 (0 learns nothing; < 0 prefers the rejected)"),
         "loss_type": rule(lambda v: v in ("sigmoid", "ipo"), "sigmoid or ipo"),
         "label_smoothing": rule(lambda v: 0 <= v < 0.5,
                                 "in [0, 0.5) (0.5 learns nothing; more prefers the rejected)")}


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0,
             loss_type="sigmoid"):
    """Per-pair losses and the implicit rewards beta * (policy - reference), detached, for logging."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":  # Rafailov et al. eq. 7; smoothing as cDPO (DPO authors' code, torchtune)
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":    # Azar et al. eq. 17: regress h to 1 / (2 beta)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r}: choose sigmoid or ipo")
    chosen_reward = beta * (policy_chosen - ref_chosen).detach()
    rejected_reward = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_reward, rejected_reward



def _messages(x, role, name):
    if isinstance(x, str):
        return [{"role": role, "content": x}]
    if isinstance(x, list) and x and all(isinstance(m, dict) for m in x):
        return x
    raise ValueError(f'"{name}" must be a text or a non-empty list of messages')


def dpo_example(tok, max_len):
    """A pair -> {"chosen", "rejected": {ids, mask}}: targets are the response tokens after the prompt."""
    def encode(row):
        for k in ("prompt", "chosen", "rejected"):
            if k not in row:
                raise ValueError(f'missing field "{k}"')
        prompt = _messages(row["prompt"], "user", "prompt")
        resp = {k: _messages(row[k], "assistant", k) for k in ("chosen", "rejected")}
        for k, msgs in resp.items():
            if not any(m.get("role") == "assistant" and str(m.get("content", "")).strip() for m in msgs):
                raise ValueError(f"empty {k} response")
        if resp["chosen"] == resp["rejected"]:
            raise ValueError("chosen and rejected are identical: the pair teaches nothing")
        # the prompt with its generation header marks where the answer starts (TRL #4147)
        n_prompt = len(tok.encode_chat(prompt, add_generation_prompt=True)[0])
        ex = {}
        for k, msgs in resp.items():
            ids, mask = tok.encode_chat(prompt + msgs)
            mask = ([0] * n_prompt + mask[n_prompt:])[:max_len]
            if not any(mask[1:]):
                return None  # the response was cut away entirely
            ex[k] = {"ids": ids[:max_len], "mask": mask}
        ex["length"] = len(ex["chosen"]["ids"]) + len(ex["rejected"]["ids"])
        return ex
    return encode


def collate_pairs(examples, pad_id):
    """Chosen rows then rejected rows in one batch, so both go through the model in one forward."""
    batch = collate([e["chosen"] for e in examples] + [e["rejected"] for e in examples], pad_id)
    if "ref" in examples[0]:
        batch["ref"] = torch.tensor([e["ref"][0] for e in examples] + [e["ref"][1] for e in examples],
                                    dtype=torch.float32)
    return batch


def count_pairs(batch):
    return len(batch["tokens"]) // 2


def response_logprobs(model, batch, loss_type):
    """Summed response log-probs per row (fp32); IPO uses the mean per token, as TRL does."""
    lp = policy_logprobs(model, batch)
    return lp / batch["loss_mask"][:, 1:].sum(-1) if loss_type == "ipo" else lp


def make_loss(cfg):
    def loss_fn(model, batch):
        """Summed DPO loss of the batch's pairs, with reward statistics summed for the loop to average."""
        inner = getattr(model, "module", model)
        if "ref" in batch:
            ref = batch["ref"]
        else:  # the reference: the same weights with every adapter off, no second copy (TRL #3168)
            with torch.no_grad(), M.lora_disabled(inner):
                ref = response_logprobs(inner, batch, cfg.loss_type)
        pol = response_logprobs(model, batch, cfg.loss_type)
        n = len(pol) // 2
        losses, rc, rr = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], cfg.beta, cfg.label_smoothing,
                                  cfg.loss_type)
        pd = pol.detach()
        # ipo's is a mean already
        per_token = pd if cfg.loss_type == "ipo" else pd / batch["loss_mask"][:, 1:].sum(-1)
        return losses.sum(), {"rewards/chosen": rc.sum(), "rewards/rejected": rr.sum(),
                              "rewards/accuracy": (rc > rr).float().sum(), "rewards/margin": (rc - rr).sum(),
                              "logps/chosen": pd[:n].sum(), "logps/rejected": pd[n:].sum(),
                              # for the loop's collapse check: a dead policy sits at ln(vocab) per token
                              "nll_per_token": -(per_token[:n] + per_token[n:]).sum() / 2}
    return loss_fn


@torch.no_grad()
def precompute_ref(cfg, job, examples):
    """Reference log-probs of every pair, computed once (each rank its share) and kept in
    <out>/ref_logps.json."""
    path = Path(cfg.out) / "ref_logps.json"
    if path.exists() and len(saved := json.loads(path.read_text())) == len(examples):
        refs = saved
    else:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        out = torch.zeros(len(examples), 2, dtype=torch.float64)
        idx = list(range(rank, len(examples), world))
        model = job.model
        model.eval()
        with M.lora_disabled(model), job.autocast():
            for i in range(0, len(idx), cfg.batch_size):
                part = idx[i:i + cfg.batch_size]
                b = {k: v.to(job.dev) for k, v in collate_pairs([examples[j] for j in part],
                                                                job.tok.pad_id).items()}
                lp = response_logprobs(model, b, cfg.loss_type).double().cpu()
                out[part] = torch.stack([lp[:len(part)], lp[len(part):]], 1)
        if world > 1:
            dist.all_reduce(out)
        refs = out.tolist()
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            files.atomic_text(path, files.json_text(refs))
    for e, r in zip(examples, refs):
        e["ref"] = r


def train(cfg: DPOConfig, rows: list[dict] | None = None) -> dict:
    """Train a fresh LoRA on cfg.base with DPO on the pairs (or cfg.data); write <out>/model, <out>/adapter
    and <out>/summary.json. Reuse and resume as train_sft.train: only what this very training wrote."""
    check_config(cfg, RULES)
    located, _, fp, done = prepare(cfg, rows)
    if done:
        return done
    job = setup(cfg)
    examples, dropped = encode_rows(located, dpo_example(job.tok, cfg.max_len), cfg.skip_bad)
    start_owning(cfg, fp)
    if cfg.precompute_ref:
        precompute_ref(cfg, job, examples)
    train_ex, eval_ex = split(examples, cfg.eval_frac, cfg.seed)
    summary = fit(cfg, job, Recipe(collate_pairs, make_loss(cfg), count_pairs), train_ex, eval_ex,
                  fingerprint=fp)
    return write_summary(cfg, summary, dropped, fp)


def main(argv=None):
    cli(parse_config(DPOConfig, argv, __doc__.splitlines()[0], RULES), train)


if __name__ == "__main__":
    main()
