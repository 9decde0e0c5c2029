"""The overhead bench's measuring helpers, and scripts/bench_gpu.py's CPU dry run (its GPU run
needs a device; this checks that the script imports, parses and runs its whole code path)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from flowkit.bench.experiments.overhead import kernel_seconds, peak_memory

from tiny_pipes import one_thread  # noqa: F401

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"


def test_peak_memory_sees_a_transient_allocation():
    def work():
        x = torch.ones(16 * 2**20)  # 64 MiB, freed on return
        return float(x[0])

    mib = peak_memory(work, torch.device("cpu"))
    assert 60 < mib < 100
    assert peak_memory(lambda: None, torch.device("cpu")) < 8  # negative control: nothing allocated


def test_kernel_seconds_times_and_checks_each_kernel():
    out = kernel_seconds((1, 2, 64, 16), 0, ["sdpa", "sdpa-math", "reference"])
    for k in ("sdpa", "sdpa-math", "reference"):
        assert out[k] > 0 and out[f"{k}_err"] < 1e-5
    assert out["reference_err"] == 0.0


def load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_gpu_dry_run(tmp_path, capsys):
    mod = load_script()
    with pytest.raises(SystemExit):
        mod.main(["--models", "sd4", "--dry-run"])  # a bad model name is refused
    assert "choose from sdxl, sd3, flux" in capsys.readouterr().err
    args = ["--dry-run", "--models", "sd3", "--memory-runs", "0", "--out", str(tmp_path), "--cache", str(tmp_path / "c")]
    assert mod.main(args) == 0
    result = json.loads((tmp_path / "gpu.quick.json").read_text())
    rows = {(r["method"], r["metric"]): r for r in result["rows"]}
    assert rows[("sd3", "latent parity")]["treatment_mean"] < 1e-4  # FlowKitPipeline == the SD3 pipeline
    assert rows[("sd3", "wall time")]["verdict"] in ("met", "missed", "inconclusive")
    assert ("reference kernel", "time at flux's attention size") in rows
    assert set(result["info"]["sd3_forward_seconds_by_kernel"]) >= {"sdpa", "sdpa-math", "reference"}
    assert "xformers" in result["info"]["kernels_not_measurable"] or torch.cuda.is_available()
    assert "bottleneck (flux preset)" not in {m for m, _ in rows}  # flux not asked for
    for mode in mod.COMPILE_MODES:  # the torch.compile rows (issue 19), each mode its own compiled network
        assert rows[(f"sd3 compiled ({mode})", "latent parity")]["treatment_mean"] < 1e-4
        assert rows[(f"sd3 compiled ({mode})", "recompiles after warm-up")]["treatment_mean"] == 0
        assert rows[(f"sd3 compiled ({mode})", "wall time")]["baseline"] == "diffusers compiled"
        assert (f"sd3 eager", f"wall time (speed-up of {mode})") in rows
        assert set(result["info"][f"sd3_compile_seconds_{mode}"]) == {"diffusers-compiled", "flowkit-compiled"}
    flux = ["--dry-run", "--models", "flux", "--memory-runs", "0", "--pairs", "1", "--compile-pairs", "0",
            "--out", str(tmp_path / "f"), "--cache", str(tmp_path / "c")]
    assert mod.main(flux) == 0
    result = json.loads((tmp_path / "f" / "gpu.quick.json").read_text())
    row = next(r for r in result["rows"] if r["method"] == "bottleneck (flux preset)")
    assert row["n"] == 1 and row["treatment_mean"] > 0
    assert result["info"]["bottleneck_nfe"] == {"full": 3, "bottleneck": 3}  # the same steps, split over 3 stages
    mod.memory_child("flux", "flowkit", 1, True)  # what each memory subprocess runs
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["variant"] == "flowkit" and line["peak_mib"] >= 0
