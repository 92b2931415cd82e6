"""Supervised fine-tuning with LoRA: the loss is the mean negative log-likelihood of the assistant tokens
only.

The loop, checkpoints, resume, precision and torchrun come from train.py; this recipe adds the chat rows and
the masked loss.
    python train_sft.py --base default --data data.jsonl --out runs/x   (writes runs/x/model, runs/x/adapter,
    ...)
    torchrun --nproc_per_node=2 train_sft.py ...   (DistributedDataParallel; gloo on CPU, NCCL on CUDA)
"""
from dataclasses import dataclass

from train import (Recipe, TrainConfig, cli, collate, encode_rows, fit, parse_config, policy_logprobs,
                   prepare, setup, split, start_owning, write_summary)




@dataclass
class SFTConfig(TrainConfig):
    data: str = ""              # JSONL of {"messages": [...]}; may be empty when rows are passed to train()


def sft_example(tok, max_len):
    """A chat row -> {"ids", "mask"}: the mask marks the assistant tokens, the targets. None when cutting the
    row to max_len leaves no target."""
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


def sft_loss(model, batch):
    """Masked cross-entropy, summed: -sum over target tokens of log p(token | the tokens before it). The loop
    divides by the step's target count (sft_count), so every target token weighs the same."""
    return -policy_logprobs(model, batch).sum(), {}


def sft_count(batch):
    """Target tokens: loss_mask shifted to the token each position predicts."""
    return int(batch["loss_mask"][:, 1:].sum())


def train(cfg: SFTConfig, rows: list[dict] | None = None) -> dict:
    """Train a fresh LoRA on cfg.base with the SFT rows (or cfg.data); write <out>/model, <out>/adapter and
    <out>/summary.json. A finished or interrupted training of the same settings, data and base in <out> is
    reused or resumed; anything else there is a StaleOutput error unless cfg.overwrite."""
    located, _, fp, done = prepare(cfg, rows)
    if done:
        return done
    job = setup(cfg)
    examples, dropped = encode_rows(located, sft_example(job.tok, cfg.max_len), cfg.skip_bad)
    start_owning(cfg, fp)
    train_ex, eval_ex = split(examples, cfg.eval_frac, cfg.seed)
    summary = fit(cfg, job, Recipe(collate, sft_loss, sft_count), train_ex, eval_ex, fingerprint=fp)
    return write_summary(cfg, summary, dropped, fp)


def main(argv=None):
    cli(parse_config(SFTConfig, argv, __doc__.splitlines()[0]), train)


if __name__ == "__main__":
    main()
