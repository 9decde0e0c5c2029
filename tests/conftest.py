"""Test-wide settings.

- The suite's models are tiny, and on tiny tensors torch's intra-op thread pool costs more
  than it gives (spin-waiting on a 2-core machine), so every test runs on one thread.
- Caches (bench results, BOSS tables, caption embeddings) go to a fresh folder per session
  unless FLOWKIT_CACHE is set, so a run never depends on what an earlier one left behind.
"""

import os
import tempfile

import torch

torch.set_num_threads(1)
os.environ.setdefault("FLOWKIT_CACHE", tempfile.mkdtemp(prefix="flowkit-test-cache-"))
