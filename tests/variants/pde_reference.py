"""The official PDE_GlobalLayer stencil written out, shared by the pde-global tests that
compare a Global layer or block with the official forward."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["official_stencil"]


def official_stencil(f: Tensor, h: Tensor, h0: Tensor, g: Tensor, g1: Tensor,
                     d_x: Tensor | float, d_y: Tensor | float, dt: float, dx: int, dy: int,
                     steps: int, source: bool = True) -> Tensor:
    """The K steps of the official forward as written there: the velocity fields g, g1,
    the diffusivities, D = 1/(1 + 2Bx + 2By) as a product, the rolled copies, the source
    added after the stencil (``no_f`` False); h = H^0, h0 = H^-1."""
    ux = (1.0 / (2 * dx)) * (torch.roll(g, dx, dims=2) - torch.roll(g, -dx, dims=2))
    vy = (1.0 / (2 * dy)) * (torch.roll(g1, dy, dims=3) - torch.roll(g1, -dy, dims=3))
    ax, ay = g * (dt / dx), g1 * (dt / dy)
    bx, by = d_x * (dt / (dx * dx)), d_y * (dt / (dy * dy))
    e = (ux + vy) * dt
    d = 1.0 / (1 + 2 * bx + 2 * by)
    for _ in range(steps):
        prev = h
        h = d * ((1 - 2 * bx - 2 * by) * h0 - 2 * e * h
                 + (-ax + 2 * bx) * torch.roll(h, dx, dims=2)
                 + (ax + 2 * bx) * torch.roll(h, -dx, dims=2)
                 + (-ay + 2 * by) * torch.roll(h, dy, dims=3)
                 + (ay + 2 * by) * torch.roll(h, -dy, dims=3))
        if source:
            h = h + d * 2 * dt * f
        h0 = prev
    return h
