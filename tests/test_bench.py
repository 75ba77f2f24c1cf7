"""`bmojo-neuron bench`: every suite runs at toy sizes through the CLI and writes a well-formed report.

These tests check the plumbing and the JSON schema, never the speed (benchmarks are
commands, not timed tests; see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import re
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


def test_train_step_all_candidates(tmp_path, capfd, monkeypatch):
    from bmojo_neuron.ops import auto, dispatch

    monkeypatch.setattr(auto, "MIN_C_ELEMENTS", 0)  # the toy's small steps stand for real ones: each op's backend
    names = ["bmojo", "bmojo-f", "mamba-only", "swa-only", "hf-mamba", "hf-mamba2", "hf-mistral-swa", "hf-mistral"]
    report = run_bench(tmp_path, "train-step", *FAST, "--lengths", "32")
    check_candidates(report, names)
    # transformers' fallback warnings (the HF Mamba models on CPU), from the probe processes and this one: kept
    # in the report and named in one line, never written between the rows
    out, err = capfd.readouterr()
    assert "falling back" not in err and "falling back" not in out.replace("library_notes", ""), err
    fallbacks = [note.split("`")[1] for note in report["library_notes"] if "falling back to its reference" in note]
    assert {"mamba_inner_fn", "mamba_chunk_scan_combined"} <= set(fallbacks) and len(set(fallbacks)) == len(fallbacks)
    assert "  note: transformers logged its reference PyTorch path for " in out
    assert all(r["status"] == "ok" for r in report["results"]), report["results"]
    for row in report["results"]:
        assert row["tokens_per_s"] > 0
    # which backend ran each hot op, per row: B'MOJO's SSD scan on the default's C kernels (float32 CPU, built
    # here), the attention on torch; the HF models call none of the ops
    assert report["machine"]["ops"] == auto.describe("cpu")
    ops = {r["candidate"]: r["ops"] for r in report["results"]}

    def want(*names: str) -> dict[str, str]:  # the backend each op ran on: auto picks cpu-c where it builds
        c_here = "cpu-c" if auto.c_runs_here("cpu") == "" else "torch"
        return {op: c_here if dispatch.get_backend(op) == dispatch.AUTO else dispatch.get_backend(op) for op in names}

    layer_ops = ("eidetic_attention", "rms_norm", "rotary", "swiglu_product")  # an S layer's, and the pre-norms
    assert ops["bmojo"] == want(*layer_ops, "ssd_scan", "causal_conv1d_rows", "gated_rms_norm"), ops
    assert ops["hf-mistral-swa"] == {} and ops["swa-only"] == want(*layer_ops), ops
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
    report = run_bench(tmp_path, "scaling", *FAST, "--lengths", "32,64", "--candidates", "bmojo,hf-mistral",
                       "--budget-seconds", "0.000001")
    assert [r["status"] for r in report["results"]] == ["skipped"] * 4
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
    printed = capsys.readouterr().out
    assert "targets missed" in printed
    assert "--toy: tiny sizes check the plumbing; these verdicts say nothing about speed" in printed  # FAST is toy
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


# ----------------------------------------------------------------------------- bad input, refused up front
def bench_error(capsys, *args: str) -> str:
    """Run `bench` with `args`; it must refuse with exit status 2 and one error line, before any output."""
    assert main(["bench", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing ran: no header, no timing
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_bad_output_paths_are_refused_before_timing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    common = ["train-step", *FAST, "--candidates", "bmojo", "--lengths", "32"]
    assert bench_error(capsys, *common, "--json", "afile/out.json") == (
        f"error: --json afile/out.json: {tmp_path / 'afile'} is a file, not a folder")
    assert bench_error(capsys, *common, "--plot", "afile/p.png") == (
        f"error: --plot afile/p.png: {tmp_path / 'afile'} is a file, not a folder")
    assert bench_error(capsys, *common, "--json", "adir") == "error: --json adir: is a folder; give a file path"
    assert "the plot would overwrite the report" in bench_error(capsys, *common, "--json", "same.png")
    assert "the plot would overwrite" in bench_error(capsys, *common, "--json", "r.png", "--plot", "./r.png")
    assert bench_error(capsys, *common, "--json", "") == "error: --json must not be empty"
    assert not (tmp_path / "adir.png").exists() and not (tmp_path / "same.png").exists()


def test_plot_path_gets_the_png_suffix_it_is_written_with(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["bench", "train-step", *FAST, "--candidates", "swa-only", "--lengths", "32", "--json", str(out),
            "--plot", str(tmp_path / "noext")]
    assert main(args) == 0
    written = tmp_path / "noext.png"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "noext").exists()
    assert json.loads(out.read_text())["plot"] == str(written)
    assert f"wrote {out} and {written}" in capsys.readouterr().out


@pytest.mark.parametrize("suite", ["train-step", "scaling", "decode"])
def test_unknown_device_is_refused_up_front(tmp_path, capsys, suite):
    assert bench_error(capsys, suite, *FAST, "--device", "foo", "--json", str(tmp_path / "x.json")) == (
        "error: --device must be cpu, cuda or auto, got 'foo'")


@pytest.mark.parametrize(("option", "value"), [("--cap-seconds", "inf"), ("--cap-seconds", "nan"),
                                               ("--budget-seconds", "nan"), ("--budget-seconds", "inf"),
                                               ("--cap-seconds", "0")])
def test_time_limits_must_be_finite_and_positive(tmp_path, capsys, option, value):
    line = bench_error(capsys, "train-step", *FAST, option, value, "--json", str(tmp_path / "x.json"))
    assert line == f"error: {option} must be a finite number of seconds > 0, got {float(value)}"


def test_report_is_strict_json(tmp_path):
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        harness.write_json(str(tmp_path / "r.json"), {"value": float("nan")})
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(("extra", "given"), [(["--candidates", "nope"], "--candidates does not apply"),
                                              (["--busy", "--device", "foo"], "--device, --busy do not apply"),
                                              (["--lengths", "64"], "--lengths does not apply")])
def test_kernels_refuses_options_it_would_ignore(tmp_path, capsys, extra, given):
    line = bench_error(capsys, "kernels", "--toy", *extra, "--json", str(tmp_path / "x.json"))
    assert line.startswith(f"error: bench kernels: {given}")


def test_duplicates_are_refused(tmp_path, capsys):
    line = bench_error(capsys, "train-step", *FAST, "--candidates", "bmojo,hf-mistral,bmojo",
                       "--json", str(tmp_path / "x.json"))
    assert line == "error: candidate(s) ['bmojo'] given more than once; name each once"
    assert main(["kernels", "profile", "--kernels", "ssd_fwd,ssd_fwd"]) == 2
    assert capsys.readouterr().err == "error: kernels ['ssd_fwd'] given more than once; name each once\n"


def test_kernels_profile_names_the_list_with_an_unknown_kernel(capsys):
    assert main(["kernels", "profile", "--kernels", "foo"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown kernels ['foo']; choose from mamba1_fwd")
    assert main(["kernels", "profile", "--attention", "foo"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown attention kernels ['foo']; choose from attention_fwd")
    assert main(["kernels", "profile", "--attention", "attention_fwd,attention_fwd"]) == 2
    assert capsys.readouterr().err == ("error: attention kernels ['attention_fwd'] given more than once; "
                                       "name each once\n")


def test_kernels_profile_needs_a_kernel(capsys):
    assert main(["kernels", "profile", "--kernels", ""]) == 2
    assert capsys.readouterr().err.startswith("error: no kernels given: --kernels is empty")
    assert main(["kernels", "profile", "--kernels", "none", "--calibration-only"]) == 2
    assert capsys.readouterr().err.startswith("error: no kernels given: --kernels and --attention")


def test_scaling_needs_two_lengths(tmp_path, capsys):
    line = bench_error(capsys, "scaling", *FAST, "--lengths", "64", "--json", str(tmp_path / "x.json"))
    assert line == "error: scaling fits an exponent across lengths: --lengths needs at least two, got [64]"


def test_a_target_without_a_value_prints_missed_and_why():
    from bmojo_neuron.commands.bench import target_line

    missed = {"name": "t", "comparison": "<=", "threshold": 1.05, "value": None, "met": False,
              "note": "missed: bmojo capped at 64"}
    assert target_line(missed) == "  target t <= 1.05: missed -- bmojo capped at 64"
    met = dict(missed, met=True, note="hf-mistral-swa capped at 64 (over 1 s) while bmojo ran")
    assert target_line(met) == "  target t <= 1.05: met -- hf-mistral-swa capped at 64 (over 1 s) while bmojo ran"
    valued = dict(missed, value=1.2, note="1.0 is linear")
    assert target_line(valued) == "  target t <= 1.05: 1.2 (MISSED) -- 1.0 is linear"


def test_busy_needs_a_second_core(tmp_path, capsys, monkeypatch):
    import bmojo_neuron.device

    monkeypatch.setattr(bmojo_neuron.device, "usable_cores", lambda: 1)
    line = bench_error(capsys, "train-step", *FAST, "--busy", "--json", str(tmp_path / "x.json"))
    assert line == ("error: --busy needs a second core for its load, but this process may use only 1 (CPU "
                    "affinity); run without --busy or allow more cores")


def test_table_reports_each_bad_file(tmp_path, capsys):
    from bmojo_neuron.bench import table

    (tmp_path / "a.json").write_text('{"a": 1}')
    (tmp_path / "b.json").write_text("not json")
    (tmp_path / "c.json").write_text('{"schema": "bmojo-neuron-bench/1"}')
    paths = [str(tmp_path / n) for n in ("a.json", "b.json", "c.json", "missing.json")] + [str(tmp_path)]
    assert table.main(paths) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"error: {paths[0]}: not a bench report (no \"schema\": \"bmojo-neuron-bench/...\"); give the --json "
        "files `bmojo-neuron bench` wrote",
        f"error: {paths[1]}: not JSON (Expecting value: line 1 column 1 (char 0))",
        f"error: {paths[2]}: incomplete bench report (missing key 'machine')",
        f"error: {paths[3]}: No such file or directory",
        f"error: {paths[4]}: Is a directory",
    ]
    with pytest.raises(SystemExit) as exc:
        table.main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        table.main(["--help"])
    assert exc.value.code == 0 and "usage:" in capsys.readouterr().out


def test_table_renders_a_report(tmp_path, capsys):
    from bmojo_neuron.bench import table

    report = run_bench(tmp_path, "train-step", *FAST, "--lengths", "32", "--candidates", "swa-only")
    capsys.readouterr()
    assert table.main([str(tmp_path / "train-step.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("`train-step`, ") and "| swa-only |" in out and report["results"][0]["status"] == "ok"


def test_scaling_target_without_an_exponent_says_why(monkeypatch):
    from bmojo_neuron.bench import suites

    s = suites.resolve(suites.Settings(suite="scaling", lengths=[32, 64], candidates=["bmojo"], toy=True))
    report = {"results": [suites._row("bmojo", n, "ok", median_s=1e-7) for n in (32, 64)], "fits": [],
              "targets": [], "speedups": [], "settings": {}, "candidates": []}
    monkeypatch.setattr(suites, "_prepare", lambda *a, **k: (None, {}, {}))
    monkeypatch.setattr(suites, "_cells", lambda *a, **k: {})
    monkeypatch.setattr(suites.harness, "fit_exponent", lambda xs, ys: None)
    suites._scaling(s, report, log=lambda message: None)
    (target,) = report["targets"]
    assert target["met"] is False and target["note"] == "missed: B'MOJO's times at [32, 64] give no exponent"


def test_cpu_peak_memory_is_never_below_the_baseline(monkeypatch):
    """Memory returned to the OS as the peak counter resets: the peak is 0 more than the baseline, not less."""
    status = {"VmRSS": 1000, "VmHWM": 1200}

    def reset_returning_memory() -> bool:  # the kernel resets VmHWM to the current RSS, which has just shrunk
        status["VmRSS"] = 960
        status["VmHWM"] = 960
        return True

    monkeypatch.setattr(harness, "_proc_status_kb", lambda key: status[key])
    monkeypatch.setattr(harness, "_reset_peak_rss", reset_returning_memory)
    _, peak = harness.measure_call(lambda: None, "cpu")
    assert peak == 0


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_json_in_a_folder_that_takes_no_files_is_refused_before_timing(capsys, monkeypatch):
    """/proc passes `os.access` for root but takes no new files; the suite must not run before that shows."""
    from bmojo_neuron.bench import suites

    def must_not_run(*args, **kwargs):
        raise AssertionError("the suite ran before the --json path was checked")

    monkeypatch.setattr(suites, "run_suite", must_not_run)
    message = bench_error(capsys, "train-step", *FAST, "--candidates", "bmojo", "--lengths", "32",
                          "--json", "/proc/bench-report.json")
    assert message.startswith("error: --json /proc/bench-report.json: ")


def test_scaling_prints_an_unmeasured_exponent_as_na(tmp_path, capsys):
    """--no-probe measures no CPU memory, so there is no memory exponent: the fit line says n/a."""
    args = ["bench", "scaling", *FAST, "--candidates", "bmojo", "--lengths", "32,64", "--no-probe",
            "--device", "cpu", "--json", str(tmp_path / "s.json")]
    assert main(args) == 0
    fit_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  fit bmojo"))
    assert fit_line.endswith("memory exponent n/a"), fit_line
    assert json.loads((tmp_path / "s.json").read_text())["fits"][0]["memory_exponent"] is None


def _process_gone(pid: int) -> bool:
    """No process `pid`, or only its zombie (an orphan waiting for a reaper that may never come)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_busy_load_dies_with_a_killed_benchmark_even_while_paused():
    """A benchmark killed (SIGKILL) while the load is paused for a quiet run leaves no stopped loop behind."""
    import signal
    import subprocess
    import sys

    benchmark = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time\n"
         "from bmojo_neuron.bench.harness import BusyLoad\n"
         "with BusyLoad() as load:\n"
         "    load.process.send_signal(signal.SIGSTOP)\n"
         "    print(load.process.pid, flush=True)\n"
         "    time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    loop_pid = int(benchmark.stdout.readline())
    try:
        benchmark.kill()
        benchmark.wait(10)
        deadline = time.monotonic() + 5
        while not _process_gone(loop_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _process_gone(loop_pid)
    finally:
        if not _process_gone(loop_pid):
            os.kill(loop_pid, signal.SIGKILL)


@pytest.mark.parametrize(("lengths", "message"), [
    ("1K,1K,4K", "error: --lengths: 1024 given more than once (1K = 1024); name each length once"),
    ("1K,1024", "error: --lengths: 1024 given more than once (1K = 1024); name each length once"),
    ("64,32,64,32", "error: --lengths: 32, 64 given more than once; name each length once")])
def test_repeated_lengths_are_refused(tmp_path, capsys, lengths, message):
    assert bench_error(capsys, "train-step", *FAST, "--lengths", lengths, "--json", str(tmp_path / "x.json")) == message


SHAPE_OPTIONS = "(--d-model, --layers, --window, --vocab-size)"


@pytest.mark.parametrize(("suite", "extra", "message"), [
    ("train-step", ["--window", "0"], "error: --window must be >= 1, got 0"),
    ("decode", ["--d-model", "-8"], "error: --d-model must be >= 1, got -8"),
    ("scaling", ["--layers", "0"], "error: --layers must be >= 1, got 0"),
    ("train-step", ["--vocab-size", "0"], "error: --vocab-size must be >= 1, got 0"),
    ("decode", ["--window", "2"], f"error: bmojo cannot be built at d_model 64, 2 layer(s), window 2, vocab 128 "
                                  f"{SHAPE_OPTIONS}: BMojoConfig.memory_picks (4) cannot exceed memory_chunk (2)"),
    ("train-step", ["--d-model", "8"], f"error: bmojo cannot be built at d_model 8, 2 layer(s), window 32, vocab "
                                       f"128 {SHAPE_OPTIONS}: BMojoConfig.ssm_head_dim (32) must divide "
                                       "ssm_expand * hidden_size (16)"),
    ("train-step", ["--seed", str(2**64)], f"error: --seed must be an integer from {-2**63} to {2**64 - 1}, "
                                           f"got {2**64}")])
def test_bad_sizes_are_refused_before_any_output(tmp_path, capsys, suite, extra, message):
    """Every option is checked before the suite prints its header: the sizes by building each candidate on
    the meta device, as the suite would build it (the candidates' own configs reject what they cannot take)."""
    args = [suite, *FAST, "--candidates", "bmojo,hf-mamba2", *extra, "--json", str(tmp_path / "x.json")]
    assert bench_error(capsys, *args) == message


def test_hf_mamba2_is_matched_at_any_width_its_config_takes():
    """Mamba2Config needs expand * d_model = num_heads * head_dim; the matched-width search only tries widths
    that are whole multiples of both (d_model 48 with head dim 32: 96, 192, ...)."""
    from dataclasses import replace

    from bmojo_neuron.bench.candidates import TOY_SHAPE, _width_grid, check_buildable

    shape = replace(TOY_SHAPE, hidden_size=48)
    assert _width_grid("hf-mamba2", shape) == list(range(96, 16 * 48 + 1, 96))
    check_buildable(["hf-mamba2"], shape, num_layers=3)  # no error


def test_library_warnings_are_kept_once_and_the_handlers_come_back(capfd):
    """`keeping_library_warnings`: inside, transformers' warnings (each once) go to the list and not to stderr;
    after it, its handlers are back. A --toy suite times two rounds without a warm-up."""
    import logging

    from transformers.utils import logging as hf_logging

    from bmojo_neuron.bench import suites
    from bmojo_neuron.bench.library_notes import keeping_library_warnings, notes_line

    hf_logging.get_logger("transformers")  # its default stderr handler is in place
    logger = logging.getLogger("transformers.integrations.hub_kernels")
    handlers = logging.getLogger("transformers").handlers[:]
    fallback = ("`f_fn` is falling back to its reference PyTorch implementation because `pkg` is either not "
                "installed or doesn't support the device of the inputs. This is correct but much slower.")
    with keeping_library_warnings() as notes:
        for message in (fallback, fallback, "something else"):
            logger.warning(message)
        logger.info("not kept: below a warning")
    assert notes == [fallback, "something else"] and "falling back" not in capfd.readouterr().err
    assert logging.getLogger("transformers").handlers == handlers and handlers  # its own handlers are back
    assert notes_line(notes) == "  note: transformers logged 2 warnings; the messages are in the report's library_notes"
    assert notes_line(notes[:1]) == ("  note: transformers logged its reference PyTorch path for f_fn (the Hugging "
                                     "Face baselines are timed on it); the messages are in the report's library_notes")
    assert notes_line([]) is None
    toy = suites.resolve(suites.Settings(suite="train-step", toy=True))
    assert (toy.repeats, toy.warmup, toy.lengths) == (2, 0, [64, 128])


def test_kernel_shapes_read_every_trn1_recipe_as_the_recipe_loader_reads_it():
    """`ladder_shapes` and `attention_shapes` read each recipe of recipes/trn1 (the recipes' own YAML loader): one
    shape per file in name order, the attention's followed by the long-window example, with the sizes that
    `load_recipe` validates (a key a recipe leaves out takes the profile's default)."""
    from bmojo_neuron.bench import kernel_profile as kp
    from bmojo_neuron.recipes import load_recipe, repository_root

    paths = sorted((repository_root() / "recipes" / "trn1").glob("*.yaml"))
    ladder, attention = kp.ladder_shapes(), kp.attention_shapes()
    assert len(paths) == 7 and [s["name"] for s in ladder] == [p.stem for p in paths]
    assert [s["name"] for s in attention] == [p.stem for p in paths] + [kp.ATTENTION_EXAMPLE["name"]]
    for path, scan, window in zip(paths, ladder, attention):
        recipe = load_recipe(str(path))
        model = recipe.model
        assert scan["d_inner"] == (model.get("ssm_expand") or 2) * model["hidden_size"], path.stem
        assert scan["length"] == window["length"] == recipe.data.block_size, path.stem
        assert scan["n2"] == model["ssm_state_size"] and window["heads"] == model["num_attention_heads"], path.stem
        assert (window["window"], window["memory"]) == (model["window_size"], model["memory_size"]), path.stem


def test_kernels_profile_says_each_kernel_on_a_terminal_before_modelling_it(capsys, monkeypatch):
    """Each emulator run takes seconds to a minute and the table prints at the end: on a terminal every run is
    announced, numbered, before it starts; stdout stays the table alone. (Fake runs: the order is what counts.)"""
    import sys

    from bmojo_neuron.bench import kernel_profile as kp

    done: list[str] = []

    def fake(kernel, shape):
        done.append(f"{kernel} at {shape['name']}")
        return {"shape": shape["name"], "kernel": kernel, "dims": "-", "time_ms": 1.0, "overlap_ms": 1.0,
                "serial_ms": 1.0, "bound": "vector", "peak_share": None, "tensor_util": 0.5}

    monkeypatch.setattr(kp, "profile_kernel", fake)
    monkeypatch.setattr(kp, "profile_attention", fake)
    monkeypatch.setattr(kp, "ladder_shapes", lambda: [{"name": "ladder"}])
    monkeypatch.setattr(kp, "attention_shapes", lambda: [{"name": "window"}])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["kernels", "profile", "--kernels", "ssd_fwd", "--attention", "attention_fwd"]) == 0
    out, err = capsys.readouterr()
    assert done == ["ssd_fwd at calibration (tutorial)", "ssd_fwd at ladder", "attention_fwd at window"]
    assert err.splitlines() == ["kernels profile: loading the NKI kernels and their emulator",
                                *(f"  [{i}/3] {run}" for i, run in enumerate(done, 1))]
    assert "ssd_fwd" in out and "attention_fwd" in out and "[1/3]" not in out
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # a log or a pipe: a line as each run finishes
    done.clear()
    assert main(["kernels", "profile", "--kernels", "ssd_fwd", "--attention", "attention_fwd", "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(done) == 3 and len(err.splitlines()) == 3, err
    for i, (run, line) in enumerate(zip(done, err.splitlines()), 1):
        assert re.fullmatch(rf"kernels profile: \[{i}/3\] {re.escape(run)}: 1\.00 ms modelled, in \d+s", line), line
    assert len(json.loads(out)) == 3  # stdout stays the JSON alone


def test_kernels_profile_tables_keep_their_columns_for_long_shape_names():
    """The Trn1 recipes' names (`prime-llama-3.2-1b-finetune`, 27 characters) are wider than the shape column
    once was: every row's kernel, dims and numbers still start where the header's do."""
    from bmojo_neuron.commands.kernels import attention_table, scan_table

    row = {"kernel": "ssd_fwd", "dims": "L=2048", "time_ms": 1.0, "overlap_ms": 0.5, "serial_ms": 2.0,
           "bound": "dma", "peak_share": 0.5, "tensor_util": 0.25}
    rows = [{**row, "shape": name} for name in ("bmojo-130m", "prime-llama-3.2-1b-finetune")]
    for table in (scan_table(rows), attention_table(rows)):
        head, _, *body = table.splitlines()
        for line in body[:2]:
            assert line.index(" ssd_fwd ") + 1 == head.index("kernel")
            assert line.index(" L=2048 ") + 1 == head.index("dims")
