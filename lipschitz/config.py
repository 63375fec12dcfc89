"""Run configuration: one flat dataclass, presets, and ``--set key=value`` overrides.

Every key is a field of :class:`Config`; a preset is a dict of overrides of the defaults, and
``--set`` applies more overrides on top, parsed to the field's type. An unknown key or a value
that does not parse is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from lipschitz.fileio import read_json

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")
# Sanity caps, far above anything that fits one machine: they catch typos such as d_model=10**9
# before the model's allocation fails (or swaps the machine to a halt).
MAX_PARAMETERS = 10**11
MAX_TOKENS_PER_STEP = 10**9
MAX_RECALL_VOCAB = 65536  # recall's key alphabet (and value alphabet) at most
MAX_SEED = 2**63  # seeds torch's generator takes: [0, 2**63)
MAX_FLOAT = 1e8  # no float setting means anything beyond this (w_max, lr, scales, ...)
MAX_MLP_RATIO = 64  # the MLP's hidden width is at most 64·d_model
MAX_COUNT = 10**9  # steps, intervals and sample length: 10**9 steps is weeks at 1 ms a step


@dataclass
class Config:
    # What to train
    # lipschitz_gpt | baseline_gpt | lipschitz_mlp | baseline_mlp | lipschitz_vit
    model: str = "lipschitz_gpt"
    # shakespeare | tokens | recall (GPT models) | cifar10 | mnist (MLPs, lipschitz_vit)
    dataset: str = "shakespeare"
    data_dir: str | None = None  # else $LIPSCHITZ_DATA_DIR, else cache/download
    # dataset "tokens": a folder of *_train_*.bin / *_val_*.bin GPT-2 token shards (`lipschitz
    # prepare`, or modded-nanogpt's FineWeb ones); a relative path is looked up in the data dir,
    # then in the working directory
    token_dir: str | None = None
    vocab_size: int | None = None  # tokens: model vocabulary (None: GPT-2's 50257; ≥ 50257)
    val_tokens: int | None = None  # tokens: validate on this many tokens (None: the whole split)
    # Common keys
    optimizer: str = "muon"  # muon | adamw
    constraint: str = "spectral_soft_cap"  # a lipschitz.constraints.CONSTRAINTS name
    w_max: float = 1.0  # RMS→RMS bound of every hidden matrix
    lr: float = 0.1
    weight_decay: float = 0.0
    spectral_decay: float = 0.1  # λ_s of constraint=spectral_weight_decay (per step)
    steps: int = 2000
    batch_size: int = 64  # global batch (sequences per optimizer step)
    seq_len: int = 256
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # Model (for MLPs: d_model is the hidden width, n_layer the number of Linear layers)
    d_model: int = 256
    n_layer: int = 3
    n_head: int = 4
    attn_scale: float = 1.0  # multiplies the 1/d_head attention logits (Lipschitz model)
    final_scale: float = 1.0  # multiplies the logits
    # Lipschitz model's residuals: convex (1-α)x + α·f(x), α = 1/(2·n_layer) (the paper), or sum
    # x + f(x) (the paper's May-2025 code; see docs/results.md); and the ×1/3 before W_O
    residual: str = "convex"
    residual_alpha: float | None = None  # α of the convex residuals (None: 1/(2·n_layer))
    attn_out_mult: float = 1 / 3
    pos_bias: bool = False  # a learned relative-position bias on the attention logits
    activation: str = "gelu"  # the MLP's: gelu (GELU/1.1289, the paper) | maxmin (GroupSort-2)
    mlp_ratio: int = 4  # the Lipschitz GPT's and ViT's MLP: d → mlp_ratio·d → d
    patch_size: int = 4  # lipschitz_vit: p×p pixel patches, one token each
    pool: str = "flatten"  # lipschitz_vit: the head reads all tokens (flatten) or their mean
    bias: bool = False  # lipschitz_vit: a learned position embedding and biases in the MLPs
    block: str = "convex"  # lipschitz_vit: convex (Block) | sll (SLLBlock) | sll_mixer | sll_conv
    # lipschitz_vit: convolutional SLL layers (3×3) on the image folded 2×2 into channels, before
    # the patches (lipschitz.nn.conv_sll), their hidden channels, and the channels the folded
    # image is lifted to first (None: no lift, C·4)
    stem_layers: int = 0
    stem_hidden: int = 48
    stem_channels: int | None = None
    # lipschitz_vit: in eval mode, the mean of the logits of each image and of its mirror image
    # (a pixel permutation, so the certificate is unchanged; docs/certificates.md)
    flip_average: bool = False
    # Token mixer of the Lipschitz GPT: attention (the paper's, with attn_scale and pos_bias) |
    # lookup (lipschitz.nn.lookup: a lag bias on every head, dynamic lags, q·k content heads, an
    # optional value-0 sink; with mixer_budget each head's values are scaled so that it costs
    # the certificate no more than a content-free head)
    mixer: str = "attention"
    content_heads: int = 0  # lookup: heads with q·k content logits (full-width d × d maps)
    content_scale: float = 0.0  # lookup: s of the content logits s·(Qx)·(Kx')/d
    qk_tied: bool = False  # lookup: K = Q in every content head (a similarity)
    key_shift: bool = False  # lookup: keys from the previous token (a one-layer induction head)
    lag_window: int = 0  # lookup: K, the lags each query reweights (0: no dynamic lags)
    lag_gate: float = 0.0  # lookup: g of the dynamic-lag logits g·(M x)[lag]
    attn_sink: bool = False  # lookup: a key with a learned logit and value 0
    mixer_budget: bool = True  # lookup: scale each head's values by 1/(1 + its cost at the caps)
    # dataset "recall": multi-query associative recall, generated from the seed
    recall_pairs: int = 16  # key-value pairs per sequence (the queries fill the rest)
    recall_vocab: int = 64  # size of the key alphabet and of the (separate) value alphabet
    # Optimizer details
    head_w_max: float | None = None  # None: same as w_max
    head_lr: float | None = None  # the head's learning rate (None: lr)
    embed_lr: float | None = None  # the embedding's learning rate (None: lr)
    vector_lr: float | None = None  # AdamW lr of non-matrix parameters (None: lr/100 with Muon)
    embed_optimizer: str = "muon"  # muon (row-normalized steps) | adamw; rows capped either way
    embed_w_max: float = 1.0  # cap on every embedding row's RMS
    blocks_mass: float | None = 32.0  # the paper's target-norm split; None: every group 1
    # target norms divided by the model's own residual/attention scalars ("model"), or by 1 for
    # each ("unit": the per-layer lr decay of the paper's App. D, Modula's Mul at sensitivity 1)
    target_norm_scalars: str = "model"
    momentum: float = 0.9
    nesterov: bool = False
    momentum_warmup_steps: int = 0  # Muon's momentum rises linearly from momentum_start
    momentum_start: float = 0.85
    coefficients: str = "you6"  # Newton–Schulz set for Muon
    ns_dtype: str = "float32"  # float32 | bfloat16: Muon's Newton–Schulz compute dtype
    adam_betas: tuple[float, float] = (0.9, 0.95)
    schedule: str = "linear"  # linear | cosine | constant | constant_cooldown
    warmup_steps: int = 0
    lr_floor: float = 0.0  # final lr multiplier of linear, cosine and constant_cooldown
    cooldown_frac: float = 0.4  # constant_cooldown: the final fraction of steps that decays
    # training loss: cross-entropy of train_temperature × logits (1: plain cross-entropy)
    train_temperature: float = 1.0
    # image classifiers: the cross-entropy adds margin_eps·(certified ℓ2 constant of z_y − z_j)
    # to every wrong logit z_j (a margin that certifies radius margin_eps; Tsuzuku et al. 2018)
    margin_eps: float = 0.0
    augment: bool = False  # image classifiers: random crop (augment_pad zero padding) and flip
    augment_pad: int = 4  # augment's crop: zero padding in pixels (0: random flips only)
    # Loop
    grad_accum: int = 1
    eval_every: int = 250
    eval_protocol: str = "full"  # full | paper (see lipschitz.data.tasks.eval_windows)
    checkpoint_every: int = 500
    log_every: int = 50
    compile: bool = False
    # bfloat16 autocast of the training forward on the CPU as well (on CUDA always; the SLL
    # layers' residual sums then run in bfloat16 too); the evaluation, the certificate and
    # `lipschitz robustness` stay in float32
    cpu_bf16: bool = False
    sample_tokens: int = 200  # length of the text sample printed at the end (0: none)

    def __post_init__(self) -> None:
        """Reject values that cannot work, naming the key."""
        _check_types(self)
        _check_finite(self)
        _check_relations(self)
        _check_ranges(self)
        _check_size(self)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, values: dict) -> Config:
        """A config from a dict of key → value (e.g. a parsed config.json); unknown keys, wrong
        types and values that cannot work are a ValueError naming the key."""
        if not isinstance(values, dict):
            raise ValueError(f"a config must be a JSON object of key: value, got {values!r:.80}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        values = dict(values)
        if isinstance(values.get("adam_betas"), list):
            values["adam_betas"] = tuple(values["adam_betas"])
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read a ``config.json``; a missing, malformed or invalid file is an error naming it."""
        values = read_json(path)
        try:
            return cls.from_dict(values)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


@functools.cache
def _hints() -> dict[str, object]:
    return typing.get_type_hints(Config)


def _has_type(value: object, hint: object) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (an int fits a float; a bool only a bool)."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_has_type(value, a) for a in args)
    if typing.get_origin(hint) is tuple:
        return (isinstance(value, tuple) and len(value) == len(args)
                and all(_has_type(v, a) for v, a in zip(value, args, strict=True)))  # fmt: skip
    if hint is type(None):
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, int | float)
    return isinstance(value, hint)


def _check_types(cfg: Config) -> None:
    """Every value has its field's type: a config.json or a preset can hold anything."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if not _has_type(value, _hints()[f.name]):
            raise ValueError(f"config: {f.name} must be {f.type}, got {value!r:.80}")


def _check_finite(cfg: Config) -> None:
    """Every float is finite and at most MAX_FLOAT in size. No key gives infinity a meaning (an
    unbounded model is constraint=none), an inf or NaN lr, w_max, ... trains to NaN or certifies
    nothing, and a w_max of 1e300 overflows float32 weights."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ValueError(f"config: {f.name} must be finite, got {value!r}")
        if any(isinstance(v, float) and abs(v) > MAX_FLOAT for v in values):
            raise ValueError(f"config: {f.name}={value!r} is beyond the supported {MAX_FLOAT:g}")


def _check_relations(cfg: Config) -> None:
    """Values that must fit each other (the names are checked against the registries that own
    them by lipschitz.choices.check_choices)."""
    if not DEVICE_PATTERN.fullmatch(cfg.device):
        raise ValueError(
            f"config: device must be auto, cpu, cuda, cuda:N or mps, got {cfg.device!r}"
        )
    if cfg.content_heads > cfg.n_head:
        raise ValueError(
            f"config: content_heads={cfg.content_heads} must be <= n_head={cfg.n_head}"
        )
    if cfg.stem_layers == 0 and (
        cfg.stem_channels is not None or cfg.stem_hidden != Config.stem_hidden
    ):
        raise ValueError("config: stem_channels and stem_hidden need stem_layers ≥ 1")
    if not cfg.augment and cfg.augment_pad != Config.augment_pad:
        raise ValueError("config: augment_pad needs augment=true")
    if cfg.lag_window > cfg.seq_len:
        raise ValueError(f"config: lag_window={cfg.lag_window} must be <= seq_len={cfg.seq_len}")
    if cfg.recall_vocab > MAX_RECALL_VOCAB:
        raise ValueError(
            f"config: recall_vocab={cfg.recall_vocab} is above {MAX_RECALL_VOCAB} (the model's "
            "vocabulary is 2·recall_vocab tokens, and every sequence draws its keys from it)"
        )


def _check_ranges(cfg: Config) -> None:
    """Numbers are in the range where they mean something."""
    positive = ("steps", "batch_size", "seq_len", "d_model", "n_layer", "n_head", "grad_accum",
                "eval_every", "checkpoint_every", "log_every", "w_max", "embed_w_max",
                "attn_out_mult", "train_temperature", "head_w_max", "blocks_mass",
                "residual_alpha", "recall_pairs", "recall_vocab", "final_scale",
                "mlp_ratio", "patch_size", "stem_hidden", "stem_channels")  # fmt: skip
    for key in positive:
        value = getattr(cfg, key)
        if value is not None and not value > 0:
            raise ValueError(f"config: {key} must be > 0, got {value!r}")
    non_negative = ("lr", "weight_decay", "spectral_decay", "warmup_steps", "lr_floor",
                    "momentum_warmup_steps", "sample_tokens", "head_lr", "embed_lr",
                    "vector_lr", "lag_window", "lag_gate", "content_heads", "content_scale",
                    "attn_scale", "margin_eps", "stem_layers", "augment_pad")  # fmt: skip
    for key in non_negative:
        value = getattr(cfg, key)
        if value is not None and not value >= 0:
            raise ValueError(f"config: {key} must be >= 0, got {value!r}")
    for key in ("steps", "eval_every", "checkpoint_every", "log_every", "warmup_steps",
                "momentum_warmup_steps", "sample_tokens", "grad_accum"):  # fmt: skip
        if (value := getattr(cfg, key)) > MAX_COUNT:
            raise ValueError(f"config: {key}={value} is beyond the supported {MAX_COUNT:g}")
    unit = {"momentum": cfg.momentum, "momentum_start": cfg.momentum_start,
            "adam_betas": cfg.adam_betas}  # fmt: skip
    for key, value in unit.items():
        if not all(0 <= v < 1 for v in (value if isinstance(value, tuple) else (value,))):
            raise ValueError(f"config: {key} must be in [0, 1), got {value!r}")
    if cfg.vocab_size is not None and cfg.vocab_size < 50257:
        raise ValueError(f"config: vocab_size must be >= 50257 (GPT-2), got {cfg.vocab_size}")
    if cfg.val_tokens is not None and not cfg.val_tokens >= cfg.seq_len:
        raise ValueError(f"config: val_tokens must be >= seq_len, got {cfg.val_tokens}")
    if not 0 <= cfg.seed < MAX_SEED:
        raise ValueError(f"config: seed must be in [0, 2**63), got {cfg.seed}")
    if not cfg.lr_floor <= 1:
        raise ValueError(f"config: lr_floor must be in [0, 1], got {cfg.lr_floor}")
    if not 0 < cfg.cooldown_frac <= 1:
        raise ValueError(f"config: cooldown_frac must be in (0, 1], got {cfg.cooldown_frac}")
    if cfg.schedule == "constant" and cfg.lr_floor != 0:
        raise ValueError("config: schedule 'constant' has no lr_floor")
    if cfg.mlp_ratio > MAX_MLP_RATIO:
        raise ValueError(f"config: mlp_ratio={cfg.mlp_ratio} is above {MAX_MLP_RATIO}")
    if cfg.residual_alpha is not None and not cfg.residual_alpha <= 1:
        raise ValueError(f"config: residual_alpha must be in (0, 1], got {cfg.residual_alpha}")


def parameter_estimate(cfg: Config) -> int:
    """A generous estimate of the model's parameter count, to catch impossible sizes early:
    (4 + 2·mlp_ratio)·d² per layer (a transformer block's attention and MLP; an MLP layer has
    d²), plus an input and an output layer at least as wide as GPT-2's padded vocabulary or a
    CIFAR image."""
    d = cfg.d_model
    per_layer = (4 + 2 * cfg.mlp_ratio) * d * d
    return cfg.n_layer * per_layer + 2 * max(cfg.vocab_size or 50304, 3072) * d


def _check_size(cfg: Config) -> None:
    """Refuse sizes no machine can hold (a typo like d_model=10**9), naming the keys."""
    n_params = parameter_estimate(cfg)
    if n_params > MAX_PARAMETERS:
        raise ValueError(
            f"config: d_model={cfg.d_model}, n_layer={cfg.n_layer} (vocab_size="
            f"{cfg.vocab_size}) make about {n_params:.2g} parameters, above the sanity limit "
            f"{MAX_PARAMETERS:.0e}; check d_model and n_layer"
        )
    tokens = cfg.batch_size * cfg.seq_len
    if tokens > MAX_TOKENS_PER_STEP:
        raise ValueError(
            f"config: batch_size={cfg.batch_size} × seq_len={cfg.seq_len} = {tokens:.2g} tokens "
            f"per step, above the sanity limit {MAX_TOKENS_PER_STEP:.0e}; check batch_size and "
            "seq_len"
        )


def _parse(key: str, text: str, annotation: object) -> object:
    """Parse ``text`` as the type ``annotation`` of field ``key``; ValueError if it does not."""
    hint = typing.get_type_hints(Config)[key] if isinstance(annotation, str) else annotation
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse(key, text, inner)
    try:
        if hint is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typing.get_origin(hint) is tuple:
            parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
            if len(parts) != len(args):
                raise ValueError
            return tuple(a(p) for a, p in zip(args, parts, strict=True))
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        return str(text)
    except ValueError:
        name = getattr(hint, "__name__", str(hint))
        raise ValueError(f"--set {key}={text}: expected a value of type {name}") from None


def apply_overrides(config: Config, assignments: list[str]) -> Config:
    """Apply ``key=value`` strings to a config; unknown keys and bad values raise ValueError."""
    types_by_name = {f.name: f.type for f in fields(Config)}
    changes = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        if key not in types_by_name:
            raise ValueError(f"--set {key}: unknown key; known keys: {sorted(types_by_name)}")
        changes[key] = _parse(key, text.strip(), types_by_name[key])
    return dataclasses.replace(config, **changes)
