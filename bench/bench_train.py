"""LoRA SFT training throughput and peak RSS: ours against transformers + peft on the same step.

The default model, LoRA r=16 on all seven projections, batch 4 x 256 tokens, every token a target.
Each configuration runs in its own process so that its peak RSS is its own.
    python bench/bench_train.py [--threads 2] [--steps 4] [--repeat 2]
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402
import train_sft as S  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def best_step_seconds(step, steps, repeat):
    """Seconds per step: one warm-up step, then the best of `repeat` timed runs of `steps` steps."""
    step()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t) / steps)
    return best


def run_configs(script, names, args, keys):
    """Run each configuration in its own process (so its peak RSS is its own); {name: result dict}.
    Configurations of transformers + peft are skipped when those are not installed."""
    results = {}
    for name in names:
        if name.startswith("hf:"):
            try:
                import peft, transformers  # noqa: F401,E401
            except ImportError:
                print(f"{name}: transformers + peft not installed, skipped")
                continue
        cmd = [sys.executable, script, "--one", name] + [f"--{k}={getattr(args, k)}" for k in keys]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            print(f"{name}: failed ({p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode})")
            continue
        results[name] = r = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"{name:18s} {r['tokens_per_s']:7.1f} tokens/s   step {r['step_s']:6.2f} s   "
              f"peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
    return results


def ours(precision, grad_checkpoint=False):
    """(summed target log-probs of a batch, params, autocast dtype) for our model as train_sft sets it up."""
    cfg = S.SFTConfig(precision=precision, device="cpu", grad_checkpoint=grad_checkpoint)
    model, _, _, _, amp = S.setup(cfg)
    model.train()
    logprobs = lambda t, a: S.policy_logprobs(model, {"tokens": t, "attention_mask": a, "loss_mask": a})
    return logprobs, M.lora_parameters(model), amp


def theirs(precision):
    """The same with transformers + peft: fp32 weights, bf16 under autocast or bf16 weights (fp32 adapters)."""
    import transformers
    from peft import LoraConfig, get_peft_model
    dtype = torch.bfloat16 if precision == "bf16-weights" else torch.float32
    hf = transformers.AutoModelForCausalLM.from_pretrained(M.default_base(), dtype=dtype)
    torch.manual_seed(0)
    pm = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(TARGETS)))
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    amp = torch.bfloat16 if precision == "bf16" else None
    def logprobs(t, a):  # the usual way: full logits, then log-softmax
        return S.sequence_logprobs(pm(input_ids=t, attention_mask=a).logits[:, :-1], t[:, 1:], a[:, 1:])
    return logprobs, params, amp


def run_one(name, batch, seq, steps, repeat):
    impl, precision = name.split(":", 1)
    if precision.endswith("+malloc"):  # give theirs the heap setting ours makes (S.keep_freed_memory)
        precision = precision.removesuffix("+malloc")
        S.keep_freed_memory()
    if impl == "ours":  # precision may end in +ckpt: activation checkpointing
        fwd, params, amp = ours(precision.removesuffix("+ckpt"), precision.endswith("+ckpt"))
    else:
        fwd, params, amp = theirs(precision)
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, 40000, (batch, seq), generator=g)
    attn = torch.ones_like(tokens)
    ctx = (lambda: torch.autocast("cpu", dtype=amp)) if amp else __import__("contextlib").nullcontext

    def step():
        with ctx():
            loss = -fwd(tokens, attn).sum() / attn[:, 1:].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    best = best_step_seconds(step, steps, repeat)
    return {"name": name, "tokens_per_s": batch * seq / best, "step_s": best, "peak_rss_gb": peak_rss_gb()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2: this machine's cores)")
    ap.add_argument("--batch", type=int, default=4, help="rows per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per row")
    ap.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    ap.add_argument("--repeat", type=int, default=2, help="timed repeats; the best is reported")
    ap.add_argument("--configs", default="ours:fp32,ours:bf16,hf:fp32,hf:fp32+malloc,hf:bf16+malloc",
                    help="comma-separated impl:precision (impl ours or hf; ours:bf16+ckpt checkpoints activations; hf:fp32+malloc gives theirs our heap setting)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.one, args.batch, args.seq, args.steps, args.repeat)))
        return
    M.default_base()
    results = run_configs(__file__, args.configs.split(","), args, ("threads", "batch", "seq", "steps", "repeat"))
    hf = [r for n, r in results.items() if n.startswith("hf:")]
    us = [r for n, r in results.items() if not n.startswith("hf:")]
    if hf and us:
        a, b = max(us, key=lambda r: r["tokens_per_s"]), max(hf, key=lambda r: r["tokens_per_s"])
        print(f"fastest: ours {a['name']} / theirs {b['name']} = {a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s, "
              f"peak RSS {a['peak_rss_gb']:.2f} vs {b['peak_rss_gb']:.2f} GB")
        if "ours:fp32" in results and "hf:fp32" in results:
            print(f"fp32: ours / theirs = {results['ours:fp32']['tokens_per_s'] / results['hf:fp32']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
