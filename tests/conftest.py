import os

# Tiny models: one thread per process is faster than several (thread start-up dominates), and the
# subprocesses the tests start (CLI runs, torchrun ranks) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from mmloom.testing import tiny_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    """Byte-level BPE tokenizer with Llama specials (<s>=0, </s>=1, <unk>=2, <pad>=3) and <image>."""
    return tiny_tokenizer()
