import os

import pytest

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device for the engine under test (cpu, cuda)")


@pytest.fixture(scope="session")
def device(request):
    return request.config.getoption("--device")


@pytest.fixture(scope="session")
def default_model_path():
    from tokenworks.model.weights import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def llm(device):
    """The real default model, float32 throughout (its GGUF blocks dequantized), prefix caching on."""
    from tokenworks import LLM

    return LLM(dtype="float32", device=device, quantization="none")


@pytest.fixture(scope="session")
def served_llm(device):
    """The default model as `tokenworks serve` runs it by default (on CPU: its 4-bit layers as 4-bit)."""
    from tokenworks import LLM

    return LLM(device=device)


@pytest.fixture(scope="session")
def hf_reference(default_model_path):
    """transformers' own reading of the same GGUF file: an independent reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(default_model_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    model.eval()
    return tok, model
