"""Speed and memory measurements: ``attnbook bench attention | train | ... | dsa | hybrid |
streaming``.

    attnbook bench attention --lengths 1024 4096   # see --help of each subcommand

- ``attention``: the long-context kernels (sliding window, block-sparse, chunked linear, chunked
  Gated DeltaNet, MoBA, NSA) as a ratio to full causal SDPA, Gated DeltaNet's recurrent form against its
  chunked one, then every registered layer forward + backward with its cache bytes
  per token (glibc keeps freed memory unless ``--system-malloc``, as PyTorch's CPU guide advises);
- ``train``: one training step of nanoGPT's two Shakespeare shapes, float32 and bf16 autocast,
  with model FLOPs utilisation against the matrix-multiply peak measured in the same run, for
  ``make_optimizer``'s fused AdamW against the unfused one (``--compile``: and compiled);
- ``baby``: nanoGPT's CPU training run with our trainer, the validation loss on nanoGPT's 20
  batches, on 100 independent draws of them and on 2000;
- ``generate``: greedy decoding at GPT-2 small's shape against ``transformers`` (same weights,
  same tokens checked), with the memory-bandwidth bound measured on the same machine;
- ``flash``: causal attention forward + backward by the reference math, ``flash_attention``'s
  tiles and SDPA's fused kernel: the peak bytes of the tensors each creates, and time;
- ``dsa``: one decoding step of DeepSeek Sparse Attention against dense MLA (absorbed) over the
  same cache, at DeepSeek-V3.2-Exp's per-layer sizes with fewer heads: time and bytes read;
- ``hybrid``: cache bytes per token of hybrid stacks (Gemma 3's 5 local : 1 global, gpt-oss's
  1 : 1, Qwen3-Next's 3 Gated DeltaNet : 1 full) against all-global attention, at several
  context lengths: counted from the config (``cache_bytes_formula``) and from the caches;
- ``streaming``: greedy decoding of many times ``block_size`` tokens by a RoPE model of local
  attention with sink tokens (StreamingLLM): its caches' bytes along the way, and tokens/s;
- ``mqar``: recall accuracy of small GPTs trained on multi-query associative recall alone, per
  variant, number of pairs (against the head dimension, the size of a state's key space) and
  seed; ``--csv`` keeps every run.

It measures and asserts nothing: the chapters and tests check the claims. Run it on an idle machine.
"""

import argparse
import ast
import csv
import ctypes
import functools
import os
import statistics
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .attention import AttentionConfig, attention_class, available, build_attention, sdpa_reference
from .attention.deltanet import delta_rule_chunked, delta_rule_recurrent
from .attention.dsa import DeepSeekSparseAttention, IndexedLatentCache
from .attention.flash import flash_attention
from .attention.linear import elu_feature_map, linear_attention_chunked
from .attention.local import blocked_local_attention
from .attention.mla import LatentCache, MultiHeadLatentAttention
from .attention.moba import moba_attention
from .attention.nsa import NSAOptions, compress, nsa_attention
from .attention.registry import option_names
from .attention.sparse import block_sparse_attention, draw_random_blocks
from .checks import check_positive_int
from .compare import CompareConfig, model_config, run_variant
from .data import TokenData, prepare
from .gpt2 import gpt2_config, load_gpt2
from .model import GPT, GPTConfig, layer_pattern
from .tasks import build_task
from .train import TrainConfig, load_trained, make_optimizer, read_metrics, train

N_HEAD, HEAD_DIM = 8, 64

# The long-context kernels and the ratio to full causal attention each exists to beat:
# name -> (settings shown in the table, the kernel on (q, k, v), (T, most allowed ratio)).
KERNELS = {
    "local": (
        "window 256",
        lambda q, k, v: blocked_local_attention(q, k, v, window=256),
        (4096, 0.35),
    ),
    "sparse": (
        "block 64, 2 global, 3 window, 3 random",
        lambda q, k, v: block_sparse_attention(
            q, k, v, 64, 2, 3, sparse_random_blocks(q.shape[-2])
        ),
        (4096, 0.5),
    ),
    "linear": (
        "chunked, chunk 64",
        lambda q, k, v: linear_attention_chunked(elu_feature_map(q), elu_feature_map(k), v, 64)[0],
        (8192, 0.5),
    ),
    "gated_deltanet": (
        "chunked, chunk 64",
        lambda q, k, v: gated_delta_rule(q, k, v, chunk=64),
        (8192, 0.5),
    ),
    "moba": (
        "chunk 512, top-3 (the paper's 8K setting)",
        lambda q, k, v: moba_attention(q, k, v, 512, 3),
        (8192, 0.5),
    ),
    "nsa": (
        "l 32, d 16, l' 64, n 16, w 512 (the paper's)",
        lambda q, k, v: native_sparse_attention(q, k, v, NSA_SIZES),
        (8192, 0.5),
    ),
}

NSA_SIZES = NSAOptions(
    compress_block=32, compress_stride=16, select_block=64, select_count=16, window=512
)


def gated_delta_rule(q, k, v, chunk=None):
    """The Gated DeltaNet kernel on ``(q, k, v)``: unit keys, a scaled query, write strengths and
    decays made from the inputs (so that the backward pass covers them too); chunked, or the
    recurrent form with ``chunk=None``."""
    q, k = q / HEAD_DIM**0.5, F.normalize(k, dim=-1)
    beta, g = q[..., 0].sigmoid(), F.logsigmoid(v[..., 0])  # (B, H, T) each
    if chunk is None:
        return delta_rule_recurrent(q, k, v, beta, g)[0]
    return delta_rule_chunked(q, k, v, beta, chunk, g)[0]


def native_sparse_attention(q, k, v, sizes: NSAOptions):
    """NSA's fast path on ``(q, k, v)``: keys and values compressed by a fixed random linear
    ``φ`` (``nsa_phi``), gates made from the queries (so that the backward pass covers them)."""
    phi = nsa_phi(sizes.compress_block * HEAD_DIM)
    k_cmp = compress(k, phi, sizes.compress_block, sizes.compress_stride)
    v_cmp = compress(v, phi, sizes.compress_block, sizes.compress_stride)
    return nsa_attention(q, k, v, k_cmp, v_cmp, q[..., :3].sigmoid(), sizes)


@functools.cache
def nsa_phi(block_dim: int):
    """A fixed random ``φ`` from a flattened block of ``block_dim`` numbers to ``HEAD_DIM``
    (seed 0): a matrix product, as the layer's ``phi_k``."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        weight = torch.randn(block_dim, HEAD_DIM) / block_dim**0.5  # (block_dim, HEAD_DIM)
    return lambda blocks: blocks @ weight


@functools.cache
def sparse_random_blocks(T: int) -> torch.Tensor:
    """The sparse kernel's random blocks (3 per row, seed 0), drawn once per length."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return draw_random_blocks(T // 64, 2, 3, 3)


def keep_freed_memory() -> None:
    """glibc only: serve large allocations from the heap and never trim it (``mallopt``), so a
    freed tensor's pages are reused instead of being unmapped and faulted in again. Elsewhere
    (another C library, another system) it changes nothing and says so."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        print("malloc: the system's default (not glibc: --system-malloc is implied)")
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    if not (mallopt(M_MMAP_THRESHOLD, 1 << 30) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        raise ValueError("glibc's mallopt refused the settings: pass --system-malloc")
    print("malloc: glibc keeps freed memory (mallopt M_MMAP_THRESHOLD 1 GiB, no trimming)")


def full_causal(q, k, v):
    """The baseline: PyTorch's fused causal attention."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def fwd_bwd_seconds(fn, inputs, repeats: int) -> float:
    """Best wall time of ``fn(*inputs).sum().backward()`` over ``repeats`` runs after a warm-up."""
    best = float("inf")
    for i in range(repeats + 1):
        for x in inputs:
            x.grad = None
        start = time.perf_counter()
        fn(*inputs).sum().backward()
        if i:  # the first run warms up allocators and kernels
            best = min(best, time.perf_counter() - start)
    return best


def attention_table(lengths, repeats):
    """Rows ``(kernel, settings, {T: (seconds, ratio to full)})``, the baseline first."""
    rows = {"full causal SDPA": ("baseline", full_causal)}
    rows.update({name: (settings, fn) for name, (settings, fn, _) in KERNELS.items()})
    times = {name: {} for name in rows}
    for T in lengths:
        q, k, v = (torch.randn(1, N_HEAD, T, HEAD_DIM, requires_grad=True) for _ in range(3))
        for name, (_, fn) in rows.items():
            times[name][T] = fwd_bwd_seconds(fn, (q, k, v), repeats)
    base = times["full causal SDPA"]
    return [
        (name, settings, {T: (s, s / base[T]) for T, s in times[name].items()})
        for name, (settings, _) in rows.items()
    ]


def layer_table(lengths, repeats):
    """Rows ``(variant, options, {T: seconds}, cache bytes per token)`` for every registered
    variant, built with its ``options_for_length`` at the longest length."""
    rows = []
    for name in available():
        cfg = AttentionConfig(
            n_embd=N_HEAD * HEAD_DIM, n_head=N_HEAD, block_size=max(lengths), positions="rope"
        )
        options = attention_class(name).options_for_length(max(lengths), N_HEAD)
        torch.manual_seed(0)
        layer = build_attention(name, cfg, **options)
        times = {}
        for T in lengths:
            x = torch.randn(1, T, cfg.n_embd, requires_grad=True)
            times[T] = fwd_bwd_seconds(layer, (x,), repeats)
        rows.append((name, options, times, layer.new_cache(1).bytes_per_token))
    return rows


def print_attention(lengths, repeats):
    print(
        f"attention step, forward + backward, B=1, {N_HEAD} heads, head_dim {HEAD_DIM}, float32, "
        f"{torch.get_num_threads()} threads, best of {repeats}: ms (ratio to full causal SDPA)"
    )
    print("| kernel | settings | " + " | ".join(f"T={T}" for T in lengths) + " |")
    print("|---|---|" + "---|" * len(lengths))
    table = attention_table(lengths, repeats)
    for name, settings, cells in table:
        row = " | ".join(f"{s * 1e3:.0f} ({r:.2f}x)" for s, r in cells.values())
        print(f"| {name} | {settings} | {row} |")
    ratios = {name: {T: r for T, (_, r) in cells.items()} for name, _, cells in table}
    for name, (_, _, (T, target)) in KERNELS.items():
        if T not in ratios[name]:
            print(f"target: {name} at T={T} <= {target}x: not measured (add T={T} to --lengths)")
            continue
        verdict = "met" if ratios[name][T] <= target else "NOT met"
        print(f"target: {name} at T={T} <= {target}x: {ratios[name][T]:.2f}x, {verdict}")
    print()
    print_recurrent_vs_chunked([T for T in lengths if T <= RECURRENT_MAX_T], repeats)
    print()
    print(
        f"whole layer (projections included, n_embd {N_HEAD * HEAD_DIM}, RoPE), forward + "
        f"backward, ms; cache bytes per token of one sequence in one layer (float32)"
    )
    header = " | ".join(f"T={T}" for T in lengths)
    print(f"| variant | options | {header} | cache bytes/token |")
    print("|---|---|" + "---|" * (len(lengths) + 1))
    for name, options, times, cache_bytes in layer_table(lengths, repeats):
        row = " | ".join(f"{s * 1e3:.0f}" for s in times.values())
        shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "-"
        print(f"| {name} | {shown} | {row} | {cache_bytes} |")
    print("(linear's and the DeltaNets' caches are their whole state, the same at every length)")


RECURRENT_MAX_T, RECURRENT_TARGET = 4096, (4096, 10.0)  # the loop is slow: shorter lengths only


def print_recurrent_vs_chunked(lengths, repeats):
    """Gated DeltaNet's recurrent form (a loop over tokens) against its chunked form."""
    print("gated_deltanet forward + backward, same shapes: recurrent form vs chunked (chunk 64)")
    print("| T | recurrent ms | chunked ms | recurrent/chunked |")
    print("|---|---|---|---|")
    speedups = {}
    for T in lengths:
        q, k, v = (torch.randn(1, N_HEAD, T, HEAD_DIM, requires_grad=True) for _ in range(3))
        loop = fwd_bwd_seconds(gated_delta_rule, (q, k, v), min(repeats, 1))
        chunked = fwd_bwd_seconds(functools.partial(gated_delta_rule, chunk=64), (q, k, v), repeats)
        speedups[T] = loop / chunked
        print(f"| {T} | {loop * 1e3:.0f} | {chunked * 1e3:.0f} | {speedups[T]:.1f}x |")
    T, target = RECURRENT_TARGET
    if T in speedups:
        verdict = "met" if speedups[T] >= target else "NOT met"
        print(
            f"target: chunked >= {target}x faster than recurrent at T={T}: {speedups[T]:.1f}x, {verdict}"
        )


# --- training -------------------------------------------------------------------------------

# nanoGPT's CPU example ("baby GPT", char-level Shakespeare) and its GPU shape.
TRAIN_SHAPES = {
    "4x4x128, block 64": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),
    "6x6x384, block 256": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
}


def best_seconds(fn, repeats: int) -> float:
    """Best wall time of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def best_of_alternating(runs: dict, repeats: int) -> dict:
    """name -> (best wall time over ``repeats``, last result) of each ``fn()`` in ``runs``, after
    one warm-up each; the runs take turns, so a busy spell of the machine slows them alike."""
    results = {name: (float("inf"), fn()) for name, fn in runs.items()}  # the warm-ups
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            out = fn()
            results[name] = (min(results[name][0], time.perf_counter() - start), out)
    return results


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an ``n x n`` matrix multiply in ``dtype``, best of ``repeats``: the machine's
    practical peak that model FLOPs utilisation is measured against."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: a @ b, repeats)


def read_bandwidth(n_bytes: int = 2**29, repeats: int = 5) -> float:
    """Bytes/s of summing an ``n_bytes`` float32 tensor, best of ``repeats``: how fast this
    machine streams memory that is not in cache (it bounds batch-1 decoding)."""
    t = torch.ones(n_bytes // 4)  # the warm-up run touches its pages
    return n_bytes / best_seconds(t.sum, repeats)


def train_step_runs(shape: dict, batch_size: int, dtype: str, compile: bool = False) -> dict:
    """Training steps (forward, backward, clipping, AdamW, zero_grad) of char-level GPTs of this
    ``shape``, equal at the start: ``name -> fn`` running one step, for ``make_optimizer``'s
    fused AdamW and the default unfused one, and with ``compile`` the fused one on a
    ``torch.compile``'d model (compiled by its first two steps, here)."""
    x = torch.randint(0, 65, (batch_size, shape["block_size"]))  # (B, T)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step_fn(fused: bool, compiled: bool):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=65, dropout=0.0, **shape))
        optimizer = make_optimizer(model, TrainConfig(), fused=fused)
        forward = torch.compile(model) if compiled else model

        def step():
            with autocast:
                _, loss = forward(x, x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    runs = {"fused": step_fn(True, False), "unfused": step_fn(False, False)}
    if compile:
        runs["fused, compiled"] = step_fn(True, True)
    return runs


def compile_seconds(step) -> float:
    """Wall time of the first two calls of ``step`` (a compiled model compiles its forward and
    backward there)."""
    start = time.perf_counter()
    step()
    step()
    return time.perf_counter() - start


def print_train(batch_size: int, repeats: int, compile: bool = False) -> None:
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16, 512)}
    print(
        f"matmul peak ({torch.get_num_threads()} threads): float32 "
        f"{peaks['float32'] / 1e9:.1f} GFLOP/s (2048 x 2048), bfloat16 "
        f"{peaks['bfloat16'] / 1e9:.2f} GFLOP/s (512 x 512)"
    )
    dtypes = ["float32", "bfloat16"]
    if peaks["bfloat16"] < peaks["float32"] / 4:  # emulated bf16: a step would take minutes
        dtypes.remove("bfloat16")
        print("bfloat16 autocast not timed: this CPU multiplies bf16 matrices more than 4x "
              "slower than float32 (no native bf16 instructions)")  # fmt: skip
    print(
        f"training step (forward, backward, clipping, AdamW), batch {batch_size}, char "
        f"vocabulary; the AdamW kernels take turns, best of {repeats} each"
    )
    print("| model | dtype | AdamW | ms/step | tokens/s | model GFLOP/s | MFU | vs unfused |")
    print("|---|---|---|---|---|---|---|---|")
    compile_times = []
    for name, shape in TRAIN_SHAPES.items():
        with torch.device("meta"):  # the count needs the shapes only
            flops = GPT(GPTConfig(vocab_size=65, **shape)).flops_per_token()
        for dtype in dtypes:
            runs = train_step_runs(shape, batch_size, dtype, compile)
            if compile:
                compile_times.append((name, dtype, compile_seconds(runs["fused, compiled"])))
            times = best_of_alternating(runs, repeats)
            for kernel, (seconds, _) in times.items():
                tokens = batch_size * shape["block_size"] / seconds
                achieved = flops * tokens
                print(
                    f"| {name} | {dtype} | {kernel} | {seconds * 1e3:.1f} | {tokens:,.0f} | "
                    f"{achieved / 1e9:.1f} | {achieved / peaks[dtype]:.1%} | "
                    f"{seconds / times['unfused'][0]:.2f}x |"
                )
    print("MFU: 6N + 12 L d T FLOPs per token (GPT.flops_per_token) over the same dtype's peak")
    for name, dtype, seconds in compile_times:
        print(f"torch.compile, {name}, {dtype}: first two steps {seconds:.1f} s")


def loss_estimates(model, data, cfg: TrainConfig, split: str, draws: int, batches: int = 20):
    """Loss of ``model`` on ``split`` estimated ``draws`` times, each from ``batches`` random
    batches as nanoGPT's train.py does: a tensor ``(draws,)``, independent estimates."""
    gen = torch.Generator().manual_seed(cfg.seed + 3)  # not the fixed batches of `evaluate`
    losses = torch.empty(draws * batches)
    with torch.no_grad():
        for i in range(draws * batches):
            x, y = data.get_batch(split, cfg.batch_size, cfg.model.block_size, gen)
            losses[i] = model(x, y)[1]
    return losses.view(draws, batches).mean(dim=1)  # (draws,)


def print_baby(max_iters: int, seeds: list[int]) -> None:
    """nanoGPT's documented CPU run with our trainer, once per seed; nanoGPT reports a validation
    loss of 1.88, measured as its train.py does (20 random batches at the last step)."""
    print(f"nanoGPT's CPU baby run (4x4x128, block 64, batch 12, {max_iters} iterations, "
          f"dropout 0, no biases, char TinyShakespeare), {torch.get_num_threads()} threads")  # fmt: skip
    print("| seed | val, 20 batches (nanoGPT's eval_iters) | train, 200 batches | val, 2000 batches "
          "| 100 estimates of 20 batches: sd, lowest, share <= 1.88 | wall s "
          "| ms/iteration (median) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    vals = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as out_dir:
            cfg = TrainConfig(
                model=GPTConfig(  # nanoGPT's train.py has no biases (bias=False)
                    vocab_size=65, dropout=0.0, bias=False, **TRAIN_SHAPES["4x4x128, block 64"]
                ),
                out_dir=out_dir, batch_size=12, max_iters=max_iters, lr_decay_iters=max_iters,
                eval_iters=20, device="cpu", seed=seed, progress=False,
            )  # fmt: skip
            start = time.perf_counter()
            train(cfg)
            wall = time.perf_counter() - start
            model, cfg, _ = load_trained(out_dir)
            data = TokenData(prepare(cfg.data, cfg.encoding, val_fraction=cfg.val_fraction))
            train_loss = loss_estimates(model, data, cfg, "train", draws=10).mean()  # 200 batches
            estimates = loss_estimates(model, data, cfg, "val", draws=100)  # (100,)
            metrics = read_metrics(out_dir)
        last_val = [m["val_loss"] for m in metrics if "val_loss" in m][-1]
        step_ms = statistics.median(m["ms_per_iter"] for m in metrics if "ms_per_iter" in m)
        vals.append(estimates.mean().item())  # the mean of all 2000 batches
        print(f"| {seed} | {last_val:.4f} | {train_loss:.4f} | {vals[-1]:.4f} | "
              f"{estimates.std():.4f}, {estimates.min():.4f}, "
              f"{(estimates <= 1.88).float().mean():.0%} | {wall:.1f} | "
              f"{step_ms:.1f} |")  # fmt: skip
    mean = sum(vals) / len(vals)
    print(f"validation loss over 2000 batches, mean of {len(vals)} seeds: {mean:.4f} (nanoGPT "
          f"reports 1.88 from one run, 20 batches)")  # fmt: skip


# --- generation --------------------------------------------------------------------------------


def print_generate(prompt_len: int, new_tokens: int, repeats: int) -> None:
    """Greedy decoding speed of ours and transformers' at GPT-2 small's shape, same weights."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging
    except ImportError:
        raise SystemExit("bench generate needs transformers: pip install 'attnbook[hf]'") from None
    logging.disable_progress_bar()  # save_pretrained's bar would interleave with the table
    cfg = gpt2_config("gpt2")
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_embd=cfg.n_embd, attn_pdrop=0.0, embd_pdrop=0.0,
            resid_pdrop=0.0, bos_token_id=None, eos_token_id=None,  # never stop early
        )
    ).eval()  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_gpt2(folder)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len))  # (1, prompt_len)
    runs = {
        "attnbook GPT.generate (KV cache)": lambda: ours.generate(prompt, new_tokens, temperature=0),
        "transformers generate (use_cache)": lambda: hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
            do_sample=False, use_cache=True, pad_token_id=0,
        ),
    }  # fmt: skip
    results = best_of_alternating(runs, repeats)
    # every weight read once per token, except the position table (one row)
    weight_bytes = sum(p.nbytes for p in ours.parameters())
    weight_bytes -= sum(p.nbytes for p in ours.transformer.wpe.parameters())
    bound = read_bandwidth() / weight_bytes  # tokens/s if reading the weights were all it took
    print(
        f"greedy generation, GPT-2 124M shape (random weights), float32, batch 1, prompt "
        f"{prompt_len} tokens, {new_tokens} new tokens, {torch.get_num_threads()} threads, best of "
        f"{repeats} (alternating) after a warm-up"
    )
    print(
        f"weights read per token: {weight_bytes / 1e6:.0f} MB; memory read bandwidth "
        f"{bound * weight_bytes / 1e9:.1f} GB/s, so at most {bound:.1f} tokens/s"
    )
    print("| implementation | seconds | tokens/s | share of the bandwidth bound |")
    print("|---|---|---|---|")
    for name, (seconds, _) in results.items():
        print(f"| {name} | {seconds:.2f} | {new_tokens / seconds:.1f} | "
              f"{new_tokens / seconds / bound:.0%} |")  # fmt: skip
    (ours_s, ours_ids), (hf_s, hf_ids) = results.values()
    print(f"ours / transformers tokens/s: {hf_s / ours_s:.2f}x (target >= 2x)")
    print(f"same tokens: {torch.equal(ours_ids, hf_ids)}")


# Causal attention three ways, on (q, k, v) with tiles of `block` positions for flash.
CAUSAL = {
    "reference": lambda q, k, v, block: sdpa_reference(q, k, v, is_causal=True),
    "flash": lambda q, k, v, block: flash_attention(q, k, v, block_q=block, block_k=block),
    "sdpa": lambda q, k, v, block: F.scaled_dot_product_attention(q, k, v, is_causal=True),
}


class PeakTensorMemory(TorchDispatchMode):
    """While active, the peak of the bytes held by tensor storages created inside it (``peak``).

    Every PyTorch operation, the backward pass's too, passes through ``__torch_dispatch__``; new
    storages are counted when an operation returns them and dropped when they are freed.
    Temporaries an operation creates and frees internally (a fused kernel's scratch) are not
    seen, nor are tensors made before the region (the inputs).
    """

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0  # data_ptr -> (weak reference, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ptr, (ref, n_bytes) in list(self.live.items()):
            if ref.expired():  # freed since the last operation
                del self.live[ptr]
                self.current -= n_bytes
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                storage = t.untyped_storage()
                self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_bytes(fn, *inputs) -> int:
    """Peak bytes of the tensors that ``fn(*inputs).sum().backward()`` creates (forward and
    backward; the inputs, made before, are not counted)."""
    with PeakTensorMemory() as memory:
        fn(*inputs).sum().backward()
    return memory.peak


def print_flash(lengths, block: int, repeats: int) -> None:
    print(
        f"causal attention forward + backward, B=1, 1 head of {HEAD_DIM}, float32, flash tiles "
        f"of {block}, {torch.get_num_threads()} threads: peak MiB of the tensors it creates (not "
        f"a fused kernel's internal scratch), time (ms, best of {repeats})"
    )
    print(
        "| T | "
        + " | ".join(f"{name} MiB | {name} ms" for name in CAUSAL)
        + " | flash/ref memory |"
    )
    print("|---|" + "---|---|" * len(CAUSAL) + "---|")
    for T in lengths:
        q, k, v = (torch.randn(1, 1, T, HEAD_DIM, requires_grad=True) for _ in range(3))
        mib, ms = {}, {}
        for name, fn in CAUSAL.items():
            fresh = (torch.randn(1, 1, T, HEAD_DIM, requires_grad=True) for _ in range(3))
            mib[name] = peak_bytes(functools.partial(fn, block=block), *fresh) / 2**20
            ms[name] = fwd_bwd_seconds(functools.partial(fn, block=block), (q, k, v), repeats) * 1e3
        cells = " | ".join(f"{mib[n]:.1f} | {ms[n]:.0f}" for n in CAUSAL)
        print(f"| {T} | {cells} | {mib['flash'] / max(mib['reference'], 1e-9):.3f} |")


# --- DeepSeek Sparse Attention: one decoding step ---------------------------------------------

# DeepSeek-V3.2-Exp's per-layer sizes (its config_671B_v3.2.json: 128 heads, indexer 64 x 128)
# with both head counts divided by 8 for a CPU: the per-token sizes, so a cached token's bytes,
# are DeepSeek's, and so is the indexer's share of the work per cached token (index_n_heads x
# index_head_dim multiply-adds against n_head x (2 kv_lora_rank + qk_rope_head_dim): 6%).
DSA_SIZES = dict(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                 index_head_dim=128)  # fmt: skip
DSA_TARGET = (32768, 0.5, 0.25)  # at this many cached tokens: most time ratio, most bytes ratio
MLA_ROW, SDPA_ROW = "MLA, absorbed (mla.py)", "dense, one SDPA call"
DSA_ROWS = {torch.float32: "DSA, float32 index keys", torch.bfloat16: "DSA, bfloat16 index keys"}


def dsa_step_runs(L: int, n_head: int, index_n_heads: int, topk: int) -> tuple[dict, dict]:
    """One decoding step after ``L`` cached (random) tokens, as ``name -> fn``: ``attend`` of
    MLA (absorbed) and of DSA with its index keys in float32 and in bfloat16 (the new token's
    projections, the same for all and at every length, made once beforehand), and dense
    absorbed attention as one SDPA call over latents and rotary keys stored side by side, the
    heads as the query rows (it checks MLA's output). Also ``name -> bytes of the cache read``."""
    cfg = AttentionConfig(n_embd=1024, n_head=n_head, block_size=L + 1, positions="rope")
    mla_sizes = {k: v for k, v in DSA_SIZES.items() if not k.startswith("index")}
    dsa = DeepSeekSparseAttention(cfg, absorb=True, index_n_heads=index_n_heads, index_topk=topk,
                                  **DSA_SIZES).eval()  # fmt: skip
    mla = MultiHeadLatentAttention(cfg, absorb=True, **mla_sizes).eval()
    mla.load_state_dict(dsa.state_dict(), strict=False)  # the same weights, the indexer aside
    r, nope, rope, d_index = dsa.kv_lora_rank, dsa.qk_nope_head_dim, dsa.qk_rope_head_dim, 128
    caches = {MLA_ROW: LatentCache(1, r, rope, L + 1)}
    for dtype, name in DSA_ROWS.items():
        caches[name] = IndexedLatentCache(1, r, rope, d_index, L + 1, index_dtype=dtype)
    for cache in caches.values():
        cache.k[:, :, :L], cache.v[:, :, :L] = torch.randn(1, 1, L, rope), torch.randn(1, 1, L, r)
        if isinstance(cache, IndexedLatentCache):
            cache.index_k[:, :L] = torch.randn(1, L, d_index)
    with torch.no_grad():
        q, k, inputs = dsa.project(torch.randn(1, 1, cfg.n_embd))
        q, k = dsa.position(q, k, L)

    @torch.no_grad()
    def step(layer, cache, v):  # back to L cached tokens, then the new one
        cache.length = L
        return layer.attend(q, k, v, cache=cache)[0]  # (1, n_head, 1, v_head_dim)

    expected = step(mla, caches[MLA_ROW], inputs.latent)
    side_by_side = torch.cat([caches[MLA_ROW].v, caches[MLA_ROW].k], dim=-1)  # (1, 1, L+1, ·)
    w_uv = mla.wkv_b.weight.view(n_head, -1, r)[:, nope:]  # (n_head, v_head_dim, r)

    @torch.no_grad()
    def one_sdpa():
        y = F.scaled_dot_product_attention(  # (1, 1, n_head, r + rope): read the cache once
            mla.absorbed_query(q).transpose(1, 2), side_by_side, side_by_side, scale=mla.scale
        )
        return torch.einsum("bthr,hvr->bhtv", y[..., :r], w_uv)

    if not torch.allclose(one_sdpa(), expected, rtol=1e-4, atol=1e-5):
        raise RuntimeError("the one-SDPA dense step disagrees with MLA's")
    runs = {MLA_ROW: lambda: step(mla, caches[MLA_ROW], inputs.latent), SDPA_ROW: one_sdpa}
    for name in DSA_ROWS.values():
        runs[name] = functools.partial(step, dsa, caches[name], inputs)
    latent_bytes = L * (r + rope) * 4  # every latent and its rotary key, float32
    read = {MLA_ROW: latent_bytes, SDPA_ROW: latent_bytes}
    for dtype, name in DSA_ROWS.items():  # every index key, the chosen latents and rotary keys
        read[name] = L * d_index * dtype.itemsize + topk * (r + rope) * 4
    return runs, read


def print_dsa(lengths, repeats: int, n_head: int, index_n_heads: int) -> None:
    """DSA's decoding step against dense MLA's, with index_topk = L / 16."""
    print(
        f"one decoding step (batch 1, one new query) after L cached tokens, float32 weights and "
        f"latents, {torch.get_num_threads()} threads, best of {repeats} (alternating): n_head "
        f"{n_head}, kv_lora_rank 512, qk_rope_head_dim 64, qk_nope_head_dim 128, v_head_dim 128;"
        f" indexer {index_n_heads} heads x 128, index_topk L/16. Timed: the layer's attend stage"
        f" (the new token's projections excluded); bytes: of the cache, read by the step"
    )
    print("| L | variant | ms | time / MLA | time / one SDPA | MB read | bytes / dense |")
    print("|---|---|---|---|---|---|---|")
    ratios = {}
    for L in lengths:
        runs, read = dsa_step_runs(L, n_head, index_n_heads, L // 16)
        times = {name: s for name, (s, _) in best_of_alternating(runs, repeats).items()}
        for name, seconds in times.items():
            ratios[L, name] = (seconds / times[MLA_ROW], seconds / times[SDPA_ROW],
                               read[name] / read[MLA_ROW])  # fmt: skip
            t_mla, t_sdpa, b = ratios[L, name]
            print(f"| {L} | {name} | {seconds * 1e3:.2f} | {t_mla:.3f} | {t_sdpa:.3f} | "
                  f"{read[name] / 1e6:.1f} | {b:.3f} |")  # fmt: skip
    L, most_time, most_bytes = DSA_TARGET
    for name in DSA_ROWS.values():
        if (L, name) not in ratios:
            print(f"target: {name} at L={L}: not measured (add {L} to --lengths)")
            continue
        verdicts = [
            (f"time / MLA {ratios[L, name][0]:.3f}", ratios[L, name][0] <= most_time, most_time),
            (f"time / one SDPA {ratios[L, name][1]:.3f}", ratios[L, name][1] <= most_time,
             most_time),
            (f"bytes / dense {ratios[L, name][2]:.3f}", ratios[L, name][2] <= most_bytes,
             most_bytes),
        ]  # fmt: skip
        shown = "; ".join(f"{what} <= {bound}: {'met' if ok else 'NOT met'}"
                          for what, ok, bound in verdicts)  # fmt: skip
        print(f"target: {name} at L={L}: {shown}")


# GPT-2 small's shape with RoPE; each stack's blocks (12) and its options, with the windows of
# Gemma 3 (1024) and gpt-oss (128)
HYBRID_SHAPE = dict(n_layer=12, n_head=12, n_embd=768, positions="rope")
HYBRID_STACKS = {
    "all global: mha x 12": dict(attention="mha"),
    "Gemma 3: (local x 5, mha) x 2, window 1024": dict(
        layer_attention=layer_pattern(["local"] * 5 + ["mha"], 12),
        attention_options={"window": 1024},
    ),
    "gpt-oss: (local, mha) x 6, window 128": dict(
        layer_attention=layer_pattern(["local", "mha"], 12), attention_options={"window": 128}
    ),
    "Qwen3-Next: (gated_deltanet x 3, mha) x 3": dict(
        layer_attention=layer_pattern(["gated_deltanet"] * 3 + ["mha"], 12)
    ),
}


def cache_bytes_formula(config: GPTConfig, L: int, bytes_per_number: int = 4) -> float:
    """Cache bytes per token of ``config``'s model for one sequence of ``L`` tokens, counted from
    the config alone: the numbers each block caches for the whole sequence, times
    ``bytes_per_number``, over ``L``. A full KV cache ("mha", "gqa", "mqa") keeps ``2 * n_kv_head *
    head_dim`` numbers per position, a sliding window ("local") the same for ``min(window, L)``
    positions, MLA its latent and rotary key (``kv_lora_rank + qk_rope_head_dim``) per position,
    (Gated) DeltaNet a state of ``n_head * head_dim²`` and its convolution's last ``conv_size -
    1`` inputs of ``3 * n_embd`` channels, whatever ``L``. Other variants: ValueError."""
    H, head_dim = config.n_head, config.n_embd // config.n_head
    numbers = 0
    for name in config.layer_variants():
        cls = attention_class(name)
        given = config.attention_options.items()
        o = cls.Options(**{k: v for k, v in given if k in option_names(cls)})
        if name in ("mha", "gqa", "mqa", "local"):
            n_kv = 1 if name == "mqa" else getattr(o, "n_kv_head", None) or H
            numbers += 2 * n_kv * head_dim * (min(o.window, L) if name == "local" else L)
        elif name == "mla":
            rank, rope = (
                o.kv_lora_rank or 4 * head_dim,
                o.qk_rope_head_dim or max(2, 2 * (head_dim // 4)),
            )
            numbers += (rank + rope) * L
        elif name in ("deltanet", "gated_deltanet"):
            numbers += H * head_dim**2 + 3 * config.n_embd * (o.conv_size - 1) * o.use_short_conv
        else:
            raise ValueError(
                f"cache_bytes_formula counts mha, gqa, mqa, local, mla, deltanet and "
                f"gated_deltanet blocks, not {name!r}: measure it with GPT.cache_bytes_per_token"
            )
    return numbers * bytes_per_number / L


def hybrid_table(lengths) -> list:
    """Rows ``(stack, {L: (formula, measured)})`` of ``HYBRID_STACKS`` in float32; measured is
    ``GPT.cache_bytes_per_token`` of the model built on the meta device (nothing allocated)."""
    rows = []
    for name, stack in HYBRID_STACKS.items():
        block_size = max(*lengths, 1024)  # at least the longest window (GPTConfig checks it)
        config = GPTConfig(**HYBRID_SHAPE, block_size=block_size, **stack)
        with torch.device("meta"):
            model = GPT(config)
        figures = {
            L: (cache_bytes_formula(config, L), model.cache_bytes_per_token(L)) for L in lengths
        }
        rows.append((name, figures))
    return rows


def print_hybrid(lengths) -> None:
    print(
        "cache bytes per token of one sequence of L tokens, float32, 12 blocks x 12 heads x "
        "head_dim 64: formula from the config / measured from the caches (share of all-global)"
    )
    rows = hybrid_table(lengths)
    width = max(len(name) for name, _ in rows)
    print(f"{'stack':<{width}}" + "".join(f"{f'L={L}':>30}" for L in lengths))
    full = rows[0][1]
    for name, figures in rows:
        cells = [f"{f:,.0f} / {m:,.0f} ({m / full[L][1]:.3f})" for L, (f, m) in figures.items()]
        print(f"{name:<{width}}" + "".join(f"{c:>30}" for c in cells))


def print_streaming(block_size: int, factor: int, window: int, sink_tokens: int) -> None:
    """Greedy decoding, one token at a time with the cache, of ``factor * block_size`` tokens by
    a random 4-layer RoPE model of local attention with sinks: the bytes of its caches at
    several lengths (and what full KV caches would hold there), then tokens/s."""
    cfg = GPTConfig(vocab_size=256, block_size=block_size, n_layer=4, n_head=4, n_embd=128,
                    attention="local", positions="rope",
                    attention_options={"window": window, "sink_tokens": sink_tokens})  # fmt: skip
    model = GPT(cfg).eval()
    total = factor * block_size
    caches = model.new_caches(1)  # bounded: any number of positions
    per_position = sum(cache.bytes_per_token for cache in caches)
    points = sorted(
        {1, min(total, sink_tokens + window), *range(block_size, total + 1, block_size)}
    )
    print(f"local attention, window {window}, sink_tokens {sink_tokens}, RoPE, 4 layers x 4 heads "
          f"x 128, block_size {block_size}: {total} tokens decoded greedily one at a time, "
          f"float32, {torch.get_num_threads()} threads")  # fmt: skip
    print("| tokens | cache bytes | full KV caches would hold |")
    print("|---|---|---|")
    nxt = torch.zeros(1, 1, dtype=torch.long)
    seconds = 0.0
    with torch.no_grad():
        for n in range(1, total + 1):
            start = time.perf_counter()
            logits, _ = model(nxt, caches=caches)  # (1, 1, 256): position n - 1
            nxt = logits[:, -1].argmax(dim=-1, keepdim=True)  # (1, 1)
            seconds += time.perf_counter() - start
            if n in points:
                held = sum(cache.nbytes for cache in caches)
                print(f"| {n} | {held:,} | {n * per_position:,} |")
    print(f"{total / seconds:.0f} tokens/s ({seconds:.2f} s for {total} tokens)")


# --- recall against the size of the state -----------------------------------------------------

MQAR_COLUMNS = ("variant", "n_pairs", "seq_len", "head_dim", "pairs_per_head_dim", "seed", "lr",
                "steps", "recall_acc", "val_loss", "wall_s")  # fmt: skip


def parse_variant(spec: str) -> tuple[str, dict]:
    """``"name"`` or ``"name:option=value,option=value"`` (values Python literals, e.g.
    ``"deltanet:use_delta=False"``) -> ``(name, options)``."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        try:
            options[key] = ast.literal_eval(value) if eq and key else None
        except (ValueError, SyntaxError):
            options[key] = None
        if options[key] is None:
            raise ValueError(
                f"variant {spec!r}: write its options as name:option=value,... with Python "
                f"literals (True, 3, 0.5), got {item!r}"
            )
    return name, options


def mqar_rows(variants, pairs, seeds, *, steps: int = 400, lr: float = 3e-3, n_layer: int = 2,
              n_embd: int = 64, n_head: int = 8, batch_size: int = 30, vocab_size: int = 40,
              queries: int = 16, positions: str = "rope", csv_path=None) -> list[dict]:  # fmt: skip
    """Train a GPT of each variant on MQAR alone (``compare.run_variant``: the same model shape,
    data order per seed, optimiser and schedule for every variant) and measure its recall.

    Args:
        variants: specs for ``parse_variant``: registered names, each with options or not.
        pairs: key-value pairs per sequence; a sequence holds the ``2 n`` pair tokens, then
            ``queries`` queries (``seq_len = 2 n + queries``).
        seeds: one run per seed (weights, data and evaluation set).
        steps, lr: AdamW steps and peak learning rate (``compare``'s warm-up and cosine).
        n_layer, n_embd, n_head, batch_size, positions: the GPT and its batches.
        vocab_size: ids of the task: keys from ``[1, vocab_size // 2)``, values from the rest.
        queries: query positions after the pairs.
        csv_path: a CSV file to write, one line per run as it finishes (seed by seed, so an
            interrupted sweep keeps whole seeds), or None.
    Returns:
        One dict per run with the keys of ``MQAR_COLUMNS``; ``recall_acc`` is measured on a
        fixed set of new sequences, ``val_loss`` on the answers.
    """
    for name, value in dict(queries=queries, steps=steps, n_layer=n_layer).items():
        check_positive_int(name, value)
    if not variants or not pairs or not seeds:
        raise ValueError(f"give at least one variant, pair count and seed, got {variants}, "
                         f"{pairs} and {seeds}")  # fmt: skip
    for n in pairs:
        check_positive_int("pairs", n)
        if 2 * n + queries < 16:
            raise ValueError(
                f"{n} pairs and {queries} queries make sequences of {2 * n + queries} tokens; "
                f"run_variant measures generation after a 16-token prompt: use queries >= "
                f"{16 - 2 * n}"
            )
    tasks = {n: build_task("recall", vocab_size=vocab_size, seq_len=2 * n + queries, n_pairs=n)
             for n in pairs}  # fmt: skip
    configs = {}
    for spec in variants:  # every setting is checked before the first run trains
        name, options = parse_variant(spec)
        for n, task in tasks.items():
            cfg = CompareConfig(
                workload="recall", variants=(name,), n_layer=n_layer, n_head=n_head,
                n_embd=n_embd, block_size=task.seq_len, max_iters=steps, batch_size=batch_size,
                positions=positions, lr=lr, eval_batches=4, progress=False,
            )  # fmt: skip
            with torch.device("meta"):
                GPT(model_config(name, cfg, vocab_size, options))
            configs[spec, n] = name, options, cfg
    rows, head_dim = [], n_embd // n_head
    with open(csv_path or os.devnull, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MQAR_COLUMNS)
        writer.writeheader()
        for seed in seeds:
            for (spec, n), (name, options, cfg) in configs.items():
                with tempfile.TemporaryDirectory() as out_dir:
                    cfg = replace(cfg, seed=seed, out_dir=out_dir)
                    result = run_variant(name, cfg, tasks=[tasks[n]], options=options)
                rows.append(dict(
                    variant=spec, n_pairs=n, seq_len=cfg.block_size, head_dim=head_dim,
                    pairs_per_head_dim=n / head_dim, seed=seed, lr=lr, steps=steps,
                    recall_acc=result["recall_acc"], val_loss=result["val_loss"],
                    wall_s=result["wall_s"],
                ))  # fmt: skip
                writer.writerow(rows[-1])
                f.flush()
                print(f"{spec} {n} pairs seed {seed}: recall {result['recall_acc']:.3f} "
                      f"({result['wall_s']:.0f} s)", flush=True)  # fmt: skip
    return rows


def print_mqar(rows: list[dict]) -> None:
    """Recall per variant and number of pairs: mean ± sd over seeds, and each seed's."""
    print("| variant | pairs | pairs / head_dim | recall, mean ± sd | per seed |")
    print("|---|---|---|---|---|")
    cells = {}
    for row in rows:
        cells.setdefault((row["variant"], row["n_pairs"]), []).append(row)
    for (variant, n), runs in cells.items():
        accs = [r["recall_acc"] for r in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        seeds = ", ".join(f"{r['seed']}: {r['recall_acc']:.3f}" for r in runs)
        print(f"| {variant} | {n} | {runs[0]['pairs_per_head_dim']:g} | "
              f"{statistics.mean(accs):.3f} ± {sd:.3f} | {seeds} |")  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="attnbook bench", description="Speed and memory measurements (prints tables)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    att = sub.add_parser("attention", help="attention kernels and layers: time and cache bytes")
    att.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    att.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up")
    att.add_argument(
        "--system-malloc", action="store_true",
        help="keep glibc's default malloc, which returns large freed blocks to the system (by "
        "default the benchmark asks it to keep them, as jemalloc or tcmalloc would)",
    )  # fmt: skip
    trn = sub.add_parser("train", help="training step time and MFU, float32 and bf16 autocast")
    trn.add_argument("--batch_size", type=int, default=12)
    trn.add_argument("--repeats", type=int, default=3, help="timed steps after the warm-up")
    trn.add_argument(
        "--compile", action="store_true",
        help="also time the fused step of a torch.compile'd model (compiling takes a while)",
    )  # fmt: skip
    baby = sub.add_parser("baby", help="nanoGPT's CPU Shakespeare run: validation loss, time")
    baby.add_argument("--max_iters", type=int, default=2000)
    baby.add_argument("--seeds", type=int, nargs="+", default=[1337], help="one run per seed")
    gen = sub.add_parser("generate", help="greedy decoding at GPT-2 124M: ours vs transformers")
    gen.add_argument("--prompt_len", type=int, default=16)
    gen.add_argument("--new_tokens", type=int, default=128)
    gen.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up")
    gen.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    fla = sub.add_parser("flash", help="causal attention fwd+bwd: peak memory and time, 3 ways")
    fla.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    fla.add_argument("--block", type=int, default=128, help="flash's query and key tile size")
    fla.add_argument("--repeats", type=int, default=2, help="timed runs after the warm-up")
    dsa = sub.add_parser("dsa", help="a DeepSeek Sparse Attention decoding step vs dense MLA")
    dsa.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    dsa.add_argument("--repeats", type=int, default=10, help="timed runs after the warm-up")
    dsa.add_argument("--n_head", type=int, default=16, help="DeepSeek-V3.2-Exp: 128")
    dsa.add_argument("--index_n_heads", type=int, default=8, help="DeepSeek-V3.2-Exp: 64")
    hyb = sub.add_parser("hybrid", help="cache bytes per token of hybrid stacks, formula/measured")
    hyb.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 32768])
    stream = sub.add_parser("streaming", help="decoding 10x block_size with local + sinks")
    stream.add_argument("--block_size", type=int, default=256)
    stream.add_argument("--factor", type=int, default=10, help="tokens = factor x block_size")
    stream.add_argument("--window", type=int, default=64)
    stream.add_argument("--sink_tokens", type=int, default=4)
    mq = sub.add_parser("mqar", help="MQAR recall against pairs per head dimension (trains GPTs)")
    mq.add_argument("--variants", nargs="+", default=["deltanet", "deltanet:use_delta=False",
                    "gated_deltanet", "mha"],
                    help="names, or name:option=value,... (e.g. deltanet:use_delta=False)")  # fmt: skip
    mq.add_argument("--pairs", type=int, nargs="+", default=[4, 8, 16])
    mq.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    for name in ("steps", "lr", "n_layer", "n_embd", "n_head", "batch_size", "vocab_size",
                 "queries", "positions"):  # fmt: skip
        default = mqar_rows.__kwdefaults__[name]
        mq.add_argument(f"--{name}", type=type(default), default=default)
    mq.add_argument("--csv", default=None, help="write each run to this CSV file as it ends")
    args = parser.parse_args(argv)
    for name in (
        "block_size",
        "factor",
        "window",
        "repeats",
        "batch_size",
        "max_iters",
        "prompt_len",
        "new_tokens",
        "threads",
        "block",
        "n_head",
        "index_n_heads",
    ):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    torch.manual_seed(0)
    if args.command == "attention":
        if min(args.lengths) < 1:
            parser.error(f"--lengths must be positive, got {args.lengths}")
        if args.system_malloc:
            print("malloc: the system's default")
        else:
            keep_freed_memory()
        print_attention(args.lengths, args.repeats)
    elif args.command == "train":
        print_train(args.batch_size, args.repeats, args.compile)
    elif args.command == "baby":
        print_baby(args.max_iters, args.seeds)
    elif args.command == "flash":
        if min(args.lengths) < 1:
            parser.error(f"--lengths must be positive, got {args.lengths}")
        print_flash(args.lengths, args.block, args.repeats)
    elif args.command == "streaming":
        if args.sink_tokens < 0:
            parser.error(f"--sink_tokens must be >= 0, got {args.sink_tokens}")
        print_streaming(args.block_size, args.factor, args.window, args.sink_tokens)
    elif args.command == "dsa":
        if min(args.lengths) < 16:
            parser.error(f"--lengths must be at least 16 (index_topk = L/16), got {args.lengths}")
        print_dsa(args.lengths, args.repeats, args.n_head, args.index_n_heads)
    elif args.command == "hybrid":
        if min(args.lengths) < 1:
            parser.error(f"--lengths must be positive, got {args.lengths}")
        print_hybrid(args.lengths)
    elif args.command == "mqar":
        options = {k: v for k, v in vars(args).items() if k not in ("command", "csv")}
        try:
            rows = mqar_rows(**options, csv_path=args.csv)
        except ValueError as err:
            parser.error(str(err))
        print_mqar(rows)
        if args.csv:
            print(f"wrote {len(rows)} runs to {args.csv}")
    else:
        if args.prompt_len + args.new_tokens > gpt2_config().block_size:
            parser.error("--prompt_len plus --new_tokens must be at most GPT-2's 1024 positions")
        if args.threads:
            torch.set_num_threads(args.threads)
        print_generate(args.prompt_len, args.new_tokens, args.repeats)


if __name__ == "__main__":
    main()
