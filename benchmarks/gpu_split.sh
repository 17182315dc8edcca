#!/bin/bash
# The GPU check of the layer split (issue 13), as run on a lent one-GPU machine from the repository
# root: tests/model/test_split.py, whose splits on a CUDA machine add cuda:0+cpu and cpu+cuda:0
# (layers on the GPU and the CPU: every tensor crossing a layer boundary really moves), and
# cuda:0+cuda:1 where there are two GPUs. Wheels as in benchmarks/gpu_check.sh.
set -u
source benchmarks/device_env.sh
python3 -c "import torch; print('torch', torch.__version__, 'GPUs', torch.cuda.device_count())"
python3 -m pytest -p no:cacheprovider -q -rA --tb=short tests/model/test_split.py 2>&1 | grep -v "warnings.warn\|Warning"
