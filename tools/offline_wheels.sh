#!/usr/bin/env bash
# Builds a wheelhouse for a GPU node that has torch, torchvision, numpy, matplotlib, opencv,
# pyyaml, tabulate, tqdm, cloudpickle, portalocker, Pillow and tensorboard but no package index (an offline cluster node, or the
# project's lent GPU machine): detectron2 and the rest of what this project needs on top.
#
#   bash tools/offline_wheels.sh [PYTHON_VERSION] [DIR]      # defaults: 3.12 .whl
#
# Then, on the node, from the repo root (no network needed):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   python3 -c "import zipfile, glob; zipfile.ZipFile(glob.glob('.whl/detectron2/*.whl')[0]).extractall('/tmp/site')"
#   export PYTHONPATH=/tmp/site:$PWD
# tools/gpu_checks.sh does exactly that when it finds DIR.
#
# detectron2 is the hash-pinned sal-detectron2 wheel of tools/setup_env.sh. It is tagged cp310,
# so it goes to DIR/detectron2/ and is unzipped rather than pip-installed; its compiled _C is then
# never loaded (RetinaNet does not need it). fvcore, iopath and antlr4-python3-runtime are source-only
# on the index, so their wheels are built here (pure Python, any version of Python 3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
DIR=${2:-.whl}
PY=${PYTHON:-python3}
D2_WHEEL_REQ="sal-detectron2==0.7.2 --hash=sha256:491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"

mkdir -p "$DIR/detectron2"
quiet() { "$@" 2>&1 | { grep -v -E "^WARNING: Location '|^\[notice\]" || true; }; }
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done

echo "[wheels] for Python $PYV into $DIR/"
# One version of each: pins that agree with requirements.txt (a second version of a package stops
# the whole --no-deps install on the node).
quiet "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PYV" --implementation cp "${platforms[@]}" -d "$DIR" \
  "pycocotools==2.0.11" "yacs==0.1.8" "termcolor==3.3.0" \
  "omegaconf==2.3.1" "hydra-core==1.3.8" "setuptools==80.10.2" \
  "faster-coco-eval==1.8.0" "submitit==1.5.4"
quiet "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$DIR" \
  "fvcore==0.1.5.post20221221" "iopath==0.1.10" "antlr4-python3-runtime==4.9.3"
req=$(mktemp)
echo "$D2_WHEEL_REQ" >"$req"
quiet "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.10 --require-hashes -d "$DIR/detectron2" -r "$req"
rm -f "$req"
ls -1 "$DIR" "$DIR/detectron2" | sed 's/^/[wheels]   /'
du -sh "$DIR" | sed 's/^/[wheels] total /'
