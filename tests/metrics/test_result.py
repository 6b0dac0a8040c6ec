"""MetricResult: numbers or an explicit 'not computed' reason, never both."""
from __future__ import annotations

import pytest

from tsjax.metrics.result import MetricResult, weights_available


def test_metric_result(tmp_path):
    ok = MetricResult.ok("clip_score", 31.25)
    assert ok.computed and ok.to_json() == 31.25 and str(ok) == "31.2500"
    miss = MetricResult.missing("aesthetic", tmp_path / "head.pth")
    assert not miss.computed and miss.value is None
    assert miss.to_json() == f"not computed: weights missing at {tmp_path / 'head.pth'}"
    assert MetricResult.missing("x", None).to_json() == "not computed: weights missing at (no path given)"
    assert MetricResult.not_computed("x", "no prompt").to_json() == "not computed: no prompt"
    with pytest.raises(ValueError, match="exactly one"):
        MetricResult("x")
    with pytest.raises(ValueError, match="exactly one"):
        MetricResult("x", value=1.0, reason="r")
    assert not weights_available(None) and not weights_available(tmp_path / "nope")
    assert weights_available(tmp_path)
