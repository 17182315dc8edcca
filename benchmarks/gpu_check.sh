#!/bin/bash
# The GPU check of benchmarks/scale.py, as run on a lent GPU machine from the repository root:
# (b) the streamed load of a 1.18B-parameter slice, (c) the projection from per-token costs
# measured on the GPU, (d) a short pm-lens run at Llama-3-8B widths in bfloat16.
# On a machine without pm_lens's dependencies, carry their wheels in .whl/ (see the note in
# benchmarks/README.md); .devstub/ holds a stand-in for wandb, which sae_lens imports and never uses here.
set -u
source benchmarks/device_env.sh
python3 -c "import torch, transformers, pyarrow; print('torch', torch.__version__, 'transformers', transformers.__version__, 'pyarrow', pyarrow.__version__)"
python3 benchmarks/scale.py load --layers 3 --device cuda --tmp /tmp --no-compare
python3 benchmarks/scale.py project --device cuda --layers 2 --tokens 512 --tmp /tmp
python3 benchmarks/scale.py wide-run --device cuda --layers 4 --pairs 32 --tmp /tmp
