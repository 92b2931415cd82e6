"""The pipeline's sizes: one Preset per way of running it (cpu-demo, full, smoke), fed to every stage's data
making, training and evaluation."""
from dataclasses import dataclass, field

import evaluate as E


@dataclass
class Preset:
    name: str
    # default (built-in SmolLM2-135M-Instruct) | tiny (random, for tests) | a HF directory
    base: str = "default"
    seed_data: str = "stage1_seed.jsonl"  # human stage-1 data, a file in data/ (or an absolute path)
    seed_examples: int = 0            # seed rows used in stage 1 (0: all)
    n_make: int = 120                 # examples each generated stage aims to keep
    oversample: float = 1.5           # prompts written per example wanted: the filters drop some
    replay: float = 0.25              # rows replayed from earlier stages, as a share of the stage's own rows
    # at least this many replayed rows (keeps a stage trainable if filters drop all)
    min_replay: int = 8
    # stage 3: samples per generation task; the first that passes its check is kept
    candidates: int = 2
    judge_kinds: int = 3              # stage 4: judging tasks (of 4 kinds) made from each question and answer
    # stage 6: critique/revise rounds per prompt, a fresh principle each round
    revision_rounds: int = 1
    # stage 6: revisions sampled per prompt and round; the stage-4 judge picks one
    revisions: int = 4
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
    # re-check the stage-1/2 sets after every stage (else after stages 5 and 6)
    recheck_all: bool = True
    eval_tokens: int = 64             # max new tokens of an eval answer
    thresholds: dict = field(default_factory=lambda: dict(E.THRESHOLDS))  # gate of each stage (6: vs stage 5)
    # stage 6 keeps a skill when its stage-1/2 metric drops by less than this
    tolerance: float = 0.03
    gate: bool = True                 # a failed gate stops the run (--gate / --no-gate override)
    warmup: int = 5                   # warmup steps of every training run
    save_every: int = 25              # checkpoint every this many steps
    eval_frac: float = 0.05           # training rows held out for the eval loss


PRESETS = {
    # all six stages within about 30 minutes on a 2-core CPU. A 135M model trained for minutes does not reach
    # the gates of docs/stages.md, so this demo of the mechanics measures and reports every gate, stopping
    # at none
    "cpu-demo": Preset("cpu-demo", seed_examples=0, n_make=150, oversample=1.5, stage1_epochs=1, epochs=2,
                       gen_batch=64, gen_tokens=40, recheck_all=False, eval_tokens=40, dpo_epochs=3,
                       dpo_lr=2e-4, gate=False),
    # docs/stages.md's sizes (500-1,000 examples a stage) and every eval item: for a GPU
    "full": Preset("full", n_make=800, oversample=1.6, revision_rounds=2, stage1_epochs=3, epochs=3,
                   batch_size=16, max_len=512, gen_batch=64, gen_tokens=96, eval_tokens=96),
    # a tiny random model through every code path in about a minute (the tests)
    "smoke": Preset("smoke", base="tiny", seed_examples=24, n_make=8, oversample=1.0, min_replay=8,
                    stage1_epochs=1, revisions=2, epochs=1, dpo_epochs=1, lora_r=4, lora_alpha=8,
                    batch_size=4, max_len=96, gen_batch=8, gen_tokens=6, eval_limit=6, eval_tokens=6),
}
