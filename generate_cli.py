"""The command line of generate.py: one prompt, a JSONL file of prompts, or an interactive chat.

    python generate.py --model default --prompt "What is the capital of France?"
    python generate.py --model DIR --input prompts.jsonl --output answers.jsonl   (- is stdin/stdout)
    python generate.py --model DIR --chat --temperature 0.7 --seed 0
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import builtin
import files
import generate as G
import model as M
from chat import read_chats


def chat(model, tokenizer, system=None, **kw):
    """Interactive chat with streamed answers; an empty line or end of input quits."""
    history = [{"role": "system", "content": system}] if system else []
    stream = lambda _, piece: print(piece, end="", flush=True)  # noqa: E731
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        answer = G.generate(model, tokenizer, [history], callback=stream, **kw)[0]
        print(flush=True)
        history.append({"role": "assistant", "content": answer})


def number(kind, ok, want):
    """An argparse type: `kind` of the text, refused with a one-line message unless ok(value)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value
    return parse


def parse_args(argv):
    ap = argparse.ArgumentParser(description=G.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default",
                    help="Hugging Face model directory; 'default' is the built-in SmolLM2-135M-Instruct "
                         "(default)")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="answer this one text (a user turn) and print the answer")
    mode.add_argument("--input", metavar="FILE",
                      help='JSONL of {"prompt": text} or {"messages": [...]} lines; - is stdin')
    mode.add_argument("--chat", action="store_true",
                      help="interactive chat with streamed answers; empty line or EOF quits")
    ap.add_argument("--output", metavar="FILE", default="-",
                    help="JSONL out: each input object plus \"response\"; - is stdout "
                    "(default). A file is written whole through a temporary file once every answer is done, "
                    "so an "
                    "earlier file survives a crash; it may not be the input")
    ap.add_argument("--system", help="system message put before every conversation that has none")
    ap.add_argument("--max-new-tokens", type=number(int, lambda v: v >= 1, ">= 1"), default=128,
                    help="most tokens generated per answer, capped to what fits in the model's context "
                         "(default 128). "
                         "A prompt longer than the context is cut from the left, with a warning")
    ap.add_argument("--temperature", type=number(float, lambda v: v >= 0, ">= 0"), default=0.0,
                    help="0 is greedy (default 0)")
    ap.add_argument("--top-k", type=number(int, lambda v: v >= 1, ">= 1"), default=None,
                    help="sample only among the k most likely tokens (default off)")
    ap.add_argument("--top-p", type=number(float, lambda v: 0 < v <= 1, "in (0, 1]"), default=None,
                    help="nucleus: keep tokens while the mass above them is < p (default off)")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed of the sampler, for repeatable output (default random)")
    ap.add_argument("--stop", action="append", default=None,
                    help="stop string, cut from the answer; repeat for several")
    ap.add_argument("--batch-size", type=number(int, lambda v: v >= 1, ">= 1"), default=16,
                    help="cache rows decoded together; a finished row takes the next prompt at once "
                         "(default 16)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the blocks: faster decoding after ~20 s "
                    "of compiling, worth it for many prompts (default off)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda when available (default auto)")
    ap.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                    help="weights precision (the KV cache is fp32 on a CPU whatever this is); auto: bf16 on "
                         "a bf16 GPU or a native-bf16 CPU (AVX-512 BF16 or AMX), else fp32 (default: auto)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine")
    to_file = args.input not in (None, "-") and args.output != "-"
    if to_file and Path(args.input).resolve() == Path(args.output).resolve():
        ap.error("--output is the --input file: write the answers somewhere else")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = M.pick_device(args.device)
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    path = builtin.default_base() if args.model == "default" else args.model
    tok = M.load_tokenizer(path)
    if args.input is not None:  # every line checked before the weights are even loaded
        source, name = (sys.stdin.buffer, "<stdin>") if args.input == "-" else (args.input, args.input)
        rows = read_chats(source, tok, args.system, name)
    model, tok = M.load(path, device=device, dtype=dtype or M.fast_dtype(device))
    if args.compile:
        G.compile_blocks(model)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p,
              stop=args.stop, seed=args.seed, batch_size=args.batch_size)
    system = [{"role": "system", "content": args.system}] if args.system else []

    if args.chat:
        chat(model, tok, system=args.system, **kw)
    elif args.prompt is not None:
        print(G.generate(model, tok, [system + [{"role": "user", "content": args.prompt}]], **kw)[0])
    else:
        with tqdm(total=len(rows), unit="prompt", file=sys.stderr) as bar:
            answers = G.generate(model, tok, [m for _, m in rows], progress=bar, **kw)
        lines = [json.dumps({**obj, "response": a},
                            ensure_ascii=False) + "\n" for (obj, _), a in zip(rows, answers)]
        if args.output == "-":
            sys.stdout.writelines(lines)
        else:
            # a temporary file, then renamed: never half written
            files.atomic_text(args.output, "".join(lines))
