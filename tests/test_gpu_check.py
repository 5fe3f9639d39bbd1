"""The GPU check's short mode: the same stages as on a GPU, a few steps each, on this machine."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_short_mode_writes_every_figure(tmp_path, data_dir):
    out = tmp_path / "figures"
    env = {**os.environ, "GPU_CHECK_SHORT": "1", "MNIST_GZ": str(tmp_path / "no-gz-here"),
           "MNIST_DATA_DIR": str(data_dir), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / ".ci" / "gpu-check"), str(out)], capture_output=True,
                          text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {path.name for path in out.iterdir()} == {
        "machine.txt", "device-tests.txt", "notebooks.txt", "benchmark-auto.txt", "summary.tsv", "summary.txt"}
    stages = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()]
    assert [name for name, *_ in stages] == ["device-tests", "benchmark-auto"]
    assert all(status == "exit 0" for *_, status in stages)
    assert " passed" in (out / "device-tests.txt").read_text()
    result = json.loads((out / "benchmark-auto.txt").read_text())
    machine = (out / "machine.txt").read_text().strip().splitlines()[-1]
    assert result["device"] == machine and set(result["runs"]) == {"512", "256"}
    assert all(rate > 0 for rate in result["images_per_s"].values())
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0] == machine and len(summary) == 4  # the machine, two runs, the rates
    assert summary[1].startswith(f"--precision auto ({result['precision']}), 512 images: 1 epoch(s) in ")
