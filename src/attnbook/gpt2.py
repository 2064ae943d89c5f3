"""GPT-2's weights in our ``GPT``: load a Hugging Face checkpoint, export one back, find one locally.

    from attnbook.gpt2 import find_gpt2, load_gpt2, save_gpt2, to_gqa
    model = load_gpt2("gpt2")            # the hub (network), or a local folder: load_gpt2(path)
    folder = find_gpt2()                 # a local copy, or None; never downloads
    save_gpt2(model, "out/")             # config.json + model.safetensors for transformers
    gqa = to_gqa(model, n_kv_head=4)     # chapter 18's mean-pooling conversion

``model.py`` uses GPT-2's names, so the tensors map one to one except: GPT-2's ``Conv1D``
weights are stored ``(in, out)`` and are transposed; its position table is
``transformer.wpe.weight`` (ours ``transformer.wpe.table.weight``); the oldest checkpoints lack
the ``transformer.`` prefix, omit the tied ``lm_head`` and store causal masks as buffers (skipped).
Loading refuses a config ``GPT`` cannot compute, exporting a ``GPT`` that ``GPT2LMHeadModel``
cannot represent. Hub downloads are pinned to a commit (``REVISIONS``). No tokenizer (``attnbook.data``'s ``"gpt2"``), sharding or dtype casts.
Chapter 19 builds the mapping step by step.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .convert import mha_to_gqa
from .model import GPT, NORM_EPS, GPTConfig

# name on the Hugging Face hub -> (n_layer, n_head, n_embd); the sizes of Radford et al. (2019)
SIZES = {
    "gpt2": (12, 12, 768),  # 124M parameters
    "gpt2-medium": (24, 16, 1024),  # 355M
    "gpt2-large": (36, 20, 1280),  # 774M
    "gpt2-xl": (48, 25, 1600),  # 1558M
}
VOCAB_SIZE, BLOCK_SIZE = 50257, 1024
EOT = 50256  # id of <|endoftext|> in GPT-2's vocabulary
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
ENV_DIR = "ATTNBOOK_GPT2_DIR"  # names a local checkpoint folder for find_gpt2
# the hub commit each GPT-2 is downloaded at, so that a changed repository cannot change the
# weights a chapter or a fine-tuning run starts from (openai-community/NAME, also reached as NAME)
REVISIONS = {
    "gpt2": "607a30d783dfa663caf39e06633721c8d4cfcd7e",
    "gpt2-medium": "6dcaa7a952f72f9298047fd5137cd6e4f05f41da",
    "gpt2-large": "32b71b12589c2f8d625668d2335a01cac3249519",
    "gpt2-xl": "15ea56dee5df4983c59b2538573817e1667135e2",
}
# Conv1D layers: their weights are stored (in, out), ours (out, in)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# config.json's activation_function -> GPTConfig.mlp ("gelu_pytorch_tanh" is gelu_new, fused)
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# config.json fields that change the computation: field -> (its default, the one value we run)
FIXED = {
    "layer_norm_epsilon": (1e-5, NORM_EPS),
    "scale_attn_weights": (True, True),
    "scale_attn_by_inverse_layer_idx": (False, False),
    "add_cross_attention": (False, False),
}


def gpt2_config(name: str = "gpt2") -> GPTConfig:
    """The ``GPTConfig`` of a published GPT-2: ``"gpt2"`` (124M), ``"gpt2-medium"`` (355M),
    ``"gpt2-large"`` (774M) or ``"gpt2-xl"`` (1558M); dropout 0."""
    if name not in SIZES:
        raise ValueError(f"name must be one of {', '.join(SIZES)}, got {name!r}")
    n_layer, n_head, n_embd = SIZES[name]
    return config_from_hf(
        dict(
            vocab_size=VOCAB_SIZE,
            n_positions=BLOCK_SIZE,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
        )  # fmt: skip
    )  # GPT-2's published config.json holds these and defaults for the rest


def config_from_hf(hf: dict) -> GPTConfig:
    """Our ``GPTConfig`` for a Hugging Face GPT-2 ``config.json`` (as a dict); dropout 0.

    ValueError naming the field if the config asks for what ``GPT`` does not compute.
    """
    missing = [
        k for k in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd") if k not in hf
    ]
    if missing:
        raise ValueError(f"config.json lacks {missing}: is it a GPT-2 config?")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"model_type must be 'gpt2', got {hf['model_type']!r}")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation_function {activation!r} is not supported: GPT's MLP runs "
            f"{', '.join(ACTIVATIONS)}"
        )
    for name, (default, ours) in FIXED.items():
        if hf.get(name, default) != ours:
            raise ValueError(f"{name}={hf[name]!r} is not supported: GPT computes {name}={ours!r}")
    n_embd, d_ff = hf["n_embd"], hf.get("n_inner")
    return GPTConfig(
        vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
        n_head=hf["n_head"], n_embd=n_embd, dropout=0.0, bias=True, attention="mha",
        positions="learned", mlp=ACTIVATIONS[activation], d_ff=None if d_ff == 4 * n_embd else d_ff,
        norm="layernorm",
        norm_position="pre", tie_weights=hf.get("tie_word_embeddings", True),
    )  # fmt: skip


def _hf_name(ours: str) -> str:
    """The Hugging Face name of one of our ``state_dict`` keys."""
    return ours.replace("transformer.wpe.table.", "transformer.wpe.")


def _is_conv1d(name: str) -> bool:
    return name.endswith(CONV1D)


def _is_mask_buffer(name: str) -> bool:
    """GPT-2's stored causal masks, ``h.<i>.attn.bias`` and ``h.<i>.attn.masked_bias``."""
    return name.split(".")[-2:] in (["attn", "bias"], ["attn", "masked_bias"])


def load_state(model: GPT, tensors: dict) -> GPT:
    """Copy a Hugging Face GPT-2 ``state_dict`` (names and shapes as stored) into ``model``.

    Args:
        model: a ``GPT`` built from ``config_from_hf`` of the same checkpoint.
        tensors: name -> tensor, with or without the ``transformer.`` prefix; the causal-mask
            buffers ``attn.bias``/``attn.masked_bias`` are skipped; ``lm_head.weight``, when
            ``model`` ties it, may be absent or must equal ``wte``.
    Returns ``model``. ValueError naming every missing, unexpected or misshapen tensor.
    """
    given = {}
    for name, t in tensors.items():
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        if not _is_mask_buffer(name):
            given[name] = t
    tied = model.config.tie_weights
    ours = {_hf_name(k): k for k in model.state_dict() if not (tied and k == "lm_head.weight")}
    if tied and "lm_head.weight" in given:
        head = given.pop("lm_head.weight")
        wte = given.get("transformer.wte.weight")
        if wte is not None and not torch.equal(head, wte):
            raise ValueError(
                "lm_head.weight differs from transformer.wte.weight although the config ties "
                "them (tie_word_embeddings): set tie_word_embeddings to false in config.json"
            )
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(ours) - set(given))
    unexpected = sorted(set(given) - set(ours))
    misshapen = []
    for name in sorted(set(ours) & set(given)):
        shape = shapes[ours[name]]
        expected = shape[::-1] if _is_conv1d(name) else shape  # Conv1D stores (in, out)
        if given[name].shape != expected:
            misshapen.append(f"{name} {tuple(given[name].shape)} (expected {tuple(expected)})")
    if missing or unexpected or misshapen:
        raise ValueError(
            f"the checkpoint does not fit GPT-2 of this config: missing {missing}, unexpected "
            f"{unexpected}, wrong shapes {misshapen}"
        )
    # Conv1D's (in, out) weights become Linear's (out, in)
    state = {ours[k]: (t.t() if _is_conv1d(k) else t) for k, t in given.items()}
    if tied:
        state["lm_head.weight"] = state["transformer.wte.weight"]  # one tensor, two names
    model.load_state_dict(state)
    return model


def _weights_file(folder: Path) -> Path | None:
    """The folder's ``model.safetensors``, else its ``pytorch_model.bin``, else None."""
    return next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)


def _download(name: str, revision: str | None) -> Path:
    """A hub repository's config and weights (safetensors if it has them) at ``revision``
    (default: the pinned ``REVISIONS`` commit of a GPT-2 name), downloaded once into the Hugging
    Face cache; the folder."""
    revision = revision or REVISIONS.get(name.removeprefix("openai-community/"))
    if revision is None:
        raise ValueError(
            f"{name!r} has no pinned revision: pass revision=<commit hash or tag> to say which "
            f"version of the repository to download (pinned: {', '.join(REVISIONS)})"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise ValueError(
            f"{name!r} is not a local folder, and downloading it needs huggingface_hub: "
            f"pip install 'attnbook[hf]', or pass the folder of a downloaded checkpoint"
        ) from err
    pattern = ["config.json", WEIGHT_FILES[0]]
    folder = Path(snapshot_download(name, revision=revision, allow_patterns=pattern))
    if _weights_file(folder) is None:
        folder = Path(snapshot_download(name, revision=revision, allow_patterns=[WEIGHT_FILES[1]]))
    return folder


def load_gpt2(source: str | os.PathLike, revision: str | None = None) -> GPT:
    """A ``GPT`` (eval mode, float32, dropout 0) with the weights of a Hugging Face GPT-2.

    Args:
        source: a local folder holding ``config.json`` and ``model.safetensors`` or
            ``pytorch_model.bin`` (read with ``torch.load(..., weights_only=True)``), or a hub
            name (``"gpt2"``, ``"gpt2-medium"``, ``"openai-community/gpt2-xl"``...) downloaded
            with ``huggingface_hub`` (network needed the first time).
        revision: the hub commit or tag to download; default the pinned ``REVISIONS`` entry of
            a GPT-2 name (another hub name needs one). Ignored for a local folder.
    """
    folder = Path(source)
    if not folder.is_dir():
        folder = _download(str(source), revision)
    weights = _weights_file(folder)
    if not (folder / "config.json").is_file() or weights is None:
        raise ValueError(
            f"{folder} must hold config.json and one of {', '.join(WEIGHT_FILES)} (a Hugging "
            f"Face GPT-2 checkpoint; sharded checkpoints are not supported)"
        )
    config = config_from_hf(json.loads((folder / "config.json").read_text()))
    if weights.suffix == ".safetensors":
        tensors = load_file(weights)
    else:
        tensors = torch.load(weights, map_location="cpu", weights_only=True)
    return load_state(GPT(config), tensors).eval()


def config_to_hf(config: GPTConfig) -> dict:
    """The Hugging Face ``config.json`` (a dict) of a ``GPTConfig`` that GPT-2 can represent;
    ValueError naming the first field it cannot."""
    required = dict(
        attention=("mha",), positions=("learned",), mlp=("gelu_tanh", "gelu"),
        norm=("layernorm",), norm_position=("pre",), bias=(True,), layer_attention=(None,),
    )  # fmt: skip
    for name, allowed in required.items():
        if getattr(config, name) not in allowed:
            raise ValueError(
                f"GPT-2 cannot represent {name}={getattr(config, name)!r}: it needs "
                f"{name} in {allowed}"
            )
    eot = EOT if config.vocab_size > EOT else None  # a smaller vocabulary has no <|endoftext|>
    return dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=config.vocab_size,
        n_positions=config.block_size, n_layer=config.n_layer, n_head=config.n_head,
        n_embd=config.n_embd, n_inner=config.d_ff,
        activation_function="gelu_new" if config.mlp == "gelu_tanh" else "gelu",
        layer_norm_epsilon=NORM_EPS, attn_pdrop=config.dropout, embd_pdrop=config.dropout,
        resid_pdrop=config.dropout, tie_word_embeddings=config.tie_weights,
        bos_token_id=eot, eos_token_id=eot,
    )  # fmt: skip


def save_gpt2(model: GPT, folder: str | os.PathLike) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 checkpoint (``config.json`` and
    ``model.safetensors``, in the model's dtype) that ``GPT2LMHeadModel.from_pretrained`` loads.

    ValueError naming the field if ``model`` is not a GPT-2 (see ``config_to_hf``). Returns the
    folder, created if needed.
    """
    config = config_to_hf(model.config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tied = model.config.tie_weights
    tensors = {
        _hf_name(k): (v.t() if _is_conv1d(k) else v).contiguous()  # Conv1D: (in, out)
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")  # transformers ties it back to wte
    }
    save_file(tensors, folder / WEIGHT_FILES[0], metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def to_gqa(model: GPT, n_kv_head: int) -> GPT:
    """A loaded GPT-2 with grouped-query attention: ``attnbook.convert.mha_to_gqa``, each of
    the ``n_kv_head`` key/value heads the mean of the ``n_head / n_kv_head`` heads it replaces
    (``n_kv_head = n_head``: the same model). ``model`` is not modified."""
    return mha_to_gqa(model, n_kv_head)


def find_gpt2(name: str = "gpt2", cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder of a GPT-2 checkpoint already on this machine, or None; never downloads.

    Looks, in order, at the folder named by the environment variable ``ATTNBOOK_GPT2_DIR``
    (whatever ``name`` says: it holds the checkpoint to use), then at the Hugging Face cache
    (``cache_dir``, default the hub's) for the repository ``name`` and, for a bare name like
    ``"gpt2"``, ``"openai-community/gpt2"``. ValueError if the environment variable names a
    folder without a checkpoint.
    """
    if os.environ.get(ENV_DIR):
        folder = Path(os.environ[ENV_DIR])
        if not (folder / "config.json").is_file() or _weights_file(folder) is None:
            raise ValueError(
                f"{ENV_DIR}={folder} must name a folder holding config.json and one of "
                f"{', '.join(WEIGHT_FILES)}: fix or unset it"
            )
        return folder
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    repos = [name] if "/" in name else [name, f"openai-community/{name}"]
    for repo in repos:
        try:
            folder = Path(snapshot_download(repo, cache_dir=cache_dir, local_files_only=True))
        except LocalEntryNotFoundError:
            continue
        if (folder / "config.json").is_file() and _weights_file(folder) is not None:
            return folder
    return None
