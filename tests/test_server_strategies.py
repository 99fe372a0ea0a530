"""Synchronous server strategies (docs/algorithms.md, "Server strategies"): each reduces to FedAvg in its
documented limit, the robust ones bound what one scaled update can do, and the privacy accountant agrees with
the mechanism's Renyi divergence computed numerically."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mqttfl.fl import privacy, robust
from mqttfl.fl.fedopt import ServerOptimizer, nova
from mqttfl.fl.strategies import (
    DPFedAvg,
    FedAvg,
    FedNova,
    FedOpt,
    FedProx,
    Krum,
    Median,
    NormClipping,
    RoundInfo,
    StrategyParams,
    TrimmedMean,
    Update,
    UpdateRejected,
    make_strategy,
)

SHAPES = {"w": (4, 3), "b": (3,)}


def state(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def updates(n: int = 5, samples: list[int] | None = None, steps: list[int] | None = None) -> list[Update]:
    samples = samples or [10] * n
    steps = steps or [4] * n
    return [Update(f"c{i}", state(10 + i, 0.1), samples[i], steps=steps[i]) for i in range(n)]


def close(a, b, atol=1e-6) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=1e-5)


FEDAVG_LIMITS = {
    # name: (strategy in its limit, updates that make it FedAvg)
    "fedprox mu=0": (lambda: FedProx(0.0), updates(samples=[3, 9, 10, 2, 7])),
    "fedadam b1=0 b2=1 lr=2tau": (lambda: FedOpt("adam", 2e-3, 0.0, 1.0, 1e-3), updates(samples=[3, 9, 10, 2, 7])),
    "fedyogi b1=0 b2=1 lr=2tau": (lambda: FedOpt("yogi", 2e-3, 0.0, 1.0, 1e-3), updates(samples=[3, 9, 10, 2, 7])),
    "fednova equal steps": (FedNova, updates(samples=[3, 9, 10, 2, 7], steps=[6] * 5)),
    "trimmed beta=0 equal samples": (lambda: TrimmedMean(0.0), updates()),
    "multi-krum m=n": (lambda: Krum(1, 5), updates(samples=[3, 9, 10, 2, 7])),
    "clip C=inf": (lambda: NormClipping(math.inf), updates(samples=[3, 9, 10, 2, 7])),
    "dpfedavg sigma=0 C=inf equal samples": (lambda: DPFedAvg(math.inf, 0.0, 1e-5), updates()),
}


@pytest.mark.parametrize("name", FEDAVG_LIMITS)
def test_every_strategy_reduces_to_fedavg_in_its_documented_limit(name: str) -> None:
    make, ups = FEDAVG_LIMITS[name]
    model = state(0)
    expected = FedAvg().aggregate(model, ups)
    strategy = make()
    close(strategy.aggregate(model, ups, RoundInfo(len(ups), len(ups))), expected)
    # Twice: stateful rules (FedOpt's moments) stay in the limit round after round.
    close(strategy.aggregate(expected, ups, RoundInfo(len(ups), len(ups))), FedAvg().aggregate(expected, ups))


def test_fedadagrad_approaches_fedavg_as_tau_grows() -> None:
    model, ups = state(0), updates()
    tau = 1e4
    got = FedOpt("adagrad", 2 * tau, 0.0, 0.99, tau).aggregate(model, ups)
    close(got, FedAvg().aggregate(model, ups), atol=1e-5)


def test_median_of_identical_updates_and_of_one_update_is_that_update() -> None:
    model = state(0)
    same = [Update(f"c{i}", state(3, 0.1), 5 + i) for i in range(4)]
    close(Median().aggregate(model, same), FedAvg().aggregate(model, same))
    close(Median().aggregate(model, same[:1]), FedAvg().aggregate(model, same[:1]))


@pytest.mark.parametrize("rule", ["median", "trimmed", "krum", "clip"])
def test_one_update_scaled_by_a_million_moves_robust_rules_by_a_bounded_amount_and_fedavg_without_bound(
        rule: str) -> None:
    model, honest = state(0), updates(7)
    strategy = make_strategy(rule, StrategyParams(trim_beta=0.2, krum_f=1))
    attacked = [*honest[:-1], Update("evil", {k: v * 1e6 for k, v in honest[-1].delta.items()}, 10)]
    clean = strategy.aggregate(model, honest)
    poisoned = make_strategy(rule, StrategyParams(trim_beta=0.2, krum_f=1)).aggregate(model, attacked)
    shift = max(np.abs(poisoned[k] - clean[k]).max() for k in model)
    spread = max(np.abs(u.delta[k]).max() for u in honest for k in model)
    assert shift <= 2 * spread, f"{rule} moved by {shift}"
    fedavg_shift = max(np.abs(FedAvg().aggregate(model, attacked)[k] - FedAvg().aggregate(model, honest)[k]).max()
                       for k in model)
    assert fedavg_shift > 1e3 * spread


def test_krum_rejects_the_outlier_and_reports_it() -> None:
    ups = updates(6)
    ups[2] = Update("c2", {k: v + 50.0 for k, v in ups[2].delta.items()}, 10)
    k = Krum(1, 4)
    k.aggregate(state(0), ups)
    assert "c2" in k.last_report["rejected"] and len(k.last_report["selected"]) == 4


def test_krum_scores_are_sums_of_squared_distances_to_the_nearest() -> None:
    pts = [{"x": np.array([v], np.float32)} for v in (0.0, 1.0, 3.0, 10.0)]
    # n - f - 2 = 1 nearest with f = 1: 1, 1, 4, 49.
    np.testing.assert_allclose(robust.krum_scores(pts, 1), [1, 1, 4, 49])


def test_trimmed_mean_drops_beta_of_each_end_per_coordinate() -> None:
    vals = [{"x": np.array([v, -v], np.float32)} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    np.testing.assert_allclose(robust.trimmed_mean(vals, 0.2)["x"], [3.0, -3.0])


def test_norm_clipping_scales_long_updates_to_the_median_norm_by_default() -> None:
    ups = [Update(f"c{i}", {"w": np.full((4, 3), float(i + 1), np.float32), "b": np.zeros(3, np.float32)}, 1)
           for i in range(3)]
    s = NormClipping(0.0)
    s.aggregate({"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}, ups)
    assert s.last_report["clipped"] == ["c2"] and s.last_report["clip_norm"] == pytest.approx(2 * math.sqrt(12))


def test_fednova_normalises_by_local_steps() -> None:
    d = [{"x": np.array([2.0], np.float32)}, {"x": np.array([8.0], np.float32)}]
    # Client 2 ran 4x the steps: per step both moved 2; tau_eff = 2.5, so the result is 2.5 * 2 = 5, where
    # FedAvg gives the mean 5 too only by accident of equal weights; with weights 3:1 FedAvg is 3.5.
    np.testing.assert_allclose(nova(d, [3.0, 1.0], [1, 4])["x"], [(0.75 * 1 + 0.25 * 4) * 2.0])
    with pytest.raises(UpdateRejected, match="steps"):
        FedNova().aggregate({"x": np.zeros(1, np.float32)}, [Update("a", d[0], 1)])


def test_server_optimizer_state_survives_a_restart() -> None:
    model, ups = state(0), updates()
    a = FedOpt("adam", 0.01, 0.9, 0.99, 1e-3)
    m1 = a.aggregate(model, ups)
    b = FedOpt("adam", 0.01, 0.9, 0.99, 1e-3)
    b.load_state_dict(a.state_dict())
    close(a.aggregate(m1, ups), b.aggregate(m1, ups), atol=0)


def test_fedyogi_v_moves_towards_the_squared_update_by_sign() -> None:
    opt = ServerOptimizer("yogi", 0.1, 0.0, 0.5, 1.0)  # v0 = 1
    opt.step({"x": np.array([2.0, 0.5])})  # d^2 = 4 > v0: v grows; 0.25 < v0: v shrinks
    np.testing.assert_allclose(opt.v["x"], [1 + 0.5 * 4, 1 - 0.5 * 0.25])


def test_adaptive_and_noisy_rules_leave_batchnorm_statistics_to_the_plain_mean() -> None:
    model, ups = state(0), updates(samples=[3, 9, 10, 2, 7])
    s = FedOpt("adam", 0.5, 0.9, 0.99, 1e-3)
    s.buffers = frozenset({"b"})
    got = s.aggregate(model, ups)
    np.testing.assert_allclose(got["b"], FedAvg().aggregate(model, ups)["b"], atol=1e-6)
    assert not np.allclose(got["w"], FedAvg().aggregate(model, ups)["w"])


def test_partial_rounds_aggregate_their_layers_only() -> None:
    model = state(0)
    ups = [Update(f"c{i}", {"b": state(i)["b"]}, 1) for i in range(3)]
    for rule in ("fedavg", "median", "krum", "fedadam"):
        got = make_strategy(rule).aggregate(model, ups)
        np.testing.assert_array_equal(got["w"], model["w"])
        assert not np.array_equal(got["b"], model["b"])
    with pytest.raises(UpdateRejected, match="keys differ"):
        make_strategy("median").aggregate(model, [ups[0], Update("x", state(1), 1)])
    # FedAvg takes updates that cover parts of the model: each key is averaged over the updates that carry it.
    mixed = FedAvg().aggregate(model, [ups[0], Update("x", state(1), 1)])
    np.testing.assert_allclose(mixed["w"], model["w"] + state(1)["w"], rtol=1e-6)
    np.testing.assert_allclose(mixed["b"], model["b"] + (ups[0].delta["b"] + state(1)["b"]) / 2, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- privacy


def _rdp_numeric(q: float, sigma: float, alpha: int) -> float:
    """Renyi divergence of the sampled Gaussian: D_alpha((1-q) N(0, s^2) + q N(1, s^2) || N(0, s^2))."""
    z = np.linspace(-30 * sigma, 30 * sigma + alpha, 400_001)
    log0 = -(z**2) / (2 * sigma**2)  # unnormalised: the normalisations cancel in mu0^(1-a) mix^a / mu0
    log_mix = np.logaddexp(math.log(1 - q) + log0, math.log(q) - (z - 1) ** 2 / (2 * sigma**2))
    log_integrand = (1 - alpha) * log0 + alpha * log_mix
    top = log_integrand.max()
    log_a = top + math.log(np.trapezoid(np.exp(log_integrand - top), z)) - math.log(math.sqrt(2 * math.pi) * sigma)
    return log_a / (alpha - 1)


@pytest.mark.parametrize(("q", "sigma", "alpha"), [(0.1, 1.0, 2), (0.05, 2.0, 8), (0.5, 1.5, 3), (0.01, 0.8, 16)])
def test_rdp_of_the_sampled_gaussian_matches_numerical_integration(q: float, sigma: float, alpha: int) -> None:
    assert privacy.rdp_sampled_gaussian(q, sigma, alpha) == pytest.approx(_rdp_numeric(q, sigma, alpha), rel=1e-4)


def test_accountant_limits_and_monotonicity() -> None:
    assert privacy.rdp_sampled_gaussian(1.0, 2.0, 10) == pytest.approx(10 / 8)  # plain Gaussian: alpha / 2s^2
    assert privacy.rdp_sampled_gaussian(0.0, 1.0, 10) == 0.0
    assert privacy.rdp_sampled_gaussian(0.3, 0.0, 10) == math.inf
    eps = []
    for rounds in (1, 10, 100):
        a = privacy.Accountant(1e-5)
        for _ in range(rounds):
            a.step(0.1, 1.0)
        eps.append(a.spent())
    assert 0 < eps[0] < eps[1] < eps[2]
    more_noise = privacy.Accountant(1e-5)
    for _ in range(100):
        more_noise.step(0.1, 2.0)
    assert more_noise.spent() < eps[2]
    # A single Gaussian release (q = 1) with sigma = 1: RDP gives epsilon well under the composition of 1.
    one = privacy.Accountant(1e-5)
    one.step(1.0, 5.0)
    assert 0.5 < one.spent() < 1.5


def test_dpfedavg_clips_adds_calibrated_noise_and_reports_the_privacy_spent() -> None:
    model = {"w": np.zeros(20_000, np.float32)}
    ups = [Update(f"c{i}", {"w": np.full(20_000, 10.0 if i == 0 else 0.001, np.float32)}, 1) for i in range(4)]
    s = DPFedAvg(1.0, 0.5, 1e-5)
    s.rng = np.random.default_rng(0)
    got = s.aggregate(model, ups, RoundInfo(expected=4, population=40))
    # Noise of sigma C / m per coordinate around (sum of clipped) / m.
    clipped_sum = 1.0 / math.sqrt(20_000) + 3 * 0.001
    assert np.std(got["w"]) == pytest.approx(0.5 * 1.0 / 4, rel=0.05)
    assert np.mean(got["w"]) == pytest.approx(clipped_sum / 4, abs=0.01)
    rep = s.last_report
    assert rep["clipped"] == 1 and rep["sampling_rate"] == 0.1 and rep["epsilon"] > 0 and rep["dp_rounds"] == 1
    restored = DPFedAvg(1.0, 0.5, 1e-5)
    restored.load_state_dict(s.state_dict())
    assert restored.accountant.spent() == pytest.approx(s.accountant.spent())
