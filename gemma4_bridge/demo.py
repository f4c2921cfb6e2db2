"""Run the whole job on a built-in tiny Gemma 4: broken adapters in, served numbers equal to PEFT out.

Builds a tiny random Gemma 4 (text + vision + audio, KV sharing, k_eq_v, finite clamps), writes
LoRA adapters the way real tools save them (hand-saved key names, vLLM naming, transformers
5.5.0/5.5.1 k/v on KV-shared layers, PEFT all-linear towers, a real 2-rank DeepSpeed ZeRO-3 run),
inspects and converts each, serves each through a real vLLM engine with the gemma4-bridge plugin
(raw flavours straight from disk; the ZeRO-3 one after `convert --zero3-checkpoint`), and prints
one row per adapter: flavour, what was fixed, and the max |prompt log-prob difference| against
transformers + PEFT over a text, an image and an audio prompt. Needs vLLM (CPU build is fine).

examples:
  gemma4-bridge demo                      # everything, in a temporary directory (~3-4 min on 2 cores)
  gemma4-bridge demo --workdir demo-out   # keep the model, adapters and converted outputs
  gemma4-bridge demo --skip-zero3         # without the DeepSpeed run (~1 min)
  gemma4-bridge demo --verbose            # also show vLLM's, transformers' and DeepSpeed's own logs

Third-party logs (vLLM, Triton, transformers, DeepSpeed) go to WORKDIR/demo.log unless --verbose;
the result table is the last thing printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from gemma4_bridge.output import atomic_output_dir

HELP = "build a tiny Gemma 4, break adapters like real tools do, fix and serve them via vLLM, compare to PEFT"
TOL = 1e-3


@dataclass
class Row:
    name: str
    flavour: str
    fixed: str
    max_diff: float | None  # None: refused (see ``fixed``)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, help="where to write the model and adapters (default: a temp dir)")
    parser.add_argument("--skip-zero3", action="store_true", help="skip the real DeepSpeed ZeRO-3 run (~20 s)")
    parser.add_argument("--verbose", action="store_true", help="show third-party logs instead of writing them to WORKDIR/demo.log")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gemma4-bridge-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with _third_party_output(None if args.verbose else work / "demo.log") as say:
        say(f"[demo] working in {work}" + ("" if args.verbose else f" (third-party logs: {work / 'demo.log'})"))
        model, adapters = _build(work, skip_zero3=args.skip_zero3, say=say)
        rows = _serve_and_compare(model, adapters, say=say)
        say(f"[demo] done in {time.monotonic() - t0:.0f} s")
    _print_table(rows)
    bad = [r for r in rows if r.max_diff is not None and r.max_diff >= TOL]
    return 1 if bad else 0


@contextlib.contextmanager
def _third_party_output(log: Path | None) -> Iterator[Any]:
    """Yield ``say(line)`` for the demo's own progress lines. With ``log``, everything else written
    to stdout/stderr meanwhile (vLLM, Triton, transformers, DeepSpeed, by Python or by native code and
    child processes) goes to that file, redirected at the file-descriptor level."""
    if log is None:
        yield lambda line: print(line, flush=True)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    console: IO[str] = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    try:
        with log.open("a") as sink:
            for fd in (1, 2):
                os.dup2(sink.fileno(), fd)
            try:
                yield lambda line: print(line, file=console, flush=True)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                for fd, copy in saved.items():
                    os.dup2(copy, fd)
    finally:
        console.close()
        for copy in saved.values():
            os.close(copy)


# -- adapters ------------------------------------------------------------------------------------
@dataclass
class DemoAdapter:
    name: str
    served: Path  # what vLLM is given
    reference: Path  # what PEFT loads for the reference numbers
    flavour: str = ""
    fixed: str = ""


def _build(work: Path, *, skip_zero3: bool, say: Any = print) -> tuple[Path, list[DemoAdapter]]:
    from gemma4_bridge.testing.family import TEXT_LINEARS
    from gemma4_bridge.testing.fixtures import build_tiny_gemma4, write_peft_adapter

    model = work / "model"
    if not (model / "config.json").is_file():
        say("[demo] building the tiny Gemma 4 (text + vision + audio)")
        build_tiny_gemma4(model)
    src = work / "adapters"
    src.mkdir(exist_ok=True)
    text = _once(src / "peft_text", lambda p: write_peft_adapter(model, p, target_modules=TEXT_LINEARS, seed=2))
    towers = _once(src / "peft_towers", lambda p: write_peft_adapter(model, p, exclude_modules=["relative_k_proj"], seed=3))
    all_linear = _once(src / "peft_all_linear", lambda p: write_peft_adapter(model, p, seed=4))
    out = [
        DemoAdapter("text (PEFT, regex targets)", text, text),
        DemoAdapter("towers, hand-saved keys", _rewrite(towers, src / "hand_saved", rename=r"\.(lora_[AB])\.weight$", to=r".\1.default.weight"), towers),
        DemoAdapter("text, vLLM naming", _rewrite(text, src / "vllm_naming", rename=r"^base_model\.model\.model\.language_model\.", to="base_model.model.language_model.model."), text),
        DemoAdapter("text + k/v on KV-shared layers", _kv_shared_extras(text, src / "kv_shared_extras"), text),
        DemoAdapter("PEFT all-linear (audio relative_k_proj)", all_linear, all_linear),
    ]  # fmt: skip
    if not skip_zero3:
        out.append(_zero3(model, work, say))
    for a in out:
        _inspect_and_convert(a, model, work / "converted")
    return model, out


def _once(path: Path, make: Any) -> Path:
    return path if (path / "adapter_config.json").is_file() else make(path)


def _rewrite(src: Path, out: Path, *, rename: str, to: str) -> Path:
    from safetensors.torch import load_file, save_file

    if not out.exists():  # atomically: a demo killed here must not leave a half-made adapter for the next run
        with atomic_output_dir(out) as tmp:
            tensors = {re.sub(rename, to, k): v for k, v in load_file(src / "adapter_model.safetensors").items()}
            save_file(tensors, tmp / "adapter_model.safetensors")
            (tmp / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    return out


def _kv_shared_extras(src: Path, out: Path) -> Path:
    """What transformers 5.5.0/5.5.1 training saved: k/v LoRA on layers that reuse another's K/V."""
    import torch
    from safetensors.torch import load_file, save_file

    if not out.exists():
        with atomic_output_dir(out) as tmp:
            tensors = load_file(src / "adapter_model.safetensors")
            for proj in ("k_proj", "v_proj"):
                key = f"base_model.model.model.language_model.layers.3.self_attn.{proj}"
                tensors[f"{key}.lora_A.weight"] = torch.full((4, 64), 0.3)
                tensors[f"{key}.lora_B.weight"] = torch.full((32, 4), 0.3)
            save_file(tensors, tmp / "adapter_model.safetensors")
            (tmp / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    return out


def _zero3(model: Path, work: Path, say: Any = print) -> DemoAdapter:
    from gemma4_bridge.testing.zero3_job import run_zero3_job

    run_dir = work / "zero3"
    damaged = run_dir / "checkpoint-2"
    if not (damaged / "adapter_config.json").is_file():
        say("[demo] training an all-linear LoRA with DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), ~20 s")
        result = run_zero3_job(model, run_dir, steps=2, world_size=2)
        damaged = result.damaged_adapter
    return DemoAdapter("ZeRO-3 run (DeepSpeed, 2 ranks)", damaged, run_dir / "reference_adapter")


def _inspect_and_convert(a: DemoAdapter, model: Path, out_root: Path) -> None:
    from gemma4_bridge.converters import convert_adapter, inspect_adapter
    from gemma4_bridge.errors import BridgeError

    report = inspect_adapter(a.served, base=model, scan_values=False)
    a.flavour = ", ".join(report.flavours)
    fixes = sorted({p.code for p in report.problems if p.severity == "fixable"})
    out = out_root / a.served.name
    try:
        plan = convert_adapter(a.served, out, base=model, zero3_checkpoint=a.served if "zero3-damaged" in report.flavours else None, force=True)
        a.fixed = "; ".join(fixes) or "nothing to fix"
        if "zero3-damaged" in report.flavours:  # the server refuses ZeRO-3 damage: serve the converted copy
            a.served, a.fixed = out, f"convert --zero3-checkpoint recovered {plan.metadata()['zero3_recovered']} tensors"
    except BridgeError as err:
        a.fixed = f"convert refused: {err.message[:80]}"


# -- serving ---------------------------------------------------------------------------------------
def _serve_and_compare(model: Path, adapters: list[DemoAdapter], say: Any = print) -> list[Row]:
    say("[demo] starting vLLM (CPU, float32) with the gemma4-bridge plugin and tower LoRA enabled")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(
        str(model), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=4, seed=0,
        enable_lora=True, max_lora_rank=8, max_loras=2, enable_tower_connector_lora=True,
        limit_mm_per_prompt={"image": 1, "audio": 1},
    )  # fmt: skip
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    prompts = parity_prompts(model)
    rows = [Row("base model", "-", "-", max_logprob_diff(llm, params, prompts, None, model, None))]
    for i, a in enumerate(adapters, start=1):
        request = LoRARequest(f"a{i}", i, str(a.served))
        try:
            diff = max_logprob_diff(llm, params, prompts, request, model, a.reference)
            rows.append(Row(a.name, a.flavour, a.fixed, diff))
        except Exception as err:  # the plugin refused it: show why instead of a number
            message = re.sub(r"^LoRA adapter '[^']*': \S+: ", "", str(err).split(" Fix: ")[0])
            rows.append(Row(a.name, a.flavour, f"{a.fixed}; refused at load: {message}", None))
    import gc

    llm.llm_engine.engine_core.shutdown()  # its shutdown logs belong before the table
    del llm
    gc.collect()
    return rows


def parity_prompts(model: Path) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """kind -> (vLLM request, transformers processor inputs): text, and an image / audio prompt
    for each tower the model has."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    audio = (rng.standard_normal(16000) * 0.1).astype(np.float32)
    text = {"text": "the quick brown fox jumps over the lazy dog", "image": "a picture of <|image|> a cat", "audio": "a sound of <|audio|> rain"}
    config = json.loads((model / "config.json").read_text())
    for kind in ("image", "audio"):
        if not config.get(f"{'vision' if kind == 'image' else kind}_config"):
            del text[kind]
    out = {}
    for kind, prompt in text.items():
        mm = {"image": {"image": image}, "audio": {"audio": (audio, 16000)}}.get(kind)
        extra = {"image": {"images": image}, "audio": {"audio": audio}}.get(kind, {})
        out[kind] = ({"prompt": prompt, **({"multi_modal_data": mm} if mm else {})}, dict(processor(text=prompt, return_tensors="pt", **extra)))
    return out


def max_logprob_diff(
    llm: Any, params: Any, prompts: dict[str, Any], request: Any, model: Path, reference: Path | None, load: Callable[[Path], Any] | None = None
) -> float:
    """Max |prompt log-prob difference| between ``llm`` (with ``request``'s adapter) and
    transformers + PEFT (``reference`` adapter, float32 on the CPU) over ``prompts``; ``load``
    loads the transformers model (default: the E-series' loader)."""
    import torch

    from gemma4_bridge.testing.fixtures import load_tiny_model

    hf = (load or load_tiny_model)(model)
    if reference is not None:
        from peft import PeftModel

        hf = PeftModel.from_pretrained(hf, reference).eval()
    worst = 0.0
    # One call: vLLM encodes the image and the audio clip in the same step, as a server does.
    outs = llm.generate([vllm_req for vllm_req, _ in prompts.values()], params, lora_request=request, use_tqdm=False)
    for out, (_, hf_inputs) in zip(outs, prompts.values(), strict=True):
        ids = hf_inputs["input_ids"][0].tolist()
        if list(out.prompt_token_ids) != ids:
            raise RuntimeError("vLLM and transformers tokenised the prompt differently")
        served = torch.tensor([e[t].logprob for e, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)])
        with torch.no_grad():
            lp = torch.log_softmax(hf(**hf_inputs).logits[0].float(), -1)
        ref = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        worst = max(worst, float((served - ref).abs().max()))
    return worst


WIDTHS = (24, 46, 18)  # flavour, what was fixed, number; longer cells wrap onto continuation lines


def _print_table(rows: list[Row], out: IO[str] | None = None) -> None:
    """One row per adapter; the adapter column fits the longest name, other cells wrap (nothing is cut)."""
    headers = ("adapter", "flavour", "what was fixed", "|dlogprob| vs PEFT")
    cells = [(r.name, r.flavour, r.fixed, "refused" if r.max_diff is None else f"{r.max_diff:.1e}") for r in rows]
    widths = (max(len(c[0]) for c in [headers, *cells]), *WIDTHS)
    lines = ["", f"max |prompt log-prob difference| vs transformers + PEFT over text, image and audio prompts (tolerance {TOL:g}):",
             *_row_lines(headers, widths), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    for c in cells:
        lines += _row_lines(c, widths)
    print("\n".join(lines), file=out or sys.stdout, flush=True)


def _row_lines(cells: tuple[str, ...], widths: tuple[int, ...]) -> list[str]:
    wrapped = [textwrap.wrap(v, w, break_long_words=True) or [""] for v, w in zip(cells, widths, strict=True)]
    depth = max(len(w) for w in wrapped)
    return ["  ".join((w[i] if i < len(w) else "").ljust(width) for w, width in zip(wrapped, widths, strict=True)).rstrip() for i in range(depth)]
