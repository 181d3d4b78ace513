"""Fused and memory-saving operations behind the families' layers (torch only).

Each op is a ``torch.autograd.Function`` whose forward runs the same ATen kernels as the
plain formulation (so outputs match it) and whose backward recomputes what is cheap to
recompute instead of keeping it alive between forward and backward:

  batchnorm       PyTorch's training-mode batch norm, split so a Function can own it
                  (running statistics updated exactly once, by the native kernel)
  quadratic       ``ours``: BN + product (default) and the whole layer (``memory=save``)
  multiplicative  the QL block's BN1 + product
  pool            max-pooling that keeps no int64 indices for backward
  pde             the Global layer's coefficients and PDE steps
  dirac           the Dirac conv, without a rebuilt weight kept for backward

All of them are used only when autograd records (training with gradients); inference,
``torch.no_grad`` and eval mode run the plain modules. None supports double backward: each
raises a clear error with ``create_graph=True``; inside ``with autobuild.ops.plain_ops():``
every layer runs through plain autograd instead.
"""

from autobuild.ops.common import plain_ops

__all__ = ["plain_ops"]
