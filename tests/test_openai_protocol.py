"""The OpenAI frontend's pure parts (no server): chat templating, logprob tokens, the two
logprobs formats of the contract, request models, error shapes."""

from __future__ import annotations

import pytest

from minisgl_backend.openai.app import _validation_to_openai
from minisgl_backend.openai.chat import ChatRenderer
from minisgl_backend.openai.errors import OpenAIError
from minisgl_backend.openai.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from minisgl_backend.openai.triton_client import _logprobs


class _BosTokenizer:
    """A tokenizer that adds BOS itself, with a template that writes it too."""

    bos_token, bos_token_id = "<s>", 1
    chat_template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, turns, chat_template, tokenize, add_generation_prompt):
        import jinja2

        return jinja2.Template(chat_template).render(messages=turns, bos_token=self.bos_token)


def test_render_cuts_the_bos_the_model_adds_again():
    renderer = ChatRenderer(_BosTokenizer())
    text = renderer.render([ChatMessage(role="developer", content="be brief"),
                            ChatMessage(role="user", content=[{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}])])
    assert text == "[system]be brief[user]a\nb"


def test_no_chat_template_is_a_400_naming_the_option():
    tok = _BosTokenizer()
    tok.chat_template = None
    with pytest.raises(OpenAIError) as info:
        ChatRenderer(tok).render([ChatMessage(role="user", content="hi")])
    assert info.value.status == 400 and "--chat-template" in info.value.message


def test_token_strings_split_or_fall_back_to_the_first_token():
    renderer = ChatRenderer(_BosTokenizer())
    assert renderer.token_strings("abc", 3) == ["a", "b", "c"]
    assert renderer.token_strings("abc", 2) == ["abc", ""]  # cannot split: the text stays whole
    assert renderer.token_strings("", 1) == [""]
    assert renderer.token_strings("x", 0) == []


def test_logprobs_in_both_formats():
    assert _logprobs("[-0.5, -1.25]") == ([-0.5, -1.25], None)
    vllm = '[{"17": {"logprob": -0.1, "rank": 1, "decoded_token": " Paris"}}, {"3": {"logprob": -2.0, "rank": 1}}]'
    assert _logprobs(vllm) == ([-0.1, -2.0], [" Paris", ""])
    assert _logprobs("") == ([], None)


def test_sampling_parameters_carry_only_what_was_set():
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], stop="END", top_k=5,
                                seed=3, max_completion_tokens=7)
    assert req.requested_max_tokens() == 7
    assert req.sampling_parameters(7) == {"max_tokens": 7, "seed": 3, "top_k": 5, "stop": ["END"]}


@pytest.mark.parametrize("fields, param", [({"n": 2}, "n"), ({"top_logprobs": 3}, "top_logprobs"),
                                           ({"tools": [{"type": "function"}]}, "tools"),
                                           ({"tool_choice": "required"}, "tool_choice")])
def test_unsupported_chat_fields_are_named(fields, param):
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], **fields)
    error = req.unsupported()
    assert error is not None and error.status == 400 and error.param == param


def test_completion_prompt_forms():
    assert CompletionRequest(model="m", prompt="hi").single_prompt() == "hi"
    assert CompletionRequest(model="m", prompt=[1, 2]).single_prompt() == [1, 2]
    assert CompletionRequest(model="m", prompt=[[1, 2]]).single_prompt() == [1, 2]
    assert CompletionRequest(model="m", prompt=["hi"]).single_prompt() == "hi"
    with pytest.raises(OpenAIError):
        CompletionRequest(model="m", prompt=[[1], [2]]).single_prompt()


def test_validation_errors_name_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    error = _validation_to_openai(info.value.errors())
    assert error.status == 400 and error.param.startswith("messages.0.content.0")
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], store=True)
    error = _validation_to_openai(info.value.errors())
    assert error.param == "store" and "unsupported field" in error.message
