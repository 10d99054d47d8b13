"""What a script gives the cross-model property suite (tests/test_properties.py)."""
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class Rows:
    name: str
    model: Callable[[int], torch.nn.Module]  # seed -> tiny model in eval mode (dropout off)
    ids: Callable[[int, int, int], torch.Tensor]  # (seed, B, T) -> valid token ids (B, T)
    # (model, ids) -> [(weights (B, H, T, S), (H, S))] for each attention module
    attention: Optional[Callable] = None
    # (model, ids) -> outputs (B, T, ...) that must not depend on the future (or past, if backward)
    causal: Optional[Callable] = None
    direction: str = "forward"
    # (model, ids (B, T), lengths (B,)) -> outputs (B, T, ...) whose first lengths[b] rows are real
    padded: Optional[Callable] = None
    # (model in train mode, seed) -> scalar pretraining loss
    loss: Optional[Callable] = None
    zero_grad_ok: tuple = field(default_factory=tuple)  # parameter-name prefixes allowed a zero gradient
    # seed -> [(what, hits, trials, rate)]: for each thing the script masks or drops at a configured rate
    # (BERT's 15% and 80/10/10, each of ULMFiT's five dropouts, token or character dropout), how often it
    # happened in `trials` independent chances, and the configured rate it must match (binomial bounds)
    rates: Optional[Callable] = None
