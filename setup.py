#!/usr/bin/env python
"""d2-focalstar: RetinaNet and FCOS with the modified focal loss FL*, as a detectron2 project.

Installing it into an environment that already has torch, torchvision, detectron2 and a cv2 keeps
them: no requirement here has an upper cap on torch or torchvision, and OpenCV is not required by
distribution name (opencv-python, opencv-python-headless and the contrib builds all provide cv2
and overwrite each other; detectron2's own setup.py does not list it either).
"""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def version():
    """d2_focalstar.__version__, read without importing the package (that needs torch)."""
    with open(os.path.join(HERE, "d2_focalstar", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


# Lower bounds: torch 2.11 / torchvision 0.26 from the GPU machine's checks (tools/gpu_checks.sh),
# fvcore, iopath, pycocotools and portalocker from the versions the CPU test suite passes on;
# numpy, Pillow, PyYAML, matplotlib: detectron2's own floors (none, or Pillow 7.1). An upper cap
# only where a break is known, with a comment naming it (tests/test_packaging.py checks that).
# detectron2 is deliberately absent: it is not on PyPI under that name, and a user's own CUDA
# build must not be replaced; tools/setup_env.sh installs it where it is missing.
INSTALL_REQUIRES = [
    "torch>=2.11",
    "torchvision>=0.26",
    "fvcore>=0.1.5.post20221221",
    "iopath>=0.1.9,<0.1.10",  # upstream detectron2's cap: its setup.py excludes 0.1.10
    "portalocker>=4.4",  # run-folder locks (d2_focalstar/run/lock.py)
    "pycocotools>=2.0.11",
    "numpy",
    "Pillow>=7.1",
    "PyYAML",
    "matplotlib",
]

EXTRAS = {
    "slurm": ["submitit>=1.5.4"],  # tools/submit_slurm.py, tools/sweep.py --slurm
    "fast-eval": ["faster-coco-eval>=1.8.0"],  # COCO AP in C++; pycocotools is the fallback
    # for an environment without any cv2 (demo.py, the embedded dataset); skip it where
    # opencv-python-headless or another OpenCV build is already there
    "opencv": ["opencv-python>=4.8"],
    "test": ["pytest>=7", "scikit-learn"],
    "dev": ["ruff>=0.15"],
}
EXTRAS["dev"] += EXTRAS["test"]
EXTRAS["all"] = sorted({r for name in ("slurm", "fast-eval", "test", "dev") for r in EXTRAS[name]})

setup(
    name="d2_focalstar",
    version=version(),
    description="RetinaNet and FCOS with the modified focal loss "
    "FL* = -a_t ((1-p_t)/p_t)^g log(p_t) on detectron2",
    license="Apache-2.0",
    packages=find_packages(include=["d2_focalstar", "d2_focalstar.*"]),
    python_requires=">=3.9",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
