"""Every command line checks its numbers before it does anything: a value out of range is argparse's one-line
error with exit status 2, never a silent no-op (0 answers, an untrained model published), an internal crash,
or training in the wrong direction (DPO beta < 0, label smoothing above 0.5)."""
import re
import subprocess
import sys

import pytest
import torch

import bootstrap as B
import evaluate as E
import train_dpo as D
import train_sft as sft
from conftest import ROOT

SFT = ["--data", "d.jsonl", "--out", "o"]
CASES = [  # (main, arguments, what the message says)
    (sft.main, SFT + ["--batch-size", "-2"], "argument --batch-size: must be > 0, got -2"),
    (sft.main, SFT + ["--batch-size", "0"], "argument --batch-size: must be > 0, got 0"),
    (sft.main, SFT + ["--batch-size", "two"], "argument --batch-size: not an int: 'two'"),
    (sft.main, SFT + ["--epochs", "0"], "argument --epochs: must be > 0, got 0"),
    (sft.main, SFT + ["--grad-accum", "0"], "argument --grad-accum: must be > 0"),
    (sft.main, SFT + ["--save-every", "0"], "argument --save-every: must be > 0"),
    (sft.main, SFT + ["--lora-r", "0"], "argument --lora-r: must be > 0"),
    (sft.main, SFT + ["--lora-alpha", "-8"], "argument --lora-alpha: must be a finite number > 0"),
    (sft.main, SFT + ["--lora-dropout", "1"], "argument --lora-dropout: must be in [0, 1)"),
    (sft.main, SFT + ["--max-len", "-1"], "argument --max-len: must be > 1, got -1"),
    (sft.main, SFT + ["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
    (sft.main, SFT + ["--lr", "-0.001"], "argument --lr: must be a finite number > 0, got -0.001"),
    (sft.main, SFT + ["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (sft.main, SFT + ["--warmup", "-1"], "argument --warmup: must be >= 0"),
    (sft.main, SFT + ["--max-steps", "-3"], "argument --max-steps: must be >= 0"),
    (sft.main, SFT + ["--eval-frac", "1"], "argument --eval-frac: must be in [0, 1)"),
    (sft.main, SFT + ["--min-lr-ratio", "2"], "argument --min-lr-ratio: must be in [0, 1]"),
    (sft.main, SFT + ["--grad-clip", "-1"], "argument --grad-clip: must be a finite number >= 0"),
    (sft.main, SFT + ["--lora-targets", "q_proj,,v_proj"],
     "argument --lora-targets: must be comma-separated"),
    (sft.main, SFT + ["--precision", "fp8"], "argument --precision: must be auto, fp32, bf16 or fp16"),
    (sft.main, SFT + ["--device", "cuda"],
     "argument --device: 'cuda' asks for CUDA, which this machine does not have"),
    (sft.main, SFT + ["--device", "tpu"], "argument --device: must be auto, cpu, cuda or cuda:N"),
    (sft.main, SFT + ["--precision", "fp16", "--device", "cpu"], "precision: fp16 needs CUDA"),
    (D.main, SFT + ["--beta", "0"], "argument --beta: must be a finite number > 0 (0 learns nothing"),
    (D.main, SFT + ["--beta", "-1"], "argument --beta: must be a finite number > 0"),
    (D.main, SFT + ["--loss-type", "ipo", "--beta", "0"], "argument --beta: must be a finite number > 0"),
    (D.main, SFT + ["--label-smoothing", "2"], "argument --label-smoothing: must be in [0, 0.5)"),
    (D.main, SFT + ["--label-smoothing", "0.5"], "argument --label-smoothing: must be in [0, 0.5)"),
    (D.main, SFT + ["--loss-type", "hinge"], "argument --loss-type: must be sigmoid or ipo"),
    (D.main, SFT + ["--batch-size", "0"], "argument --batch-size: must be > 0"),
    (E.main, ["--model", "default", "--stage", "1", "--batch-size", "-1"],
     "argument --batch-size: must be > 0, got -1"),
    (E.main, ["--model", "default", "--stage", "1", "--max-new-tokens", "-5"],
     "argument --max-new-tokens: must be > 0"),
    (E.main, ["--model", "default", "--stage", "1", "--limit", "-1"],
     "argument --limit: must be >= 0, got -1"),
    (E.main, ["--model", "default", "--stages", "a-b"], "argument --stages: stages are N, N-M or a list"),
    (E.main, ["--model", "default", "--stages", "3-1"], "argument --stages: stages are N, N-M or a list"),
    (E.main, ["--model", "default", "--stage", "7"], "argument --stage: invalid choice: 7"),
    (E.main, ["--model", "default", "--stage", "1", "--device", "cuda"],
     "argument --device: cuda asked for, but CUDA"),
    (E.main, ["--model", "default", "--stage", "1", "--dtype", "int8"],
     "argument --dtype: invalid choice: 'int8'"),
    (B.main, ["--preset", "smoke", "--retries", "-1"], "argument --retries: must be >= 0, got -1"),
    (B.main, ["--preset", "smoke", "--stages", "a-b"], "argument --stages: --stages wants N or N-M"),
    (B.main, ["--preset", "smoke", "--device", "cuda"],
     "argument --device: cuda asked for, but CUDA is not available"),
    (B.main, ["--preset", "smoke", "--base", "/no/such/model"],
     "argument --base: not a usable model directory: "
                                                                 "missing file: /no/such/model/config.json"),
    (B.main, ["--preset", "smoke", "--run", "../elsewhere"], "argument --run: --run wants a folder name"),
    (B.main, ["--preset", "smoke", "--precision", "fp16", "--device", "cpu"],
     "argument --precision: fp16 needs CUDA"),
]


@pytest.mark.parametrize("main, argv, message", CASES,
                         ids=[f"{m.__module__}:{' '.join(a[-2:])}" for m, a, _ in CASES])
def test_out_of_range_numbers_are_one_line_argparse_errors(main, argv, message, capsys, monkeypatch,
                                                           tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the same answer on a machine with a GPU
    monkeypatch.chdir(tmp_path)   # nothing may be written, but if it were, not into the repository
    if main is B.main:
        argv = argv + ["--root", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], err
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_out_of_range_settings_from_python_callers_too(tmp_path):
    cfg = sft.SFTConfig(base="default", data=str(tmp_path / "d.jsonl"), out=str(tmp_path / "o"),
                        batch_size=-2,
                      epochs=0, device="cpu")
    with pytest.raises(ValueError, match=r"epochs: must be > 0, got 0; batch_size: must be > 0, got -2"):
        sft.train(cfg)
    with pytest.raises(ValueError, match=r"label_smoothing: must be in \[0, 0.5\)"):
        D.train(D.DPOConfig(base="default", data="x", out=str(tmp_path / "o"), label_smoothing=2.0,
                            device="cpu"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", ["train_sft.py", "train_dpo.py", "evaluate.py", "bootstrap.py"])
def test_help_explains_every_flag(script):
    lines = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    options = [i for i, line in enumerate(lines) if line.startswith("  -")]
    assert len(options) > 5
    for i in options:   # help on the flag's own line, or indented on the next
        own = re.split(r"\s{2,}", lines[i].strip(), maxsplit=1)
        below = lines[i + 1] if i + 1 < len(lines) else ""
        assert len(own) == 2 or (below.startswith(" " * 8) and not below.strip().startswith("-")), lines[i]
