"""bench/gpu_check.py --tiny runs every section on the CPU and writes each one's figures or
the reason it was skipped, so the prepared GPU check never rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

SECTIONS = ("dit_sdpa", "attention", "vae_decode", "memory", "fp8", "peers", "offload",
            "host_partial_load", "compile")  # fmt: skip


def test_tiny_run_writes_every_section(tmp_path):
    out = tmp_path / "check.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["meta"]["mode"] == "tiny"
    assert set(results["sections"]) == set(SECTIONS)
    for name, section in results["sections"].items():
        assert section["status"] in ("ok", "skipped"), (name, section.get("reason"),
                                                         section.get("traceback"))
        assert section.get("figures") or section.get("reason"), name
    assert results["sections"]["dit_sdpa"]["status"] == "ok"
    # this CPU's torch runs _scaled_mm: the fast mode multiplies in fp8, storage never does
    fp8 = results["sections"]["fp8"]["figures"]
    assert fp8["fast"]["scaled_mm_calls_per_step"] > 0
    assert fp8["storage"]["scaled_mm_calls_per_step"] == 0
    assert "gpu_check (tiny" in done.stdout
