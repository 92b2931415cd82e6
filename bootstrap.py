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
import io
import json
import platform
import re
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

import builtin
import evaluate as E
import model as M
import stages as S
import train
import train_dpo as dpo
import train_sft as sft
from files import read_jsonl, write_json, write_jsonl
from gates import base_results, dev_passes, eval_sets, floor_results, gate, measure, stage_results, strip
from generate import choice_logprobs
from presets import PRESETS
from ranks import (barrier, free, gather_in_order, generate_shared, is_main, join_processes, my_share,
                   progress_bar)
from report import write_report
from run_folder import check_base, check_base_sha256, lock_run, sha256_of, unlock_run
from text import contamination

ROOT = Path(__file__).resolve().parent


# ---------------------------------------------------------------- small helpers


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
        raise argparse.ArgumentTypeError(f"--run wants a folder name of letters, digits, '.', '_', '-', "
                                         f"got {text!r}")
    return text


# ---------------------------------------------------------------- the run

class Run:
    """runs/NAME: the preset, where each stage's model lives, and the models that write data."""

    def __init__(self, root, name, preset, base, seed, device, precision, retries, gate, argv):
        self.dir = Path(root) / name
        self.preset, self.seed, self.precision = preset, seed, precision
        self.retries, self.gate = retries, gate
        self.device = device
        if device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        check_base(base)
        if is_main() and not self.dir.is_dir():
            self.dir.mkdir(parents=True)
        named = base if base in ("default", "tiny") else str(Path(base).resolve())
        info = {"base": named, "preset": preset.name, "seed": seed}
        if base == "tiny":
            base = builtin.tiny_model(self.dir / "tiny-base", seed) if is_main() else self.dir / "tiny-base"
            barrier()   # the others load it once it is written
        self.base = Path(builtin.default_base() if base == "default" else base).resolve()
        meta = self.dir / "run.json"
        if meta.exists():
            old = json.loads(meta.read_text())
            if {k: old.get(k) for k in info} != info:
                raise SystemExit(f"{meta}: this run was started with another base, preset or seed "
                                 f"({ {k: old.get(k) for k in info} }); use a new --run name or the same "
                                 "settings")
            check_base_sha256(meta, old, self.base)
        elif is_main():
            write_json(meta, {**info, "base_path": str(self.base), "preset_sizes": asdict(preset),
                              "base_sha256": sha256_of(self.base), "command": argv,
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
                               progress=progress_bar(desc or f"stage{k}-model writes", len(prompts)))
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


def make_data(run, k):
    """data.jsonl (kept + replay, provenance in meta) and rejected.jsonl (with reasons); made once per stage.
    Stage 6 also writes sl.jsonl, the SFT rows of its supervised step."""
    d = run.stage_dir(k)
    done = (d / "data.jsonl").exists()
    barrier()   # every process has looked before the first one writes it
    if done:
        return json.loads((d / "data_info.json").read_text())
    t0, tok0 = time.time(), run.tokens_generated
    ctx = S.Context(run, k)
    kept, rejected = S.MAKERS[k](ctx)
    if k == 1 and run.preset.seed_examples:
        kept = ctx.rng.sample(kept, min(run.preset.seed_examples, len(kept)))
    replay = S.replay_rows(run, ctx, k, len(kept)) if k > 1 else []
    sl = S.sl_rows(run, ctx, kept) if k == 6 else None
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
            shown = "; ".join(f"line {h['train_index'] + 1} ~ {h['eval_id']} ({h['ngram']!r})"
                              for h in hits[:12])
            raise SystemExit(f"stage {k}: {len(hits)} training row(s) share text with eval prompts in "
                             f"{path}: {shown}{' ...' if len(hits) > 12 else ''}. Remove them from the "
                             "training data; eval prompts must stay unseen.")


def train_stage(run, k, rows, attempt):
    """A fresh LoRA on the previous stage's merged model; SFT for stages 1-5. Stage 6 is Constitutional AI's
    two steps: SFT on the revisions (stage6/sl), then DPO with a fresh adapter on that model."""
    p = run.preset
    common = dict(lora_r=p.lora_r, lora_alpha=p.lora_alpha, batch_size=p.batch_size, max_len=p.max_len,
                  precision=run.precision, seed=run.seed, device=run.device, warmup=p.warmup,
                  save_every=p.save_every, eval_frac=p.eval_frac)
    grow = attempt + 1                    # a retry trains longer from the same parent
    d = run.stage_dir(k)   # the trainer writes d/model (merged), d/adapter, checkpoint/, summary.json
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
    cfg = sft.SFTConfig(**common, base=str(run.model_dir(k - 1)), out=str(d), epochs=epochs, lr=p.lr,
                        log=str(d / "train.jsonl"))
    return train_fresh(sft.train, cfg, rows)


def train_fresh(run_training, cfg, rows):
    """Resume or reuse only what this very training wrote; what another one left in the stage folder (an
    earlier attempt, other settings or data) is deleted and the training starts over."""
    try:
        return run_training(cfg, rows)
    except train.StaleOutput as e:
        print(f"{e}\n(the stage folder belongs to this run: its training starts over)", flush=True)
        return run_training(replace(cfg, overwrite=True), rows)


def train_attempts(run, k, rows):
    """Train, and while retries are left, check the dev split: a failing attempt trains again, longer, from
    the same parent. Returns the last training's summary, the attempts and the seconds of training and of
    dev evaluation."""
    d = run.stage_dir(k)
    attempts, t_train, t_eval = [], 0.0, 0.0
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
        attempts.append({"attempt": attempt + 1, "epochs": summary["config"]["epochs"],
                         "dev_value": dev["value"], "dev_passed": ok, "train_loss": summary["train_loss"],
                         "eval_loss": summary["eval_loss"]})
        print(f"stage {k} attempt {attempt + 1}: dev {dev['metric']} {dev['value']:.3f}, "
              f"{'passes' if ok else 'fails'}", flush=True)
        if ok:
            break
    return summary, attempts, t_train, t_eval


def run_stage(run, k):
    d = run.stage_dir(k)
    d.mkdir(parents=True, exist_ok=True)
    info = make_data(run, k)
    check_contamination(run, k)
    rows = read_jsonl(d / "data.jsonl")
    tok_eval0 = run.tokens_evaluated
    summary, attempts, t_train, t_eval = train_attempts(run, k, rows)
    t1 = time.time()
    results = measure(run, k, eval_sets(k, run.preset))
    t_eval += time.time() - t1
    passed, message = gate(run, k, results)
    print(f"stage {k}: {'passed' if passed else 'failed'}: {message}", flush=True)
    own = results[k]
    base, prev = base_results(run), stage_results(run, k - 1)
    ev = {"stage": k, "metric": own["metric"], "value": own["value"], "interval": own["interval"],
          "split": "test", "threshold": run.preset.thresholds.get(k), "passed": passed, "message": message,
          "n": own["n"],
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


# ---------------------------------------------------------------- CLI


def run_pipeline(preset, root="runs", name="default", stages=range(1, 7), base=None, seed=0, device="auto",
                 precision="auto", retries=0, gate=None, argv=None):
    """Run (or resume) the stages holding runs/NAME's lock (a second run on it is refused); a failed gate
    raises SystemExit with the metric, value and threshold (gate None: the preset decides). Without gating,
    the end says which gates failed and by how much."""
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
            print(f"stage {k}: kept {ev['data']['kept']} of {ev['data']['made']} made "
                  f"(+{ev['data']['replay']} replay), {ev['message']}, {ev['minutes']['total']:.1f} min",
                  flush=True)
        if not ev["passed"]:
            failed.append(f"stage {k}: {ev['message']}")
            if gate:
                raise SystemExit(f"stage {k} failed its gate: {ev['message']}. "
                                 f"See {run.dir / f'stage{k}'}/eval.json; --no-gate goes on anyway; "
                                 "--retries K trains longer (chosen on the dev split).")
    write_report(run)
    print(f"report: {run.dir / 'report.md'}")
    if failed:
        print("gates not met (recorded, not stopped: --no-gate):\n  " + "\n  ".join(failed), flush=True)
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=base_arg, default=None, help="parent model: 'default' (built-in "
                   "SmolLM2-135M-Instruct) or a Hugging Face directory; the preset's choice when omitted")
    p.add_argument("--preset", default="cpu-demo", choices=sorted(PRESETS), help="sizes: cpu-demo (about 30 "
                   "min on 2 CPU cores), full (docs/stages.md's sizes, for a GPU), smoke (tiny random model, "
                   "for tests)")
    p.add_argument("--run", type=run_name, default=None,
                   help="folder name under --root (default: the preset's name)")
    p.add_argument("--root", default=str(ROOT / "runs"), help="folder that holds the runs")
    p.add_argument("--stages", type=parse_stages, default=list(range(1, 7)),
                   help="stages to run, e.g. 3 or 2-4")
    p.add_argument("--gate", action=argparse.BooleanOptionalAction, default=None,
                   help="stop at a failed gate (--gate) or record it and go on (--no-gate); default: the "
                   "preset's choice (cpu-demo goes on, full and smoke stop)")
    p.add_argument("--retries", type=count_arg, default=0, metavar="K",
                   help="after a failed gate, train up to K (>= 0) more times, longer each time")
    p.add_argument("--device", type=device_arg, default="auto",
                   help="auto (cuda when available), cpu or cuda")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="training precision (auto: bf16 where fast, else fp32)")
    p.add_argument("--seed", type=int, default=0, help="seeds data making, sampling and training")
    a = p.parse_args(argv)
    if a.precision == "fp16" and (a.device == "cpu" or not torch.cuda.is_available()):
        p.error("argument --precision: fp16 needs CUDA (its gradient scaler); on CPU use bf16 or fp32")
    run_pipeline(PRESETS[a.preset], a.root, a.run or a.preset, a.stages, a.base, a.seed, a.device,
                 a.precision, a.retries, a.gate, argv=sys.argv if argv is None else argv)


if __name__ == "__main__":
    main()
