#!/usr/bin/env bash
# Builds .venv/ at the repo root with torch, torchvision, detectron2, fvcore,
# pycocotools, opencv-python (where no cv2 is importable) and this project, editable, with all
# its extras (`-e .[all]`). Safe to re-run.
#
# detectron2 is not on PyPI under its own name. If the interpreter that builds
# the venv can already `import detectron2` (a source build with CUDA, as
# upstream documents), the venv sees it through --system-site-packages and it is
# kept. Otherwise the wheel `sal-detectron2==0.7.2` (a republish of upstream's
# Python code) is installed with --no-deps, checked against a pinned digest.
# Its compiled _C is cp310-only; RetinaNet does not need it.
#
# torch: where the venv uses the user's own detectron2, their torch and torchvision are pinned
# (a constraints file of their versions), so nothing is installed over them. Otherwise torch is
# installed under this machine's mirror limits, tools/constraints-mirror.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
D2_WHEEL_REQ="sal-detectron2==0.7.2 --hash=sha256:491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import detectron2" 2>/dev/null; then
    echo "[setup] $PYTHON already imports detectron2: the venv will use it (--system-site-packages)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
pip_install() {
  # this machine's pip config names index folders that may be absent; drop its warnings about them
  "$PY" -m pip install --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }
}

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
if "$PY" -c "import sys, detectron2; sys.exit(detectron2.__file__.startswith(sys.prefix))" 2>/dev/null; then
  echo "[setup] the user's detectron2 and torch are kept: installing nothing over them"
  "$PY" -c "import torch; print('torch==' + torch.__version__)" >"$constraints"
  "$PY" -c "import torchvision; print('torchvision==' + torchvision.__version__)" >>"$constraints" 2>/dev/null || true
else
  echo "[setup] python packages (torch comes from the local mirror where there is one)"
  cp tools/constraints-mirror.txt "$constraints"
fi
pip_install -q --upgrade pip "setuptools<81" wheel
pip_install -q -c "$constraints" -r requirements.txt
if ! "$PY" -c "import cv2" 2>/dev/null; then
  pip_install -q -c "$constraints" "opencv-python>=4.8"  # the [opencv] extra; an existing cv2 is kept
fi

# the project and its extras (with torch and torchvision where they are not there yet)
pip_install -q -c "$constraints" --no-build-isolation -e ".[all]"

if "$PY" -c "import detectron2" 2>/dev/null; then
  echo "[setup] detectron2 already importable: kept ($("$PY" -c 'import detectron2; print(detectron2.__version__, detectron2.__file__)'))"
else
  echo "[setup] detectron2: installing the hash-pinned sal-detectron2 wheel"
  site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  req=$(mktemp)
  echo "$D2_WHEEL_REQ" >"$req"
  pip_install -q --no-deps --only-binary=:all: --python-version 3.10 \
    --require-hashes --target "$site" --upgrade -r "$req"
  rm -f "$req"
  "$PY" -c "import detectron2; print('[setup] detectron2', detectron2.__version__)"
fi

"$PY" -c "import torch, torchvision, detectron2, fvcore, pycocotools, cv2, d2_focalstar; \
print('[setup] ok: torch', torch.__version__, '| torchvision', torchvision.__version__, \
'| detectron2', detectron2.__version__, '| cuda', torch.cuda.is_available())"
touch "$VENV/.d2_focalstar_installed"
