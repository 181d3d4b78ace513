"""Saved models: plan + safetensors, exact round trips, nothing overwritten silently."""

from __future__ import annotations

import os

import pytest
import torch

import autobuild
from autobuild.errors import AutobuildError


def _model():
    torch.manual_seed(0)
    return autobuild.convert("cifar_resnet20", "quadratic", options={"type": "fan"})


def test_save_load_bit_exact(tmp_path) -> None:
    m = _model()
    out = str(tmp_path / "run")
    autobuild.save(m, out)
    assert sorted(os.listdir(out)) == ["plan.yaml", "weights.safetensors"]
    loaded = autobuild.load(out)
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(m(x), loaded(x))


def test_refuses_non_empty_dir_unless_forced(tmp_path) -> None:
    m = _model()
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(AutobuildError, match="not empty"):
        autobuild.save(m, str(tmp_path))
    assert (tmp_path / "keep.txt").read_text() == "mine"  # refused: nothing touched
    # ...and --force too, for a directory holding nothing autobuild wrote (it would delete a
    # user's files given as --out by mistake)
    with pytest.raises(AutobuildError, match=r"holds nothing autobuild wrote \(keep.txt\)"):
        autobuild.save(m, str(tmp_path), force=True)
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]
    # ...and a saved model beside which the user keeps files of their own (they were
    # deleted with it, silently)
    (tmp_path / "plan.yaml").write_text("old")
    (tmp_path / "notes").mkdir()
    with pytest.raises(AutobuildError, match=r"also holds what autobuild did not write "
                                             r"\(keep.txt, notes\): --force replaces the "
                                             r"directory whole and would delete them"):
        autobuild.save(m, str(tmp_path), force=True)
    assert sorted(os.listdir(tmp_path)) == ["keep.txt", "notes", "plan.yaml"]
    # --force replaces a saved model as a whole: no stale file of an older run stays beside
    # the new one (a hidden file is no loss).
    (tmp_path / "keep.txt").unlink()
    (tmp_path / "notes").rmdir()
    (tmp_path / "init.safetensors").write_text("older")
    (tmp_path / ".DS_Store").write_text("")
    autobuild.save(m, str(tmp_path), force=True)
    assert sorted(os.listdir(tmp_path)) == ["plan.yaml", "weights.safetensors"]
    # ...but never a training run of it: --force replaces an output of the same kind
    (tmp_path / "checkpoint.pt").write_text("hours of training")
    with pytest.raises(AutobuildError, match=r"is a training run, and this writes a saved "
                                             r"model: --force replaces an output with one "
                                             r"of its kind only"):
        autobuild.save(m, str(tmp_path), force=True)
    assert (tmp_path / "checkpoint.pt").read_text() == "hours of training"


def test_unplanned_model_cannot_be_saved(tmp_path) -> None:
    with pytest.raises(AutobuildError, match="no plan"):
        autobuild.save(torch.nn.Linear(2, 2), str(tmp_path / "x"))


def test_corrupt_and_mismatched_weights(tmp_path) -> None:
    out = tmp_path / "run"
    autobuild.save(_model(), str(out))
    weights = out / "weights.safetensors"
    weights.write_bytes(b"garbage" * 10)
    with pytest.raises(AutobuildError, match="corrupt weights"):
        autobuild.load(str(out))
    other = autobuild.convert("cifar_resnet20", "quadratic", options={"type": "t4"})
    autobuild.save(other, str(tmp_path / "other"))
    os.replace(tmp_path / "other" / "weights.safetensors", weights)
    with pytest.raises(AutobuildError, match="do not match the plan"):
        autobuild.load(str(out))
    with pytest.raises(AutobuildError, match="not a saved model"):
        autobuild.load(str(tmp_path / "missing"))


def test_plan_survives_deepcopy_and_state_dict_round_trip() -> None:
    import copy

    m = _model()
    clone = copy.deepcopy(m)
    assert autobuild.plan_of(clone).to_dict() == autobuild.plan_of(m).to_dict()
    fresh = autobuild.build_plan(autobuild.plan_of(m))
    fresh.load_state_dict(m.state_dict())


def test_a_graph_edited_model_keeps_its_plan_and_class_when_copied(tmp_path) -> None:
    """A conversion that edits the graph makes the model a GraphModule, whose deepcopy
    rebuilds it: the copy had no plan and was called GraphModule (an EMA copy of a DiracNet
    could not be saved, scored or masked)."""
    import copy

    from autobuild.train import TrainConfig, train

    m = autobuild.convert("cifar_resnet20", "dirac", num_classes=4, input_size=(3, 8, 8))
    clone = copy.deepcopy(copy.deepcopy(m))
    assert type(clone).__name__ == type(m).__name__ == "CifarResNet"
    assert autobuild.plan_of(clone).to_dict() == autobuild.plan_of(m).to_dict()
    assert autobuild.plan_of(clone) is not autobuild.plan_of(m)  # a copy, not shared
    result = train(m, "synthetic:size=3x8x8,classes=4,train=8,val=4",
                   TrainConfig(epochs=1, batch_size=4, device="cpu", workers=0, ema=0.5))
    assert autobuild.plan_of(result.model) is not None  # the EMA copy
    autobuild.save(result.model, str(tmp_path / "ema"))
    autobuild.load(str(tmp_path / "ema"))


def test_a_graph_edited_model_keeps_its_plan_and_class_through_pickling() -> None:
    """torch.fx rebuilds an unpickled GraphModule from its code with a new ``meta``: it was
    called GraphModule and its next deepcopy (the EMA copy) dropped the plan."""
    import copy
    import io
    import pickle

    m = autobuild.convert("cifar_resnet20", "dirac", num_classes=4, input_size=(3, 8, 8))
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    for loaded in (pickle.loads(pickle.dumps(m)), torch.load(buffer, weights_only=False)):
        clone = copy.deepcopy(pickle.loads(pickle.dumps(copy.deepcopy(loaded))))
        assert type(clone).__name__ == "CifarResNet"
        assert autobuild.plan_of(clone).to_dict() == autobuild.plan_of(m).to_dict()
        x = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(clone.eval()(x), m.eval()(x), rtol=0, atol=0)


def test_a_wrapped_model_is_saved_as_the_module_it_wraps(tmp_path) -> None:
    """save() of a torch.compile'd (or DDP) model wrote its keys with the wrapper's prefix
    (``_orig_mod.``): a directory load() could never read."""
    m = _model().eval()
    autobuild.save(torch.compile(m), str(tmp_path / "compiled"))
    autobuild.save(torch.nn.DataParallel(m), str(tmp_path / "parallel"))
    x = torch.randn(1, 3, 32, 32)
    for name in ("compiled", "parallel"):
        loaded = autobuild.load(str(tmp_path / name)).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), m(x)), name


def test_channels_last_model_saves_and_loads(tmp_path) -> None:
    m = _model().to(memory_format=torch.channels_last)
    autobuild.save(m, str(tmp_path / "run"))
    loaded = autobuild.load(str(tmp_path / "run"))
    x = torch.randn(1, 3, 32, 32)
    m.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(m(x), loaded(x), atol=1e-6)


def test_read_weights_gives_aligned_tensors(tmp_path) -> None:
    """safetensors 0.8 hands out tensors at the file's byte offsets, and MKL's matmul
    rounds differently at another alignment: a loaded model (weights assigned, not copied)
    computed its saved self only to ~1e-7 (timm MobileNets' classifier)."""
    from safetensors.torch import save_file

    from autobuild.io import read_weights

    path = str(tmp_path / "w.safetensors")
    save_file({"a": torch.randn(3), "b": torch.randn(5, 5), "c": torch.randn(7)}, path)
    state = read_weights(path)
    assert all(v.data_ptr() % 64 == 0 for v in state.values())


def test_load_keeps_the_plans_baseline_weights_and_refuses_a_needless_baseline(tmp_path) -> None:
    """load() rebuilt the plan without its ``weights`` (the file the baseline was converted
    from: what `inspect` measures the output difference against), and ignored a baseline=
    given for a plan of a registered model."""
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save(autobuild.models.build_model("cifar_resnet20").state_dict(), weights)
    m = autobuild.convert("cifar_resnet20", "quadratic", weights=str(weights), init="preserve")
    autobuild.save(m, str(tmp_path / "m"))
    loaded = autobuild.load(str(tmp_path / "m"))
    assert autobuild.plan_of(loaded) == autobuild.plan_of(m)
    assert autobuild.plan_of(loaded).weights == str(weights)
    with pytest.raises(AutobuildError, match="registered model cifar_resnet20.*baseline= is "
                                             "for a plan of a custom model"):
        autobuild.load(str(tmp_path / "m"), baseline=torch.nn.Linear(2, 2))
    # a model registered in another process: how to register it, not "it builds itself"
    plan = tmp_path / "m" / "plan.yaml"
    plan.write_text(plan.read_text().replace("model: cifar_resnet20", "model: my_net"))
    with pytest.raises(AutobuildError, match="unknown model 'my_net'.*register_model"):
        autobuild.load(str(tmp_path / "m"), baseline=torch.nn.Linear(2, 2))
