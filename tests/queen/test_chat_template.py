"""Chat prompts: the model's own template in a sandbox, and the documented fallback."""

from __future__ import annotations

import pytest

from rbee_control.queen.chat_template import FALLBACK_STOP, normalize_messages, render_chat
from rbee_worker.protocol.errors import RbeeError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA_STYLE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "[INST] {{ m['content'] }} [/INST]{% endfor %}"
)


def test_the_model_template_renders_with_a_generation_prompt() -> None:
    rendered = render_chat(normalize_messages([{"role": "user", "content": "hi"}]), CHATML)
    assert rendered.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert rendered.templated and rendered.extra_stop == ()


def test_a_template_that_writes_bos_loses_it_since_the_runtime_adds_it() -> None:
    rendered = render_chat([{"role": "user", "content": "hi"}], LLAMA_STYLE, bos_token="<s>")
    assert rendered.prompt == "[INST] hi [/INST]"
    # a template that never mentions bos_token keeps its text even when it starts like the BOS
    kept = render_chat([{"role": "user", "content": "hi"}], CHATML, bos_token="<|im_start|>")
    assert kept.prompt.startswith("<|im_start|>user")


def test_raise_exception_in_a_template_is_a_400_with_its_message() -> None:
    with pytest.raises(RbeeError) as caught:
        render_chat([{"role": "system", "content": "x"}], LLAMA_STYLE, bos_token="<s>")
    assert caught.value.status == 400 and "System role not supported" in caught.value.message


def test_the_sandbox_refuses_reaching_into_python() -> None:
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(RbeeError) as caught:
        render_chat([{"role": "user", "content": "x"}], evil)
    assert caught.value.status == 400


def test_no_template_means_a_plain_transcript_ending_in_assistant() -> None:
    messages = normalize_messages(
        [
            {"role": "developer", "content": "be terse"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "bee"}]},
        ]
    )
    rendered = render_chat(messages, None)
    assert rendered.prompt == "System: be terse\nUser: hi bee\nAssistant:"
    assert rendered.extra_stop == (FALLBACK_STOP,) and not rendered.templated
    broken = render_chat(messages, "{% for %}")
    assert broken.prompt == rendered.prompt


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": [{"type": "image_url"}]}], ["x"]],
)
def test_bad_messages_are_400(messages: list) -> None:
    with pytest.raises(RbeeError) as caught:
        normalize_messages(messages)
    assert caught.value.status == 400 and caught.value.details["field"] == "messages"
