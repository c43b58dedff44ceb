"""Adapter formats without torch: safetensors checks, MLX <-> PEFT, GGUF, validation against the
real SmolLM2 base (HF directory and GGUF)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import load_file, save_file

from _ckpt_fixtures import SMOL_SHAPES, lora_tensors, write_mlx_adapter, write_peft_adapter
from checkpoints import (
    AdapterError,
    StagingConfig,
    base_shapes,
    convert,
    is_native_adapter,
    load_adapter,
    native_adapter_dir,
    permute_rows,
    prepare_adapter,
    read_header,
    read_mlx,
    read_peft,
    read_tensors,
    validate,
)

ALL = list(SMOL_SHAPES)


def tensors_equal_bitwise(a: str, b: str) -> None:
    ta, _ = read_tensors(a)
    tb, _ = read_tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert ta[k].array.tobytes() == tb[k].array.tobytes(), f"{k} differs"


# --------------------------------------------------------------------------- safetensors


def test_reads_what_the_safetensors_library_writes(tmp_path):
    arrs = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((2,), np.float16),
            "c": np.array([1, 2, 3], np.int64), "empty": np.zeros((0, 4), np.float32)}
    save_file(arrs, str(tmp_path / "x.safetensors"), metadata={"format": "np"})
    got, meta = read_tensors(tmp_path / "x.safetensors")
    assert meta == {"format": "np"}
    for k, v in arrs.items():
        assert got[k].array.dtype == v.dtype and np.array_equal(got[k].array, v)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:5], "shorter than the 8-byte header length"),
        (lambda b: struct.pack("<Q", 10**9) + b[8:], "header length 1000000000 does not fit"),
        (lambda b: b[:8] + b"!" + b[9:], "header is not JSON"),
        (lambda b: b[:-7], "outside the"),
        (lambda b: b + b"\0" * 16, "data section is"),
        (lambda b: b.replace(b'"F32"', b'"F33"', 1), "unknown dtype 'F33'"),
        (lambda b: b.replace(b"[3,4]", b"[4,4]", 1), "needs 64"),
    ],
)
def test_corrupt_safetensors_are_refused_naming_the_file(tmp_path, damage, message):
    f = tmp_path / "ok.safetensors"
    save_file({"a": np.zeros((3, 4), np.float32), "b": np.zeros((2,), np.float32)}, str(f))
    raw = f.read_bytes()
    assert b"[3,4]" in raw
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(raw))
    with pytest.raises(AdapterError) as e:
        read_header(bad)
    assert message in str(e.value) and str(bad) in str(e.value)


def test_overlapping_offsets_are_refused(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    f = tmp_path / "overlap.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    with pytest.raises(AdapterError, match="overlaps another tensor"):
        read_header(f)


# --------------------------------------------------------------------------- MLX <-> PEFT


def test_mlx_to_peft_to_mlx_is_bit_for_bit(tmp_path, smollm2_hf):
    src = write_mlx_adapter(tmp_path / "run", layers=[0, 5, 29], modules=ALL, rank=8, scale=12.5,
                            filename="0000100_adapters.safetensors")
    peft = convert(src, tmp_path / "peft", "peft", base=smollm2_hf)
    back = convert(peft, tmp_path / "mlx", "mlx", base=smollm2_hf)
    tensors_equal_bitwise(str(src), str(back / "adapters.safetensors"))
    # The PEFT side is what PEFT and vLLM expect, read with the safetensors library itself.
    cfg = json.loads((peft / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 8, 100)
    assert cfg["target_modules"] == sorted(m.split(".")[-1] for m in ALL)
    assert cfg["layers_to_transform"] == [0, 5, 29]
    w = load_file(str(peft / "adapter_model.safetensors"))
    assert w["base_model.model.model.layers.5.mlp.down_proj.lora_A.weight"].shape == (8, 1536)
    assert w["base_model.model.model.layers.5.mlp.down_proj.lora_B.weight"].shape == (576, 8)
    mlx_w = load_file(str(src))
    np.testing.assert_array_equal(w["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"],
                                  mlx_w["model.layers.0.self_attn.k_proj.lora_a"].T)
    mcfg = json.loads((back / "adapter_config.json").read_text())
    assert mcfg == {"fine_tune_type": "lora", "num_layers": 30,
                    "lora_parameters": {"rank": 8, "scale": 12.5, "dropout": 0.0, "keys": sorted(ALL)}}


def test_bf16_mlx_adapter_written_by_mlx_round_trips(tmp_path, smollm2_hf):
    import mlx.core as mx

    d = tmp_path / "bf16"
    d.mkdir()
    ts = {}
    for (layer, m), (a, b) in lora_tensors([2, 3], ["self_attn.q_proj"], 4).items():
        ts[f"model.layers.{layer}.{m}.lora_a"] = mx.array(a.T).astype(mx.bfloat16)
        ts[f"model.layers.{layer}.{m}.lora_b"] = mx.array(b.T).astype(mx.bfloat16)
    mx.save_safetensors(str(d / "adapters.safetensors"), ts)
    (d / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 28, "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0}}))
    peft = convert(d, tmp_path / "peft", "peft", base=smollm2_hf)
    back = convert(peft, tmp_path / "back", "mlx", base=smollm2_hf)
    tensors_equal_bitwise(str(d / "adapters.safetensors"), str(back / "adapters.safetensors"))
    assert read_tensors(peft / "adapter_model.safetensors")[0][
        "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"].dtype == "BF16"


def test_go_ml_trainer_adapter_gets_its_own_rank_and_alpha(tmp_path, smollm2_hf):
    # go-ml's trainer: top-level rank/alpha/lora_layers and go-mlx orientation (a (r, in), b (out, r)).
    src = write_mlx_adapter(tmp_path / "adapters-1b-x", layers=[28, 29], modules=["self_attn.q_proj", "mlp.up_proj"],
                            rank=16, scale=2.0, style="go-ml", filename="0000400_adapters.safetensors")
    cfg = json.loads((src.parent / "adapter_config.json").read_text())
    assert "lora_parameters" not in cfg and cfg["rank"] == 16 and cfg["alpha"] == 32
    ad = read_mlx(src)
    assert (ad.rank, ad.scale) == (16, 2.0)  # go-ml's converter would have said 8 / 20
    peft = convert(src, tmp_path / "peft", "peft", base=smollm2_hf)
    pcfg = json.loads((peft / "adapter_config.json").read_text())
    assert (pcfg["r"], pcfg["lora_alpha"]) == (16, 32)
    orig = load_file(str(src))
    got = load_file(str(peft / "adapter_model.safetensors"))
    np.testing.assert_array_equal(got["base_model.model.model.layers.28.mlp.up_proj.lora_A.weight"],
                                  orig["model.layers.28.mlp.up_proj.lora_a"])  # already (r, in)
    mlx = convert(peft, tmp_path / "mlx", "mlx", base=smollm2_hf)
    m = json.loads((mlx / "adapter_config.json").read_text())
    assert m["num_layers"] == 2 and m["lora_parameters"]["rank"] == 16 and m["lora_parameters"]["scale"] == 2.0
    assert load_file(str(mlx / "adapters.safetensors"))["model.layers.28.mlp.up_proj.lora_a"].shape == (576, 16)


def test_peft_input_with_default_infix_and_rslora(tmp_path):
    d = tmp_path / "p"
    write_peft_adapter(d, layers=[1], rank=4, alpha=8)
    w = load_file(str(d / "adapter_model.safetensors"))
    save_file({k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
               for k, v in w.items()}, str(d / "adapter_model.safetensors"))
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["use_rslora"] = True
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    ad = read_peft(d)
    assert ad.scale == 8 / 2.0 and sorted(ad.pairs) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(fine_tune_type="dora"), "fine_tune_type 'dora' is not supported"),
        (lambda c: c.pop("lora_parameters"), "no LoRA scale"),
        (lambda c: c["lora_parameters"].update(rank=16), "says rank 16 but the tensors have rank 8"),
        (lambda c: c["lora_parameters"].update(scale=-1), "scale must be a positive number"),
    ],
)
def test_bad_mlx_configs_are_refused(tmp_path, edit, message):
    f = write_mlx_adapter(tmp_path / "a", layers=[0], rank=8)
    cfg = json.loads((tmp_path / "a/adapter_config.json").read_text())
    edit(cfg)
    (tmp_path / "a/adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=message):
        read_mlx(f)


def test_unpaired_and_foreign_tensors_are_refused(tmp_path):
    f = write_mlx_adapter(tmp_path / "a", layers=[0], rank=8)
    w = load_file(str(f))
    save_file({k: v for k, v in w.items() if not k.endswith("q_proj.lora_b")}, str(f))
    with pytest.raises(AdapterError, match="q_proj: has lora_a but no lora_b"):
        read_mlx(f)
    save_file({**w, "model.layers.0.self_attn.q_proj.m": np.ones(576, np.float32)}, str(f))
    with pytest.raises(AdapterError, match="DoRA and full fine-tunes are not supported"):
        read_mlx(f)


# --------------------------------------------------------------------------- the base model


def test_base_shapes_agree_between_hf_and_gguf(smollm2_hf, smollm2_gguf):
    hf, gg = base_shapes(smollm2_hf), base_shapes(smollm2_gguf)
    assert (hf.arch, hf.n_layers, hf.n_head, hf.n_head_kv) == ("llama", 30, 9, 3)
    assert (gg.arch, gg.n_layers, gg.n_head, gg.n_head_kv) == ("llama", 30, 9, 3)
    assert hf.linear == gg.linear and len(hf.linear) == 30 * 7
    assert hf.linear[(7, "self_attn.k_proj")] == (192, 576) and hf.linear[(7, "mlp.down_proj")] == (576, 1536)


@pytest.mark.parametrize("which", ["hf", "gguf"])
def test_misfit_adapters_are_refused(tmp_path, smollm2_hf, smollm2_gguf, which):
    base = smollm2_hf if which == "hf" else smollm2_gguf
    ok = load_adapter(write_mlx_adapter(tmp_path / "ok", layers=[0, 29], modules=ALL))
    validate(ok, base_shapes(base))

    wrong_layer = load_adapter(write_mlx_adapter(tmp_path / "deep", layers=[30]))
    with pytest.raises(AdapterError, match="layer 30 but the base has 30 layers"):
        validate(wrong_layer, base_shapes(base))

    d = tmp_path / "wide"
    rng = np.random.default_rng(1)
    save_file({"model.layers.0.self_attn.q_proj.lora_a": rng.normal(size=(512, 8)).astype(np.float32),
               "model.layers.0.self_attn.q_proj.lora_b": rng.normal(size=(8, 512)).astype(np.float32)},
              str(d.mkdir() or d / "adapters.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"rank": 8, "scale": 1.0}}))
    with pytest.raises(AdapterError) as e:
        convert(d, tmp_path / "out", "peft", base=base)
    assert "adapter is 512x512 (out x in), base is 576x576" in str(e.value) and str(d) in str(e.value)
    assert not (tmp_path / "out").exists(), "nothing is written for a misfit"


# --------------------------------------------------------------------------- GGUF


def test_llama_rope_permutation_matches_the_real_gguf(smollm2_hf, smollm2_gguf):
    """llama.cpp stores attn_q/attn_k rows permuted; our lora_b permutation must be that one."""
    r = GGUFReader(str(smollm2_gguf))
    tensors = {t.name: t for t in r.tensors}
    for gname, hname, heads in (("attn_q", "q_proj", 9), ("attn_k", "k_proj", 3)):
        t = tensors[f"blk.3.{gname}.weight"]
        g = dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))
        key = f"model.layers.3.self_attn.{hname}.weight"
        w = read_tensors(smollm2_hf / "model.safetensors", [key])[0][key].float32()
        assert np.corrcoef(g.ravel(), permute_rows(w, heads).ravel())[0, 1] > 0.99
        assert abs(np.corrcoef(g.ravel(), w.ravel())[0, 1]) < 0.2


def test_gguf_adapter_layout(tmp_path, smollm2_hf):
    src = write_mlx_adapter(tmp_path / "a", layers=[0, 1], modules=ALL, rank=4, scale=20.0)
    out = convert(src, tmp_path / "g", "gguf", base=smollm2_hf)
    assert out == tmp_path / "g" / "adapter.gguf"
    r = GGUFReader(str(out))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert fields == {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
                      "adapter.lora.alpha": 80.0}
    t = {x.name: x for x in r.tensors}
    assert len(t) == 2 * 2 * 7
    assert [int(d) for d in t["blk.1.attn_k.weight.lora_a"].shape] == [576, 4]   # ne: (in, r)
    assert [int(d) for d in t["blk.1.attn_k.weight.lora_b"].shape] == [4, 192]   # ne: (r, out)
    assert [int(d) for d in t["blk.0.ffn_down.weight.lora_a"].shape] == [1536, 4]
    mlx = load_file(str(src))
    b_q = mlx["model.layers.1.self_attn.q_proj.lora_b"].T
    got = np.asarray(t["blk.1.attn_q.weight.lora_b"].data).reshape(576, 4)
    np.testing.assert_array_equal(got, permute_rows(b_q, 9))
    np.testing.assert_array_equal(np.asarray(t["blk.1.attn_v.weight.lora_b"].data).reshape(192, 4),
                                  mlx["model.layers.1.self_attn.v_proj.lora_b"].T)
    with pytest.raises(AdapterError, match="needs the base model"):
        convert(src, tmp_path / "g2", "gguf")


# --------------------------------------------------------------------------- prepare_adapter, convert errors


def test_prepare_adapter_per_engine_and_cached(tmp_path, smollm2_hf, smollm2_gguf):
    staged = tmp_path / "staged"
    write_mlx_adapter(staged, layers=[3], rank=4)
    g = prepare_adapter(staged, "llamacpp", smollm2_gguf)
    assert g.name == "adapter.gguf" and g.is_file()
    m = prepare_adapter(staged, "mlx", smollm2_hf)
    assert (m / "adapters.safetensors").is_file() and json.loads((m / "adapter_config.json").read_text())["num_layers"] == 27
    p = prepare_adapter(staged, "vllm", smollm2_hf)
    assert json.loads((p / "adapter_config.json").read_text())["peft_type"] == "LORA"
    mtime = g.stat().st_mtime_ns
    assert prepare_adapter(staged, "llamacpp", smollm2_gguf) == g and g.stat().st_mtime_ns == mtime  # cached
    with pytest.raises(AdapterError, match="engine 'openai' does not load LoRA adapters"):
        prepare_adapter(staged, "openai", smollm2_hf)


def test_native_adapter_per_engine_and_its_cache_dir(tmp_path, smollm2_gguf):
    """One decision of "loads as it is" per engine, and one place converted adapters are kept."""
    mlx = write_mlx_adapter(tmp_path / "mlx", layers=[3], rank=4).parent
    peft = write_peft_adapter(tmp_path / "peft", layers=[3], rank=4).parent
    gguf = prepare_adapter(mlx, "llamacpp", smollm2_gguf, tmp_path / "gguf")
    native = {"llamacpp": gguf, "mlx": mlx, "vllm": peft}
    for engine, path in native.items():
        assert [e for e in native if is_native_adapter(path, e)] == [engine]
        assert not is_native_adapter(path, "openai")
    assert not is_native_adapter(mlx / "adapters.safetensors", "mlx")  # a file, not the directory
    (peft / "adapter_config.json").unlink()
    assert not is_native_adapter(peft, "vllm")  # weights without their config
    staging = StagingConfig(cache_dir=tmp_path / "cache")
    assert native_adapter_dir(staging.serve_cache_dir, "vllm", "ab12") == tmp_path / "cache" / "serve" / "native" / "vllm" / "ab12"


def test_convert_refuses_ambiguous_or_self_overwriting_input(tmp_path):
    run = tmp_path / "adapters-x"
    write_mlx_adapter(run, layers=[0], filename="0000100_adapters.safetensors")
    write_mlx_adapter(run, layers=[0], filename="0000200_adapters.safetensors")
    with pytest.raises(AdapterError, match="holds 2 checkpoints; name one file"):
        convert(run, tmp_path / "o", "peft")
    with pytest.raises(AdapterError, match="destination is the source directory"):
        convert(run / "0000100_adapters.safetensors", run, "mlx")
    with pytest.raises(AdapterError, match="no such file"):
        convert(tmp_path / "nope", tmp_path / "o", "peft")


def test_the_header_reader_reads_what_the_gguf_package_reads(smollm2_gguf, smollm2_hf, tmp_path):
    """`read_gguf_header` (steps over the tokenizer's arrays) against gguf's reader (reads them):
    every kept field, every tensor's shape, type, data offset and size the same, on the base model
    and on an adapter we wrote."""
    from checkpoints._ggufheader import KEEP_ARRAY, read_gguf_header

    adapter = convert(write_mlx_adapter(tmp_path / "a", layers=[0, 1], modules=ALL, rank=4, scale=20.0),
                      tmp_path / "g", "gguf", base=smollm2_hf)
    for path in (smollm2_gguf, adapter):
        ours, theirs = read_gguf_header(path), GGUFReader(str(path))
        assert [(t.name, t.shape, t.ggml_type, t.data_offset, t.n_bytes) for t in ours.tensors] == [
            (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
            for t in theirs.tensors]
        for key, f in theirs.fields.items():
            if key.startswith("GGUF."):  # the reader's own entries (version, counts)
                continue
            if key in ours.skipped_arrays:
                assert ours.skipped_arrays[key] == len(f.data) > KEEP_ARRAY
            else:
                assert ours.fields[key] == pytest.approx(f.contents()), key
    assert read_gguf_header(smollm2_gguf).skipped_arrays.keys() == {
        "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}


def test_a_damaged_gguf_header_is_named_for_what_is_wrong(smollm2_gguf, tmp_path):
    from checkpoints._ggufheader import GGUFHeaderError, read_gguf_header

    raw = smollm2_gguf.read_bytes()
    cases = {
        "magic": (b"GGUX" + raw[4:100], "not a GGUF file"),
        "version": (raw[:4] + (9).to_bytes(4, "little") + raw[8:100], "GGUF version 9 is not supported"),
        "metadata cut": (raw[:5000], "past the end of the file"),  # inside the tokenizer's arrays
        "data cut": (raw[:len(raw) // 2], "truncated: tensor"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(GGUFHeaderError, match=message):
            read_gguf_header(tmp_path / name)
