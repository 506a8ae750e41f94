"""tokenworks: disaggregated LLM inference (prefill and decode in separate worker pools)."""

from tokenworks.outputs import RequestOutput
from tokenworks.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "AsyncLLM"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The offline API pulls in torch; load it only when asked for.
    if name == "LLM":
        from tokenworks.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from tokenworks.async_llm import AsyncLLM

        return AsyncLLM
    raise AttributeError(name)
