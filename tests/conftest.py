"""Test-wide settings.

- The suite's models are tiny, and on tiny tensors torch's intra-op thread pool costs more
  than it gives (spin-waiting on a 2-core machine), so every test runs on one thread.
- Caches (bench results, BOSS tables, caption embeddings) go to a fresh folder per session
  unless FLOWKIT_CACHE is set, so a run never depends on what an earlier one left behind.
"""

import os
import socket
import tempfile

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("FLOWKIT_CACHE", tempfile.mkdtemp(prefix="flowkit-test-cache-"))


@pytest.fixture
def no_network(monkeypatch):
    """Sockets refuse to open: what runs under it must not touch the network."""
    def refuse(*args, **kwargs):
        raise AssertionError("this must not touch the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
