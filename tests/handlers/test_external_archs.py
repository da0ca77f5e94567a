"""torchvision and timm CNNs by name: stages derived from the model, the pooling+linear head verified, non-CNNs
and unknown names refused in one line. Random weights only (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from conceptlens.handlers import zoo
from conceptlens.handlers.errors import InvalidInput, UnknownName
from conceptlens.handlers.hooks import capture


def test_timm_resnet_stages_come_from_feature_info_and_its_head_is_exact():
    spec = zoo.arch_spec("timm:resnet18")
    assert spec.stages == ("act1", "layer1", "layer2", "layer3", "layer4")
    assert spec.default_layers == ("layer3", "layer4") and spec.last_layer == "layer4" and spec.head == "fc"


def test_convnext_norm_after_pooling_is_not_taken_for_a_linear_head():
    spec = zoo.arch_spec("timm:convnext_atto")
    assert spec.default_layers == ("stages.2", "stages.3")
    assert spec.head == ""  # LayerNorm between pooling and fc: the hidden-layer path applies


def test_efficientnet_conv_head_becomes_the_exact_last_layer():
    spec = zoo.arch_spec("timm:efficientnet_b0")
    assert spec.stages[-2:] == ("blocks.6", "bn2") and spec.head == "classifier"
    model = zoo.build_model("timm:efficientnet_b0", ["a", "b", "c"], input_size=64).eval()
    with torch.no_grad(), capture(model, ["bn2"]) as acts:
        logits = model(torch.rand(2, 3, 64, 64))
    head = model.net.classifier
    torch.testing.assert_close(logits, head(acts["bn2"].mean(dim=(2, 3))), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "stages"), [
    ("torchvision:resnet18", ("relu", "layer1", "layer2", "layer3", "layer4")),
    ("shufflenet_v2_x0_5", ("conv1", "stage2", "stage3", "conv5")),
])
def test_torchvision_stages_are_derived_from_a_probe_pass(name, stages):
    spec = zoo.arch_spec(name)
    assert spec.stages == stages and spec.default_layers == stages[-2:]


def test_any_module_name_can_be_traced():
    model = zoo.build_model("timm:resnet18", ["a", "b"], input_size=32)
    assert zoo.resolve_layer(model, "layer2.1.conv1") is model.net.layer2[1].conv1


@pytest.mark.parametrize(("name", "error", "words"), [
    ("timm:vit_tiny_patch16_224", InvalidInput, "not a CNN"),
    ("vit_b_16", InvalidInput, "vision transformer"),
    ("timm:resnet5", UnknownName, "resnet50"),
    ("torchvision:resnet1", UnknownName, "resnet18"),
    ("nonsense_net", UnknownName, "timm:<name>"),
])
def test_unsupported_or_unknown_names_are_refused_in_one_line(name, error, words):
    with pytest.raises(error) as info:
        zoo.arch_spec(name)
    assert words in str(info.value) and "\n" not in str(info.value)
