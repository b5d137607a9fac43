"""Context parallelism (fluidlm.parallel.context): CP=2 and CP=4 over gloo reproduce the single-process
Differential Attention, PDE diffusion and DA layer (outputs and gradients), with documents crossing
shard borders, starting exactly at one, and spanning a whole shard; the summaries exchanged do not grow
with N.

One pool of 4 forked processes runs every case once (CP=4 on the world group, CP=2 on the pairs
{0,1} and {2,3}); each test below checks its case's errors (max over ranks).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from fluidlm.kernels.chunked import chunked_differential_attention
from fluidlm.model.attention import DifferentialAttentionLayer
from fluidlm.model.config import ModelConfig
from fluidlm.model.pde import PDEDiffusion
from fluidlm.parallel import context as cp_mod
from fluidlm.parallel.context import (
    cp_attention_layer,
    cp_differential_attention,
    cp_pde_diffusion,
    shard_range,
    shard_sequence,
    window_cu_seqlens,
)
from fluidlm.model.layers import DenseLayers
from forked_world import run_forked

WORLD = 4
N = 64
DOCS = {
    "none": None,
    # CP=4 shards [0,16) [16,32) [32,48) [48,64): a start inside rank 0, one exactly at the border 16,
    # and 23..60 spans rank 2 whole (pass-through) and crosses 32 and 48; CP=2: 23..60 crosses 32.
    "cross": [0, 5, 16, 23, 60, 64],
    # A document starting exactly at 32 (a border for CP=2 and CP=4); 40..64 crosses 48 for CP=4.
    "border": [0, 32, 40, 64],
}
DA_CASES = [
    (cp, causal, docs, chunk, dtype)
    for cp in (2, 4)
    for causal in (True, False)
    for docs, chunk in (("none", 8), ("cross", 6), ("border", 8))
    for dtype in ("float64",)
] + [(4, False, "cross", 8, "float32"), (2, True, "cross", 8, "float32")]
PDE_CASES = [(cp, causal, docs) for cp in (2, 4) for causal in (True, False) for docs in ("none", "cross")]
LAYER_CASES = [(cp, causal) for cp in (2, 4) for causal in (True, False)]
TOL = {"float64": 1e-10, "float32": 2e-5}


def _case_id(kind, *args):
    return "-".join([kind, *map(str, args)])


def _err(a, b):
    return (a - b).abs().max().item()


def _da_case(group, rank, cp, causal, docs, chunk, dtype):
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(1)
    cu = None if DOCS[docs] is None else torch.tensor(DOCS[docs])
    b, h, d, dv = (2 if cu is None else 1), 2, 4, 3
    q, k = (torch.randn(b, h, N, d, generator=gen, dtype=dt) for _ in range(2))
    v = torch.randn(b, h, N, dv, generator=gen, dtype=dt)
    g = -0.25 * torch.rand(b, h, N, generator=gen, dtype=dt)  # ~-2 per 16 tokens: states do cross
    w = torch.randn(b, h, N, dv, generator=gen, dtype=dt)
    full = [t.clone().requires_grad_() for t in (q, k, v, g)]
    ref = chunked_differential_attention(*full, causal=causal, feature_map="sigmoid", eps=1e-6, cu_seqlens=cu,
                                         chunk_size=chunk)
    (ref * w).sum().backward()

    local = [shard_sequence(t, rank, cp, dim=2).clone().requires_grad_() for t in (q, k, v, g)]
    out = cp_differential_attention(*local, causal=causal, feature_map="sigmoid", eps=1e-6, cu_seqlens=cu,
                                    chunk_size=chunk, group=group)
    (out * shard_sequence(w, rank, cp, dim=2)).sum().backward()
    res = {"out": _err(out, shard_sequence(ref, rank, cp, dim=2))}
    for name, loc, ful in zip("qkvg", local, full):
        res["grad_" + name] = _err(loc.grad, shard_sequence(ful.grad, rank, cp, dim=2))
    # The test is not vacuous: without the cross-rank state the shard would be far off.
    s, e = shard_range(N, rank, cp)
    alone_cu = window_cu_seqlens(cu, s, e - s)
    alone = chunked_differential_attention(*(shard_sequence(t, rank, cp, dim=2) for t in (q, k, v, g)),
                                           causal=causal, feature_map="sigmoid", eps=1e-6, cu_seqlens=alone_cu,
                                           chunk_size=chunk)
    res["cross_rank_effect"] = _err(alone, shard_sequence(ref, rank, cp, dim=2).detach())
    return res


def _allreduce_grads(module, group):
    for p in module.parameters():
        dist.all_reduce(p.grad, group=group)  # each rank holds its shard's share of a parameter's grad


def _pde_case(group, rank, cp, causal, docs):
    torch.manual_seed(2)
    cu = None if DOCS[docs] is None else torch.tensor(DOCS[docs])
    b, c = (2 if cu is None else 1), 8
    # max(S)·K = 16 = the CP=4 shard: halos reach exactly one rank over.
    pde = PDEDiffusion(c, [1, 3, 8], steps=2, causal=causal, theta_init=0.0, layers=DenseLayers(), init_std=0.5).double()
    with torch.no_grad():
        pde.theta.normal_()
    out, grad_u, grad_params = _whole_vs_shards(pde, cp_pde_diffusion, torch.randn(b, N, c, dtype=torch.float64), cu,
                                                group, rank, cp)
    return {"out": out, "grad_u": grad_u, "grad_params": grad_params}


def _layer_case(group, rank, cp, causal):
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=17, d_model=16, n_layers=1, n_heads=2, head_dim=4, max_seq_len=64, chunk_size=8,
                      direction="causal" if causal else "bidirectional")
    layer = DifferentialAttentionLayer(cfg, DenseLayers(), out_init_std=0.1).double()
    with torch.no_grad():
        layer.flow.conv_weight.normal_()  # every conv tap live, so the 3-token halo matters
    cu = torch.tensor(DOCS["cross"])
    out, grad_x, grad_params = _whole_vs_shards(layer, cp_attention_layer, torch.randn(1, N, 16, dtype=torch.float64),
                                                cu, group, rank, cp)
    return {"out": out, "grad_x": grad_x, "grad_params": grad_params}


def _whole_vs_shards(module, cp_forward, x, cu, group, rank, cp):
    """Errors (output, input gradient, parameter gradients) of `cp_forward(module, shard, cu, group)`
    on this rank's shard against `module(x, cu)` on the whole sequence, under a random linear loss."""
    w = torch.randn_like(x)
    xf = x.clone().requires_grad_()
    ref = module(xf, cu)
    (ref * w).sum().backward()
    ref_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    xl = shard_sequence(x, rank, cp).clone().requires_grad_()
    out = cp_forward(module, xl, cu, group=group)
    (out * shard_sequence(w, rank, cp)).sum().backward()
    _allreduce_grads(module, group)
    return (_err(out, shard_sequence(ref, rank, cp)), _err(xl.grad, shard_sequence(xf.grad, rank, cp)),
            max(_err(p.grad, r) for p, r in zip(module.parameters(), ref_grads)))


def _comm_case(group, rank):
    """Bytes received per DA forward+backward (bidirectional, CP=4) and per PDE halo, for three N."""
    res = {}
    pde = PDEDiffusion(8, [1, 4], steps=2, causal=False, theta_init=0.0, layers=DenseLayers(), init_std=0.5)
    for n in (32, 64, 128):
        gen = torch.Generator().manual_seed(n)
        b, h, d, dv, n_loc = 1, 2, 4, 3, n // WORLD
        q, k = (torch.randn(b, h, n_loc, d, generator=gen).requires_grad_() for _ in range(2))
        v = torch.randn(b, h, n_loc, dv, generator=gen).requires_grad_()
        g = (-torch.rand(b, h, n_loc, generator=gen)).requires_grad_()
        cp_mod.comm_stats.reset()
        cp_differential_attention(q, k, v, g, causal=False, group=group).sum().backward()
        res[f"da_gathered_{n}"] = cp_mod.comm_stats.gathered_bytes
        res[f"da_reduced_{n}"] = cp_mod.comm_stats.reduced_bytes
        res[f"da_calls_{n}"] = cp_mod.comm_stats.calls
        cp_mod.comm_stats.reset()
        cp_pde_diffusion(pde, torch.randn(1, n_loc, 8, requires_grad=True), group=group).sum().backward()
        res[f"halo_{n}"] = cp_mod.comm_stats.halo_bytes
    return res


def _world_cases(rank, world):
    results = {}
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    groups = {4: dist.group.WORLD, 2: pairs[rank // 2]}
    local_rank = {4: rank, 2: rank % 2}
    jobs = [(_case_id("da", *c), _da_case, c) for c in DA_CASES]
    jobs += [(_case_id("pde", *c), _pde_case, c) for c in PDE_CASES]
    jobs += [(_case_id("layer", *c), _layer_case, c) for c in LAYER_CASES]
    for name, fn, case in jobs:
        cp = case[0]
        results[name] = fn(groups[cp], local_rank[cp], *case)
    results["comm"] = _comm_case(dist.group.WORLD, rank)
    return results


@pytest.fixture(scope="module")
def world_results():
    return run_forked(_world_cases, WORLD)


def _max_over_ranks(per_rank, name):
    keys = per_rank[0][name].keys()
    return {key: max(per_rank[r][name][key] for r in per_rank) for key in keys}


@pytest.mark.parametrize("case", DA_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cp_differential_attention_matches_single_process(world_results, case):
    cp, _causal, docs, _chunk, dtype = case
    res = _max_over_ranks(world_results, _case_id("da", *case))
    tol = TOL[dtype]
    for key in ("out", "grad_q", "grad_k", "grad_v", "grad_g"):
        assert res[key] <= tol, (key, res)
    if not (cp == 2 and docs == "border"):  # there the only border is a document start: no state crosses
        assert res["cross_rank_effect"] > 1e-3, res


@pytest.mark.parametrize("case", PDE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cp_pde_halo_matches_single_process(world_results, case):
    res = _max_over_ranks(world_results, _case_id("pde", *case))
    assert max(res.values()) <= 1e-12, res


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cp_attention_layer_with_flow_halo_matches_single_process(world_results, case):
    res = _max_over_ranks(world_results, _case_id("layer", *case))
    assert max(res.values()) <= 1e-10, res


def test_communication_does_not_grow_with_sequence_length(world_results):
    res = world_results[0]["comm"]
    b, h, d, dv = 1, 2, 4, 3
    summary = b * h * (1 + 2 * d * (dv + 1)) * 4  # fp32 (A, U, U') per rank
    for n in (32, 64, 128):
        assert res[f"da_calls_{n}"] == 1
        assert res[f"da_gathered_{n}"] == WORLD * summary
        assert res[f"da_reduced_{n}"] == WORLD * summary
        assert res[f"halo_{n}"] == res["halo_32"] > 0


def test_sharding_helpers():
    x = torch.arange(24).reshape(2, 12)
    assert shard_sequence(x, 2, 3).tolist() == [[8, 9, 10, 11], [20, 21, 22, 23]]
    with pytest.raises(ValueError, match="not divisible by the context-parallel size 5"):
        shard_sequence(x, 0, 5)
    assert window_cu_seqlens(torch.tensor([0, 5, 16, 23, 64]), 13, 19).tolist() == [0, 3, 10, 19]
    assert window_cu_seqlens(None, 3, 4) is None


TRITON_CP_SCRIPT = r"""
import os, sys, tempfile, multiprocessing as mp
import torch, torch.distributed as dist
from fluidlm.kernels.chunked import chunked_differential_attention
from fluidlm.parallel.context import cp_differential_attention, shard_sequence

def case(rank, cp, cu):
    gen = torch.Generator().manual_seed(4)
    b, h, n, d = (2 if cu is None else 1), 2, 64, 16
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    g = -0.2 * torch.rand(b, h, n, generator=gen)
    w = torch.randn(b, h, n, d, generator=gen)
    full = [t.clone().requires_grad_() for t in (q, k, v, g)]
    ref = chunked_differential_attention(*full, causal=True, feature_map="sigmoid", eps=1e-6, cu_seqlens=cu, chunk_size=16)
    (ref * w).sum().backward()
    local = [shard_sequence(t, rank, cp, dim=2).clone().requires_grad_() for t in (q, k, v, g)]
    out = cp_differential_attention(*local, causal=True, feature_map="sigmoid", eps=1e-6, cu_seqlens=cu, chunk_size=16,
                                    group=dist.group.WORLD, backend="triton")
    (out * shard_sequence(w, rank, cp, dim=2)).sum().backward()
    def rel(a, b):  # error relative to the reference's largest magnitude
        return ((a - b).abs().max() / b.abs().max()).item()
    errs = [rel(out, shard_sequence(ref, rank, cp, dim=2))]
    errs += [rel(l.grad, shard_sequence(f.grad, rank, cp, dim=2)) for l, f in zip(local, full)]
    return max(errs)

def worker(rank, init, queue):
    import warnings
    warnings.simplefilter("error", RuntimeWarning)  # a fallback to chunked would warn: make it fail
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2)
    from fluidlm.kernels import triton_v2
    assert triton_v2.INTERPRET
    queue.put((rank, [case(rank, 2, None), case(rank, 2, torch.tensor([0, 5, 23, 40, 64]))]))
    dist.destroy_process_group()

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    init = os.path.join(tempfile.mkdtemp(), "rdzv")
    procs = [ctx.Process(target=worker, args=(r, init, queue)) for r in range(2)]
    [p.start() for p in procs]
    print("MAXERR", max(max(e) for _, e in (queue.get(timeout=400) for _ in procs)))
    [p.join() for p in procs]
"""


def test_cp_on_the_triton_backend_under_the_interpreter_equals_one_rank(tmp_path):
    """Causal CP runs the DA op itself: here its Triton kernels (interpreted), with the shard's
    incoming state as `initial_state`, against the chunked backend on the whole sequence."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    script = tmp_path / "cp_triton.py"
    script.write_text(TRITON_CP_SCRIPT)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    err = float(done.stdout.split("MAXERR")[-1])  # relative to each tensor's largest value, fp32
    assert err <= 1e-5, err
