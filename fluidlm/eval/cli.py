"""`fluidlm eval`: long-context perplexity of a checkpoint (docs/design.md §7).

    fluidlm eval --checkpoint runs/demo --data data/default/val/manifest.json \\
        --context-lengths 256,1024,4096 --stream --out runs/demo/eval/results.json
    torchrun --nproc-per-node=2 -m fluidlm.eval --checkpoint ... (same arguments; documents split across ranks)

--checkpoint: a step_* folder, a checkpoints/ folder, a run folder (its newest complete
checkpoint) or a universal checkpoint. --data: a shard manifest (or its folder) from `fluidlm
data prepare` (whole documents are rebuilt from the packed samples), or raw text files, folders
and .jsonl files, tokenised with the training tokenizer. The data's tokenizer must be the one the
model was trained with (sha256 checked).

The --out folder is checked writable before any work; the checkpoint is verified (checksums) and
read at once (a running training's rotation may delete it: a run folder is then read again at its
newest checkpoint). Ctrl-C exits 130 with one line; results are written atomically (never half).
Writes the JSON (--out), a PNG beside it (perplexity vs context; loss vs position per length),
prints a table, and logs to MLflow (an eval run, child of the training run). Exit code 2 on bad
input (missing checkpoint, tokenizer mismatch, a context length the model cannot run), with a
message and no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

EXIT_BAD_INPUT = 2


def _lengths(text: str) -> list[int]:
    out = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        mult = 1
        if item[-1] in "kK":
            item, mult = item[:-1], 1024
        try:
            out.append(int(item) * mult)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--context-lengths: {item!r} is not an integer (e.g. 512,2048,8k)") from None
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="step_* folder, checkpoints/ folder, run folder or universal checkpoint. "
                                                        "DeepSpeed's files are pickles: load only checkpoints you trust")
    p.add_argument("--data", nargs="+", default=None,
                   help="a shard manifest.json (or its folder), e.g. data/default/val/manifest.json; or raw text "
                        "files/folders/.jsonl ({\"text\": ...}) tokenised with the training tokenizer. --task mqar: "
                        "an MQAR folder (its test-* splits) or split folders (default: the training data.dir); "
                        "--task passkey: not used")
    p.add_argument("--task", choices=["perplexity", "mqar", "passkey"], default="perplexity",
                   help="perplexity (default); mqar: recall accuracy per (sequence length, pairs) of the test splits "
                        "in --data; passkey: retrieval per context length × needle depth (fluidlm/eval/tasks.py)")
    p.add_argument("--context-lengths", type=_lengths, default=None,
                   help="comma list, e.g. 512,2048,8192 or 1k,4k (required except for --task mqar, where it keeps "
                        "only the test splits of these sequence lengths)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="--task passkey: needle depths in [0, 1]")
    p.add_argument("--passkey-trials", type=int, default=5, help="--task passkey: keys per (length, depth)")
    p.add_argument("--seed", type=int, default=0, help="--task passkey: seed of the keys")
    p.add_argument("--out", default=None, help="results JSON (default: <run folder>/eval/results.json); the PNG goes beside it")
    p.add_argument("--mode", choices=["disjoint", "sliding"], default="disjoint",
                   help="disjoint: consecutive windows of C tokens, each from an empty state; sliding: windows every "
                        "--stride tokens, each scoring only tokens no earlier window scored")
    p.add_argument("--stride", type=int, default=None, help="sliding stride in tokens (default: C/2 for each length C)")
    p.add_argument("--stream", action="store_true",
                   help="causal DA: feed each window through forward_stream in --stream-chunk pieces (constant memory; "
                        "allows lengths beyond model.max_seq_len)")
    p.add_argument("--stream-chunk", type=int, default=2048, help="tokens per forward_stream call (with --stream)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallelism under torchrun: each group of this many ranks "
                                                      "holds one copy of the model split by heads, FFN units and "
                                                      "vocabulary (megatron-core layers); must divide the processes")
    p.add_argument("--cp", type=int, default=1, help="context parallelism under torchrun (DA): every packed row of "
                                                      "windows is split across this many ranks, which pass the DA state "
                                                      "between them; must divide the number of processes")
    p.add_argument("--mask-rate", type=float, default=None,
                   help="masked-LM (bidirectional) checkpoints: fraction of each document's non-special tokens masked and "
                        "scored (default: the training's train.mlm.rate)")
    p.add_argument("--mask-seed", type=int, default=0, help="masked-LM checkpoints: seed of the fixed evaluation masks "
                                                            "(the same positions at every context length)")
    p.add_argument("--max-docs", type=int, default=None, help="score at most this many documents (pieces; in data order)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop adding documents before this many tokens")
    p.add_argument("--max-doc-tokens", type=int, default=None, help="split documents longer than N tokens into consecutive pieces of N tokens, "
                        "each scored as its own document (more, shorter documents from a few long ones)")
    p.add_argument("--min-doc-tokens", type=int, default=0, help="skip documents (pieces) shorter than N tokens, e.g. the longest "
                                                                        "context length + 1, so every length fills its window")
    p.add_argument("--batch-tokens", type=int, default=16384,
                   help="tokens per forward pass (short windows are packed; a window longer than this runs alone)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model for raw text (default: the training data's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: cores / local processes)")
    p.add_argument("--no-mlflow", dest="mlflow", action="store_false", help="do not log to MLflow")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow URI (default: the training config's, $MLFLOW_TRACKING_URI, else sqlite:///<run parent>/mlflow.db)")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="long-context perplexity of a checkpoint at several context lengths",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


# --- MLflow ------------------------------------------------------------------------------------------

def log_mlflow(report: dict, files: list[Path], uri: str, info) -> str | None:
    """Log the evaluation to MLflow: an eval run in the training run's experiment, tagged with
    `mlflow.parentRunId` and `fluidlm.train_run_id` (nested under the training run in the UI), plus
    `eval/perplexity_ctx<C>` on the training run itself at the checkpoint's step. Any failure warns
    and returns None; evaluation results never depend on MLflow."""
    stage = "connecting"
    try:
        if uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        train_run = None
        if info.mlflow_run_id:
            stage = "finding the training run"
            try:
                train_run = client.get_run(info.mlflow_run_id)
            except Exception:
                train_run = None
        if train_run is not None:
            exp_id = train_run.info.experiment_id
        else:
            stage = "finding the experiment"
            name = info.config.get("logging", {}).get("experiment", "fluidlm")
            exp = client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
        tags = {"fluidlm.kind": "eval", "fluidlm.checkpoint": str(info.path.resolve()), "fluidlm.step": str(info.step)}
        if train_run is not None:
            tags.update({"mlflow.parentRunId": info.mlflow_run_id, "fluidlm.train_run_id": info.mlflow_run_id})
        run_name = f"eval-{info.path.name}-{report['mode']}{'-stream' if report['stream'] else ''}"
        stage = "creating the eval run"
        run = client.create_run(exp_id, run_name=run_name, tags=tags)
        rid = run.info.run_id
        params = {"mode": report["mode"], "stride": report["stride"], "stream": report["stream"],
                  "objective": report.get("objective", "causal_lm"),
                  "context_lengths": ",".join(str(c) for c in report["context_lengths"]),
                  "checkpoint": str(info.path), "step": info.step, "data": report["data"]["source"][:400],
                  "documents": report["data"]["documents"], "tokens": report["data"]["tokens"],
                  "world_size": report["world_size"], "dtype": report["dtype"]}
        now = int(time.time() * 1000)
        metrics = []
        for r in report["results"]:
            c = r["context_length"]
            metrics += [Metric(f"eval/perplexity_ctx{c}", r["perplexity"], now, info.step),
                        Metric(f"eval/loss_ctx{c}", r["loss"], now, info.step),
                        Metric("eval/perplexity_vs_context", r["perplexity"], now, c),
                        Metric("eval/loss_vs_context", r["loss"], now, c)]
            for b in r["loss_by_position"]:
                if b["tokens"]:
                    metrics.append(Metric(f"eval/loss_by_position_ctx{c}", b["loss"], now, b["end"]))
        stage = "logging to the eval run"
        client.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()])
        for i in range(0, len(metrics), 500):
            client.log_batch(rid, metrics=metrics[i:i + 500])
        for f in files:
            if f.exists():
                client.log_artifact(rid, str(f), "eval")
        client.set_terminated(rid, "FINISHED")
        if train_run is not None:
            stage = "logging to the training run"
            summary = [m for m in metrics if m.key.startswith(("eval/perplexity_ctx", "eval/loss_ctx"))]
            client.log_batch(info.mlflow_run_id, metrics=summary)
        return rid
    except ImportError as exc:  # MLflow is optional (pip install 'fluidlm[mlflow]')
        print(f"WARNING: MLflow is not available ({exc}); the results are in the JSON file (--no-mlflow silences this)",
              file=sys.stderr, flush=True)
        return None
    except Exception as exc:  # never let tracking fail an evaluation
        print(f"WARNING: MLflow logging failed while {stage} at {uri} ({type(exc).__name__}: {str(exc)[:300]}); "
              "the results are in the JSON file", file=sys.stderr, flush=True)
        return None


# --- the command -------------------------------------------------------------------------------------

def run_task(args: argparse.Namespace) -> int:
    """--task mqar | passkey on one process (fluidlm/eval/tasks.py): JSON (+ PNG for passkey) and a table."""
    import torch

    from fluidlm.eval import EvalError
    from fluidlm.eval import tasks
    from fluidlm.eval.inputs import _candidate_data_dirs, load_model, read_pinned, training_tokenizer
    from fluidlm.eval.perplexity import EvalSpec, check_context_lengths

    t0 = time.perf_counter()
    try:
        info, state = read_pinned(args.checkpoint)  # verified against its checksums, pinned against rotation
        path = info.path
        model_cfg = info.config["model"]
        if model_cfg.get("direction", "causal") != "causal":
            raise EvalError(f"--task {args.task} reads the answer a causal model writes after the prompt; this checkpoint "
                            "is bidirectional (it needs the answer in its input to score it); use a causal checkpoint")
        if args.tp > 1 or args.cp > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise EvalError(f"--task {args.task} runs on one process (no torchrun, --tp or --cp)")
        stream = args.stream or args.task == "passkey" and model_cfg["attention"] == "da"  # DA streams the haystack
        spec = EvalSpec(context_lengths=[], stream=stream, stream_chunk=args.stream_chunk)
        if args.task == "mqar":
            inputs = args.data or [str(d) for d in _candidate_data_dirs(info.config, info.run_dir) if d.is_dir()][:1]
            if not inputs:
                raise EvalError(f"--task mqar: give --data (the training data {info.config['data']['dir']!r} is not found)")
            splits = [tasks.read_task_split(m, "mqar", int(model_cfg["vocab_size"])) for m in tasks.mqar_splits(inputs)]
            if args.context_lengths:
                splits = [s for s in splits if s[0]["seq_len"] in args.context_lengths]
            spec.context_lengths = sorted({s[0]["seq_len"] for s in splits})
        else:
            if not args.context_lengths:
                raise EvalError("--task passkey needs --context-lengths (e.g. 1k,4k,16k,64k)")
            depths = [float(d) for d in args.depths.split(",") if d.strip()]
            if not depths or any(not 0 <= d <= 1 for d in depths) or args.passkey_trials < 1:
                raise EvalError(f"--depths must be numbers in [0, 1] and --passkey-trials ≥ 1 (got {args.depths!r}, "
                                f"{args.passkey_trials})")
            spec.context_lengths = list(args.context_lengths)
        check_context_lengths(spec, model_cfg)  # e.g. softmax beyond max_seq_len, DA beyond it without --stream
        if args.task == "passkey":
            from fluidlm.data.synthetic import PasskeyText
            from fluidlm.data.tokenizer import load_tokenizer

            tok_path = Path(args.tokenizer) if args.tokenizer else training_tokenizer(info)[1]
            if tok_path is None or not tok_path.is_file():
                raise EvalError("--task passkey needs the training tokenizer: pass --tokenizer PATH/tokenizer.model")
            text = PasskeyText(load_tokenizer(tok_path))
        if args.threads:
            torch.set_num_threads(args.threads)
        model = load_model(info, torch.device("cpu"), state)
        del state
    except (EvalError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT

    train_len = int(info.config["data"]["seq_len"])
    print(f"eval --task {args.task} {path} (step {info.step}, {model_cfg['attention']}, stream {stream})", flush=True)
    report = {"format": "fluidlm-eval-task", "format_version": 1, "task": args.task, "checkpoint": str(path),
              "step": info.step, "model": {"attention": model_cfg["attention"], "max_seq_len": model_cfg["max_seq_len"],
                                           "parameters": sum(p.numel() for p in model.parameters())},
              "train_seq_len": train_len, "stream": stream, "stream_chunk": args.stream_chunk if stream else None}
    if args.task == "mqar":
        report["results"] = tasks.score_mqar(model, splits, stream, args.stream_chunk, args.batch_tokens, args.progress)
        table = tasks.format_mqar(report["results"], train_len)
    else:
        report.update(depths=depths, trials=args.passkey_trials, seed=args.seed, candidates=tasks.RANK_CANDIDATES)
        report["results"] = tasks.score_passkey(model, text, spec.context_lengths, depths, args.passkey_trials,
                                                args.seed, args.stream_chunk, args.progress)
        table = tasks.format_passkey(report["results"]) + "\n" + tasks.format_passkey(report["results"], "mean_rank")
    report["seconds"] = time.perf_counter() - t0
    out = Path(args.out) if args.out else (info.run_dir or Path(".")) / "eval" / f"{args.task}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table, flush=True)
    if args.task == "passkey" and args.plot:
        title = f"passkey: {path} ({model_cfg['attention']}, trained at {train_len} tokens, {args.passkey_trials} keys/cell)"
        print(f"heatmap: {tasks.plot_passkey(report['results'], out.with_suffix('.png'), title)}")
    print(f"results: {out}", flush=True)
    return 0


def write_atomic(path: Path, write) -> Path:
    """write(tmp) to a temporary name beside `path` (same suffix), then rename: an interrupted write
    leaves no partial `path` behind."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def run(args: argparse.Namespace) -> int:
    """The command; Ctrl-C exits 130 with one line (nothing half-written is left under --out)."""
    from fluidlm.train.distributed import die_with_parent

    die_with_parent()
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C): evaluation stopped, no results written", file=sys.stderr, flush=True)
        return 130


def _check_out(out: Path) -> None:
    from fluidlm.eval import EvalError
    from fluidlm.train.checks import check_writable
    from fluidlm.train.config import ConfigError

    try:
        check_writable(out.parent, f"--out {out}: its folder {out.parent}")
    except ConfigError as exc:
        raise EvalError(str(exc)) from None


def _run(args: argparse.Namespace) -> int:
    if args.task != "perplexity":
        return run_task(args)
    if args.context_lengths is None or args.data is None:
        print("error: --task perplexity needs --data and --context-lengths", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    from fluidlm.eval import EvalError
    from fluidlm.eval.inputs import load_documents, load_model, read_pinned
    from fluidlm.eval.perplexity import EvalSpec, apply_objective, check_context_lengths, evaluate
    from fluidlm.eval.report import format_table, plot

    rank = int(os.environ.get("RANK", "0"))
    main = rank == 0
    t0 = time.perf_counter()
    try:
        spec = EvalSpec(context_lengths=list(args.context_lengths), mode=args.mode, stride=args.stride, stream=args.stream,
                        stream_chunk=args.stream_chunk, batch_tokens=args.batch_tokens, dtype=args.dtype, cp=args.cp, tp=args.tp,
                        mask_seed=args.mask_seed)
        if args.stream_chunk < 1 or args.batch_tokens < 1:
            raise EvalError("--stream-chunk and --batch-tokens must be positive")
        if args.out and main:
            _check_out(Path(args.out))
        info, state = read_pinned(args.checkpoint)
        path = info.path
        out = Path(args.out) if args.out else (info.run_dir or Path(".")) / "eval" / "results.json"
        if main:
            _check_out(out)
        apply_objective(spec, info.config, args.mask_rate)  # masked_lm → masked-token perplexity; refuses leaked models
        if args.mask_rate is not None and spec.masking is None:
            raise EvalError("--mask-rate applies to masked-LM checkpoints only; this one is a causal LM")
        check_context_lengths(spec, info.config["model"])
        docs, data = load_documents(args.data, info, tokenizer=args.tokenizer, max_docs=args.max_docs,
                                    max_tokens=args.max_tokens, min_doc_tokens=args.min_doc_tokens,
                                    max_doc_tokens=args.max_doc_tokens, quiet=not main)
        from fluidlm.train.distributed import init_process_group

        rank, world, device, created = init_process_group(args.device, threads=args.threads)
        main = rank == 0
        model = load_model(info, device, state)
        del state
        if args.cp > 1 and (args.stream or world % args.cp or info.config["model"]["attention"] != "da"):
            raise EvalError(f"--cp {args.cp} needs a DA model, no --stream, and a number of processes it divides "
                            f"(got attention={info.config['model']['attention']!r}, stream={args.stream}, world {world})")
        if args.tp > 1:
            if args.cp > 1:
                raise EvalError("--tp and --cp do not combine in fluidlm eval yet; use one of them")
            from fluidlm.model.config import ModelConfig
            from fluidlm.parallel.parallelize import tensor_parallel
            from fluidlm.parallel.topology import Layout, init_model_parallel

            ModelConfig.model_validate(info.config["model"]).check_tensor_parallel(args.tp)
            init_model_parallel(Layout.from_world(world, tp=args.tp))
            model = tensor_parallel(model).eval()
    except (EvalError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT

    model_cfg = info.config["model"]
    train_len = int(info.config["data"]["seq_len"])
    if main:
        print(f"eval {path} (step {info.step}, {model_cfg['attention']}, weights: {info.source}) on {data.documents} "
              f"documents / {data.tokens:,} tokens from {data.source}; world {world}, {device}", flush=True)
    results = evaluate(model, docs, spec, rank=rank, world=world, device=device, progress=args.progress and main)
    report = {
        "format": "fluidlm-eval", "format_version": 1,
        "checkpoint": str(path), "step": info.step, "train_run_id": info.mlflow_run_id, "weights": info.source,
        "model": {"attention": model_cfg["attention"], "max_seq_len": model_cfg["max_seq_len"],
                  "parameters": sum(p.numel() for p in model.parameters())},
        "train_seq_len": train_len,
        "data": data.as_dict(),
        "mode": spec.mode, "stride": spec.stride if spec.mode == "sliding" else None,
        "stream": spec.stream, "stream_chunk": spec.stream_chunk if spec.stream else None,
        "context_lengths": spec.context_lengths,
        "objective": spec.objective,
        "masking": None if spec.masking is None else {
            "rate": spec.masking.rate, "seed": spec.mask_seed, "mask_id": spec.masking.mask_id,
            "special_ids": list(spec.masking.special_ids), "replacement": "every masked position → the mask token",
            "positions": "fixed per document (seeded by seed and document index): the same at every context length"},
        "world_size": world, "tp": spec.tp, "cp": spec.cp, "device": str(device), "dtype": spec.dtype,
        "results": [{**r, "beyond_training_length": r["context_length"] > train_len} for r in results],
    }
    code = 0
    if main:
        report["seconds"] = time.perf_counter() - t0
        report["mlflow_eval_run_id"] = None
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
        files = [out]
        if args.plot:
            try:
                files.append(write_atomic(out.with_suffix(".png"), lambda tmp: plot(report, tmp)))
            except Exception as exc:  # a plot is never worth failing the evaluation
                print(f"WARNING: plot failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        print(format_table(report), flush=True)
        if args.mlflow:
            from fluidlm.train.tracking import resolve_tracking_uri

            uri = args.tracking_uri or resolve_tracking_uri(info.config.get("logging", {}).get("tracking_uri"), info.run_dir)
            report["mlflow_eval_run_id"] = log_mlflow(report, files, uri, info)
            write_atomic(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
        print(f"results: {out}" + (f", {files[1]}" if len(files) > 1 else ""), flush=True)
    if world > 1 and created:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fluidlm.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
