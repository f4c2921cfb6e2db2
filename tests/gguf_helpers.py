"""llama.cpp tooling for the GGUF tests: its converters (fetched from PyPI at test time), a tiny base
llama.cpp can load, and log-probs read from llama.cpp itself through xllamacpp.

* Converters: llama.cpp's ``convert_hf_to_gguf.py`` / ``convert_lora_to_gguf.py`` (+ ``conversion/`` and
  the matching ``gguf-py``) are taken from the llama-cpp-python sdist (PyPI ships llama.cpp's tree
  in it; nothing is committed here). The extracted tools are cached in ``$VIRTUAL_ENV/.cache/`` (the
  test venv), keyed by version, so a second run does not download 76 MB again.
* Base: the text-only tiny Gemma 4 (``Gemma4ForCausalLM``) with two changes llama.cpp needs, made
  here as a variant (shared fixture defaults untouched):
  - tokenizer: llama.cpp's Gemma 4 converter reads a Gemma-style byte-fallback BPE (``LlamaHfVocab``:
    BPE + ``byte_fallback`` + a Sequence decoder, ``<0xNN>`` byte tokens); the shared fixture's is
    byte-level BPE, which it rejects.
  - KV sharing: llama.cpp's gemma4 KV cache reuses layer ``n_kv_from_start - 1`` for shared full
    layers and ``n_kv_from_start - 2`` for shared sliding ones, i.e. it assumes the last two
    non-shared layers are [sliding, full], as in every released Gemma 4. The default fixture (5
    layers, 2 shared: non-shared [S, F, S]) breaks that (GGML_ASSERT in llama-kv-cache.cpp); 3
    shared layers give [S, F | S, S, F], which both transformers and llama.cpp share the same way.
    ``attention_k_eq_v`` (layer 1), per-layer embeddings and two head sizes (32/64) stay on.
* Log-probs: llama-server's completion endpoint with ``n_probs`` = vocab size returns the whole
  next-token distribution after a prompt, computed from the raw logits (``get_token_probabilities``);
  one request per prefix gives every position. ``logit_bias`` forces the one sampled token to a
  plain ASCII one: a sampled partial UTF-8 byte token would make the server withhold ``logprobs``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import torch

from gemma4_bridge.testing.fixtures import MULTIMODAL_TOKENS, SPECIAL_TOKENS, VOCAB_SIZE, _CORPUS, build_tiny_gemma4, variant

LLAMA_CPP_PYTHON = "0.3.36"  # its sdist's vendor/llama.cpp matches the xllamacpp pinned in scripts/env.sh
PROMPT = [2, 17, 301, 45, 99, 7, 260, 13, 88, 410, 33, 120]  # > sliding_window (8): both attention kinds matter


def llama_cpp_tools(tmp_root: Path) -> Path:
    """llama.cpp's converter tree (converters, conversion/, gguf-py) from the llama-cpp-python sdist."""
    cache = Path(os.environ.get("VIRTUAL_ENV") or sys.prefix) / ".cache" / f"llama.cpp-convert-{LLAMA_CPP_PYTHON}"
    if (cache / "convert_hf_to_gguf.py").is_file():
        return cache
    download = tmp_root / "sdist"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps", "--no-binary", ":all:",
         f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(download)],
        check=True,
    )  # fmt: skip
    (sdist,) = download.glob("llama_cpp_python-*.tar.gz")
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
    staging = tmp_root / "llama.cpp"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(staging, members=members, filter="data")
    cache.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(staging, cache, dirs_exist_ok=True)
    return cache


def run_llama_cpp_tool(tools: Path, script: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(tools / "gguf-py"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(tools / script), *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"llama.cpp {script} failed:\n{result.stderr[-3000:]}")


def build_byte_fallback_tokenizer(out_dir: Path) -> Any:
    """A Gemma-style tokenizer: BPE over '▁'-escaped text with <0xNN> byte fallback, same specials and ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [*SPECIAL_TOKENS.values(), *MULTIMODAL_TOKENS.values()]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - 256, special_tokens=specials, show_progress=False)
    trained = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    trained.normalizer = normalizers.Replace(" ", "▁")
    trained.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    learned = sorted(json.loads(trained.to_str())["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab: dict[str, int] = {}
    for token in [t for t, _ in learned[: len(specials)]] + [f"<0x{i:02X}>" for i in range(256)] + [t for t, _ in learned[len(specials) :]]:
        if len(vocab) < VOCAB_SIZE:
            vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(trained.to_str())["model"]["merges"]]
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=SPECIAL_TOKENS["unk_token"], byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS, extra_special_tokens=dict(MULTIMODAL_TOKENS), model_max_length=1024)
    fast.save_pretrained(out_dir)
    return fast


def build_llamacpp_base(out_dir: Path) -> Path:
    """The tiny text-only Gemma 4 in the variant llama.cpp loads (see the module docstring)."""
    model_dir = build_tiny_gemma4(out_dir, variant(causal_lm=True, vision=False, audio=False, num_kv_shared_layers=3))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_dir / name).unlink(missing_ok=True)
    build_byte_fallback_tokenizer(model_dir)
    return model_dir


def plain_ascii_token(model_dir: Path) -> int:
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    return next(i for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if t.isascii() and t.isalpha() and len(t) > 2)


class LlamaCppLogprobs:
    """One in-process llama-server (xllamacpp) with a base GGUF and adapters, each off unless asked for."""

    def __init__(self, base_gguf: Path, adapters: list[Path], force_token: int, vocab_size: int) -> None:
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(base_gguf)
        params.n_ctx = 256
        params.n_parallel = 1
        params.cpuparams.n_threads = 1
        params.cpuparams_batch.n_threads = 1
        params.warmup = False
        params.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(str(a), 0.0) for a in adapters]
        params.lora_init_without_apply = True
        self.adapters = list(adapters)
        self.force_token, self.vocab_size = force_token, vocab_size
        self.server = xllamacpp.Server(params)

    def logprobs(self, ids: list[int], adapter: Path | None) -> torch.Tensor:
        """[len(ids) - 1, vocab] next-token log-probs after each prefix ids[:2], ids[:3], ..., ids."""
        lora = [{"id": i, "scale": 1.0 if a == adapter else 0.0} for i, a in enumerate(self.adapters)]
        rows = []
        for n in range(2, len(ids) + 1):
            reply = self.server.handle_completions({
                "prompt": ids[:n], "n_predict": 1, "n_probs": self.vocab_size, "temperature": 0, "cache_prompt": False,
                "post_sampling_probs": False, "logit_bias": [[self.force_token, 100.0]], "lora": lora,
            })  # fmt: skip
            content = ((reply.get("choices") or [{}])[0].get("logprobs") or {}).get("content")
            assert content, f"llama-server returned no logprobs: {json.dumps(reply)[:500]}"
            row = torch.full((self.vocab_size,), float("nan"), dtype=torch.float64)
            for entry in content[0]["top_logprobs"]:
                row[entry["id"]] = entry["logprob"]
            assert not row.isnan().any(), "llama-server left tokens out of the distribution"
            rows.append(row)
        return torch.stack(rows)

    def close(self) -> None:
        del self.server


@torch.no_grad()
def reference_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """transformers' next-token log-probs at positions 1..len(ids)-1, aligned with LlamaCppLogprobs."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)[1:]
