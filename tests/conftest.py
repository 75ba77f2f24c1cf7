"""Suite-wide settings: one intra-op thread.

The test tensors are tiny, so extra threads only add synchronisation; on a loaded
2-core machine torch's worker threads wait on busy cores and a test can run 10x
slower. One thread also keeps results independent of the machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))  # tests import the shared naive oracles from naive.py
