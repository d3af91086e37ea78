"""Statistical tests of the PCM device model against the published fit (docs/hardware.md §3.2).

Sample sizes: 100k devices per target. The standard error of a sample std is about
std / sqrt(2 n) = 0.22% of it, of a sample mean std / sqrt(n); the 2% tolerances below are
therefore 4 to 9 standard errors wide, while a wrong coefficient (e.g. a dropped gh term)
moves the moments by far more than 2%. All generators are seeded, so the tests are
deterministic.
"""

import math

import pytest
import torch

from nodes.pcm.device import (
    Drift,
    DriftCompensation,
    PcmDevice,
    PcmDrift,
    PcmProgrammingNoise,
    PcmReadNoise,
    ProgrammingNoise,
    ReadNoise,
)

NUM_SAMPLES = 100_000
G_MAX = 25.0
T0 = 20.0
T_READ = 250e-9


def fit_s_prog(gh: float) -> float:
    """docs/hardware.md §3.2, written out independently of the code under test."""
    return (0.26348 + 1.9650 * gh - 1.1731 * gh**2) * G_MAX / 25.0


def fit_drift_moments(gh: float) -> tuple[float, float]:
    mu = min(max(-0.0155 * math.log(gh) + 0.0244, 0.049), 0.1)
    s = min(max(-0.0125 * math.log(gh) - 0.0059, 0.008), 0.045)
    return mu, s


def fit_q_s(gh: float) -> float:
    return min(0.0088 / gh**0.65, 0.2)


def folded_normal_moments(mu: float, s: float) -> tuple[float, float]:
    """Mean and std of |N(mu, s)|."""
    phi = 0.5 * (1 + math.erf(-mu / (s * math.sqrt(2))))
    mean = s * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * s**2)) + mu * (1 - 2 * phi)
    return mean, math.sqrt(mu**2 + s**2 - mean**2)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def full(gh: float) -> torch.Tensor:
    return torch.full((NUM_SAMPLES,), gh * G_MAX, dtype=torch.float64)


@pytest.mark.parametrize("gh", [0.1, 0.3, 0.6, 1.0])
def test_programmed_conductance_matches_fit(gh):
    noise = ProgrammingNoise.Config().build(G_MAX)
    g = noise.program(full(gh), generator())
    expected_std = fit_s_prog(gh)
    # At gh >= 0.1 the clamp at 0 sits > 5 sigma away, so the moments are the normal's.
    assert g.mean().item() == pytest.approx(gh * G_MAX, rel=0.02)
    assert g.std().item() == pytest.approx(expected_std, rel=0.02)


def test_programmed_zero_target_is_a_rectified_normal():
    """The off side of every pair (target 0) is clamped at 0: mean s/sqrt(2 pi)."""
    noise = ProgrammingNoise.Config().build(G_MAX)
    g = noise.program(full(0.0), generator())
    s = fit_s_prog(0.0)
    assert (g >= 0).all()
    assert g.mean().item() == pytest.approx(s / math.sqrt(2 * math.pi), rel=0.02)
    assert g.std().item() == pytest.approx(s * math.sqrt(0.5 - 1 / (2 * math.pi)), rel=0.02)


def test_programming_noise_scales_with_g_max():
    noise = PcmProgrammingNoise(ProgrammingNoise.Config(), g_max=50.0)
    assert noise.std(torch.tensor([25.0])).item() == pytest.approx(fit_s_prog(0.5) * 2, rel=1e-6)


@pytest.mark.parametrize("gh", [0.01, 0.1, 0.5, 1.0])
def test_drift_exponent_distribution_matches_fit(gh):
    drift = Drift.Config().build(G_MAX, T0)
    assert isinstance(drift, PcmDrift)
    mu, s = fit_drift_moments(gh)
    mu_code, s_code = drift.exponent_moments(torch.tensor([gh * G_MAX], dtype=torch.float64))
    assert mu_code.item() == pytest.approx(mu, rel=1e-9)
    assert s_code.item() == pytest.approx(s, rel=1e-9)
    nu = drift.sample_exponents(full(gh), generator())
    mean, std = folded_normal_moments(mu, s)
    assert (nu >= 0).all()
    assert nu.mean().item() == pytest.approx(mean, rel=0.02)
    assert nu.std().item() == pytest.approx(std, rel=0.02)


def test_drift_moments_clip_at_zero_target():
    drift = Drift.Config().build(G_MAX, T0)
    mu, s = drift.exponent_moments(torch.zeros(1))
    assert (mu.item(), s.item()) == pytest.approx((0.1, 0.045))


def test_drift_follows_power_law_per_device():
    """log g vs log t (t = t_inference + t0) is a line of slope -nu for every device."""
    config = PcmDevice.Config(read_noise=ReadNoise.Config(kind="none"))
    device = config.build()
    g_target = torch.linspace(0.0, G_MAX, 1000, dtype=torch.float64)
    g_programmed, nu = device.program(g_target, generator())
    times = torch.tensor([0.0, 10.0, 1e3, 1e5, 1e7], dtype=torch.float64)
    log_g = torch.stack(
        [device.read(g_target, g_programmed, nu, t.item(), generator()).log() for t in times]
    )
    log_t = (times + T0).log()
    centered_t = log_t - log_t.mean()
    valid = g_programmed > 0
    slope = (centered_t[:, None] * (log_g - log_g.mean(0))).sum(0) / (centered_t**2).sum()
    torch.testing.assert_close(slope[valid], -nu[valid], rtol=0, atol=1e-9)


def test_no_drift_at_t_zero():
    """t_inference = 0 means t = t0, where (t / t0)^-nu = 1 exactly."""
    device = PcmDevice.Config(read_noise=ReadNoise.Config(kind="none")).build()
    g_target = torch.linspace(0.0, G_MAX, 100)
    g_programmed, nu = device.program(g_target, generator())
    assert (nu > 0).all()
    assert torch.equal(device.read(g_target, g_programmed, nu, 0.0, generator()), g_programmed)


@pytest.mark.parametrize("gh", [0.005, 0.01, 0.1, 0.5, 1.0])
def test_q_s_matches_fit(gh):
    read_noise = ReadNoise.Config().build(G_MAX, T0)
    assert isinstance(read_noise, PcmReadNoise)
    q_s = read_noise.q_s(torch.tensor([gh * G_MAX], dtype=torch.float64)).item()
    assert q_s == pytest.approx(fit_q_s(gh), rel=1e-9)


@pytest.mark.parametrize("t_inference", [0.0, 1.0, 3600.0, 86400.0, 31536000.0])
def test_read_noise_grows_as_fit(t_inference):
    gh = 0.5
    read_noise = ReadNoise.Config().build(G_MAX, T0)
    g = full(gh)
    read = read_noise.read(g, g, t_inference, generator())
    t = t_inference + T0
    expected = gh * G_MAX * fit_q_s(gh) * math.sqrt(math.log((t + T_READ) / (2 * T_READ)))
    assert read.mean().item() == pytest.approx(gh * G_MAX, rel=0.02)
    # 1% (4.5 SE) rather than 2%, so that dropping the 2 in 2 t_read (+2% at t = t0) fails.
    assert read.std().item() == pytest.approx(expected, rel=0.01)


def test_read_noise_scales_with_drifted_conductance():
    read_noise = ReadNoise.Config().build(G_MAX, T0)
    g_target = full(0.5)
    drifted = 0.5 * g_target
    read = read_noise.read(drifted, g_target, 100.0, generator())
    expected = read_noise.std(drifted[:1], g_target[:1], 100.0).item()
    assert read.std().item() == pytest.approx(expected, rel=0.02)
    assert expected == pytest.approx(0.5 * read_noise.std(g_target[:1], g_target[:1], 100.0).item())


def fit_q_s_programmed(g_programmed: torch.Tensor) -> torch.Tensor:
    """Nandakumar et al. 2019 as aihwkit writes it: Qs of |g_prog| / g_max, gh^0.65 floored at 1e-3."""
    gh_power = torch.clamp((g_programmed.abs() / G_MAX) ** 0.65, min=1e-3)
    return torch.clamp(0.0088 / gh_power, max=0.2)


def rectified_residual_moments(g_drifted, sigma) -> tuple[float, float]:
    """Mean and std over devices of max(g + sigma n, 0) - g, n ~ N(0, 1), in closed form."""
    # A device clamped to 0 when programmed has sigma = 0 and reads 0: residual 0 either way.
    a = g_drifted / sigma.clamp(min=torch.finfo(sigma.dtype).tiny)
    cdf, pdf = torch.special.ndtr(a), torch.exp(-0.5 * a**2) / math.sqrt(2 * math.pi)
    first = g_drifted * cdf + sigma * pdf  # E[max(X, 0)] per device
    second = (g_drifted**2 + sigma**2) * cdf + g_drifted * sigma * pdf
    mean = (first - g_drifted).mean()
    square = (second - 2 * g_drifted * first + g_drifted**2).mean()
    return mean.item(), (square - mean**2).sqrt().item()


def read_noise_sigma(g_drifted, g_for_q_s, t_inference):
    t = t_inference + T0
    return (
        g_drifted.abs()
        * fit_q_s_programmed(g_for_q_s)
        * math.sqrt(math.log((t + T_READ) / (2 * T_READ)))
    )


def programmed_and_drifted(gh: float, t_inference: float):
    device = PcmDevice.Config().build()
    g_target = full(gh)
    g_programmed, nu = device.program(g_target, generator(3))
    g_drifted = device.drift.apply(g_programmed, nu, t_inference)
    return device, g_target, g_programmed, nu, g_drifted


@pytest.mark.parametrize("gh", [0.05, 0.5, 1.0])
def test_read_noise_moments_follow_programmed_conductance(gh):
    """Spread of one read around the drifted conductance, one day after programming.

    sigma = |g(t)| Qs(g_prog) sqrt(ln((t + t_read) / (2 t_read))), written out here apart from
    the code, with the clamp at 0 taken exactly (rectified normal). Low (gh = 0.05: 1.25 uS),
    middle and high conductance over 100k programmed devices: the residual's mean and std
    must match within 1.5% of the std (7 standard errors of a 100k-sample std).
    """
    t_inference = 86400.0
    device, g_target, g_programmed, nu, g_drifted = programmed_and_drifted(gh, t_inference)
    read = device.read(g_target, g_programmed, nu, t_inference, generator(4))
    sigma = read_noise_sigma(g_drifted, g_programmed, t_inference)
    mean, std = rectified_residual_moments(g_drifted, sigma)
    residual = read - g_drifted
    assert residual.mean().item() == pytest.approx(mean, abs=0.015 * std)
    assert residual.std().item() == pytest.approx(std, rel=0.015)


def test_read_noise_magnitude_is_not_that_of_the_target():
    """At low conductance Qs(g_target) gives a spread 4.5% higher than Qs(g_prog).

    Guards the moment test above: were the code to use the target again (the issue's "about
    2% high" at 2.5 uS), its low-conductance case would fail by 3 times its tolerance.
    """
    t_inference = 86400.0
    _, g_target, g_programmed, _, g_drifted = programmed_and_drifted(0.05, t_inference)
    _, published = rectified_residual_moments(
        g_drifted, read_noise_sigma(g_drifted, g_programmed, t_inference)
    )
    _, of_target = rectified_residual_moments(
        g_drifted, read_noise_sigma(g_drifted, g_target, t_inference)
    )
    assert of_target / published - 1 > 3 * 0.015


def test_read_noise_floors_tiny_conductance_and_clips_q_s():
    read_noise = ReadNoise.Config().build(G_MAX, T0)
    assert isinstance(read_noise, PcmReadNoise)
    g = torch.tensor([0.0, 1e-9, -2.5, 2.5], dtype=torch.float64)
    q_s = read_noise.q_s(g)
    assert q_s[:2].tolist() == [0.2, 0.2]  # 0.0088 / 1e-3 = 8.8, clipped at 0.2
    assert q_s[2].item() == pytest.approx(q_s[3].item(), rel=1e-12)  # |g_prog|
    assert q_s[3].item() == pytest.approx(fit_q_s(0.1), rel=1e-9)


def test_read_noise_is_seeded():
    read_noise = ReadNoise.Config().build(G_MAX, T0)
    g = full(0.5)[:1000]
    first = read_noise.read(g, g, 10.0, generator(7))
    assert torch.equal(first, read_noise.read(g, g, 10.0, generator(7)))
    assert not torch.equal(first, read_noise.read(g, g, 10.0, generator(8)))


def test_ideal_device_reads_targets_exactly():
    device = PcmDevice.Config.ideal().build()
    g_target = torch.linspace(0.0, G_MAX, 50)
    g_programmed, nu = device.program(g_target, generator())
    assert torch.equal(g_programmed, g_target)
    assert torch.equal(nu, torch.zeros_like(g_target))
    assert torch.equal(device.read(g_target, g_programmed, nu, 1e6, generator()), g_target)


def test_zero_scale_switches_effects_off():
    config = PcmDevice.Config(
        programming_noise=ProgrammingNoise.Config(scale=0.0),
        drift=Drift.Config(scale=0.0),
        read_noise=ReadNoise.Config(scale=0.0),
    )
    device = config.build()
    g_target = torch.linspace(1.0, G_MAX, 50)
    g_programmed, nu = device.program(g_target, generator())
    assert torch.equal(device.read(g_target, g_programmed, nu, 1e6, generator()), g_target)


def test_seeded_programming_is_reproducible_and_seeds_differ():
    device = PcmDevice.Config().build()
    g_target = torch.linspace(0.0, G_MAX, 500)

    def run(seed):
        g_programmed, nu = device.program(g_target, generator(seed))
        return device.read(g_target, g_programmed, nu, 3600.0, generator(seed + 100))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_negative_drift_time_is_rejected():
    device = PcmDevice.Config().build()
    g = torch.ones(3)
    with pytest.raises(ValueError, match=r"t_inference = -1\.0"):
        device.read(g, g, g, -1.0, generator())


def test_global_drift_compensation_reads_one_hot_inputs():
    compensation = DriftCompensation.Config().build()
    seen = []

    def read(x_KI):
        seen.append(x_KI)
        return torch.tensor([[1.0, -3.0], [2.0, -2.0]])

    assert compensation.readout(read, 2).item() == pytest.approx(2.0)
    assert torch.equal(seen[0], torch.eye(2))
    assert DriftCompensation.output_scale(
        torch.tensor(3.0), torch.tensor(1.5)
    ).item() == pytest.approx(2.0)


def test_no_drift_compensation_never_reads():
    compensation = DriftCompensation.Config(kind="none").build()
    assert compensation.readout(lambda x: pytest.fail("must not read"), 4).item() == 1.0


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: PcmDevice.Config(g_max=0.0), r"g_max = 0\.0"),
        (lambda: PcmDevice.Config(t0=-1.0), r"t0 = -1\.0"),
        (lambda: ProgrammingNoise.Config(scale=-0.5), r"scale = -0\.5"),
        (lambda: Drift.Config(mean_clip=(0.2, 0.1)), r"mean_clip"),
        (lambda: ReadNoise.Config(t_read=0.0), r"t_read = 0\.0"),
        (lambda: ReadNoise.Config(q_power_floor=0.0), r"q_power_floor = 0\.0"),
    ],
)
def test_invalid_device_config_is_rejected(build, match):
    with pytest.raises(ValueError, match=match):
        build()
