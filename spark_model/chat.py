"""Chat prompts: a conversation written out by the model's own chat template.

Instruction-tuned models carry a Jinja2 template (the tokenizer's `chat_template`, a
string, as Hugging Face tokenizers hold it) that turns a list of messages into the text
format they were tuned on, special tokens included. Both `SparkModel.chat` and the
server's `/v1/chat/completions` build their prompts here:

    check_messages   the conversation: a non-empty list of {role, content}
    render           the template, run in Jinja2's immutable sandbox
    encode_rendered  the rendered text to token ids (special tokens written as text count)
    prompt_ids       all three, for one tokenizer

The template is model data, not code to trust: it runs in
`jinja2.sandbox.ImmutableSandboxedEnvironment`, which refuses attribute access to
internals (`__class__`, `__mro__`, ...) and calls that change lists and dicts; such a
template fails with a `ChatTemplateError` instead of reaching Python. The environment is
set up the way Hugging Face renders these templates (trim_blocks, lstrip_blocks, the loop
controls extension, a `raise_exception(message)` function, a `tojson` filter that does
not HTML-escape, and `strftime_now(format)`), so published templates render unchanged.

BOS: the template writes its own special tokens, so the text is encoded with
`special=True` and no BOS is added blindly. If the rendered text starts with the BOS
token's text, that text becomes the BOS id (so `{{ bos_token }}` works even for a
tokenizer whose special tokens have no text form); otherwise a tokenizer whose `add_bos`
is true gets its BOS id prepended, and one whose `add_bos` is false gets none.
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content")


class ChatError(ValueError):
    """A conversation that cannot be rendered: bad messages, or the template refused it
    (through `raise_exception`). The caller's input is at fault."""


class NoChatTemplate(ChatError):
    """The model's tokenizer has no chat template."""


class ChatTemplateError(ChatError):
    """The model's chat template is broken or tried something the sandbox forbids: the
    model's data is at fault, not the conversation."""


class _Refused(Exception):
    """Raised by the template's `raise_exception` (kept apart from Jinja2's own errors)."""


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Validate a conversation; return it as plain {"role", "content": str} dicts.

    content is a string, or a list of text parts {"type": "text", "text": str} (as OpenAI
    clients send it), which are joined with nothing between them.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatError("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ChatError(f"{where} must be an object with 'role' and 'content', "
                            f"got {type(m).__name__}")
        unknown = sorted(set(m) - set(MESSAGE_KEYS), key=str)
        if unknown:
            raise ChatError(f"{where} has unknown field(s) {', '.join(map(repr, unknown))}; "
                            f"a message holds only 'role' and 'content'")
        for key in MESSAGE_KEYS:
            if key not in m:
                raise ChatError(f"{where} has no '{key}'")
        role = m["role"]
        if role not in ROLES:
            raise ChatError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        out.append({"role": role, "content": _content(m["content"], f"{where}.content")})
    return out


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatError(f"{where} must be a string or a list of text parts, "
                        f"got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" \
                or set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise ChatError(f"{where}[{j}] must be {{\"type\": \"text\", \"text\": <string>}} "
                            f"(only text parts are supported)")
        texts.append(part["text"])
    return "".join(texts)


def _raise(message: Any) -> None:
    raise _Refused(str(message))


def _tojson(value: Any, indent: int | None = None) -> str:
    """JSON as the template writes it into the prompt: not HTML-escaped (Jinja2's own
    `tojson` escapes <, >, & and ' for HTML pages), non-ASCII kept as is."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """The template compiled in a fresh sandbox (cached: a server renders one template
    for every request)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template has a syntax error at line {e.lineno}: "
                                f"{e.message}") from None


def render(template: str, messages: Sequence[dict], *, bos_token: str = "",
           eos_token: str = "", add_generation_prompt: bool = True) -> str:
    """The conversation written out by `template` (messages as `check_messages` returns
    them), ending with the assistant's turn opened when add_generation_prompt."""
    if not isinstance(template, str):
        raise ChatTemplateError(f"the chat template must be a string, "
                                f"got {type(template).__name__}")
    compiled = _compile(template)
    try:
        return compiled.render(messages=list(messages), bos_token=bos_token,
                               eos_token=eos_token,
                               add_generation_prompt=add_generation_prompt)
    except _Refused as e:
        raise ChatError(f"the chat template refused this conversation: {e}") from None
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"the chat template tried an operation the sandbox "
                                f"forbids: {e}") from None
    except Exception as e:  # Undefined names, type errors, ... inside the template
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None


def token_text(tokenizer, token_id: int | None) -> str:
    """A special token's text (its piece, such as "<s>" or "<|im_end|>"); "" for None."""
    return "" if token_id is None else tokenizer.id_to_piece(token_id)


def render_for(tokenizer, messages: Any) -> str:
    """Check the conversation and render it with the tokenizer's template."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise NoChatTemplate("this model has no chat template (its tokenizer carries none); "
                             "use completions with a plain prompt instead")
    return render(template, check_messages(messages),
                  bos_token=token_text(tokenizer, tokenizer.bos_id),
                  eos_token=token_text(tokenizer, tokenizer.eos_id))


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered conversation: special tokens written as text become their
    ids; BOS as the module docstring says."""
    bos_id = tokenizer.bos_id
    bos = token_text(tokenizer, bos_id)
    if bos and text.startswith(bos):
        return [bos_id] + tokenizer.encode(text[len(bos):], bos=False, special=True)
    ids = tokenizer.encode(text, bos=False, special=True)
    return [bos_id] + ids if tokenizer.add_bos and bos_id is not None else ids


def prompt_ids(tokenizer, messages: Any) -> list[int]:
    """The prompt for a conversation: checked, rendered and encoded."""
    return encode_rendered(tokenizer, render_for(tokenizer, messages))
