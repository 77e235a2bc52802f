"""Inputs are standardized with the training split's statistics; a feature constant there is
only centered, so a rare value elsewhere stays on its own scale."""
import pytest
import torch

from catapult_kernels.train import tasks


def test_a_feature_constant_in_training_is_only_centered():
    train = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    val = torch.tensor([[2.0, 16.0]])
    z_train, z_val = tasks.standardize(train, val)
    std = torch.tensor([1.0, 3.0]).std()  # feature 0: train values 1 and 3
    assert torch.equal(z_train, torch.tensor([[-1 / std, 0.0], [1 / std, 0.0]]))
    assert torch.equal(z_val, torch.tensor([[0.0, 11.0]]))  # 16 - 5, not 11 / a tiny floor


def test_digits_validation_inputs_stay_within_the_gray_levels():
    """500 training digits leave some border pixels constant that are not in validation: with a
    floor of 1e-3 on the std those validation pixels reached 1000-2000 (seeds 0 and 2)."""
    pytest.importorskip("sklearn")
    for seed in (0, 2):
        data = tasks.digits(500, torch.Generator().manual_seed(seed))
        assert data.x_val.abs().max() < 100
        assert data.x_train.mean(0).abs().max() < 1e-5
