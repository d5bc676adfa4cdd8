"""``fastclip`` command line: thin subcommands over the library.

    fastclip info            versions, device, every backend's usability (= python -m fastclip.info)
    fastclip demo            train a small CLIP on the built-in dataset under a compute budget and
                             evaluate it on held-out data (zero-shot, retrieval), on a CPU in minutes
    fastclip loss-demo       the contrastive loss on this machine: chunked vs materialised logits
    fastclip make-dataset    write the built-in captioned shapes dataset as webdataset shards
    fastclip filter          keep the top k% of a shard set by CLIP score; new shards + histogram
    fastclip train           train under a compute budget (--config run.yaml key=value ...)
    fastclip eval            evaluate a checkpoint on datasets (zero-shot, retrieval, linear probe); a table
    fastclip fit             fit power laws of error against compute to a results table; plot them
    fastclip plan            from a compute budget and a dataset size to the model and strategy to train
    fastclip sweep           train a grid (models x strategies x data x budgets x seeds) into one results table
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time


def demo(sizes=(2048, 4096, 8192), d=512, backends=("chunked", "reference")) -> None:
    import torch

    from .machine import measure_matmul_rate, peak_memory
    from .ops import clip_loss
    # The benchmarks' measurement (fastclip.machine), so that "x floor" means what it means there.
    print("measuring the dense matmul rate (5 to 30 s: the CPU warms up first) ...", flush=True)
    measured = measure_matmul_rate("cpu", torch.float32, d, effort="full")
    rate = measured["gflops"] * 1e9
    print(f"fastclip loss demo: fp32, D={d}, {torch.get_num_threads()} threads, "
          f"measured matmul rate {rate / 1e9:.0f} GFLOP/s ({measured['shape']}, best GEMM after "
          f"{measured['warmup_s']} s of warm-up)")
    print(f"{'N':>6} {'backend':>10} {'loss':>10} {'fwd+bwd s':>10} {'x floor':>8} {'GFLOP/s':>8} {'peak MB':>8}")
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
        b = torch.nn.functional.normalize(a + torch.randn(n, d, generator=g), dim=1)
        floor = 8 * n * n * d / rate
        values = {}
        for name in backends:
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            s = torch.tensor(14.3, requires_grad=True)

            def step():
                t = time.perf_counter()
                loss = clip_loss(x, y, s, backend=name)
                loss.backward()
                return loss.item(), time.perf_counter() - t
            peak, (loss, secs) = peak_memory(step)
            values[name] = (loss, x.grad)
            mb = f"{peak / 2**20:8.0f}" if peak is not None else "       -"
            print(f"{n:6d} {name:>10} {loss:10.5f} {secs:10.3f} {secs / floor:8.2f} "
                  f"{8 * n * n * d / secs / 1e9:8.1f} {mb}")
        if len(values) > 1:
            (l0, g0), (l1, g1) = values[backends[0]], values[backends[1]]
            err = (g0 - g1).abs().max().item() / g1.abs().max().item()
            print(f"{'':6} {backends[0]} vs {backends[1]}: |loss diff| {abs(l0 - l1):.2e}, "
                  f"max grad diff / max grad {err:.2e}")
    print("floor = 8*N^2*D FLOPs at the measured matmul rate; peak MB = RSS growth during fwd+bwd")


def _add_data_commands(sub) -> None:
    p = sub.add_parser("make-dataset", help="write the built-in captioned shapes dataset (webdataset shards)")
    p.add_argument("out", help="output directory (shards + meta.json)")
    p.add_argument("--samples", type=int, default=10000, help="number of image-text pairs")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--caption-noise", type=float, default=0.0,
                   help="fraction of captions corrupted or mismatched (0 = all captions correct)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--max-objects", type=int, default=2, choices=(1, 2), help="objects per scene (at most)")
    p.add_argument("--caption-detail", type=float, default=0.5,
                   help="probability that a caption says each object's size and the background (1 = always)")
    p = sub.add_parser("filter", help="score pairs with a fastclip model, keep the top k%%, write new shards")
    p.add_argument("shards", help="shard pattern, e.g. 'data/shard-{00000..00009}.tar', or a directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--top", type=float, default=40.0,
                   help="percentage of pairs to keep (the seed study: 20/40/60/80)")
    p.add_argument("--model", default="ViT-Ti-16", help="fastclip model name (fastclip.list_models())")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--checkpoint", default=None, help="trained weights (open_clip/fastclip state dict)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--backend", default="auto", choices=("auto", "dali", "pil"), help="data loader backend")
    p.add_argument("--threads", type=int, default=2, help="decoding threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--no-histogram", action="store_true")
    p.add_argument("--wrong-modes", default="convert", choices=("convert", "skip"),
                   help="grayscale/RGBA/CMYK/16-bit images: score them as RGB (default) or drop them")


def _run_data_command(args, parser) -> bool:
    """Run make-dataset / filter; False if ``args.cmd`` is not one of them."""
    import json
    # The library checks its arguments; a bad one ends here as a usage error (exit status 2), not
    # a traceback.  Its messages name the library's parameters (``num_samples`` for --samples).
    if args.cmd == "make-dataset":
        from .data.synthetic import make_shapes_dataset
        try:
            meta = make_shapes_dataset(args.out, args.samples, args.image_size, args.seed, args.caption_noise,
                                       args.samples_per_shard, args.max_objects, caption_detail=args.caption_detail)
        except ValueError as exc:
            parser.error(str(exc))
        print(f"wrote {meta['num_samples']} samples ({meta['num_corrupted']} corrupted captions) to "
              f"{meta['shards_path']} in {meta['seconds']:.1f} s")
        return True
    if args.cmd == "filter":
        from .eval.filter import filter_shards
        if not 0 < args.top <= 100:  # a percentage here, a fraction (keep) in the library
            parser.error(f"--top must be a percentage in (0, 100], got {args.top}")
        try:
            report = filter_shards(args.shards, args.out, keep=args.top / 100, model=args.model,
                                   image_size=args.image_size, checkpoint=args.checkpoint,
                                   batch_size=args.batch_size, backend=args.backend, num_threads=args.threads,
                                   device=args.device, samples_per_shard=args.samples_per_shard,
                                   histogram=not args.no_histogram, wrong_modes=args.wrong_modes)
        except ValueError as exc:
            parser.error(str(exc))
        print(json.dumps(report, indent=1))
        return True
    return False


def _add_train_command(sub) -> None:
    p = sub.add_parser("train", help="train a CLIP model under a compute budget (see fastclip.train)",
                       description="Train a CLIP model: a YAML/JSON config, then key=value overrides "
                                   "(e.g. optim.lr=1e-3 budget.gflops=2e6). Under torchrun it trains on every rank.")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.batch_size=512")
    p.add_argument("--config", default=None, help="YAML or JSON config file (default: all defaults)")
    p.add_argument("--resume", default=None, metavar="latest|PATH",
                   help="continue from the newest checkpoint in output_dir/checkpoints, or from a file")
    p.add_argument("--print-config", action="store_true", help="print the full config (every default) and exit")


def _config_or_exit(cls, args, parser):
    """``cls`` (TrainConfig, SweepConfig) from ``--config`` and the overrides; a bad config exits with
    its error before any work; with ``--print-config`` it is printed and None returned."""
    from .train import ConfigError
    try:
        cfg = cls.from_file(args.config, args.overrides) if args.config else cls.from_dict({}, args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return None
    return cfg


def _run_train(args, parser) -> int:
    from .train import CheckpointError, ConfigError, TrainConfig, train
    cfg = _config_or_exit(TrainConfig, args, parser)
    if cfg is None:
        return 0
    try:
        summary = train(cfg, resume=args.resume)
    except (ConfigError, CheckpointError) as exc:
        print(f"fastclip train: error: {exc}", file=sys.stderr)
        return 2
    used = summary["budget_used"]
    print(f"trained {summary['steps']} steps, {used['samples']} samples, {used['gflops']:.4g} GFLOPs in "
          f"{used['seconds']:.1f} s; checkpoint {summary['checkpoint']}")
    if summary.get("final_eval"):
        for k, v in summary["final_eval"].items():
            if isinstance(v, float) and not k.endswith("seconds"):
                print(f"  {k:40s} {v:.4f}")
    return 0


def _add_sweep_command(sub) -> None:
    p = sub.add_parser("sweep", help="train a grid of configurations on the built-in dataset into one results "
                                     "table (fastclip fit / plan --results read it)",
                       description="Run a sweep (fastclip.scaling.sweep): models x strategies x dataset sizes x "
                                   "caption noise x compute budgets x seeds, one after another; a rerun skips the "
                                   "finished configurations.")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. grid.seeds=[0,1] base.optim.lr=1e-3")
    p.add_argument("--config", default=None, help="YAML or JSON sweep config (--print-config shows every key)")
    p.add_argument("--print-config", action="store_true", help="print the full sweep config and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="check every configuration and list them with their planned steps; train nothing")
    p.add_argument("--preset", default=None, choices=("quality-vs-quantity", "model-vs-data", "strategies"),
                   help="a study of 'Scaling (Down) CLIP' on the built-in dataset, sized for a 2-core CPU "
                        "(fastclip.scaling.presets): its sweeps, then findings.md/.png with a verdict")
    p.add_argument("--out", default=None, help="with --preset: the output folder (default sweeps/<preset>)")
    p.add_argument("--worker", default=None, metavar="K/N",
                   help="run only the configurations at grid positions K modulo N, so that N processes started "
                        "at once share the sweep (default: torchrun's RANK/WORLD_SIZE, else all)")


def _run_sweep(args, parser) -> int:
    from .scaling.sweep import SweepConfig, check_runs, expand, run_sweep, sweep_state
    from .train import ConfigError
    worker = None
    if args.worker is not None:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", args.worker)
        if not m or not int(m.group(1)) < int(m.group(2)):
            parser.error(f"--worker must be K/N with 0 <= K < N (e.g. 0/2), got {args.worker!r}")
        worker = (int(m.group(1)), int(m.group(2)))
    if args.preset:
        from .scaling.presets import run_preset
        if args.config or args.overrides:
            parser.error("--preset runs its own sweeps: leave out --config and key=value overrides")
        try:
            report = run_preset(args.preset, args.out or os.path.join("sweeps", args.preset), worker=worker)
        except ValueError as exc:  # ConfigError included
            print(f"fastclip sweep: error: {exc}", file=sys.stderr)
            return 2
        print("\n".join(f"- {v}" for v in report["verdict"]))
        print(f"wrote {os.path.join(os.path.dirname(report['results']), 'findings.md')} and {report['results']}")
        return 0
    cfg = _config_or_exit(SweepConfig, args, parser)
    if cfg is None:
        return 0
    try:
        if args.dry_run:
            runs = expand(cfg)
            planned = check_runs(cfg, runs)
            for run in runs:
                print(f"{run.id}: {planned[run.id]} steps")
            print(f"{len(runs)} configurations -> {cfg.output_dir}")
            return 0
        run_sweep(cfg, worker=worker)
    except (ConfigError, ValueError) as exc:
        print(f"fastclip sweep: error: {exc}", file=sys.stderr)
        return 2
    return 1 if sweep_state(cfg.output_dir)["failed"] else 0


_EVAL_EPILOG = """examples:
  fastclip eval --checkpoint run/checkpoints/step-00001000.pt --dataset shapes=data/val \\
      --task zeroshot retrieval
  fastclip eval --model ViT-B-32 --checkpoint open_clip_vit_b_32.pt --dataset in1k='in1k/{0000..0063}.tar' \\
      --classnames in1k=imagenet_classes.json --task zeroshot linear_probe \\
      --train in1k='in1k-train/{0000..1023}.tar'
  fastclip eval --model ViT-B-32 --dataset shapes=data/val      (no checkpoint: random init, the chance level)

Results: OUT/<model>__<dataset>__<task>.json each, and OUT/results.csv + results.md over every JSON in OUT
(runs into one folder accumulate one table).  The data loader backend follows FASTCLIP_DATA_BACKEND."""


def _add_eval_command(sub) -> None:
    from .eval.suite import PRECISIONS, TASKS
    p = sub.add_parser("eval", help="evaluate a checkpoint on datasets: zero-shot, retrieval, linear probe; "
                                    "JSON per result + a results table",
                       description="Evaluate one model on webdataset shards with every --task on every "
                                   "--dataset (fastclip.eval.run_suite).", epilog=_EVAL_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, metavar="NAME|CONFIG.json",
                   help="a model name (fastclip.list_models()) or an open_clip model config JSON; not needed "
                        "with a fastclip training checkpoint (its config is inside it)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="weights: a fastclip training checkpoint (checkpoints/step-*.pt) or an open_clip "
                        "state dict (.pt, .bin; .safetensors with the safetensors package). Without: random "
                        "init")
    p.add_argument("--name", default=None,
                   help="the model's name in results and file names (default: model + checkpoint file name, "
                        "or <model>-random-init)")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="input resolution (default: the checkpoint's, else the model config's)")
    p.add_argument("--dataset", action="append", required=True, metavar="NAME=SHARDS",
                   help="an evaluation set: a name for the results, '=', its shards (brace pattern, "
                        "directory or a.tar::b.tar); repeat for several")
    p.add_argument("--task", nargs="+", default=["zeroshot"], choices=TASKS, metavar="TASK",
                   help=f"what to run on every dataset: {', '.join(TASKS)} (default: zeroshot)")
    p.add_argument("--train", action="append", default=[], metavar="NAME=SHARDS",
                   help="linear_probe: the training split of dataset NAME (one per dataset)")
    p.add_argument("--classnames", action="append", default=[], metavar="[NAME=]FILE.json|builtin",
                   help='zero-shot class names and prompts: a JSON file {"classnames": [...], "templates": '
                        '["a photo of a {}.", ...]}, or builtin (the built-in shapes dataset\'s); NAME= for '
                        "one dataset. Default: the meta.json beside the shards (the built-in dataset has "
                        "one)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="images per batch (default: 256)")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="decoding threads (default: 2)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--max-batches", type=int, default=None, metavar="N",
                   help="read at most this many batches of each set (a quick check; the JSON records it)")
    p.add_argument("--out", default="eval-results", metavar="DIR",
                   help="output folder (default: eval-results)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="linear_probe: keep the extracted features here for reruns")


def _run_eval(args, parser) -> int:
    from .eval.suite import headline, run_suite
    try:
        results = run_suite(args.dataset, args.task, model=args.model, checkpoint=args.checkpoint,
                            image_size=args.image_size, name=args.name, train=args.train,
                            classnames=args.classnames or None, out_dir=args.out, batch_size=args.batch_size,
                            num_threads=args.workers, device=args.device, precision=args.precision,
                            max_batches=args.max_batches, cache_dir=args.cache_dir, progress=True)
    except (ValueError, OSError) as exc:  # bad input, named by the library: a usage error (status 2)
        parser.error(f"eval: {exc}")
    for r in results:
        print(f"{headline(r)} -> {r['path']}")
    print(f"table of every result in {args.out}: results.csv, results.md")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastclip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, device and backend usability")
    from .train.demo import add_arguments as add_demo_arguments
    add_demo_arguments(sub.add_parser("demo", help="train a small CLIP on the built-in dataset and evaluate it "
                                                   "(zero-shot, retrieval) on held-out data"))
    p = sub.add_parser("loss-demo", help="run the contrastive loss on this machine and print timings")
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192], help="batch sizes N")
    p.add_argument("--dim", type=int, default=512, help="feature dimension D")
    p.add_argument("--backends", nargs="+", default=["chunked", "reference"])
    _add_data_commands(sub)
    _add_train_command(sub)
    _add_sweep_command(sub)
    _add_eval_command(sub)
    from .scaling.commands import add_fit_arguments, add_plan_arguments
    add_fit_arguments(sub.add_parser("fit", help="fit power laws of error against compute to a results table "
                                                 "(the scaling-law study's CSV or a sweep's); plot them"))
    add_plan_arguments(sub.add_parser("plan", help="recommend the model and strategy for a compute budget, with "
                                                   "the predicted error, and print the training command"))
    args = parser.parse_args(argv)
    if args.cmd == "train":
        return _run_train(args, parser)
    if args.cmd == "sweep":
        return _run_sweep(args, parser)
    if args.cmd == "eval":
        return _run_eval(args, parser)
    if args.cmd in ("fit", "plan"):
        from .scaling.commands import run_fit, run_plan
        try:
            (run_fit if args.cmd == "fit" else run_plan)(args)
        except (ValueError, FileNotFoundError) as exc:
            parser.error(f"{args.cmd}: {exc}")
        return 0
    if _run_data_command(args, parser):
        return 0
    if args.cmd == "info":
        from .info import main as info_main
        info_main()
    elif args.cmd == "demo":
        from .train.demo import run_demo
        run_demo(args.out, args.budget_gflops, args.overrides)
    elif args.cmd == "loss-demo":
        if any(n < 1 for n in args.sizes) or args.dim < 1:
            parser.error("--sizes and --dim must be positive")
        demo(tuple(args.sizes), args.dim, tuple(args.backends))
    return 0


if __name__ == "__main__":
    sys.exit(main())
