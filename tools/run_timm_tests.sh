#!/usr/bin/env bash
# timm's own model tests on sgformer_s/m/b, as timm runs them for its models.
#
#   tools/run_timm_tests.sh DIR
#
# downloads timm's source release for the installed timm version (pip download --no-binary), unpacks
# it into DIR without its timm/ package (so that its tests test the installed timm), adds a
# conftest.py that only imports sgattn (which registers the models with timm) and runs its
# tests/test_models.py -k sgformer unmodified. With SGATTN_TIMM_TESTS_DIR=DIR, tests/test_timm.py
# also calls timm's tests that select models by timm's own module list with sgformer's names.
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 DIR (where timm's source release is unpacked)" >&2
  exit 2
fi
dir=$1
version=$(python -c "import timm; print(timm.__version__)")
mkdir -p "$dir"
download=$(mktemp -d)
python -m pip download -q --no-binary :all: --no-deps "timm==$version" -d "$download"
tar xzf "$download/timm-$version.tar.gz" -C "$dir" --strip-components=1
rm -rf "$download" "$dir/timm"
echo "import sgattn  # noqa: F401  (registers sgformer_s/m/b with timm)" > "$dir/conftest.py"

# The only deselected tests, and why:
echo "timm $version tests/test_models.py -k sgformer; deselected: test_model_forward_torchscript and"
echo "  test_model_forward_fx_torchscript, because TorchScript is not supported (README, timm section):"
echo "  sgattn's attention ops check their inputs and choose a backend in Python on every call, which"
echo "  torch.jit.script cannot compile"
cd "$dir"
# -W: timm marks tests with pytest-timeout's marker, which is not installed here
python -m pytest -q -rfEs -p no:cacheprovider -W ignore::pytest.PytestUnknownMarkWarning \
  tests/test_models.py -k sgformer \
  --deselect tests/test_models.py::test_model_forward_torchscript \
  --deselect tests/test_models.py::test_model_forward_fx_torchscript
