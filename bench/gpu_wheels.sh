#!/usr/bin/env bash
# Wheels a bare GPU machine (torch and transformers installed, no network) lacks for `python -m bench.gpu_check`,
# downloaded here for its Python (3.12, x86-64) into .whl/ (git-ignored). On that machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . && python3 -m bench.gpu_check
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl diffusers==0.42.1 accelerate==1.15.0 pydantic pydantic-core annotated-types typing-inspection \
  typing-extensions fsspec pytest pluggy iniconfig packaging torchao==0.18.0
ls .whl
