"""`bmojo-neuron bench`: every suite runs at toy sizes through the CLI and writes a well-formed report.

These tests check the plumbing and the JSON schema, never the speed (benchmarks are
commands, not timed tests; see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bmojo_neuron.bench import harness
from bmojo_neuron.cli import main

ROW_KEYS = {"candidate", "role", "length", "status", "median_s", "times_s", "peak_memory_bytes", "memory_warm",
            "probe_s", "note"}
STATUSES = {"ok", "capped", "error", "skipped"}
FAST = ["--toy", "--repeats", "1", "--warmup", "0"]


def run_bench(tmp_path: Path, suite: str, *extra: str) -> dict:
    out = tmp_path / f"{suite}.json"
    plot = tmp_path / f"{suite}.png"
    assert main(["bench", suite, "--json", str(out), "--plot", str(plot), "--quiet", *extra]) == 0
    assert plot.exists() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out.read_text())
    check_common(report, suite)
    return report


def check_common(report: dict, suite: str) -> None:
    assert report["schema"] == "bmojo-neuron-bench/1"
    assert report["suite"] == suite
    assert report["toy"] is True
    assert report["status"] in STATUSES
    machine = report["machine"]
    for key in ("cpu", "cpu_count", "torch_threads", "torch", "transformers", "python", "device",
                "load_average_start", "load_average_end"):
        assert key in machine
    for key in ("lengths", "repeats", "warmup", "cap_seconds", "batch", "candidates"):
        assert key in report["settings"]
    assert isinstance(report["memory_method"], str)
    assert isinstance(report["elapsed_s"], float | int)
    for key in ("candidates", "results", "speedups", "fits", "targets"):
        assert isinstance(report[key], list)
    for row in report["results"]:
        assert ROW_KEYS <= set(row), row
        assert row["status"] in STATUSES
        if row["status"] == "ok":
            assert row["median_s"] > 0 and len(row["times_s"]) >= 1
    for target in report["targets"]:
        assert {"name", "value", "threshold", "comparison", "met"} <= set(target)


def check_candidates(report: dict, names: list[str]) -> None:
    assert [c["name"] for c in report["candidates"]] == names
    for c in report["candidates"]:
        assert c["role"] == ("baseline" if c["name"].startswith("hf-") else "ours")
        assert c["params"] >= c["non_embedding_params"] > 0
        assert 0.9 <= c["params_vs_bmojo"] <= 1.1, c  # matched parameter count
    lengths = report["settings"]["lengths"]
    assert {(r["candidate"], r["length"]) for r in report["results"]} == {(n, L) for n in names for L in lengths}


def test_train_step_all_candidates(tmp_path):
    names = ["bmojo", "bmojo-f", "mamba-only", "swa-only", "hf-mamba", "hf-mamba2", "hf-mistral-swa", "hf-mistral"]
    report = run_bench(tmp_path, "train-step", *FAST, "--lengths", "32")
    check_candidates(report, names)
    assert all(r["status"] == "ok" for r in report["results"]), report["results"]
    for row in report["results"]:
        assert row["tokens_per_s"] > 0
    pairs = {(s["candidate"], s["baseline"]) for s in report["speedups"]}
    assert ("bmojo", "hf-mamba2") in pairs and ("bmojo", "hf-mistral") in pairs
    assert {t["name"] for t in report["targets"]} >= {
        "train-step L=32: B'MOJO tokens/s / hf-mamba2 tokens/s",
        "train-step L=32: B'MOJO tokens/s / hf-mistral-swa tokens/s",
    }


def test_scaling_fits_exponents(tmp_path):
    names = ["bmojo", "hf-mistral"]
    report = run_bench(tmp_path, "scaling", *FAST, "--lengths", "32,64", "--candidates", ",".join(names))
    check_candidates(report, names)
    fits = {f["candidate"]: f for f in report["fits"]}
    assert set(fits) == set(names)
    for fit in fits.values():
        assert isinstance(fit["time_exponent"], float)
        assert {"memory_exponent", "lengths", "capped_from"} <= set(fit)
    assert report["targets"][0]["name"] == "scaling: B'MOJO layer time exponent"


def test_decode_reports_latency_and_cache(tmp_path):
    names = ["bmojo", "hf-mistral"]
    # toy w = w_f = 32: past ~200 tokens B'MOJO's windows, memory and snapshots are all full
    report = run_bench(tmp_path, "decode", *FAST, "--lengths", "256,512", "--candidates", ",".join(names))
    check_candidates(report, names)
    for row in report["results"]:
        assert row["status"] == "ok"
        assert row["latency_ms"] > 0 and row["cache_bytes"] > 0 and row["prefill_s"] > 0
        # the probe prefills while it sets up (measured apart), then caps and measures one token
        assert row["probe_prefill_s"] > 0 and "probe_prefill_peak_memory_bytes" in row
    by = {(r["candidate"], r["length"]): r for r in report["results"]}
    assert by["hf-mistral", 512]["cache_bytes"] > 1.8 * by["hf-mistral", 256]["cache_bytes"]  # full KV cache grows
    assert by["bmojo", 512]["cache_bytes"] == by["bmojo", 256]["cache_bytes"]  # ours stays fixed-size
    assert {f["candidate"] for f in report["fits"]} == set(names)


class SleepyUnit:
    """A probe unit that sleeps `setup_s` while it is built and `run_s` per run."""

    def __init__(self, spec: dict) -> None:
        time.sleep(spec["setup_s"])
        self.run_s = spec["run_s"]

    def run(self) -> None:
        time.sleep(self.run_s)


def sleepy_unit(spec: dict) -> SleepyUnit:
    return SleepyUnit(spec)


def test_probe_caps_the_unit_and_bounds_its_set_up_apart():
    """A set-up longer than the cap (decode's prefill) is not capped; a set-up past its own allowance is, and
    says so; a unit past the cap is capped as before."""
    builder = "test_bench:sleepy_unit"
    # generous set-up allowances where none should run out: a loaded machine starts processes slowly
    assert harness.probe(builder, {"setup_s": 1.0, "run_s": 0.0}, cap_seconds=0.5, build_seconds=300).status == "ok"
    slow_setup = harness.probe(builder, {"setup_s": 600.0, "run_s": 0.0}, cap_seconds=0.5, build_seconds=0.5)
    assert slow_setup.status == "capped" and "setting up the unit did not finish within 1 s" in slow_setup.error
    slow_unit = harness.probe(builder, {"setup_s": 0.0, "run_s": 600.0}, cap_seconds=0.5, build_seconds=300)
    assert slow_unit.status == "capped" and "within the cap of 0.5 s" in slow_unit.error


def test_kernels_skips_or_reports(tmp_path):
    report = run_bench(tmp_path, "kernels", "--toy")
    if report["status"] == "skipped":  # no emulator in this checkout
        assert "kernels profile" in report["message"] and report["results"] == []
    else:
        assert [r["candidate"] for r in report["results"]] == ["ssd_fwd", "mamba1_fwd"]
        for row in report["results"]:
            assert row["status"] == "ok" and row["modelled_ms"] > 0 and row["median_s"] > 0
            # the contention-aware timeline never beats the busiest engine alone
            assert row["overlap_ms"] <= row["modelled_ms"] and row["bound"]


def test_cap_reports_capped_candidate(tmp_path):
    report = run_bench(tmp_path, "train-step", *FAST, "--lengths", "32,64", "--candidates", "swa-only,hf-mistral",
                       "--cap-seconds", "0.000001")
    assert {r["status"] for r in report["results"]} == {"capped"}
    notes = [r["note"] for r in report["results"] if r["length"] == 64]
    assert all("shorter length 32" in n for n in notes)


def test_budget_skips_what_is_left(tmp_path):
    report = run_bench(tmp_path, "scaling", *FAST, "--lengths", "32", "--candidates", "bmojo,hf-mistral",
                       "--budget-seconds", "0.000001")
    assert [r["status"] for r in report["results"]] == ["skipped", "skipped"]
    assert "time budget" in report["results"][0]["note"]


def test_bad_arguments_are_expected_errors(tmp_path, capsys):
    assert main(["bench", "train-step", "--toy", "--candidates", "nope", "--json", str(tmp_path / "x.json")]) == 2
    assert "unknown candidate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "no-such-suite"])


def test_check_fails_a_capped_bmojo(tmp_path, capsys):
    out = tmp_path / "t.json"
    args = ["bench", "train-step", *FAST, "--lengths", "32", "--candidates", "bmojo,hf-mistral-swa",
            "--cap-seconds", "0.000001", "--json", str(out), "--plot", str(tmp_path / "t.png"), "--quiet"]
    assert main([*args, "--check"]) == 1
    assert "targets missed" in capsys.readouterr().out
    report = json.loads(out.read_text())
    (target,) = report["targets"]
    assert target["met"] is False and target["value"] is None
    assert target["note"].startswith("missed: bmojo capped at 32")
    assert main(args) == 0  # without --check a miss is reported, not an exit status


def test_ratio_target_verdicts():
    from bmojo_neuron.bench.suites import Settings, _ratio_target, _row

    s = Settings(suite="decode", lengths=[8], candidates=["bmojo", "hf-mistral-swa"], cap_seconds=5.0)

    def verdict(ours: dict, other: dict) -> dict:
        report = {"results": [ours, other], "targets": []}
        _ratio_target(report, s, "t", 8, "median_s", "bmojo", "hf-mistral-swa", 1.2, "<=")
        return report["targets"][0]

    ok = _row("bmojo", 8, "ok", median_s=1.1)
    assert verdict(ok, _row("hf-mistral-swa", 8, "ok", median_s=1.0))["met"] is True
    assert verdict(ok, _row("hf-mistral-swa", 8, "ok", median_s=0.5))["met"] is False
    t = verdict(ok, _row("hf-mistral-swa", 8, "capped"))  # ours ran within the cap, the baseline did not
    assert t["met"] is True and t["value"] is None and "capped" in t["note"]
    t = verdict(_row("bmojo", 8, "error", note="boom"), _row("hf-mistral-swa", 8, "ok", median_s=1.0))
    assert t["met"] is False and t["note"] == "missed: bmojo error at 8: boom"


def test_busy_times_bmojo_with_and_without_the_load(tmp_path):
    import os

    report = run_bench(tmp_path, "train-step", *FAST, "--lengths", "32", "--candidates", "bmojo", "--busy")
    load = report["machine"]["busy_load"]
    (row,) = report["results"]
    assert row["status"] == "ok" and row["quiet_median_s"] > 0
    assert row["busy_over_quiet"] == pytest.approx(row["median_s"] / row["quiet_median_s"], rel=1e-3)
    (target,) = [t for t in report["targets"] if "one core busy" in t["name"]]
    assert target["threshold"] == 1.5 and target["value"] == pytest.approx(row["busy_over_quiet"], rel=1e-3)
    with pytest.raises(ProcessLookupError):  # the load is gone once the suite is done
        os.kill(load["pid"], 0)


def test_round_robin_times_with_the_clock_it_is_given():
    ticks = iter(range(100))
    timings = harness.round_robin({"a": lambda: None, "b": lambda: None}, warmup=1, repeats=2,
                                  clock=lambda: 10.0 * next(ticks))
    assert timings["a"].times == [10.0, 10.0] and timings["b"].times == [10.0, 10.0]  # one tick per run
    assert set(harness.CLOCKS) == {"wall", "cpu"}


def test_cpu_clock_excludes_time_spent_waiting(tmp_path):
    timings = harness.round_robin({"sleep": lambda: time.sleep(0.05)}, warmup=0, repeats=1,
                                  clock=harness.CLOCKS["cpu"])
    assert timings["sleep"].times[0] < 0.02  # asleep is not working
    report = run_bench(tmp_path, "train-step", *FAST, "--lengths", "32", "--candidates", "swa-only",
                       "--clock", "cpu", "--threads", "1")
    assert report["settings"]["clock"] == "cpu" and report["results"][0]["status"] == "ok"


@pytest.mark.parametrize(("extra", "message"), [(["--threads", "2"], "needs --threads 1"),
                                                (["--threads", "1", "--busy"], "wall-clock slowdown")])
def test_cpu_clock_refuses_what_it_cannot_time(tmp_path, capsys, extra, message):
    args = ["bench", "train-step", *FAST, "--clock", "cpu", *extra, "--json", str(tmp_path / "x.json")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --clock cpu") and message in err
