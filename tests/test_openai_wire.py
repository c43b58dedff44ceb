"""The OpenAI wire formats of logprobs (chat and completions) and the chat request's logprobs
fields, without a model: fast."""

from __future__ import annotations

import pytest

from deployments._openai_wire import (
    ChatRequest,
    TokenLogprob,
    WireError,
    chat_logprobs,
    completion_logprobs,
    parse_request,
)

TOKENS = [TokenLogprob("The", None), TokenLogprob(" caf", -0.5, ((" caf", -0.5), (" dog", -1.25))),
          TokenLogprob("é", -0.125, (("é", -0.125), ("e", -2.5)))]


def test_chat_logprobs_format():
    out = chat_logprobs(TOKENS[1:])
    assert out == {
        "content": [
            {"token": " caf", "logprob": -0.5, "bytes": [32, 99, 97, 102],
             "top_logprobs": [{"token": " caf", "logprob": -0.5, "bytes": [32, 99, 97, 102]},
                              {"token": " dog", "logprob": -1.25, "bytes": [32, 100, 111, 103]}]},
            {"token": "é", "logprob": -0.125, "bytes": [195, 169],
             "top_logprobs": [{"token": "é", "logprob": -0.125, "bytes": [195, 169]},
                              {"token": "e", "logprob": -2.5, "bytes": [101]}]},
        ],
        "refusal": None,
    }
    assert chat_logprobs([TokenLogprob("x", -1.0)])["content"][0]["top_logprobs"] == []
    with pytest.raises(ValueError, match="no logprob"):
        chat_logprobs(TOKENS[:1])  # a reply's tokens follow the prompt: each has one


def test_completion_logprobs_format():
    out = completion_logprobs(TOKENS, with_top=True)
    assert out == {"tokens": ["The", " caf", "é"], "token_logprobs": [None, -0.5, -0.125],
                   "top_logprobs": [None, {" caf": -0.5, " dog": -1.25}, {"é": -0.125, "e": -2.5}],
                   "text_offset": [0, 3, 7]}
    assert completion_logprobs(TOKENS, with_top=False)["top_logprobs"] == [None, None, None]


def _chat(**fields) -> ChatRequest:
    return parse_request(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_chat_request_logprobs_fields():
    assert _chat(logprobs=True, top_logprobs=20).top_logprobs == 20
    assert _chat(logprobs=True).logprobs is True
    assert not _chat(logprobs=False, top_logprobs=0).logprobs  # neutral values pass alone
    for fields in ({"top_logprobs": 1}, {"logprobs": False, "top_logprobs": 5}, {"logprobs": True, "top_logprobs": 21},
                   {"logprobs": True, "top_logprobs": -1}):
        with pytest.raises(WireError) as e:
            _chat(**fields)
        assert e.value.status == 400 and e.value.param == "top_logprobs" and "top_logprobs" in str(e.value), fields
