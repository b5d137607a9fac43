"""The DA-layer variants of issue 20 (ModelConfig.output_gate, qkv_conv, output_norm, half_life_min/max):
with each on, the backends agree, the model stays causal, streaming equals the full context (PDE on),
a (B, L) batch with per-row documents equals its rows alone, CP = 2 equals one rank (gloo), TP = 2
equals the dense model; off, nothing changes (the other test files run with them off)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fluidlm.model import FluidLM, ModelConfig
from fluidlm.model.attention import (DifferentialAttentionLayer, StreamCache, causal_depthwise_conv,
                                     depthwise_causal_conv, initial_rho)
from fluidlm.model.layers import DenseLayers
from forked_world import run_forked
from test_model import future_leaks, stream_logits, tiny

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "gate-sigmoid": dict(output_gate="sigmoid"),
    "gate-silu": dict(output_gate="silu"),
    "conv4": dict(qkv_conv=4),
    "conv2": dict(qkv_conv=2),
    "rmsnorm": dict(output_norm="rmsnorm"),
    "half-life": dict(half_life_min=2.0, half_life_max=64.0),
    "all": dict(output_gate="silu", qkv_conv=4, output_norm="rmsnorm", half_life_max=128.0),
}
PDE = {"theta_init": 0.0, "steps": 2, "scales": [1, 3, 5]}


def variant_model(name: str, **over) -> FluidLM:
    """A tiny model with the variant on and its new parameters away from their identity init
    (conv taps and norm weights random), so every tap and channel matters."""
    torch.manual_seed(0)
    model = FluidLM(tiny(**{**VARIANTS[name], "pde": PDE, **over}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("qkv_conv_weight") or n.endswith("out_norm.weight"):
                p.normal_(mean=0.5 if n.endswith("norm.weight") else 0.0, std=0.5)
    return model


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_is_causal(name):
    assert not future_leaks(variant_model(name))


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("direction", ["causal", "bidirectional"])
def test_variant_backends_agree(name, direction):
    """The model with da_backend naive / recurrent (causal) / chunked gives the same logits, with documents."""
    tokens = torch.randint(0, 97, (1, 37), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 11, 12, 37])
    backends = ["naive", "chunked"] + (["recurrent"] if direction == "causal" else [])
    outs = {}
    for backend in backends:
        model = variant_model(name, direction=direction, da_backend=backend).eval()
        with torch.no_grad():
            outs[backend] = model(tokens, cu)
    for backend in backends[1:]:
        torch.testing.assert_close(outs[backend], outs["naive"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("windows", [[(0, 1), (1, 2), (2, 50)], [(0, 2), (2, 9), (9, 31), (31, 50)]])
def test_variant_streaming_equals_full_context(name, windows):
    model = variant_model(name).eval()
    tokens = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        streamed, state = stream_logits(model, tokens, windows)
    torch.testing.assert_close(streamed, full, rtol=1e-5, atol=1e-5)
    if VARIANTS[name].get("qkv_conv"):
        assert state["blocks"][0].qkv_rows.shape == (2, VARIANTS[name]["qkv_conv"] - 1, 3 * 2 * 16)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("direction", ["causal", "bidirectional"])
def test_variant_batched_rows_with_documents_equal_separate_rows(name, direction):
    model = variant_model(name, direction=direction).eval()
    rows = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(3))
    row_docs = [[0, 24], [0, 5, 24], [0, 10, 17, 24]]
    cu = torch.tensor(sorted({r * 24 + c for r, docs in enumerate(row_docs) for c in docs}))
    with torch.no_grad():
        batched = model(rows, cu)
        for r, docs in enumerate(row_docs):
            torch.testing.assert_close(batched[r:r + 1], model(rows[r:r + 1], torch.tensor(docs)), rtol=1e-5,
                                       atol=1e-5)
        assert (model(rows, None)[2, 17:] - batched[2, 17:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_trains_every_parameter_and_changes_the_model(name):
    model = variant_model(name)
    tokens = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(4))
    model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    base = variant_model("gate-sigmoid", output_gate="none").eval()  # the same seed, every variant off
    with torch.no_grad():
        assert (model.eval()(tokens) - base(tokens)).abs().max() > 1e-4


def test_variants_off_add_no_parameters_and_on_add_the_documented_ones():
    names = {n for n, _ in FluidLM(tiny()).named_parameters()}
    new = {n for n, _ in FluidLM(tiny(**VARIANTS["all"])).named_parameters()} - names
    assert {n.split(".", 3)[-1] for n in new} == {"qkv_conv_weight", "out_norm.weight", "gate.weight"}
    layer = FluidLM(tiny(**VARIANTS["all"])).blocks[0].attn
    assert layer.qkv_conv_weight.shape == (3 * 2 * 16, 4) and layer.out_norm.weight.shape == (2, 16)
    assert torch.equal(layer.qkv_conv_weight[:, 0], torch.ones(96)) and not layer.qkv_conv_weight[:, 1:].any()


def test_identity_init_conv_starts_as_the_baseline():
    torch.manual_seed(0)
    base = FluidLM(tiny())
    torch.manual_seed(0)
    conv = FluidLM(tiny(qkv_conv=4))
    tokens = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(conv(tokens), base(tokens), rtol=0, atol=0)


def test_half_life_range_sets_the_initial_rates():
    rate = torch.nn.functional.softplus(initial_rho(5, 256.0, 4.0)).double()
    torch.testing.assert_close(math.log(2) / rate, torch.logspace(math.log10(4), math.log10(256), 5,
                                                                   dtype=torch.float64), rtol=1e-4, atol=0)
    torch.testing.assert_close(initial_rho(6, 4096), initial_rho(6, 4096, 1.0), rtol=0, atol=0)
    layer = FluidLM(tiny(n_heads=4, half_life_min=2.0, half_life_max=32.0)).blocks[0].attn
    half = math.log(2) / torch.nn.functional.softplus(layer.rho.detach().double())
    assert half[0].item() == pytest.approx(2.0, rel=1e-4) and half[-1].item() == pytest.approx(32.0, rel=1e-3)
    default = FluidLM(tiny()).blocks[0].attn.rho
    torch.testing.assert_close(default, initial_rho(2, 256), rtol=0, atol=0)  # max_seq_len by default


def test_variant_config_is_validated():
    with pytest.raises(ValueError, match="qkv_conv=1"):
        tiny(qkv_conv=1)
    with pytest.raises(ValueError, match="half_life_min=500"):
        tiny(half_life_min=500.0)  # longer than max_seq_len=256
    with pytest.raises(ValueError, match="half_life_min"):
        tiny(half_life_min=8.0, half_life_max=4.0)
    with pytest.raises(ValueError, match="output_gate='silu'.*softmax baseline"):
        tiny(attention="softmax", output_gate="silu")
    with pytest.raises(ValueError, match="output_gate"):
        tiny(output_gate="tanh")
    with pytest.raises(ValueError, match="output_norm"):
        tiny(output_norm="layernorm")
    with pytest.raises(ValueError, match="qkv_conv"):
        tiny(qkv_conv=-1)
    assert ModelConfig().longest_half_life == ModelConfig().max_seq_len
    for field in ("output_gate", "qkv_conv", "output_norm", "half_life_min", "half_life_max"):
        assert ModelConfig.model_fields[field].description


def test_conv_helper_drops_taps_before_a_document_start_and_streams():
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(1, 12, 3, generator=gen), torch.randn(3, 3, generator=gen)
    cu = torch.tensor([0, 5, 12])
    y = depthwise_causal_conv(x, w, cu)
    for s, e in ((0, 5), (5, 12)):  # each document alone
        torch.testing.assert_close(y[:, s:e], depthwise_causal_conv(x[:, s:e], w, None))
    t = 8
    torch.testing.assert_close(y[0, t], x[0, t] * w[:, 0] + x[0, t - 1] * w[:, 1] + x[0, t - 2] * w[:, 2])
    cache, outs = StreamCache(), []
    for s, e in ((0, 1), (1, 2), (2, 7), (7, 12)):
        outs.append(causal_depthwise_conv(x[:, s:e], w, cache=cache, slot="qkv_rows"))
    torch.testing.assert_close(torch.cat(outs, 1), depthwise_causal_conv(x, w, None))
    assert cache.qkv_rows.shape == (1, 2, 3) and cache.flow_inputs is None


# --- CP = 2 equals one rank (gloo, forked), following tests/test_context_parallel.py ----------------

CP_VARIANTS = ["conv4", "all"]
CP_CASES = [(name, causal) for name in CP_VARIANTS for causal in (True, False)]


def _cp_cases(rank, world):
    from fluidlm.parallel.context import cp_attention_layer
    from test_context_parallel import DOCS, N, _whole_vs_shards

    results = {}
    for name, causal in CP_CASES:
        torch.manual_seed(3)
        cfg = ModelConfig(vocab_size=17, d_model=16, n_layers=1, n_heads=2, head_dim=4, max_seq_len=64,
                          chunk_size=8, direction="causal" if causal else "bidirectional", **VARIANTS[name])
        layer = DifferentialAttentionLayer(cfg, DenseLayers(), out_init_std=0.1).double()
        with torch.no_grad():
            layer.flow.conv_weight.normal_()
            layer.qkv_conv_weight.normal_()  # every tap live, so the 3-token halo matters
            if layer.out_norm is not None:
                layer.out_norm.weight.normal_()
        out, grad_x, grad_params = _whole_vs_shards(
            layer, cp_attention_layer, torch.randn(1, N, 16, dtype=torch.float64), torch.tensor(DOCS["cross"]),
            dist.group.WORLD, rank, world)
        results[f"{name}-{causal}"] = max(out, grad_x, grad_params)
    return results


@pytest.fixture(scope="module")
def cp_results():
    return run_forked(_cp_cases, 2)


@pytest.mark.parametrize("case", CP_CASES, ids=lambda c: f"{c[0]}-{'causal' if c[1] else 'bidirectional'}")
def test_variant_cp2_layer_equals_one_rank(cp_results, case):
    err = max(cp_results[r][f"{case[0]}-{case[1]}"] for r in cp_results)
    assert err <= 1e-10, err


# --- TP = 2 equals the dense model (megatron-core layers, gloo), tests/tp_model_check.py -------------

def test_variant_tp2_model_equals_dense_model(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "tp_model_check.py"), "causal", json.dumps(VARIANTS["all"])]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK causal" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "qkv_conv_weight" in proc.stdout and "gate.weight" in proc.stdout and "out_norm.weight" in proc.stdout
