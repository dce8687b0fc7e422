import pytest
import torch

from mmloom.testing import tiny_tokenizer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    """Byte-level BPE tokenizer with Llama specials (<s>=0, </s>=1, <unk>=2, <pad>=3) and <image>."""
    return tiny_tokenizer()
