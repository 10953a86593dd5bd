"""tools/plan_table.py's largest-batch search, on a fake compiler (no libtpu needed): the line
through two compiles predicts the batch, one compile checks it, and a miss steps down 10 %."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "plan_table", Path(__file__).resolve().parents[1] / "tools" / "plan_table.py")
plan_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plan_table)


class FakeResults:
    """Per-chip GiB = weights + per-image bytes × per-chip batch, plus `bump` GiB that the line
    does not know about (what XLA's buffer assignment adds near the limit)."""

    def __init__(self, weights: float, per_image: float, bump: float = 0.0, chips: int = 8):
        self.weights, self.per_image, self.bump, self.chips = weights, per_image, bump, chips
        self.calls: list[tuple] = []

    def compile(self, variant, regime, slice_, batch, fsdp):
        self.calls.append((regime, batch))
        b = batch // self.chips
        gib = self.weights + self.per_image * b + (self.bump if b > 100 else 0.0)
        return dict(variant=variant, regime=regime, slice=slice_, chips=self.chips,
                    mesh=f"{self.chips // fsdp}x{fsdp}", global_batch=batch, per_chip_batch=b,
                    peak_gib=gib, fits=gib <= 16, hbm_gib=16, est_ms=float(b))


def test_line_predicts_the_largest_batch_and_one_compile_checks_it():
    res = FakeResults(weights=2.0, per_image=0.1)
    row = res.compile("B/16", "full", "v5e-8", 32, 1)
    n, best = plan_table.largest_batch(res, row, row, "full")
    assert n == 140 and best["fits"] and best["peak_gib"] == 2.0 + 14.0
    # the grid row, the 8x slope compile, the check: nothing else
    assert res.calls == [("full", 32), ("full", 32 * 8), ("full", 140 * 8)]


def test_a_prediction_that_does_not_fit_steps_down_ten_percent():
    res = FakeResults(weights=2.0, per_image=0.1, bump=1.0)
    row = res.compile("B/16", "fmsd", "v5e-8", 32, 1)
    n, best = plan_table.largest_batch(res, row, row, "fmsd")
    assert (n, best["fits"]) == (126, True)  # 140 needs 17 GiB; int(140 × 0.9) = 126 fits
    assert [b // 8 for _, b in res.calls[2:]] == [140, 126]
