"""load_sae on dictionary_learning's ``AutoEncoderTopK`` and ``BatchTopKSAE`` checkpoints.

Parity is checked against the library's own classes, built by its own trainers
(``dictionary_learning/trainers/{top_k,batch_top_k}.py`` of dictionary-learning 0.1.0, commit
a711efe3b60a), saved as its ``trainSAE`` saves them: ``ae.pt`` (the state dict) beside
``config.json`` (``{"trainer": trainer.config, "buffer": buffer.config}``). The refusals use
hand-built state dicts with the same keys, so they run without the library.
"""

import json

import pytest
import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAE
from sae_lens.saes.topk_sae import TopKSAE

from pm_lens.saes.load import load_sae
from tests.saes.dictionary_learning_src import dictionary_learning_module

D_IN, D_SAE, K, BATCH = 8, 32, 5, 64
LAYER = 3
HOOK = f"blocks.{LAYER}.hook_resid_post"
# ActivationBuffer.config, as dictionary_learning writes it beside the trainer's config.
BUFFER_CONFIG = {"d_submodule": D_IN, "io": "out", "n_ctxs": 8, "ctx_len": 16,
                 "refresh_batch_size": 4, "out_batch_size": 32, "device": "cpu"}


@pytest.fixture(scope="module")
def top_k():
    return dictionary_learning_module("trainers.top_k")


@pytest.fixture(scope="module")
def batch_top_k():
    return dictionary_learning_module("trainers.batch_top_k")


def make_trainer(trainer_class):
    trainer = trainer_class(
        steps=10, warmup_steps=1, activation_dim=D_IN, dict_size=D_SAE, k=K, layer=LAYER, lm_name="tiny-pm",
        submodule_name=f"resid_post_layer_{LAYER}", device="cpu", seed=0,
    )
    randomize(trainer.ae)
    return trainer


def randomize(ae):
    """Weights unlike the library's init (tied, unit-norm decoder, zero biases): decoder norms far
    from 1, nonzero biases, some features firing on every token and some on none."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ae.encoder.weight.copy_(torch.randn(D_SAE, D_IN, generator=g) / D_IN**0.5)
        ae.encoder.bias.copy_(torch.randn(D_SAE, generator=g) * 0.3 - 0.5)
        norms = 0.3 + 2 * torch.rand(D_SAE, generator=g)
        ae.decoder.weight.copy_(torch.randn(D_IN, D_SAE, generator=g) * norms)
        ae.b_dec.copy_(torch.randn(D_IN, generator=g))


def save_run(trainer, folder):
    """What dictionary_learning's trainSAE writes for one trainer."""
    torch.save({key: value.cpu() for key, value in trainer.ae.state_dict().items()}, folder / "ae.pt")
    config = {"trainer": trainer.config, "buffer": BUFFER_CONFIG}
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    return folder


def inputs(ae):
    """Activations around b_dec; the first rows so close to it that fewer than k features fire."""
    g = torch.Generator().manual_seed(1)
    x = ae.b_dec.detach() + torch.randn(BATCH, D_IN, generator=g)
    x[:4] = ae.b_dec.detach() + 0.02 * torch.randn(4, D_IN, generator=g)
    return x


def relu_pre(ae, x):
    return torch.relu(ae.encoder(x - ae.b_dec))


def assert_same_function(sae, ae, x):
    with torch.no_grad():
        f = ae.encode(x)
        torch.testing.assert_close(sae.encode(x), f, atol=1e-5, rtol=0)
        torch.testing.assert_close(sae.decode(f), ae.decode(f), atol=1e-5, rtol=0)
        torch.testing.assert_close(sae(x), ae(x), atol=1e-5, rtol=0)


# ---- parity with the library -----------------------------------------------------------------


def test_autoencoder_topk_matches_the_library(top_k, tmp_path):
    trainer = make_trainer(top_k.TopKTrainer)
    ae = trainer.ae
    with torch.no_grad():
        ae.threshold.fill_(0.4)  # read only by encode(use_threshold=True); forward must ignore it
    x = inputs(ae)
    sae = load_sae(save_run(trainer, tmp_path))

    assert type(sae) is TopKSAE
    assert sae.cfg.k == K and sae.cfg.apply_b_dec_to_input and not sae.cfg.rescale_acts_by_decoder_norm
    assert sae.cfg.metadata.hook_name == HOOK and sae.cfg.metadata.model_name == "tiny-pm"
    with torch.no_grad():
        firing = (relu_pre(ae, x) > 0).sum(dim=-1)
        assert (firing > K).any() and (firing < K).any(), "top-k must both cut and keep everything"
        assert not torch.equal(ae.encode(x, use_threshold=True), ae.encode(x))
    norms = ae.decoder.weight.norm(dim=0)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=0.05)
    assert_same_function(sae, ae, x)


def test_batch_topk_matches_the_library_per_token_threshold(batch_top_k, tmp_path):
    trainer = make_trainer(batch_top_k.BatchTopKTrainer)
    ae = trainer.ae
    x = inputs(ae)
    with torch.no_grad():
        acts = relu_pre(ae, x)
        threshold = acts[acts > 0].median()
        ae.threshold.fill_(threshold)  # a threshold that zeroes about half of the positive activations
    sae = load_sae(save_run(trainer, tmp_path))

    assert type(sae) is JumpReLUSAE and sae.cfg.apply_b_dec_to_input
    assert sae.cfg.metadata.hook_name == HOOK
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), threshold.item()), atol=0, rtol=0)
    with torch.no_grad():
        f = ae.encode(x)
        cut = (acts > 0) & (f == 0)
        assert cut.float().mean() > 0.1 and (f > 0).float().mean() > 0.1
        # BatchTopKSAE's inference is per token: a token's features do not depend on the batch.
        torch.testing.assert_close(ae.encode(x[:3]), f[:3], atol=0, rtol=0)
    assert_same_function(sae, ae, x)


def test_batch_topk_normalize_decoder_scales_features_and_thresholds(batch_top_k, tmp_path):
    trainer = make_trainer(batch_top_k.BatchTopKTrainer)
    ae = trainer.ae
    with torch.no_grad():
        ae.threshold.fill_(0.3)
    x = inputs(ae)
    norms = ae.decoder.weight.norm(dim=0).detach()
    sae = load_sae(save_run(trainer, tmp_path), normalize_decoder=True)

    with torch.no_grad():
        f = ae.encode(x)
        assert (f > 0).any() and ((relu_pre(ae, x) > 0) & (f == 0)).any()
        torch.testing.assert_close(sae.encode(x), f * norms, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), ae(x), atol=1e-5, rtol=1e-5)


def test_batch_topk_with_an_unset_threshold_is_a_dense_relu_with_a_warning(batch_top_k, tmp_path):
    trainer = make_trainer(batch_top_k.BatchTopKTrainer)  # threshold stays at its initial -1
    ae = trainer.ae
    x = inputs(ae)
    with pytest.warns(UserWarning, match=r"threshold -1.0 < 0 \(never set in training\).*dense ReLU"):
        sae = load_sae(save_run(trainer, tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(ae.encode(x), relu_pre(ae, x), atol=0, rtol=0)
    assert_same_function(sae, ae, x)


def test_topk_k_from_config_json_when_the_state_dict_has_none(top_k, tmp_path):
    """Checkpoints saved before December 2024 keep k only in config.json and have no threshold."""
    trainer = make_trainer(top_k.TopKTrainer)
    save_run(trainer, tmp_path)
    state_dict = torch.load(tmp_path / "ae.pt")
    del state_dict["k"], state_dict["threshold"]
    torch.save(state_dict, tmp_path / "ae.pt")
    x = inputs(trainer.ae)

    sae = load_sae(tmp_path)
    assert type(sae) is TopKSAE and sae.cfg.k == K
    assert_same_function(sae, trainer.ae, x)


@pytest.mark.parametrize(
    "dict_class, sae_class", [("AutoEncoderTopK", TopKSAE), ("BatchTopKSAE", JumpReLUSAE)]
)
def test_state_dict_in_memory_with_dict_class(top_k, batch_top_k, dict_class, sae_class):
    module = top_k.AutoEncoderTopK if dict_class == "AutoEncoderTopK" else batch_top_k.BatchTopKSAE
    ae = module(D_IN, D_SAE, K)
    randomize(ae)
    with torch.no_grad():
        ae.threshold.fill_(0.3)
    x = inputs(ae)

    sae = load_sae(ae.state_dict(), hook_name=HOOK, dict_class=dict_class)
    assert type(sae) is sae_class
    assert_same_function(sae, ae, x)


# ---- refusals (no library needed) ------------------------------------------------------------


def topk_state_dict(**changes):
    """The keys AutoEncoderTopK and BatchTopKSAE both save, with random values."""
    g = torch.Generator().manual_seed(2)
    state_dict = {
        "k": torch.tensor(K, dtype=torch.int32),
        "threshold": torch.tensor(0.3),
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g),
        "encoder.bias": torch.randn(D_SAE, generator=g),
        "decoder.weight": torch.randn(D_IN, D_SAE, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }
    state_dict.update(changes)
    return {key: value for key, value in state_dict.items() if value is not None}


def save(state_dict, folder, trainer=None):
    torch.save(state_dict, folder / "ae.pt")
    if trainer is not None:
        (folder / "config.json").write_text(json.dumps({"trainer": trainer}))
    return folder


def test_same_keys_without_a_class_name_ask_for_dict_class(tmp_path):
    message = ("saved by both AutoEncoderTopK and BatchTopKSAE.*"
               "pass dict_class='AutoEncoderTopK' or dict_class='BatchTopKSAE'")
    with pytest.raises(ValueError, match=message):
        load_sae(save(topk_state_dict(), tmp_path), hook_name=HOOK)
    assert type(load_sae(tmp_path, hook_name=HOOK, dict_class="BatchTopKSAE")) is JumpReLUSAE
    assert type(load_sae(tmp_path, hook_name=HOOK, dict_class="AutoEncoderTopK")) is TopKSAE


def test_dict_class_must_agree_with_config_and_be_known(tmp_path):
    save(topk_state_dict(), tmp_path, trainer={**TOPK, "k": K})
    message = "dict_class='BatchTopKSAE', but config.json .* says dict_class='AutoEncoderTopK'"
    with pytest.raises(ValueError, match=message):
        load_sae(tmp_path, hook_name=HOOK, dict_class="BatchTopKSAE")
    with pytest.raises(ValueError, match="unknown dict_class 'TopK'; allowed: 'AutoEncoder'.*'BatchTopKSAE'"):
        load_sae(tmp_path, hook_name=HOOK, dict_class="TopK")
    message = "dict_class='AutoEncoderTopK' is for dictionary_learning checkpoints only"
    with pytest.raises(ValueError, match=message):
        load_sae("some-release/some-id", format="release", dict_class="AutoEncoderTopK")


TOPK, BATCH_TOPK = {"dict_class": "AutoEncoderTopK"}, {"dict_class": "BatchTopKSAE"}
GATED_KEYS = {"decoder_bias": torch.zeros(D_IN), "encoder.weight": torch.zeros(D_SAE, D_IN),
              "r_mag": torch.zeros(D_SAE), "gate_bias": torch.zeros(D_SAE), "mag_bias": torch.zeros(D_SAE),
              "decoder.weight": torch.zeros(D_IN, D_SAE)}


@pytest.mark.parametrize(
    "state_dict, dict_class, message",
    [
        (topk_state_dict(), "GatedAutoEncoder",
         "dict_class='GatedAutoEncoder', but the weights have the keys of AutoEncoderTopK or BatchTopKSAE"),
        (topk_state_dict(threshold=None), "BatchTopKSAE",
         r"dict_class='BatchTopKSAE', but the weights have the keys of AutoEncoderTopK "
         r"\(for a BatchTopKSAE they lack \['threshold'\]"),
        (GATED_KEYS, "AutoEncoderTopK",
         "dict_class='AutoEncoderTopK', but the weights have the keys of GatedAutoEncoder"),
    ],
    ids=["topk-keys-named-gated", "batchtopk-without-threshold", "gated-keys-named-topk"],
)
def test_config_dict_class_must_match_the_weights(state_dict, dict_class, message, tmp_path):
    save(state_dict, tmp_path, trainer={"dict_class": dict_class, "k": K})
    with pytest.raises(ValueError, match=message):
        load_sae(tmp_path, hook_name=HOOK)


def test_k_buffer_and_config_must_agree(tmp_path):
    save(topk_state_dict(k=torch.tensor(K + 2, dtype=torch.int32)), tmp_path, trainer={**TOPK, "k": K})
    with pytest.raises(ValueError, match=rf"the k buffer of .*ae.pt' is {K + 2}, but config.json says k={K}"):
        load_sae(tmp_path, hook_name=HOOK)


@pytest.mark.parametrize(
    "changes, trainer, message",
    [
        ({"k": None, "threshold": None}, None, "no k for the AutoEncoderTopK .*no k buffer .*trainer.k"),
        ({"k": torch.tensor([K])}, TOPK, r"k in .* must be a 0-d integer tensor, got shape \(1,\)"),
        ({"k": torch.tensor(5.0)}, TOPK, "k in .* must be a 0-d integer tensor.*torch.float32"),
        ({"k": None}, {**TOPK, "k": "5"}, "config.json .* gives k='5'; expected an integer"),
        ({"k": torch.tensor(D_SAE + 1)}, TOPK,
         f"k={D_SAE + 1} from the k buffer of .* must be between 1 and d_sae={D_SAE}"),
        ({"threshold": torch.full((D_SAE,), 0.3)}, BATCH_TOPK,
         rf"threshold has shape \({D_SAE},\), expected \(\)"),
        ({"b_dec": torch.zeros(D_IN + 1)}, TOPK, rf"b_dec has shape \({D_IN + 1},\), expected \({D_IN},\)"),
        ({"decoder.weight": torch.zeros(D_IN, D_SAE + 1)}, BATCH_TOPK,
         rf"decoder.weight has shape \({D_IN}, {D_SAE + 1}\), expected \({D_IN}, {D_SAE}\)"),
        ({"threshold": torch.tensor(float("nan"))}, TOPK, "NaN or infinite values in threshold"),
    ],
    ids=["no-k", "k-not-0d", "k-float", "config-k-not-int", "k-above-d_sae", "threshold-per-feature",
         "b_dec-shape", "decoder-shape", "nan-threshold"],
)
def test_bad_topk_checkpoints_are_named(changes, trainer, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        load_sae(save(topk_state_dict(**changes), tmp_path, trainer=trainer), hook_name=HOOK)


def test_topk_refuses_normalize_decoder(tmp_path):
    save(topk_state_dict(), tmp_path, trainer=TOPK)
    message = "normalize_decoder=True is not possible for a TopKSAE .*which k features"
    with pytest.raises(ValueError, match=message):
        load_sae(tmp_path, hook_name=HOOK, normalize_decoder=True)


def test_float32_threshold_of_bfloat16_weights_takes_their_dtype(tmp_path):
    """dictionary_learning's update_threshold stores the threshold as float32 whatever the weights."""
    state_dict = {key: value.bfloat16() if value.is_floating_point() else value
                  for key, value in topk_state_dict().items()}
    state_dict["threshold"] = torch.tensor(0.3)
    sae = load_sae(save(state_dict, tmp_path, trainer=BATCH_TOPK), hook_name=HOOK)
    assert sae.W_enc.dtype == torch.bfloat16 and sae.threshold.dtype == torch.bfloat16
    assert torch.equal(sae.threshold, torch.full((D_SAE,), 0.3, dtype=torch.bfloat16))
