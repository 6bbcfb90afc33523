#!/usr/bin/env python
"""d2-focalstar: RetinaNet with the modified focal loss FL*, as a detectron2 project."""
from setuptools import find_packages, setup

setup(
    name="d2_focalstar",
    version="0.1.0",
    description="RetinaNet with the modified focal loss FL* = -a_t ((1-p_t)/p_t)^g log(p_t) on detectron2",
    packages=find_packages(include=["d2_focalstar", "d2_focalstar.*"]),
    python_requires=">=3.9",
    # detectron2 is deliberately absent: it is not on PyPI under that name, and a
    # user's own CUDA build must not be replaced. tools/setup_env.sh installs it.
    install_requires=[
        "torch>=2.1,<=2.14.1",
        "torchvision>=0.16,<=0.29.1",
        "fvcore>=0.1.5.post20221221",
        "pycocotools>=2.0.7",
        "faster-coco-eval>=1.8.0",
        "submitit>=1.5.4",
        "opencv-python>=4.8",
    ],
    extras_require={"test": ["pytest"]},
)
