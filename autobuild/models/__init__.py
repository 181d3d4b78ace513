"""Baselines by name: every torchvision classification model, the CIFAR networks of the
papers (``cifar_resnet*``, ``cifar_vgg*``), the DiracNets (``*diracnet*``), QuadraLib's zoo
(``q*``, ``quadralib_*``), the SSD detectors (their backbone is what gets converted) and
``timm:<name>`` when timm is installed."""

from __future__ import annotations

from autobuild.models.baseline import MODEL_ARGS, ModelArgs, check_model_args, resolve_baseline
from autobuild.models.registry import (
    ModelEntry,
    build_model,
    get_model_entry,
    list_models,
    load_weights,
    register_model,
    set_builtin_loader,
)

__all__ = [
    "MODEL_ARGS",
    "ModelArgs",
    "ModelEntry",
    "build_model",
    "check_model_args",
    "get_model_entry",
    "list_models",
    "load_weights",
    "register_model",
    "resolve_baseline",
]


def _load_builtin_models() -> None:
    from autobuild.models import (  # noqa: F401  (they register)
        cifar,
        darts,
        diracnets,
        qlnet,
        quadralib,
        torchvision_models,
        transformers,
    )


set_builtin_loader(_load_builtin_models)
