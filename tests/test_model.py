"""The Fluid Transformer: causality, document isolation, the PDE layer's bound, config checks."""

import math

import pytest
import torch

from fluidlm.model import FluidLM, ModelConfig
from fluidlm.model.attention import initial_rho
from fluidlm.model.fluid import chunked_cross_entropy
from fluidlm.model.pde import PDEDiffusion
from fluidlm.model.layers import DenseLayers


def tiny(**over):
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=2, head_dim=16, max_seq_len=256, chunk_size=8)
    base.update(over)
    return ModelConfig(**base)


def future_leaks(model: FluidLM, n=48, t=20, seed=0) -> bool:
    """True if changing tokens after position t changes any logit at positions ≤ t."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (2, n), generator=gen)
    changed = tokens.clone()
    changed[:, t + 1 :] = torch.randint(0, model.config.vocab_size, (2, n - t - 1), generator=gen)
    model.eval()
    with torch.no_grad():
        a, b = model(tokens)[:, : t + 1], model(changed)[:, : t + 1]
    return not torch.equal(a, b)


@pytest.mark.parametrize("attention", ["da", "softmax"])
def test_causal_model_never_reads_the_future(attention):
    torch.manual_seed(0)
    model = FluidLM(tiny(attention=attention, pde={"scales": [1, 4, 16], "theta_init": 0.0}))
    assert not future_leaks(model)


@pytest.mark.parametrize("attention", ["da", "softmax"])
def test_causality_test_catches_a_symmetric_pde_stencil(attention):
    """The test above can fail: plant the published symmetric stencil in a causal model."""
    torch.manual_seed(0)
    model = FluidLM(tiny(attention=attention, pde={"theta_init": 0.0}))
    model.pde.stencil = "symmetric"
    assert future_leaks(model)


def test_bidirectional_model_reads_the_future():
    torch.manual_seed(0)
    assert future_leaks(FluidLM(tiny(direction="bidirectional")))


@pytest.mark.parametrize("attention", ["da", "softmax"])
@pytest.mark.parametrize("direction", ["causal", "bidirectional"])
def test_packed_documents_equal_separate_runs(attention, direction):
    torch.manual_seed(0)
    model = FluidLM(tiny(attention=attention, direction=direction, pde={"theta_init": 0.0})).eval()
    tokens = torch.randint(0, 97, (1, 40))
    cu = [0, 9, 10, 40]
    with torch.no_grad():
        packed = model(tokens, torch.tensor(cu))
        for s, e in zip(cu[:-1], cu[1:]):
            torch.testing.assert_close(packed[:, s:e], model(tokens[:, s:e]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("theta,w_scale", [(-30.0, 0.0), (30.0, 0.0), (0.0, 50.0), (30.0, 50.0)])
def test_pde_layer_is_non_expansive_in_max_norm(causal, theta, w_scale):
    torch.manual_seed(0)
    pde = PDEDiffusion(16, [1, 4, 16], steps=3, causal=causal, theta_init=theta, layers=DenseLayers(), init_std=1.0)
    with torch.no_grad():
        pde.rate.weight.mul_(w_scale)
    for _ in range(5):
        u = torch.randn(3, 64, 16) * 10 ** torch.randint(-2, 3, ()).item()
        out = pde(u)
        assert out.abs().amax(dim=(1,)).le(u.abs().amax(dim=(1,)) * (1 + 1e-6)).all()
        cu = torch.tensor([0, 5, 6, 64])
        out = pde(u[:1], cu)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):  # per document, too
            assert out[:, s:e].abs().max() <= u[:1, s:e].abs().max() * (1 + 1e-6)


def test_pde_causal_stencil_reads_the_past_and_clamps_at_the_edge():
    pde = PDEDiffusion(1, [2], steps=1, causal=True, theta_init=0.0, layers=DenseLayers(), init_std=1.0)
    with torch.no_grad():
        pde.rate.weight.zero_()
    u = torch.tensor([[1.0, 2.0, 4.0, 8.0]])[..., None]
    d = 0.5  # C/|S| · sigmoid(0) = 1 · 0.5
    expected = torch.tensor([1.0, 2.0 + d * (1 - 2), 4 + d * (1 - 4), 8 + d * (2 - 8)])
    torch.testing.assert_close(pde(u)[0, :, 0], expected)


def test_lambda_init_half_lives_are_log_spaced_from_one_token_to_the_context():
    rate = torch.nn.functional.softplus(initial_rho(8, 4096)).double()
    half_lives = math.log(2) / rate
    assert half_lives[0].item() == pytest.approx(1.0, rel=1e-4)
    assert half_lives[-1].item() == pytest.approx(4096.0, rel=1e-3)
    ratios = half_lives[1:] / half_lives[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, ratios[0].item()), rtol=1e-3, atol=0)


def test_flow_encoder_starts_with_unit_step():
    torch.manual_seed(0)
    model = FluidLM(tiny())
    x = torch.randn(1, 10, 32) * 0.02
    delta = model.blocks[0].attn.flow(x, None)
    torch.testing.assert_close(delta, torch.ones_like(delta), rtol=0.05, atol=0.05)


def test_chunked_cross_entropy_matches_full_logits():
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)
    targets = torch.randint(0, 30, (50,))
    targets[3] = -100
    full = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)
    chunked = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=7)
    torch.testing.assert_close(chunked, full)
    g_full = torch.autograd.grad(full, (hidden, weight))
    g_chunk = torch.autograd.grad(chunked_cross_entropy(hidden, weight, targets, 7), (hidden, weight))
    for a, b in zip(g_chunk, g_full):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("attention", ["da", "softmax"])
def test_activation_checkpointing_gives_identical_gradients(attention):
    torch.manual_seed(0)
    model = FluidLM(tiny(attention=attention, dropout=0.1))
    tokens = torch.randint(0, 97, (2, 33))
    grads = []
    for flag in (False, True):
        model.activation_checkpointing = flag
        model.zero_grad()
        torch.manual_seed(1)
        model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_loss_at_init_is_near_uniform_and_all_parameters_get_gradients():
    torch.manual_seed(0)
    model = FluidLM(tiny())
    tokens = torch.randint(0, 97, (2, 33))
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    assert abs(loss.item() - math.log(97)) < 0.1
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_config_rejects_unknown_keys_with_the_closest_name():
    with pytest.raises(ValueError, match="did you mean 'n_heads'"):
        ModelConfig(n_head=4)
    with pytest.raises(ValueError, match="did you mean 'scales'"):
        ModelConfig(pde={"scale": [1]})
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(attention="flash")
    with pytest.raises(ValueError, match="pde.scales"):
        ModelConfig(pde={"scales": [0, 2]})


def test_tensor_parallel_divisibility_is_checked():
    with pytest.raises(ValueError, match="n_heads=6 is not divisible by the tensor-parallel size 4"):
        tiny(n_heads=6, vocab_size=96).check_tensor_parallel(4)
    tiny(n_heads=4, vocab_size=96, ffn_hidden=64).check_tensor_parallel(4)


def test_bad_tokens_raise():
    model = FluidLM(tiny())
    with pytest.raises(ValueError, match="2-D integer"):
        model(torch.randn(2, 5))


def stream_logits(model, tokens, windows):
    """The logits of `tokens` fed to forward_stream window by window ([(start, end), ...]), and the last state."""
    state, outs = None, []
    for s, e in windows:
        logits, state = model.forward_stream(tokens[:, s:e], state)
        outs.append(logits)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("windows", [[(0, 70)], [(0, 1), (1, 2), (2, 70)], [(0, 2), (2, 9), (9, 40), (40, 70)]])
@pytest.mark.parametrize("attention", ["da", "softmax"])
def test_streaming_equals_full_context(windows, attention):
    """DA carries its state and the flow conv's inputs, softmax a KV cache; the PDE its neighbours."""
    torch.manual_seed(0)
    model = FluidLM(tiny(attention=attention, pde={"theta_init": 0.0, "steps": 2, "scales": [1, 3, 5]})).eval()
    tokens = torch.randint(0, 97, (2, 70))
    with torch.no_grad():
        full = model(tokens)
        streamed, _ = stream_logits(model, tokens, windows)
    torch.testing.assert_close(streamed, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("over", [dict(attention="softmax", direction="bidirectional"), dict(direction="bidirectional")])
def test_streaming_refuses_models_it_cannot_stream(over):
    model = FluidLM(tiny(**over))
    with pytest.raises(ValueError, match="streaming"):
        model.forward_stream(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("attention", ["da", "softmax"])
@pytest.mark.parametrize("direction", ["causal", "bidirectional"])
def test_batched_rows_with_documents_equal_separate_rows(attention, direction):
    """A (B, L) batch with per-row documents (cu_seqlens over the flattened B·L tokens, every row
    boundary a document boundary) gives every row what it gets alone: no row or document sees another."""
    torch.manual_seed(0)
    model = FluidLM(tiny(attention=attention, direction=direction,
                         pde={"theta_init": 0.0, "steps": 2, "scales": [1, 3]})).eval()
    rows = torch.randint(0, 97, (3, 24))
    row_docs = [[0, 24], [0, 5, 24], [0, 10, 17, 24]]
    cu = torch.tensor(sorted({r * 24 + c for r, docs in enumerate(row_docs) for c in docs}))
    with torch.no_grad():
        batched = model(rows, cu)
        for r, docs in enumerate(row_docs):
            alone = model(rows[r:r + 1], torch.tensor(docs))
            torch.testing.assert_close(batched[r:r + 1], alone, rtol=1e-5, atol=1e-5)
        # and not vacuous: without the boundaries the rows' later documents change
        assert (model(rows, None)[2, 17:] - batched[2, 17:]).abs().max() > 1e-3
