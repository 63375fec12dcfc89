"""Run configuration: one flat dataclass, presets, and ``--set key=value`` overrides.

Every key is a field of :class:`Config`; a preset is a dict of overrides of the defaults, and
``--set`` applies more overrides on top, parsed to the field's type. An unknown key or a value
that does not parse is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass
class Config:
    # What to train
    model: str = "lipschitz_gpt"  # lipschitz_gpt | baseline_gpt | lipschitz_mlp | baseline_mlp
    dataset: str = "shakespeare"  # shakespeare | tokens (GPT models) | cifar10 | mnist (MLPs)
    data_dir: str | None = None  # else $LIPSCHITZ_DATA_DIR, else cache/download
    # dataset "tokens": a folder of *_train_*.bin / *_val_*.bin GPT-2 token shards (`lipschitz
    # prepare`, or modded-nanogpt's FineWeb ones); a relative path is looked up in the data dir,
    # then in the working directory
    token_dir: str | None = None
    vocab_size: int | None = None  # tokens: model vocabulary (None: GPT-2's 50257; ≥ 50257)
    val_tokens: int | None = None  # tokens: validate on this many tokens (None: the whole split)
    # Common keys (design.md)
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
    device: str = "auto"  # auto | cpu | cuda | mps
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
    # Loop
    grad_accum: int = 1
    eval_every: int = 250
    eval_protocol: str = "full"  # full | paper (see lipschitz.train.evaluate)
    checkpoint_every: int = 500
    log_every: int = 50
    compile: bool = False
    sample_tokens: int = 200  # length of the text sample printed at the end (0: none)

    def __post_init__(self) -> None:
        """Reject values that cannot work, naming the key."""
        from lipschitz.constraints import CONSTRAINTS

        positive = ("steps", "batch_size", "seq_len", "d_model", "n_layer", "n_head",
                    "grad_accum", "eval_every", "checkpoint_every", "log_every")  # fmt: skip
        for key in positive:
            if not getattr(self, key) > 0:
                raise ValueError(f"config: {key} must be > 0, got {getattr(self, key)!r}")
        choices = {
            "model": ("lipschitz_gpt", "baseline_gpt", "lipschitz_mlp", "baseline_mlp"),
            "dataset": ("shakespeare", "tokens", "cifar10", "mnist"),
            "optimizer": ("muon", "adamw"),
            "constraint": tuple(CONSTRAINTS),
            "eval_protocol": ("full", "paper"),
            "residual": ("convex", "sum"),
            "target_norm_scalars": ("model", "unit"),
            "embed_optimizer": ("muon", "adamw"),
            "ns_dtype": ("float32", "bfloat16"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"config: {key} must be one of {allowed}, got {getattr(self, key)!r}"
                )
        if self.model.endswith("_gpt") != (self.dataset in ("shakespeare", "tokens")):
            raise ValueError(
                f"config: model {self.model!r} cannot train on dataset {self.dataset!r} "
                "(GPT models: shakespeare, tokens; MLP models: cifar10, mnist)"
            )
        if self.dataset == "tokens" and not self.token_dir:
            raise ValueError(
                "config: dataset 'tokens' needs token_dir=FOLDER of *_train_*.bin / *_val_*.bin "
                "shards (make them with `lipschitz prepare TEXT_FILES... --out FOLDER`)"
            )
        if self.vocab_size is not None and self.vocab_size < 50257:
            raise ValueError(f"config: vocab_size must be >= 50257 (GPT-2), got {self.vocab_size}")
        if self.val_tokens is not None and not self.val_tokens >= self.seq_len:
            raise ValueError(f"config: val_tokens must be >= seq_len, got {self.val_tokens}")
        for key in ("head_lr", "embed_lr", "vector_lr"):
            if getattr(self, key) is not None and not getattr(self, key) >= 0:
                raise ValueError(f"config: {key} must be >= 0, got {getattr(self, key)!r}")
        if not 0 <= self.lr_floor <= 1 or not 0 < self.cooldown_frac <= 1:
            raise ValueError("config: lr_floor must be in [0, 1] and cooldown_frac in (0, 1]")
        if self.schedule == "constant" and self.lr_floor != 0:
            raise ValueError("config: schedule 'constant' has no lr_floor")
        if self.residual_alpha is not None and not 0 < self.residual_alpha <= 1:
            raise ValueError(f"config: residual_alpha must be in (0, 1], got {self.residual_alpha}")
        if not (self.train_temperature > 0 and math.isfinite(self.train_temperature)):
            raise ValueError(
                f"config: train_temperature must be finite and > 0, got {self.train_temperature}"
            )
        if not self.attn_out_mult > 0:
            raise ValueError(f"config: attn_out_mult must be > 0, got {self.attn_out_mult!r}")
        if not self.w_max > 0 or (self.head_w_max is not None and not self.head_w_max > 0):
            raise ValueError("config: w_max and head_w_max must be > 0")
        if not self.lr >= 0 or not self.weight_decay >= 0:
            raise ValueError("config: lr and weight_decay must be >= 0")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, values: dict) -> Config:
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
        return cls.from_dict(json.loads(Path(path).read_text()))


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
