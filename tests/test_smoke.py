import torch

from conceptlens.handlers import zoo


def test_small_cnn_builds():
    model = zoo.build_model("small_cnn", [f"c{i}" for i in range(8)])
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 8)
