"""The sampling benchmarks run in a tiny configuration (so they cannot rot)."""

from __future__ import annotations

from test_benchmarks import load_benchmark


def test_sample_host_step_benchmark_tiny(capsys):
    result = load_benchmark("sample").main(["--host", "--batch", "3", "--micro-batch", "2", "--steps", "3",
                                            "--channels", "2", "--input-size", "4", "--z-dim", "8", "--device", "cpu"])
    assert result["draws_ms"] > 0 and result["cpu_loop_ms"] > 0 and result["ops_per_step"] > 10
    assert capsys.readouterr().out.startswith("| host | 3 | 2 |")
