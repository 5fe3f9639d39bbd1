"""Where students open the notebooks: the Colab badges, and each notebook's set-up cell, run as
the notebook holds it in an empty folder, under a stand-in for Colab where it matters."""
import json
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

import publish
from conftest import ROOT

NOTEBOOKS = [ROOT / name for name in publish.NOTEBOOKS]
BADGE = re.compile(r"colab\.research\.google\.com/github/([^/\s)]+/[^/\s)]+)/blob/main/([\w.]+\.ipynb)")


def setup_cell(notebook) -> str:
    """The notebook's set-up: its first code cell, as the notebook holds it."""
    cells = json.loads(notebook.read_text())["cells"]
    return next("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")


REPO, RELEASE = re.search(r'^REPO, RELEASE = "([^"]+)", "([^"]+)"', setup_cell(NOTEBOOKS[0]), re.MULTILINE).groups()
FILES = json.loads(re.search(r"^FILES = (\[.*?\])", setup_cell(NOTEBOOKS[0]), re.MULTILINE | re.DOTALL)[1])

# A driver for the set-up cell: stand-ins for Colab's upload dialog (which saves a file whose
# name is taken as "name (1).py", as Colab does) and for the network, then the cell itself.
DRIVER = r'''
import json, os, sys, types, urllib.request
plan = json.loads(open("plan.json").read())
for module in plan["imported_before"]:  # a stale module already imported, as after a first run
    __import__(module)
if plan["uploads"] is not None:
    def upload():
        sent = {name: open(path, "rb").read() for name, path in plan["uploads"].items()}
        for name, data in sent.items():
            saved, count = name, 0
            while os.path.lexists(saved):
                count += 1
                saved = "{} ({}){}".format(*os.path.splitext(name)[:1], count, os.path.splitext(name)[1])
            open(saved, "wb").write(data)
        print("dialog opened; uploaded", sorted(sent))
        return sent
    google, colab, files = (types.ModuleType(name) for name in ("google", "google.colab", "google.colab.files"))
    files.upload, colab.files, google.colab = upload, files, colab
    sys.modules.update({"google": google, "google.colab": colab, "google.colab.files": files})
real_urlopen = urllib.request.urlopen
def urlopen(url, timeout=None):
    print("fetch", url, "timeout", timeout, flush=True)
    if plan["network"] == "down":
        raise urllib.error.URLError("no network")
    if plan["network"] == "stalled":  # a server that accepts and never answers
        return real_urlopen(f"http://127.0.0.1:{plan['port']}/", timeout=timeout)
    return open(os.path.join(plan["root"], url.rsplit("/", 1)[1]), "rb")
urllib.request.urlopen = urlopen
exec(compile(open("setup.py").read(), "set-up cell", "exec"), {"__name__": "__main__"})
print("imported", json.dumps({name: sys.modules[name].__file__ for name in ("helpers", "drawing")}))
print("releases", sorted({sys.modules[name[:-3]].__version__ for name in plan["files"]}))
'''


def run_setup(folder, notebook=NOTEBOOKS[0], uploads=None, network="up", imported_before=(), port=0):
    """The set-up cell of `notebook` run in `folder`, in a fresh Python: `uploads` ({name: path}
    or None outside Colab) is what the upload dialog sends."""
    folder.mkdir(exist_ok=True)
    (folder / "setup.py").write_text(setup_cell(notebook))
    (folder / "driver.py").write_text(DRIVER)
    (folder / "plan.json").write_text(json.dumps({
        "uploads": None if uploads is None else {name: str(path) for name, path in uploads.items()},
        "network": network, "port": port, "root": str(ROOT), "imported_before": list(imported_before),
        "files": FILES}))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "driver.py"], cwd=folder, capture_output=True, text=True,
                          timeout=300, check=False)
    return done, time.perf_counter() - started


def notebook_setup_without_imports(notebook):
    """The set-up but its line importing the project's modules: each notebook imports those it uses."""
    return [line for line in setup_cell(notebook).splitlines() if not line.startswith("import torch, helpers as h")]


def published_copy(tmp_path, name="ada/mnist-digit-sum"):
    """README and notebooks copied, then published under `name` by publish.py."""
    copy = tmp_path / "published"
    copy.mkdir()
    for path in ("README.md", *publish.NOTEBOOKS):
        shutil.copy(ROOT / path, copy / path)
    publish.publish(name, copy)
    return copy


def every_file():
    return {name: ROOT / name for name in FILES}


def test_every_badge_and_set_up_names_one_repository():
    """The README's badge, each notebook's badge (opening that notebook) and each set-up: one
    name, and until publish.py names the real one, a placeholder no one can hold."""
    readme = BADGE.findall((ROOT / "README.md").read_text())
    assert [notebook for _, notebook in readme] == [NOTEBOOKS[0].name]
    names = {repo for repo, _ in readme}
    for notebook in NOTEBOOKS:
        badges = BADGE.findall(notebook.read_text())
        assert badges and all(target == notebook.name for _, target in badges)
        names |= {repo for repo, _ in badges}
        names.add(re.search(r'^REPO, RELEASE = "([^"]+)"', setup_cell(notebook), re.MULTILINE)[1])
    assert names == {REPO}
    assert [notebook_setup_without_imports(notebook) for notebook in NOTEBOOKS] == [notebook_setup_without_imports(NOTEBOOKS[0])] * 2
    owner = REPO.split("/")[0]
    assert REPO == publish.PLACEHOLDER and "_" in owner or publish._NAME.fullmatch(REPO)


def test_publishing_names_the_repository_everywhere_in_one_step(tmp_path):
    copy = published_copy(tmp_path)
    assert publish.named_repository(copy) == "ada/mnist-digit-sum"
    for path in ("README.md", *publish.NOTEBOOKS):
        text = (copy / path).read_text()
        assert publish.PLACEHOLDER not in text and "colab.research.google.com/github/ada/mnist-digit-sum/" in text
    for notebook in publish.NOTEBOOKS:  # nothing else changed: the same cells, still valid JSON
        before, after = (json.loads((folder / notebook).read_text())["cells"] for folder in (ROOT, copy))
        changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
        assert len(before) == len(after) and len(changed) == 2  # the badge's cell and the set-up
    publish.publish("ada/another-name", copy)  # and again, from a published name
    assert publish.named_repository(copy) == "ada/another-name"
    for wrong in ("ada", "-ada/x", "ada_lovelace/x", "ada/x y", "a/b/c"):
        with pytest.raises(ValueError, match="not a GitHub repository's name"):
            publish.publish(wrong, copy)
    done = subprocess.run([sys.executable, str(ROOT / "publish.py"), "nobody_here/x"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 2 and done.stderr.startswith("error: 'nobody_here/x' is not") and done.stdout == ""


def test_with_the_placeholder_the_set_up_fetches_nothing_and_names_every_file(tmp_path):
    done, _ = run_setup(tmp_path / "empty")
    assert done.returncode != 0 and "fetch" not in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last == (f"FileNotFoundError: {', '.join(FILES)}: missing here, or not release {RELEASE}; "
                    f"get them from the repository this notebook came from")


def test_in_colab_the_set_up_opens_the_upload_dialog_and_imports_what_it_sends(tmp_path):
    folder = tmp_path / "colab"
    done, _ = run_setup(folder, uploads=every_file())
    assert done.returncode == 0, done.stderr
    assert "fetch" not in done.stdout and f"Upload {', '.join(FILES)}" in done.stdout
    imported = json.loads(done.stdout.split("imported ", 1)[1].splitlines()[0])
    assert all(path.startswith(str(folder)) for path in imported.values())


def stale_copies(folder):
    """Every file of the project as an older release would have it."""
    folder.mkdir()
    for name in FILES:
        (folder / name).write_text((ROOT / name).read_text().replace(f'__version__ = "{RELEASE}"', '__version__ = "5.0"'))


def test_a_second_upload_replaces_stale_files_and_stale_modules_without_a_restart(tmp_path):
    folder = tmp_path / "stale"
    stale_copies(folder)
    done, _ = run_setup(folder, uploads=every_file(), imported_before=["helpers", "pictures"])
    assert done.returncode == 0, done.stderr
    assert f"releases ['{RELEASE}']" in done.stdout  # the modules imported before were reloaded
    assert sorted(path.name for path in folder.glob("*.py")) == sorted(FILES + ["driver.py", "setup.py"])


def test_uploading_some_files_names_the_rest_in_one_line(tmp_path):
    done, _ = run_setup(tmp_path / "some", uploads={"helpers.py": ROOT / "helpers.py"})
    assert done.returncode != 0
    rest = ", ".join(name for name in FILES if name != "helpers.py")
    assert done.stderr.strip().splitlines()[-1].startswith(f"FileNotFoundError: {rest}: missing here")


def test_a_named_repository_is_fetched_file_by_file_with_a_timeout(tmp_path):
    copy = published_copy(tmp_path)
    done, _ = run_setup(tmp_path / "fetched", notebook=copy / publish.NOTEBOOKS[0])
    assert done.returncode == 0, done.stderr
    fetched = re.findall(r"fetch (\S+) timeout (\S+)", done.stdout)
    assert [url for url, _ in fetched] == [f"https://raw.githubusercontent.com/ada/mnist-digit-sum/main/{name}"
                                           for name in FILES]
    assert all(timeout != "None" and float(timeout) <= 30 for _, timeout in fetched)


def test_a_failed_fetch_says_so_and_falls_back_to_the_upload_dialog(tmp_path):
    copy = published_copy(tmp_path)
    done, _ = run_setup(tmp_path / "down", notebook=copy / publish.NOTEBOOKS[0], network="down",
                        uploads=every_file())
    assert done.returncode == 0, done.stderr
    assert "Could not fetch the code from github.com/ada/mnist-digit-sum: <urlopen error no network>" in done.stdout
    assert "dialog opened" in done.stdout


def test_a_stalled_network_ends_in_one_line_within_30_seconds(tmp_path):
    copy = published_copy(tmp_path)
    with socket.socket() as server:  # listens, and never accepts nor answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        done, seconds = run_setup(tmp_path / "stalled", notebook=copy / publish.NOTEBOOKS[0], network="stalled",
                                  port=server.getsockname()[1])
    assert seconds < 30 and done.returncode != 0
    assert "Could not fetch the code from github.com/ada/mnist-digit-sum: timed out" in done.stdout
    assert done.stderr.strip().splitlines()[-1].startswith("FileNotFoundError: ")
