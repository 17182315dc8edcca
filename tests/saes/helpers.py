"""Tiny SAEs built by hand for tests (SAELens objects, no training)."""

import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata


def build_standard_sae(hook_name: str, *, d_in: int = 64, d_sae: int = 256, seed: int = 0, sparse: bool = True) -> StandardSAE:
    """A random StandardSAE; ``sparse`` shifts the encoder bias so only a few features fire
    (random SAEs are otherwise dense: L0 ~ d_sae / 2)."""
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook_name)))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1 / d_in**0.5)
        sae.W_dec.normal_(0, 1 / d_sae**0.5)
        if sparse:
            sae.b_enc.fill_(-1.5)
    return sae


def build_perfect_sae(hook_name: str, *, d_in: int = 64) -> StandardSAE:
    """An SAE that reconstructs exactly: features relu(x) and relu(-x), decoded as their difference."""
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=2 * d_in, metadata=SAEMetadata(hook_name=hook_name)))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_dec.zero_()
    return sae


def build_jumprelu_sae(hook_name: str, *, d_in: int = 64, d_sae: int = 256, seed: int = 0) -> JumpReLUSAE:
    torch.manual_seed(seed)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook_name)))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1 / d_in**0.5)
        sae.W_dec.normal_(0, 1 / d_sae**0.5)
        sae.threshold.fill_(1.0)
    return sae


def calibrate_sparsity(sae: StandardSAE, x: torch.Tensor, *, fire_rate: float = 0.05) -> StandardSAE:
    """Centre the SAE on ``x`` (activations of the hook, ``[n, d_in]``) like a trained one
    (``b_dec`` = mean), set the encoder bias so each feature fires on about ``fire_rate`` of the
    rows, and scale the decoder to the activations' size."""
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
        pre = (x - sae.b_dec) @ sae.W_enc
        sae.b_enc.copy_(-torch.quantile(pre, 1 - fire_rate, dim=0))
        sae.W_dec.mul_((x - sae.b_dec).norm(dim=-1).mean() / sae.W_dec.norm(dim=-1).mean())
    return sae


def sparse_sae_for(rm, hook_name: str, tokens: torch.Tensor, *, d_sae: int = 256, seed: int = 0,
                   fire_rate: float = 0.05) -> StandardSAE:
    """A random SAE at ``hook_name`` made sparse on ``rm``'s own activations for ``tokens``."""
    _, cache = rm.run_with_cache(tokens, names_filter=hook_name)
    x = cache[hook_name].flatten(0, -2)
    sae = build_standard_sae(hook_name, d_in=x.shape[-1], d_sae=d_sae, seed=seed, sparse=False)
    return calibrate_sparsity(sae, x, fire_rate=fire_rate)
