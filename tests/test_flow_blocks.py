"""The coupling block is a bijection and reports its true log-determinant."""
from __future__ import annotations

import pytest
import torch

from competition.zoo.components.flow_blocks import (
    AllInOneCoupling,
    CrossScaleCoupling,
    CrossScaleFlow,
    SequenceFlow,
    conv_subnet,
    fc_subnet,
    gaussian_log_likelihood,
)


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter away from its init so the test is not of a near-identity map."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _conv_flow(channels: int, soft: bool, affine_type: str = "SOFTPLUS") -> SequenceFlow:
    blocks = [AllInOneCoupling(channels, conv_subnet(3 if i % 2 == 0 else 1), affine_clamping=2.0,
                               permute_soft=soft, global_affine_type=affine_type, seed=i) for i in range(3)]
    flow = SequenceFlow(blocks).double()
    _randomise(flow)
    return flow


def _autograd_log_det(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det| of the Jacobian of fn at one sample x (batch of 1), by autograd."""
    def flat(v: torch.Tensor) -> torch.Tensor:
        return fn(v.view_as(x)).flatten()
    jac = torch.autograd.functional.jacobian(flat, x.flatten())
    return torch.linalg.slogdet(jac)[1]


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("affine_type", ["SOFTPLUS", "SIGMOID", "EXP"])
def test_conv_flow_inverts_and_log_det_matches_autograd(soft, affine_type):
    torch.manual_seed(0)
    flow = _conv_flow(5, soft, affine_type)
    x = torch.randn(3, 5, 3, 2, dtype=torch.float64)
    z, log_det = flow(x)
    assert z.shape == x.shape
    x_back, inv_log_det = flow.inverse(z)
    # A hard permutation is exact; a random rotation stored in float32 is orthogonal to ~1e-7.
    tol = 1e-5 if soft else 1e-9
    torch.testing.assert_close(x_back, x, atol=tol, rtol=tol)
    torch.testing.assert_close(inv_log_det, -log_det, atol=tol, rtol=tol)
    for i in range(x.shape[0]):
        expected = _autograd_log_det(lambda v: flow(v)[0], x[i:i + 1])
        torch.testing.assert_close(log_det[i], expected, atol=tol, rtol=tol)
    # The map is not the identity: the test would pass trivially otherwise.
    assert (z - x).abs().max() > 0.1


def test_conditional_vector_flow_inverts_and_log_det_matches_autograd():
    torch.manual_seed(1)
    blocks = [AllInOneCoupling(6, fc_subnet(2.0), cond_channels=4, affine_clamping=1.9, permute_soft=True, seed=i)
              for i in range(4)]
    flow = SequenceFlow(blocks).double()
    _randomise(flow, seed=1)
    x = torch.randn(4, 6, dtype=torch.float64)
    cond = torch.randn(4, 4, dtype=torch.float64)
    z, log_det = flow(x, cond)
    x_back, _ = flow.inverse(z, cond)
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=1e-5)  # soft (float32 rotation)
    for i in range(4):
        expected = _autograd_log_det(lambda v, c=cond[i:i + 1]: flow(v, c)[0], x[i:i + 1])
        torch.testing.assert_close(log_det[i], expected, atol=1e-5, rtol=1e-5)
    # The condition changes the output: it is really used.
    z_other, _ = flow(x, cond + 1.0)
    assert (z_other - z).abs().max() > 1e-3
    with pytest.raises(ValueError, match="condition"):
        flow(x)


def test_log_scale_is_soft_clamped():
    block = AllInOneCoupling(4, fc_subnet(1.0), affine_clamping=0.5, global_affine_type="EXP", seed=0).double()
    with torch.no_grad():
        for p in block.subnet.parameters():
            p.mul_(0).add_(50.0)  # huge subnet output
    x = torch.randn(8, 4, dtype=torch.float64)
    _, log_det = block(x)
    # |log scale| <= clamp per coupled channel (2 of them); the global affine starts at scale 1.
    assert log_det.abs().max() <= 0.5 * 2 + 1e-9


def test_permutation_is_a_saved_buffer():
    a = AllInOneCoupling(6, fc_subnet(), seed=3)
    b = AllInOneCoupling(6, fc_subnet(), seed=4)
    assert not torch.equal(a.w_perm, b.w_perm)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.w_perm, a.w_perm)
    x = torch.randn(2, 6)
    torch.testing.assert_close(a(x)[0], b(x)[0])


def test_gaussian_log_likelihood_matches_torch_distribution():
    z = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    log_det = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1) + log_det
    torch.testing.assert_close(gaussian_log_likelihood(z, log_det), expected)


def _cross_scale_flow(channels: int, hidden: int = 6) -> CrossScaleFlow:
    blocks = [CrossScaleCoupling(channels, n_scales=3, hidden_channels=hidden, kernel_size=3 if k < 1 else 5,
                                 clamp=3.0, seed=k) for k in range(2)]
    flow = CrossScaleFlow(blocks).double()
    _randomise(flow, seed=2)  # also moves the gammas off 0, where every block is the identity
    return flow


def _scales(batch: int, channels: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, s, s, generator=g, dtype=torch.float64) for s in (4, 2, 1)]


def test_cross_scale_flow_inverts_and_log_det_matches_autograd():
    flow = _cross_scale_flow(5)
    xs = _scales(2, 5)
    zs, log_det = flow(xs)
    assert [z.shape for z in zs] == [x.shape for x in xs]
    xs_back, inv_log_det = flow.inverse(zs)
    for x, x_back in zip(xs, xs_back):
        torch.testing.assert_close(x_back, x, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(inv_log_det, -log_det)
    sizes = [x[0].numel() for x in xs]

    def joint(v: torch.Tensor) -> torch.Tensor:  # all three scales of one sample as one vector
        parts = [p.view(1, *x.shape[1:]) for p, x in zip(torch.split(v, sizes), xs)]
        return torch.cat([z.flatten() for z in flow(parts)[0]])
    for i in range(2):
        sample = torch.cat([x[i].flatten() for x in xs])
        jac = torch.autograd.functional.jacobian(joint, sample)
        torch.testing.assert_close(log_det[i], torch.linalg.slogdet(jac)[1], atol=1e-9, rtol=1e-9)
    assert max((z - x).abs().max() for z, x in zip(zs, xs)) > 0.1


def test_cross_scale_coupling_mixes_scales_and_starts_as_a_permutation():
    flow = _cross_scale_flow(4)
    xs = _scales(1, 4, seed=1)
    zs, _ = flow(xs)
    # Changing only the coarsest scale's input changes the finest scale's output: scales talk.
    moved = [xs[0], xs[1], xs[2] + 1.0]
    assert (flow(moved)[0][0] - zs[0]).abs().max() > 1e-6
    # Fresh blocks (gamma = 0) only permute channels: log-det 0, norms kept.
    fresh = CrossScaleCoupling(4, hidden_channels=6, seed=0).double()
    ys, log_det = fresh(xs)
    assert torch.equal(log_det, torch.zeros(1, dtype=torch.float64))
    for x, y in zip(xs, ys):
        torch.testing.assert_close(y.sort(1).values, x.sort(1).values)


def test_cross_scale_log_scale_is_soft_clamped():
    block = CrossScaleCoupling(4, hidden_channels=6, clamp=0.5, seed=0).double()
    with torch.no_grad():
        for p in block.parameters():
            p.fill_(50.0)  # huge subnet outputs
    xs = _scales(3, 4, seed=2)
    _, log_det = block(xs)
    dims = sum(x[0].numel() for x in xs)  # every number is scaled once per block
    assert log_det.abs().max() <= 0.5 * dims + 1e-9
