"""Check what a running server serves for a Gemma 4 LoRA adapter against transformers + PEFT.

Builds the reference locally (the base with transformers, the adapter with PEFT after the same
in-memory canonicalisation ``convert`` does; CPU float32 unless --device/--dtype), sends each probe
to the server (vLLM: OpenAI API with ``prompt_logprobs``; SGLang: native ``/generate`` with
``return_logprob``), runs the reference on exactly the token ids the server reports, and says per
probe:

  ok                               served log-probs within the tolerance of base + adapter, same greedy token
  adapter not applied              served == the base (within tolerance) while the adapter moves the reference
  partly applied / wrong numbers   neither: some of the delta is missing or wrong (e.g. stock vLLM and
                                   k_proj LoRA on attention_k_eq_v layers: ~0.2 off)
  server error                     the server refused or failed the probe

Default probes: a text prompt, plus an image and an audio prompt when the base has those towers.
--prompts FILE.jsonl: one probe per line, {"name": ..., "text": ..., "image": PATH, "audio": PATH.wav}
(image/audio optional). The tolerance bounds the max |log-prob difference| over a probe's prompt
tokens; the default 0.05 holds for bfloat16 GPU servers against a float32 reference on short prompts
(float32 servers match to ~1e-6; pass --tolerance 1e-3 for them), while every serving bug this tool
looks for moves log-probs by 0.1 or more. A probe whose adapter effect is below the tolerance cannot
tell "applied" from "not applied" and says so.

Exit status: 0 every probe ok, 1 a mismatch or server error (with the diagnosis), 2 unusable input
or an unreachable server / unknown model name.

examples:
  gemma4-bridge verify --server http://127.0.0.1:8000 --model my-lora --base ./gemma-4-E4B-it --adapter ./my-lora
  gemma4-bridge verify --server http://gpu-box:30000 --api sglang --model my-lora --base ./gemma-4-E2B-it \\
      --adapter ./my-lora --device cuda --dtype bfloat16 --json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gemma4_bridge.errors import BridgeError

HELP = "compare what a running vLLM/SGLang server serves for an adapter with transformers + PEFT (exit 0/1/2)"
DEFAULT_TOLERANCE = 0.05
OK, NOT_APPLIED, WRONG, SERVER_ERROR = "ok", "adapter not applied", "partly applied / wrong numbers", "server error"
DEFAULT_TEXT = {
    "text": "the quick brown fox jumps over the lazy dog. gemma four adapters serve",
    "image": "a picture of a cat",
    "audio": "a sound of rain",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", required=True, metavar="URL", help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, metavar="NAME", help="the name the server serves the adapter under")
    parser.add_argument("--base", required=True, metavar="MODEL_DIR", help="the base Gemma 4 checkpoint (local directory)")
    parser.add_argument("--adapter", required=True, metavar="DIR", help="the adapter as trained (any flavour convert handles)")
    parser.add_argument("--prompts", type=Path, metavar="FILE.jsonl", help="probes, one JSON object per line (default: built in)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help=f"max |delta logprob| per probe (default {DEFAULT_TOLERANCE})")
    parser.add_argument("--api", choices=("auto", "vllm", "sglang"), default="auto", help="server API (default: detect)")
    parser.add_argument("--device", default="cpu", help="device for the reference (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="reference dtype (default float32)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per server request (default 300)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


# -- probes ----------------------------------------------------------------------------------------
@dataclass
class Probe:
    name: str
    text: str
    image: Any = None  # PIL image
    audio: Any = None  # float32 mono samples at the processor's rate


def default_probes(base: Path) -> list[Probe]:
    import numpy as np
    from PIL import Image

    config = json.loads((base / "config.json").read_text())
    rng = np.random.default_rng(0)
    probes = [Probe("text", DEFAULT_TEXT["text"])]
    if config.get("vision_config"):
        probes.append(Probe("image", DEFAULT_TEXT["image"], image=Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))))
    if config.get("audio_config"):
        probes.append(Probe("audio", DEFAULT_TEXT["audio"], audio=(rng.standard_normal(16000) * 0.1).astype(np.float32)))
    return probes


def read_probes(path: Path) -> list[Probe]:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise BridgeError(f"{path}: cannot be read ({exc.strerror}).", fix="pass a JSONL file of probes") from exc
    probes = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            text = row["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BridgeError(f"{path}:{n}: not a probe ({exc}).", fix='write one object per line: {"text": ..., "image": PATH, "audio": PATH}') from exc
        image = audio = None
        if row.get("image"):
            from PIL import Image

            image = Image.open(path.parent / row["image"]).convert("RGB")
        if row.get("audio"):
            import soundfile

            audio, _ = soundfile.read(path.parent / row["audio"], dtype="float32")
        probes.append(Probe(row.get("name") or f"line {n}", text, image, audio))
    if not probes:
        raise BridgeError(f"{path}: no probes.", fix="write at least one JSON object per line")
    return probes


# -- the reference -----------------------------------------------------------------------------------
class Reference:
    """Base + adapter in transformers + PEFT; the base's numbers with the adapter disabled."""

    def __init__(self, base: Path, adapter: Path, *, device: str, dtype: str) -> None:
        import torch
        import transformers
        from peft import PeftModel
        from transformers import AutoProcessor

        from gemma4_bridge.converters import convert_adapter
        from gemma4_bridge.upstream_bugs import reference_attn_implementation

        config = json.loads((base / "config.json").read_text())
        cls = getattr(transformers, (config.get("architectures") or ["Gemma4ForConditionalGeneration"])[0])
        model = cls.from_pretrained(base, dtype=getattr(torch, dtype), attn_implementation=reference_attn_implementation(base))
        self._tmp = tempfile.TemporaryDirectory(prefix="gemma4-bridge-verify-")
        canonical = Path(self._tmp.name) / "adapter"
        convert_adapter(adapter, canonical, base=base)
        self.model = PeftModel.from_pretrained(model.to(device).eval(), canonical).eval()
        self.processor = AutoProcessor.from_pretrained(base)
        self.device = device

    def token_ids(self, probe: Probe) -> list[int]:
        tok = getattr(self.processor, "tokenizer", self.processor)
        return list(tok(probe.text)["input_ids"])

    def template_renders(self, kind: str) -> bool:
        """Does the base's chat template emit the media token for an ``{"type": kind}`` content part?"""
        p = self.processor
        marks = [m for m in (getattr(p, f"{kind}_token", None), getattr(p, "boi_token" if kind == "image" else "boa_token", None)) if m]
        try:
            rendered = p.apply_chat_template([{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "x"}]}], tokenize=False)
        except Exception:  # noqa: BLE001 - no or an unusual template: put the tokens in the text
            return False
        return any(m in rendered for m in marks)

    def media_inputs(self, probe: Probe) -> tuple[dict[str, Any], dict[int, int]]:
        """Processor outputs for the probe's media, and {token id: mm_token_type} for its placeholders."""
        if probe.image is None and probe.audio is None:
            return {}, {}
        p = self.processor
        text = " ".join([p.image_token] * (probe.image is not None) + [p.audio_token] * (probe.audio is not None))
        kw: dict[str, Any] = {"text": text, "return_tensors": "pt"}
        if probe.image is not None:
            kw["images"] = probe.image
        if probe.audio is not None:
            kw["audio"] = probe.audio
        out = dict(p(**kw))
        ids, kinds = out.pop("input_ids")[0].tolist(), out.pop("mm_token_type_ids", None)
        out.pop("attention_mask", None)
        types = {} if kinds is None else {i: int(t) for i, t in zip(ids, kinds[0].tolist(), strict=True) if int(t)}
        return out, types

    def logprobs(self, ids: list[int], probe: Probe, *, adapter: bool) -> tuple[Any, int]:
        """(log-prob of each next prompt token, greedy next token) for exactly ``ids``."""
        import torch

        media, types = self.media_inputs(probe)
        inputs: dict[str, Any] = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long), **media}
        if types:
            inputs["mm_token_type_ids"] = torch.tensor([[types.get(i, 0) for i in ids]])
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        with torch.no_grad(), self._adapter(adapter):
            logits = self.model(**inputs).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        chosen = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:], device=lp.device)]
        return chosen.cpu(), int(lp[-1].argmax())

    @contextmanager
    def _adapter(self, enabled: bool) -> Iterator[None]:
        if enabled:
            yield
        else:
            with self.model.disable_adapter():
                yield


# -- servers -------------------------------------------------------------------------------------------
class ServerError(Exception):
    """The server refused or failed one probe."""


@dataclass
class Served:
    ids: list[int]
    logprobs: list[float]  # of prompt tokens 1..n-1
    greedy: int


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _wav(audio: Any, rate: int = 16000) -> bytes:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, audio, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


class Client:
    api = ""

    def __init__(self, url: str, timeout: float) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import requests

        try:
            r = requests.post(self.url + path, json=body, timeout=self.timeout)
        except requests.RequestException as exc:
            raise ServerError(f"{type(exc).__name__}: {exc}") from exc
        if r.status_code != 200:
            raise ServerError(f"HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def check_model(self, model: str) -> None:
        raise NotImplementedError

    def serve(self, model: str, probe: Probe, ids: list[int], reference: Reference) -> Served:
        raise NotImplementedError


class VLLMClient(Client):
    """vLLM's OpenAI API: completions with token ids for text, chat with media otherwise."""

    api = "vllm"

    def check_model(self, model: str) -> None:
        names = [m["id"] for m in _get_json(self.url + "/v1/models", self.timeout).get("data", [])]
        if model not in names:
            raise BridgeError(f"{self.url} serves no model named {model!r} (it serves: {', '.join(names) or 'nothing'}).",
                              fix="pass --model with one of those names, or load the adapter first")  # fmt: skip

    def serve(self, model: str, probe: Probe, ids: list[int], reference: Reference) -> Served:
        common = {"model": model, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0, "return_token_ids": True}
        if probe.image is None and probe.audio is None:
            out = self._post("/v1/completions", {**common, "prompt": ids})
            choice = out["choices"][0]
            served_ids = choice.get("prompt_token_ids") or ids
        else:
            out = self._chat(common, probe, reference)
            choice = out["choices"][0]
            served_ids = out["prompt_token_ids"]
        entries = (choice.get("prompt_logprobs") or out.get("prompt_logprobs") or [None])[1:]  # chat: top level
        if len(entries) != len(served_ids) - 1 or not choice.get("token_ids"):
            raise ServerError("the response carries no prompt log-probs / token ids (is this vLLM's OpenAI server?)")
        return Served(served_ids, [e[str(t)]["logprob"] for e, t in zip(entries, served_ids[1:], strict=True)], int(choice["token_ids"][0]))

    def _chat(self, common: dict[str, Any], probe: Probe, reference: Reference) -> dict[str, Any]:
        parts: list[dict[str, Any]] = []
        if probe.image is not None:
            parts.append({"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(_png(probe.image))}})
        if probe.audio is not None:
            parts.append({"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + _b64(_wav(probe.audio))}})
        # A chat template that renders media parts places the model's media tokens itself; one that
        # renders text only needs them in the text. The base's own template tells which (one try:
        # a failed multimodal request can leave vLLM's processor cache out of step for a retry).
        tokens = [tok for tok, kind, item in ((reference.processor.image_token, "image", probe.image), (reference.processor.audio_token, "audio", probe.audio))
                  if item is not None and not reference.template_renders(kind)]  # fmt: skip
        text = " ".join([*tokens, probe.text])
        return self._post("/v1/chat/completions", {**common, "messages": [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]})


class SGLangClient(Client):
    """SGLang's native /generate with return_logprob (the adapter named through lora_path)."""

    api = "sglang"

    def check_model(self, model: str) -> None:
        self._info = _get_json(self.url + "/get_model_info", self.timeout)

    def serve(self, model: str, probe: Probe, ids: list[int], reference: Reference) -> Served:
        body: dict[str, Any] = {"sampling_params": {"max_new_tokens": 1, "temperature": 0}, "return_logprob": True, "logprob_start_len": 0}
        if model not in (self._info.get("model_path"), self._info.get("served_model_name")):
            body["lora_path"] = model
        if probe.image is None and probe.audio is None:
            body["input_ids"] = ids
        else:
            tokens = [t for t, m in ((reference.processor.image_token, probe.image), (reference.processor.audio_token, probe.audio)) if m is not None]
            body["text"] = " ".join([*tokens, probe.text])
            if probe.image is not None:
                body["image_data"] = ["data:image/png;base64," + _b64(_png(probe.image))]
            if probe.audio is not None:
                body["audio_data"] = ["data:audio/wav;base64," + _b64(_wav(probe.audio))]
        meta = self._post("/generate", body)["meta_info"]
        prompt = meta["input_token_logprobs"]
        return Served([int(t) for _, t, *_ in prompt], [float(lp) for lp, *_ in prompt[1:]], int(meta["output_token_logprobs"][0][1]))


def _get_json(url: str, timeout: float) -> dict[str, Any]:
    import requests

    try:
        r = requests.get(url, timeout=min(timeout, 30))
    except requests.RequestException as exc:
        raise BridgeError(f"cannot reach the server at {url} ({type(exc).__name__}).", fix="check --server and that the server is up") from exc
    if r.status_code != 200:
        raise BridgeError(f"{url} answered HTTP {r.status_code}.", fix="check --server and --api")
    return r.json()


def connect(url: str, api: str, timeout: float) -> Client:
    """The client for ``api``; 'auto' asks for SGLang's /get_model_info, else takes vLLM's OpenAI API."""
    import requests

    if api == "auto":
        try:
            api = "sglang" if requests.get(url.rstrip("/") + "/get_model_info", timeout=10).status_code == 200 else "vllm"
        except requests.RequestException as exc:
            raise BridgeError(f"cannot reach the server at {url} ({type(exc).__name__}).", fix="check --server and that the server is up") from exc
    return (SGLangClient if api == "sglang" else VLLMClient)(url, timeout)


# -- verdicts ------------------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    probe: str
    verdict: str
    max_diff: float | None = None  # served vs base + adapter
    base_diff: float | None = None  # served vs base alone
    adapter_effect: float | None = None  # base + adapter vs base, in the reference
    greedy_agrees: bool | None = None
    note: str = ""


def judge(probe: str, served: Any, ref: Any, base: Any, greedy_served: int, greedy_ref: int, tol: float) -> ProbeResult:
    d_ref = float((served - ref).abs().max())
    d_base = float((served - base).abs().max())
    effect = float((ref - base).abs().max())
    r = ProbeResult(probe, WRONG, d_ref, d_base, effect, greedy_served == greedy_ref)
    if d_ref <= tol and r.greedy_agrees:
        r.verdict = OK
        if effect <= tol:
            r.note = "the adapter's effect on this probe is below the tolerance: it cannot tell applied from not applied"
    elif d_base <= tol and effect > tol:
        r.verdict, r.note = NOT_APPLIED, "served numbers equal the base model's"
    elif d_ref <= tol:
        r.note = "log-probs within tolerance but the greedy token differs"
    else:
        r.note = f"served is {d_ref:.3g} from base + adapter and {d_base:.3g} from the base (adapter effect {effect:.3g})"
    return r


@dataclass
class Report:
    server: str
    api: str
    model: str
    tolerance: float
    probes: list[ProbeResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(p.verdict == OK for p in self.probes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": OK if self.ok else "mismatch"}


def verify(server: str, model: str, base: Path, adapter: Path, *, probes: list[Probe] | None = None, tolerance: float = DEFAULT_TOLERANCE,
           api: str = "auto", device: str = "cpu", dtype: str = "float32", timeout: float = 300.0) -> Report:  # fmt: skip
    """Run every probe against the server and the reference; raises BridgeError for unusable input."""
    if not (base / "config.json").is_file():
        raise BridgeError(f"{base}: no config.json.", fix="pass the base checkpoint directory with --base")
    client = connect(server, api, timeout)
    client.check_model(model)
    probes = probes or default_probes(base)
    reference = Reference(base, adapter, device=device, dtype=dtype)
    report = Report(server, client.api, model, tolerance)
    import torch

    for probe in probes:
        try:
            served = client.serve(model, probe, reference.token_ids(probe), reference)
        except ServerError as err:
            report.probes.append(ProbeResult(probe.name, SERVER_ERROR, note=str(err)))
            continue
        ref, ref_greedy = reference.logprobs(served.ids, probe, adapter=True)
        base_lp, _ = reference.logprobs(served.ids, probe, adapter=False)
        report.probes.append(judge(probe.name, torch.tensor(served.logprobs), ref, base_lp, served.greedy, ref_greedy, tolerance))
    return report


def format_report(report: Report) -> str:
    lines = [f"verify {report.model} on {report.server} ({report.api}), tolerance {report.tolerance:g}:"]
    fmt = lambda v: "-" if v is None else f"{v:.2e}"  # noqa: E731
    for p in report.probes:
        greedy = "-" if p.greedy_agrees is None else ("same" if p.greedy_agrees else "DIFFERS")
        lines.append(f"  {p.probe:<8} {p.verdict:<31} max|dlogprob| {fmt(p.max_diff)}  vs base {fmt(p.base_diff)}  "
                     f"adapter effect {fmt(p.adapter_effect)}  greedy {greedy}")  # fmt: skip
        if p.note:
            lines.append(f"           {p.note}")
    bad = [p for p in report.probes if p.verdict != OK]
    lines.append("result: ok" if not bad else "result: MISMATCH: " + "; ".join(f"{p.probe}: {p.verdict}" for p in bad))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import logging

    for name in ("transformers", "peft", "gemma4_bridge", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    probes = read_probes(args.prompts) if args.prompts else None
    report = verify(args.server, args.model, Path(args.base), Path(args.adapter), probes=probes, tolerance=args.tolerance, api=args.api,
                    device=args.device, dtype=args.dtype, timeout=args.timeout)  # fmt: skip
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0 if report.ok else 1
