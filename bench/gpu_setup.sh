# Source on the GPU machine: installs the carried wheels (.whl/, see docs/benchmarks.md) once per machine.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.done || return 1
fi
export PYTHONPATH=$PWD:/tmp/site
