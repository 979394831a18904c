"""GPU benchmark: xbn's CUDA kernels vs PyTorch CUDA and the generic CuPy path (see xbn/bench/gpu.py).

python benchmarks/gpu.py [--quick] [--budget-s 60] [--shapes 32x64x56x56 32x56x56x64:-1]
                         [--dtype float16] [--plan]
"""

import sys

from xbn.bench.gpu import main

if __name__ == "__main__":
    sys.exit(main())
