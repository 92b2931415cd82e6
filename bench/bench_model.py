"""Load time of the built-in model, prefill tokens/s and peak memory (fp32 and bf16).

    python bench/bench_model.py [--threads 2] [--tokens 512] [--repeat 3]
"""
import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import builtin  # noqa: E402
import model as M  # noqa: E402


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2: this machine's cores)")
    ap.add_argument("--tokens", type=int, default=512, help="prompt length for the prefill figure")
    ap.add_argument("--batch", type=int, default=1, help="rows per prefill")
    ap.add_argument("--repeat", type=int, default=3, help="timed repeats; the best is printed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    path = builtin.default_base()
    print(f"default_base()      {time.perf_counter() - t:6.2f} s  ({path})")
    for dtype in (torch.float32, torch.bfloat16):
        t = time.perf_counter()
        net, tok = M.load(path, dtype=dtype)
        load_s = time.perf_counter() - t
        x = torch.randint(100, 40000, (args.batch, args.tokens))
        with torch.inference_mode():
            net(x[:, :16])  # warm-up
            best = float("inf")
            for _ in range(args.repeat):
                t = time.perf_counter()
                net(x, last_only=True)
                best = min(best, time.perf_counter() - t)
        name = str(dtype).removeprefix("torch.")
        print(f"{name:9s} load {load_s:5.2f} s   prefill {args.batch * args.tokens / best:8.0f} tokens/s "
              f"({args.batch}x{args.tokens})   peak RSS so far {peak_rss_gb():.2f} GB")
        del net


if __name__ == "__main__":
    main()
