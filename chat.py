"""The tokenizer and the chat format: BPE from `tokenizers`, the turns laid out as the model's chat template
says.

Two families of template are read: ChatML (<|im_start|>, SmolLM2 and Qwen) and Llama 3 (<|start_header_id|>).
The assistant tokens of a rendered chat are the SFT targets; their mask comes from character offsets.
"""
import re

from tokenizers import Tokenizer as HFTokenizer

from files import located_jsonl


_JINJA_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)


_JINJA_STR = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"", re.S)


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def _template_texts(template):
    """What a Jinja template prints verbatim: the raw text between its tags and the string literals inside
    them, with escapes such as \\n undone (a template may hold a real newline or the escape)."""
    out, pos = [], 0
    for tag in _JINJA_TAG.finditer(template):
        out.append(template[pos:tag.start()])
        if not tag.group().startswith("{#"):
            for lit in _JINJA_STR.finditer(tag.group()):
                text = lit.group(1) if lit.group(1) is not None else lit.group(2)
                out.append(re.sub(r"\\(.)", lambda e: _ESCAPES.get(e.group(1), e.group(1)), text, flags=re.S))
        pos = tag.end()
    out.append(template[pos:])
    return out


class Tokenizer:
    """`tokenizers` BPE plus the chat format read from tokenizer_config.json's template."""

    def __init__(self, tok: HFTokenizer, config: dict):
        self.tok, self.config = tok, config
        template = config.get("chat_template") or ""
        if isinstance(template, list):  # several named templates: take the default
            template = next((t["template"] for t in template if t.get("name") == "default"),
                            template[0]["template"])
        if "<|im_start|>" in template:
            self.format, self.end_of_turn = "chatml", "<|im_end|>"
        elif "<|start_header_id|>" in template:
            self.format, self.end_of_turn = "llama3", "<|eot_id|>"
        else:
            raise ValueError("unknown chat template: supported formats are ChatML (<|im_start|>) "
                             "and Llama 3 (<|start_header_id|>)")
        # a system turn the template writes out whole (SmolLM2, Qwen2.5) is added when a chat has none; it is
        # looked for in the text the template prints verbatim, whether its newline is real or an escape
        found = (re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", t,
                           re.S) for t in _template_texts(template))
        self.default_system = next((m.group(1) for m in found if m), None)
        # Qwen3: the project uses its non-thinking mode, i.e. apply_chat_template(..., enable_thinking=False):
        # an empty think block opens the answer of the generation prompt and of a final assistant turn
        thinks = self.format == "chatml" and "enable_thinking" in template
        self.no_think = "<think>\n\n</think>\n\n" if thinks else ""

        def tid(name):
            v = config.get(name)
            v = v.get("content") if isinstance(v, dict) else v
            return tok.token_to_id(v) if v else None
        self.eos_id = tid("eos_token")
        bos = config.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        self.bos_token = bos if self.format == "llama3" else None
        stops = {self.eos_id, tok.token_to_id(self.end_of_turn), tok.token_to_id("<|end_of_text|>")}
        self.stop_ids = sorted(i for i in stops if i is not None)  # a row ends at any of these
        self.pad_id = tid("pad_token") if tid("pad_token") is not None else self.stop_ids[0]
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _segments(self, messages, add_generation_prompt):
        """The rendered chat as (text, is_assistant_target) pieces."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"message {i}: unknown role {m.get('role')!r} (system, user, assistant)")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"message {i}: content must be a string")
        if self.format == "chatml":
            if self.default_system and messages[0]["role"] != "system":
                yield f"<|im_start|>system\n{self.default_system}<|im_end|>\n", False
            last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
            for i, m in enumerate(messages):
                yield f"<|im_start|>{m['role']}\n", False
                if m["role"] == "assistant":  # the answer and its end-of-turn token are the targets
                    content = m["content"]
                    if self.no_think and i == len(messages) - 1 and i > last_user:
                        yield self.no_think, False
                        content = content.lstrip("\n")
                    yield content + "<|im_end|>", True
                    yield "\n", False
                else:
                    yield m["content"] + "<|im_end|>\n", False
            if add_generation_prompt:
                yield "<|im_start|>assistant\n" + self.no_think, False
        else:
            yield self.bos_token or "", False
            for m in messages:
                yield f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False
                yield m["content"].strip() + "<|eot_id|>", m["role"] == "assistant"
            if add_generation_prompt:
                yield "<|start_header_id|>assistant<|end_header_id|>\n\n", False

    def render_chat(self, messages, add_generation_prompt=True):
        return "".join(t for t, _ in self._segments(messages, add_generation_prompt))

    def encode_chat(self, messages, add_generation_prompt=False):
        """Token ids of the rendered chat and a 0/1 mask of assistant tokens (the SFT targets).

        The whole text is tokenized at once and the mask comes from character offsets, so the
        ids are exactly those of `encode(render_chat(...))` and the mask goes by position, not id.
        """
        spans, text = [], ""
        for piece, target in self._segments(messages, add_generation_prompt):
            if target:
                spans.append((len(text), len(text) + len(piece)))
            text += piece
        enc = self.tok.encode(text, add_special_tokens=False)
        mask = [int(any(a <= s < b for a, b in spans)) for s, _ in enc.offsets]
        return enc.ids, mask


def read_chats(source, tokenizer, system=None, name=None):
    """Every JSONL line as (object, messages); a bad line stops everything before any generation."""
    rows = []
    try:
        for where, obj in located_jsonl(source, name=name):
            rows.append((obj, line_chat(obj, where, tokenizer, system)))
    except ValueError as e:   # not UTF-8, not JSON, or not a prompt
        raise SystemExit(str(e)) from None
    return rows


def line_chat(obj, where, tokenizer, system):
    """The chat of one input line: {"prompt": text} or {"messages": [...]}, the system turn put first."""
    if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
        raise ValueError(f'{where}: a line is an object with "prompt" (text) or "messages" (a list of '
                         f'messages)')
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        raise ValueError(f'{where}: "prompt" must be a string')
    msgs = [{"role": "user", "content": obj["prompt"]}] if "prompt" in obj else obj["messages"]
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise ValueError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    if system and msgs[0].get("role") != "system":
        msgs = [{"role": "system", "content": system}] + msgs
    try:
        tokenizer.render_chat(msgs)  # checks roles and contents
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return msgs
