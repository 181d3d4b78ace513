"""torchvision classification models by their torchvision name, and two SSD detectors."""

from __future__ import annotations

import os
import sys
from typing import Any

from torch import nn

from autobuild.errors import AutobuildError, brief
from autobuild.models.registry import (
    fetch_weights,
    load_weights,
    read_state_dict,
    register_model,
)

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


_CLASS_HEAD = "head.classification_head."


def _load_detector(model: nn.Module, state: dict[str, Any], source: str) -> None:
    """A whole detector's state dict. Weights for another number of classes (COCO's 91 on
    a VOC-format set of 3) load all but the class-head tensors sized by the class count,
    which keep their initialisation (fine-tuning). Any other mismatch is an error."""
    own = model.state_dict()
    other = {k for k, v in state.items() if k.startswith(_CLASS_HEAD) and k in own
             and tuple(v.shape) != tuple(own[k].shape)}
    if not other:
        model.load_state_dict(state)
        return
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in state.items() if k not in other}, strict=False)
    if set(missing) != other or unexpected:
        model.load_state_dict(state)  # raises, naming the first mismatch
    print(f"autobuild: note: {source} is for another number of classes: the {len(other)} "
          "class-head tensors sized by it keep their initialisation, everything else is "
          "loaded (fine-tuning)", file=sys.stderr)


def _detector_weights(name: str):
    """``--weights`` of a detector: a file holding the whole detector's state dict or just
    its backbone's, torchvision weights of the detector (e.g. COCO_V1, 91 classes), or
    torchvision weights of its backbone (ssd300_vgg16: VGG16's IMAGENET1K_FEATURES, as
    torchvision's SSD300 and QuadraLib's VGG-SSD start from)."""

    def load(model: nn.Module, weights: str) -> None:
        import torchvision

        if os.path.exists(weights):
            try:
                state = read_state_dict(weights)
                if any(k.startswith("backbone.") for k in state):
                    _load_detector(model, state, weights)
                else:  # a backbone's own state dict
                    model.backbone.load_state_dict(state)
            except Exception as exc:  # corrupt file or another architecture
                raise AutobuildError(f"cannot load weights {weights!r} into {name} (a detector "
                                     "or backbone state dict): "
                                     f"{brief(exc)}") from exc
            return
        own = torchvision.models.get_model_weights(name)
        if weights in own.__members__ or weights == "DEFAULT":
            w = own[weights] if weights != "DEFAULT" else own.DEFAULT
            state = fetch_weights(lambda: w.get_state_dict(progress=False), str(w))
            _load_detector(model, state, f"{name} {weights}")
            return
        if os.sep in weights or weights.endswith((".pth", ".pt", ".safetensors")):
            load_weights(model, weights, name)
            return
        if name != "ssd300_vgg16":
            raise AutobuildError(
                f"{name} has no torchvision weights named {weights!r} (valid: "
                f"{', '.join(own.__members__)}); its backbone is MobileNetV3 with the reduced "
                "tail torchvision trains SSDlite with from scratch, which ImageNet weights do "
                "not fit: give a backbone weights file instead")
        from torchvision.models.detection.ssd import _vgg_extractor

        vgg = torchvision.models.VGG16_Weights
        if weights not in vgg.__members__:
            raise AutobuildError(f"{name} has no weights named {weights!r}; valid: "
                                 f"{', '.join([*own.__members__, *vgg.__members__])} (VGG16's "
                                 "for the backbone), or a weights file")
        backbone = fetch_weights(
            lambda: torchvision.models.vgg16(weights=vgg[weights], progress=False),
            f"VGG16 {weights}")
        # torchvision's own SSD300 conversion of VGG16 (the builder with weights_backbone).
        model.backbone.load_state_dict(_vgg_extractor(backbone, False, 5).state_dict())

    return load


def _register() -> None:
    import torchvision

    for name in torchvision.models.list_models(module=torchvision.models):
        register_model(name, _classifier(name), input_size=_INPUT_SIZES.get(name, (3, 224, 224)),
                       num_classes=1000, source="torchvision",
                       description=f"torchvision.models.{name}")
    for name, (size, desc) in _DETECTORS.items():
        register_model(name, _detector(name), input_size=size, num_classes=91,
                       source="detection", trace_root="backbone", description=desc,
                       weights_loader=_detector_weights(name))


_register()
