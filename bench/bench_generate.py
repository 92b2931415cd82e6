"""Generation speed on the built-in model: ours against transformers in the same process, runs alternating.

    python bench/bench_generate.py [--threads 2] [--parts decode,sampled,mixed,prefix] [--repeat 3]
    [--compile]

decode  batch 1, 16 and 64 in fp32 and bf16: 128 new tokens per row, greedy, end tokens ignored (ours: the
        tokenizer's stop ids emptied; transformers: min_new_tokens = max_new_tokens), the same prompt ids.
sampled the same at batch 64, sampling at temperature 0.8 with top-p 0.95 (transformers: top_k=0).
mixed   64 prompts whose answers stop after 5 to 128 tokens (one limit per prompt), 16 rows at a time:
        continuous batching; ours static (a new batch of 16 starts when its last row is done, finished
        rows leave the batch); transformers' generate on the same batches (each runs to its longest answer).
prefix  64 stage-6 critique prompts after the same few-shot demonstrations (data/templates.json): the
        judge's read-out (choice_logprobs, prefill only) with the common prefix shared and unshared, and
        transformers' forward pass over the same left-padded batches of 16.
tok/s counts the tokens each run must produce (or prefill). Every figure is the best of --repeat runs,
ours and transformers alternating, so a burst from another process on a shared machine hits both alike.
"extra RSS" is the peak resident memory a run adds to what was resident before it (both models stay
loaded, so weights are not in it; their sizes are printed). About 10 minutes on 2 quiet cores.
"""
import argparse
import copy
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import builtin  # noqa: E402
import model as M  # noqa: E402
from generate import choice_logprobs, common_prefix, compile_blocks, generate  # noqa: E402

PROMPTS = [
    "Tell me a long story about a lighthouse keeper.", "Explain how rain forms.",
    "Write a poem about autumn.",
    "What is the history of the bicycle?", "Describe a busy market in the morning.",
    "How do computers store numbers?",
    "Give me ten tips for learning to cook.", "Why is the sky blue?",
    "Summarize the plot of a detective novel you invent.",
    "Describe the water cycle in detail.", "Write a letter to a friend about a holiday.",
    "How do bees make honey?",
    "Explain photosynthesis to a child.", "What makes a good teacher?",
    "Describe the life of a tree over a century.",
    "List the planets and one fact about each.",
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rss_gb(field):
    try:
        return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**20
    except (OSError, AttributeError):
        return float("nan")


def measured(fn):
    """(seconds, extra peak RSS in GB) of one call; Linux resets the peak through /proc/self/clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = rss_gb("VmRSS")
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t, rss_gb("VmHWM") - before


def best_of(runs, repeat):
    """{name: (best seconds, largest extra RSS)} over `repeat` rounds that run every entry once,
    alternating."""
    best = {k: (float("inf"), 0.0) for k in runs}
    for _ in range(repeat):
        for k, fn in runs.items():
            s, mem = measured(fn)
            best[k] = (min(best[k][0], s), max(best[k][1], mem))
    return best


def left_padded(tok, ids):
    P = max(map(len, ids))
    x = torch.tensor([[tok.pad_id] * (P - len(i)) + i for i in ids])
    return x, (x != tok.pad_id) | (torch.arange(P)[None] >= torch.tensor([P - len(i) for i in ids])[:, None])


def hf_generate(hf, tok, ids, n, **sampling):
    x, mask = left_padded(tok, ids)
    sampling = dict(do_sample=True, top_k=0, **sampling) if sampling else dict(do_sample=False)
    with torch.inference_mode():
        out = hf.generate(x, attention_mask=mask.long(), max_new_tokens=n, min_new_tokens=n,
                          eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id, **sampling)
    assert out.shape[1] == x.shape[1] + n, "transformers stopped early"


def load_pair(path, dtype, transformers):
    net, tok = M.load(path, dtype=dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval() if transformers else None
    endless = copy.copy(tok)
    endless.stop_ids = []  # no row ends early: every row costs exactly its token budget
    return net, tok, endless, hf


def row(label, ours, theirs, tokens, extra=""):
    o = f"{tokens / ours[0]:9.1f} {ours[1]:6.2f}G"
    t = f"{'-':>9s} {'-':>7s} {'-':>8s}"
    if theirs:
        t = f"{tokens / theirs[0]:9.1f} {theirs[1]:6.2f}G {theirs[0] / ours[0]:7.2f}x"
    print(f"{label:34s} {o} {t} {extra}", flush=True)


def sampled(path, args, transformers):
    """decode, sampling at temperature 0.8 with top-p 0.95 (as the pipeline writes data), batch 64."""
    decode(path, args, transformers, dict(temperature=0.8, top_p=0.95), [64])


def decode(path, args, transformers, sampling=None, batches=None):
    sampling = sampling or {}
    how = "temperature 0.8, top-p 0.95" if sampling else "greedy"
    print(f"\n== decode: {args.new_tokens} new tokens per row, {how}, tok/s = rows x {args.new_tokens} / s")
    print(f"{'dtype, batch':34s} {'ours tok/s':>9s} {'xRSS':>7s} {'hf tok/s':>9s} {'xRSS':>7s} "
          f"{'ours/hf':>8s}")
    for name in args.dtypes.split(","):
        net, tok, endless, hf = load_pair(path, DTYPES[name], transformers)
        nets = {"ours": net}
        if args.compile:  # a second copy, compiled (about 20 s, in the warm-up below)
            nets["compiled"] = compile_blocks(M.load(path, dtype=DTYPES[name])[0])
        for b in batches or [int(x) for x in args.batches.split(",")]:
            prompts = (PROMPTS * (b // len(PROMPTS) + 1))[:b]
            ids = [tok.encode_chat(p, add_generation_prompt=True)[0] for p in prompts]
            runs = {k: (lambda m=m: generate(m, endless, prompts, max_new_tokens=args.new_tokens,
                                             batch_size=b,
                                             **sampling)) for k, m in nets.items()}
            for m in nets.values():
                generate(m, endless, prompts, max_new_tokens=4, batch_size=b)  # warm-up (and compile)
            if hf is not None:
                hf_generate(hf, tok, ids[:1], 2)  # warm-up
                runs["hf"] = lambda: hf_generate(hf, tok, ids, args.new_tokens, **sampling)
            r = best_of(runs, args.repeat)
            for k in nets:
                row(f"{name} batch {b}" + (" compiled" if k == "compiled" else "") + (" sampled" if sampling
                                                                                      else ""),
                    r[k], r.get("hf"), b * args.new_tokens)
        net = nets = hf = None   # freed before the next dtype's models load


def mixed(path, args, transformers):
    lengths = [5 + round(123 * i / 63) for i in range(64)]
    random.Random(0).shuffle(lengths)
    prompts = [f"{PROMPTS[i % 16]} (Variant {i // 16 + 1}.)" for i in range(64)]
    total = sum(lengths)
    print(f"\n== mixed: 64 prompts, answers of 5..128 tokens ({total} in all), 16 rows at a time; "
          f"tok/s = {total} / s")
    print(f"{'dtype, scheme':34s} {'tok/s':>9s} {'xRSS':>7s} {'hf tok/s':>9s} {'xRSS':>7s} {'ratio':>8s}")
    for name in args.dtypes.split(","):
        net, tok, endless, hf = load_pair(path, DTYPES[name], transformers)
        ids = [tok.encode_chat(p, add_generation_prompt=True)[0] for p in prompts]
        # generate()'s admission order: its static batches
        order = sorted(range(64), key=lambda i: -len(ids[i]))
        run = lambda cont: generate(net, endless, prompts, max_new_tokens=lengths, batch_size=16,
                                    continuous=cont)  # noqa: E731
        runs = {"continuous": lambda: run(True), "static": lambda: run(False)}
        if hf is not None:
            batches = [order[i:i + 16] for i in range(0, 64, 16)]
            runs["hf"] = lambda: [hf_generate(hf, tok, [ids[i] for i in b],
                                              max(lengths[i] for i in b)) for b in batches]
        r = best_of(runs, args.repeat)
        row(f"{name} continuous vs ours static", r["continuous"], r["static"], total)
        if "hf" in r:
            row(f"{name} continuous vs hf static", r["continuous"], r["hf"], total)
        net = hf = None   # freed before the next models load


def critique_prompts(n=64):
    """Stage-6-like critique requests after the few-shot demonstrations, as stages.few_shot builds them."""
    templates = json.loads((ROOT / "data" / "templates.json").read_text())
    demos = [{"role": role, "content": text} for user, answer in templates["critique_demos"]
             for role, text in (("user", user), ("assistant", answer))]
    principles = json.loads((ROOT / "data" / "constitution.json").read_text())["principles"]
    lines = (ROOT / "data" / "stage1_seed.jsonl").read_text().splitlines()[:n]
    seed = [json.loads(x)["messages"] for x in lines]
    return [demos + [{"role": "user", "content": f"{principles[i % len(principles)]['critique']}\nQuestion: "
                                                 f"{m[0]['content']}\nResponse: {m[-1]['content']}"}]
            for i, m in enumerate(seed)]


def prefix(path, args, transformers):
    prompts = critique_prompts()
    print("\n== prefix: 64 stage-6 critique prompts with the same few-shot demonstrations, batches of 16, "
          "prefill only")
    print(f"{'dtype, scheme':34s} {'tok/s':>9s} {'xRSS':>7s} {'other':>9s} {'xRSS':>7s} {'ratio':>8s}")
    for name in args.dtypes.split(","):
        net, tok, _, hf = load_pair(path, DTYPES[name], transformers)
        ids = [tok.encode_chat(p, add_generation_prompt=True)[0] for p in prompts]
        total = sum(map(len, ids))
        p = common_prefix(ids)
        read = lambda share: choice_logprobs(net, tok, prompts, ["A", "B"], batch_size=16,
                                             share_prefix=share)  # noqa: E731
        runs = {"shared": lambda: read(True), "unshared": lambda: read(False)}
        if hf is not None:
            def hf_prefill():
                with torch.inference_mode():
                    for b in range(0, 64, 16):
                        x, mask = left_padded(tok, ids[b:b + 16])
                        hf(x, attention_mask=mask.long(), logits_to_keep=1)
            runs["hf"] = hf_prefill
        r = best_of(runs, args.repeat)
        note = f"({total} prompt tokens, {p} shared by all)"
        row(f"{name} shared vs unshared", r["shared"], r["unshared"], total, note)
        if "hf" in r:
            row(f"{name} shared vs hf forward", r["shared"], r["hf"], total)
        net = hf = None   # freed before the next models load


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2: this machine's cores)")
    ap.add_argument("--parts", default="decode,sampled,mixed,prefix",
                    help="which benchmarks (default decode,sampled,mixed,prefix)")
    ap.add_argument("--new-tokens", type=int, default=128,
                    help="decode: tokens generated per row (default 128)")
    ap.add_argument("--batches", default="1,16,64", help="decode: batch sizes (default 1,16,64)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="precisions (default fp32,bf16)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the best of each run is kept (default 3)")
    ap.add_argument("--compile", action="store_true", help="decode: also a torch.compile'd copy of ours")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    transformers = None
    if not args.no_transformers:
        try:
            import transformers
        except ImportError:
            print("transformers not installed: ours only")
    path = builtin.default_base()
    print(f"model {path}; threads {args.threads}; CPU native bf16: {M.cpu_has_bf16()}; "
          f"fast_dtype: {str(M.fast_dtype()).removeprefix('torch.')}; weights "
          f"{sum(p.numel() for p in M.load(path)[0].parameters()) * 4 / 2**30:.2f} GB in fp32")
    for part in args.parts.split(","):
        {"decode": decode, "sampled": sampled, "mixed": mixed,
         "prefix": prefix}[part](path, args, transformers)
    print("\nxRSS: peak resident memory added by the run; ratio: first / second (x = times faster)")


if __name__ == "__main__":
    main()
