"""Client-level differential privacy: DP-FedAvg's server-side Gaussian mechanism and its (ε, δ).

DP-FedAvg ("Learning Differentially Private Recurrent Language Models", McMahan et al., ICLR 2018) with noise
multiplier z = ``privacy.noise_multiplier`` > 0 and clipping norm C = ``privacy.clip_norm`` aggregates the updates
Δᵢ = yᵢ − x_t of the m clients sampled in round t as

    Δ_t = (Σᵢ Δᵢ · min(1, C / ‖Δᵢ‖₂)  +  N(0, z² C² I)) / m

(‖·‖₂ over all shared tensors together). The sum runs over the clients whose results the server accepted: a client
whose fit failed or whose update was rejected adds nothing, while the divisor stays m, the number sampled (the
fixed-denominator estimator), so it depends on no client's data. Adding or removing one client changes the clipped
sum by at most C in L2 norm, so every round is a Gaussian mechanism with noise multiplier z: the noise on each
coordinate of Δ_t has standard deviation z·C/m. The noise is drawn from a generator seeded by (run seed, round), so
a run and its resumed continuation draw the same noise. The server optimizer only post-processes Δ_t, which keeps
the guarantee whichever optimizer it is.

Accounting: with m of N clients sampled per round (sampling rate q = m/N) and one Gaussian mechanism per round,
ε(δ) after T rounds is opacus' RDP bound for the sampled Gaussian mechanism (Mironov et al. 2019) composed over T
steps and converted to (ε, δ) (Balle et al. 2020). That bound is proved for Poisson sampling at rate q; the engine
draws exactly m clients without replacement, the usual approximation in practice (as in opacus itself).

What it covers: the sequence of global shared tensors, at the level of a whole client's data. What it does not: the
metrics rows and logs that name clients (their training losses, why one was left out) and the evaluation rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from fedlora.federated.aggregation import clip_update

NOISE_STREAM = 0xD1FF  # keeps the noise's seed sequence apart from client sampling's (run seed, round)


def dp_fedavg(
    updates: Sequence[Mapping[str, Tensor]],
    num_sampled: int,
    noise_multiplier: float,
    clip_norm: float,
    seed: int,
    round_: int,
) -> dict[str, Tensor]:
    """(Σᵢ clip(Δᵢ, C) + N(0, z² C² I)) / m for the accepted ``updates`` of the m = ``num_sampled`` clients.

    The updates are the shared tensors' names mapped to float64 tensors; the noise is drawn in their order from
    :func:`noise_generator` ``(seed, round_)``.
    """
    if not updates or num_sampled < len(updates):
        raise ValueError(f"{len(updates)} updates from {num_sampled} sampled clients")
    clipped = [clip_update(update, clip_norm) for update in updates]
    generator = noise_generator(seed, round_)
    std = noise_multiplier * clip_norm
    aggregate = {}
    for name, first in clipped[0].items():
        noise = std * torch.randn(first.shape, generator=generator, dtype=first.dtype)
        aggregate[name] = (sum(update[name] for update in clipped) + noise) / num_sampled
    return aggregate


def noise_generator(seed: int, round_: int) -> torch.Generator:
    """A CPU generator seeded by (run seed, round) alone: the same noise whichever clients trained or failed."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, round_, NOISE_STREAM]).generate_state(1)[0]))


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε at ``delta`` after ``rounds`` rounds of the sampled Gaussian mechanism (opacus' RDPAccountant, one step per
    round at ``sample_rate`` q = m/N); 0 before the first round."""
    from opacus.accountants import RDPAccountant  # here, not at the top: opacus takes seconds to import

    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return float(accountant.get_epsilon(delta))
