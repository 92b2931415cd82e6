"""LoRA SFT throughput and peak RSS on real rows: ours against transformers + peft on the same rows.

The default model, LoRA r=16 on all seven projections, the first --rows rows of data/stage1_seed.jsonl,
micro-batches of --batch rows. tokens/s counts real target tokens only (the assistant tokens the loss is
taken on), so padding and prompt tokens earn nothing. Ours runs train_sft's own batching (length-bucketed
epoch_batches, collate) and loss; transformers + peft runs its usual way, rows in random batches padded to
the longest, loss from `labels` (full logits), and again on our bucketed batches ("+buckets") to separate
per-token speed from padding. Each configuration runs in its own process so that its peak RSS is its own.
    python bench/bench_train.py [--threads 2] [--rows 192] [--batch 8] [--repeat 2]
"""
import argparse
import contextlib
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import builtin  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402
import train_sft as sft  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def best_step_seconds(step, steps, repeat):
    """Seconds per step: one warm-up step, then the best of `repeat` timed runs of `steps` steps
    (bench_dpo)."""
    step()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t) / steps)
    return best


def best_seconds(run, repeat):
    """Seconds of one pass over the batches: one warm-up pass, then the best of `repeat` timed passes."""
    run()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
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
            print(f"{name}: failed "
                  f"({p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode})")
            continue
        results[name] = r = json.loads(p.stdout.strip().splitlines()[-1])
        extra = "".join(f"   {k} {r[k]:{f}}" for k, f in (("seconds", "6.2f"), ("step_s", "6.2f"),
                                                          ("padding", "5.1%")) if k in r)
        print(f"{name:22s} {r['tokens_per_s']:7.1f} tokens/s{extra}   peak RSS {r['peak_rss_gb']:.2f} GB",
              flush=True)
    return results


def rows_and_batches(tok, n_rows, batch, bucketed):
    """The examples and their micro-batches (index lists): train_sft's bucketing, or random batches."""
    rows = [json.loads(x) for x in (ROOT / "data" / "stage1_seed.jsonl").read_text().splitlines()[:n_rows]]
    ex = [sft.sft_example(tok, 256)(r) for r in rows]
    if bucketed:
        return ex, train.epoch_batches([len(e["ids"]) for e in ex], batch, 0, 0)
    order = list(range(len(ex)))
    random.Random(0).shuffle(order)
    return ex, [order[i:i + batch] for i in range(0, len(order), batch)]


def ours(precision):
    """A step function on train_sft's model, collate and loss, and the autocast dtype it chose."""
    job = train.setup(sft.SFTConfig(precision=precision, device="cpu"))
    model, tok, amp = job.model, job.tok, job.amp
    model.train()
    return model, tok, M.lora_parameters(model), amp, lambda b: sft.sft_loss(model, b)[0]


def theirs(precision):
    """The same with transformers + peft: fp32 weights, bf16 under autocast or bf16 weights (fp32
    adapters)."""
    import transformers
    from peft import LoraConfig, get_peft_model
    dtype = torch.bfloat16 if precision == "bf16-weights" else torch.float32
    hf = transformers.AutoModelForCausalLM.from_pretrained(builtin.default_base(), dtype=dtype)
    torch.manual_seed(0)
    pm = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(TARGETS)))
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]

    def loss(b):  # the usual way: labels with -100 where no loss, mean over the batch's targets
        labels = b["tokens"].masked_fill(b["loss_mask"] == 0, -100)
        return pm(input_ids=b["tokens"], attention_mask=b["attention_mask"],
                  labels=labels).loss * sft.sft_count(b)
    return pm, M.load_tokenizer(builtin.default_base()), params, (torch.bfloat16 if precision == "bf16"
                                                                  else None), loss


def run_one(name, n_rows, batch, repeat):
    impl, precision = name.split(":", 1)
    bucketed = impl == "ours" or precision.endswith("+buckets")
    precision = precision.removesuffix("+buckets")
    model, tok, params, amp, loss_fn = (ours if impl == "ours" else theirs)(precision)
    ex, batches = rows_and_batches(tok, n_rows, batch, bucketed)
    collated = [train.collate([ex[i] for i in b], tok.pad_id) for b in batches]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ctx = (lambda: torch.autocast("cpu", dtype=amp)) if amp else contextlib.nullcontext

    # every micro-batch its own optimizer step: a pass is the same work for every configuration
    def one_pass():
        for b in collated:
            with ctx():
                loss = loss_fn(b) / sft.sft_count(b)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    seconds = best_seconds(one_pass, repeat)
    targets = sum(sft.sft_count(b) for b in collated)
    real = sum(int(b["attention_mask"].sum()) for b in collated)
    cells = sum(b["tokens"].numel() for b in collated)
    return {"name": name, "tokens_per_s": targets / seconds, "seconds": seconds, "padding": 1 - real / cells,
            "peak_rss_gb": peak_rss_gb(), "amp": str(amp)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2: this machine's cores)")
    ap.add_argument("--rows", type=int, default=192, help="seed rows in a pass")
    ap.add_argument("--batch", type=int, default=8, help="rows per micro-batch (cpu-demo's batch size)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="timed passes after a warm-up; the best is reported")
    ap.add_argument("--configs",
                    default="ours:fp32,ours:bf16,hf:fp32,hf:bf16,hf:fp32+buckets,hf:bf16+buckets",
                    help="comma-separated impl:precision (impl ours or hf; +buckets: hf on our "
                         "length-bucketed batches)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        # both get the heap setting train_sft makes
        train.keep_freed_memory() if args.one.startswith("hf:") else None
        print(json.dumps(run_one(args.one, args.rows, args.batch, args.repeat)))
        return
    builtin.default_base()
    print(f"{args.rows} seed rows, batches of {args.batch}, threads {args.threads}; CPU native bf16: "
          f"{M.cpu_has_bf16()}")
    results = run_configs(__file__, args.configs.split(","), args, ("threads", "rows", "batch", "repeat"))
    hf = {n: r for n, r in results.items() if n.startswith("hf:") and not n.endswith("+buckets")}
    us = {n: r for n, r in results.items() if n.startswith("ours:")}
    if hf and us:
        a, b = max(us.values(), key=lambda r: r["tokens_per_s"]), max(hf.values(),
                                                                      key=lambda r: r["tokens_per_s"])
        print(f"fastest: ours {a['name']} / theirs {b['name']} = "
              f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x target "
              f"tokens/s, peak RSS {a['peak_rss_gb']:.2f} vs {b['peak_rss_gb']:.2f} GB")
        for p in ("fp32", "bf16"):
            if f"ours:{p}" in us and f"hf:{p}" in hf:
                print(f"{p}: ours / theirs = "
                      f"{us[f'ours:{p}']['tokens_per_s'] / hf[f'hf:{p}']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
