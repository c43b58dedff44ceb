"""`evalcluster checkpoints list|retry` and `evalcluster convert`, run through cluster.cli.main."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from _ckpt_fixtures import GO_ML_META, mlx_tree, write_mlx_adapter
from checkpoints import QUARANTINED, Ledger, LocalSource, MetaRule, Poller, discover_once, layout_spec
from cluster.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_config(tmp_path: Path, tree: Path, ssh=None, ssh_base: Path | None = None) -> Path:
    sources = [{"name": "lab", "kind": "local", "path": str(tree), "layout": "mlx", "model": "smollm2",
                "adapter_meta": [{"prefix": p, "tag": t, "short": s} for p, t, s in GO_ML_META]}]
    if ssh is not None:
        sources.append({"name": "m3", "kind": "ssh", "host": ssh.host, "port": ssh.port, "user": ssh.user,
                        "key": str(ssh.key), "known_hosts": str(ssh.known_hosts), "base": str(ssh_base),
                        "layout": "mlx", "model": "smollm2"})
    cfg = {
        "models": [{"name": "smollm2", "engine": "llamacpp", "path": "/work/main/models/SmolLM2-135M-Instruct.Q4_1.gguf"},
                   {"name": "smollm2-hf", "engine": "mlx",
                    "path": str(Path(__file__).resolve().parent.parent / "models/SmolLM2-135M-Instruct")}],
        "sources": sources,
        "sinks": {"ledger": "state/ledger.sqlite"},
        "max_attempts": 2,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_list_a_path_as_json(tmp_path, capsys):
    tree = tmp_path / "lem"
    expected = mlx_tree(tree)
    code, out, err = run_cli(capsys, "checkpoints", "list", "--path", str(tree), "--layout", "mlx", "--json")
    assert code == 0, err
    rows = json.loads(out)
    got = {r["path"][len(str(tree)) + 1:]: r for r in rows}
    assert set(got) == set(expected)
    r = got["adapters-15k/gemma-3-27b/0001000_adapters.safetensors"]
    assert (r["run"], r["iteration"], r["state"], r["sha256"], r["size"]) == ("adapters-15k/gemma-3-27b", 1000, None, None, 10)
    # without a config there is no AdapterMeta table: go-ml's fallback (first 10 characters)
    assert r["label"] == "15k/gemma- @0001000"


def test_list_with_ledger_states_and_retry(tmp_path, capsys):
    tree = tmp_path / "lem"
    mlx_tree(tree)
    cfg = write_config(tmp_path, tree)
    ledger = Ledger(tmp_path / "state/ledger.sqlite")
    poller = Poller(LocalSource(tree, name="lab"), layout_spec("mlx", meta=[MetaRule(*r) for r in GO_ML_META]))
    asyncio.run(discover_once([poller], ledger))
    new = asyncio.run(discover_once([poller], ledger)).new
    bad = next(c for c in new if c.iteration == 200)
    ledger.record_failure(bad.id, "adapter x: not a safetensors file", permanent=True)

    code, out, err = run_cli(capsys, "checkpoints", "list", "--config", str(cfg), "--json")
    assert code == 0, err
    rows = {r["label"]: r for r in json.loads(out)}
    assert rows["G27-sovereign @0000200"]["state"] == QUARANTINED
    assert rows["G27-sovereign @0000200"]["last_error"] == "adapter x: not a safetensors file"
    assert rows["G27 @0001000"]["state"] == "discovered" and len(rows["G27 @0001000"]["sha256"]) == 64
    assert rows["G27-sovereign @0000200"]["id"] == bad.id

    code, out, err = run_cli(capsys, "checkpoints", "list", "--config", str(cfg))  # the table
    assert code == 0 and "G27-sovereign @0000200" in out and "quarantined" in out

    code, out, err = run_cli(capsys, "checkpoints", "retry", bad.id[:12], "--config", str(cfg))
    assert code == 0, err
    assert f"{bad.id} (G27-sovereign @0000200, adapters-27b-sovereign): quarantined -> discovered" in out
    assert ledger.get(bad.id).state == "discovered" and ledger.get(bad.id).attempts == 0

    code, out, err = run_cli(capsys, "checkpoints", "retry", "ck-nope", "--config", str(cfg))
    assert code == 1 and err.startswith("evalcluster: error: no checkpoint with id 'ck-nope'") and len(err.splitlines()) == 1
    code, out, err = run_cli(capsys, "checkpoints", "list", "--config", str(cfg), "--source", "nope")
    assert code == 1 and "no source named 'nope'" in err


@pytest.mark.ssh
def test_list_an_ssh_source_with_hashes(asyncssh_server, tmp_path, capsys):
    tree = tmp_path / "remote"
    expected = mlx_tree(tree)
    cfg = write_config(tmp_path, tmp_path, ssh=asyncssh_server, ssh_base=tree)
    code, out, err = run_cli(capsys, "checkpoints", "list", "--config", str(cfg), "--source", "m3", "--hash", "--json")
    assert code == 0, err
    rows = {r["path"][len(str(tree)) + 1:]: r for r in json.loads(out)}
    assert set(rows) == set(expected)
    import hashlib

    for rel, r in rows.items():
        assert r["sha256"] == hashlib.sha256((tree / rel).read_bytes()).hexdigest() and r["id"].startswith("ck-")


def test_convert_command(tmp_path, capsys, smollm2_hf):
    src = write_mlx_adapter(tmp_path / "adapters-x", layers=[28, 29], rank=4, filename="0000100_adapters.safetensors")
    code, out, err = run_cli(capsys, "convert", "--to", "peft", "--base", str(smollm2_hf), str(src), str(tmp_path / "peft"))
    assert code == 0, err
    assert "4 LoRA pairs, rank 4, scale 20, layers 28-29" in out
    assert (tmp_path / "peft/adapter_model.safetensors").exists()

    cfg = write_config(tmp_path, tmp_path)
    code, out, err = run_cli(capsys, "convert", "--config", str(cfg), "--to", "mlx", "--base", "smollm2-hf",
                             str(tmp_path / "peft"), str(tmp_path / "mlx"))
    assert code == 0, err
    assert json.loads((tmp_path / "mlx/adapter_config.json").read_text())["num_layers"] == 2

    code, out, err = run_cli(capsys, "convert", "--to", "gguf", str(src), str(tmp_path / "x.gguf"))
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith(f"evalcluster: error: adapter {src}: GGUF conversion needs the base model (--base)")
    code, out, err = run_cli(capsys, "convert", "--config", str(cfg), "--to", "gguf", "--base", "nomodel",
                             str(src), str(tmp_path / "x.gguf"))
    assert code == 1 and "no model named 'nomodel'" in err
    assert not (tmp_path / "x.gguf").exists()
