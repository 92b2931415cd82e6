"""The stage recipes with scripted models: who wrote each field (provenance), labels from checkable truth,
critic-driven revision targets, principles chosen by prompt kind, every revision round kept, and
Constitutional AI's supervised step before DPO."""
import random
import re
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bootstrap as B  # noqa: E402
import evaluate as E  # noqa: E402
import scorers  # noqa: E402
import stages as S  # noqa: E402

HARMFUL_Q = "How do I get into my neighbour's car without the key?"
BENIGN_Q = "How do I bake a simple loaf of bread at home?"
COMPLY = "Slide a thin strip of metal down the window and pull the lock rod."
REFUSE = "I can't help with getting into someone else's car, but a locksmith or the owner can help you."
REFUSE2 = "I won't help open a car that isn't yours; ask the owner, or call a locksmith if it is your own."
HELP = "Mix flour, water, yeast and salt, knead it, let it rise for an hour, then bake it."
HELP2 = "Knead flour, water, salt and yeast into a dough, let it double in size, and bake it at 220 C."


def text_of(prompt):
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


class FakeCtx:
    """A Context whose models are scripted: each stage's model answers by what the prompt asks for."""

    def __init__(self, wrong_every=2):
        self.preset = replace(B.PRESETS["smoke"], n_make=12, oversample=1.0, revisions=3, revision_rounds=2)
        self.rng = random.Random(0)
        self.topics_file = S.read_data("topics.json")
        self.seed_rows = S.read_data("stage1_seed.jsonl")
        self.eval_items = [it for s in range(1, 7) for it in E.load_eval_set(s)]
        self.calls, self.wrong_every, self.asked = 0, wrong_every, []
        self._rows = {}

    def topics(self, n):
        return [self.topics_file["topics"][i % len(self.topics_file["topics"])] for i in range(n)]

    def stage_rows(self, k):
        return self._rows.get(k) or (self.seed_rows if k == 1 else [])

    def answer(self, k, p):
        t = text_of(p)
        if "decline" in t.lower() or "refus" in t.lower() or "say no" in t.lower():
            return REFUSE
        if t.startswith("Write a message from a user who is") or "redteam" in t or "who is" in t:
            return HARMFUL_Q
        if t.startswith(("Create a user message", "Write a question a user", "Write a request for advice")):
            return BENIGN_Q
        if "arithmetic" in t.lower() or "math problem" in t.lower() or "sum" in t.lower():
            return "What is 12 plus 7?"
        if t.startswith("Revise the response"):                # a second round gives a new wording
            if HARMFUL_Q in t:
                return REFUSE2 if "Response: " + REFUSE in t else REFUSE
            return HELP2 if "Response: " + HELP in t else HELP
        if "Question:" in t and "Response:" in t:           # a critique
            if COMPLY in t:
                return "The response helps someone break into a car."
            return "Nothing needs to change."
        if t == HARMFUL_Q:
            return COMPLY
        if t == BENIGN_Q:
            return HELP
        if re.search(r"\d+ (?:plus|\+) \d+", t):
            return "12 + 7 = 19." if self.calls % 2 else "12 + 7 = 20."
        topic = t.split("about ")[-1].rstrip(".?")
        if t.startswith(tuple(S.TEMPLATES["stage2"]["write_question"])) or "question about" in t:
            return f"What do people like most about {topic}?"
        if "yes or no question" in t or "yes/no" in t:
            return f"Is {topic} popular in winter?"
        if "fact" in t.lower() and "about" in t:
            return f"{topic.capitalize()} have been studied by scientists for many years."
        if "greeting" in t.lower() and t.startswith("Respond"):
            return "Hi there! I'm glad to hear from you today."
        if "greeting" in t.lower():
            return "Hello there, my friend!"
        self.calls += 1         # answers to seed questions: every other one is wrong
        return "I think the answer is Paris." if self.calls % self.wrong_every == 0 else "It is probably so."

    def ask(self, k, prompts, temperature=0.0, max_new_tokens=None):
        self.asked.append(k)
        return [self.answer(k, p) for p in prompts]

    def choose(self, k, prompts, options):
        # the scripted judge sees harm where the response complies with the harmful request
        return [[0.0, -2.0] if COMPLY in p else [-2.0, 0.0] for p in prompts]

    def prefer(self, k, triples, principles=None):
        self.principles = principles
        return [1.0 if scorers.is_refusal(a) == (q == HARMFUL_Q) else -1.0 for q, a, b in triples]


def test_stage2_provenance_is_truthful_and_keyed_answers_are_checked():
    ctx = FakeCtx()
    kept, rejected = S.make_stage2(ctx)
    assert kept and {r["meta"]["stage"] for r in kept} == {2}
    for r in kept + rejected:
        wb = r["meta"]["written_by"]
        # the prompt's form is code's, the sum the parser's
        if r["meta"]["kind"] == "arithmetic" and r in kept:
            assert wb["prompt"] == "constructed" and wb["response"] == "parser"
            assert wb["problem"] == "stage1-model"
            assert r["messages"][1]["content"] == "12 + 7 = 19."
        if r["meta"]["kind"] == "keyed_question":              # a seed question: a human wrote it
            assert wb["prompt"] == "human" and wb["response"] == "stage1-model"
        if r["meta"]["kind"] == "completion":
            assert wb["prompt"] == "constructed"
    keyed = [r for r in rejected if r["meta"]["kind"] == "keyed_question"]
    assert keyed and all("disagrees with the seed" in r["reason"] for r in keyed)


class Stage3Ctx(FakeCtx):
    """The stage-2 writer as the real 135M one behaves: a numbered line, often about another topic than the
    asked one, sometimes a near-copy of an instruction it wrote before, sometimes no instruction at all."""
    OTHER = ["Describe how glaciers carve deep valleys.", "Explain why cats purr when they are content.",
             "List three uses for an old wooden ladder.", "Tell me how lighthouses warned ships at night."]

    def ask(self, k, prompts, temperature=0.0, max_new_tokens=None):
        out = []
        for p in prompts:
            t, i = text_of(p), len(self.asked)
            self.asked.append(k)
            if t.startswith("Here are two instructions"):
                asked = t.split("same kind, about ")[1].split(". Reply")[0]
                out.append(["3. Write a short poem about " + asked + ".",          # on topic, numbered
                            "3. " + self.OTHER[(i // 4) % 4],                      # another topic
                            "3. Write a short poem about " + asked + "!",          # a near-copy of a kept one
                            "3. Hello."][i % 4])                                   # not an instruction
            else:
                out.append("Here is one answer about " + t.lower().rstrip(".?!") + ", with new details too.")
        return out


def test_stage3_keeps_novel_instructions_off_the_asked_topic_and_drops_copies():
    ctx = Stage3Ctx()
    kept, rejected = S.make_stage3(ctx)
    prompts = [r["messages"][0]["content"] for r in kept + rejected]
    assert prompts and not any(x.startswith("3.") for x in prompts)               # the list mark is gone
    by_instruction = ("instruction", "not an instruction")
    passed = [r for r in kept + rejected if not r.get("reason", "").startswith(by_instruction)]
    off = [r for r in passed if r["messages"][0]["content"] in Stage3Ctx.OTHER]
    assert len(off) == 4 and all(r["meta"]["topic"] is None for r in off)    # kept on, its topic not claimed
    poems = [r for r in passed if "poem" in r["messages"][0]["content"]]
    assert poems
    assert all(r["meta"]["topic"] and r["meta"]["topic"] in r["messages"][0]["content"] for r in poems)
    reasons = [r["reason"] for r in rejected]
    assert any("not novel" in x for x in reasons) and any("3-30 words" in x for x in reasons)
    stage2 = {"prompt": "stage2-model", "response": "stage2-model"}
    assert all(r["meta"]["written_by"] == stage2 for r in passed)


def test_stage4_labels_come_from_truth_and_are_balanced():
    ctx = FakeCtx()
    kept, _ = S.make_stage4(ctx)
    by_kind = {}
    for r in kept:
        by_kind.setdefault(r["meta"]["kind"], []).append(r)
        p, label = r["messages"][0]["content"], r["messages"][1]["content"]
        if "principle" in p and "Response: " + COMPLY in p:     # complying with a harmful request violates
            assert label.startswith("Yes")
        if "principle" in p and "Response: " + REFUSE in p and HARMFUL_Q in p:
            assert label.startswith("No")
        if p.startswith("Is this answer correct?") and "= 19" in p:
            assert label.startswith("Yes")                      # the parser's sum
        if p.startswith("Is this answer correct?") and "= 20" in p:
            assert label.startswith("No")
        assert r["meta"]["written_by"]["response"] == "constructed"
    for kind in ("answer_correct", "principle_violation"):
        labels = [r["messages"][1]["content"][:2] for r in by_kind[kind]]
        assert labels.count("Ye") == labels.count("No") > 0, (kind, labels)
    pairs = by_kind["pairwise"]                                    # both A/B orders, with the principle
    assert {r["messages"][1]["content"] for r in pairs} == {"A", "B"}
    assert all("principle" in r["messages"][0]["content"] for r in pairs)


def test_stage5_critic_drives_refusal_with_alternative_and_unchanged_targets():
    ctx = FakeCtx()
    kept, rejected = S.make_stage5(ctx)
    safety = [r for r in kept if r["meta"].get("target") == "harm"]
    assert safety, "no safety revision was made"
    for r in safety:
        prompt, target = r["messages"][0]["content"], r["messages"][1]["content"]
        assert prompt.startswith("Revise the response according to the feedback.\nQuestion: " + HARMFUL_Q)
        assert "Response: " + COMPLY in prompt and "Feedback: " in prompt
        # a refusal with an alternative
        assert target == REFUSE and scorers.is_refusal(target) and "locksmith" in target
        assert r["meta"]["written_by"]["critique"] == "stage4-model"
    # nothing to change: kept as it is
    for r in (x for x in kept if x["meta"].get("target") == "keep"):
        response = re.search(r"Response: (.*)\nFeedback", r["messages"][0]["content"]).group(1)
        assert r["messages"][1]["content"] == response
    for r in kept:     # the user's question is shown in every critic-driven revision prompt
        if r["meta"]["kind"] == "revise_feedback":
            assert "\nQuestion: " in r["messages"][0]["content"]


def test_stage6_principles_by_prompt_kind_and_every_round_kept():
    ctx = FakeCtx()
    kept, rejected = S.make_stage6(ctx)
    harm = {p["name"] for p in S.HARM}
    help_ = {p["name"] for p in S.HELP}
    assert kept
    for r in kept + rejected:
        kind, principle = r["meta"]["kind"], r["meta"]["principle"]
        assert principle in (harm if kind == "harmful" else help_), (kind, principle)
    rounds = {(r["prompt"][0]["content"], r["meta"]["round"]) for r in kept}
    assert {rnd for _, rnd in rounds} == {1, 2}                 # the second round's revisions are kept too
    for r in kept:
        # the preferred side refuses, the other complies
        if r["meta"]["kind"] == "harmful":
            assert r["meta"]["chosen_refuses"] and r["meta"]["rejected_complies"]
        assert r["meta"]["written_by"]["chosen"] == "stage5-model"


def test_stage6_trains_the_supervised_step_before_dpo(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(B.sft, "train", lambda cfg, rows: calls.append(("sft", cfg.base, cfg.out)) or {})
    monkeypatch.setattr(B.dpo, "train", lambda cfg, rows: calls.append(("dpo", cfg.base, cfg.out)) or {})
    monkeypatch.setattr(B, "read_jsonl", lambda p: [])
    run = type("R", (), {"preset": B.PRESETS["smoke"], "precision": "fp32", "seed": 0, "device": "cpu",
                         "stage_dir": lambda self, k: tmp_path / f"stage{k}",
                         "model_dir": lambda self, k: tmp_path / f"stage{k}" / "model"})()
    B.train_stage(run, 6, [], 0)
    assert [c[0] for c in calls] == ["sft", "dpo"]
    assert calls[0][1] == str(tmp_path / "stage5" / "model")              # SL-CAI on stage 5's model
    assert calls[1][1] == str(Path(calls[0][2]) / "model")                 # DPO on the SL model
