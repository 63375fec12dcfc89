"""The `lipschitz` command: train, sample, certify, robustness, sweep, plot, prepare, presets,
bench."""

from __future__ import annotations

import argparse
import json
import os
import sys

# Failures that are the input's fault (bad arguments, files, data, a diverged run): one line
# naming the thing at fault, exit status 2. Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (
    ValueError,
    NotImplementedError,
    FloatingPointError,
    OSError,  # FileNotFoundError, FileExistsError, PermissionError, a full disk, a long name
    ImportError,
    MemoryError,
)


def _expected(err: Exception) -> bool:
    """Whether ``err`` is an expected failure (see EXPECTED_ERRORS), including the
    RuntimeErrors that are: a directory in use, a broken constraint, out of GPU memory."""
    if isinstance(err, EXPECTED_ERRORS):
        return True
    import torch

    from lipschitz.fileio import DirectoryInUse
    from lipschitz.training import ConstraintViolation

    return isinstance(err, (DirectoryInUse, ConstraintViolation, torch.OutOfMemoryError))


def cmd_train(args: argparse.Namespace) -> None:
    from lipschitz.config import apply_overrides
    from lipschitz.data.tasks import TASKS
    from lipschitz.presets import preset
    from lipschitz.training import RunDir, sample_text, train
    from lipschitz.training.runtime import env_int

    if args.resume and args.set:
        raise ValueError("--resume continues the saved config exactly; drop --set")
    cfg = apply_overrides(preset(args.preset), args.set or [])
    if args.data_dir is not None:
        cfg = apply_overrides(cfg, [f"data_dir={args.data_dir}"])
    final = train(cfg, args.out, resume=args.resume)
    if env_int("RANK", 0) != 0:  # under torchrun, rank 0 reports
        return
    cfg = RunDir(args.out).config()  # the saved one, on resume
    bound = final["lipschitz_bound"]
    bound = "none (unconstrained model)" if bound is None else f"{bound:.4g}"
    print(
        f"final: val_acc={final['val_acc']:.4f} val_loss={final['val_loss']:.4f} "
        f"certified Lipschitz bound={bound} "
        f"steps={final['steps']} wall={final['wall_time_s']:.0f}s -> {args.out}/final.json"
    )
    for v in final.get("constraint_violations") or []:
        print(f"warning: {v['param']} ends at norm {v['norm']:.4g} > w_max {v['w_max']:g} "
              f"({v['constraint']} does not guarantee its cap)", file=sys.stderr)  # fmt: skip
    prompt = TASKS[cfg.dataset].prompt
    if cfg.sample_tokens > 0 and prompt is not None:
        print("sample:")
        print(sample_text(args.out, prompt, cfg.sample_tokens, temperature=0.8, seed=0))


def cmd_sample(args: argparse.Namespace) -> None:
    from lipschitz.training import sample_text

    print(sample_text(args.dir, args.prompt, args.tokens, args.temperature, args.seed,
                      args.data_dir))  # fmt: skip


def cmd_prepare(args: argparse.Namespace) -> None:
    from lipschitz.data.tokens import prepare

    summary = prepare(args.files, args.out, args.tokenizer, args.val_fraction,
                      args.shard_tokens, args.name, args.data_dir)  # fmt: skip
    print(
        f"{len(summary['documents'])} documents -> {summary['train_tokens']:,} train and "
        f"{summary['val_tokens']:,} validation tokens in {args.out} (see prepare.json)"
    )


def cmd_certify(args: argparse.Namespace) -> None:
    from lipschitz.certify import certify
    from lipschitz.optim import build_optimizers, constraint_violations
    from lipschitz.training import load_run

    model, cfg = load_run(args.dir)
    cert = certify(model, rule=args.rule)
    for opt in build_optimizers(cfg, model):  # the caps the run was trained under
        for v in constraint_violations(opt):
            print(f"warning: {v['param']} has norm {v['norm']:.6g} above its configured cap "
                  f"w_max={v['w_max']:g} ({v['constraint']})", file=sys.stderr)  # fmt: skip
    result = {"lipschitz_bound": cert.lipschitz, **cert.to_dict()}
    if args.rule == "paper":  # not a bound: never under a key a reader takes for one
        result = {"paper_formula_not_a_bound": cert.lipschitz, **cert.to_dict()}
        del result["lipschitz"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        what = (
            "certified Lipschitz bound"
            if args.rule == "certified"
            else ("the paper's formula (App. B; not a valid bound for every model)")
        )
        print(f"{what}: {cert.lipschitz:.6g} ({cert.input_norm} -> {cert.output_norm})")
        for layer in cert.layers:
            print(f"  {layer['name']:40s} {layer['rms_operator_norm']:.4f}")


def cmd_robustness(args: argparse.Namespace) -> None:
    from lipschitz.robustness import report

    result = report(args.dir, args.data_dir, args.n, tuple(args.eps), args.pgd_steps,
                    args.autoattack, args.attack_n)  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"clean accuracy {result['clean_acc']:.4f}, certified L (l2->l2) "
        f"{result['lipschitz_l2']:.4g}, median certified radius "
        f"{result['median_certified_radius']:.4g} ({result['n_examples']} test images)"
    )
    for row in result["eps"]:
        auto = f"  AutoAttack {row['autoattack_acc']:.4f}" if "autoattack_acc" in row else ""
        subset = ""
        if "verified_acc_attacked" in row:
            subset = f" (attacks on the first {result['n_attacked']}: verified "
            subset += f"{row['verified_acc_attacked']:.4f})"
        print(
            f"  eps {row['eps']:.4f}: verified {row['verified_acc']:.4f}{subset}  PGD "
            f"{row['pgd_acc']:.4f}" + auto
        )
    print(f"-> {args.dir}/robustness.json, robustness.png")


def cmd_sweep(args: argparse.Namespace) -> None:
    from lipschitz.sweep import run_sweep

    rows = run_sweep(args.spec, args.out, args.data_dir, args.parallel)
    failed = [row["run"] for row in rows if row["status"] == "failed"]
    if failed:
        print(f"lipschitz sweep: {len(failed)} of {len(rows)} runs failed", file=sys.stderr)
        sys.exit(1)


def cmd_plot(args: argparse.Namespace) -> None:
    from lipschitz.pareto import find_runs, load_points, plot

    points = load_points(find_runs(args.runs), args.x, args.y)
    out = plot(points, args.x, args.y, args.out, log_x=not args.linear_x, lower_y=args.lower_y)
    table = out.with_suffix(".md").read_text().split("\n", 1)[1]  # without the marker line
    print(table, end="")  # the frontier table plot() wrote
    print(f"-> {out}, {out.with_suffix('.md')} ({len(points)} runs)")


def cmd_presets(args: argparse.Namespace) -> None:
    from lipschitz.presets import PRESETS

    width = max(len(name) for name in PRESETS)
    for name, (description, _) in PRESETS.items():
        print(f"{name:{width}s}  {description}")


def cmd_bench(args: argparse.Namespace) -> None:
    if args.name == "projections":
        from lipschitz.benchmarks.projections import main as bench_main
    elif args.name == "profile":
        from lipschitz.benchmarks.profile import main as bench_main
    elif args.name == "vit_step":
        from lipschitz.benchmarks.vit_step import main as bench_main
    else:
        from lipschitz.benchmarks.throughput import main as bench_main
    bench_main(args.args)


def _run_commands(commands) -> None:
    """train, sample, certify, robustness: the commands on one run directory."""
    p = commands.add_parser("train", help="train a preset into a run directory")
    p.add_argument("preset", help="a preset name (see `lipschitz presets`)")
    p.add_argument("--out", required=True, type=_path, help="run directory")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--data-dir", default=None, help="folder laid out like shared/data")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("sample", help="sample text from a trained run")
    p.add_argument("dir")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature of the run's trained probabilities "
                   "softmax(train_temperature·logits); 0: greedy")  # fmt: skip
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--data-dir", default=None, help="where gpt2_bpe/ is (GPT-2 token runs)")
    p.set_defaults(func=cmd_sample)

    p = commands.add_parser("certify", help="certify a trained run's Lipschitz bound")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rule", choices=["certified", "paper"], default="certified",
                   help="certified: a valid upper bound (default); paper: the paper's App. B "
                   "formula, to compare with published numbers")  # fmt: skip
    p.set_defaults(func=cmd_certify)

    p = commands.add_parser("robustness", help="certified and PGD-l2 robustness of a classifier")
    p.add_argument("dir")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n", type=int, default=1000, help="number of test images")
    p.add_argument("--eps", type=float, nargs="+", default=[36 / 255, 72 / 255, 108 / 255])
    p.add_argument("--pgd-steps", type=int, default=50)
    p.add_argument("--attack-n", type=int, default=None,
                   help="attack only the first N of the test images (default: all)")  # fmt: skip
    p.add_argument("--autoattack", action="store_true",
                   help="also run AutoAttack-l2 (needs the autoattack extra)")  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_robustness)


def _tool_commands(commands) -> None:
    """prepare, sweep, plot, presets, bench: data, grids of runs, figures, benchmarks."""
    p = commands.add_parser("prepare", help="tokenize text files into token shards")
    p.add_argument("files", nargs="+", metavar="TEXT_FILE", help="one document per file")
    p.add_argument(
        "--out", required=True, type=_path, help="folder for the *_train_*/*_val_*.bin shards"
    )
    p.add_argument("--tokenizer", default="gpt2", choices=["gpt2"])
    p.add_argument("--val-fraction", type=float, default=0.1, help="the last fraction of every "
                   "document's tokens that is validation")  # fmt: skip
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    p.add_argument("--name", default="tokens", help="shard file prefix: NAME_train_000000.bin")
    p.add_argument("--data-dir", default=None, help="where gpt2_bpe/ is (else downloaded)")
    p.set_defaults(func=cmd_prepare)

    p = commands.add_parser("sweep", help="run a grid of trainings from a TOML spec")
    p.add_argument("spec", help="TOML file: preset, [set], [[grid]] (see lipschitz.sweep)")
    p.add_argument(
        "--out", default=None, type=_path, help="sweep directory (default: the spec's out)"
    )
    p.add_argument("--data-dir", default=None)
    p.add_argument("--parallel", type=int, default=None, help="runs at a time")
    p.set_defaults(func=cmd_sweep)

    p = commands.add_parser("plot", help="bound-versus-accuracy scatter and Pareto frontiers")
    p.add_argument("runs", nargs="+", help="run directories or folders of runs")
    p.add_argument("--x", default="lipschitz_bound", help="a final.json or config.json key")
    p.add_argument("--y", default="val_acc")
    p.add_argument(
        "--out", default="pareto.png", type=_path, help="PNG path; the table goes to .md"
    )
    p.add_argument("--linear-x", action="store_true", help="linear instead of log x axis")
    p.add_argument("--lower-y", action="store_true", help="lower y is better (e.g. val_loss)")
    p.set_defaults(func=cmd_plot)

    p = commands.add_parser("presets", help="list the presets")
    p.set_defaults(func=cmd_presets)

    p = commands.add_parser(
        "bench", help="run a benchmark (projections, throughput, profile, vit_step)"
    )
    p.add_argument("name", choices=["projections", "throughput", "profile", "vit_step"])
    p.add_argument("args", nargs=argparse.REMAINDER, help="options for the benchmark")
    p.set_defaults(func=cmd_bench)


def _path(text: str) -> str:
    """argparse type of --out: a non-empty path (an empty one would write into the cwd)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a file or folder, got an empty string")
    return text


def _seed(text: str) -> int:
    """argparse type of --seed: an int that torch's generator takes (as the config's seed)."""
    from lipschitz.config import MAX_SEED

    seed = int(text)
    if not 0 <= seed < MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {seed}")
    return seed


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="lipschitz", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _run_commands(commands)
    _tool_commands(commands)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except BrokenPipeError:  # the reader went away (`lipschitz certify RUN | head -1`): quietly
        try:  # no second error when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file (captured)
            pass
        sys.exit(141)  # as a process killed by SIGPIPE
    except KeyboardInterrupt:
        print(f"lipschitz {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if not _expected(err):
            raise
        print(f"lipschitz {args.command}: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)


def _one_line(err: BaseException) -> str:
    """The error's message on one line (OSError: 'what: path')."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: {err.filename}"
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) < 2000 else text[:2000] + " …"


if __name__ == "__main__":
    main()
