"""The shared timing policy (profiler.timing) on a real ONNX Runtime runner."""
from onnx_builders import residual_cnn
from latprune.profiler.backends import get_backend
from latprune.profiler.timing import TimingPolicy, time_runner


class _Jittery:
    """Wraps a runner and adds a large delay to every 3rd run, so the CV is far above any
    threshold: the policy must retry and report it."""

    def __init__(self, runner):
        self.runner, self.n = runner, 0

    def inputs(self, n=1, seed=0):
        return self.runner.inputs(n, seed)

    def run_ms(self, inputs):
        self.n += 1
        ms = self.runner.run_ms(inputs)
        return ms * (20.0 if self.n % 3 == 0 else 1.0)


def test_policy_reports_order_statistics():
    runner = get_backend("ort-cpu").load(residual_cnn())
    m = time_runner(runner, TimingPolicy(min_runs=30, min_s=0.01, cv_threshold=10.0))
    assert m.runs >= 30 and m.attempts == 1
    assert 0 < m.min_ms <= m.median_ms <= m.p90_ms <= m.p99_ms
    assert m.warnings == []


def test_noisy_measurements_are_retried_and_flagged():
    runner = _Jittery(get_backend("ort-cpu").load(residual_cnn()))
    m = time_runner(runner, TimingPolicy(min_runs=30, min_s=0.0, cv_threshold=0.05, retries=2))
    assert m.cv > 0.05
    assert len(m.warnings) == 4  # three failed attempts (1 + 2 retries) + "kept the steadiest"
    assert "CV" in m.warnings[0]
