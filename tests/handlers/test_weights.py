"""Outside weights: safetensors or weights-only torch files, prefixes stripped, every mismatch named."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from conceptlens.handlers.errors import InvalidInput
from conceptlens.handlers.weights import fit_state_dict, read_state_dict


def _net(classes: int = 3) -> torch.nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=classes)


def test_checkpoint_dict_with_ddp_prefix_loads_exactly(tmp_path):
    source = _net()
    torch.save({"epoch": 7, "state_dict": {"module." + k: v for k, v in source.state_dict().items()}},
               tmp_path / "ckpt.pt")
    target = _net()
    assert fit_state_dict(target, read_state_dict(tmp_path / "ckpt.pt"), head="fc") == []
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_safetensors_with_model_prefix(tmp_path):
    source = _net()
    save_file({"model." + k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    target = _net()
    fit_state_dict(target, read_state_dict(tmp_path / "w.safetensors"), head="fc")
    assert torch.equal(target.fc.weight, source.fc.weight)


class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/never-created-by-conceptlens-weights-test", "w"))


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    torch.save({"net": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(InvalidInput, match=r"not a plain state dict: it needs the Python object (io|builtins)\.open"):
        read_state_dict(tmp_path / "evil.pt")
    import os

    assert not os.path.exists("/tmp/never-created-by-conceptlens-weights-test")


def test_a_list_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(InvalidInput, match="holds a list, not a state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_another_architecture_names_missing_keys():
    with pytest.raises(InvalidInput, match=r"do not fit resnet34: 96 missing \(layer1\.2\.bn1\.bias"):
        fit_state_dict(torchvision.models.resnet34(weights=None, num_classes=3), _net().state_dict(), head="fc",
                       arch="resnet34")


def test_wrong_class_count_names_both_counts_unless_the_head_is_replaced():
    state = _net(1000).state_dict()
    with pytest.raises(InvalidInput, match="has 1000 outputs but 3 classes were given"):
        fit_state_dict(_net(3), state, head="fc")
    target = _net(3)
    assert fit_state_dict(target, state, head="fc", replace_head=True) == ["fc.bias", "fc.weight"]
    assert torch.equal(target.conv1.weight, state["conv1.weight"])
