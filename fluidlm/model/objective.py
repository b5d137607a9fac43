"""Training objectives, the one check that keeps a bidirectional model honest, and BERT's masking.

- `causal_lm`: predict token t+1 from tokens ≤ t. Only sound for `direction: causal`: a
  bidirectional model reads token t+1 itself (it is in its input), so the next-token loss falls
  without the model learning anything (measured: 8.27 → 3.13 in 60 steps of tiny-cpu).
- `masked_lm`: BERT's objective. A fraction `rate` of the tokens (default 15 %) is selected; of
  those, `mask_fraction` (80 %) are replaced by the mask token, `random_fraction` (10 %) by a
  random real token, the rest kept; the loss is the cross-entropy of the original token at the
  selected positions only. Special tokens (EOS, BOS, UNK, the mask itself) are never selected and
  never drawn as random replacements.

`check_objective` is the one place that says which (direction, objective) pairs are sound; config
validation (`fluidlm train`), `fluidlm eval` and anything that reads a checkpoint for export or
generation call it (`check_checkpoint_objective`).

Masks are a pure function of the tokens and a generator seeded by (seed, step, rank, micro-batch)
(`masking_generator`), drawn on the CPU, so a resumed run draws exactly the masks the uninterrupted
run would have, and every rank of a tensor-/context-parallel group draws the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

OBJECTIVES = ("causal_lm", "masked_lm")
MASK_PIECE = "<mask>"  # the tokenizer's mask token (fluidlm/data/tokenizer.py)
IGNORE = -100          # target of an unscored position


class ObjectiveError(ValueError):
    """A (model direction, objective) pair that cannot train or score a meaningful model."""


def default_objective(direction: str) -> str:
    return "causal_lm" if direction == "causal" else "masked_lm"


def check_objective(direction: str, objective: str | None) -> str:
    """The objective to use for a model of `direction` (None = the default for it); raises
    ObjectiveError for bidirectional + causal_lm (the future leak), naming the fix."""
    if objective is None:
        return default_objective(direction)
    if objective not in OBJECTIVES:
        raise ObjectiveError(f"train.objective={objective!r} is not one of {', '.join(OBJECTIVES)}")
    if objective == "causal_lm" and direction != "causal":
        raise ObjectiveError(
            "train.objective=causal_lm with model.direction=bidirectional: a bidirectional model reads the token it is "
            "asked to predict (token t+1 is in its input), so the next-token loss falls without the model learning "
            "anything; set train.objective=masked_lm (the default for bidirectional models) or model.direction=causal")
    return objective


def checkpoint_objective(config: dict) -> str:
    """The objective a checkpoint was trained with, from its saved resolved config. Checkpoints
    from before `train.objective` existed were all trained with the next-token loss."""
    return (config.get("train") or {}).get("objective") or "causal_lm"


def check_checkpoint_objective(config: dict, purpose: str = "eval") -> str:
    """For anything that reads a checkpoint (`purpose`: "eval", "export", "generate"): the
    checkpoint's objective, or ObjectiveError when its weights mean nothing (a bidirectional model
    trained on the next token) or cannot serve the purpose (generation needs a causal LM)."""
    direction = (config.get("model") or {}).get("direction", "causal")
    objective = checkpoint_objective(config)
    try:
        check_objective(direction, objective)
    except ObjectiveError:
        raise ObjectiveError(
            f"this checkpoint is a bidirectional model trained with the next-token objective (causal_lm): it could read "
            f"every token it was asked to predict, so its {purpose} numbers would mean nothing; retrain it with "
            "train.objective=masked_lm (the default for model.direction=bidirectional)") from None
    if purpose == "generate" and (objective != "causal_lm" or direction != "causal"):
        raise ObjectiveError(f"generation needs a causal model trained with causal_lm; this checkpoint is "
                             f"{direction} with {objective}")
    return objective


# --- masking -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MaskingSpec:
    """What `mask_tokens` needs: the recipe and the tokenizer's ids."""

    mask_id: int
    special_ids: tuple[int, ...]    # never selected, never drawn as random replacements
    vocab_size: int                 # random replacements are real ids below this (the tokenizer's size)
    rate: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1

    @classmethod
    def from_config(cls, train_config: dict) -> MaskingSpec:
        """From a resolved `train:` section (a dict, as saved in a checkpoint)."""
        m = train_config["mlm"]
        if m.get("mask_id") is None or m.get("tokenizer_vocab_size") is None:
            raise ObjectiveError("train.mlm.mask_id / tokenizer_vocab_size are not resolved (they are filled in from the "
                                 "tokenizer when training starts)")
        return cls(mask_id=int(m["mask_id"]), special_ids=tuple(int(i) for i in m["special_ids"]),
                   vocab_size=int(m["tokenizer_vocab_size"]), rate=float(m["rate"]),
                   mask_fraction=float(m["mask_fraction"]), random_fraction=float(m["random_fraction"]))

    def replacement_pool(self) -> torch.Tensor:
        """The ids a random replacement is drawn from: every id below vocab_size that is not special."""
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        special = torch.tensor([i for i in self.special_ids if 0 <= i < self.vocab_size], dtype=torch.int64)
        keep[special] = False
        return keep.nonzero().flatten()


def masking_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of ints, e.g. (seed, step, dp_rank, micro_batch):
    different keys give independent streams (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(k) % 2**63 for k in key]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def eligible_positions(tokens: torch.Tensor, spec: MaskingSpec) -> torch.Tensor:
    """Positions that may be selected: not a special token."""
    return ~torch.isin(tokens, torch.tensor(spec.special_ids, dtype=tokens.dtype, device=tokens.device))


def mask_tokens(tokens: torch.Tensor, spec: MaskingSpec, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of integer `tokens` (any shape, CPU): (inputs, targets), targets = the
    original token at selected positions and IGNORE elsewhere. Every random number is drawn for
    every position whatever the tokens are, so the masks depend on the tokens only through which
    positions hold special ids, and on the shape and the generator."""
    shape = tokens.shape
    select_u = torch.rand(shape, generator=generator)
    action_u = torch.rand(shape, generator=generator)
    pool = spec.replacement_pool()
    random_ids = pool[torch.randint(len(pool), shape, generator=generator)]
    selected = (select_u < spec.rate) & eligible_positions(tokens, spec)
    to_mask = selected & (action_u < spec.mask_fraction)
    to_random = selected & ~to_mask & (action_u < spec.mask_fraction + spec.random_fraction)
    inputs = torch.where(to_mask, torch.full_like(tokens, spec.mask_id), tokens)
    inputs = torch.where(to_random, random_ids.to(tokens.dtype), inputs)
    targets = torch.where(selected, tokens, torch.full_like(tokens, IGNORE))
    return inputs, targets


def evaluation_mask(tokens: np.ndarray, spec: MaskingSpec, seed: int, document: int) -> np.ndarray:
    """The fixed positions `fluidlm eval` scores in one document (bool array): each non-special
    token with probability spec.rate, from a generator seeded by (seed, document). A function of
    the document alone, so every context length (and every world size) scores the same positions."""
    t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    u = torch.rand(t.shape, generator=masking_generator(seed, document))
    return ((u < spec.rate) & eligible_positions(t, spec)).numpy()
