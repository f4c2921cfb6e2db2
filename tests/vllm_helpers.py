"""Shared by the vLLM tests: the prompts, the HF + PEFT reference, and vLLM's prompt log-probs.

The reference is transformers + PEFT in float32 (gemma4_bridge.testing.fixtures.load_tiny_model); a prompt
goes to vLLM as text plus raw image/audio and to transformers through the checkpoint's own saved
Gemma4Processor, and the test first checks both expanded to the same token ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

TOL = 1e-3  # the acceptance bound of issue 4 (measured parity is ~1e-6 in float32)
PROMPTS = {
    "text": "the quick brown fox jumps over the lazy dog. gemma four adapters serve",
    "image": "a picture of <|image|> a cat",
    "audio": "a sound of <|audio|> rain",
}


def media(seed: int = 0) -> dict[str, Any]:
    """A random image and audio clip; another seed gives media no engine cache has seen."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return {
        "image": Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
        "audio": (rng.standard_normal(16000) * 0.1).astype(np.float32),
    }


def vllm_request(kind: str, seed: int = 0) -> dict[str, Any]:
    req: dict[str, Any] = {"prompt": PROMPTS[kind]}
    m = media(seed)
    if kind == "image":
        req["multi_modal_data"] = {"image": m["image"]}
    elif kind == "audio":
        req["multi_modal_data"] = {"audio": (m["audio"], 16000)}
    return req


def hf_inputs(model_dir: Path, kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    kw: dict[str, Any] = {"text": PROMPTS[kind], "return_tensors": "pt"}
    if kind == "image":
        kw["images"] = media(seed)["image"]
    elif kind == "audio":
        kw["audio"] = media(seed)["audio"]
    return dict(processor(**kw))


def hf_model(model_dir: Path, adapter: Path | None = None) -> Any:
    from gemma4_bridge.testing.fixtures import load_tiny_model

    model = load_tiny_model(model_dir)
    if adapter is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter).eval()


@torch.no_grad()
def hf_prompt_logprobs(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[list[int], torch.Tensor, int]:
    """(token ids, log-prob of each next prompt token, greedy next token) from transformers."""
    ids = inputs["input_ids"][0].tolist()
    logprobs = torch.log_softmax(model(**inputs).logits[0].float(), -1)
    chosen = logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return ids, chosen, int(logprobs[-1].argmax())


def vllm_prompt_logprobs(output: Any) -> tuple[list[int], torch.Tensor, int]:
    """The same triple from a vLLM RequestOutput made with prompt_logprobs=0 and greedy sampling."""
    ids = list(output.prompt_token_ids)
    chosen = [entry[tok].logprob for entry, tok in zip(output.prompt_logprobs[1:], ids[1:], strict=True)]
    return ids, torch.tensor(chosen), output.outputs[0].token_ids[0]


def assert_parity(vllm_out: Any, hf: tuple[list[int], torch.Tensor, int], what: str) -> float:
    ids, lp, greedy = vllm_prompt_logprobs(vllm_out)
    assert ids == hf[0], f"{what}: vLLM and transformers expanded the prompt differently"
    diff = float((lp - hf[1]).abs().max())
    assert diff < TOL, f"{what}: max |prompt logprob difference| {diff:.3g} >= {TOL}"
    assert greedy == hf[2], f"{what}: greedy token {greedy} (vLLM) != {hf[2]} (transformers)"
    return diff
