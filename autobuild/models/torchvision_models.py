"""torchvision classification models by their torchvision name, and two SSD detectors."""

from __future__ import annotations

from typing import Any

from torch import nn

from autobuild.models.registry import register_model

# torchvision builders that need a non-default input resolution to run.
_INPUT_SIZES = {"inception_v3": (3, 299, 299)}
_DETECTORS = {
    # name: (input size, description)
    "ssd300_vgg16": ((3, 300, 300), "SSD300 with a VGG-16 backbone (the backbone is converted)"),
    "ssdlite320_mobilenet_v3_large": (
        (3, 320, 320), "SSDlite320 with a MobileNetV3-Large backbone (the backbone is converted)"),
}


def _classifier(name: str):
    def build(num_classes: int = 1000, **kw: Any) -> nn.Module:
        import torchvision

        kw.setdefault("weights", None)
        if name in ("googlenet", "inception_v3"):
            kw.setdefault("aux_logits", False)
            kw.setdefault("init_weights", True)
        return torchvision.models.get_model(name, num_classes=num_classes, **kw)

    return build


def _detector(name: str):
    def build(num_classes: int = 91, **kw: Any) -> nn.Module:
        import torchvision

        kw.setdefault("weights", None)
        kw.setdefault("weights_backbone", None)
        return torchvision.models.get_model(name, num_classes=num_classes, **kw)

    return build


def _register() -> None:
    import torchvision

    for name in torchvision.models.list_models(module=torchvision.models):
        register_model(name, _classifier(name), input_size=_INPUT_SIZES.get(name, (3, 224, 224)),
                       num_classes=1000, source="torchvision",
                       description=f"torchvision.models.{name}")
    for name, (size, desc) in _DETECTORS.items():
        register_model(name, _detector(name), input_size=size, num_classes=91,
                       source="detection", trace_root="backbone", description=desc)


_register()
