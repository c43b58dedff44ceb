"""The demo: its LoRA trainer (a cached-prefix loss equal to the full model's) and `evalcluster demo`
end to end on a small run (train → watch --once → curve → report)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _servers import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_cached_prefix_loss_equals_the_full_models(smollm2_hf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster._demo_training import answer_loss, prepare_examples, training_examples

    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
    first = len(model.model.layers) - 8
    examples = prepare_examples(model, tok, first)
    chats = training_examples()
    assert len(examples) == len(chats) == 23
    with torch.no_grad():
        for i in (0, 7, 22):
            prompt = tok.apply_chat_template(chats[i][:2], add_generation_prompt=True, tokenize=True)
            full = tok.apply_chat_template(chats[i], tokenize=True)
            if hasattr(prompt, "input_ids"):
                prompt, full = prompt["input_ids"], full["input_ids"]
            labels = torch.tensor([[-100] * len(prompt) + list(full[len(prompt):])])
            want = model(input_ids=torch.tensor([list(full)]), labels=labels).loss.item()
            got = answer_loss(model, first, examples[i]).item()
            assert got == pytest.approx(want, rel=1e-4), (i, got, want)


@pytest.mark.ray
@pytest.mark.engines
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_trains_evaluates_and_reports(smollm2_gguf, smollm2_hf, tmp_path):
    from cluster.config import load_config

    data = load_config(ROOT / "ray_config.yaml").absolute_dump()
    data["cluster"].update(dashboard=False, serve={"host": "127.0.0.1", "port": free_port()})
    data["sources"][0]["path"] = str(tmp_path / "demo-run")
    data["probes"].update(max_tokens=24, limit=8)  # the demo's path, not its 23 probes
    data["staging"] = {"cache_dir": str(tmp_path / "cache")}
    data["sinks"].update(ledger=str(tmp_path / "ledger.sqlite"), spool_dir=str(tmp_path / "spool"))
    data["sinks"]["influx"]["url"] = None
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    report = tmp_path / "report.html"
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "demo", "--config", str(cfg), "--steps", "4",
                        "--save-every", "2", "--report", str(report)],
                       capture_output=True, text=True, cwd=ROOT, timeout=1700)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    # Ray's own lines stay in the log file, its C++ ones too (Serve's shutdown used to print one).
    assert "(raylet)" not in out and "graceful_shutdown" not in out and ".cc:" not in out, out[-4000:]
    ckpts = sorted(p.name for p in (tmp_path / "demo-run" / "adapters-smollm2-demo").glob("0*_adapters.safetensors"))
    assert ckpts == ["0000002_adapters.safetensors", "0000004_adapters.safetensors"], ckpts
    for label in ("base", "S135-demo @0000002", "S135-demo @0000004"):
        assert label in r.stdout, (label, r.stdout[-3000:])
    # The learning curve's verdict, honest about what few probes can show: a best checkpoint only
    # when it is significantly better than the base, else the smallest difference they could detect.
    verdict = " ".join(r.stdout.split())
    assert "McNemar p =" in verdict and ("Best checkpoint: S135-demo @" in verdict
                                         or "No checkpoint is distinguishable from the base yet" in verdict), verdict[-2000:]
    html = report.read_text()
    assert "adapters-smollm2-demo" in html and "<svg" in html
    # The loglikelihood curve beside the generative one: the shipped config asks the built-in
    # multiple-choice set too, charted and tabled as "multiple-choice accuracy".
    assert "multiple-choice accuracy" in html and html.count("<svg") >= 2, html[:2000]
    assert " MC" in r.stdout or "multiple-choice accuracy" in r.stdout, r.stdout[-3000:]
    from checkpoints import Ledger

    led = Ledger(tmp_path / "ledger.sqlite", readonly=True)
    try:
        states = sorted(e.state for e in led.list())
    finally:
        led.close()
    assert states == ["scored", "scored"], states
    # A second run finds the checkpoints there and does not train again; nothing is evaluated twice.
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "demo", "--config", str(cfg), "--report", str(report)],
                       capture_output=True, text=True, cwd=ROOT, timeout=1700)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "2 checkpoints already there" in " ".join(r.stdout.split()), r.stdout[-3000:]  # lines wrap at 80
