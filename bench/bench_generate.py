"""Decoding speed of generate.py on the built-in model: tokens/s and peak RSS, fp32 and bf16,
batch 1 and batch 16, against transformers' `generate` on the same directory and prompt ids.

    python bench/bench_generate.py [--threads 2] [--new-tokens 128] [--no-transformers]

Every row generates exactly --new-tokens tokens, so the figures compare equal work: ours runs
with the tokenizer's stop ids emptied (an end-of-turn token is just another token), transformers
with min_new_tokens = max_new_tokens (its end tokens are suppressed). Both decode greedily.
Peak RSS is the high-water mark of each configuration alone (Linux: reset via /proc/self/clear_refs).
About 4 minutes on a 2-core CPU.
"""
import argparse
import copy
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402
from generate import generate  # noqa: E402

PROMPTS = [
    "Tell me a long story about a lighthouse keeper.", "Explain how rain forms.", "Write a poem about autumn.",
    "What is the history of the bicycle?", "Describe a busy market in the morning.", "How do computers store numbers?",
    "Give me ten tips for learning to cook.", "Why is the sky blue?", "Summarize the plot of a detective novel you invent.",
    "Describe the water cycle in detail.", "Write a letter to a friend about a holiday.", "How do bees make honey?",
    "Explain photosynthesis to a child.", "What makes a good teacher?", "Describe the life of a tree over a century.",
    "List the planets and one fact about each.",
]


def reset_peak():
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def peak_rss_gb():
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**20
    except (OSError, AttributeError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2: this machine's cores)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row (default 128)")
    ap.add_argument("--batches", default="1,16", help="batch sizes, comma-separated (default 1,16)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="precisions, comma-separated (default fp32,bf16)")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import transformers
    except ImportError:
        transformers = None
    if args.no_transformers:
        transformers = None
    path = M.default_base()
    N = args.new_tokens
    print(f"model {path}\nthreads {args.threads}, {N} new tokens per row, greedy, end tokens ignored\n")
    print(f"{'dtype':6s} {'batch':>5s} {'ours tok/s':>11s} {'peak RSS':>9s} {'hf tok/s':>9s} {'peak RSS':>9s} {'ours/hf':>8s}")
    batches = [int(x) for x in args.batches.split(",")]
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        ours, theirs = {}, {}
        net, tok = M.load(path, dtype=dtype)
        endless = copy.copy(tok)
        endless.stop_ids = []  # no row ends early: every row costs exactly N tokens
        generate(net, endless, PROMPTS[:2], max_new_tokens=4)  # warm-up
        for b in batches:
            prompts = (PROMPTS * (b // len(PROMPTS) + 1))[:b]
            reset_peak()
            s = timed(lambda: generate(net, endless, prompts, max_new_tokens=N, batch_size=b))
            ours[b] = (b * N / s, peak_rss_gb())
        del net  # one model resident at a time, so each peak RSS is its own
        if transformers is not None:
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
            for b in batches:
                prompts = (PROMPTS * (b // len(PROMPTS) + 1))[:b]
                ids = [tok.encode_chat(p, add_generation_prompt=True)[0] for p in prompts]
                P = max(map(len, ids))
                x = torch.tensor([[tok.pad_id] * (P - len(i)) + i for i in ids])
                mask = torch.tensor([[0] * (P - len(i)) + [1] * len(i) for i in ids])
                kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=N, min_new_tokens=N,
                          eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id)
                with torch.inference_mode():
                    hf.generate(x[:1], attention_mask=mask[:1], do_sample=False, max_new_tokens=4,
                                pad_token_id=tok.pad_id)  # warm-up
                    reset_peak()
                    out = []
                    s = timed(lambda: out.append(hf.generate(x, **kw)))
                assert out[0].shape[1] == P + N, "transformers stopped early"
                theirs[b] = (b * N / s, peak_rss_gb())
            del hf
        for b in batches:
            line = f"{name:6s} {b:5d} {ours[b][0]:11.1f} {ours[b][1]:8.2f}G"
            if b in theirs:
                line += f" {theirs[b][0]:9.1f} {theirs[b][1]:8.2f}G {ours[b][0] / theirs[b][0]:7.2f}x"
            print(line, flush=True)
    print(f"\nbatch b: b rows of {N} tokens; tok/s is the aggregate b * N / seconds; one model resident at a time")


if __name__ == "__main__":
    main()
