# Sourced by the GPU checks (gpu_check.sh, gpu_split.sh) on a lent machine, from the repository root:
# offline settings, and pm_lens's dependencies from the wheels carried in .whl/ (see benchmarks/README.md);
# .devstub/ holds a stand-in for wandb, which sae_lens imports and never uses here.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD/.devstub:$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
