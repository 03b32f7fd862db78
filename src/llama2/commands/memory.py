"""Training memory of one device, estimated from the model's shape: ``llama2 info --train``.

Plain functions, each one term of the plan; the numbers follow OUR trainer, not a generic one:

* **Weights** train in the checkpoint's dtype: stages load the starting model with
  ``load_model(dtype=None)`` and the trainer never casts it (train/finetune.py, train/core.py).
  Released Llama 2 weights are bf16. There are no separate float32 master weights (unless the
  checkpoint itself is float32: ``--dtype f32``).
* **Gradients** have the dtype of their parameter, for trainable parameters only.
* **AdamW** (``torch.optim.AdamW``, train/core.py ``build_optimizer``) keeps two moments shaped
  and typed like each trainable parameter (``zeros_like(p)``). Full fine-tuning of a bf16
  checkpoint is therefore 2 + 2 + 4 = 8 bytes per parameter; of a float32 one 4 + 4 + 8 = 16
  (the "16 bytes per parameter" of mixed-precision training, ZeRO §3).
* **LoRA** adapters (model/lora.py ``LoRALinear``) are float32 whatever the base: 16 bytes per
  adapter parameter; a reward/value model's scalar ``score`` head trains too, in the base dtype.
* **QLoRA** stores every linear weight of the blocks as torchao's ``NF4Tensor``: 4-bit codes
  (half a byte per weight), one int8 scale per 64 weights and one scale-of-scales (in the
  base dtype) per 256 scales, plus a mean and a 16-entry table per tensor (:func:`nf4_bytes`;
  0.5157 bytes per weight for a bf16 base). Embeddings, norms and the output head stay in the base
  dtype. Each matmul dequantizes its weight into a transient copy.
* **Activations** are the tensors autograd saves for backward, counted per token and layer
  from our forward pass (model/transformer.py) in :func:`layer_bytes_per_token`; the test
  checks the count against ``torch.autograd.graph.saved_tensors_hooks`` on a small model. On a
  GPU the trainer runs under bf16 autocast (2-byte activations); on the CPU in float32.
  RMSNorm upcasts its input to float32 and keeps that copy, so the residual stream costs 4
  bytes per element per norm either way.
* **Total** = weights + gradients + optimizer state + peak activations. With gradient
  accumulation (any batch larger than the micro-batch) the gradients of earlier micro-batches
  are alive during the next forward and backward, so they add to the activations.

One device, no FSDP/DDP sharding, no CPU offload. Not counted: the CUDA context (~0.5 GB),
allocator fragmentation, cuBLAS/attention workspaces: leave a few percent of headroom.
"""

from __future__ import annotations

import re

from llama2.model.lora import NF4_BLOCK, nf4_scaler_block, parse_targets

# Bytes per element of a stored tensor (same names as info.py's --dtype).
DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
ADAM_MOMENTS = 2               # exp_avg and exp_avg_sq, each like its parameter (torch.optim.AdamW)
LORA_BYTES = 4                 # adapters are float32 (LoRALinear)
NORM_UPCAST_BYTES = 4          # RMSNorm keeps x.float() for backward (transformer.RMSNorm)
LOGSUMEXP_BYTES = 4            # SDPA keeps a float32 log-sum-exp per query and head

# The LoRA defaults, restated from train/lora.py's LoraConfig (commands/ may not import train/).
LORA_RANK, LORA_TARGETS, LORA_DROPOUT = 8, "q,v", 0.05

# PPO defaults (train/ppo.py PPOConfig, the paper's §3.2.3): 512 prompts per iteration, a
# gradient step per minibatch of 64 rollouts (one forward pass, no micro-batches), answers of
# at most 128 new tokens (ours; the paper does not give one).
PPO_BATCH, PPO_MINIBATCH, PPO_MAX_NEW_TOKENS = 512, 64, 128

METHODS = ("full", "lora", "qlora")
STAGES = ("sft", "reward", "ppo")


# -- parameters ---------------------------------------------------------------------------------

def linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each linear layer of a block, by LoRA target name."""
    d, q, kv, h = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
    return {"q": (q, d), "k": (kv, d), "v": (kv, d), "o": (d, q), "gate": (h, d), "up": (h, d), "down": (d, h)}


def lora_params(cfg, targets=LORA_TARGETS, rank: int = LORA_RANK) -> int:
    """Adapter parameters: A [r, in] + B [out, r] per target per layer, i.e. r * (in + out)."""
    shapes = linear_shapes(cfg)
    return cfg.n_layers * sum(rank * (i + o) for o, i in (shapes[t] for t in parse_targets(targets)))


def model_params(cfg, head: str = "lm") -> int:
    """Parameters of a language model (``head="lm"``) or of a scalar reward/value model
    (``"scalar"``: no output matrix, a [1, dim] ``score`` head; model/heads.py)."""
    n = cfg.num_params()
    return n if head == "lm" else n - cfg.vocab_size * cfg.dim + cfg.dim


def block_linear_params(cfg) -> int:
    return cfg.n_layers * sum(o * i for o, i in linear_shapes(cfg).values())


def nf4_bytes(numel: int, dtype_bytes: int = 2) -> int:
    """Bytes of one weight as torchao's NF4Tensor with our block sizes (model/lora.py ``to_nf4``):
    uint8 codes holding two weights each, an int8 scale per 64 weights, a scale-of-scales in the
    original dtype per ``nf4_scaler_block`` scales (256 for every Llama shape), a scale mean and
    the 16-value NF4 table in the original dtype."""
    scales = numel // NF4_BLOCK
    return numel // 2 + scales + scales // nf4_scaler_block(numel) * dtype_bytes + dtype_bytes + 16 * dtype_bytes


def base_weight_bytes(cfg, dtype_bytes: int, head: str = "lm", nf4: bool = False) -> int:
    """A model's own weights (no adapters): all in the checkpoint dtype, or with ``nf4`` the block
    linears in NF4 and the rest (embeddings, norms, output or score head) in the checkpoint dtype."""
    total = model_params(cfg, head)
    if not nf4:
        return total * dtype_bytes
    per_layer = sum(nf4_bytes(o * i, dtype_bytes) for o, i in linear_shapes(cfg).values())
    return (total - block_linear_params(cfg)) * dtype_bytes + cfg.n_layers * per_layer


def trainable(cfg, method: str, dtype_bytes: int, head: str = "lm", targets=LORA_TARGETS,
              rank: int = LORA_RANK) -> list[tuple[int, int]]:
    """Trainable parameters as (count, bytes per element) groups: full = every weight in the
    checkpoint dtype; LoRA/QLoRA = float32 adapters, plus the scalar head of a reward/value model
    (model/lora.py ``TRAINABLE_HEADS``) in the checkpoint dtype."""
    if method == "full":
        return [(model_params(cfg, head), dtype_bytes)]
    groups = [(lora_params(cfg, targets, rank), LORA_BYTES)]
    if head == "scalar":
        groups.append((cfg.dim, dtype_bytes))
    return groups


def role(cfg, method: str, dtype_bytes: int, head: str = "lm", targets=LORA_TARGETS, rank: int = LORA_RANK,
         train: bool = True, nf4: bool | None = None) -> dict:
    """One model's static memory: weights (base + adapters), gradients and AdamW state."""
    nf4 = method == "qlora" if nf4 is None else nf4
    groups = trainable(cfg, method, dtype_bytes, head, targets, rank) if train else []
    weights = base_weight_bytes(cfg, dtype_bytes, head, nf4)
    if train and method != "full":
        weights += lora_params(cfg, targets, rank) * LORA_BYTES
    grads = sum(n * b for n, b in groups)
    return {"trainable_params": sum(n for n, _ in groups), "weights": weights, "gradients": grads,
            "optimizer": ADAM_MOMENTS * grads}


# -- activations --------------------------------------------------------------------------------

def layer_bytes_per_token(cfg, method: str, act_bytes: int, targets=LORA_TARGETS, rank: int = LORA_RANK,
                          dropout: float = 0.0, mask_bytes: int = 1) -> int:
    """Bytes one block saves for backward, per token (transformer.Block.forward):

    * each RMSNorm: its input upcast to float32 (4 bytes, saved by ``pow``) and a float32 rsqrt;
      with full training also its normalised output (the gain's gradient needs it);
    * attention: the q/k/v input when those linears train (full, or a LoRA target there without
      dropout: the adapters share it); SDPA's rotated q, k, v, its output (``wo``'s input is a
      view of it) and a float32 log-sum-exp per head;
    * SwiGLU: w1's output (silu's input), silu's output and w3's output (the product's
      operands), and the product when ``w2`` trains (full or a ``down`` adapter);
    * LoRA: each adapter's rank-r intermediate, and with dropout per target the dropped input and
      its mask (bool on CUDA, a float of the input's dtype on the CPU: ``mask_bytes``).

    Frozen linears save nothing: autograd keeps a matmul's input only for its weight's gradient.
    """
    d, hd, h = cfg.dim, cfg.head_dim, cfg.hidden_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    full = method == "full"
    targets = () if full else parse_targets(targets)
    shapes = linear_shapes(cfg)
    b = 2 * (NORM_UPCAST_BYTES * d + 4)                      # two norms: float32 input and rsqrt
    if full:
        b += 2 * act_bytes * d                               # normalised outputs, for the gains
    b += act_bytes * (2 * q + 2 * kv) + LOGSUMEXP_BYTES * cfg.n_heads  # SDPA: q, k, v, output, lse
    b += 3 * act_bytes * h                                   # silu input, silu output, w3 output
    shared = {"attn_in": full, "ffn_in": full, "ffn_mid": full}  # matmul inputs kept once
    for t in targets:
        b += act_bytes * rank                                # lora_A's output, kept by lora_B
        where = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": None, "gate": "ffn_in",
                 "up": "ffn_in", "down": "ffn_mid"}[t]
        if dropout > 0:                                      # each adapter drops its own copy
            b += (act_bytes + mask_bytes) * shapes[t][1]
        elif where is not None:
            shared[where] = True                             # (o's input is SDPA's output: kept)
    b += act_bytes * (d * shared["attn_in"] + d * shared["ffn_in"] + h * shared["ffn_mid"])
    return b


def head_bytes_per_token(cfg, method: str, act_bytes: int, head: str = "lm") -> int:
    """Saved after the last block, per token: the final norm (float32 input, rsqrt; with full
    training its output), the head's input when the head trains (full, or always for a scalar
    head), RoPE's cos/sin tables (kept by the rotations, shared by every layer), and for a
    language model the float32 log-softmax cross entropy keeps ([tokens, vocab]) and the targets.
"""
    d = cfg.dim
    full = method == "full"
    b = NORM_UPCAST_BYTES * d + 4 + act_bytes * d * full + 2 * act_bytes * cfg.head_dim
    if head == "scalar" or full:
        b += act_bytes * d
    if head == "lm":
        b += 4 * cfg.vocab_size
    if head == "lm" or full:
        b += 8                                 # int64 token ids (cross entropy's targets, embedding)
    return b


def first_block_discount_per_token(cfg, method: str, targets=LORA_TARGETS, dropout: float = 0.0,
                                   mask_bytes: int = 1) -> int:
    """With a frozen embedding (LoRA) nothing before block 0's attention adapters needs a gradient:
    its first norm keeps nothing and its q/k/v dropouts keep no mask. Subtracted once. (With only
    ``o``/``down`` targets block 0's attention keeps nothing either; not subtracted: an
    overestimate of a few percent for such rare target sets.)"""
    if method == "full":
        return 0
    masked = sum(1 for t in parse_targets(targets) if t in ("q", "k", "v")) if dropout > 0 else 0
    return NORM_UPCAST_BYTES * cfg.dim + 4 + masked * mask_bytes * cfg.dim


def logits_peak_extra_per_token(cfg, head: str = "lm", stage: str = "sft") -> int:
    """Transient [tokens, vocab] float32 tensors on top of the saved log-softmax at the start of
    backward: cross entropy's gradient of the log-softmax and of the logits (2 x 4 bytes x vocab;
    core.cross_entropy). PPO's update keeps more alive (ppo.step): the float32 logits, the
    log-softmax, its exp for the entropy bonus, and up to two gradients of that size: 5 x 4 bytes
    x vocab in all, 4 x on top of the log-softmax (read from the code, not measured)."""
    if head != "lm":
        return 0
    return (4 if stage == "ppo" else 2) * 4 * cfg.vocab_size


def activation_bytes(cfg, method: str, tokens: int, act_bytes: int, resid_bytes: int, checkpointing: bool,
                     head: str = "lm", stage: str = "sft", targets=LORA_TARGETS, rank: int = LORA_RANK,
                     dropout: float = 0.0, mask_bytes: int = 1) -> dict:
    """Peak activation memory of one forward + backward over ``tokens`` = batch x sequence.

    Without checkpointing: every layer's saved tensors, the head's, and the transient logits
    gradients at the start of backward. With checkpointing (``torch.utils.checkpoint`` per block,
    transformer.hidden_states): only each block's input (the residual stream, ``resid_bytes``: the
    weights' dtype) is kept; backward recomputes one block at a time, after the logits' gradients
    are gone, so the peak is the inputs + the head + the larger of the two."""
    layer = layer_bytes_per_token(cfg, method, act_bytes, targets, rank, dropout, mask_bytes)
    head_b = head_bytes_per_token(cfg, method, act_bytes, head)
    extra = logits_peak_extra_per_token(cfg, head, stage)
    first = first_block_discount_per_token(cfg, method, targets, dropout, mask_bytes)
    saved = tokens * (cfg.n_layers * layer + head_b - first)
    if not checkpointing:
        return {"saved": saved, "peak": saved + tokens * extra}
    kept = tokens * (cfg.n_layers * resid_bytes * cfg.dim + head_b)
    return {"saved": kept, "peak": kept + tokens * max(extra, layer)}


def nf4_dequant_bytes(cfg, act_bytes: int) -> int:
    """QLoRA's transient: the largest block weight dequantized for one matmul (torchao linear_nf4)."""
    return max(o * i for o, i in linear_shapes(cfg).values()) * act_bytes


def kv_cache_bytes(cfg, context: int, batch: int, bytes_per_element: int) -> int:
    """K and V of every layer: 2 x layers x context x kv heads x head_dim x batch (KVCache)."""
    return 2 * cfg.n_layers * context * cfg.n_kv_heads * cfg.head_dim * batch * bytes_per_element


def prefill_bytes(cfg, prompt_len: int, batch: int, act_bytes: int) -> int:
    """Transient memory of one prefill forward (generate.py) over ``batch`` prompts of
    ``prompt_len`` tokens, on top of the weights and the KV cache: one block's largest
    activations at a time (the SwiGLU intermediates: silu output, w3 output, their product; and
    two [tokens, dim] tensors: residual and normalised input) and, for a batch (its prompts
    left-padded), the [prompt, prompt] boolean attention mask and the additive copy
    hidden_states makes of it once (``act_bytes`` per element; the quadratic term). One prompt
    alone takes no mask: SDPA's fused causal kernels, and no [heads, prompt, prompt] score
    matrix. Only the last position's logits are computed."""
    tokens = batch * prompt_len
    mask = batch * prompt_len * prompt_len * (1 + act_bytes) if batch > 1 else 0
    return tokens * (3 * act_bytes * cfg.hidden_dim + 2 * act_bytes * cfg.dim) + mask


# -- the plan ------------------------------------------------------------------------------------

def plan(cfg, method: str = "full", stage: str = "sft", micro_batch: int = 1, seq_len: int = 4096,
         dtype: str = "bf16", device: str = "cuda", rank: int = LORA_RANK, targets=LORA_TARGETS,
         dropout: float = LORA_DROPOUT, ppo_batch: int = PPO_BATCH, max_new_tokens: int = PPO_MAX_NEW_TOKENS,
         quantize_rewards: bool = False, rollout_batch: int | None = None) -> dict:
    """The training memory of ``stage`` with ``method`` on one device, by item, in bytes.

    ``sft``: a language model, ``micro_batch`` sequences of ``seq_len`` tokens per forward pass.
    ``reward``: a scalar model; a micro-batch of pairs is 2 x ``micro_batch`` sequences (chosen
    and rejected in one pass, train/reward.py ``pair_loss``).
    ``ppo``: five models at once (train/ppo.py): policy, reference (full: a frozen copy; LoRA:
    the policy with its adapters off, nothing extra), value model (a reward model's trunk with a
    scalar head, trained), helpfulness and safety reward models (frozen; NF4 with
    ``quantize_rewards``). ``seq_len`` is the prompt length, rollouts are ``seq_len +
    max_new_tokens`` long; ``micro_batch`` is the rollouts per forward pass (``llama2 ppo
    --micro-batch-size``, or its whole minibatch). The peak is the static memory + the largest of
    three phases: generation (KV cache for ``rollout_batch`` rollouts, default all ``ppo_batch``,
    as ``--rollout-batch-size``, + the prefill's masks and SwiGLU intermediates), scoring (our
    ``token_logprobs`` takes float32 logits and their log-softmax of one minibatch at a time)
    and the update (policy and value activations, both forwards before either backward).
    """
    if method not in METHODS or stage not in STAGES:
        raise ValueError(f"method must be one of {METHODS} and stage one of {STAGES}")
    if min(micro_batch, seq_len, rank, ppo_batch, max_new_tokens) <= 0:
        raise ValueError("micro-batch, sequence length, LoRA rank, PPO batch and max new tokens must be positive")
    db = DTYPE_BYTES[dtype]
    act = 2 if device == "cuda" else db       # bf16 autocast on GPU; the weights' dtype on the CPU
    mask_bytes = 1 if device == "cuda" else act
    lora = dict(targets=targets, rank=rank)
    if method == "full":
        dropout = 0.0
    acts = dict(act_bytes=act, resid_bytes=db, targets=targets, rank=rank, dropout=dropout, mask_bytes=mask_bytes)
    roles: dict[str, dict] = {}
    phases: dict[str, int | None] = {}
    if stage in ("sft", "reward"):
        head = "lm" if stage == "sft" else "scalar"
        rows = micro_batch * (2 if stage == "reward" else 1)
        roles["policy" if stage == "sft" else "reward model"] = role(cfg, method, db, head, **lora)
        tokens = rows * seq_len
        for ckpt in (False, True):
            phases[_ckpt(ckpt)] = activation_bytes(cfg, method, tokens, checkpointing=ckpt, head=head,
                                                   stage=stage, **acts)["peak"]
    else:
        length = seq_len + max_new_tokens
        roles["policy"] = role(cfg, method, db, "lm", **lora)
        roles["reference"] = role(cfg, "full", db, "lm", train=False) if method == "full" else \
            {"trainable_params": 0, "weights": 0, "gradients": 0, "optimizer": 0}
        roles["value model"] = role(cfg, method, db, "scalar", **lora)
        for name in ("helpfulness RM", "safety RM"):
            roles[name] = role(cfg, "full", db, "scalar", train=False, nf4=quantize_rewards)
        gen_rows = min(rollout_batch or ppo_batch, ppo_batch)
        kv = kv_cache_bytes(cfg, length, gen_rows, db)
        prefill = prefill_bytes(cfg, seq_len, gen_rows, act)
        scoring = min(micro_batch, ppo_batch) * (length - 1) * 2 * 4 * cfg.vocab_size
        tokens = micro_batch * (length - 1)
        # Both models' forwards run before either backward, so both keep their activations.
        for ckpt in (False, True):
            update = sum(activation_bytes(cfg, method, tokens, checkpointing=ckpt, head=head, stage="ppo",
                                          **acts)["peak"] for head in ("lm", "scalar"))
            phases[_ckpt(ckpt)] = max(kv + prefill, scoring, update)
            phases["update" + (" (checkpointing)" if ckpt else "")] = update
        phases["rollout KV cache"] = kv
        phases["rollout prefill"] = prefill
        phases["rollout log-probs"] = scoring
    static = {k: sum(r[k] for r in roles.values()) for k in ("weights", "gradients", "optimizer")}
    if method == "qlora" or (stage == "ppo" and quantize_rewards):
        static["nf4_dequantize"] = nf4_dequant_bytes(cfg, act)
    base = sum(static.values())
    return {
        "method": method, "stage": stage, "micro_batch": micro_batch, "seq_len": seq_len, "dtype": dtype,
        "device": device, "activation_dtype": "bf16" if act == 2 else "f32",
        "lora": None if method == "full" else {"rank": rank, "targets": ",".join(parse_targets(targets)),
                                               "dropout": dropout},
        "ppo": {"batch": ppo_batch, "max_new_tokens": max_new_tokens, "quantize_rewards": quantize_rewards,
                "rollout_batch": min(rollout_batch or ppo_batch, ppo_batch)}
        if stage == "ppo" else None,
        "trainable_params": sum(r["trainable_params"] for r in roles.values()),
        "roles": roles, **static,
        "activations": {"no_checkpointing": phases[_ckpt(False)], "checkpointing": phases[_ckpt(True)]},
        "phases": {k: v for k, v in phases.items() if k not in (_ckpt(False), _ckpt(True))},
        "total": {k: None if phases[k] is None else base + phases[k] for k in (_ckpt(False), _ckpt(True))},
    }


def _ckpt(on: bool) -> str:
    return "checkpointing" if on else "no_checkpointing"


_UNITS = {"": 1, "b": 1, "kb": 1024, "kib": 1024, "mb": 1024**2, "mib": 1024**2, "gb": 1024**3, "gib": 1024**3,
          "tb": 1024**4, "tib": 1024**4}


def parse_size(text: str) -> int:
    """``"80GB"`` / ``"141 GiB"`` / ``"24g"`` -> bytes. GPU makers' "GB" are binary (an "80GB"
    A100/H100 has 80 GiB), so GB means GiB here."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*", text.lower())
    if not m:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GB, 141GB, 24GiB)")
    unit = m.group(2)
    unit = unit if unit in _UNITS else unit + "b"
    if unit not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GB, 141GB, 24GiB)")
    return int(float(m.group(1)) * _UNITS[unit])


def verdict(total: dict, capacity: int) -> dict:
    """"fits", "fits with activation checkpointing" or "does not fit", and what it needs."""
    if total["no_checkpointing"] <= capacity:
        return {"fits": True, "needs_checkpointing": False, "text": "fits"}
    ckpt = total["checkpointing"]
    if ckpt is not None and ckpt <= capacity:
        return {"fits": True, "needs_checkpointing": True, "text": "fits with activation checkpointing"}
    return {"fits": False, "needs_checkpointing": ckpt is not None, "text": "does not fit",
            "needs": total["no_checkpointing"] if ckpt is None else ckpt}

