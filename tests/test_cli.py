"""The ``handgrad`` command: job dispatch, ``python -m handgrad``, and ``handgrad verify`` (and
``scripts/verify.py``) writing its reports, restricted to a couple of ops so it is quick."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from handgrad import cli

ROOT = Path(__file__).resolve().parents[1]


def test_python_dash_m_handgrad_help_lists_the_jobs():
    result = subprocess.run([sys.executable, "-m", "handgrad", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for job in ("train", "verify", "bench"):
        assert f"  {job} " in result.stdout
    assert "handgrad JOB --help" in result.stdout


@pytest.mark.parametrize(("argv", "message"), [
    ([], "required: job"),
    (["fit"], "invalid choice: 'fit'"),
    (["--epochs", "3"], "required: job"),
])
def test_a_missing_or_unknown_job_is_exit_code_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_version(capsys):
    import handgrad

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"handgrad {handgrad.__version__}"


def test_each_job_has_help(capsys):
    for job, flag in (("train", "--grad"), ("verify", "--op"), ("bench", "--fast-paths")):
        assert cli.main([job, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: handgrad {job}") and flag in out, job


def read_report(out: Path) -> dict:
    assert (out / "verify.md").read_text().startswith("# handgrad verification report")
    return json.loads((out / "verify.json").read_text())


def test_verify_writes_its_reports(tmp_path, capsys):
    code = cli.main(["verify", "--op", "relu", "--op", "sigmoid", "--dtype", "float64",
                     "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = read_report(tmp_path)
    assert report["passed"] is True
    records = {(r["check"], r["dtype"], r["platform"]) for r in report["records"]}
    assert {("relu", "float64", "cpu"), ("sigmoid", "float64", "cpu")} <= records
    assert all(r["status"] == "PASS" and r["fd_rel"] is not None for r in report["records"]
               if r["platform"] == "cpu")
    assert "checks passed" in out


def test_verify_unknown_op_is_exit_code_2(tmp_path, capsys):
    assert cli.main(["verify", "--op", "no_such_op", "--out", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("handgrad verify: error: unknown op(s) ['no_such_op']")
    assert not (tmp_path / "verify.json").exists()


def test_verify_script_in_a_subprocess(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "verify.py"), "--op", "relu", "--dtype",
         "float32", "--platform", "cpu", "--out", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_report(tmp_path)
    assert report["passed"] is True
    assert [(r["check"], r["dtype"]) for r in report["records"]] == [("relu", "float32")]
