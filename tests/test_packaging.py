"""Packaging: the declared requirements say what was tested, and installing the project into a
user's environment leaves their torch, torchvision and cv2 alone (pip's resolver in --dry-run
mode against stand-in distributions: nothing is downloaded or installed)."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAP = re.compile(r"(<|<=|==|~=|!=)\s*\d")


def uncommented_caps(lines):
    """Requirement lines with an upper cap (or a pin) that have no comment on the same line or on
    the line above, where the comment names the break the cap avoids."""
    bad = []
    for i, line in enumerate(lines):
        text = line.split("#", 1)[0]
        if not CAP.search(text) or not re.search(r"[A-Za-z]", text):
            continue
        commented = "#" in line or (i > 0 and lines[i - 1].strip().startswith("#"))
        if not commented:
            bad.append(line.strip())
    return bad


def setup_requirement_lines():
    """The lines of setup.py that hold a requirement string (in install_requires or an extra)."""
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    return [
        (line if re.match(r'\s*"[A-Za-z][\w.-]*(\[[\w,-]+\])?\s*[<>=!~]', line) else "")
        if not line.strip().startswith("#")
        else line
        for line in lines
    ]


def test_every_upper_cap_names_its_break():
    with open(os.path.join(REPO, "requirements.txt"), encoding="utf-8") as f:
        assert uncommented_caps(f.read().splitlines()) == []
    assert uncommented_caps(setup_requirement_lines()) == []
    # the check itself: a bare cap is caught, a commented one is not
    assert uncommented_caps(["torch>=2.1,<=2.14.1"]) == ["torch>=2.1,<=2.14.1"]
    assert uncommented_caps(["# pkg_resources is gone in 81", "setuptools<81"]) == []
    assert uncommented_caps(['    "iopath<0.1.10",  # upstream detectron2 caps it']) == []


def test_torch_is_capped_only_in_the_mirror_constraints():
    text = open(os.path.join(REPO, "setup.py"), encoding="utf-8").read()
    reqs = open(os.path.join(REPO, "requirements.txt"), encoding="utf-8").read()
    for name in ("torch", "torchvision"):
        for source in (text, reqs):
            for m in re.finditer(rf'^\s*"?{name}([<>=!~][^"\n#]*)', source, re.M):
                assert "<" not in m.group(1), f"{name}{m.group(1)}: capped outside the constraints"
    assert "opencv" not in "".join(re.findall(r"INSTALL_REQUIRES = \[(.*?)\]", text, re.S))
    mirror = open(os.path.join(REPO, "tools", "constraints-mirror.txt"), encoding="utf-8").read()
    assert re.search(r"^torch<=", mirror, re.M)
    setup_env = open(os.path.join(REPO, "tools", "setup_env.sh"), encoding="utf-8").read()
    assert "constraints-mirror.txt" in setup_env


def _wheel(folder, name, version):
    """A stand-in wheel: metadata only."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = os.path.join(folder, f"{dist}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(
            f"{dist}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        )
        z.writestr(
            f"{dist}.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr(f"{dist}.dist-info/RECORD", "")


def _installed(site, name, version):
    """A stand-in installed distribution: its dist-info, as pip and importlib.metadata see it."""
    info = os.path.join(site, f"{name.replace('-', '_')}-{version}.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def _dry_run(tmp_path, *targets):
    """What ``pip install`` would install into this environment, with the stand-ins in front of
    its own torch, torchvision and cv2: {name: version} of pip's --dry-run --report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PYTHONPATH=str(tmp_path / "site"), PIP_NO_INPUT="1")
    report = tmp_path / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--quiet",
        "--report",
        str(report),
        "--no-index",
        "--find-links",
        str(tmp_path / "wheels"),
        "--no-build-isolation",
        "--disable-pip-version-check",
        *targets,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(report) as f:
        items = json.load(f)["install"]
    return {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"] for i in items}


@pytest.fixture
def user_environment(tmp_path):
    """An environment holding a torch and torchvision newer than any this machine serves and
    opencv-python-headless's cv2; the index (find-links) offers the versions an old capped
    requirement would pick, and opencv-python."""
    (tmp_path / "wheels").mkdir()
    for name, version in (
        ("torch", "2.14.1"),
        ("torchvision", "0.29.1"),
        ("opencv-python", "4.10.0.84"),
        ("opencv-python-headless", "4.10.0.84"),
    ):
        _wheel(str(tmp_path / "wheels"), name, version)
    for name, version in (
        ("torch", "99.0"),
        ("torchvision", "99.1"),
        ("opencv-python-headless", "4.9.0.80"),
    ):
        _installed(str(tmp_path / "site"), name, version)
    # the project's metadata is built from a copy: nothing is written into the checkout
    src = tmp_path / "src"
    (src / "d2_focalstar").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "setup.py"), src)
    shutil.copy(os.path.join(REPO, "d2_focalstar", "__init__.py"), src / "d2_focalstar")
    return tmp_path


def test_install_keeps_a_users_newer_torch_and_their_cv2(user_environment):
    import d2_focalstar

    planned = _dry_run(user_environment, f"{user_environment / 'src'}[all]")
    assert set(planned) == {"d2-focalstar"}, f"pip would install {sorted(planned)} too"
    meta = planned["d2-focalstar"]
    assert meta["version"] == d2_focalstar.__version__  # the single source
    # the optional packages are extras, not hard requirements
    for name, extra in (("submitit", "slurm"), ("faster-coco-eval", "fast-eval"), ("ruff", "dev")):
        lines = [r for r in meta["requires_dist"] if r.startswith(name)]
        assert any(f'extra == "{extra}"' in r for r in lines), lines
        assert all("extra ==" in r for r in lines), lines

    # no OpenCV distribution by name: it would overwrite the user's cv2 (this venv's own
    # opencv-python is visible to pip here, so the plan alone cannot show that)
    assert not [r for r in meta["requires_dist"] if r.startswith("opencv") and "extra ==" not in r]

    # the same resolver with the old caps would replace the user's torch: the test can fail
    planned = _dry_run(user_environment, "torch>=2.1,<=2.14.1", "torchvision>=0.16,<=0.29.1")
    assert planned["torch"]["version"] == "2.14.1" and planned["torchvision"]["version"] == "0.29.1"


def test_licence_citation_and_changelog_agree_with_the_version():
    import yaml

    import d2_focalstar

    with open(os.path.join(REPO, "CITATION.cff"), encoding="utf-8") as f:
        citation = yaml.safe_load(f)
    assert str(citation["version"]) == d2_focalstar.__version__
    assert citation["license"] == "Apache-2.0"
    with open(os.path.join(REPO, "LICENSE"), encoding="utf-8") as f:
        assert "Apache License" in f.read(200)
    assert os.path.isfile(os.path.join(REPO, "CHANGELOG.md"))
