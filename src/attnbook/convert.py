"""Convert a trained multi-head attention GPT into a cheaper variant: GQA or MLA.

    gqa = mha_to_gqa(model, n_kv_head=2)       # mean of each group's key/value heads
    mla = mha_to_mla(model, kv_lora_rank=16)   # truncated SVD of the stacked [W_K; W_V]

Every weight outside attention is copied. ``mha_to_gqa`` is the GQA paper's mean pooling
(``n_kv_head == n_head`` changes nothing). ``mha_to_mla`` factors the key and value projections
through a rank-``kv_lora_rank`` latent (exact at full rank; ``kv_norm=False``), drops the
key bias (softmax ignores it), moves the value bias into ``c_proj`` and zeroes the decoupled
rotary part, scaling the queries so the softmax scale is unchanged. It refuses ``positions=
"rope"``: a rotated key is not a fixed linear map of a position-free latent. Neither trains;
chapter 18 converts and fine-tunes.
"""

import math
from dataclasses import replace

import torch

from .model import GPT

# variants whose fused ``c_attn`` holds query | key | value rows with one key/value head per
# query head: what both conversions read
SOURCES = ("mha", "gqa")


def _check_source(model: GPT) -> None:
    cfg = model.config
    n_kv = cfg.attention_options.get("n_kv_head") or cfg.n_head
    if cfg.layer_attention is not None:
        raise ValueError(
            f"converts a model whose blocks all have multi-head attention, got a hybrid stack "
            f"(layer_attention={cfg.layer_attention})"
        )
    if cfg.attention not in SOURCES or n_kv != cfg.n_head:
        raise ValueError(
            f"converts multi-head attention (attention 'mha', or 'gqa' with n_kv_head = n_head), "
            f"got attention={cfg.attention!r} with options {cfg.attention_options}"
        )


def _converted(model: GPT, attention: str, options: dict, attn_state) -> GPT:
    """A new GPT with ``attention``/``options`` whose attention weights in block ``i`` are
    ``attn_state(i, old_attention_state)`` and every other weight is ``model``'s."""
    cfg = replace(model.config, attention=attention, attention_options=options)
    new = GPT(cfg).to(device=model.lm_head.weight.device, dtype=model.lm_head.weight.dtype)
    state = {k: v for k, v in model.state_dict().items() if ".attn." not in k}
    for i, block in enumerate(model.transformer.h):
        attn = attn_state(block.attn.state_dict())
        state.update({f"transformer.h.{i}.attn.{k}": v for k, v in attn.items()})
    new.load_state_dict(state)  # strict: every tensor of the new model is set
    return new


@torch.no_grad()
def mha_to_gqa(model: GPT, n_kv_head: int) -> GPT:
    """``model`` with grouped-query attention: ``n_kv_head`` key/value heads, each the mean of
    the consecutive heads it serves.

    Args:
        model: a ``GPT`` with multi-head attention (not modified).
        n_kv_head: key/value heads per layer; must divide ``n_head``.

    Returns a new ``GPT`` (attention ``"gqa"``), in ``model``'s mode, device and dtype.
    """
    _check_source(model)
    H, d = model.config.n_head, model.config.n_embd
    if not isinstance(n_kv_head, int) or n_kv_head < 1 or H % n_kv_head:
        raise ValueError(f"n_kv_head must be a positive divisor of n_head={H}, got {n_kv_head!r}")
    head_dim, group = d // H, H // n_kv_head

    def pool(t):  # (3 * d, ...) -> (d + 2 * n_kv_head * head_dim, ...): q kept, k and v pooled
        q, k, v = t.split(d)  # (d, ...) each, rows head by head
        k, v = (x.view(n_kv_head, group, head_dim, *x.shape[1:]).mean(1) for x in (k, v))
        return torch.cat([q, k.flatten(0, 1), v.flatten(0, 1)])

    def attn_state(old):
        return {k: pool(v) if k.startswith("c_attn.") else v for k, v in old.items()}

    new = _converted(model, "gqa", {"n_kv_head": n_kv_head}, attn_state)
    return new.train(model.training)


@torch.no_grad()
def mha_to_mla(model: GPT, kv_lora_rank: int, qk_rope_head_dim: int = 2) -> GPT:
    """``model`` with multi-head latent attention whose latent is the rank-``kv_lora_rank``
    truncated SVD of each layer's stacked key and value projections.

    Args:
        model: a ``GPT`` with multi-head attention and positions other than RoPE (not modified).
        kv_lora_rank: latent size ``r``, ``1 <= r <= n_embd`` (``n_embd``: exact).
        qk_rope_head_dim: the decoupled rotary size (even); its weights are zero, so it only
            shapes the cache, ``r + qk_rope_head_dim`` numbers per token, until fine-tuning.

    Returns a new ``GPT`` (attention ``"mla"``, ``q_lora_rank=0``, ``kv_norm=False``,
    ``qk_nope_head_dim = v_head_dim = head_dim``), in ``model``'s mode, device and dtype.
    """
    _check_source(model)
    cfg = model.config
    if cfg.positions == "rope":
        raise ValueError(
            "positions='rope' cannot be converted to MLA exactly: rotated per-head keys are not "
            "a linear map of a shared latent (see attnbook.convert's docstring); train MLA "
            "from scratch, or convert a model with learned, sinusoidal, ALiBi or no positions"
        )
    H, d = cfg.n_head, cfg.n_embd
    head_dim, r, rope = d // H, kv_lora_rank, qk_rope_head_dim
    if not isinstance(r, int) or not 1 <= r <= d:
        raise ValueError(f"kv_lora_rank must be an integer in [1, n_embd={d}], got {r!r}")
    options = dict(
        kv_lora_rank=r, q_lora_rank=0, qk_nope_head_dim=head_dim, qk_rope_head_dim=rope,
        v_head_dim=head_dim, kv_norm=False,
    )  # fmt: skip
    q_scale = math.sqrt((head_dim + rope) / head_dim)  # undoes MLA's larger softmax denominator

    def attn_state(old):
        w_q, w_k, w_v = old["c_attn.weight"].split(d)  # (d, d) each, rows head by head
        w_kv = torch.stack([w_k.view(H, head_dim, d), w_v.view(H, head_dim, d)], dim=1)
        # w_kv: (H, 2, head_dim, d)
        U, S, Vh = torch.linalg.svd(w_kv.reshape(2 * d, d).double(), full_matrices=False)
        root = S[:r].sqrt()  # (r,)
        w_kv_b = U[:, :r] * root  # (2d, r): per head its key rows, then its value rows
        w_kv_a = root[:, None] * Vh[:r]  # (r, d)
        q = torch.cat([w_q.view(H, head_dim, d) * q_scale, w_q.new_zeros(H, rope, d)], dim=1)
        state = {
            "wq.weight": q.reshape(H * (head_dim + rope), d),  # (H * (head_dim + rope), d)
            "wkv_a.weight": torch.cat([w_kv_a.to(w_q), w_q.new_zeros(rope, d)]),  # (r+rope, d)
            "wkv_b.weight": w_kv_b.to(w_q),  # (2d, r)
            "c_proj.weight": old["c_proj.weight"],  # (d, d)
        }
        if "c_attn.bias" in old:
            b_q, _, b_v = old["c_attn.bias"].split(d)  # (d,) each; the key bias drops out
            b_q = torch.cat([b_q.view(H, head_dim) * q_scale, b_q.new_zeros(H, rope)], dim=1)
            state["wq.bias"] = b_q.flatten()  # (H * (head_dim + rope),)
            state["wkv_a.bias"] = b_q.new_zeros(r + rope)  # (r + rope,)
            state["c_proj.bias"] = old["c_proj.bias"] + old["c_proj.weight"] @ b_v  # (d,)
        return state

    new = _converted(model, "mla", options, attn_state)
    return new.train(model.training)
