"""Rectified-flow maths against diffusers' training_utils as the independent oracle."""
import math

import pytest
import torch
from scipy import stats

from sd3_lora_trainer.trainer import flow

diffusers_tu = pytest.importorskip("diffusers.training_utils")


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("scheme,kw", [
    ("logit_normal", dict(logit_mean=0.0, logit_std=1.0)),
    ("logit_normal", dict(logit_mean=0.5, logit_std=0.7)),
    ("mode", dict(mode_scale=1.29)),
    ("uniform", {}),
    ("sigma_sqrt", {}),
])
def test_timestep_density_matches_diffusers(scheme, kw):
    n = 20000
    ours = flow.sample_u(scheme, n, generator=torch.Generator().manual_seed(1), **kw)
    ref = diffusers_tu.compute_density_for_timestep_sampling(
        scheme, n, logit_mean=kw.get("logit_mean"), logit_std=kw.get("logit_std"),
        mode_scale=kw.get("mode_scale"), generator=torch.Generator().manual_seed(2))
    assert ours.shape == (n,)
    assert ((ours >= 0) & (ours <= 1)).all()
    assert stats.ks_2samp(ours.numpy(), ref.numpy()).pvalue > 0.01


def test_density_detects_a_wrong_scheme():
    # The KS test used above must be able to fail: logit_normal vs uniform differ clearly.
    a = flow.sample_u("logit_normal", 20000, generator=torch.Generator().manual_seed(1))
    b = flow.sample_u("uniform", 20000, generator=torch.Generator().manual_seed(2))
    assert stats.ks_2samp(a.numpy(), b.numpy()).pvalue < 1e-6


@pytest.mark.parametrize("scheme", flow.WEIGHTING_SCHEMES)
def test_loss_weights_equal_diffusers(scheme):
    sigmas = torch.linspace(0.001, 1.0, 1000)
    ours = flow.loss_weighting(scheme, sigmas)
    ref = diffusers_tu.compute_loss_weighting_for_sd3(scheme, sigmas)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_shift_matches_formula_and_is_identity_at_one():
    u = torch.rand(100)
    torch.testing.assert_close(flow.shift_sigmas(u, 1.0), u)
    s = 3.0
    torch.testing.assert_close(flow.shift_sigmas(u, s), s * u / (1 + (s - 1) * u))
    assert (flow.shift_sigmas(u, 3.0) >= u).all()  # shift > 1 moves toward noise


def test_sample_sigmas_are_quantised_timesteps():
    sig = flow.sample_sigmas("uniform", 5000, training_shift=3.0, generator=torch.Generator().manual_seed(0))
    t = sig * 1000
    torch.testing.assert_close(t, t.round())
    assert sig.min() >= 0.001 and sig.max() <= 1.0
    # shift 3 puts the median sigma well above 0.5
    assert sig.median() > 0.65


def test_add_noise_endpoints():
    x0, eps = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(flow.add_noise(x0, eps, torch.tensor([0.0, 1.0]))[0], x0[0])
    torch.testing.assert_close(flow.add_noise(x0, eps, torch.tensor([0.0, 1.0]))[1], eps[1])


def test_flow_loss_is_x0_space_and_sigma_squared_weighted_velocity():
    x0, eps = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    sig = torch.tensor([0.2, 0.5, 0.9])
    xs = flow.add_noise(x0, eps, sig)
    true_v = eps - x0
    assert flow.flow_loss(true_v, xs, x0, sig).item() < 1e-10  # the true velocity has zero loss
    v = torch.randn_like(x0)
    # x0-space error equals σ² times the velocity error, per sample
    expected = ((sig.view(-1, 1, 1, 1) ** 2) * (v - true_v) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(flow.flow_loss(v, xs, x0, sig), expected, rtol=1e-5, atol=1e-6)
    w = 2 / (math.pi * (1 - 2 * sig + 2 * sig ** 2))
    expected_cos = (w.view(-1, 1, 1, 1) * (sig.view(-1, 1, 1, 1) ** 2) * (v - true_v) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(flow.flow_loss(v, xs, x0, sig, "cosmap"), expected_cos, rtol=1e-5, atol=1e-6)


def test_unknown_scheme_lists_accepted_names():
    with pytest.raises(ValueError, match="logit_normal"):
        flow.sample_u("lognorm", 4)
