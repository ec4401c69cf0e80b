"""Test oracle: the offline flow written out from the spec with the sub-modules (not the project's glue)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stepaudio2.token2wav.flow import CausalMaskedDiffWithXvec


@torch.no_grad()
def spec_offline(flow: CausalMaskedDiffWithXvec, codes: list[int], prompt: Any) -> torch.Tensor:
    """Offline flow as the spec states it (§4.2, upstream CausalMaskedDiffWithXvec.inference), written out from
    the sub-modules: prompt tokens + codes through the encoder; the prompt mel as condition; x-vector L2-normalised
    and projected; 10 Euler steps on t_k = 1 - cos(pi/2 k/10) from the fixed noise, classifier-free guidance
    (1 + 0.7) v(cond) - 0.7 v(uncond); the frames after the prompt's 2 per token are the reply."""
    tokens = torch.tensor(np.concatenate([prompt.tokens, codes]), dtype=torch.int64)[None]
    mu, _ = flow.encode_torch(tokens, torch.tensor([tokens.shape[1]]))
    frames, prompt_frames = 2 * tokens.shape[1], 2 * len(prompt.tokens)
    cond = torch.zeros(1, 80, frames)
    cond[0, :, :prompt_frames] = torch.from_numpy(prompt.mel[:prompt_frames]).T
    spks = flow.spk_embed_affine_layer(F.normalize(torch.from_numpy(prompt.xvector)[None], dim=1))
    mask = torch.ones(1, 1, frames)
    x = flow.decoder.rand_noise[:, :, :frames].clone()
    zero = torch.zeros_like
    t = [1 - math.cos(math.pi / 2 * k / 10) for k in range(11)]
    for k in range(10):
        v = flow.decoder.estimator(torch.cat([x, x]), torch.cat([mask, mask]), torch.cat([mu, zero(mu)]),
                                   torch.full((2,), t[k]), torch.cat([spks, zero(spks)]), torch.cat([cond, zero(cond)]))
        x = x + (t[k + 1] - t[k]) * (1.7 * v[:1] - 0.7 * v[1:])
    return x[0, :, prompt_frames:]
