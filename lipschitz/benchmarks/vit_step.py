"""Training steps of the image transformer (default: the ``cifar-vit`` preset), four set-ups
timed interleaved, one step of each per round, so that machine noise hits all alike:

- ``bf16``: the preset as `lipschitz train` runs it (bfloat16 autocast on the CPU with
  ``cpu_bf16``, the SLL layers' fused forward, ``svd_cap`` by the eigh of each Gram matrix);
- ``bf16-svd``: the same with ``svd_cap`` computed by SVD (its path before commit ce1a091; the
  same projection);
- ``float32``: the same without autocast;
- ``float32-as-written``: float32 with every SLL layer computing the formula as written,
  x − 2·(ReLU(Wx + b)/t)·W, and the token heads one after the other (the forward before the
  factors 2/t moved onto the weight), the reference for the fused forward.

``--vs KEY=VALUE[,KEY=VALUE...]`` (repeatable) adds the ``bf16`` set-up of the preset with
those overrides, timed in the same rounds (e.g. ``--vs n_head=16``: what more heads cost).

A step is forward, cross-entropy at the preset's temperature, backward, every optimizer's step
(Muon, the constraint's projection, AdamW) on random images. Prints ms per step and ratios;
writes ``vit_step.json`` and ``vit_step.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import types

import torch
import torch.nn.functional as F

from lipschitz import constraints
from lipschitz.benchmarks import write_results
from lipschitz.config import apply_overrides
from lipschitz.nn import build_model
from lipschitz.nn.sll import SLLMLP, TokenSLL, TokenSLLHeads
from lipschitz.optim import build_optimizers
from lipschitz.presets import preset
from lipschitz.training.runtime import autocast

N_INPUTS, N_CLASSES = 32 * 32 * 3, 10  # CIFAR-10's shape


def _mlp_as_written(self: SLLMLP, x: torch.Tensor) -> torch.Tensor:
    h = F.relu(self.fc(x) + self.bias)  # (B, T, hidden)
    return x - 2 * (h / self.scaling()) @ self.fc.weight


def _token_as_written(self: TokenSLL, x: torch.Tensor) -> torch.Tensor:
    return _mlp_as_written(self, x.transpose(1, 2)).transpose(1, 2)


def _heads_as_written(self: TokenSLLHeads, x: torch.Tensor) -> torch.Tensor:
    chunks = x.chunk(len(self.heads), dim=-1)  # n_head × (B, T, d/n_head)
    return torch.cat([head(c) for head, c in zip(self.heads, chunks, strict=True)], dim=-1)


def _as_written(model: torch.nn.Module) -> None:
    """Every SLL layer of ``model`` computes the formula as written (instance-level forwards)."""
    for m in model.modules():
        if isinstance(m, TokenSLL):
            m.forward = types.MethodType(_token_as_written, m)
        elif isinstance(m, SLLMLP):
            m.forward = types.MethodType(_mlp_as_written, m)
        elif isinstance(m, TokenSLLHeads):
            m.forward = types.MethodType(_heads_as_written, m)


@contextlib.contextmanager
def _svd_path():
    """svd_cap by SVD for every matrix (its Gram path trusts no ratio above the cap)."""
    saved = dict(constraints.GRAM_CAP_MAX_RATIO)
    constraints.GRAM_CAP_MAX_RATIO.update({dtype: 0.0 for dtype in saved})
    try:
        yield
    finally:
        constraints.GRAM_CAP_MAX_RATIO.update(saved)


def _setup(cfg, name: str):
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, N_CLASSES, N_INPUTS)
    if name == "float32-as-written":
        _as_written(model)
    return model, build_optimizers(cfg, model), name.startswith("bf16"), name == "bf16-svd"


def _step(cfg, model, optimizers, bf16: bool, svd: bool, x, y) -> None:
    with autocast(torch.device("cpu"), bf16):
        logits = model(x)
    loss = F.cross_entropy(logits.float() * cfg.train_temperature, y)
    loss.backward()
    with _svd_path() if svd else contextlib.nullcontext():
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)


def run(
    name: str = "cifar-vit",
    overrides: list[str] | None = None,
    rounds: int = 10,
    vs: list[str] | None = None,
) -> dict:
    cfg = apply_overrides(preset(name), overrides or [])
    configs = {n: cfg for n in ("bf16", "bf16-svd", "float32", "float32-as-written")}
    for extra in vs or []:  # "KEY=VALUE,KEY=VALUE": the bf16 set-up with these overrides too
        configs[f"bf16 {extra}"] = apply_overrides(cfg, extra.split(","))
    if len({c.batch_size for c in configs.values()}) > 1:
        raise ValueError("--vs must keep batch_size (the set-ups share one batch)")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(cfg.batch_size, N_INPUTS, generator=gen)
    y = torch.randint(N_CLASSES, (cfg.batch_size,), generator=gen)
    setups = {n: _setup(c, n.split()[0]) for n, c in configs.items()}
    torch.set_flush_denormal(True)  # as `lipschitz train` does
    times: dict[str, list[float]] = {n: [] for n in configs}
    try:
        for r in range(rounds + 2):  # two warm-up rounds
            for n, c in configs.items():
                t0 = time.perf_counter()
                _step(c, *setups[n], x, y)
                if r >= 2:
                    times[n].append(time.perf_counter() - t0)
    finally:
        torch.set_flush_denormal(False)
    ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    return {
        "preset": name, "overrides": overrides or [], "rounds": rounds,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "ms_per_step": ms,
        "over_bf16": {n: v / ms["bf16"] for n, v in ms.items() if n.startswith("bf16 ")},
        "svd_over_gram": ms["bf16-svd"] / ms["bf16"],
        "float32_over_bf16": ms["float32"] / ms["bf16"],
        "as_written_over_fused": ms["float32-as-written"] / ms["float32"],
    }  # fmt: skip


def markdown(result: dict) -> str:
    lines = [
        f"{result['preset']} {' '.join(result['overrides'])}: median of {result['rounds']} "
        f"interleaved steps, {result['threads']} threads, {result['cpu_capability']}",
        "",
        "| set-up | ms per step |",
        "|---|---|",
    ]
    lines += [f"| {n} | {v:.1f} |" for n, v in result["ms_per_step"].items()]
    if result["over_bf16"]:
        ratios = [f"{n} ÷ bf16: {v:.2f}" for n, v in result["over_bf16"].items()]
        lines.append("\n" + "; ".join(ratios))
    lines.append(
        f"\nsvd_cap by SVD ÷ by Gram matrix (bf16): {result['svd_over_gram']:.2f}; "
        f"float32 ÷ bf16: {result['float32_over_bf16']:.2f}; "
        f"as written ÷ fused (float32): {result['as_written_over_fused']:.2f}"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lipschitz bench vit_step", description=__doc__)
    parser.add_argument("--preset", default="cifar-vit")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--vs", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]")
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args(argv)
    result = run(args.preset, args.set, args.rounds, args.vs)
    write_results(args.out, "vit_step", result, markdown(result))


if __name__ == "__main__":
    main()
