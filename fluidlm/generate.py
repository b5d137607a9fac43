"""Text generation: `generate(model, prompt_ids, ...)` yields new token ids one at a time.

Every causal model decodes through `FluidLM.forward_stream(tokens, state) -> (logits, state)`: the
prompt is consumed in chunks of `prompt_chunk` tokens, then one token per step.
- DA: the state is the DA recurrent state, the flow conv's last inputs and the PDE layer's past
  neighbours: time per token and memory do not grow with the context, and prompts longer than the
  model's `max_seq_len` are fine.
- Softmax baseline: the state is a KV cache (per layer, keys after RoPE and values): each token
  attends over the N cached ones, O(N) time and memory.
- `_recompute_step` (same signature) reruns the full forward on the growing sequence instead: the
  reference the cached paths are tested against.
- Bidirectional (masked-LM) models cannot generate left to right: GenerateError.

Sampling: temperature 0 = greedy (argmax; ties → the lowest id); otherwise logits / temperature,
then top-k, then top-p (nucleus: the smallest set of most likely tokens whose probability reaches
p), drawn from a torch.Generator seeded with `seed`: the same seed gives the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

PROMPT_CHUNK = 1024


class GenerateError(ValueError):
    """A model or request that cannot generate; the message names the problem."""


def check_generative(config) -> None:
    if not config.causal:
        raise GenerateError("this is a bidirectional (masked-LM) model: it fills in masked tokens and cannot generate "
                            "text left to right; generate with a causal checkpoint (model.direction=causal)")


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """One token id from logits (vocab,)."""
    logits = logits.float()
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability of the more likely tokens
        drop = before >= top_p
        drop[0] = False  # the most likely token always stays
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _stream_step(model, tokens: torch.Tensor, state=None):
    """(new tokens (1, n), state) → (logits (1, n, vocab), state): DA state or softmax KV cache."""
    return model.forward_stream(tokens, state)


def _recompute_step(model, tokens: torch.Tensor, state=None):
    """forward_stream's contract without a cache: the state is the whole sequence so far and every
    step reruns the full forward on it (O(N) work per token for DA too). The reference in tests."""
    seq = tokens if state is None else torch.cat([state, tokens], dim=1)
    hidden = model.hidden_states(seq)[:, -tokens.shape[1]:]  # the head only on the new tokens
    return model.parallel.lm_logits(hidden, model.embed.weight), seq


STEPS = {"stream": _stream_step, "recompute": _recompute_step}


def step_function(model, mode: str = "stream"):
    check_generative(model.config)
    return STEPS[mode]


@torch.no_grad()
def generate(model, prompt_ids: Sequence[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, eos_id: int | None = None,
             prompt_chunk: int = PROMPT_CHUNK, mode: str = "stream") -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids after `prompt_ids` (stops after `eos_id` when given).
    `model` in eval mode (dropout would make greedy decoding random); `mode` "stream" (forward_stream)
    or "recompute" (the full forward every step, the reference)."""
    step = step_function(model, mode)
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise GenerateError("the prompt is empty: give at least one token")
    vocab = model.config.vocab_size
    if min(prompt) < 0 or max(prompt) >= vocab:
        raise GenerateError(f"prompt token ids must lie in [0, {vocab}): got {min(prompt)}..{max(prompt)}")
    if max_new_tokens <= 0:
        return
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    state = None
    for start in range(0, ids.shape[1], prompt_chunk):
        logits, state = step(model, ids[:, start:start + prompt_chunk], state)
    for i in range(max_new_tokens):
        token = sample_next(logits[0, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        yield token
        if (eos_id is not None and token == eos_id) or i == max_new_tokens - 1:
            return
        logits, state = step(model, torch.tensor([[token]], dtype=torch.long, device=device), state)
