"""The distributions a user gets: the sdist and the wheel built from it (``python -m build``,
in an isolated build environment, without a warning), the wheel installed without extras
into a clean venv and used there, so that a file missing from the wheel fails the suite.

The clean venv gets torch without installing it again (its 1 GB takes ~30 s to unpack on two
cores): torch, numpy and their requirements, read from their metadata, are linked from this
environment into the new venv's otherwise empty site-packages. pip then installs the wheel
*with* its dependencies but without any index or config (``--no-index``, no find-links), so
it fails unless the wheel's requirements are met by what torch and numpy bring; nothing else
is importable there (no transformers, no torchdata, no pytest, not this checkout).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import torch_seqreptile

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_FILES = {
    path.relative_to(ROOT).as_posix()
    for path in (ROOT / "torch_seqreptile").rglob("*")
    if path.is_file() and "__pycache__" not in path.parts
}

USE_THE_WHEEL = """
import importlib.metadata
import importlib.resources
import sys
import sysconfig
from pathlib import Path

import torch

import torch_seqreptile
from torch_seqreptile import SeqReptile

site = Path(sysconfig.get_path("purelib"))
assert Path(torch_seqreptile.__file__).parent == site / "torch_seqreptile", torch_seqreptile
assert importlib.metadata.version("torch-seqreptile") == torch_seqreptile.__version__
assert importlib.metadata.metadata("torch-seqreptile")["License-Expression"] == "MIT"
assert importlib.resources.files("torch_seqreptile").joinpath("py.typed").is_file()

# One trajectory of K = 2 SGD steps, then phi <- phi + eta (theta_2 - phi) (Algorithm 1).
torch.manual_seed(0)
model, inner = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
inner.load_state_dict(model.state_dict())
phi = [p.detach().clone() for p in model.parameters()]
opt = SeqReptile(torch.optim.SGD(model.parameters(), lr=0.1), inner_steps=2, outer_lr=0.5)
sgd = torch.optim.SGD(inner.parameters(), lr=0.1)
x, y = torch.randn(8, 4), torch.randn(8, 1)
for net, optimizer in ((model, opt), (inner, sgd)):
    for _ in range(2):
        torch.nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
assert opt.trajectory_step == 0
for p, p0, theta in zip(model.parameters(), phi, inner.parameters()):
    torch.testing.assert_close(p.detach(), p0 + 0.5 * (theta.detach() - p0))

assert "torch_seqreptile.probes" not in sys.modules
probe = torch_seqreptile.probes.TaskGradientProbe(model)
result = probe([lambda: model(x).sum(), lambda: -model(x).sum()])
assert abs(result.cosine[0, 1].item() + 1) < 1e-12, result

for extra, load in [
    ("hf", lambda: importlib.import_module("torch_seqreptile.integrations.transformers")),
    ("stream", lambda: torch_seqreptile.streaming),
]:
    try:
        load()
    except ImportError as error:
        assert f'pip install "torch-seqreptile[{extra}]"' in str(error), error
    else:
        raise AssertionError(f"imported without the [{extra}] extra")
print("used the wheel")
"""


def run(command: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run ``command``, fail with its output unless it succeeds; return its output."""
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    output = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # PYTHONDONTWRITEBYTECODE makes setuptools warn that it skips byte-compiling.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    log = run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], env=env)
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    assert not warnings, "\n".join(warnings)
    return out


def test_sdist_holds_the_package_and_license_and_no_tests(dist_dir: Path) -> None:
    (sdist,) = dist_dir.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {m.name.split("/", 1)[1] for m in archive.getmembers() if m.isfile()}
    assert {"LICENSE", "README.md", "pyproject.toml"} <= names
    assert {n for n in names if n.startswith("torch_seqreptile/")} == PACKAGE_FILES
    assert not [n for n in names if n.startswith("tests") or n.endswith("conftest.py")]


def test_wheel_holds_every_package_file(dist_dir: Path) -> None:
    (wheel,) = dist_dir.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n for n in names if n.startswith("torch_seqreptile/")} == PACKAGE_FILES
    dist_info = f"torch_seqreptile-{torch_seqreptile.__version__}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names


def requirement_closure(names: list[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions ``names`` and everything they require (without extras)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        key = canonicalize_name(dist.metadata["Name"])
        if key not in found:
            found[key] = dist
            requirements = map(Requirement, dist.requires or [])
            todo += [
                r.name for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})
            ]
    return list(found.values())


def link_into(site: Path, dist: importlib.metadata.Distribution) -> None:
    """Make ``dist`` (its packages, modules and metadata) installed in ``site``."""
    assert dist.files, f"{dist.metadata['Name']} has no RECORD"
    tops = {Path(str(f)).parts[0] for f in dist.files} - {"..", "__pycache__"}
    for top in tops:
        if not (site / top).exists():
            (site / top).symlink_to(Path(str(dist.locate_file(top))))


def test_wheel_installed_without_extras_in_a_clean_venv_works(
    dist_dir: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(
        run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).split()[
            0
        ]
    )
    for dist in requirement_closure(["torch", "numpy"]):
        link_into(site, dist)
    (wheel,) = dist_dir.glob("*.whl")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index"]
    run([*pip, "--disable-pip-version-check", "--no-cache-dir", str(wheel)], env=env)
    script = tmp_path / "use_the_wheel.py"
    script.write_text(USE_THE_WHEEL)
    assert "used the wheel" in run([str(python), "-I", str(script)], cwd=tmp_path)


def test_streaming_without_torchdata_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in {"torchdata", *(m for m in sys.modules if m.startswith("torchdata."))}:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "torch_seqreptile.streaming", raising=False)
    if "streaming" in vars(torch_seqreptile):  # (hasattr would import it)
        monkeypatch.delattr(torch_seqreptile, "streaming")
    with pytest.raises(ImportError, match=r'pip install "torch-seqreptile\[stream\]"'):
        _ = torch_seqreptile.streaming


def test_lazy_submodules_are_listed_and_imported_on_first_use() -> None:
    code = """
import sys
import torch_seqreptile as t
lazy = {f"torch_seqreptile.{name}" for name in ("integrations", "probes", "streaming")}
assert not lazy & set(sys.modules)
assert {"distributed", "integrations", "probes", "streaming", "surgery"} <= set(dir(t))
assert t.probes.TaskGradientProbe is sys.modules["torch_seqreptile.probes"].TaskGradientProbe
try:
    t.no_such_name
except AttributeError as error:
    print(error)
"""
    out = run([sys.executable, "-c", code], cwd=ROOT)
    assert "module 'torch_seqreptile' has no attribute 'no_such_name'" in out
