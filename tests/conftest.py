"""Test-wide settings: the suite's models are tiny, and on tiny tensors torch's intra-op
thread pool costs more than it gives (spin-waiting on a 2-core machine), so every test runs
on one thread."""

import torch

torch.set_num_threads(1)
