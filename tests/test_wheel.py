"""The newcomer's path: build the wheel, install it into a fresh venv, run the demo and the README tour.

The venv gets the project's dependencies from this environment (a ``.pth`` file pointing at a folder
of links to this environment's installed packages, the project itself and its editable hooks left
out) so the test needs no network; the project comes only from the wheel (``pip install --no-deps``).
Everything runs from a temporary working directory, so the source tree cannot be imported by accident.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# This environment's own project install, which the fresh venv must not see.
_PROJECT = re.compile(r"^(persona_mw|persona-mw|__editable__|_*editable_+persona|persona_mw_shout)", re.I)

pytestmark = pytest.mark.slow


def _readme_tour() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "Middleware()" in b]
    assert blocks, "README.md has no ```python block with Middleware()"
    return blocks[0]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``python -m build --wheel`` over a copy of the files a release is built from."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("persona_mw", "plugins", "adapters"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    t0 = time.perf_counter()
    # --no-isolation: build with this environment's setuptools instead of downloading one.
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    wheels = list(out.glob("persona_mw-*.whl"))
    assert len(wheels) == 1, wheels
    print(f"\nwheel built in {time.perf_counter() - t0:.1f} s: {wheels[0].name}")
    return wheels[0]


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("persona_mw/__init__.py", "persona_mw/default.yaml", "persona_mw/py.typed",
                     "persona_mw/plugins/stated.py", "persona_mw/plugins/memory.py", "persona_mw/adapters/transformers/__init__.py",
                     "persona_mw/plugins/fermi/__init__.py", "persona_mw/plugins/fermi/optimize.py",
                     "persona_mw/store/sqlite.py", "persona_mw/memory/manager.py", "persona_mw/integrations/litellm.py",
                     "persona_mw/eval/style.py", "persona_mw/api_data.py", "persona_mw/console/routes.py",
                     "persona_mw/console/templates/user.html", "persona_mw/console/templates/base.html",
                     "persona_mw/console/static/console.js", "persona_mw/console/static/console.css"):
        assert required in names, required
    # every module of the source tree's packages is in the wheel
    for folder, prefix in (("persona_mw", "persona_mw"), ("plugins", "persona_mw/plugins"),
                           ("adapters", "persona_mw/adapters")):
        for py in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in py.parts:
                assert f"{prefix}/{py.relative_to(ROOT / folder).as_posix()}" in names, py
    meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "persona-mw = persona_mw.cli:main" in zipfile.ZipFile(wheel).read(meta).decode()


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> dict[str, Path | dict[str, str]]:
    base = tmp_path_factory.mktemp("newcomer")
    env_dir = base / "venv"
    t0 = time.perf_counter()
    venv.EnvBuilder(with_pip=False, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.check_output(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # The dependencies: links to this environment's packages, minus the project and its editable hooks.
    deps = base / "deps"
    deps.mkdir()
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        if _PROJECT.match(entry.name) or entry.suffix == ".pth" or entry.name == "__pycache__":
            continue
        (deps / entry.name).symlink_to(entry)
    (site / "zz_persona_test_deps.pth").write_text(str(deps) + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                           "--disable-pip-version-check", "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"\nfresh venv + wheel install in {time.perf_counter() - t0:.1f} s")
    work = base / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", PERSONA_MW_HOME=str(base / "data"), PATH=f"{env_dir / 'bin'}:{env.get('PATH', '')}")
    env.pop("PERSONA_MW_DISABLE_PLUGIN_AUTOLOAD", None)  # as a newcomer has it: entry points load
    env.pop("PERSONA_MW_CONFIG", None)
    return {"venv": env_dir, "site": site, "cwd": work, "env": env}


def _run(v, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.perf_counter()
    proc = subprocess.run(list(args), cwd=v["cwd"], env=v["env"], capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


def test_installed_from_the_wheel_not_the_source_tree(fresh_venv):
    v = fresh_venv
    proc, _ = _run(v, str(v["venv"] / "bin" / "python"), "-c",
                   "import persona_mw, persona_mw.plugins, persona_mw.adapters, importlib.metadata as m;"
                   "print(persona_mw.__file__); print(persona_mw.plugins.__file__); print(persona_mw.adapters.__file__);"
                   "print(len(list(m.distributions(name='persona-mw'))))")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split()
    for path in lines[:3]:
        assert Path(path).is_relative_to(v["site"]), f"{path} is not from the fresh venv's site-packages"
        assert not Path(path).is_relative_to(ROOT)
    assert lines[3] == "1"  # one persona-mw distribution visible: the wheel's
    proc, _ = _run(v, str(v["venv"] / "bin" / "persona-mw"), "plugins")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("stated", "memory", "rerank", "fermi", "contrast"):
        assert name in proc.stdout


def test_demo_runs_from_the_wheel(fresh_venv):
    v = fresh_venv
    proc, seconds = _run(v, str(v["venv"] / "bin" / "persona-mw"), "demo")
    print(f"\npersona-mw demo from the wheel: {seconds:.1f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = re.findall(r"^A: (.*?)^trace ", proc.stdout, re.M | re.S)
    assert len(answers) == 2 and all(a.strip() for a in answers), proc.stdout
    assert proc.stdout.count("=== user") == 2
    assert "Traceback" not in proc.stderr


def test_readme_tour_runs_from_the_wheel(fresh_venv):
    v = fresh_venv
    script = v["cwd"] / "readme_tour.py"
    script.write_text(_readme_tour(), encoding="utf-8")
    proc, seconds = _run(v, str(v["venv"] / "bin" / "python"), str(script))
    print(f"\nREADME tour from the wheel: {seconds:.1f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r"^ana: (.*?)^ben: (.*?)^trace ", proc.stdout, re.M | re.S)  # then reply.trace.render()
    assert found, proc.stdout
    assert found.group(1).strip() and found.group(2).strip(), proc.stdout
    # The embedded default personalizes: ana asked for one short sentence, ben for detail.
    assert len(found.group(1).split()) < len(found.group(2).split()), proc.stdout
    # the store went where PERSONA_MW_HOME says, not into the source tree or the cwd
    assert (Path(v["env"]["PERSONA_MW_HOME"]) / "persona.db").exists()
