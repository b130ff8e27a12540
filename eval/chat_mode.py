"""HumanEval asked as a chat: the way an instruction-tuned model is meant to be used.

Each problem's prompt (signature and docstring) goes into one user message asking for the
whole function in a fenced block; the model's reply is rendered with its own chat template
(`spark_model.chat`) and generated to an end-of-turn id. The code of the first fenced block
(or the whole reply when there is none) becomes the completion:

- a reply that defines the problem's function is appended after the prompt as it is, so
  the program holds the prompt's docstring-only definition and then the model's, which
  replaces it (what runs is entirely the model's code);
- a reply without that definition is taken as the function's body and appended directly.

Used by `spark eval --tasks humaneval --chat`; the harness (`eval.generation`) sees an
object with the usual `generate(prompts, ...) -> list[str]`.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

INSTRUCTION = ("Complete the following Python function. Reply with the complete function, "
               "including its signature, in a single ```python code block.\n\n"
               "```python\n{prompt}```")

_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_DEF = re.compile(r"^def[ \t]+(\w+)[ \t]*\(", re.MULTILINE)


def extract_code(reply: str) -> str:
    """The first fenced code block of a reply (an unclosed one runs to the end), or the
    reply itself when it has none."""
    m = _FENCE.search(reply)
    return m.group(1) if m else reply


def entry_point(prompt: str) -> str | None:
    """The name of the last top-level function a HumanEval prompt defines."""
    names = _DEF.findall(prompt)
    return names[-1] if names else None


def completion_from(prompt: str, reply: str) -> str:
    """The text to append after `prompt` so the program runs the model's function."""
    code = extract_code(reply)
    name = entry_point(prompt)
    if name is not None and re.search(rf"^def[ \t]+{re.escape(name)}[ \t]*\(", code,
                                      re.MULTILINE):
        return "\n\n" + code
    return code


class ChatHumanEval:
    """Wraps a loaded model that has a chat template for `eval.generation`."""

    def __init__(self, model: Any):
        from spark_model import chat

        if not getattr(model.tokenizer, "chat_template", None):
            raise chat.NoChatTemplate("--chat needs a model whose tokenizer carries a chat "
                                      "template; this one has none")
        self.model = model
        self._chat = chat
        self.path = getattr(model, "path", None)
        self.last_stats: dict = {}

    def prompt_ids(self, prompt: str) -> list[int]:
        messages = [{"role": "user", "content": INSTRUCTION.format(prompt=prompt)}]
        return self._chat.prompt_ids(self.model.tokenizer, messages)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int, stop: Sequence[str] = ()) -> list[str]:
        ids = [self.prompt_ids(p) for p in prompts]
        out = self.model.generate_tokens(ids, max_new_tokens, temperature=temperature,
                                         top_p=top_p, seed=seed)
        self.last_stats = dict(self.model.last_stats)
        # Without the end id that ended each reply (BPE tokenizers decode "<|im_end|>").
        replies = [self.model.tokenizer.decode(self.model.text_ids(row), errors="replace")
                   for row in out]
        return [completion_from(p, r) for p, r in zip(prompts, replies)]

    def __repr__(self) -> str:
        return f"ChatHumanEval({self.model!r})"
