"""RefLoRA-style rebalancing of LoRA factors (arXiv 2505.18877): change the factorisation of B·A,
not the product, so that gradient steps on A and B are balanced.

* scalar: B ← c·B, A ← A/c with ‖cB‖_F = ‖A/c‖_F (cheap; one norm each);
* full: B ← B·P, A ← P⁻¹·A with (BP)ᵀ(BP) = (P⁻¹A)(P⁻¹A)ᵀ, where P = M^½ and M = (BᵀB)⁻¹ # (AAᵀ) is
  the matrix geometric mean, the unique SPD solution of M (BᵀB) M = AAᵀ. Costs r × r work only.
"""

from __future__ import annotations

import torch


def rebalance_scalar(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal Frobenius norms, same product. b (out, r), a (r, in)."""
    c = (a.norm() / b.norm().clamp_min(1e-30)).sqrt()
    return b * c, a / c


def _sym_power(m: torch.Tensor, power: float) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(1e-30).pow(power)) @ vecs.T


def rebalance_full(b: torch.Tensor, a: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors BP, P⁻¹A with equal r × r Gram matrices, same product; computed in float64 (the square
    roots of ill-conditioned Grams) on the factors' device."""
    dtype = b.dtype
    b64, a64 = b.double(), a.double()
    eye = torch.eye(b.shape[1], dtype=torch.float64, device=b.device)
    gb = b64.T @ b64 + eps * eye
    ga = a64 @ a64.T + eps * eye
    gb_half, gb_inv_half = _sym_power(gb, 0.5), _sym_power(gb, -0.5)
    mean = gb_inv_half @ _sym_power(gb_half @ ga @ gb_half, 0.5) @ gb_inv_half  # (BᵀB)⁻¹ # AAᵀ
    p, p_inv = _sym_power(mean, 0.5), _sym_power(mean, -0.5)
    return (b64 @ p).to(dtype), (p_inv @ a64).to(dtype)
