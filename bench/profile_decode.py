"""Where one decode step's time goes, at batch 1, 16 and 64: a per-op breakdown of generate.py.

    python bench/profile_decode.py [--threads 2] [--batches 1,16,64] [--dtypes fp32,bf16] [--steps 24]

A step's cost is the difference between two generate() calls that differ only in the number of new
tokens (prefill and setup cancel out), so it measures whatever generate.py does per token, Python
included. Wall ms/step is the best of --repeat runs without the profiler; the breakdown comes from
torch.profiler (self CPU time per aten op, grouped), which itself adds some overhead per op.
"matmul floor" is the same step's linear layers alone (every projection and the head, at this batch
and dtype, weights read from memory as in a real step): what the hardware needs at the least.
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import builtin  # noqa: E402
import model as M  # noqa: E402
from generate import generate  # noqa: E402

GROUPS = {  # aten op name fragments -> group; first match wins
    "matmul": ("addmm", "aten::mm", "bmm", "matmul", "linear", "baddbmm"),
    "attention": ("scaled_dot_product", "softmax", "flash_attention"),
    "cache/index": ("index", "copy_", "scatter", "gather", "slice", "select", "narrow", "cat", "stack",
                    "clone",
                    "contiguous", "masked_fill", "where", "to_copy", "aten::to", "embedding", "empty"),
    "elementwise": ("mul", "add", "sub", "div", "rsqrt", "pow", "mean", "silu", "neg", "cos", "sin", "exp",
                    "cumsum", "clamp", "argmax", "arange", "ge", "le", "lt", "gt", "eq", "logical", "bitwise",
                    "ones", "zeros", "fill", "rms_norm", "topk", "sort", "multinomial"),
}


def group_of(name):
    for g, keys in GROUPS.items():
        if any(k in name for k in keys):
            return g
    return "other"


def run(net, tok, prompts, n, batch):
    generate(net, tok, prompts, max_new_tokens=n, batch_size=batch)


def wall_per_step(net, tok, prompts, batch, steps, repeat):
    """(Best time of steps + 4 tokens - best time of 4 tokens) / steps: the best of each filters out
    the bursts of other processes on a shared machine."""
    best = {4: float("inf"), 4 + steps: float("inf")}
    for _ in range(repeat):
        for n in best:
            t = time.perf_counter()
            run(net, tok, prompts, n, batch)
            best[n] = min(best[n], time.perf_counter() - t)
    return (best[4 + steps] - best[4]) / steps


def op_times(net, tok, prompts, batch, n):
    """{op name: self CPU microseconds} over one generate() call of n tokens."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(net, tok, prompts, n, batch)
    return {e.key: e.self_cpu_time_total for e in prof.key_averages()}


def matmul_floor(net, batch, repeat):
    """Seconds for one step's linear layers alone: every projection and the head on a (batch, in) input."""
    lins = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    xs = {m.in_features: torch.randn(batch, m.in_features, dtype=m.weight.dtype) for m in lins}
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeat + 1):
            t = time.perf_counter()
            for m in lins:
                F.linear(xs[m.in_features], m.weight)
            best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--batches", default="1,16,64", help="batch sizes (default 1,16,64)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="precisions (default fp32,bf16)")
    ap.add_argument("--steps", type=int, default=24, help="decode steps measured (default 24)")
    ap.add_argument("--repeat", type=int, default=3, help="timed repeats, best kept (default 3)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = builtin.default_base()
    for name in args.dtypes.split(","):
        net, tok = M.load(path, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[name])
        endless = copy.copy(tok)
        endless.stop_ids = []  # every row decodes every step
        for b in (int(x) for x in args.batches.split(",")):
            prompts = [f"Tell me story number {i} about a lighthouse keeper and the sea." for i in range(b)]
            run(net, endless, prompts, 2, b)  # warm-up
            wall = wall_per_step(net, endless, prompts, b, args.steps, args.repeat)
            short, long = (op_times(net, endless, prompts, b, n) for n in (4, 4 + args.steps))
            per_op = {k: (long[k] - short.get(k, 0)) / args.steps / 1e3 for k in long}  # ms per step
            groups = {}
            for k, ms in per_op.items():
                groups[group_of(k)] = groups.get(group_of(k), 0.0) + ms
            floor = matmul_floor(net, b, args.repeat)
            print(f"\n{name} batch {b}: {wall * 1e3:.1f} ms/step wall ({b / wall:.1f} tok/s); "
                  f"matmul floor {floor * 1e3:.1f} ms ({b / floor:.0f} tok/s)")
            print("  ms/step under the profiler: " + ", ".join(f"{g} {ms:.1f}" for g, ms in
                                                             sorted(groups.items(), key=lambda x: -x[1])))
            top = sorted(per_op.items(), key=lambda x: -x[1])[:8]
            print("  top ops: " + ", ".join(f"{k.removeprefix('aten::')} {ms:.2f}" for k, ms in top))
        del net


if __name__ == "__main__":
    main()
