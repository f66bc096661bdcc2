"""Shared fixtures: tiny random models (Llama-style and GPT-2-style) with promptlab's own small tokenizer
(`promptlab.tiny_tokenizer`, so no model wheel is needed), fixed seeds."""
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The exact-equality tests (mixed batch == alone, resume == uninterrupted, goldens) hold in fp32; the
# precision policy would pick bf16 on CPUs that have it. tests/test_precision.py tests the policy itself.
os.environ.setdefault("PROMPTLAB_PRECISION", "fp32")
# The tiny test models are too small to gain from two threads; one thread keeps the suite steady on a busy machine.
torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One torch thread for the test, whatever an earlier test left set: the exact-equality tests hold on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_base():
    import promptlab as pl

    return pl.load_base_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_gpt2_base():
    import promptlab as pl

    return pl.load_base_model("tiny-gpt2", device="cpu")


@pytest.fixture(params=["tiny", "tiny-gpt2"])
def any_base(request, tiny_base, tiny_gpt2_base):
    """Both tiny architectures: the library must not be Llama-only."""
    return tiny_base if request.param == "tiny" else tiny_gpt2_base


@pytest.fixture
def tasks():
    import promptlab as pl

    return pl.default_tasks()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
