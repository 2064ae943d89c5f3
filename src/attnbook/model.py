"""A GPT language model that runs with any registered attention variant.

    from attnbook.model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128,
                          attention="gqa", attention_options={"n_kv_head": 2}, positions="rope"))
    logits, loss = model(idx, targets)            # idx, targets: (B, T) -> logits (B, T, 65)
    out = model.generate(idx, max_new_tokens=50)  # (B, T + 50), decoded with the KV cache

GPT-2's layout with nanoGPT's names (``transformer.wte``, ``wpe`` for learned or sinusoidal
positions, ``drop``, the blocks ``h``, ``ln_f``, and ``lm_head`` tied to ``wte``), so GPT-2's
weights map one to one (``gpt2.py``). ``GPTConfig`` switches what later models changed: the
attention variant (or one per block: ``layer_attention``, a hybrid stack such as Gemma 3's five
sliding-window layers per global one), positions, GELU or SwiGLU, LayerNorm or RMSNorm, pre- or
post-norm. Not here: padding masks, beam search, mixed precision (the training loop's).
Chapter 17 assembles it; chapter 15 stacks variants.
"""

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionConfig, attention_class, available, build_attention
from .attention.config import POSITIONS
from .attention.registry import option_names
from .checks import check_positive_int
from .mlp import ACTIVATIONS, MLP, SwiGLU, swiglu_hidden
from .positions import PositionalEmbedding

GATED = {"swiglu": "silu", "geglu": "gelu"}  # gated MLPs and the activation of their gate
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
NORM_EPS = 1e-5  # GPT-2's LayerNorm epsilon, used for RMSNorm too
INIT_STD = 0.02  # GPT-2's initialisation of every weight matrix
MIN_TEMPERATURE = 1e-6  # logits of size ~100 divided by less would overflow float32
# AttentionConfig fields that GPTConfig sets itself (a GPT is causal by construction).
SET_BY_GPT = ("n_embd", "n_head", "block_size", "dropout", "bias", "positions", "causal")
CONFIG_FIELDS = [f.name for f in fields(AttentionConfig)]
DEFAULT_ATTENTION = "mha"  # GPTConfig.attention's default, which a hybrid stack leaves alone


def layer_pattern(period: list[str], n_layer: int) -> list[str]:
    """A ``layer_attention`` list: ``period`` repeated and cut at ``n_layer`` blocks.

    ``layer_pattern(["local"] * 5 + ["mha"], 12)`` is Gemma 3's five sliding-window layers per
    global one; ``["local", "mha"]`` alternates them as gpt-oss does; ``["gated_deltanet"] * 3
    + ["mha"]`` is Qwen3-Next's three Gated DeltaNet layers per full-attention layer.
    """
    check_positive_int("n_layer", n_layer)
    if not isinstance(period, list | tuple) or not period:
        raise ValueError(f"period must be a non-empty list of attention names, got {period!r}")
    return [period[i % len(period)] for i in range(n_layer)]


@dataclass
class GPTConfig:
    """Sizes and switches of a GPT, validated when it is built (ValueError naming the field).

    Args:
        vocab_size: number of token ids; 50304 (GPT-2's 50257 rounded up to a multiple of 64).
        block_size: the longest sequence the model reads in one pass (and the prompt plus
            generated tokens when decoding with the KV cache, unless every layer's cache is
            bounded and positions are not a table: see ``GPT.check_streaming``).
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide ``n_embd``.
        n_embd: width of the residual stream.
        dropout: dropout after the embeddings, on the attention weights and on the output of
            every attention and MLP, in [0, 1).
        bias: whether linear layers and LayerNorms have biases.
        attention: a name in ``attnbook.attention.available()``: every block's variant.
        attention_options: the variant's own options, e.g. ``{"n_kv_head": 2}`` ("gqa"),
            ``{"window": 64}`` ("local"), and ``AttentionConfig`` fields this class does not
            set (``rope_base``, ``rope_pairing``, ``impl``, and the modern block's ``qk_norm``,
            ``output_gate``, ``sinks``, ``softcap``). JSON-safe values only.
        layer_attention: a hybrid stack: one name of ``available()`` per block (``n_layer``
            of them, stored as a list), e.g. ``layer_pattern(["local"] * 5 + ["mha"], 12)``;
            it names every block's variant, so ``attention`` must then stay at its default
            ``"mha"``. ``attention_options`` go where they belong: ``AttentionConfig`` fields to
            every block, a variant's option to every block whose variant takes it (``window``
            to the "local" blocks only); one that no listed variant takes is refused. None:
            every block is ``attention``.
        positions: ``"learned"`` or ``"sinusoidal"`` (added to the token embeddings),
            ``"rope"`` or ``"alibi"`` (done in every attention layer) or ``"none"``.
        mlp: an activation of ``attnbook.mlp.ACTIVATIONS`` for an ``MLP`` (``"gelu"``,
            ``"gelu_tanh"`` as GPT-2, ``"relu"``, ``"silu"``, or one registered with
            ``register_activation``), or a gated ``SwiGLU``: ``"swiglu"`` or ``"geglu"``.
        d_ff: the MLP's hidden width; None means ``4 * n_embd``, or for a gated MLP
            ``swiglu_hidden(n_embd)`` (``8 * n_embd / 3`` rounded up to 64).
        norm: ``"layernorm"`` or ``"rmsnorm"`` (no mean subtraction, no bias).
        norm_position: ``"pre"`` (GPT-2: ``x + f(norm(x))``) or ``"post"`` (the original
            transformer: ``norm(x + f(x))``).
        tie_weights: whether ``lm_head`` shares its weight with the token embeddings.

    A variant that refuses a combination (e.g. "linear" with ``positions="alibi"``) says so when
    the config is built (one layer of each variant is built on the meta device to check).
    """

    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    attention: str = DEFAULT_ATTENTION
    attention_options: dict = field(default_factory=dict)
    layer_attention: list[str] | None = None
    positions: str = "learned"
    mlp: str = "gelu"
    d_ff: int | None = None
    norm: str = "layernorm"
    norm_position: str = "pre"
    tie_weights: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_positive_int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: choose n_head "
                f"among the divisors of n_embd"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.attention not in available():
            raise ValueError(
                f"attention: unknown attention {self.attention!r}; registered names: "
                f"{', '.join(available())}"
            )
        for name, allowed in (
            ("positions", POSITIONS),
            ("mlp", tuple(sorted(ACTIVATIONS)) + tuple(GATED)),
            ("norm", NORMS),
            ("norm_position", NORM_POSITIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.d_ff is not None:
            check_positive_int("d_ff", self.d_ff)
        if not isinstance(self.attention_options, dict):
            raise ValueError(
                f"attention_options must be a dict, got {type(self.attention_options).__name__}"
            )
        refused = [key for key in self.attention_options if key in SET_BY_GPT]
        if refused:
            raise ValueError(
                f"attention_options has keys {refused} that GPTConfig sets itself "
                f"({', '.join(SET_BY_GPT)}): set the GPTConfig fields instead"
            )
        if self.layer_attention is not None:
            self._check_layer_attention()
        variants = self.layer_variants()
        with torch.device("meta"):  # every check of the config and the variants, no memory
            for name in dict.fromkeys(variants):  # the first block of each variant
                window = self.build_attention(variants.index(name)).window
                if window is not None and window > self.block_size:
                    raise ValueError(
                        f"attention {name!r} has window={window} > block_size="
                        f"{self.block_size}: every training sequence fits in one window, so the "
                        f"layer would be full causal attention; choose window <= block_size"
                    )

    def _check_layer_attention(self) -> None:
        """``layer_attention``: n_layer registered names, ``attention`` left at its default,
        every variant option taken by some listed variant; stored as a list (JSON's)."""
        names = self.layer_attention
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise ValueError(
                f"layer_attention must be None or a list of attention names, one per block, got "
                f"{names!r} (on the command line: comma-separated names)"
            )
        if len(names) != self.n_layer:
            raise ValueError(
                f"layer_attention names {len(names)} variants for n_layer={self.n_layer} blocks: "
                f"give one per block (layer_pattern repeats a period)"
            )
        unknown = [n for n in dict.fromkeys(names) if n not in available()]
        if unknown:
            raise ValueError(
                f"layer_attention: unknown attention {', '.join(map(repr, unknown))}; registered "
                f"names: {', '.join(available())}"
            )
        if self.attention != DEFAULT_ATTENTION:
            raise ValueError(
                f"attention={self.attention!r} and layer_attention are both set: layer_attention "
                f"names every block's variant; leave attention at its default "
                f"{DEFAULT_ATTENTION!r}"
            )
        self.layer_attention = list(names)
        variants = list(dict.fromkeys(names))
        taken = {o for n in variants for o in option_names(attention_class(n))}
        untaken = [k for k in self.attention_options if k not in CONFIG_FIELDS and k not in taken]
        if untaken:
            raise ValueError(
                f"attention_options {untaken} are options of none of layer_attention's variants "
                f"({', '.join(variants)}): drop them or add a variant that takes them"
            )

    def layer_variants(self) -> list[str]:
        """The variant of each block: ``layer_attention``, or ``attention`` ``n_layer`` times."""
        if self.layer_attention is not None:
            return list(self.layer_attention)
        return [self.attention] * self.n_layer

    def attention_config(self) -> AttentionConfig:
        """The ``AttentionConfig`` every block's attention is built from (hybrid or not)."""
        shared = {k: v for k, v in self.attention_options.items() if k in CONFIG_FIELDS}
        return AttentionConfig(
            n_embd=self.n_embd,
            n_head=self.n_head,
            block_size=self.block_size,
            dropout=self.dropout,
            bias=self.bias,
            causal=True,
            positions=self.positions,
            **shared,
        )

    def build_attention(self, layer: int) -> nn.Module:
        """Block ``layer``'s attention (every block's alike without ``layer_attention``):
        ``attention_config()`` and the variant's own options (the ``attention_options`` that
        are not ``AttentionConfig`` fields; in a hybrid stack, those its variant takes)."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layer:
            raise ValueError(f"layer must be a block index in 0..{self.n_layer - 1}, got {layer!r}")
        name = self.layer_variants()[layer]
        options = {k: v for k, v in self.attention_options.items() if k not in CONFIG_FIELDS}
        if self.layer_attention is not None:
            options = {k: v for k, v in options.items() if k in option_names(attention_class(name))}
        return build_attention(name, self.attention_config(), **options)

    def to_dict(self) -> dict:
        """The fields as a JSON-safe dict; ``GPTConfig.from_dict`` builds the config back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """A validated config from ``to_dict``'s output; unknown keys raise ValueError, missing
        ones (a config saved before a field existed) take their defaults."""
        names = [f.name for f in fields(cls)]
        unknown = [key for key in d if key not in names]
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; the fields are {', '.join(names)}")
        return cls(**d)


def _norm(config: GPTConfig) -> nn.Module:
    """LayerNorm (with a bias if ``config.bias``) or RMSNorm over ``n_embd`` features."""
    if config.norm == "layernorm":
        return nn.LayerNorm(config.n_embd, eps=NORM_EPS, bias=config.bias)
    return nn.RMSNorm(config.n_embd, eps=NORM_EPS)


class Block(nn.Module):
    """One transformer block: attention then feed-forward, each in a residual branch.

    Pre-norm (GPT-2): ``x = x + attn(ln_1(x))``, ``x = x + mlp(ln_2(x))``: the residual stream
    itself is never normalised, which keeps deep stacks trainable without learning-rate warm-up
    (Xiong et al., 2020).
    Post-norm (the original transformer): ``x = ln_1(x + attn(x))``, ``x = ln_2(x + mlp(x))``.

    ``Block(config, layer)``: block number ``layer`` of the stack, whose attention is
    ``config.build_attention(layer)``.
    ``forward(x, cache=None)``: ``x`` ``(B, T, n_embd)`` -> ``(B, T, n_embd)``; ``cache`` is
    this block's attention cache (see ``GPT.new_caches``).
    """

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        d = config.n_embd
        self.pre_norm = config.norm_position == "pre"
        self.ln_1 = _norm(config)
        self.attn = config.build_attention(layer)
        self.ln_2 = _norm(config)
        if config.mlp in GATED:
            hidden = config.d_ff or swiglu_hidden(d)
            self.mlp = SwiGLU(d, hidden, config.dropout, config.bias, GATED[config.mlp])
        else:
            self.mlp = MLP(d, config.d_ff or 4 * d, config.dropout, config.bias, config.mlp)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.ln_1(x), cache=cache)  # (B, T, n_embd)
            return x + self.mlp(self.ln_2(x))  # (B, T, n_embd)
        x = self.ln_1(x + self.attn(x, cache=cache))  # (B, T, n_embd)
        return self.ln_2(x + self.mlp(x))  # (B, T, n_embd)


class GPT(nn.Module):
    """A decoder-only transformer language model (see the module docstring for its layout).

    The final norm ``ln_f`` exists for pre-norm only: there the residual stream is never
    normalised, so it is normalised once before ``lm_head`` (as in GPT-2); a post-norm block
    already ends in a norm, so ``ln_f`` is an ``nn.Identity`` (no parameters).

    Initialisation (GPT-2, nanoGPT): every ``nn.Linear`` and ``nn.Embedding`` weight
    ``N(0, 0.02)``, biases 0, norms weight 1 (and bias 0); then every weight named
    ``c_proj.weight`` (the output projection of each attention and MLP, the layers that write
    into the residual stream) ``N(0, 0.02 / sqrt(2 * n_layer))``, so that the ``2 * n_layer``
    branches added to the stream do not make it grow with depth. Variant-specific modules keep
    their own initialisation unless they are linear layers or embeddings.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise ValueError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        parts = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.positions in ("learned", "sinusoidal"):
            parts["wpe"] = PositionalEmbedding(config.positions, config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(
            dict(
                **parts,
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=_norm(config) if config.norm_position == "pre" else nn.Identity(),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight  # one tensor, two uses
        self.apply(self._init_weights)
        residual_std = INIT_STD / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (a tied ``wte``/``lm_head`` counted once).

        ``non_embedding`` leaves out the position embeddings (learned ``wpe``; the other
        schemes have none), as nanoGPT does; the token embeddings stay in, because tied to
        ``lm_head`` they are also the final layer's weights.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= sum(p.numel() for p in self.transformer.wpe.parameters())
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward and backward) per token: ``6 N + 12 n_layer n_embd seq_len``.

        The estimate of PaLM (Chowdhery et al., 2022, appendix B) and Chinchilla: ``2 N`` for
        the forward pass of the weight matrix multiplies, with ``N = num_params()``, twice that
        for the backward pass, plus the attention scores and their weighted sum, ``2 * 2 *
        n_embd * seq_len`` per layer forward, times 3 with the backward. ``seq_len`` defaults to
        ``block_size``. It is the count for full causal attention computed densely (the causal
        half is not discounted); variants that attend to fewer keys (local, sparse, linear,
        MLA's smaller heads) do less, so MFU computed with it is an upper estimate for them.
        """
        if seq_len is None:
            seq_len = self.config.block_size
        check_positive_int("seq_len", seq_len)
        cfg = self.config
        return float(6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * seq_len)

    def new_caches(self, batch_size: int, max_len: int | None = None) -> list:
        """One empty cache per block, each of its attention's own kind, on the model's device.

        ``max_len`` is the longest sequence to decode: at most ``block_size`` (None: that) for a
        cache that grows; any number for a bounded one (None: no limit), see ``new_cache``.
        """
        return [block.attn.new_cache(batch_size, max_len) for block in self.transformer.h]

    def cache_bytes_per_token(self, context_len: int) -> float:
        """Bytes the caches of one sequence of ``context_len`` tokens take, per token: the sum
        over blocks of ``cache.nbytes / context_len`` for ``new_caches(1, context_len)`` (a
        cache is allocated whole, so filling it changes nothing), in the weights' dtype.

        A full KV cache costs the same per token at every length, a sliding window's
        ``min(window, L) / L`` of it, a recurrent state ``1 / L`` of its fixed size: a hybrid
        stack's figure falls with ``L`` towards its full-attention blocks' share. On the meta
        device it allocates nothing.
        """
        check_positive_int("context_len", context_len)
        return sum(c.nbytes for c in self.new_caches(1, context_len)) / context_len

    def check_streaming(self, n_positions: int) -> None:
        """ValueError unless cached decoding can reach ``n_positions > block_size``: positions
        must not come from a table (learned, sinusoidal) and every layer's cache must be bounded
        (a rolling window, a recurrent state), each layer checked, so mixed stacks too."""
        bs = self.config.block_size
        what = f"{n_positions} positions, past block_size={bs}"
        crop = "pass use_cache=False (the context is then cropped to the last block_size tokens)"
        if "wpe" in self.transformer:
            raise ValueError(
                f"decoding with the cache to {what}: positions={self.config.positions!r} has no "
                f"embedding past block_size; {crop}, ask for fewer tokens, or use a model with "
                f"positions 'rope', 'alibi' or 'none'"
            )
        for i, block in enumerate(self.transformer.h):
            cache = block.attn.new_cache(1, device="meta")  # says its kind, allocates nothing
            if not cache.bounded:
                raise ValueError(
                    f"decoding with the cache to {what}: layer {i}'s attention "
                    f"({type(block.attn).__name__}) keeps a {cache.kind} that grows with the "
                    f"sequence; {crop}, ask for fewer tokens, or use layers whose cache is "
                    f"bounded ('local' with a window, 'linear', 'deltanet', 'gated_deltanet')"
                )

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, caches=None):
        """Logits of the next token at every position, and the loss if ``targets`` are given.

        Args:
            idx: ``(B, T)`` token ids in ``[0, vocab_size)``, ``T <= block_size``. The ids are
                checked where they enter (``generate``, the data loaders), not here: reading
                them would wait for the device at every decoded token.
            targets: ``(B, T)`` int64 ids of the next tokens; ``-1`` marks a position left out
                of the loss (e.g. a task that scores only its answers).
            caches: the list from ``new_caches``; ``idx`` is then the ``T`` tokens that follow
                the ``caches[0].length`` tokens already cached, and the caches are extended
                (past ``block_size`` too where they are bounded and positions are not a table).
        Returns:
            ``(logits, loss)``: logits ``(B, T, vocab_size)``; loss the mean cross-entropy over
            the targets that are not ``-1`` (NaN if all are), or None without targets.
        """
        cfg = self.config
        if idx.dim() != 2 or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"idx must be a (B, T) tensor of integer token ids, got shape {tuple(idx.shape)} "
                f"and dtype {idx.dtype}"
            )
        B, T = idx.shape
        if not 0 < T <= cfg.block_size:
            raise ValueError(
                f"idx has T={T} tokens, the model reads 1..block_size={cfg.block_size}: crop the "
                f"sequence to its last block_size tokens"
            )
        if caches is not None and len(caches) != cfg.n_layer:
            raise ValueError(
                f"caches must hold one cache per block (n_layer={cfg.n_layer}), got {len(caches)}"
            )
        start = 0 if caches is None else caches[0].length  # position of idx's first token
        x = self.transformer.wte(idx)  # (B, T, n_embd)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(T, start)  # (B, T, n_embd) + (T, n_embd)
        x = self.transformer.drop(x)  # (B, T, n_embd)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache=None if caches is None else caches[i])  # (B, T, n_embd)
        x = self.transformer.ln_f(x)  # (B, T, n_embd)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if targets is None:
            return logits, None
        if targets.shape != (B, T):
            raise ValueError(
                f"targets must have the shape of idx, {(B, T)}, got {tuple(targets.shape)}"
            )
        loss = F.cross_entropy(
            logits.view(B * T, -1), targets.reshape(B * T).long(), ignore_index=-1
        )
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_token: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        caches: list | None = None,
    ) -> torch.Tensor:
        """Extend the prompts ``idx`` ``(B, T)`` by up to ``max_new_tokens`` tokens each.

        Call ``model.eval()`` first, or dropout stays on.

        Args:
            idx: ``(B, T)`` prompt ids.
            max_new_tokens: how many tokens to add, >= 0.
            temperature: divides the logits; 0 means greedy (the most likely token).
            top_k: sample among the ``top_k`` most likely tokens only (ties at the k-th kept).
            top_p: nucleus sampling: sample among the smallest set of most likely tokens whose
                probability reaches ``top_p`` (at least one token), in (0, 1].
            stop_token: once a sequence has produced it, it keeps producing it (padding), and
                generation ends early when every sequence has.
            use_cache: prefill the prompt into ``new_caches`` of ``T + max_new_tokens`` positions,
                then feed one token at a time. Past ``block_size`` (streaming) only if every
                layer's cache is bounded and positions are RoPE, ALiBi or none (see
                ``check_streaming``); ``False`` recomputes every step on the last ``block_size``
                tokens, so prompts and outputs may be longer than ``block_size``.
            generator: a ``torch.Generator`` on the model's device, for reproducible sampling.
            caches: caches to decode through instead of fresh ``new_caches``, one per block
                (any with the ``Cache`` interface, e.g. a chapter's own); they then hold the
                prompt and every generated token but the last. Needs ``use_cache=True``.
        Returns:
            ``(B, T + n)`` ids, the prompts followed by ``n <= max_new_tokens`` new tokens
            (fewer only if every sequence produced ``stop_token``).
        """
        cfg = self.config
        self._check_generate_args(idx, max_new_tokens, temperature, top_k, top_p, stop_token)
        if caches is not None and not use_cache:
            raise ValueError(
                "caches were given with use_cache=False: pass use_cache=True to "
                "decode through them, or leave caches out"
            )
        B, T = idx.shape
        if max_new_tokens == 0:
            return idx
        if use_cache:
            if T + max_new_tokens > cfg.block_size:
                self.check_streaming(T + max_new_tokens)
            if caches is None:
                caches = self.new_caches(B, max_len=T + max_new_tokens)
            for chunk in idx.split(cfg.block_size, dim=1):  # the prefill, block_size at a time
                logits, _ = self(chunk, caches=caches)  # (B, <= block_size, vocab_size)
        else:
            logits, _ = self(idx[:, -cfg.block_size :])  # (B, <=block_size, vocab_size)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)  # produced stop_token
        for step in range(max_new_tokens):
            nxt = _sample(logits[:, -1], temperature, top_k, top_p, generator)  # (B, 1)
            if stop_token is not None:
                nxt = nxt.masked_fill(done[:, None], stop_token)  # (B, 1): finished rows pad
                done |= nxt[:, 0] == stop_token
            idx = torch.cat([idx, nxt], dim=1)  # (B, T + step + 1)
            if step == max_new_tokens - 1 or (stop_token is not None and bool(done.all())):
                break
            if use_cache:
                logits, _ = self(nxt, caches=caches)  # (B, 1, vocab_size)
            else:
                logits, _ = self(idx[:, -cfg.block_size :])  # (B, <=block_size, vocab_size)
        return idx

    def _check_generate_args(self, idx, max_new_tokens, temperature, top_k, top_p, stop_token):
        if idx.dim() != 2:
            raise ValueError(f"idx must be a (B, T) tensor of ids, got shape {tuple(idx.shape)}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(
                f"idx holds ids {idx.min().item()}..{idx.max().item()}, outside "
                f"[0, vocab_size={self.config.vocab_size})"
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not (temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf):
            raise ValueError(
                f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE} (below "
                f"that sampling is greedy anyway, and dividing the logits overflows), got "
                f"{temperature!r}"
            )
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
            raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
        if stop_token is not None and not 0 <= stop_token < self.config.vocab_size:
            raise ValueError(
                f"stop_token must be None or an id in [0, vocab_size={self.config.vocab_size}), "
                f"got {stop_token!r}"
            )


def sampling_probs(logits, temperature=1.0, top_k=None, top_p=None) -> torch.Tensor:
    """The distribution ``GPT.generate`` draws the next token from, for logits ``(..., V)``:
    divided by ``temperature`` (0: all mass on the argmax), cut to the ``top_k`` largest, then
    to the smallest set of likeliest tokens whose mass reaches ``top_p``, renormalised."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()  # (..., V): greedy
    logits = logits.float() / temperature  # (..., V)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (..., V)
    probs = F.softmax(logits, dim=-1)  # (..., V)
    if top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (..., V) each
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (..., V): mass of the likelier ones
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the first always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)  # (..., V)
        probs = probs / probs.sum(dim=-1, keepdim=True)  # (..., V)
    return probs


def _sample(logits, temperature, top_k, top_p, generator):
    """The next token ``(B, 1)`` from the last position's logits ``(B, vocab_size)``."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1): greedy
    probs = sampling_probs(logits, temperature, top_k, top_p)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
