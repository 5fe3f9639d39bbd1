"""The GPU check's short mode: the same stages as on a GPU, a few steps each, on this machine."""
import json
import os
import subprocess

from conftest import ROOT


def test_gpu_check_short_mode_writes_every_figure(tmp_path, data_dir):
    out = tmp_path / "figures"
    env = {**os.environ, "GPU_CHECK_SHORT": "1", "MNIST_GZ": str(tmp_path / "no-gz-here"),
           "MNIST_DATA_DIR": str(data_dir)}
    done = subprocess.run(["bash", str(ROOT / ".ci" / "gpu-check"), str(out)], capture_output=True,
                          text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {"machine.txt", "unit-tests.txt", "notebook.txt", "benchmark.txt", "summary.tsv"} <= {
        path.name for path in out.iterdir()}
    stages = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()]
    assert [name for name, *_ in stages] == ["unit-tests", "benchmark"]
    assert all(status == "exit 0" for *_, status in stages)
    assert " passed" in (out / "unit-tests.txt").read_text()
    result = json.loads((out / "benchmark.txt").read_text())
    assert result["device"] == (out / "machine.txt").read_text().strip().splitlines()[-1]
    assert set(result["runs"]) == {"512", "256"}
    assert all(rate > 0 for rate in result["images_per_s"].values())
