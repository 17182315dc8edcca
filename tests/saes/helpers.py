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


from pm_lens.testing import calibrate_sparsity as calibrate_sparsity  # noqa: E402
from pm_lens.testing import sparse_sae_for as sparse_sae_for  # noqa: E402
