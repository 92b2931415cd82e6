"""DPO step throughput and peak RSS on the default model, beside an SFT step over the same tokens, and the
same DPO step written with transformers + peft (reference = adapter off) as a ratio.

Pairs of 256-token responses' rows (prompt 32 tokens, response 224), 2 pairs a step = 4 x 256 tokens,
LoRA r=16 on all seven projections. Each configuration runs in its own process (its own peak RSS).
    python bench/bench_dpo.py [--threads 2] [--pairs 2] [--seq 256]
"""
import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import builtin  # noqa: E402
import model as M  # noqa: E402
import train_dpo as D  # noqa: E402
import train  # noqa: E402
import train_sft as sft  # noqa: E402
from bench_train import TARGETS, best_step_seconds, peak_rss_gb, run_configs  # noqa: E402


def batch(pairs, seq, prompt=32):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, 40000, (2 * pairs, seq), generator=g)
    tokens[pairs:, :prompt] = tokens[:pairs, :prompt]  # chosen and rejected share the prompt
    mask = torch.ones_like(tokens)
    loss_mask = mask.clone()
    loss_mask[:, :prompt] = 0
    return {"tokens": tokens, "attention_mask": mask, "loss_mask": loss_mask}


def run_one(name, pairs, seq, steps, repeat):
    impl, precision = name.split(":")
    if precision.endswith("+malloc"):  # give theirs the heap setting ours makes (train.keep_freed_memory)
        precision = precision.removesuffix("+malloc")
        train.keep_freed_memory()
    b = batch(pairs, seq)
    cfg = D.DPOConfig(precision=precision, device="cpu")
    if impl in ("dpo", "sft"):
        job = train.setup(cfg)
        model, amp = job.model, job.amp
        params = M.lora_parameters(model)
        loss_fn = D.make_loss(cfg) if impl == "dpo" else sft.sft_loss
    else:
        import transformers
        from peft import LoraConfig, get_peft_model
        hf = transformers.AutoModelForCausalLM.from_pretrained(builtin.default_base(), dtype=torch.float32)
        pm = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, target_modules=list(TARGETS)))
        params, amp = [p for p in pm.parameters()
                       if p.requires_grad], torch.bfloat16 if precision == "bf16" else None

        def logps(t):
            logits = pm(input_ids=t["tokens"], attention_mask=t["attention_mask"]).logits
            return train.sequence_logprobs(logits[:, :-1], t["tokens"][:, 1:], t["loss_mask"][:, 1:])

        def loss_fn(_, t):  # the usual transformers + peft DPO step: adapter-off reference, full logits
            with torch.no_grad(), pm.disable_adapter():
                ref = logps(t)
            pol = logps(t)
            return D.dpo_loss(pol[:pairs], pol[pairs:], ref[:pairs], ref[pairs:], 0.1)[0].sum(), {}
        model = pm
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-5)
    ctx = (lambda: torch.autocast("cpu", dtype=amp)) if amp else contextlib.nullcontext

    def step():
        with ctx():
            loss, _ = loss_fn(model, b)
        (loss / pairs).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    best = best_step_seconds(step, steps, repeat)
    return {"name": name, "tokens_per_s": 2 * pairs * seq / best, "step_s": best,
            "peak_rss_gb": peak_rss_gb()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2: this machine's cores)")
    ap.add_argument("--pairs", type=int, default=2, help="pairs per step (2 rows each)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per row")
    ap.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
    ap.add_argument("--repeat", type=int, default=2, help="timed repeats; the best is reported")
    ap.add_argument("--configs", default="sft:fp32,dpo:fp32,hf:fp32,hf:fp32+malloc",
                    help="comma-separated impl:precision "
                    "(impl sft, dpo or hf; precision fp32 or bf16; +malloc gives hf our heap setting)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.one, args.pairs, args.seq, args.steps, args.repeat)))
        return
    builtin.default_base()
    res = run_configs(__file__, args.configs.split(","), args, ("threads", "pairs", "seq", "steps", "repeat"))
    dpo = [r for n, r in res.items() if n.startswith("dpo:")]
    if dpo:
        d = max(dpo, key=lambda r: r["tokens_per_s"])
        sft_res = res.get("sft:" + d["name"].split(":")[1])
        if sft_res:
            print(f"DPO/SFT peak RSS {d['peak_rss_gb'] / sft_res['peak_rss_gb']:.2f}x, tokens/s "
                  f"{d['tokens_per_s'] / sft_res['tokens_per_s']:.2f}x")
        hf = [r for n, r in res.items() if n.startswith("hf:")]
        if hf:
            h = max(hf, key=lambda r: r["tokens_per_s"])
            print(f"ours {d['name']} / transformers + peft {h['name']}: "
                  f"{d['tokens_per_s'] / h['tokens_per_s']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
