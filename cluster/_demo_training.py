"""The demo training run: a short real LoRA fine-tune of SmolLM2 that writes go-ml's MLX layout.

It trains rank-8 LoRA on the attention projections of the last layers, on the capability
probes' own questions and answers, and saves `<run>/adapters-smollm2-demo/NNNNNNN_adapters.safetensors`
(plus the rolling `adapters.safetensors` and `adapter_config.json`, as mlx-lm's trainer does).
Training on the probes makes the learning curve rise by construction: the demo shows the
watch → evaluate → score → stream loop working on real checkpoints, it is not a benchmark.
Torch on the CPU is used because it trains this model several times faster than MLX's CPU
backend here.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

RUN_DIR_NAME = "adapters-smollm2-demo"
SYSTEM = "You are a helpful assistant."


def training_examples() -> list[list[dict[str, str]]]:
    """The capability probes as chats whose assistant turn states the expected answer."""
    from evaluators import load_probe_set

    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p.prompt},
             {"role": "assistant", "content": f"The answer is {p.expected}."}]
            for p in load_probe_set("capability").probes]


@dataclass
class CachedExample:
    """One training chat, with the frozen layers' output already computed."""

    hidden: Any        # (1, length, hidden): the input of the first LoRA block
    predict_at: Any    # positions whose next token is part of the answer
    targets: Any       # those next tokens


def prepare_examples(model: Any, tok: Any, first: int) -> list[CachedExample]:
    """Tokenise the training chats and run the frozen layers below block `first` once.

    The frozen blocks see the same inputs every step, so a step need only run the LoRA blocks, and
    the LM head only where the loss is (the answer's tokens): same loss, several times faster.

    Args:
        model: the HF causal LM (LoRA already applied to blocks `first` and above).
        tok: its tokenizer.
        first: the first block that trains.
    """
    import torch

    examples = []
    with torch.no_grad():
        for chat in training_examples():
            prompt_ids = tok.apply_chat_template(chat[:2], add_generation_prompt=True, tokenize=True)
            full_ids = tok.apply_chat_template(chat, tokenize=True)
            if hasattr(prompt_ids, "input_ids"):
                prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
            ids = torch.tensor([list(full_ids)])
            hidden = model.model(input_ids=ids, output_hidden_states=True).hidden_states[first]
            predict_at = torch.arange(len(prompt_ids) - 1, len(full_ids) - 1)
            examples.append(CachedExample(hidden, predict_at, ids[0, predict_at + 1]))
    return examples


def answer_loss(model: Any, first: int, ex: CachedExample) -> Any:
    """Cross-entropy of the answer's tokens, running blocks `first`.. on the cached hidden state.

    Args:
        model: the HF causal LM.
        first: the first block that trains (the one `prepare_examples` stopped at).
        ex: the example.
    """
    import torch

    positions = torch.arange(ex.hidden.shape[1]).unsqueeze(0)
    rope = model.model.rotary_emb(ex.hidden, position_ids=positions)
    x = ex.hidden
    for layer in model.model.layers[first:]:
        x = layer(x, attention_mask=None, position_embeddings=rope, position_ids=positions)  # None: causal
    logits = model.lm_head(model.model.norm(x)[0, ex.predict_at])
    return torch.nn.functional.cross_entropy(logits, ex.targets)


def train_demo_run(
    hf_dir: Path,
    out_base: Path,
    *,
    steps: int = 40,
    save_every: int = 10,
    rank: int = 8,
    scale: float = 2.0,
    num_layers: int = 8,
    lr: float = 2e-3,
    batch_size: int = 4,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Fine-tune and write checkpoints; returns the checkpoint files in order.

    Args:
        hf_dir: SmolLM2's HF directory (`make models`).
        out_base: the source's base directory; the run goes to `<out_base>/adapters-smollm2-demo`.
        steps: optimiser steps.
        save_every: write a checkpoint every this many steps.
        rank: LoRA rank.
        scale: LoRA scale (mlx-lm's `scale`, i.e. alpha / rank).
        num_layers: LoRA on the last this many transformer blocks.
        lr: Adam learning rate.
        batch_size: examples per step.
        seed: RNG seed (the run is repeatable).
        log: where progress lines go.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the demo's terminal shows evalcluster's progress, not a loader's

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.requires_grad_(False)
    layers = model.model.layers
    first = len(layers) - num_layers
    keys = ("self_attn.q_proj", "self_attn.v_proj")
    params: dict[str, torch.nn.Parameter] = {}

    class LoRALinear(torch.nn.Module):
        """y = x W^T + scale * (x a) b, mlx-lm's LoRALinear (a: in x r, b: r x out, b starts at 0)."""

        def __init__(self, base: torch.nn.Linear) -> None:
            super().__init__()
            self.base = base
            bound = 1 / math.sqrt(base.in_features)
            self.lora_a = torch.nn.Parameter(torch.empty(base.in_features, rank).uniform_(-bound, bound))
            self.lora_b = torch.nn.Parameter(torch.zeros(rank, base.out_features))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + scale * ((x @ self.lora_a) @ self.lora_b)

    for i in range(first, len(layers)):
        for key in keys:
            holder, name = getattr(layers[i], key.split(".")[0]), key.split(".")[1]
            lora = LoRALinear(getattr(holder, name))
            setattr(holder, name, lora)
            params[f"model.layers.{i}.{key}.lora_a"], params[f"model.layers.{i}.{key}.lora_b"] = lora.lora_a, lora.lora_b

    examples = prepare_examples(model, tok, first)
    opt = torch.optim.Adam(params.values(), lr=lr)
    run = out_base / RUN_DIR_NAME
    run.mkdir(parents=True, exist_ok=True)
    (run / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": num_layers, "model": str(hf_dir),
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": list(keys)},
    }, indent=2))
    written: list[Path] = []
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randperm(len(examples), generator=gen)[:batch_size].tolist()
        loss = torch.stack([answer_loss(model, first, examples[i]) for i in idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % save_every == 0 or step == steps:
            tensors = {k: v.detach().contiguous().clone() for k, v in params.items()}
            path = run / f"{step:07d}_adapters.safetensors"
            tmp = path.with_suffix(".part")
            save_file(tensors, str(tmp))
            os.replace(tmp, path)  # a checkpoint appears complete, as a trainer's rename would
            save_file(tensors, str(run / "adapters.safetensors"))  # the rolling file: not a checkpoint
            written.append(path)
            log(f"step {step:3d}  loss {loss.item():.3f}  checkpoint {path.name}  ({time.perf_counter() - t0:.0f}s)")
    return written

