"""ArcFlow closed-form steps: pure maths, no ComfyUI."""

import math

import pytest
import torch

from glance_core import arcflow


def _policy(k=16, c=3, hw=(4, 5), seed=0, lam_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(2, k, c, *hw, generator=g, dtype=torch.float64)
    logits = torch.randn(2, k, 1, *hw, generator=g, dtype=torch.float64)
    lam = lam_scale * torch.randn(2, k - 1, 1, *hw, generator=g, dtype=torch.float64)
    return means, logits, lam


def _quadrature(means, logits, lam, sigma_a, sigma_b, elapsed, n=20001):
    """Simpson's rule in float64 of ∫ u(σ) dσ over [σ_b, σ_a]."""
    pi = torch.softmax(logits, 1)
    lam_full = torch.cat([torch.zeros_like(lam[:, :1]), lam], 1)
    s = torch.linspace(0.0, sigma_a - sigma_b, n, dtype=torch.float64)  # time since σ_a
    w = torch.ones(n, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4, 2
    w *= (sigma_a - sigma_b) / (n - 1) / 3
    total = 0
    for si, wi in zip(s, w):
        total = total + wi * (pi * torch.exp(lam_full * (elapsed + si)) * means).sum(1)
    return total


@pytest.mark.parametrize("sigma_a,sigma_b,elapsed", [(1.0, 0.7619, 0.0), (0.7619, 0.0, 0.0), (0.9, 0.6, 0.1)])
def test_closed_form_matches_quadrature(sigma_a, sigma_b, elapsed):
    means, logits, lam = _policy()
    exact = _quadrature(means, logits, lam, sigma_a, sigma_b, elapsed, n=2001)
    d = arcflow.displacement(means, logits, lam, sigma_a, sigma_b, elapsed)
    assert d.dtype == torch.float32
    assert torch.allclose(d.double(), exact, rtol=2e-5, atol=2e-5)


def test_tiny_and_large_lambda():
    means, logits, _ = _policy(k=4)
    for scale in (1e-9, 1e-7, 1e-6, 3e-5, 10.0):
        lam = torch.full((2, 3, 1, 4, 5), scale, dtype=torch.float64)
        lam[:, 1] = -scale
        exact = _quadrature(means, logits, lam, 1.0, 0.5, 0.0, n=2001)
        d = arcflow.displacement(means, logits, lam, 1.0, 0.5)
        assert torch.isfinite(d).all()
        assert torch.allclose(d.double(), exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max())), scale


def test_phi_is_continuous_with_finite_gradients():
    z = torch.tensor([-1e-3, -1e-4, -1e-5, 0.0, 1e-8, 1e-5, 1e-4, 1e-3, 2.0], requires_grad=True)
    p = arcflow.phi(z)
    ref = torch.tensor([math.expm1(v) / v if v else 1.0 for v in z.tolist()])
    assert torch.allclose(p, ref, rtol=1e-6)
    p.sum().backward()
    assert torch.isfinite(z.grad).all() and abs(float(z.grad[3]) - 0.5) < 1e-6


def test_k1_without_momentum_is_an_euler_step():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, 1, 4, 3, 3, generator=g)
    d = arcflow.displacement(v, torch.zeros(2, 1, 1, 3, 3), torch.zeros(2, 0, 1, 3, 3), 0.8, 0.3)
    assert torch.equal(d, v[:, 0] * (0.8 - 0.3))


def test_exact_for_a_field_of_this_form():
    """Integrating u(σ) = Σ π m γ^(1−σ) with many tiny Euler steps converges to the closed form."""
    means, logits, lam = _policy(k=3, lam_scale=1.0)
    x0 = torch.zeros(2, 3, 4, 5, dtype=torch.float64)
    x, n = x0.clone(), 20000
    for i in range(n):
        s = 1.0 - (i + 0.5) / n * 0.7  # midpoint rule from σ 1.0 down to 0.3
        x = x - arcflow.velocity(means, logits, lam, 1.0 - s).double() * (0.7 / n)
    d = arcflow.displacement(means, logits, lam, 1.0, 0.3)
    assert torch.allclose(x0 - d.double(), x, atol=1e-5)


def test_mean_velocity_euler_equivalence():
    means, logits, lam = _policy()
    x = torch.randn(2, 3, 4, 5)
    sa, sb = 1.0, 0.7619
    u = arcflow.mean_velocity(means, logits, lam, sa, sb)
    x0_hat = x - sa * u  # what the patched model returns as "denoised"
    euler = x + (x - x0_hat) / sa * (sb - sa)
    assert torch.allclose(euler, x - arcflow.displacement(means, logits, lam, sa, sb), atol=1e-5)


def test_official_schedule():
    assert [round(s, 4) for s in arcflow.schedule(2)] == [1.0, 0.7619, 0.0]
    assert [round(s, 4) for s in arcflow.schedule(4)] == [1.0, 0.9057, 0.7619, 0.5161, 0.0]
    assert [round(s, 4) for s in arcflow.schedule(3)] == [1.0, 0.8649, 0.6154, 0.0]


def test_unpack_tokens_order():
    b, k, c, h, w, p = 1, 2, 3, 2, 2, 2
    # token (i, j) holds values encoding (k, c, ph, pw) in that order
    raw = torch.zeros(b, h * w, k * c * p * p)
    for i in range(h):
        for j in range(w):
            for kk in range(k):
                for cc in range(c):
                    for a in range(p):
                        for bb in range(p):
                            raw[0, i * w + j, ((kk * c + cc) * p + a) * p + bb] = (
                                1000 * kk + 100 * cc + 10 * (i * p + a) + (j * p + bb)
                            )
    out = arcflow.unpack_tokens(raw, k, c, h, w, p)
    for kk in range(k):
        for cc in range(c):
            for y in range(h * p):
                for x in range(w * p):
                    assert out[0, kk, cc, y, x] == 1000 * kk + 100 * cc + 10 * y + x


# --- An analytic flow: a Gaussian mixture, whose velocity is known in closed form ----------------
MU = torch.tensor([[-2.0, 0.5], [1.5, 1.5], [0.5, -2.0]], dtype=torch.float64)
S2 = torch.tensor([0.05, 0.1, 0.02], dtype=torch.float64)  # per-component variances
W = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64)


def gmm_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[ε − x0 | x_σ = x] for x_σ = (1−σ)x0 + σε, x0 ~ GMM: (x − E[x0|x]) / σ."""
    a = 1.0 - sigma
    var = a * a * S2 + sigma * sigma  # [J]
    d = x[:, None, :] - a * MU[None]  # [N, J, 2]
    logp = torch.log(W) - 0.5 * (d**2).sum(-1) / var - torch.log(var)  # 2-D Gaussian log-density (+const)
    r = torch.softmax(logp, dim=1)  # [N, J]
    post = MU[None] + (a * S2 / var)[None, :, None] * d  # E[x0 | x, component]
    x0 = (r[..., None] * post).sum(1)
    return (x - x0) / sigma


def ode(x: torch.Tensor, s0: float, s1: float, n: int = 400) -> torch.Tensor:
    """RK4 from σ = s0 down to s1 (the exact flow, to float64 precision)."""
    h = (s1 - s0) / n
    s = s0
    for _ in range(n):
        k1 = gmm_velocity(x, s)
        k2 = gmm_velocity(x + h / 2 * k1, s + h / 2)
        k3 = gmm_velocity(x + h / 2 * k2, s + h / 2)
        k4 = gmm_velocity(x + h * k3, s + h)
        x, s = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), s + h
    return x


def fit_policy(x: torch.Tensor, s0: float, s1: float, k: int = 4, iters: int = 400):
    """Per sample and dimension, fit the ArcFlow policy to the exact velocity along the exact path in [s0, s1]."""
    grid = [s0 - (s0 - s1) * t for t in torch.linspace(0, 0.999, 24).tolist()]
    xs, vs, x_cur, s_cur = [], [], x, s0
    for s in grid:  # the exact path through the step, and its velocity
        x_cur = ode(x_cur, s_cur, s, n=20) if s != s_cur else x_cur
        s_cur = s
        xs.append(x_cur)
        vs.append(gmm_velocity(x_cur, s))
    v = torch.stack(vs).float()  # [G, N, 2]
    n = x.shape[0]
    means = v[0][:, None, :, None].repeat(1, k, 1, 1).clone().requires_grad_(True)  # [N, K, 2, 1]
    logits = torch.zeros(n, k, 1, 1, requires_grad=True)
    lam = arcflow.init_loggamma_bias(k)[None, :, None, None].repeat(n, 1, 1, 1).clone().requires_grad_(True)
    opt = torch.optim.Adam([means, logits, lam], lr=0.05)
    for _ in range(iters):
        pred = torch.stack([arcflow.velocity(means, logits, lam, s0 - s)[..., 0] for s in grid])
        loss = ((pred - v) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return means.detach(), logits.detach(), lam.detach()


def test_closed_form_steps_beat_euler_on_an_analytic_flow():
    torch.manual_seed(0)
    x1 = torch.randn(64, 2, dtype=torch.float64)
    sig = arcflow.schedule(2)  # [1, 0.7619, 0]
    exact = ode(x1, 1.0, 0.0, n=2000)
    euler = x1.clone()
    for a, b in zip(sig, sig[1:]):
        euler = euler + gmm_velocity(euler, a) * (b - a)
    x = x1.clone()
    for a, b in zip(sig, sig[1:]):  # 2 policy evaluations, each integrated in closed form
        pol = fit_policy(x, a, b if b > 0 else 1e-3)
        x = x - arcflow.displacement(*pol, a, b)[..., 0].double()
    err_arc = float((x - exact).norm(dim=-1).mean())
    err_euler = float((euler - exact).norm(dim=-1).mean())
    print(f"mean endpoint error: arcflow {err_arc:.4f}, euler {err_euler:.4f}")
    assert err_arc < 0.1 * err_euler, (err_arc, err_euler)
    assert err_arc < 0.05, err_arc


def test_power_ema_is_the_running_mean_at_gamma_0_and_weighs_late_values_at_gamma_7():
    from glance_core.arcflow_distill import ema_update

    values = [torch.tensor([float(t) ** 2, -float(t)]) for t in range(1, 41)]
    for gamma, weight in ((0.0, lambda t: 1.0), (7.0, lambda t: float(t) ** 7)):
        ema = [values[0].clone()]
        for t, v in enumerate(values, 1):
            ema_update(ema, [v], t, gamma)
        w = torch.tensor([weight(t) for t in range(1, 41)], dtype=torch.float64)
        expected = (w[:, None] * torch.stack(values).double()).sum(0) / w.sum()
        # γ = 0: exactly the mean; γ = 7: the ∝ t^γ weighting up to its O(1/t) start-up error
        assert torch.allclose(ema[0].double(), expected, rtol=1e-6 if gamma == 0 else 0.05), (gamma, ema, expected)
    assert ema[0][0] > torch.stack(values)[:, 0].mean()  # late (large) values weigh more than in the mean


def test_dropping_components_renormalises_the_gates_and_never_empties_a_sample():
    means, logits, lam = _policy(k=4)
    pol = arcflow.ArcFlowPolicy(means, logits, lam)
    dropped = torch.tensor([[True, False, True, False], [True, True, True, True]])
    out = pol.without(dropped)
    keep = [1, 3]  # sample 0 keeps components 1 and 3 only
    pi = torch.softmax(logits[0, keep], 0)
    lam0 = arcflow.full_loggammas(lam)[0, keep]
    u = (pi * torch.exp(lam0 * 0.3) * means[0, keep]).sum(0)
    assert torch.allclose(out.velocity(0.3)[0], u.float(), atol=1e-5)
    assert torch.equal(out.velocity(0.3)[1], pol.velocity(0.3)[1])  # all dropped: the sample keeps them all
    assert torch.isfinite(out.displacement(1.0, 0.7619)).all()
