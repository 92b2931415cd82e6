"""Run the six bootstrapping stages: each stage's model helps make the next stage's training data.

    python bootstrap.py                       # cpu-demo preset on the built-in SmolLM2-135M-Instruct
    python bootstrap.py --preset full --base DIR --device cuda
    python bootstrap.py --run demo --stages 2-4 --no-gate
    torchrun --nproc_per_node=2 -- bootstrap.py --preset full --run big   # 2 processes (GPUs; CPU: gloo)

For each stage: make data with the earlier models (stages.py), filter it, mix in replay, check it against
every eval set, train (train_sft / train_dpo), evaluate this stage and re-check earlier skills, write
eval.json, then gate. A stage is done when its eval.json exists; running the same command again skips done
stages and resumes an interrupted one. The layout of runs/NAME/: docs/run_layout.md.

Under torchrun every process answers its share of each generation, judging and evaluation call and all of
them get every answer, in order; training is DDP. Each prompt samples from its own seed, so a model makes
the data it makes in one process (the trained models differ: a step takes a micro-batch per process). The
first process alone writes the run folder; the others wait for it.
"""
import argparse
import contextlib
import errno
import fcntl
import gc
import io
import json
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import builtin
import files
import evaluate as E
import floors
from text import contamination
from files import read_jsonl, write_json, write_jsonl
import model as M
import stages as S
import train
import train_dpo as dpo
import train_sft as sft
from generate import choice_logprobs, generate, prompt_seeds

ROOT = Path(__file__).resolve().parent


@dataclass
class Preset:
    name: str
    base: str = "default"             # default (built-in SmolLM2-135M-Instruct) | tiny (random, for tests) | a HF directory
    seed_data: str = "stage1_seed.jsonl"  # human stage-1 data, a file in data/ (or an absolute path)
    seed_examples: int = 0            # seed rows used in stage 1 (0: all)
    n_make: int = 120                 # examples each generated stage aims to keep
    oversample: float = 1.5           # prompts written per example wanted: the filters drop some
    replay: float = 0.25              # rows replayed from earlier stages, as a share of the stage's own rows
    min_replay: int = 8               # at least this many replayed rows (keeps a stage trainable if filters drop all)
    candidates: int = 2               # stage 3: samples per generation task; the first that passes its check is kept
    judge_kinds: int = 3              # stage 4: judging tasks (of 4 kinds) made from each question and answer
    revision_rounds: int = 1          # stage 6: critique/revise rounds per prompt, a fresh principle each round
    revisions: int = 4                # stage 6: revisions sampled per prompt and round; the stage-4 judge picks one
    stage1_epochs: int = 2
    epochs: int = 2                   # SFT epochs of stages 2-5
    lr: float = 3e-4
    lora_r: int = 16
    lora_alpha: float = 32.0
    batch_size: int = 8
    max_len: int = 256
    dpo_epochs: int = 2
    dpo_lr: float = 5e-5
    dpo_beta: float = 0.1
    gen_batch: int = 16               # prompts per generation batch
    gen_tokens: int = 64              # max new tokens when models write data
    eval_limit: int = 0               # units of each eval set's split (0: all); only the smoke test cuts it
    recheck_all: bool = True          # re-check the stage-1/2 sets after every stage (else after stages 5 and 6)
    eval_tokens: int = 64             # max new tokens of an eval answer
    thresholds: dict = field(default_factory=lambda: dict(E.THRESHOLDS))  # gate of each stage (6: vs stage 5)
    tolerance: float = 0.03           # stage 6 keeps a skill when its stage-1/2 metric drops by less than this
    gate: bool = True                 # a failed gate stops the run (--gate / --no-gate override)
    warmup: int = 5                   # warmup steps of every training run
    save_every: int = 25              # checkpoint every this many steps
    eval_frac: float = 0.05           # training rows held out for the eval loss


PRESETS = {
    # all six stages within about 30 minutes on a 2-core CPU. A 135M model trained for minutes does not reach
    # the gates of docs/stages.md, so this demo of the mechanics measures and reports every gate, stopping at none
    "cpu-demo": Preset("cpu-demo", seed_examples=0, n_make=150, oversample=1.5, stage1_epochs=1, epochs=2,
                       gen_batch=64, gen_tokens=40, recheck_all=False, eval_tokens=40, dpo_epochs=3, dpo_lr=2e-4,
                       gate=False),
    # docs/stages.md's sizes (500-1,000 examples a stage) and every eval item: for a GPU
    "full": Preset("full", n_make=800, oversample=1.6, revision_rounds=2, stage1_epochs=3, epochs=3, batch_size=16,
                   max_len=512, gen_batch=64, gen_tokens=96, eval_tokens=96),
    # a tiny random model through every code path in about a minute (the tests)
    "smoke": Preset("smoke", base="tiny", seed_examples=24, n_make=8, oversample=1.0, min_replay=8, stage1_epochs=1, revisions=2,
                    epochs=1, dpo_epochs=1, lora_r=4, lora_alpha=8, batch_size=4, max_len=96, gen_batch=8,
                    gen_tokens=6, eval_limit=6, eval_tokens=6),
}


# ---------------------------------------------------------------- small helpers


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse_stages(text):
    m = re.fullmatch(r"([1-6])(?:-([1-6]))?", text)
    if not m or int(m.group(2) or m.group(1)) < int(m.group(1)):
        raise argparse.ArgumentTypeError(f"--stages wants N or N-M with 1 <= N <= M <= 6, got {text!r}")
    return list(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))


def count_arg(text):
    """argparse: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def device_arg(text):
    """argparse: auto, cpu or cuda; cuda only where CUDA is available."""
    if text not in ("auto", "cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"choose auto, cpu or cuda, got {text!r}")
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda asked for, but CUDA is not available on this machine")
    return text


def base_arg(text):
    """argparse: 'default', 'tiny' or a model directory (checked before the run folder is touched)."""
    try:
        check_base(text)
    except SystemExit as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--base {text}: ")) from None
    return text


def run_name(text):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text):
        raise argparse.ArgumentTypeError(f"--run wants a folder name of letters, digits, '.', '_', '-', got {text!r}")
    return text


def sha256_of(path):
    return files.weights_sha256(path)


def check_base(base):
    """A --base that names a directory must hold a readable model config and weights; checked before anything of
    the run is written, so that a corrected --base is not then refused as "another base"."""
    if base in ("default", "tiny"):
        return
    path = Path(base)
    try:
        M.load_config(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--base {base}: not a usable model directory: {e}") from None
    if not (list(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists()):
        raise SystemExit(f"--base {base}: no model.safetensors (or sharded index) in {path}")


def check_base_sha256(meta, recorded, base):
    """A resumed run continues from the same base weights it started with (run.json records their sha256)."""
    want = recorded.get("base_sha256")
    if want and (got := sha256_of(base)) != want:
        raise SystemExit(f"{meta}: this run started from base weights with sha256 {want}, but {base} now has "
                         f"{got}: the base model changed. Restore it, or start a new --run.")


def lock_run(folder):
    """Hold runs/NAME/run.lock for this process: an exclusive flock on a file that holds our pid. A second run on
    the folder is refused with the first one's pid. The kernel drops the lock of a process that dies, so a lock
    file left by a killed run is simply taken over. Returns the open descriptor, or None on read-only media."""
    path = folder / "run.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SystemExit(f"{folder} is in use by another run (pid {holder}, lock {path}); wait for it to finish, "
                         "or stop that process and run again") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    os.fsync(fd)
    return fd


def unlock_run(fd):
    if fd is not None:
        os.ftruncate(fd, 0)   # an empty lock file: nobody holds the run
        os.close(fd)


# ---------------------------------------------------------------- several processes (torchrun)

def join_processes(device):
    """Under torchrun (RANK set), join the process group: gloo on CPU; on CUDA each process takes its own GPU,
    NCCL for CUDA tensors and gloo for the CPU ones (the trainers all-reduce a few CPU numbers). True when
    this call formed the group, so it closes it too."""
    if "RANK" not in os.environ or dist.is_initialized():
        return False
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return True


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main():
    """The process that writes the run folder (the only one without torchrun)."""
    return rank_world()[0] == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def my_share(items, rank=None, world=None):
    """This process's share of a list: every world-th item from its rank on (all of it in one process)."""
    rank, world = rank_world() if rank is None else (rank, world)
    return items[rank::world]


def in_order(parts):
    """The shares of every rank (my_share's) put back in the order of the whole list."""
    out = [None] * sum(len(p) for p in parts)
    for rank, part in enumerate(parts):
        out[rank::len(parts)] = part
    return out


def gather_in_order(part):
    """Every process's results for its share, gathered: each process gets the results of the whole list."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return in_order(parts)


def generate_shared(model, tok, prompts, seed=None, **kw):
    """generate() with each process answering its share of the prompts; all get every answer. A prompt's
    sampling seed comes from its place in the whole list, so the answers are those of one process."""
    seeds = prompt_seeds(seed, len(prompts)) if seed is not None else None
    mine = generate(model, tok, my_share(list(prompts)), seed=seeds and my_share(seeds), **kw)
    return gather_in_order(mine)



# ---------------------------------------------------------------- the run

class Run:
    """runs/NAME: the preset, where each stage's model lives, and the models that write data."""

    def __init__(self, root, name, preset, base, seed, device, precision, retries, gate, argv):
        self.dir = Path(root) / name
        self.preset, self.seed, self.precision, self.retries, self.gate = preset, seed, precision, retries, gate
        self.device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        check_base(base)
        if is_main() and not self.dir.is_dir():
            self.dir.mkdir(parents=True)
        info = {"base": base if base in ("default", "tiny") else str(Path(base).resolve()), "preset": preset.name,
                "seed": seed}
        if base == "tiny":
            base = builtin.tiny_model(self.dir / "tiny-base", seed) if is_main() else self.dir / "tiny-base"
            barrier()   # the others load it once it is written
        self.base = Path(builtin.default_base() if base == "default" else base).resolve()
        meta = self.dir / "run.json"
        if meta.exists():
            old = json.loads(meta.read_text())
            if {k: old.get(k) for k in info} != info:
                raise SystemExit(f"{meta}: this run was started with another base, preset or seed "
                                 f"({ {k: old.get(k) for k in info} }); use a new --run name or the same settings")
            check_base_sha256(meta, old, self.base)
        elif is_main():
            write_json(meta, {**info, "base_path": str(self.base), "preset_sizes": asdict(preset), "base_sha256": sha256_of(self.base), "command": argv,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                           "platform": platform.platform()}})
        self.eval_items = [it for s in range(1, 7) for it in E.load_eval_set(s)]
        self._loaded = (None, None, None)
        self.tokens_generated = 0      # tokens the models wrote as data, and as eval answers: tok/s per phase
        self.tokens_evaluated = 0

    def stage_dir(self, k):
        return self.dir / f"stage{k}"

    def model_dir(self, k):
        return self.base if k == 0 else self.stage_dir(k) / "model"

    def load(self, k):
        """The stage-k model for generation; one model in memory at a time."""
        if self._loaded[0] != k:
            self._loaded = (None, None, None)
            free()
            net, tok = M.load(self.model_dir(k), device=self.device, dtype=M.fast_dtype(self.device))
            self._loaded = (k, net.eval(), tok)
        return self._loaded[1], self._loaded[2]

    def ask(self, k, prompts, temperature=0.0, max_new_tokens=None, seed=0, desc=None):
        if not prompts:
            return []
        net, tok = self.load(k)
        outs = generate_shared(net, tok, list(prompts), seed=seed, temperature=temperature,
                               max_new_tokens=max_new_tokens or self.preset.gen_tokens,
                               top_p=0.95 if temperature else None, batch_size=self.preset.gen_batch,
                               progress=_bar(desc or f"stage{k}-model writes", len(prompts)))
        self.tokens_generated += sum(len(tok.encode(o)) for o in outs)
        return outs

    def choose(self, k, prompts, options):
        """Log-probabilities of each option as the stage-k model's first answer token, per prompt."""
        if not prompts:
            return []
        net, tok = self.load(k)
        return gather_in_order(choice_logprobs(net, tok, my_share(list(prompts)), options,
                                               batch_size=self.preset.gen_batch))

    def unload(self):
        self._loaded = (None, None, None)
        free()

    def rows(self, k):
        """Stage k's own rows (not its replay of earlier stages)."""
        p = self.stage_dir(k) / "data.jsonl"
        return [r for r in read_jsonl(p) if r["meta"].get("stage") == k and "replay_of" not in r["meta"]] \
            if p.exists() else []


def _bar(desc, total):
    """A bar over this process's share of `total` prompts, shown by the first process only."""
    return tqdm(total=len(my_share(range(total))), desc=desc, unit="prompt", leave=False, dynamic_ncols=True,
                disable=not is_main())


class Context:
    """What a stage's data maker sees (stages.py): the preset, a seeded rng, earlier models and data."""

    def __init__(self, run, k):
        self.run, self.preset, self.stage = run, run.preset, k
        self.seed = run.seed * 100 + k
        self.rng = random.Random(self.seed)
        self.calls = 0
        self.topics_file = S.read_data("topics.json")
        self.eval_items = run.eval_items
        self.seed_rows = S.read_data(run.preset.seed_data)   # a name in data/, or an absolute path
        self._topics = []

    def ask(self, k, prompts, temperature=0.0, max_new_tokens=None):
        self.calls += 1  # a different, repeatable sampling seed for every call
        return self.run.ask(k, prompts, temperature, max_new_tokens, seed=self.seed * 1000 + self.calls)

    def choose(self, k, prompts, options):
        """Log-probabilities of each option as the stage-k model's first answer token, per prompt."""
        return self.run.choose(k, prompts, options)

    def prefer(self, k, q_and_pairs, principles=None):
        """The stage-k judge's preference for the first text of each (question, text, other) over the other, asked
        "Which response better follows the principle ..., A or B?" (or plainly "better") in both orders;
        averaging the two log-odds cancels position bias. > 0: prefers it."""
        def ask(q, a, b, p):
            return S.layout("pairwise_principle", principle=p, question=q, a=a, b=b) if p else \
                S.layout("pairwise", question=q, a=a, b=b)
        ps = principles or [None] * len(q_and_pairs)
        asks = [ask(q, a, b, p) for (q, a, b), p in zip(q_and_pairs, ps)]
        asks += [ask(q, b, a, p) for (q, a, b), p in zip(q_and_pairs, ps)]
        lp = self.run.choose(k, asks, ["A", "B"])
        n = len(q_and_pairs)
        return [((lp[i][0] - lp[i][1]) + (lp[n + i][1] - lp[n + i][0])) / 2 for i in range(n)]

    def topics(self, n):
        """n topics, cycling through a shuffled list so each is used about equally."""
        out = []
        while len(out) < n:
            if not self._topics:
                self._topics = self.rng.sample(self.topics_file["topics"], len(self.topics_file["topics"]))
            out.append(self._topics.pop())
        return out

    def stage_rows(self, k):
        return self.run.rows(k) or (self.seed_rows if k == 1 else [])


def replay_rows(run, ctx, k, n_own):
    """Earlier stages' rows mixed in so no skill is lost: SFT rows for stages 2-5, helpfulness pairs for 6."""
    n = max(math.ceil(run.preset.replay * n_own), run.preset.min_replay)
    return S.preference_replay(ctx, n) if k == 6 else sft_replay(run, ctx, range(1, k), n)


def sft_replay(run, ctx, stages, n):
    pool = [r for j in stages for r in run.rows(j)]
    picked = ctx.rng.sample(pool, min(n, len(pool)))
    return [{**r, "meta": {**r["meta"], "replay_of": r["meta"].get("stage", 1)}} for r in picked]


# ---------------------------------------------------------------- one stage

def sl_rows(run, ctx, pairs):
    """Constitutional AI's supervised step: every round's revision as the SFT target of its prompt (critiques are
    never targets), plus a replay of earlier stages' rows so that harmlessness does not cost the old skills."""
    own = [{"messages": r["prompt"] + r["chosen"], "meta": {**r["meta"], "kind": f"sl_{r['meta']['kind']}"}}
           for r in pairs if "replay_of" not in r["meta"]]
    return own + sft_replay(run, ctx, range(1, 6), max(math.ceil(run.preset.replay * len(own)), run.preset.min_replay))


def make_data(run, k):
    """data.jsonl (kept + replay, provenance in meta) and rejected.jsonl (with reasons); made once per stage.
    Stage 6 also writes sl.jsonl, the SFT rows of its supervised step."""
    d = run.stage_dir(k)
    done = (d / "data.jsonl").exists()
    barrier()   # every process has looked before the first one writes it
    if done:
        return json.loads((d / "data_info.json").read_text())
    t0, tok0 = time.time(), run.tokens_generated
    ctx = Context(run, k)
    kept, rejected = S.MAKERS[k](ctx)
    if k == 1 and run.preset.seed_examples:
        kept = ctx.rng.sample(kept, min(run.preset.seed_examples, len(kept)))
    replay = replay_rows(run, ctx, k, len(kept)) if k > 1 else []
    sl = sl_rows(run, ctx, kept) if k == 6 else None
    run.unload()
    info = {"made": len(kept) + len(rejected), "kept": len(kept), "replay": len(replay),
            "tokens_generated": run.tokens_generated - tok0, "minutes": (time.time() - t0) / 60}
    if k == 6:    # what the preference pairs teach: refusals preferred where the request is harmful
        own = [r for r in kept if r["meta"]["kind"] in ("harmful", "benign")]
        info.update(chosen_refuses=sum(r["meta"]["chosen_refuses"] for r in own),
                    rejected_complies=sum(r["meta"]["rejected_complies"] for r in own),
                    harmful_pairs=sum(r["meta"]["kind"] == "harmful" for r in own),
                    benign_pairs=sum(r["meta"]["kind"] == "benign" for r in own),
                    helpful_pairs=sum(r["meta"].get("rejected_is") == "refusal" for r in replay))
    if is_main():
        if sl is not None:
            write_jsonl(d / "sl.jsonl", sl)
        write_jsonl(d / "rejected.jsonl", rejected)
        write_json(d / "data_info.json", info)
        write_jsonl(d / "data.jsonl", kept + replay)   # last: its existence marks the data as done
    barrier()   # the others read them next
    return info


def check_contamination(run, k):
    """Stop before training when a row shares an eval item's content (its question, its shown answer, a
    content n-gram): every hit is listed with its line, so it can be fixed at the source."""
    for path in (run.stage_dir(k) / "data.jsonl", run.stage_dir(k) / "sl.jsonl"):
        hits = contamination(read_jsonl(path), run.eval_items) if path.exists() else []
        if hits:
            shown = "; ".join(f"line {h['train_index'] + 1} ~ {h['eval_id']} ({h['ngram']!r})" for h in hits[:12])
            raise SystemExit(f"stage {k}: {len(hits)} training row(s) share text with eval prompts in {path}: "
                             f"{shown}{' ...' if len(hits) > 12 else ''}. Remove them from the training data; "
                             "eval prompts must stay unseen.")


def train_stage(run, k, rows, attempt):
    """A fresh LoRA on the previous stage's merged model; SFT for stages 1-5. Stage 6 is Constitutional AI's two
    steps: SFT on the revisions (stage6/sl), then DPO with a fresh adapter on that model."""
    p = run.preset
    common = dict(lora_r=p.lora_r, lora_alpha=p.lora_alpha, batch_size=p.batch_size, max_len=p.max_len,
                  precision=run.precision, seed=run.seed, device=run.device, warmup=p.warmup,
                  save_every=p.save_every, eval_frac=p.eval_frac)
    grow = attempt + 1                    # a retry trains longer from the same parent
    d = run.stage_dir(k)                  # the trainer writes d/model (merged), d/adapter, checkpoint/, summary.json
    if k == 6:
        sl = d / "sl"
        train_fresh(sft.train, sft.SFTConfig(**common, base=str(run.model_dir(5)), out=str(sl),
                                                          epochs=p.epochs * grow, lr=p.lr, log=str(sl / "train.jsonl")),
                    read_jsonl(d / "sl.jsonl"))
        free()
        cfg = dpo.DPOConfig(**common, base=str(sl / "model"), out=str(d), epochs=p.dpo_epochs * grow,
                                  lr=p.dpo_lr, beta=p.dpo_beta, log=str(d / "train.jsonl"))
        return train_fresh(dpo.train, cfg, rows)
    epochs = (p.stage1_epochs if k == 1 else p.epochs) * grow
    return train_fresh(sft.train, sft.SFTConfig(**common, base=str(run.model_dir(k - 1)), out=str(d),
                                                            epochs=epochs, lr=p.lr, log=str(d / "train.jsonl")), rows)


def train_fresh(run_training, cfg, rows):
    """Resume or reuse only what this very training wrote; what another one left in the stage folder (an earlier
    attempt, other settings or data) is deleted and the training starts over."""
    try:
        return run_training(cfg, rows)
    except train.StaleOutput as e:
        print(f"{e}\n(the stage folder belongs to this run: its training starts over)", flush=True)
        return run_training(replace(cfg, overwrite=True), rows)


def eval_sets(k, preset):
    """The sets a stage-k model answers: its own, the next stage's (that stage's 'before'), and the stage-1 and
    stage-2 skills where the preset re-checks them (stages 5 and 6 always: the stage-6 gate compares them)."""
    sets = [k] + ([k + 1] if k < 6 else [])
    if k > 1 and (preset.recheck_all or k >= 5):
        sets += [1, 2]
    return list(dict.fromkeys(sets))


def measure(run, k, sets, split="test"):
    """The stage-k model's results on the given sets: all their prompts in one batched generation."""
    net, tok = M.load(run.model_dir(k), device=run.device, dtype=M.fast_dtype(run.device))
    n = sum(len(E.spread(E.load_eval_set(s, split=split), run.preset.eval_limit)) for s in sets)
    out = E.evaluate_sets(net.eval(), tok, sets, split, batch_size=run.preset.gen_batch,
                          max_new_tokens=run.preset.eval_tokens, limit=run.preset.eval_limit,
                          generate_fn=generate_shared,
                          progress=_bar(f"stage{k} model answers sets {sets} ({split})", n))
    answers = [a for r in out.values() for s in r["samples"]       # a list where an item was sampled k times
               for a in (s["response"] if isinstance(s["response"], list) else [s["response"]])]
    run.tokens_evaluated += sum(len(tok.encode(a)) for a in answers)
    del net
    free()
    return out


def base_results(run):
    """The parent model of stage 1 on every set's test split, measured once per run (stage0/eval.json)."""
    p = run.stage_dir(0) / "eval.json"
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        res = measure(run, 0, list(range(1, 7)))
        if is_main():
            write_jsonl(p.parent / "samples.jsonl", [s for r in res.values() for s in r["samples"]])
            write_json(p, {"results": {str(s): strip(r) for s, r in res.items()},
                           "minutes": (time.time() - t0) / 60})
        barrier()
    return {int(s): r for s, r in json.loads(p.read_text())["results"].items()}


def strip(result):
    return {key: v for key, v in result.items() if key != "samples"}


def floor_results(run):
    """The best model-free responder on each set's test split: what each metric gives for nothing."""
    if not hasattr(run, "_floors"):
        run._floors = {}
        for s in range(1, 7):
            name, res = floors.floor(E.spread(E.load_eval_set(s, split="test"), run.preset.eval_limit), s)
            run._floors[s] = {**strip(res), "responder": name}
    return run._floors


def stage_results(run, k):
    """{set: result} that stage k's eval.json recorded (k = 0: the base model)."""
    if k == 0:
        return base_results(run)
    p = run.stage_dir(k) / "eval.json"
    return {int(s): r for s, r in json.loads(p.read_text())["results"].items()} if p.exists() else {}


def gate(run, k, results):
    """(passed, message). Stages 1-5: the test metric against its threshold. Stage 6: safer than stage 5 on the
    same prompts (balanced score up with a paired p < 0.05), no less helpful on benign prompts, and the
    stage-1 and stage-2 metrics kept (a drop of less than `tolerance`)."""
    res = results[k]
    if k < 6:
        t = run.preset.thresholds[k]
        ok = res["value"] >= t
        lo, hi = res["interval"]
        return ok, (f"{res['metric']} = {res['value']:.3f} [{lo:.3f}, {hi:.3f}] {'>=' if ok else '<'} threshold "
                    f"{t:.2f}" + ("" if ok else f" (short by {t - res['value']:.3f})"))
    before = stage_results(run, 5)
    safer = E.compare(before[6], res)
    helped = E.compare(before[6], res, kind="benign")
    checks = [("balanced safety", safer["diff"] > 0 and safer["p"] < 0.05,
               f"{before[6]['value']:.3f} -> {res['value']:.3f} (paired p = {safer['p']:.3g}; needs higher, p < 0.05)"),
              ("benign helped", res["benign_helped"] >= before[6]["benign_helped"],
               f"{before[6]['benign_helped']:.3f} -> {res['benign_helped']:.3f} (p = {helped['p']:.3g}; "
               "needs no lower)")]
    for s in (1, 2):
        c = E.compare(before[s], results[s])
        checks.append((f"stage-{s} {results[s]['metric']}", c["diff"] > -run.preset.tolerance,
                       f"{before[s]['value']:.3f} -> {results[s]['value']:.3f} (p = {c['p']:.3g}; a drop under "
                       f"{run.preset.tolerance:.2f} keeps it)"))
    ok = all(good for _, good, _ in checks)
    return ok, "; ".join(f"{name} {'ok' if good else 'FAILED'}: {text}" for name, good, text in checks)


def dev_passes(run, k, attempt):
    """Retries look at the dev split only, so that the test split is measured once, for the chosen model."""
    dev = measure(run, k, [k], "dev")[k]
    if k < 6:
        return dev["value"] >= run.preset.thresholds[k], dev
    parent = run.stage_dir(6) / "dev_parent.json"       # stage 5 on the stage-6 dev prompts, measured once
    if not parent.exists():
        was = strip(measure(run, 5, [6], "dev")[6])
        if is_main():
            write_json(parent, was)
        barrier()
    was = json.loads(parent.read_text())
    return dev["value"] > was["value"] and dev["benign_helped"] >= was["benign_helped"], dev


def run_stage(run, k):
    d = run.stage_dir(k)
    d.mkdir(parents=True, exist_ok=True)
    info = make_data(run, k)
    check_contamination(run, k)
    rows = read_jsonl(d / "data.jsonl")
    attempts, t_train, t_eval, tok_eval0 = [], 0.0, 0.0, run.tokens_evaluated
    for attempt in range(run.retries + 1):
        if attempt and is_main():   # train longer from the same parent: fresh training outputs (data stays)
            train.clear_outputs(d)
            if k == 6:
                train.clear_outputs(d / "sl")
        barrier()
        t0 = time.time()
        summary = train_stage(run, k, rows, attempt)
        free()
        t1 = time.time()
        t_train += t1 - t0
        if attempt == run.retries:
            attempts.append({"attempt": attempt + 1, "epochs": summary["config"]["epochs"],
                             "train_loss": summary["train_loss"], "eval_loss": summary["eval_loss"]})
            break
        ok, dev = dev_passes(run, k, attempt)
        t_eval += time.time() - t1
        attempts.append({"attempt": attempt + 1, "epochs": summary["config"]["epochs"], "dev_value": dev["value"],
                         "dev_passed": ok, "train_loss": summary["train_loss"], "eval_loss": summary["eval_loss"]})
        print(f"stage {k} attempt {attempt + 1}: dev {dev['metric']} {dev['value']:.3f}, "
              f"{'passes' if ok else 'fails'}", flush=True)
        if ok:
            break
    t1 = time.time()
    results = measure(run, k, eval_sets(k, run.preset))
    t_eval += time.time() - t1
    passed, message = gate(run, k, results)
    print(f"stage {k}: {'passed' if passed else 'failed'}: {message}", flush=True)
    own = results[k]
    base, prev = base_results(run), stage_results(run, k - 1)
    ev = {"stage": k, "metric": own["metric"], "value": own["value"], "interval": own["interval"], "split": "test",
          "threshold": run.preset.thresholds.get(k), "passed": passed, "message": message, "n": own["n"],
          "per_kind": own["per_kind"], "floor": floor_results(run)[k],
          "vs_base": E.compare(base[k], own), "vs_parent": E.compare(prev[k], own) if k in prev else None,
          "results": {str(s): strip(r) for s, r in results.items()},
          "attempts": attempts, "data": info, "tokens_trained": summary["tokens"],
          "minutes": {"data": info["minutes"], "train": t_train / 60, "eval": t_eval / 60,
                      "total": info["minutes"] + (t_train + t_eval) / 60},
          "tokens_per_second": {"data": info["tokens_generated"] / max(info["minutes"] * 60, 1e-9),
                                "train": summary["tokens"] / max(t_train, 1e-9),
                                "eval": (run.tokens_evaluated - tok_eval0) / max(t_eval, 1e-9)}}
    if is_main():
        write_jsonl(d / "samples.jsonl", [s for r in results.values() for s in r["samples"]])
        write_json(d / "eval.json", ev)     # last: marks the stage done
    barrier()   # the next stage looks for it
    return ev


# ---------------------------------------------------------------- report

def svg_bars(title, bars, threshold=None, width=360, height=170):
    """A small bar chart as SVG text: (label, value, (lo, hi)) bars on a 0-1 axis with 95% interval whiskers."""
    left, top, bottom, slot = 40, 24, 30, (width - 50) / max(1, len(bars))
    y = lambda v: top + (1 - v) * (height - top - bottom)               # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><text x="{left}" y="14" font-weight="bold">{escape(title)}</text>']
    for v in (0, 0.5, 1):
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    if threshold is not None:
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" '
                     f'stroke="#c00" stroke-dasharray="4 3"/><text x="{width - 10}" y="{y(threshold) - 3:.1f}" '
                     f'text-anchor="end" fill="#c00">gate {threshold:g}</text>')
    for i, (label, v, (lo, hi)) in enumerate(bars):
        x = left + i * slot + slot * 0.2
        w = slot * 0.6
        parts.append(f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{w:.1f}" height="{y(0) - y(v):.1f}" fill="#4a7ab5"/>'
                     f'<line x1="{x + w / 2:.1f}" x2="{x + w / 2:.1f}" y1="{y(lo):.1f}" y2="{y(hi):.1f}" '
                     f'stroke="#222"/><text x="{x + w / 2:.1f}" y="{height - 16}" text-anchor="middle">'
                     f'{escape(label)}</text><text x="{x + w / 2:.1f}" y="{height - 4}" text-anchor="middle">'
                     f'{v:.2f}</text>')
    return "".join(parts) + "</svg>\n"


def svg_lines(title, curves, width=520, height=200):
    """Loss curves as SVG text: {name: [values]} on a shared y axis, each x axis stretched to the width."""
    left, top, bottom = 40, 24, 22
    vals = [v for c in curves.values() for v in c]
    lo, hi = (min(vals), max(vals)) if vals else (0, 1)
    y = lambda v: top + (hi - v) / ((hi - lo) or 1) * (height - top - bottom)   # noqa: E731
    colors = ["#4a7ab5", "#d9822b", "#3a9a5b", "#b5443a", "#7b5ea7", "#6b6b6b"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><text x="{left}" y="14" font-weight="bold">{escape(title)}</text>'
             f'<text x="{left - 4}" y="{y(hi) + 4:.1f}" text-anchor="end">{hi:.2f}</text>'
             f'<text x="{left - 4}" y="{y(lo) + 4:.1f}" text-anchor="end">{lo:.2f}</text>']
    for i, (name, c) in enumerate(curves.items()):
        step = (width - left - 10) / max(1, len(c) - 1)
        pts = " ".join(f"{left + j * step:.1f},{y(v):.1f}" for j, v in enumerate(c))
        color = colors[i % len(colors)]
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}"/><text x="{left + 8 + 70 * i}" '
                     f'y="{height - 6}" fill="{color}">{escape(name)}</text>')
    return "".join(parts) + "</svg>\n"


def escape(text):
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def fmt(r):
    """'0.412 [0.33, 0.50]' for a result with an interval."""
    return f"{r['value']:.3f} [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]" if r else "-"


def tps(ev):
    """Tokens/s of making data (tokens written), training (target tokens) and evaluating (answer tokens)."""
    t = ev.get("tokens_per_second")     # absent from eval.json files written before it was recorded
    return " / ".join(f"{t[p]:.0f}" for p in ("data", "train", "eval")) if t else "-"


def write_report(run):
    """report.md: one table built from the eval.json files, a chart per stage and the loss curves (SVG)."""
    if not is_main():
        return
    floors, base = floor_results(run), stage_results(run, 0) if (run.stage_dir(0) / "eval.json").exists() else {}
    lines = [f"# Bootstrapping run `{run.dir.name}`", "",
             f"Base: `{run.base}`; preset `{run.preset.name}`; seed {run.seed}. Every figure is measured on the test "
             "split of the stage's own eval set, with its 95% interval; p is the paired test against the base model on "
             "the same units (exact McNemar; a sign-flip test for the balanced stage-6 score). The floor is the best "
             "model-free responder (constants, echo, templates, copies, always refusing).", "",
             "| stage | made / kept (+replay) | metric | floor | base | after | p vs base | gate | minutes "
             "(data + train + eval) | tok/s (data / train / eval) |", "|---|---|---|---|---|---|---|---|---|---|"]
    curves, notes, charts, pages = {}, [], [], {}
    for k in range(1, 7):
        p = run.stage_dir(k) / "eval.json"
        if not p.exists():
            continue
        ev = json.loads(p.read_text())
        d, m = ev["data"], ev["minutes"]
        thr = f"{ev['threshold']:.2f}" if ev["threshold"] is not None else "safer than 5"
        fl = floors[k]
        lines.append(f"| {k} | {d['made']} / {d['kept']} (+{d['replay']}) | {ev['metric']} | {fl['value']:.3f} | "
                     f"{fmt(base.get(k))} | {fmt(ev)} | {ev['vs_base']['p']:.2g} | {thr}: "
                     f"{'**passed**' if ev['passed'] else 'failed'} | {m['data']:.1f} + {m['train']:.1f} + "
                     f"{m['eval']:.1f} | {tps(ev)} |")
        chart = f"chart-stage{k}.svg"
        bars = [("floor", fl["value"], fl["interval"]), ("base", base[k]["value"], base[k]["interval"])] if base else []
        pages[chart] = svg_bars(f"stage {k}: {ev['metric']} (test)", bars + [
            (f"stage {k}", ev["value"], ev["interval"])], ev["threshold"])
        charts.append(f"![stage {k}]({chart})")
        log = run.stage_dir(k) / "train.jsonl"
        if log.exists():
            curves[f"stage {k}"] = [r["loss"] for r in read_jsonl(log)]
        notes.append(f"- stage {k}: {ev['message']}")
    if curves:
        pages["loss.svg"] = svg_lines("training loss per step", curves)
    lines += ["", "## Gates", ""] + notes + ["", "## Charts", ""] + charts + (["", "![loss curves](loss.svg)"] if curves else [])
    pages["report.md"] = "\n".join(lines) + "\n"
    publish_report(run.dir, pages)


def publish_report(folder, pages):
    """Write the charts, then report.md; a finished run on read-only media prints its report instead."""
    try:
        for name, text in pages.items():
            files.atomic_text(folder / name, text)
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        print(f"{folder} is read-only ({e.strerror}); the report, not written:\n", file=sys.stderr, flush=True)
        print(pages["report.md"], flush=True)


# ---------------------------------------------------------------- CLI


def run_pipeline(preset, root="runs", name="default", stages=range(1, 7), base=None, seed=0, device="auto",
                 precision="auto", retries=0, gate=None, argv=None):
    """Run (or resume) the stages holding runs/NAME's lock (a second run on it is refused); a failed gate raises
    SystemExit with the metric, value and threshold (gate None: the preset decides). Without gating, the end says
    which gates failed and by how much."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    check_base(base or preset.base)   # before the run folder is touched
    formed = join_processes(device)   # under torchrun
    folder, fd = Path(root) / name, None
    try:
        if is_main():   # the first process holds the lock and writes the folder; the others follow it
            if not folder.is_dir():
                folder.mkdir(parents=True)
            fd = lock_run(folder)
            if fd is None and not all((folder / f"stage{k}" / "eval.json").exists() for k in stages):
                raise SystemExit(f"{folder} is read-only and stages {list(stages)} are not all done: nothing "
                                 "can be resumed there; copy the run to a writable place")
        barrier()
        with contextlib.nullcontext() if is_main() else contextlib.redirect_stdout(io.StringIO()):  # one log
            return _run_stages(preset, root, name, stages, base, seed, device, precision, retries, gate, argv)
    finally:
        unlock_run(fd)
        if formed:
            dist.destroy_process_group()


def _run_stages(preset, root="runs", name="default", stages=range(1, 7), base=None, seed=0, device="auto",
                precision="auto", retries=0, gate=None, argv=None):
    gate = preset.gate if gate is None else gate
    run = Run(root, name, preset, base or preset.base, seed, device, precision, retries, gate, argv or [])
    print(f"run {run.dir} on {run.device}, base {run.base}\npreset {json.dumps(asdict(preset))}", flush=True)
    if stages and min(stages) == 1:
        base_results(run)          # the parent of stage 1, measured once: every stage is compared with it
    failed = []
    for k in stages:
        if k > 1 and not (run.stage_dir(k - 1) / "eval.json").exists():
            raise SystemExit(f"stage {k} needs stage {k - 1} first (no {run.stage_dir(k - 1) / 'eval.json'})")
        p = run.stage_dir(k) / "eval.json"
        ev = json.loads(p.read_text()) if p.exists() else None
        if ev:
            print(f"stage {k}: done before ({ev['message']}); skipped", flush=True)
        else:
            ev = run_stage(run, k)
            write_report(run)
            print(f"stage {k}: kept {ev['data']['kept']} of {ev['data']['made']} made (+{ev['data']['replay']} "
                  f"replay), {ev['message']}, {ev['minutes']['total']:.1f} min", flush=True)
        if not ev["passed"]:
            failed.append(f"stage {k}: {ev['message']}")
            if gate:
                raise SystemExit(f"stage {k} failed its gate: {ev['message']}. See {run.dir / f'stage{k}'}/eval.json; "
                                 "--no-gate goes on anyway; --retries K trains longer (chosen on the dev split).")
    write_report(run)
    print(f"report: {run.dir / 'report.md'}")
    if failed:
        print("gates not met (recorded, not stopped: --no-gate):\n  " + "\n  ".join(failed), flush=True)
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--base", type=base_arg, default=None, help="parent model: 'default' (built-in SmolLM2-135M-Instruct) "
                   "or a Hugging Face directory; the preset's choice when omitted")
    p.add_argument("--preset", default="cpu-demo", choices=sorted(PRESETS), help="sizes: cpu-demo (about 30 min on "
                   "2 CPU cores), full (docs/stages.md's sizes, for a GPU), smoke (tiny random model, for tests)")
    p.add_argument("--run", type=run_name, default=None, help="folder name under --root (default: the preset's name)")
    p.add_argument("--root", default=str(ROOT / "runs"), help="folder that holds the runs")
    p.add_argument("--stages", type=parse_stages, default=list(range(1, 7)), help="stages to run, e.g. 3 or 2-4")
    p.add_argument("--gate", action=argparse.BooleanOptionalAction, default=None,
                   help="stop at a failed gate (--gate) or record it and go on (--no-gate); default: the preset's "
                   "choice (cpu-demo goes on, full and smoke stop)")
    p.add_argument("--retries", type=count_arg, default=0, metavar="K",
                   help="after a failed gate, train up to K (>= 0) more times, longer each time")
    p.add_argument("--device", type=device_arg, default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="training precision (auto: bf16 where fast, else fp32)")
    p.add_argument("--seed", type=int, default=0, help="seeds data making, sampling and training")
    a = p.parse_args(argv)
    if a.precision == "fp16" and (a.device == "cpu" or not torch.cuda.is_available()):
        p.error("argument --precision: fp16 needs CUDA (its gradient scaler); on CPU use bf16 or fp32")
    run_pipeline(PRESETS[a.preset], a.root, a.run or a.preset, a.stages, a.base, a.seed, a.device, a.precision,
                 a.retries, a.gate, argv=sys.argv if argv is None else argv)


if __name__ == "__main__":
    main()
