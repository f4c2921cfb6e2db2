"""``gemma4-bridge export-gguf``: llama.cpp applies the exported adapter with PEFT's numbers.

References are independent of the exporter: PEFT's own ``get_delta_weight`` / transformers + PEFT
log-probs, llama.cpp's own converter for the base, llama.cpp itself (xllamacpp) for serving, and
this file's own small table of llama.cpp names for the modules it uses.

The bounds (max |log-prob difference| over the whole vocabulary at every prompt position):
* vs transformers + PEFT, BOUND = 5e-2. llama.cpp computes in f32 with its own kernels, and ggml's
  CPU GELU rounds its input to fp16 and reads the result from an fp16 table (GGML_GELU_FP16 in
  ggml-cpu/vec.h). Measured: 2e-3 on the bare tiny base; 7e-3 to 2e-2 with adapters that move
  log-probs by ~1 (the random tiny model amplifies the rounding; plain adapters through llama.cpp's
  own converter show the same spread). The stock converter's rsLoRA/pattern error is ~0.9.
* vs llama.cpp on the PEFT-merged model (same kernels), KERNEL_BOUND = 5e-3; measured 9e-4.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from convert_helpers import default_adapter_name, dir_digest, peft_deltas, write_variant

from gemma4_bridge.cli import main
from gemma4_bridge.testing.fixtures import build_tiny_gemma4, variant, write_peft_adapter

gguf = pytest.importorskip("gguf")

BOUND = 5e-2
KERNEL_BOUND = 5e-3
LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "per_layer_input_gate", "per_layer_projection"]
# rsLoRA with both patterns; layer 1 is full attention with attention_k_eq_v: its k_proj LoRA is V's too.
SCALED = dict(
    r=4, lora_alpha=8, use_rslora=True,
    rank_pattern={"layers.1.self_attn.k_proj": 2, "mlp.down_proj": 6},
    alpha_pattern={"o_proj": 3, "layers.0.mlp.gate_proj": 16},
)  # fmt: skip
# This test's own reading of llama.cpp's names (src/llama-arch.cpp) for the modules used here.
LLAMA_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "per_layer_input_gate": "inp_gate", "per_layer_projection": "proj",
}  # fmt: skip


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gguf_helpers import build_llamacpp_base

    return build_llamacpp_base(tmp_path_factory.mktemp("gguf_base") / "model")


@pytest.fixture(scope="module")
def scaled_adapter(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_peft_adapter(base_dir, tmp_path_factory.mktemp("gguf_ad") / "scaled", target_modules=LM_TARGETS, seed=3, scale=0.15, **SCALED)


@pytest.fixture(scope="module")
def exported(scaled_adapter: Path, base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf_out") / "adapter.gguf"
    assert main(["export-gguf", str(scaled_adapter), "--base", str(base_dir), "-o", str(out)]) == 0
    return out


def _read_gguf(path: Path) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    # GGUFReader gives numpy order (ggml's ne reversed): lora_a [r, in], lora_b [out, r].
    return fields, {t.name: torch.from_numpy(t.data.copy()).reshape([int(x) for x in reversed(t.shape)]) for t in reader.tensors}


def _llama_name(module: str) -> str:
    m = re.match(r"model\.(?:language_model\.)?layers\.(\d+)\.(.+)$", module)
    assert m, module
    return f"blk.{m.group(1)}.{LLAMA_NAMES[m.group(2)]}.weight"


def test_alpha_over_rank_times_b_at_a_is_peft_delta(exported: Path, scaled_adapter: Path, base_dir: Path) -> None:
    """What llama.cpp computes from the file (alpha / rank(lora_b) * B @ A) is PEFT's delta, per module."""
    fields, tensors = _read_gguf(exported)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora" and fields["general.architecture"] == "gemma4"
    alpha = float(fields["adapter.lora.alpha"])
    assert alpha == SCALED["lora_alpha"]
    reference = peft_deltas(base_dir, scaled_adapter)
    assert reference and {_llama_name(m) for m in reference} == {n.removesuffix(".lora_a") for n in tensors if n.endswith(".lora_a")}
    for module, delta in reference.items():
        a, b = tensors[_llama_name(module) + ".lora_a"].double(), tensors[_llama_name(module) + ".lora_b"].double()
        assert a.shape[0] == b.shape[1] and (b.shape[0], a.shape[1]) == tuple(delta.shape), module
        got = alpha / b.shape[1] * (b @ a)
        assert torch.allclose(got, delta, rtol=1e-5, atol=1e-6), (module, float((got - delta).abs().max()))


def test_any_flavour_convert_accepts(scaled_adapter: Path, base_dir: Path, exported: Path, tmp_path: Path) -> None:
    """'.default.' adapter names plus k/v tensors for KV-shared layers (transformers 5.5.0 saved those):
    the planner renames and drops as convert does; the GGUF is the canonical adapter's."""
    extra = {
        "base_model.model.model.layers.3.self_attn.k_proj.lora_A.weight": torch.randn(4, 64),
        "base_model.model.model.layers.3.self_attn.k_proj.lora_B.weight": torch.randn(32, 4),
    }
    flavoured = write_variant(scaled_adapter, tmp_path / "flavoured", rename=default_adapter_name, extra=extra)
    before = dir_digest(flavoured)
    out = tmp_path / "f.gguf"
    assert main(["export-gguf", str(flavoured), "--base", str(base_dir), "-o", str(out)]) == 0
    assert dir_digest(flavoured) == before
    _, got = _read_gguf(out)
    _, want = _read_gguf(exported)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not any(k.startswith("blk.3.attn_k") for k in got)


def test_multimodal_base_language_model_lora(tiny_dir: Path, text_adapter: Path, tmp_path: Path) -> None:
    """On a Gemma4ForConditionalGeneration base the language model's names lose 'language_model.', as
    llama.cpp's converter names the text GGUF; the k/v LoRA its KV-shared layers lack is not there."""
    out = tmp_path / "mm.gguf"
    assert main(["export-gguf", str(text_adapter), "--base", str(tiny_dir), "-o", str(out)]) == 0
    fields, tensors = _read_gguf(out)
    reference = peft_deltas(tiny_dir, text_adapter)
    assert {_llama_name(m) for m in reference} == {n.removesuffix(".lora_a") for n in tensors if n.endswith(".lora_a")}
    for module, delta in reference.items():
        a, b = tensors[_llama_name(module) + ".lora_a"].double(), tensors[_llama_name(module) + ".lora_b"].double()
        assert torch.allclose(float(fields["adapter.lora.alpha"]) / b.shape[1] * (b @ a), delta, rtol=1e-5, atol=1e-6), module


def test_f16_output(scaled_adapter: Path, base_dir: Path, exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "half.gguf"
    assert main(["export-gguf", str(scaled_adapter), "--base", str(base_dir), "-o", str(out), "--outtype", "f16"]) == 0
    _, half = _read_gguf(out)
    _, full = _read_gguf(exported)
    assert all(half[k].dtype == torch.float16 and torch.allclose(half[k].float(), full[k], rtol=1e-3, atol=1e-4) for k in full)


def test_output_is_atomic_and_never_silently_replaced(scaled_adapter: Path, base_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "a.gguf"
    out.write_bytes(b"keep")
    assert main(["export-gguf", str(scaled_adapter), "--base", str(base_dir), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert main(["export-gguf", str(scaled_adapter), "--base", str(base_dir), "-o", str(out), "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]  # no temp file left behind


def test_failure_mid_write_leaves_nothing(scaled_adapter: Path, base_dir: Path, tmp_path: Path, capsys) -> None:
    """A NaN is found only when its tensor is read, after the file was started: the temp file goes."""
    last = "base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"
    bad = write_variant(scaled_adapter, tmp_path / "nan", transform=lambda k, v: v.index_fill(0, torch.tensor([0]), float("nan")) if k == last else v)
    out = tmp_path / "out" / "a.gguf"
    assert main(["export-gguf", str(bad), "--base", str(base_dir), "-o", str(out)]) == 2
    assert "NaN" in capsys.readouterr().err
    assert not out.exists() and list(out.parent.iterdir()) == []


# -- refused, with the route, never dropped -------------------------------------------------------


@pytest.fixture(scope="module")
def moe_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 26B-A4B-like text model (MoE block beside the dense MLP), saved by transformers."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from gemma4_bridge.testing.fixtures import tiny_config_dict

    torch.manual_seed(0)
    text = tiny_config_dict(variant(causal_lm=True, vision=False, audio=False))["text_config"]
    config = Gemma4TextConfig(**text, enable_moe_block=True, num_experts=2, top_k_experts=1, moe_intermediate_size=32)
    config.architectures = ["Gemma4ForCausalLM"]
    out = tmp_path_factory.mktemp("moe") / "model"
    Gemma4ForCausalLM(config).save_pretrained(out)
    return out


def _peft_adapter(model_dir: Path, out: Path, **kwargs) -> Path:
    from peft import LoraConfig, get_peft_model

    from gemma4_bridge.testing.fixtures import load_tiny_model

    torch.manual_seed(0)  # init_lora_weights=False draws B at random
    get_peft_model(load_tiny_model(model_dir), LoraConfig(r=2, lora_alpha=4, **kwargs)).save_pretrained(out)
    return out


REFUSED = {
    # case: (base fixture, PEFT LoraConfig kwargs, words the message must contain)
    "tower": ("tiny_dir", dict(target_modules=r".*vision_tower.*q_proj\.linear"), ("vision_tower", "mtmd", "gemma4-bridge merge", "--mmproj")),
    "connector": ("tiny_dir", dict(target_modules=r".*embed_audio\.embedding_projection"), ("embed_audio", "mtmd", "gemma4-bridge merge")),
    "per_layer_model_projection": ("base_dir", dict(target_modules=["per_layer_model_projection", "q_proj"]), ("per_layer_model_projection", "never apply", "gemma4-bridge merge")),
    "dora": ("base_dir", dict(target_modules=["q_proj"], use_dora=True), ("DoRA", "plain LoRA", "convert_hf_to_gguf.py")),
    "embedding": ("base_dir", dict(target_modules=["embed_tokens", "q_proj"]), ("embedding", "plain LoRA", "convert_hf_to_gguf.py")),
    "experts": ("moe_base", dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj"]), ("expert", "gemma4-bridge merge", "convert_hf_to_gguf.py")),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_with_route(case: str, request: pytest.FixtureRequest, tmp_path: Path, capsys) -> None:
    base_fixture, lora_kwargs, words = REFUSED[case]
    base = request.getfixturevalue(base_fixture)
    adapter = _peft_adapter(base, tmp_path / "adapter", **lora_kwargs)
    before = dir_digest(adapter)
    out = tmp_path / "out" / "adapter.gguf"
    assert main(["export-gguf", str(adapter), "--base", str(base), "-o", str(out)]) != 0
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))
    assert dir_digest(adapter) == before


def test_inspect_llamacpp_verdicts(scaled_adapter: Path, base_dir: Path, tiny_dir: Path, all_linear_adapter: Path, capsys) -> None:
    main(["inspect", str(scaled_adapter), "--base", str(base_dir), "--json", "--no-scan"])
    verdicts = {v["server"]: v for v in json.loads(capsys.readouterr().out)["verdicts"]}
    assert verdicts["llama.cpp (convert_lora_to_gguf)"]["status"] == "loads, silently wrong"
    assert "rsLoRA" in verdicts["llama.cpp (convert_lora_to_gguf)"]["notes"][0]
    assert verdicts["llama.cpp via export-gguf"]["status"] == "loads"
    main(["inspect", str(all_linear_adapter), "--base", str(tiny_dir), "--json", "--no-scan"])
    verdicts = {v["server"]: v for v in json.loads(capsys.readouterr().out)["verdicts"]}
    stock = verdicts["llama.cpp (convert_lora_to_gguf)"]
    assert stock["status"] == "loads, silently wrong" and any("dropped without a word" in n for n in stock["notes"])
    ours = verdicts["llama.cpp via export-gguf"]
    assert ours["status"] == "fails" and any("gemma4-bridge merge" in n for n in ours["notes"]), ours


def test_without_gguf_package(scaled_adapter: Path, base_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """gguf is an optional extra: inspect still works and says how to get it; export-gguf says so too."""
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    assert main(["inspect", str(scaled_adapter), "--base", str(base_dir), "--json", "--no-scan"]) == 0
    ours = next(v for v in json.loads(capsys.readouterr().out)["verdicts"] if v["server"] == "llama.cpp via export-gguf")
    assert ours["status"] == "fails" and "gemma4-bridge[llamacpp]" in ours["notes"][0]
    assert main(["export-gguf", str(scaled_adapter), "--base", str(base_dir), "-o", str(tmp_path / "a.gguf")]) == 2
    assert "gemma4-bridge[llamacpp]" in capsys.readouterr().err and not (tmp_path / "a.gguf").exists()


# -- llama.cpp itself -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_tools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gguf_helpers import llama_cpp_tools

    return llama_cpp_tools(tmp_path_factory.mktemp("llama_cpp_tools"))


@pytest.fixture(scope="module")
def base_gguf(llama_tools: Path, base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gguf_helpers import run_llama_cpp_tool

    out = tmp_path_factory.mktemp("gguf_base_gguf") / "base.gguf"
    run_llama_cpp_tool(llama_tools, "convert_hf_to_gguf.py", str(base_dir), "--outfile", str(out), "--outtype", "f32")
    return out


@pytest.mark.llamacpp
def test_llamacpp_applies_export_with_peft_numbers(llama_tools, base_dir, base_gguf, scaled_adapter, exported, tmp_path) -> None:
    """llama.cpp + our GGUF = transformers + PEFT within BOUND, and = llama.cpp on the PEFT-merged model
    (same kernels) within KERNEL_BOUND. llama.cpp's own converter is far off for rsLoRA/patterns, writes
    exactly our tensors for a plain adapter (names and layout agree), and its LoRA on
    per_layer_model_projection loads and changes nothing (why export-gguf refuses it)."""
    from gguf_helpers import PROMPT, LlamaCppLogprobs, plain_ascii_token, reference_logprobs, run_llama_cpp_tool
    from peft import PeftModel

    from gemma4_bridge.testing.fixtures import load_tiny_model

    plain = write_peft_adapter(base_dir, tmp_path / "plain", target_modules=LM_TARGETS, seed=5, scale=0.15)
    pmp = _peft_adapter(base_dir, tmp_path / "pmp", target_modules=["per_layer_model_projection"], init_lora_weights=False)
    stock = {}
    for name, adapter in (("scaled", scaled_adapter), ("plain", plain), ("pmp", pmp)):
        stock[name] = tmp_path / f"stock_{name}.gguf"
        run_llama_cpp_tool(llama_tools, "convert_lora_to_gguf.py", str(adapter), "--base", str(base_dir), "--outfile", str(stock[name]), "--outtype", "f32")
    ours_plain = tmp_path / "ours_plain.gguf"
    assert main(["export-gguf", str(plain), "--base", str(base_dir), "-o", str(ours_plain)]) == 0
    _, ours_t = _read_gguf(ours_plain)
    _, stock_t = _read_gguf(stock["plain"])
    assert ours_t.keys() == stock_t.keys() and all(torch.allclose(ours_t[k], stock_t[k], rtol=1e-6, atol=0) for k in ours_t)

    # The Ollama route, independently: PEFT's merge_and_unload, converted by llama.cpp's converter.
    merged_dir = tmp_path / "merged"
    PeftModel.from_pretrained(load_tiny_model(base_dir), scaled_adapter).merge_and_unload().save_pretrained(merged_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (merged_dir / name).write_bytes((base_dir / name).read_bytes())
    merged_gguf = tmp_path / "merged.gguf"
    run_llama_cpp_tool(llama_tools, "convert_hf_to_gguf.py", str(merged_dir), "--outfile", str(merged_gguf), "--outtype", "f32")

    def ref(adapter: Path | None) -> torch.Tensor:
        model = load_tiny_model(base_dir)
        return reference_logprobs(PeftModel.from_pretrained(model, adapter) if adapter else model, PROMPT)

    force = plain_ascii_token(base_dir)
    server = LlamaCppLogprobs(base_gguf, [exported, *stock.values()], force, 512)
    try:
        served = {name: server.logprobs(PROMPT, adapter) for name, adapter in (("base", None), ("export", exported), *stock.items())}
    finally:
        server.close()
    server = LlamaCppLogprobs(merged_gguf, [], force, 512)
    try:
        served["merged"] = server.logprobs(PROMPT, None)
    finally:
        server.close()
    want = ref(scaled_adapter)
    err = {
        "base": served["base"] - ref(None),
        "export": served["export"] - want,
        "export_vs_llamacpp_merged": served["export"] - served["merged"],
        "stock_scaled": served["scaled"] - want,
        "stock_plain": served["plain"] - ref(plain),
        "stock_pmp_vs_llamacpp_base": served["pmp"] - served["base"],
    }
    err = {k: float(v.abs().max()) for k, v in err.items()}
    moved, pmp_moved = float((want - ref(None)).abs().max()), float((ref(pmp) - ref(None)).abs().max())
    print(f"adapter moves log-probs by {moved:.3f}; per_layer_model_projection LoRA by {pmp_moved:.3f}; max errors {err}")
    assert moved > 0.3 and pmp_moved > 0.3
    assert err["base"] < BOUND and err["export"] < BOUND and err["stock_plain"] < BOUND, err
    assert err["export_vs_llamacpp_merged"] < KERNEL_BOUND, err
    assert err["stock_scaled"] > 0.3, err  # the stock converter scales rsLoRA/pattern modules by alpha/r
    assert err["stock_pmp_vs_llamacpp_base"] < 1e-6, err  # loaded, never applied
