"""Offline rotation of a Llama-family model (the converter's ``--rotate``): outlier treatment that
leaves the full-precision function unchanged.

With row-vector activations, every map below is orthogonal, so the model computes the same
function before quantization (tests/test_calibrate.py checks it), while the quantizers see
flattened, outlier-free weights and activations:

* Residual stream r -> r Q, Q a seeded random orthogonal d x d matrix (``kind="orthogonal"``) or a
  randomized Hadamard matrix diag(+-1) H_d (``kind="hadamard"``, d = 2^a times a Paley order). RMSNorm commutes with Q
  once its weight g is folded into the next linear map (rms(rQ) = rms(r)), so:
  embed E -> E Q; q/k/v/gate/up W -> (W diag(g)) Q with the norm weight set to 1;
  o/down W -> Q^T W (their outputs are added to the residual), bias b -> Q^T b;
  lm_head -> (W diag(g_final)) Q with the final norm weight set to 1. A tied lm_head is written
  out as its own tensor (``tie_word_embeddings`` becomes false).
* Value/output heads: v_proj rows of each kv head -> H_hd W (H_hd the Hadamard matrix of the
  head size: Sylvester, Sylvester x Paley as for 96, else random orthogonal), o_proj columns of each head -> W H_hd^T: attention is linear in V, so each head's
  output arrives rotated and o_proj takes the rotation back. Offline only.
* down_proj input: W -> W H_b (block Hadamard, ``vllm_bipolar.format.transforms``), with the
  matching x -> x H_b applied at run time (``online_hadamard: ["down_proj"]``), since the SwiGLU
  product has no linear map before it to absorb a rotation. Only on quantized down_proj layers;
  a down_proj kept in full precision is left without it (vLLM runs it unmodified).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from vllm_bipolar.format.transforms import hadamard_block, hadamard_matrix

ROTATIONS = ("orthogonal", "hadamard")
ONLINE_HADAMARD = ("down_proj",)
_LAYER = re.compile(r"^(?P<head>(?:model\.)?layers\.\d+)\.(?P<rest>.+)$")


def _is_paley_order(n: int) -> bool:
    """n = q + 1 with q a prime = 3 (mod 4): the orders of Paley construction I."""
    q = n - 1
    return q >= 3 and q % 4 == 3 and all(q % f for f in range(2, int(q ** 0.5) + 1))


def paley_hadamard(n: int) -> torch.Tensor:
    """Unnormalized Hadamard matrix of order n = q + 1, q a prime = 3 (mod 4) (Paley construction I):
    H = I + [[0, 1^T], [-1, Q]] with Q the Jacobsthal matrix Q[i, j] = chi(j - i), chi the quadratic
    character mod q. Entries +-1, H H^T = n I."""
    if not _is_paley_order(n):
        raise ValueError(f"Paley construction I needs n - 1 a prime = 3 mod 4, got n = {n}")
    q = n - 1
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = chi[idx]
    return s + torch.eye(n, dtype=torch.float64)


def _hadamard_factor(m: int) -> torch.Tensor | None:
    """An unnormalized Hadamard matrix of order m from Paley factors (m = 1, q + 1, or a product of
    two such orders), or None."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if _is_paley_order(m):
        return paley_hadamard(m)
    for a in range(4, int(m ** 0.5) + 1, 4):
        if m % a == 0 and _is_paley_order(a) and _is_paley_order(m // a):
            return torch.kron(paley_hadamard(a), paley_hadamard(m // a))
    return None


def hadamard_any(d: int) -> torch.Tensor:
    """A normalized Hadamard matrix of order d (float64, H H^T = I): Sylvester order 2^a times a
    Paley order, e.g. 576 = 8 x 72. Raises ValueError when no such factorization exists."""
    a = 0
    while d % (2 ** (a + 1)) == 0:
        a += 1
    for k in range(a, -1, -1):  # the largest power of two first: the Paley part stays small
        m = d // 2 ** k
        h = _hadamard_factor(m)
        if h is not None:
            return torch.kron(hadamard_matrix(2 ** k), h / m ** 0.5)
    raise ValueError(f"no Hadamard matrix of order {d} is known to this tool (Sylvester x Paley); "
                     "use --rotation orthogonal")


def random_hadamard(d: int, seed: int) -> torch.Tensor:
    """diag(random signs) @ H_d: a randomized Hadamard rotation (float64), reproducible from ``seed``.
    Every entry has magnitude 1/sqrt(d), so it spreads any single channel evenly over all of them."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (d,), generator=g).to(torch.float64) * 2 - 1
    return signs[:, None] * hadamard_any(d)


def head_rotation(d: int, seed: int) -> torch.Tensor:
    """The per-head rotation of v_proj / o_proj (offline only, so any orthogonal matrix is exact): the
    Sylvester Hadamard matrix for power-of-two head sizes, Sylvester x Paley where one exists (Phi-3-mini's
    96 = 8 x 12), else a seeded random orthogonal matrix (e.g. 112)."""
    if d & (d - 1) == 0:
        return hadamard_matrix(d)
    try:
        return hadamard_any(d)
    except ValueError:
        return random_orthogonal(d, seed + 1)


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix (float64), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


class ResidualRotation:
    """Rewrites checkpoint tensors of a rotated model one at a time (streaming)."""

    def __init__(self, config: dict, get: Callable[[str], torch.Tensor], seed: int = 0,
                 down_is_quantized: Callable[[str], bool] = lambda module: True, kind: str = "orthogonal"):
        self.d = config["hidden_size"]
        heads = config["num_attention_heads"]
        self.head_dim = config.get("head_dim") or self.d // heads
        # Phi-3's fused qkv_proj: rows [q | k | v]; the v rows are the last kv_heads * head_dim.
        self.v_rows = (config.get("num_key_value_heads") or heads) * self.head_dim
        if kind not in ROTATIONS:
            raise ValueError(f"unknown rotation {kind!r}; expected one of {ROTATIONS}")
        self.q = random_orthogonal(self.d, seed) if kind == "orthogonal" else random_hadamard(self.d, seed)
        self.h_head = head_rotation(self.head_dim, seed)
        self.get = get
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.down_is_quantized = down_is_quantized
        self.seed = seed

    def _norm(self, head: str, linear_leaf: str) -> torch.Tensor:
        which = "input_layernorm" if linear_leaf in ("q_proj", "k_proj", "v_proj", "qkv_proj") else "post_attention_layernorm"
        return self.get(f"{head}.{which}.weight").to(torch.float64)

    def _heads(self, w: torch.Tensor, rows: bool) -> torch.Tensor:
        """Apply H_hd to each head's block of rows (v_proj: v -> H v) or H_hd^T to its columns (o_proj:
        W H^T H v = W v; H^T = H for Sylvester matrices, not for Paley ones)."""
        hd = self.head_dim
        if rows:  # weight [kv_heads*hd, d] or bias [kv_heads*hd]: H @ each head's block
            blocks = w.reshape(-1, hd, w.shape[1] if w.dim() == 2 else 1)
            return torch.einsum("ij,bjd->bid", self.h_head, blocks).reshape(w.shape)
        return (w.reshape(w.shape[0], -1, hd) @ self.h_head.T).reshape(w.shape)

    def transform(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The rotated version of checkpoint tensor ``name`` (float64; the caller casts)."""
        x = t.to(torch.float64)
        if name.endswith("embed_tokens.weight"):
            return x @ self.q
        if name == "lm_head.weight":
            return (x * self.get(self.final_norm_name()).to(torch.float64)[None, :]) @ self.q
        if name.endswith("norm.weight") and (name.endswith("layernorm.weight") or name == self.final_norm_name()):
            return torch.ones_like(x)
        m = _LAYER.match(name)
        if not m:
            return x
        head, rest = m.group("head"), m.group("rest")
        leaf, _, kind = rest.rpartition(".")
        leaf = leaf.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj"):
            if kind == "weight":
                x = (x * self._norm(head, leaf)[None, :]) @ self.q
            if leaf == "v_proj":
                x = self._heads(x, rows=True)
            elif leaf == "qkv_proj":
                x = torch.cat([x[:-self.v_rows], self._heads(x[-self.v_rows:], rows=True)])
            return x
        if leaf in ("o_proj", "down_proj"):
            if kind == "weight":
                x = self.q.T @ x
                if leaf == "o_proj":
                    x = self._heads(x, rows=False)
                elif self.down_is_quantized(name[: -len(".weight")]):
                    b = hadamard_block(x.shape[1])
                    x = (x.reshape(x.shape[0], -1, b) @ hadamard_matrix(b)).reshape(x.shape)
            elif kind == "bias":
                x = self.q.T @ x
            return x
        return x

    def final_norm_name(self) -> str:
        return "model.norm.weight"

    def untied_lm_head(self) -> torch.Tensor | None:
        """The rotated lm_head of a model with tied embeddings (to be written as lm_head.weight)."""
        if not self.tied:
            return None
        return self.transform("lm_head.weight", self.get("model.embed_tokens.weight"))
