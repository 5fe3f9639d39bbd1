"""The GPU check's short mode: the same stages as on a GPU, a few steps each, on this machine."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_short_mode_writes_every_figure_read_from_stdout_alone(tmp_path, data_dir):
    """Run through a Python that writes a warning to stderr first, as CUDA-only warnings would:
    the figures still come from the benchmark's stdout. MNIST_GZ is absolute and holds nothing."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "UserWarning: a warning only a GPU prints" >&2\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    out = tmp_path / "figures"
    env = {**os.environ, "GPU_CHECK_SHORT": "1", "MNIST_GZ": str(tmp_path / "no-gz-here"),
           "MNIST_DATA_DIR": str(data_dir), "PYTHON": str(python)}
    done = subprocess.run(["bash", str(ROOT / ".ci" / "gpu-check"), str(out)], capture_output=True,
                          text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {path.name for path in out.iterdir()} == {
        "machine.txt", "device-tests.txt", "device-tests.err", "notebooks.txt", "benchmark.txt",
        "benchmark.err", "summary.tsv", "summary.txt"}
    stages = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()]
    assert [name for name, *_ in stages] == ["device-tests", "benchmark"]
    assert all(status == "exit 0" for *_, status in stages)
    assert " passed" in (out / "device-tests.txt").read_text()
    assert "a warning only a GPU prints" in (out / "benchmark.err").read_text()
    result = json.loads((out / "benchmark.txt").read_text())
    machine = (out / "machine.txt").read_text().strip().splitlines()[-1]
    assert result["device"] == machine and set(result["runs"]) == {"512", "256"}
    assert all(rate > 0 for rate in result["images_per_s"].values())
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0] == machine and len(summary) == 4  # the machine, two runs, the rates
    assert summary[1].startswith(f"{result['precision']}, 512 images: 1 epoch(s) in ")
    assert summary[3].startswith("images/s: reference pipeline ")


def test_mnist_unpacks_from_an_absolute_folder(tmp_path):
    """.ci/unpack-mnist with MNIST_GZ's folder given as an absolute path, as gpu-check passes it."""
    shared = (ROOT / ".." / "shared" / "data" / "mnist").resolve()
    if not shared.is_dir():
        return
    work = tmp_path / "project"
    (work / ".ci").mkdir(parents=True)
    (work / ".ci" / "unpack-mnist").write_text((ROOT / ".ci" / "unpack-mnist").read_text())
    done = subprocess.run(["bash", str(work / ".ci" / "unpack-mnist"), str(shared)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in (work / "data" / "MNIST" / "raw").iterdir()) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
