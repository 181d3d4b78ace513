"""The Global layer's coefficients and PDE steps as one autograd Function.

Plain autograd runs the explicit scheme (``autobuild.variants.pde_global.pde_steps``) as
~25 elementwise ops and four ``torch.roll`` copies per step, keeps a dozen of their
results for backward, and keeps each coefficient's batch-norm output and ReLU output too.
:func:`global_pde` takes the coefficient convolutions' outputs (before their batch norms)
and the layer input f, and:

* forward: the native batch norm of each coefficient (running statistics updated once,
  exactly as ``nn.BatchNorm2d``), ReLU, then K steps of the same scheme written with
  in-place ops and shifted slices instead of rolled copies;
* keeps f, the coefficient conv outputs, the batch statistics and the result H_K (which
  the output batch norm keeps anyway: the same storage);
* backward: recomputes the coefficients (normalise + ReLU, one pass each), the steps when
  K > 1, and runs the adjoint of the scheme in closed form (below), then the native
  batch-norm backward of each coefficient.

Scheme (one step, h_{-1} = h_0 = f; S±x shifts by ±dx along H, S±y by ±dy along W with
periodic borders, i.e. ``torch.roll``; a = 2dt/dx², b = 2dt/dy², α = dt/dx, β = dt/dy)::

    Dn = 1 + a·Dx + b·Dy,  c_prev = 1 - a·Dx - b·Dy
    c_x± = a·Dx ∓ α·u,  c_y± = b·Dy ∓ β·v,  E2 = α·(S+x u - S-x u) + β·(S+y v - S-y v)
    h_{k+1} = (c_prev·h_{k-1} + Σ c_d·S_d(h_k) + 2dt·f - E2·h_k) / Dn

Adjoint, with r = g_{k+1} / Dn accumulated over the steps: ∂c_d += r·S_d(h_k),
∂c_prev += r·h_{k-1}, ∂E2 -= r·h_k, ∂Dn -= r·h_{k+1}, g_k += Σ S_dᵀ(c_d·r) - E2·r,
g_{k-1} += c_prev·r, ∂f += 2dt·r; then ∂Dx = a·(∂c_x+ + ∂c_x- - ∂c_prev + ∂Dn),
∂u = α·(∂c_x- - ∂c_x+) + α·(S-x ∂E2 - S+x ∂E2), and likewise for Dy, v.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from autobuild.ops.batchnorm import bn_backward, bn_forward, bn_normalize
from autobuild.ops.common import compiling, single_backward

__all__ = ["global_pde", "pde_forward"]


def _add_rolled(acc: Tensor, t: Tensor, shift: int, dim: int, coef: Tensor | float = 1.0,
                value: float = 1.0) -> Tensor:
    """acc += value · coef · roll(t, shift, dim), with two slice updates instead of a
    rolled copy (``coef`` is a float or a tensor shaped like ``acc``)."""
    n = t.shape[dim]
    s = shift % n
    if s == 0:
        return (acc.addcmul_(t, coef, value=value) if isinstance(coef, Tensor)
                else acc.add_(t, alpha=coef * value))
    for dst, src, length in ((s, 0, n - s), (0, n - s, s)):
        a, b = acc.narrow(dim, dst, length), t.narrow(dim, src, length)
        if isinstance(coef, Tensor):
            a.addcmul_(b, coef.narrow(dim, dst, length), value=value)
        else:
            a.add_(b, alpha=coef * value)
    return acc


def _pair(t: Tensor, shift: int, dim: int, op: Callable) -> Tensor:
    """op(roll(t, shift), roll(t, -shift)) in one pass (three slice ops, no rolled copy)."""
    n = t.shape[dim]
    s = shift % n
    if s == 0 or 2 * s > n or compiling():
        return op(torch.roll(t, s, dim), torch.roll(t, -s, dim))
    out = torch.empty_like(t)
    # out[i] = op(t[i - s], t[i + s]) with indices mod n: the interior, then both borders
    regions = [(s, 0, 2 * s, n - 2 * s), (0, n - s, s, s), (n - s, n - 2 * s, 0, s)]
    if dim % t.dim() == t.dim() - 1 and t.dim() >= 2 and t.stride(-1) == 1 \
            and t.stride(-2) == n and out.stride() == t.stride():
        # Along W the interior is short rows (W - 2s long), slow to loop over: take it on
        # the flattened (H·W) plane instead, one long run per plane; the entries that
        # cross a row boundary are the border columns, which the border ops overwrite.
        plane = t.shape[-2] * n
        flat, flat_out = t.flatten(-2), out.flatten(-2)
        op(flat.narrow(-1, 0, plane - 2 * s), flat.narrow(-1, 2 * s, plane - 2 * s),
           out=flat_out.narrow(-1, s, plane - 2 * s))
        regions = regions[1:]
    for start, a, b, length in regions:
        if length:
            op(t.narrow(dim, a, length), t.narrow(dim, b, length),
               out=out.narrow(dim, start, length))
    return out


def _diff(t: Tensor, shift: int, dim: int) -> Tensor:
    """roll(t, shift) - roll(t, -shift)."""
    return _pair(t, shift, dim, torch.sub)


def _rsum(t: Tensor, shift: int, dim: int) -> Tensor:
    """roll(t, shift) + roll(t, -shift)."""
    return _pair(t, shift, dim, torch.add)


@dataclass
class _Coeffs:
    """The scheme's per-pixel coefficients (float where the field is constant)."""

    dn: Tensor | float
    c_prev: Tensor | float
    cxp: Tensor | float
    cxm: Tensor | float
    cyp: Tensor | float
    cym: Tensor | float
    e2: Tensor | None


def _coeffs(u: Tensor | None, v: Tensor | None, dfx: Tensor | float, dfy: Tensor | float,
            dt: float, dx: int, dy: int) -> _Coeffs:
    a, b = 2 * dt / dx ** 2, 2 * dt / dy ** 2
    adx, bdy = dfx * a, dfy * b
    dn = adx + bdy + 1
    c_prev = 2 - dn
    if u is None or v is None:
        return _Coeffs(dn, c_prev, adx, adx, bdy, bdy, None)
    au, bv = u * (dt / dx), v * (dt / dy)
    e2 = _diff(u, dx, -2).mul_(dt / dx).add_(_diff(v, dy, -1), alpha=dt / dy)
    return _Coeffs(dn, c_prev, adx - au, au.add_(adx), bdy - bv, bv.add_(bdy), e2)


def _step(h_prev: Tensor, h: Tensor, f: Tensor, co: _Coeffs, dt: float, dx: int,
          dy: int) -> Tensor:
    acc = h_prev * co.c_prev
    acc.add_(f, alpha=2 * dt)
    if co.e2 is not None:
        acc.addcmul_(co.e2, h, value=-1)
    for c, shift, dim in ((co.cxp, dx, -2), (co.cxm, -dx, -2), (co.cyp, dy, -1),
                          (co.cym, -dy, -1)):
        _add_rolled(acc, h, shift, dim, c)
    return acc.div_(co.dn)


def _one_step(f: Tensor, u: Tensor | None, v: Tensor | None, dfx: Tensor | float,
              dfy: Tensor | float, dt: float, dx: int, dy: int) -> Tensor:
    """K = 1 (h_{-1} = h_0 = f), regrouped to ~19 passes over the maps instead of ~26:
    h_1 = [(1+2dt)·f + a·Dx·(S+x f + S-x f - f) + b·Dy·(S+y f + S-y f - f)
           - E2·f - α·u·(S+x f - S-x f) - β·v·(S+y f - S-y f)] / Dn."""
    a, b = 2 * dt / dx ** 2, 2 * dt / dy ** 2
    acc = f * (1 + 2 * dt)
    for field, scale, shift, dim in ((dfx, a, dx, -2), (dfy, b, dy, -1)):
        lap = _rsum(f, shift, dim).sub_(f)
        if isinstance(field, Tensor):
            acc.addcmul_(lap, field, value=scale)
        else:
            acc.add_(lap, alpha=field * scale)
    if u is not None and v is not None:
        e2 = _diff(u, dx, -2).mul_(dt / dx).add_(_diff(v, dy, -1), alpha=dt / dy)
        acc.addcmul_(e2, f, value=-1)
        acc.addcmul_(u, _diff(f, dx, -2), value=-dt / dx)
        acc.addcmul_(v, _diff(f, dy, -1), value=-dt / dy)
    return acc.div_(_dn(dfx, dfy, a, b))


def _dn(dfx: Tensor | float, dfy: Tensor | float, a: float, b: float) -> Tensor | float:
    if isinstance(dfx, Tensor):
        dn = dfx * a
        return (dn.add_(dfy, alpha=b) if isinstance(dfy, Tensor) else dn.add_(dfy * b)).add_(1)
    return dfy * b + (1 + dfx * a)


def pde_forward(f: Tensor, u: Tensor | None, v: Tensor | None, dfx: Tensor | float,
                dfy: Tensor | float, steps: int, dt: float, dx: int = 1, dy: int = 1
                ) -> list[Tensor]:
    """[h_1, ..., h_K] of the scheme from h_{-1} = h_0 = f (no autograd)."""
    if steps == 1:
        return [_one_step(f, u, v, dfx, dfy, dt, dx, dy)]
    co = _coeffs(u, v, dfx, dfy, dt, dx, dy)
    hs = [f, f]
    for _ in range(steps):
        hs.append(_step(hs[-2], hs[-1], f, co, dt, dx, dy))
    return hs[2:]


def _pde_backward(g: Tensor, f: Tensor, hs: list[Tensor], u: Tensor | None,
                  v: Tensor | None, dfx: Tensor | float, dfy: Tensor | float, dt: float,
                  dx: int, dy: int) -> tuple[Tensor, ...]:
    """Gradients (f, u, v, Dx, Dy) of h_K (None where the field is constant)."""
    if len(hs) == 1:
        return _one_step_backward(g, f, hs[0], u, v, dfx, dfy, dt, dx, dy)
    co = _coeffs(u, v, dfx, dfy, dt, dx, dy)
    a, b, al, be = 2 * dt / dx ** 2, 2 * dt / dy ** 2, dt / dx, dt / dy
    hs = [f, f, *hs]  # hs[k + 1] = h_k
    steps = len(hs) - 2
    zeros = torch.zeros_like
    grads = [zeros(f) for _ in range(steps + 1)] + [g]  # grads[k + 1] = dL/dh_k
    gf = zeros(f)
    need_x, need_y = isinstance(dfx, Tensor), isinstance(dfy, Tensor)
    # ∂Dx needs ∂c_x+ + ∂c_x- - ∂c_prev + ∂Dn; ∂u needs ∂c_x- - ∂c_x+ and ∂E2.
    sx = zeros(f) if need_x else None
    sy = zeros(f) if need_y else None
    du = zeros(f) if co.e2 is not None else None
    dv = zeros(f) if co.e2 is not None else None
    de2 = zeros(f) if co.e2 is not None else None
    for k in range(steps - 1, -1, -1):
        h_prev, h, h_next = hs[k], hs[k + 1], hs[k + 2]
        r = grads[k + 2] / co.dn
        if need_x or need_y:
            common = r * (h_next + h_prev)  # ∂Dn and -∂c_prev: -r·h_{k+1}, -r·h_{k-1}
        if need_x:  # ∂c_x+ + ∂c_x- = r·(S+x h + S-x h)
            _add_rolled(_add_rolled(sx, h, dx, -2, r), h, -dx, -2, r).sub_(common)
        if need_y:
            _add_rolled(_add_rolled(sy, h, dy, -1, r), h, -dy, -1, r).sub_(common)
        if de2 is not None:
            de2.addcmul_(r, h, value=-1)
            # ∂c_x- - ∂c_x+ = r·(S-x h - S+x h)
            _add_rolled(_add_rolled(du, h, -dx, -2, r), h, dx, -2, r, -1.0)
            _add_rolled(_add_rolled(dv, h, -dy, -1, r), h, dy, -1, r, -1.0)
        gf.add_(r, alpha=2 * dt)
        if isinstance(co.c_prev, Tensor):
            grads[k].addcmul_(r, co.c_prev)
        else:
            grads[k].add_(r, alpha=co.c_prev)
        gk = grads[k + 1]
        if co.e2 is not None:
            gk.addcmul_(co.e2, r, value=-1)
        for c, shift, dim in ((co.cxp, dx, -2), (co.cxm, -dx, -2), (co.cyp, dy, -1),
                              (co.cym, -dy, -1)):
            if isinstance(c, Tensor):
                _add_rolled(gk, r * c, -shift, dim)
            else:
                _add_rolled(gk, r, -shift, dim, c)
    gf.add_(grads[0]).add_(grads[1])
    g_dx = sx.mul_(a) if need_x else None
    g_dy = sy.mul_(b) if need_y else None
    g_u = g_v = None
    if de2 is not None:
        g_u = _add_rolled(_add_rolled(du, de2, -dx, -2), de2, dx, -2, -1.0).mul_(al)
        g_v = _add_rolled(_add_rolled(dv, de2, -dy, -1), de2, dy, -1, -1.0).mul_(be)
    return gf, g_u, g_v, g_dx, g_dy


def _one_step_backward(g: Tensor, f: Tensor, out: Tensor, u: Tensor | None, v: Tensor | None,
                       dfx: Tensor | float, dfy: Tensor | float, dt: float, dx: int, dy: int
                       ) -> tuple[Tensor | None, ...]:
    """The adjoint of :func:`_one_step` (r = g / Dn, A_d = S+d f + S-d f - f):
    ∂Dx = a·r·(A_x - h_1), ∂u = α·(D_x(r·f) - r·D_x f) with D = S+ - S-, and
    ∂f = r·(1 + 2dt - a·Dx - b·Dy - E2) + a·RS_x(r·Dx) + α·D_x(r·u) + (same along y)."""
    a, b, al, be = 2 * dt / dx ** 2, 2 * dt / dy ** 2, dt / dx, dt / dy
    r = g / _dn(dfx, dfy, a, b)
    gf = r * (1 + 2 * dt)
    g_fields: list[Tensor | None] = [None, None]
    for field, scale, shift, dim in ((dfx, a, dx, -2), (dfy, b, dy, -1)):
        if isinstance(field, Tensor):
            rd = r * field
            gf.add_(_rsum(rd, shift, dim).sub_(rd), alpha=scale)
            g_fields.append(_rsum(f, shift, dim).sub_(f).sub_(out).mul_(r).mul_(scale))
        else:
            gf.add_(_rsum(r, shift, dim).sub_(r), alpha=field * scale)
            g_fields.append(None)
    if u is not None and v is not None:
        e2 = _diff(u, dx, -2).mul_(al).add_(_diff(v, dy, -1), alpha=be)
        gf.addcmul_(r, e2, value=-1)
        rf = r * f
        for i, (field, scale, shift, dim) in enumerate(((u, al, dx, -2), (v, be, dy, -1))):
            gf.add_(_diff(r * field, shift, dim), alpha=scale)
            g_fields[i] = _diff(rf, shift, dim).addcmul_(r, _diff(f, shift, dim), value=-1
                                                          ).mul_(scale)
    return gf, *g_fields


class _GlobalPDE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, f: Tensor, which: tuple[bool, bool, bool, bool],
                conf: tuple[int, float, int, int], bn_conf: Sequence[tuple[float, float]],
                *flat: Tensor | None) -> Tensor:
        steps, dt, dx, dy = conf
        # flat: (y, weight, bias, running_mean, running_var) per learned coefficient
        dtype = f.dtype
        for i in range(0, len(flat), 5):
            dtype = torch.promote_types(dtype, flat[i].dtype)
        ys, ws, bs, means, invstds, fields = [], [], [], [], [], []
        for i, (momentum, eps) in zip(range(0, len(flat), 5), bn_conf, strict=True):
            y, w, b, rm, rv = flat[i:i + 5]
            z, mean, invstd = bn_forward(y, w, b, rm, rv, momentum, eps)
            fields.append(z.relu_().to(dtype))
            ys.append(y), ws.append(w), bs.append(b), means.append(mean), invstds.append(invstd)
        u, v, dfx, dfy = _unpack(which, fields)
        fd = f.to(dtype)
        out = pde_forward(fd, u, v, dfx, dfy, steps, dt, dx, dy)[-1]
        ctx.save_for_backward(f, out, *ys, *ws, *bs, *means, *invstds)
        ctx.conf = (which, conf, [eps for _, eps in bn_conf], len(ys))
        return out

    @staticmethod
    @single_backward
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        which, (steps, dt, dx, dy), eps, n = ctx.conf
        f, out, *rest = ctx.saved_tensors
        ys, ws, bs, means, invstds = (rest[i * n:(i + 1) * n] for i in range(5))
        dtype = out.dtype
        fields = [bn_normalize(y, w, b, m, s, e).relu_().to(dtype)
                  for y, w, b, m, s, e in zip(ys, ws, bs, means, invstds, eps, strict=True)]
        u, v, dfx, dfy = _unpack(which, fields)
        fd = f.to(dtype)
        hs = [out] if steps == 1 else pde_forward(fd, u, v, dfx, dfy, steps - 1, dt, dx, dy)
        if steps > 1:
            hs.append(out)
        gf, *gfields = _pde_backward(grad.to(dtype), fd, hs, u, v, dfx, dfy, dt, dx, dy)
        gfields = [g for g, on in zip(gfields, which, strict=True) if on]
        need = ctx.needs_input_grad
        flat_grads: list[Tensor | None] = []
        for i, (g, field, y, w, m, s) in enumerate(zip(gfields, fields, ys, ws, means, invstds,
                                                       strict=True)):
            mask = tuple(need[4 + 5 * i:4 + 5 * i + 3])
            gz = torch.ops.aten.threshold_backward(g.to(y.dtype), field.to(y.dtype), 0)
            gy, gw, gb = bn_backward(gz, y, w, m, s, eps[i], mask)
            flat_grads += [gy, gw, gb, None, None]
        return (gf.to(f.dtype) if need[0] else None, None, None, None, *flat_grads)


def _unpack(which: tuple[bool, bool, bool, bool], fields: list[Tensor]
            ) -> tuple[Tensor | None, Tensor | None, Tensor | float, Tensor | float]:
    it = iter(fields)
    u, v, dfx, dfy = (next(it) if on else None for on in which)
    return u, v, (1.0 if dfx is None else dfx), (1.0 if dfy is None else dfy)


def global_pde(f: Tensor, which: tuple[bool, bool, bool, bool], steps: int, dt: float,
               dx: int, dy: int, coefficients: Sequence[tuple[Tensor, ...]],
               bn_conf: Sequence[tuple[float, float]]) -> Tensor:
    """H_K of the Global layer from f and the learned coefficients' conv outputs.

    ``which`` says which of (u, v, Dx, Dy) are learned (the others: velocity 0,
    diffusivity 1); ``coefficients`` holds, for each learned one in that order, (conv
    output y, BN weight, BN bias, running mean, running var) and ``bn_conf`` its
    (momentum, eps). Each coefficient is ReLU(BN(y)), BN in training mode (running
    statistics updated here, once)."""
    flat = [t for c in coefficients for t in c]
    return _GlobalPDE.apply(f, which, (steps, dt, dx, dy), tuple(bn_conf), *flat)
