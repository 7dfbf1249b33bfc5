"""Model loading: local HF directories, clear errors for missing models, unreachable hub, missing packages."""

from __future__ import annotations

import pytest
import torch

from pipeline.data import cache, hub, offline_models
from pipeline.data.hub import HubUnreachableError
from pipeline.data.models import load_model, resolve_dtype


def test_local_hf_dir_matches_hf_forward(tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    model = load_model("tiny-local", path=tiny_hf_dir)
    assert model.cfg.rotary_base == 5000.0  # TL's Llama branch drops rope_theta; we restore it
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    tokens = model.to_tokens(["the quiet river walked slowly into the garden"])
    with torch.inference_mode():
        out = hf(tokens, output_hidden_states=True)
        logits, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_post"])
    # HF's last hidden state is after the final norm, so compare the inner one and the logits
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], out.hidden_states[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)


def test_one_call_load_equals_tls_key_by_key_load(tiny_hf_dir):
    """``load_unprocessed`` gives the parameters and buffers TL's own ``load_and_process_state_dict`` (every
    processing flag off) gives, bit for bit."""
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    from pipeline.data.models import load_unprocessed

    model = load_model("tiny-local", path=tiny_hf_dir)
    torch.manual_seed(1)
    reference = HookedTransformer(model.cfg, tokenizer=model.tokenizer, move_to_device=False)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    state = loading.get_pretrained_state_dict(str(tiny_hf_dir), model.cfg, hf_model=hf, dtype=torch.float32)
    reference.load_and_process_state_dict(
        dict(state), fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    torch.manual_seed(2)  # other initial values: every tensor must come from the state dict
    ours = HookedTransformer(model.cfg, tokenizer=model.tokenizer, move_to_device=False)
    load_unprocessed(ours, dict(state))
    want, got = reference.state_dict(), ours.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert all(torch.equal(want[k], v) for k, v in model.state_dict().items())  # load_model takes this path


def test_missing_model_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model("mine", path=tmp_path / "nowhere")


def test_unknown_model_name_is_clear():
    with pytest.raises(ValueError, match="model.path"):
        load_model("no-such-model-xyz")


def test_unreachable_hub_says_how_to_use_local_weights(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "in_hub_cache", lambda repo: False)
    with pytest.raises(HubUnreachableError, match="unreachable") as err:
        load_model("pythia-14m")
    assert "model.path=" in str(err.value)


def test_missing_offline_package_names_setup(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(offline_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="bash setup.sh"):
        load_model("smollm2-135m")


def test_dtype_names():
    assert resolve_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")
