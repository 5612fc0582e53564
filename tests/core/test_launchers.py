"""The launchers (``scripts/start_ui.py``, ``scripts/run_main_job.py``) refuse bad options with
exit status 2 and a message naming the option, before they write a base directory or start a
server; a models folder that does not exist is an error, not a quiet switch to demo weights."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import pytest

from scripts.run_main_job import check_arguments
from tests.conftest import ROOT


def run_script(name: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MOCHI_MODELS"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_start_ui_refuses_a_bad_port_or_models_folder_before_starting(tmp_path):
    out = tmp_path / "ui"
    proc = run_script("start_ui.py", "--port", "70000", "--models", str(tmp_path / "nope"),
                      "--out", str(out), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--port must be from 1 to 65535, got 70000" in proc.stderr
    assert f"--models {tmp_path / 'nope'}: no such folder" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_start_ui_refuses_a_port_in_use_before_starting(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        out = tmp_path / "ui"
        proc = run_script("start_ui.py", "--port", port, "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"--port {port} cannot be used" in proc.stderr and "choose another" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_main_job_refuses_bad_options_before_starting(tmp_path):
    out = tmp_path / "job"
    proc = run_script("run_main_job.py", "--seed", "-1", "--timeout", "0", "--models",
                      str(tmp_path / "nope"), "--out", str(out), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--seed must be an integer from 0 to 18446744073709551615, got -1" in proc.stderr
    assert "--timeout must be > 0 seconds, got 0.0" in proc.stderr
    assert f"--models {tmp_path / 'nope'}: no such folder" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_main_job_refuses_a_prompt_the_server_would_refuse(capsys):
    parser = argparse.ArgumentParser(prog="run_main_job.py")
    args = argparse.Namespace(models=None, seed=None, prompt="a\x00b", timeout=60.0)
    with pytest.raises(SystemExit) as exit_info:
        check_arguments(parser, args)
    assert exit_info.value.code == 2
    assert "--prompt holds a NUL character" in capsys.readouterr().err
