"""Text generation: `generate(model, prompt_ids, ...)` yields new token ids one at a time.

- Causal DA: decodes through `FluidLM.forward_stream` (DA states, flow-conv prefix and PDE neighbours
  carried in `state`): the prompt is consumed in chunks of `prompt_chunk` tokens, then one token per
  step. Time per token and memory do not grow with the context, and prompts longer than the
  model's `max_seq_len` are fine.
- Softmax baseline: `_softmax_step`, which for now reruns the full forward on the growing sequence
  (correct; O(N) work per token, the activations of N tokens in memory). It has forward_stream's
  signature, (new tokens, state) → (logits, state), so a KV cache drops in there.
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


def _softmax_step(model, tokens: torch.Tensor, state=None):
    """Softmax baseline decode step with forward_stream's contract: (tokens (1, n) new, state) →
    (logits (1, n, vocab), state). For now the state is the whole sequence so far and every step
    reruns the full forward on it (no KV cache yet); swap in a cached forward_stream here."""
    seq = tokens if state is None else torch.cat([state, tokens], dim=1)
    hidden = model.hidden_states(seq)[:, -tokens.shape[1]:]  # the head only on the new tokens
    return model.parallel.lm_logits(hidden, model.embed.weight), seq


def _da_step(model, tokens: torch.Tensor, state=None):
    return model.forward_stream(tokens, state)


def step_function(model):
    config = model.config
    check_generative(config)
    return _da_step if config.attention == "da" else _softmax_step


@torch.no_grad()
def generate(model, prompt_ids: Sequence[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, eos_id: int | None = None,
             prompt_chunk: int = PROMPT_CHUNK) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids after `prompt_ids` (stops after `eos_id` when given)."""
    step = step_function(model)
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
    chunk = prompt_chunk if step is _da_step else ids.shape[1]  # the full forward takes the prompt at once
    for start in range(0, ids.shape[1], chunk):
        logits, state = step(model, ids[:, start:start + chunk], state)
    for i in range(max_new_tokens):
        token = sample_next(logits[0, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        yield token
        if (eos_id is not None and token == eos_id) or i == max_new_tokens - 1:
            return
        logits, state = step(model, torch.tensor([[token]], dtype=torch.long, device=device), state)
