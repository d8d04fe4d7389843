"""The device check's plumbing: stage limits, interrupts, the report files, junit parsing."""

from __future__ import annotations

import json
import sys

import pytest

from d2v2.bench import gpu_check
from d2v2.bench.gpu_check import Stage, junit_summary, run_command

# Writes "interrupted" when SIGINT arrives (as pytest writes its junit), then hangs on. Run with -S
# (no site-packages) so that it starts in milliseconds even on a loaded machine, and "started" is
# printed inside the try, so that an interrupt after it always lands in the handler.
STUBBORN = """
import sys, time
try:
    print("started", flush=True)
    time.sleep(60)
except KeyboardInterrupt:
    open(sys.argv[1], "w").write("interrupted")
    time.sleep(60)
"""


def test_a_command_past_its_limit_is_interrupted_then_killed(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "GRACE_S", 2.0)
    marker = tmp_path / "marker"
    record = run_command([sys.executable, "-S", "-c", STUBBORN, str(marker)], 3.0)
    assert record["status"] == "timeout" and "started" in record["log_tail"]
    assert marker.read_text() == "interrupted"  # SIGINT came first


def test_a_failing_command_is_recorded_with_its_output():
    record = run_command([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], 60)
    assert record["status"] == "failed" and record["returncode"] == 3 and "boom" in record["log_tail"]


def _stage(name, status=None, raises=False, write=None):
    def run(ctx, limit_s):
        if raises:
            raise RuntimeError(f"{name} broke")
        if write:
            (ctx.out / write).write_text("{}")
        return {"commands": [{"cmd": name, "status": status, "returncode": 0, "seconds": 0.0, "log_tail": f"{name} log"}]}

    return Stage(name, 30, 30, run)


def test_every_stage_runs_and_the_report_is_written_after_each(tmp_path):
    stages = [_stage("machine", "ok", write="kernels.json"), _stage("tests", "timeout"), _stage("kernels", raises=True),
              _stage("train", "failed"), _stage("pretrain", "ok")]  # fmt: skip
    assert gpu_check.main(tmp_path / "out", dry_run=True, stages=stages) == 1
    check = json.loads((tmp_path / "out" / "check.json").read_text())
    assert [(s["name"], s["status"]) for s in check["stages"]] == [
        ("machine", "ok"), ("tests", "timeout"), ("kernels", "failed"), ("train", "failed"), ("pretrain", "ok")
    ]
    assert "kernels broke" in check["stages"][2]["error"]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| tests | timeout |" in summary and "train log" in summary and "dry run" in summary


def test_the_budget_bounds_every_stage_and_skips_what_does_not_fit(tmp_path):
    limits = []

    def slow(ctx, limit_s):
        limits.append(limit_s)
        return {"commands": []}

    stages = [Stage("a", 30, 30, slow), Stage("b", 30, 30, slow)]
    assert gpu_check.main(tmp_path / "out", budget_s=2.0, stages=stages) == 1
    check = json.loads((tmp_path / "out" / "check.json").read_text())
    assert check["stages"][0]["status"] == "skipped" and limits == []  # under 3 s left: not started


def test_unused_time_passes_to_the_next_stage(tmp_path):
    limits = []

    def quick(ctx, limit_s):
        limits.append(limit_s)
        return {"commands": [{"cmd": "x", "status": "ok", "returncode": 0, "seconds": 0.0, "log_tail": ""}]}

    assert gpu_check.main(tmp_path / "out", budget_s=500, stages=[Stage("a", 30, 30, quick), Stage("b", 30, 30, quick)]) == 0
    assert limits[0] == 30 and 59 <= limits[1] <= 60


def test_refuses_a_non_empty_folder_and_files_outside_the_list(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        gpu_check.main(tmp_path / "full", stages=[])
    with pytest.raises(AssertionError, match="stray.txt"):
        gpu_check.main(tmp_path / "out", stages=[_stage("machine", "ok", write="stray.txt")])


def test_junit_summary_counts_and_names_failures(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="1" skipped="1">'
        '<testcase classname="tests.kernels.test_ema" name="test_a"/>'
        '<testcase classname="tests.kernels.test_ema" name="test_b"><failure message="assert 1 == 2&#10;more"/></testcase>'
        '<testcase classname="tests.engine.test_cuda" name="test_c"><error message="CUDA error"/></testcase>'
        '<testcase classname="tests.x" name="test_d"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    summary = junit_summary(path)
    assert (summary["tests"], summary["passed"], summary["failures"], summary["errors"], summary["skipped"]) == (4, 1, 1, 1, 1)
    assert summary["failing"] == ["tests.kernels.test_ema::test_b: assert 1 == 2", "tests.engine.test_cuda::test_c: CUDA error"]
    assert junit_summary(tmp_path / "absent.xml") == {"written": False}
