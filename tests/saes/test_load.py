"""load_sae gives SAELens SAEs that compute what the original checkpoints computed.

The reference formulas below are transcribed from saprmarks/dictionary_learning,
``dictionary_learning/dictionary.py`` (``AutoEncoder``, ``GatedAutoEncoder``,
``JumpReluAutoEncoder``; commit a711efe3b60a), and, for the decoder-norm-scaled convention,
from commit 088e5872957d of the same file. They use ``F.linear`` where the originals use
``nn.Linear``.
"""

import json
import re
from collections import OrderedDict

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from sae_lens import SAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata

from pm_lens.saes.load import LAYOUTS, hook_name_from_config, load_sae

D_IN, D_SAE, BATCH = 8, 32, 64
HOOK = "blocks.1.hook_resid_post"


# ---- the original formulas -------------------------------------------------------------------


def autoencoder_encode(sd, x):
    return torch.relu(F.linear(x - sd["bias"], sd["encoder.weight"], sd["encoder.bias"]))


def autoencoder_decode(sd, f):
    return F.linear(f, sd["decoder.weight"]) + sd["bias"]


def gated_pre(sd, x):
    x_enc = F.linear(x - sd["decoder_bias"], sd["encoder.weight"])
    return x_enc + sd["gate_bias"], sd["r_mag"].exp() * x_enc + sd["mag_bias"]


def gated_encode(sd, x):
    pi_gate, pi_mag = gated_pre(sd, x)
    return (pi_gate > 0).to(x.dtype) * torch.relu(pi_mag)


def gated_decode(sd, f):
    return F.linear(f, sd["decoder.weight"]) + sd["decoder_bias"]


def jumprelu_pre(sd, x):
    return x @ sd["W_enc"] + sd["b_enc"]  # apply_b_dec_to_input is False


def jumprelu_encode(sd, x):
    pre = jumprelu_pre(sd, x)
    return torch.relu(pre * (pre > sd["threshold"]))


def jumprelu_decode(sd, f):
    return f @ sd["W_dec"] + sd["b_dec"]


def decoder_norms(sd):
    """||d_i|| per feature: columns of nn.Linear's decoder weight, rows of W_dec."""
    return sd["W_dec"].norm(dim=1) if "W_dec" in sd else sd["decoder.weight"].norm(dim=0)


REFERENCE = {
    "AutoEncoder": (autoencoder_encode, autoencoder_decode),
    "GatedAutoEncoder": (gated_encode, gated_decode),
    "JumpReluAutoEncoder": (jumprelu_encode, jumprelu_decode),
}


# ---- hand-built checkpoints ------------------------------------------------------------------


def decoder_scale():
    """Per-feature decoder norms far from 1, so feature scale conventions differ."""
    return 0.3 + 2 * torch.rand(D_SAE)


def autoencoder_state_dict():
    torch.manual_seed(1)
    return {
        "bias": torch.randn(D_IN),
        "encoder.weight": torch.randn(D_SAE, D_IN) / D_IN**0.5,
        "encoder.bias": torch.randn(D_SAE) * 0.5 - 0.6,
        "decoder.weight": torch.randn(D_IN, D_SAE) * decoder_scale(),
    }


def gated_state_dict():
    torch.manual_seed(2)
    return {
        "decoder_bias": torch.randn(D_IN),
        "encoder.weight": torch.randn(D_SAE, D_IN) / D_IN**0.5,
        "r_mag": torch.randn(D_SAE) * 0.5,
        "gate_bias": torch.randn(D_SAE) * 0.5 - 0.7,
        "mag_bias": torch.randn(D_SAE) * 0.5 - 0.3,
        "decoder.weight": torch.randn(D_IN, D_SAE) * decoder_scale(),
    }


def jumprelu_state_dict():
    torch.manual_seed(3)
    threshold = 0.05 + torch.rand(D_SAE) * 0.6
    threshold[:4] = -0.4  # negative thresholds: the ReLU, not the threshold, must zero p in (-0.4, 0]
    threshold[4] = 0.0
    return {
        "W_enc": torch.randn(D_IN, D_SAE) / D_IN**0.5,
        "b_enc": torch.randn(D_SAE) * 0.3,
        "W_dec": torch.randn(D_SAE, D_IN) * decoder_scale()[:, None],
        "b_dec": torch.randn(D_IN),
        "threshold": threshold,
    }


STATE_DICTS = {
    "AutoEncoder": autoencoder_state_dict,
    "GatedAutoEncoder": gated_state_dict,
    "JumpReluAutoEncoder": jumprelu_state_dict,
}


def inputs(sd):
    torch.manual_seed(4)
    offset = sd.get("bias", sd.get("decoder_bias", torch.zeros(D_IN)))
    return offset + torch.randn(BATCH, D_IN)


def save(sd, tmp_path, name="ae.pt"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


# ---- dictionary_learning: exact parity -------------------------------------------------------


@pytest.mark.parametrize("dict_class", list(STATE_DICTS))
def test_dictionary_learning_matches_original_formulas(dict_class, tmp_path):
    sd = STATE_DICTS[dict_class]()
    encode, decode = REFERENCE[dict_class]
    x = inputs(sd)
    sae = load_sae(save(sd, tmp_path), hook_name=HOOK)

    assert type(sae) is LAYOUTS[dict_class].sae_class
    assert sae.cfg.metadata.hook_name == HOOK
    expected = encode(sd, x)
    active = (expected > 0).float().mean().item()
    assert 0.1 <= active <= 0.5, f"test data should have a mix of active features, got {active:.2f}"
    f = sae.encode(x)
    torch.testing.assert_close(f, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(sae.decode(f), decode(sd, expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(sae(x), decode(sd, expected), atol=1e-5, rtol=0)


def test_gated_magnitude_relu_acts_where_the_gate_is_open(tmp_path):
    sd = gated_state_dict()
    x = inputs(sd)
    pi_gate, pi_mag = gated_pre(sd, x)
    open_but_negative = (pi_gate > 0) & (pi_mag <= 0)
    closed_but_positive = (pi_gate <= 0) & (pi_mag > 0)
    assert open_but_negative.any() and closed_but_positive.any()
    f = load_sae(save(sd, tmp_path), hook_name=HOOK).encode(x)
    assert (f[open_but_negative] == 0).all()
    assert (f[closed_but_positive] == 0).all()


def test_jumprelu_threshold_is_strict_and_negative_thresholds_keep_the_relu(tmp_path):
    sd = jumprelu_state_dict()
    # A one-hot input makes the pre-activation exact, so it can sit exactly on the threshold.
    x = torch.zeros(1, D_IN)
    x[0, 0] = 1.0
    pre = jumprelu_pre(sd, x)[0]
    on, above = torch.arange(5, 15), torch.arange(15, 25)
    sd["threshold"][on] = pre[on]
    sd["threshold"][above] = torch.nextafter(pre[above], torch.tensor(-float("inf")))
    sae = load_sae(save(sd, tmp_path), hook_name=HOOK)

    f = sae.encode(x)[0]
    assert (f[on] == 0).all(), "pre-activation equal to the threshold must not fire"
    above_positive = above[pre[above] > 0]
    assert len(above_positive) > 0
    torch.testing.assert_close(f[above_positive], pre[above_positive], atol=0, rtol=0)
    torch.testing.assert_close(f, jumprelu_encode(sd, x)[0], atol=0, rtol=0)

    batch = inputs(sd)
    pre_batch = jumprelu_pre(sd, batch)
    negative_threshold = torch.zeros_like(pre_batch, dtype=torch.bool)
    negative_threshold[:, :4] = True
    between = negative_threshold & (pre_batch > -0.4) & (pre_batch <= 0)
    assert between.any()
    assert (sae.encode(batch)[between] == 0).all()


@pytest.mark.parametrize("dict_class", list(STATE_DICTS))
def test_normalize_decoder_gives_the_decoder_norm_scaled_convention(dict_class, tmp_path):
    """dictionary.py at 088e5872957d: encode multiplies by ||d_i||, decode divides by it first."""
    sd = STATE_DICTS[dict_class]()
    encode, decode = REFERENCE[dict_class]
    x = inputs(sd)
    norms = decoder_norms(sd)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=0.05)
    sae = load_sae(save(sd, tmp_path), hook_name=HOOK, normalize_decoder=True)

    expected = encode(sd, x) * norms
    f = sae.encode(x)
    torch.testing.assert_close(f, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(f), decode(sd, expected / norms), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-5, rtol=0)


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    sd = gated_state_dict()
    save_file(sd, tmp_path / "gated.safetensors")
    x = inputs(sd)
    sae = load_sae(tmp_path / "gated.safetensors", hook_name=HOOK)
    torch.testing.assert_close(sae.encode(x), gated_encode(sd, x), atol=1e-5, rtol=0)


def test_directory_with_config_names_the_hook(tmp_path):
    sd = gated_state_dict()
    save(sd, tmp_path)
    trainer = {"dict_class": "GatedAutoEncoder", "layer": 3, "submodule_name": "resid_post_layer_3",
               "activation_dim": D_IN, "dict_size": D_SAE, "lm_name": "tiny-pm"}
    (tmp_path / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"io": "out"}}))
    x = inputs(sd)

    sae = load_sae(tmp_path)
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert sae.cfg.metadata.model_name == "tiny-pm"
    torch.testing.assert_close(sae.encode(x), gated_encode(sd, x), atol=1e-5, rtol=0)
    assert load_sae(tmp_path / "ae.pt").cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    overridden = load_sae(tmp_path, hook_name="blocks.2.hook_resid_post")
    assert overridden.cfg.metadata.hook_name == "blocks.2.hook_resid_post"


@pytest.mark.parametrize(
    "config, hook",
    [
        ({"trainer": {"layer": 5, "submodule_name": "resid_post_layer_5"}}, "blocks.5.hook_resid_post"),
        ({"trainer": {"layer": 5, "submodule_name": "residual"}}, "blocks.5.hook_resid_post"),
        ({"trainer": {"layer": 5, "submodule_name": "resid_post_layer_4"}}, None),
        ({"trainer": {"layer": 5, "submodule_name": "mlp_layer_5"}}, None),
        ({"trainer": {"layer": 5, "submodule_name": "layer5_input_layernorm"}}, None),
        ({"trainer": {"layer": 5}}, None),
        ({"trainer": {"layer": 5, "submodule_name": "resid_post_layer_5"}, "buffer": {"io": "in"}}, None),
        ({}, None),
    ],
)
def test_hook_name_from_config_only_when_unambiguous(config, hook):
    assert hook_name_from_config(config) == hook


def test_device_and_dtype(tmp_path):
    sd = jumprelu_state_dict()
    x = inputs(sd).double()
    sae = load_sae(save(sd, tmp_path), hook_name=HOOK, device="cpu", dtype=torch.float64)
    assert sae.W_enc.dtype == torch.float64 and sae.cfg.dtype == "float64"
    assert sae.W_enc.device.type == "cpu"
    sd64 = {key: value.double() for key, value in sd.items()}
    torch.testing.assert_close(sae.encode(x), jumprelu_encode(sd64, x), atol=1e-12, rtol=0)


# ---- SAELens directory -----------------------------------------------------------------------


def tiny_saelens_sae():
    cfg = JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=SAEMetadata(hook_name=HOOK))
    sae = JumpReLUSAE(cfg)
    torch.manual_seed(5)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
        sae.threshold.copy_(torch.rand(D_SAE) * 0.5)
    return sae


def test_saelens_directory_round_trip(tmp_path):
    sae = tiny_saelens_sae()
    sae.save_model(tmp_path / "sae")
    x = torch.randn(BATCH, D_IN)

    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is JumpReLUSAE
    assert loaded.cfg.metadata.hook_name == HOOK
    expected = sae.encode(x)
    assert 0 < (expected > 0).float().mean() < 1
    assert torch.equal(loaded.encode(x), expected)
    assert load_sae(tmp_path / "sae", format="saelens").cfg.metadata.hook_name == HOOK

    other = load_sae(tmp_path / "sae", hook_name="blocks.0.hook_resid_pre")
    assert other.cfg.metadata.hook_name == "blocks.0.hook_resid_pre"
    assert torch.equal(other.encode(x), expected)


def test_saelens_directory_without_hook_name_needs_one(tmp_path):
    sae = tiny_saelens_sae()
    sae.cfg.metadata.hook_name = None
    sae.save_model(tmp_path / "sae")
    with pytest.raises(ValueError, match="no hook name.*hook_name="):
        load_sae(tmp_path / "sae")
    assert load_sae(tmp_path / "sae", hook_name=HOOK).cfg.metadata.hook_name == HOOK


# ---- SAELens releases ------------------------------------------------------------------------


@pytest.fixture
def fake_from_pretrained(monkeypatch):
    calls = []

    def from_pretrained(release, sae_id):
        calls.append((release, sae_id))
        return tiny_saelens_sae()

    monkeypatch.setattr(SAE, "from_pretrained", from_pretrained)
    return calls


@pytest.mark.parametrize(
    "source, format, expected",
    [
        ("some-release/blocks.2.hook_resid_pre", "release", ("some-release", "blocks.2.hook_resid_pre")),
        ("gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_50", "release",
         ("gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_50")),
        (("org/repo", "sae_a"), "auto", ("org/repo", "sae_a")),
        ("gpt2-small-res-jb/blocks.8.hook_resid_pre", "auto",
         ("gpt2-small-res-jb", "blocks.8.hook_resid_pre")),
    ],
)
def test_release_is_routed_to_from_pretrained(fake_from_pretrained, source, format, expected):
    sae = load_sae(source, format=format, hook_name="blocks.7.hook_resid_post")
    assert fake_from_pretrained == [expected]
    assert sae.cfg.metadata.hook_name == "blocks.7.hook_resid_post"


def test_release_offline_says_it_needs_network_or_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match="needs network access.*local HF cache") as err:
        load_sae("gpt2-small-res-jb/blocks.8.hook_resid_pre")
    assert "gpt2-small-res-jb" in str(err.value)
    assert isinstance(err.value.__cause__, OSError)


# ---- refusals --------------------------------------------------------------------------------

UNPICKLED = []


def _record_unpickling():
    UNPICKLED.append(True)
    return "payload"


class Payload:
    """Unpickling this would run ``_record_unpickling``: a stand-in for arbitrary code."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_pickled_objects_are_refused_without_being_run(tmp_path):
    sd = autoencoder_state_dict()
    sd["payload"] = Payload()
    with pytest.raises(ValueError, match="refusing to load .*not a plain state dict of tensors"):
        load_sae(save(sd, tmp_path), hook_name=HOOK)
    assert UNPICKLED == []


def test_unknown_layout_names_keys_and_supported_ones(tmp_path):
    sd = autoencoder_state_dict()
    sd["k"] = torch.tensor(4.0)  # e.g. a TopK checkpoint
    with pytest.raises(ValueError, match=r"unrecognised .*'k'.*GatedAutoEncoder.*JumpReluAutoEncoder"):
        load_sae(save(sd, tmp_path), hook_name=HOOK)


def test_wrong_shape_is_named(tmp_path):
    sd = gated_state_dict()
    sd["r_mag"] = torch.zeros(D_SAE + 1)
    with pytest.raises(ValueError, match=rf"r_mag has shape \({D_SAE + 1},\), expected \({D_SAE},\)"):
        load_sae(save(sd, tmp_path), hook_name=HOOK)
    sd = gated_state_dict()
    sd["decoder.weight"] = torch.zeros(D_IN + 1, D_SAE)
    message = rf"decoder.weight has shape \({D_IN + 1}, {D_SAE}\), expected \({D_IN}, {D_SAE}\)"
    with pytest.raises(ValueError, match=message):
        load_sae(save(sd, tmp_path), hook_name=HOOK)


def test_config_dict_class_must_match_the_weights(tmp_path):
    save(gated_state_dict(), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    with pytest.raises(ValueError, match="dict_class='AutoEncoder'.*GatedAutoEncoder"):
        load_sae(tmp_path, hook_name=HOOK)


def test_missing_hook_name_asks_for_one(tmp_path):
    save(gated_state_dict(), tmp_path)
    with pytest.raises(ValueError, match="no hook name .*hook_name="):
        load_sae(tmp_path)
    config = {"trainer": {"layer": 2, "submodule_name": "mlp_layer_2"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layer=2, submodule_name='mlp_layer_2'.*hook_name="):
        load_sae(tmp_path)


def test_bad_format_value(tmp_path):
    allowed = "'auto'.*'saelens'.*'release'.*'dictionary_learning'"
    with pytest.raises(ValueError, match=f"unknown format 'pt'.*{allowed}"):
        load_sae(tmp_path, format="pt")


def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "ae.pt"
    with pytest.raises(ValueError, match="not an existing file or directory"):
        load_sae(missing)
    with pytest.raises(ValueError, match="no such file or directory.*format='dictionary_learning'"):
        load_sae(missing, format="dictionary_learning")
    with pytest.raises(ValueError, match="no such file or directory.*format='saelens'"):
        load_sae(missing, format="saelens")


def test_directory_of_something_else(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="cannot tell what the directory .* holds"):
        load_sae(tmp_path)
    with pytest.raises(ValueError, match="cannot tell the format of the file"):
        load_sae(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="not a SAELens SAE directory: it lacks cfg.json"):
        load_sae(tmp_path, format="saelens")


def test_bad_release_id():
    with pytest.raises(ValueError, match="'release/sae_id' or \\(release, sae_id\\), got 'just-a-release'"):
        load_sae("just-a-release", format="release")


# ---- state dicts in memory, other source types, non-finite weights ---------------------------


@pytest.mark.parametrize("dict_class", list(STATE_DICTS))
def test_state_dict_in_memory_matches_the_checkpoint(dict_class, tmp_path):
    sd = STATE_DICTS[dict_class]()
    encode, _ = REFERENCE[dict_class]
    x = inputs(sd)
    from_memory = load_sae(OrderedDict(sd), hook_name=HOOK)  # what ae.state_dict() returns
    from_file = load_sae(save(sd, tmp_path), hook_name=HOOK)

    assert type(from_memory) is LAYOUTS[dict_class].sae_class
    assert from_memory.cfg.metadata.hook_name == HOOK
    torch.testing.assert_close(from_memory.encode(x), encode(sd, x), atol=1e-5, rtol=0)
    torch.testing.assert_close(from_memory(x), from_file(x), atol=0, rtol=0)


def test_state_dict_in_memory_needs_a_hook_name():
    message = "no hook name for the state dict passed as source: .*no config.json.*hook_name="
    with pytest.raises(ValueError, match=message):
        load_sae(gated_state_dict())


def test_state_dict_in_memory_must_hold_tensors():
    sd = gated_state_dict()
    sd["step"] = 3
    with pytest.raises(TypeError, match=r"must map names \(str\) to tensors; got 'step': int"):
        load_sae(sd, hook_name=HOOK)


def test_state_dict_in_memory_is_only_a_dictionary_learning_source():
    message = "a state dict is for dictionary_learning checkpoints only, not format='saelens'"
    with pytest.raises(ValueError, match=message):
        load_sae(gated_state_dict(), hook_name=HOOK, format="saelens")


ALLOWED_SOURCES = (
    "source must be a path (str or Path), a SAELens release ('release/sae_id' or (release, sae_id)) "
    "or a dictionary_learning state dict (a mapping from names to tensors), not "
)


@pytest.mark.parametrize(
    "make_source, named",
    [
        (lambda: 5, "int"),
        (lambda: None, "NoneType"),
        (lambda: b"ae.pt", "bytes"),
        (lambda: torch.nn.Linear(2, 2), "Linear; for a dictionary_learning module pass its state_dict()"),
        (lambda: tiny_saelens_sae(), "JumpReLUSAE; it is already a SAELens SAE: use it as it is"),
    ],
)
def test_unsupported_source_types_name_the_type_and_what_is_allowed(make_source, named):
    with pytest.raises(TypeError, match=re.escape(ALLOWED_SOURCES + named)):
        load_sae(make_source(), hook_name=HOOK)


def test_non_finite_weights_are_refused_from_every_source(tmp_path, monkeypatch):
    sd = gated_state_dict()
    sd["mag_bias"][3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values in mag_bias"):
        load_sae(save(sd, tmp_path), hook_name=HOOK)
    with pytest.raises(ValueError, match="NaN or infinite values in mag_bias"):
        load_sae(sd, hook_name=HOOK)

    sae = tiny_saelens_sae()
    with torch.no_grad():
        sae.threshold[0] = float("inf")
    sae.save_model(tmp_path / "sae")
    with pytest.raises(ValueError, match=r"the SAE from '.*sae' has NaN or infinite values in threshold$"):
        load_sae(tmp_path / "sae")
    monkeypatch.setattr(SAE, "from_pretrained", lambda release, sae_id: sae)
    message = "the SAE from 'some-release/some-id' has NaN or infinite values in threshold"
    with pytest.raises(ValueError, match=message):
        load_sae("some-release/some-id", format="release")


def test_dtype_that_overflows_the_weights_is_refused():
    sd = jumprelu_state_dict()
    sd["b_dec"][0] = 1e6  # beyond float16's largest value, 65504
    with pytest.raises(ValueError, match="NaN or infinite values in b_dec after conversion to torch.float16"):
        load_sae(sd, hook_name=HOOK, dtype=torch.float16)


def test_normalize_decoder_refuses_all_zero_decoder_vectors():
    sd = jumprelu_state_dict()
    sd["W_dec"][[2, 7]] = 0.0  # would divide by a zero norm
    with pytest.raises(ValueError, match=r"features \[2, 7\] \(2 in all\) have all-zero decoder vectors"):
        load_sae(sd, hook_name=HOOK, normalize_decoder=True)
