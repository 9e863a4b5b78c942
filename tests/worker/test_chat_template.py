"""Chat prompts: the model's own template in a bounded sandbox, and the documented fallback."""

from __future__ import annotations

import asyncio
import threading

import pytest

from rbee_worker.chat import FALLBACK_STOP, BoundedRunner, ChatTemplate
from rbee_worker.protocol.errors import RbeeError
from rbee_worker.protocol.messages import parse_messages

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA_STYLE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "[INST] {{ m['content'] }} [/INST]{% endfor %}"
)
HI = parse_messages([{"role": "user", "content": "hi"}])


def test_the_model_template_renders_with_a_generation_prompt() -> None:
    rendered = ChatTemplate(CHATML, eos_token="<|im_end|>").render(HI)
    assert rendered.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert rendered.source == "gguf" and rendered.stop == ("<|im_end|>",)


def test_a_template_that_writes_bos_loses_it_when_the_runtime_adds_it() -> None:
    rendered = ChatTemplate(LLAMA_STYLE, "<s>", "</s>", runtime_adds_bos=True).render(HI)
    assert rendered.prompt == "[INST] hi [/INST]"
    # a runtime that adds no BOS keeps the template's
    kept = ChatTemplate(LLAMA_STYLE, "<s>", "</s>", runtime_adds_bos=False).render(HI)
    assert kept.prompt == "<s>[INST] hi [/INST]"


def test_a_request_template_replaces_the_model_one() -> None:
    rendered = ChatTemplate(LLAMA_STYLE, "<s>").render(HI, CHATML)
    assert rendered.prompt.startswith("<|im_start|>user") and rendered.source == "request"
    assert "<|im_end|>" in rendered.stop


def test_raise_exception_in_a_template_is_a_400_with_its_message() -> None:
    with pytest.raises(RbeeError) as caught:
        ChatTemplate(LLAMA_STYLE, "<s>").render(parse_messages([{"role": "system", "content": "x"}]))
    assert caught.value.status == 400 and "System role not supported" in caught.value.message


def test_the_sandbox_refuses_reaching_into_python() -> None:
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(RbeeError) as caught:
        ChatTemplate(evil).render(HI)
    assert caught.value.status == 400


def test_no_template_means_a_plain_transcript_ending_in_assistant() -> None:
    messages = parse_messages(
        [
            {"role": "developer", "content": "be terse"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "bee"}]},
        ]
    )
    rendered = ChatTemplate(None).render(messages)
    assert rendered.prompt == "System: be terse\nUser: hi bee\nAssistant:"
    assert rendered.stop == (FALLBACK_STOP,) and rendered.source == "fallback"
    broken = ChatTemplate("{% for %}").render(messages)
    assert broken.prompt == rendered.prompt
    assert ChatTemplate("{% for %}").source == "fallback" and ChatTemplate(CHATML).source == "gguf"


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": [{"type": "image_url"}]}], ["x"]],
)
def test_bad_messages_are_400(messages: list) -> None:
    with pytest.raises(RbeeError) as caught:
        parse_messages(messages)
    assert caught.value.status == 400 and caught.value.details["field"] == "messages"


BOMBS = [
    "{{ 'x' * 10**9 }}",
    "{{ ['x'] * 1000000000 }}",
    "{{ 2 ** 100000000 }}",
    "{{ range(100000)|length }}",
    "{{ 'a'|center(1000000000) }}",
    "{{ 'a'.ljust(1000000000) }}",
    "{{ '{:>999999999}'.format('x') }}",
    "{{ '{0:{1}}'.format('x', '999999999') }}",
    "{{ '%*s' % (999999999, 'x') }}",
    "{{ ('a' * 1000).replace('', 'b' * 1000) }}",
    "{{ 'ab'|replace('', 'x' * 200000) }}",
    "{{ (range(5000)|list)|join('x' * 100) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}",
    "{{ messages|tojson(indent=1000000000) }}",
    "{{ ('%s' * 1000) % ((('x' * 100000),) * 1000) }}",
    "{{ ('{0}' * 1000).format('x' * 100000) }}",
    "{{ ('%s' * 1000)|format(*((('x' * 1000),) * 1000)) }}",
    "{{ ('a' ~ '\n' * 100000)|indent('x' * 4000) }}",
    "{{ ('a ' * 100000)|wordwrap(1, wrapstring='x' * 4000) }}",
    "{{ ('\t' * 100000).expandtabs(4000) }}",
]


@pytest.mark.parametrize("bomb", BOMBS)
def test_the_sandbox_refuses_huge_things_in_one_step(bomb: str) -> None:
    with pytest.raises(RbeeError) as caught:
        ChatTemplate(bomb).render(HI)
    assert caught.value.status == 422 and caught.value.code == "CHAT_TEMPLATE_FAILED"


def test_lipsum_is_not_offered() -> None:
    with pytest.raises(RbeeError) as caught:
        ChatTemplate("{{ lipsum(4096, max=4096) }}").render(HI)
    assert caught.value.status == 400 and "lipsum" in caught.value.message


def test_ordinary_formatting_and_loops_still_work() -> None:
    template = (
        "{{ '%s: %d'|format('a', 3) }} {{ '{}-{}'.format(1, 2) }} {{ '%-4s|' % 'ab' }}"
        "{% for i in range(3) %}{{ i }}{% endfor %} {{ 'x' * 3 }} {{ messages|tojson }}"
        " {{ 'a\nb'|indent(2) }} {{ 'aa bb'|wordwrap(2) }} {{ 'a\tb'.expandtabs(2) }}"
    )
    rendered = ChatTemplate(template).render(HI)
    expected = 'a: 3 1-2 ab  |012 xxx [{"role": "user", "content": "hi"}] a\n  b aa\nbb a b'
    assert rendered.prompt == expected


NESTED_LOOPS = (
    "{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}"
    "{% endfor %}{% endfor %}{% endfor %}"
)


async def test_a_template_that_runs_too_long_is_stopped_and_its_thread_ends() -> None:
    runner = BoundedRunner(time_limit=0.3)
    slow = ChatTemplate(NESTED_LOOPS)
    with pytest.raises(RbeeError) as caught:
        await runner.run(lambda: slow.render(HI))
    assert caught.value.status == 422 and caught.value.details["reason"] == "time"
    for _ in range(200):  # bounded: the interrupted thread ends between two bytecodes
        if not any(t.name == "rbee-chat-template" for t in threading.enumerate()):
            break
        await asyncio.sleep(0.05)
    assert not any(t.name == "rbee-chat-template" for t in threading.enumerate())
    # the runner is free again: an ordinary template renders
    rendered = await runner.run(lambda: ChatTemplate(CHATML).render(HI))
    assert rendered.prompt.endswith("<|im_start|>assistant\n")


#: The shape of Qwen/Hermes templates: tools in the system turn, calls and results in their own markup.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t['function'] | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}{% for m in messages %}"
    "{% if m['role'] == 'assistant' and m['tool_calls'] is defined %}<|im_start|>assistant\n"
    "{% for c in m['tool_calls'] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% elif m['role'] == 'tool' %}<|im_start|>user\n"
    "<tool_response>{{ m['content'] }}</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "<|im_start|>assistant\n"
)
TOOLS = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
HISTORY = parse_messages([
    {"role": "user", "content": "time?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "noon"},
])  # fmt: skip


def test_a_template_that_reads_tools_renders_them_and_the_calls() -> None:
    prompt = ChatTemplate(TOOLS_TEMPLATE).render(HISTORY, tools=TOOLS).prompt
    assert '{"name": "now", "parameters": {"type": "object"}}' in prompt
    assert '<tool_call>{"name": "now", "arguments": {}}</tool_call>' in prompt  # arguments as an object
    assert "<tool_response>noon</tool_response>" in prompt


def test_a_template_without_tools_gets_them_as_a_system_message_and_calls_as_text() -> None:
    prompt = ChatTemplate(CHATML).render(HISTORY, tools=TOOLS).prompt
    assert prompt.startswith("<|im_start|>system\nYou can call these functions:\n")
    assert '{"name": "now", "parameters": {"type": "object"}}' in prompt
    assert '<|im_start|>assistant\n{"name": "now", "arguments": {}}<|im_end|>' in prompt
    assert "<|im_start|>user\nResult of c1: noon<|im_end|>" in prompt
    fallback = ChatTemplate(None).render(HISTORY, tools=TOOLS).prompt
    assert fallback.startswith("System: You can call") and "User: Result of c1: noon" in fallback
