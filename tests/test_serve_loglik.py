"""/v1/completions with echo + logprobs on the Serve app (llama.cpp): the prompt's token logprobs in
OpenAI's completions format, equal to the deployment's own loglikelihood; adapters by model name;
batches of prompts (text or token ids); refusals. /v1/chat/completions with logprobs and
top_logprobs: one entry per generated token, the greedy token the most likely one, base and
adapter; refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.engines]

sys.path.insert(0, str(Path(__file__).parent))
from _adapters import SMOLLM2_DIMS, gguf_lora_for  # noqa: E402
from _servers import free_port  # noqa: E402


@pytest.fixture(scope="module")
def served(ray_cluster, smollm2_gguf, tmp_path_factory):
    from ray import serve

    from cluster.config import parse_config
    from cluster.runtime import deploy_app
    from deployments._serve import APP_NAME

    root = tmp_path_factory.mktemp("serve-ll")
    adapters = root / "adapters"
    adapters.mkdir()
    gguf_lora_for(SMOLLM2_DIMS, adapters / "alpha", seed=21, std_b=0.1, modules=("q_proj", "v_proj", "o_proj"))
    cfg = parse_config(
        {
            "cluster": {"serve": {"host": "127.0.0.1", "port": free_port()}},
            "models": [{"name": "smollm2", "engine": "llamacpp", "path": str(smollm2_gguf), "resources": {"llamacpp": 1},
                        "max_adapters_per_replica": 1, "adapter_dirs": [str(adapters)],
                        "options": {"parallel": 2, "ctx_size": 1024, "threads": 1}}],
            "staging": {"cache_dir": str(root / "cache")},
        },
        "test",
    )
    url, _ = deploy_app(cfg)
    yield url
    serve.delete(APP_NAME)


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=300)


async def test_echo_returns_the_prompts_logprobs(served):
    from deployments import ServeTextModel

    context, continuation = "The capital of France is", " Paris"
    r = _post(served, {"model": "smollm2", "prompt": context + continuation, "echo": True, "logprobs": 2,
                       "max_tokens": 0, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == context + continuation
    assert "".join(lp["tokens"]) == context + continuation
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
    assert all(len(t) == 2 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"][0] == 0 and lp["text_offset"][-1] == len(context)

    # the same numbers as the deployment's loglikelihood of (context, continuation)
    model = ServeTextModel("smollm2")
    (ll,) = await model.loglikelihood([(context, continuation)])
    assert ll.n_tokens == 1 and lp["token_logprobs"][-1] == pytest.approx(ll.logprob, abs=1e-6)

    # an adapter by model name scores differently; the base is unchanged after it
    r2 = _post(served, {"model": "smollm2:alpha", "prompt": context + continuation, "echo": True, "logprobs": 0,
                        "max_tokens": 0})
    assert r2.status_code == 200, r2.text
    assert r2.json()["choices"][0]["logprobs"]["token_logprobs"][1:] != lp["token_logprobs"][1:]
    (again,) = await model.loglikelihood([(context, continuation)])
    assert again.logprob == ll.logprob


def test_lm_eval_shape_batches_and_refusals(served):
    ids = httpx.post(f"{served}/v1/completions", json={"model": "smollm2", "prompt": [[504, 3575, 282, 4649, 314, 7042],
                     [504, 3575, 282]], "echo": True, "logprobs": 1, "max_tokens": 0}, timeout=300)
    assert ids.status_code == 200, ids.text
    choices = ids.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert [len(c["logprobs"]["tokens"]) for c in choices] == [6, 3]
    assert choices[0]["logprobs"]["token_logprobs"][:3] == pytest.approx(choices[1]["logprobs"]["token_logprobs"], abs=1e-4)

    # echo with one generated token (lm-eval's request): the prompt's tokens, then the new one
    gen = _post(served, {"model": "smollm2", "prompt": "The capital of France is", "echo": True, "logprobs": 1,
                         "max_tokens": 1, "temperature": 0})
    assert gen.status_code == 200, gen.text
    lp = gen.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 6 and gen.json()["usage"]["completion_tokens"] == 1

    # lm-eval's default request (tokenized_requests): the same as token ids, continued by one token
    by_ids = _post(served, {"model": "smollm2", "prompt": [[504, 3575, 282, 4649, 314, 7042]], "echo": True,
                            "logprobs": 1, "max_tokens": 1, "temperature": 0, "seed": 1234})
    assert by_ids.status_code == 200, by_ids.text
    lp_ids = by_ids.json()["choices"][0]["logprobs"]
    assert len(lp_ids["tokens"]) == 7 and by_ids.json()["usage"]["completion_tokens"] == 1
    assert lp_ids["token_logprobs"][:6] == pytest.approx(choices[0]["logprobs"]["token_logprobs"], abs=1e-4)

    for body, word in [
        ({"model": "smollm2", "prompt": "Hi", "max_tokens": 0}, "max_tokens"),
        ({"model": "smollm2", "prompt": "Hi", "echo": True, "max_tokens": 0, "stream": True}, "stream"),
        # llama.cpp's forced decoding cannot emit a special token: a clear 400, not a 500
        ({"model": "smollm2", "prompt": [[1, 2]], "echo": True, "max_tokens": 3}, "special token"),
    ]:
        r = _post(served, body)
        assert r.status_code == 400 and word in r.text, (body, r.text)


# --------------------------------------------------------------------------- chat logprobs

STORY = [{"role": "user", "content": "Write a short story about a cat who learns to sail."}]


def _chat(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)


def _check_greedy_chat_logprobs(body: dict, top_n: int) -> list[dict]:
    """The invariants of a greedy answer's chat logprobs; returns its `content`."""
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"content", "refusal"} and lp["refusal"] is None
    content = lp["content"]
    # one entry per generated token: the end-of-generation token (text-less) is the one the engine
    # counts besides, and a 12-token answer cut at max_tokens has none
    assert choice["finish_reason"] == "length"
    assert len(content) == body["usage"]["completion_tokens"] == 12
    assert "".join(t["token"] for t in content) == choice["message"]["content"]
    for t in content:
        assert set(t) == {"token", "logprob", "bytes", "top_logprobs"}
        assert t["bytes"] == list(t["token"].encode()) and t["logprob"] <= 0
        top = t["top_logprobs"]
        assert len(top) == top_n and all(set(x) == {"token", "logprob", "bytes"} for x in top)
        assert [x["logprob"] for x in top] == sorted((x["logprob"] for x in top), reverse=True)
        # greedy decoding emitted the argmax: its logprob is the top one (the engine's own numbers
        # for the tokens it emitted, scored after the very prompt ids it generated from)
        assert t["logprob"] == pytest.approx(top[0]["logprob"], abs=1e-5), t
        assert t["token"] == top[0]["token"], t
    return content


def test_chat_logprobs_base_and_adapter(served):
    body = {"messages": STORY, "logprobs": True, "top_logprobs": 3, "max_tokens": 12, "temperature": 0}
    base = _chat(served, {"model": "smollm2", **body})
    assert base.status_code == 200, base.text
    base_content = _check_greedy_chat_logprobs(base.json(), 3)

    adapted = _chat(served, {"model": "smollm2:alpha", **body})
    assert adapted.status_code == 200, adapted.text
    adapted_content = _check_greedy_chat_logprobs(adapted.json(), 3)
    # the first reply token follows the same prompt in both: the adapter's distribution there differs
    assert [x["logprob"] for x in adapted_content[0]["top_logprobs"]] != pytest.approx(
        [x["logprob"] for x in base_content[0]["top_logprobs"]], abs=1e-4)
    assert [t["logprob"] for t in adapted_content] != [t["logprob"] for t in base_content]

    # logprobs without top_logprobs: the same numbers, empty top lists; the base is unchanged after the
    # adapter. (Within 1e-4: llama.cpp's logprobs move in the fifth decimal with how many top tokens
    # a request asks for, its n_probs; measured 1.7e-5, and none between repeats of one request.)
    again = _chat(served, {"model": "smollm2", "messages": STORY, "logprobs": True, "max_tokens": 12,
                           "temperature": 0})
    assert again.status_code == 200, again.text
    plain = again.json()["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in plain] == [t["token"] for t in base_content]
    assert [t["logprob"] for t in plain] == pytest.approx([t["logprob"] for t in base_content], abs=1e-4)
    assert all(t["top_logprobs"] == [] for t in plain)


def test_chat_logprobs_of_an_answer_that_ends(served):
    """An answer that ends on the end-of-generation token: the engine counts that token in
    completion_tokens, and it has no text, so no entry (as llama.cpp's own logprobs)."""
    r = _chat(served, {"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France? "
                       "Answer in one word."}], "logprobs": True, "max_tokens": 40, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert choice["finish_reason"] == "stop" and content
    assert len(content) == body["usage"]["completion_tokens"] - 1
    assert "".join(t["token"] for t in content) == choice["message"]["content"]


def test_chat_logprobs_refusals(served):
    for body, param in [
        ({"top_logprobs": 3}, "top_logprobs"),                       # needs logprobs: true
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),    # OpenAI's range is 0..20
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"logprobs": True, "stream": True}, "stream"),              # answered whole
    ]:
        r = _chat(served, {"model": "smollm2", "messages": STORY, "max_tokens": 2, **body})
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and param in err["message"] and "\n" not in err["message"], (body, err)
    # a chat without logprobs answers as before: logprobs null
    r = _chat(served, {"model": "smollm2", "messages": STORY, "max_tokens": 2, "logprobs": False, "top_logprobs": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None, r.text
