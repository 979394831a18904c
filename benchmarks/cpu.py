"""CPU benchmark: xbn's NumPy backend vs PyTorch CPU vs naive NumPy (see xbn/bench/cpu.py).

python benchmarks/cpu.py [--threads 1 2] [--shapes 32x64x56x56 32x56x56x64:-1] [--quick]
"""

import sys

from xbn.bench.cpu import main

if __name__ == "__main__":
    sys.exit(main())
