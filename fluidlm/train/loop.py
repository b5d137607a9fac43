"""The training loop, top to bottom:

    init process group → seed → model → DeepSpeed engine → loader → (resume) → MLflow →
    for each step: grad_accum × (batch → forward → [last: NaN check] → backward → step) → log → save
                   (pipeline stages: one engine.train_batch runs the grad_accum micro-batches, 1F1B)
    → final save → close

Stops cleanly: at train.steps, at train.stop_at, or on SIGTERM/SIGINT (finish the current step,
save, exit 0). A NaN/inf loss stops the run before its gradients touch the weights, saves the
last good step (exit code 3). So does a non-finite gradient norm: the optimizer step is not applied
(DeepSpeed's ZeRO and bf16 optimizers skip it; with plain fp32 at ZeRO stage 0, `guard_optimizer_step`
gives the optimizer the same check), and the loop sees `engine.was_step_applied()` false. With pipeline
stages (DeepSpeed's train_batch runs forward, backward and step in one call) the same skip keeps the
weights of the last good step, which is then saved; a non-finite loss whose step was applied anyway
(finite gradients) stops without saving. All ranks agree on when to stop: the stop flag and the loss
are all-reduced together once per step (before the step's last backward). A checkpoint that cannot be written (full disk) stops the
run with CheckpointSaveError (exit code 4, see fluidlm/train/checkpoint.py).
"""

from __future__ import annotations

import functools
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fluidlm.train import checkpoint as ckpt
from fluidlm.train.checkpoint import CheckpointSaveError
from fluidlm.train.checkpoint_read import CheckpointError, is_universal
from fluidlm.train.batches import Objective, batch_to_inputs, flops_per_token, pipeline_batches
from fluidlm.train.config import Config, config_diff
from fluidlm.train.deepspeed_setup import build_engine, build_model, use_bf16
from fluidlm.train.distributed import init_distributed, seed_everything
from fluidlm.train.tracking import Tracker
from fluidlm.train.universal import load_into_engine

EXIT_OK, EXIT_NAN = 0, 3


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits. A second Ctrl-C
    kills at once; further SIGTERMs are ignored (the save is already coming)."""

    def __init__(self):
        self.signal: str | None = None
        self._previous = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = self.signal or signal.Signals(signum).name
        # A second Ctrl-C kills at once; repeated SIGTERMs are ignored: under Slurm every rank gets
        # one from Slurm and one forwarded by torchrun, and the second must not abort the save.
        if signum == signal.SIGINT:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Progress:
    step: int = 0          # optimizer steps done
    tokens: int = 0        # training tokens seen (all ranks)
    mlflow_run_id: str | None = None


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB → MiB (process peak RSS)


def guard_optimizer_step(engine) -> None:
    """Make the optimizer skip a step whose gradients are not finite, before it is applied.

    DeepSpeed's ZeRO (1-3) and bf16 optimizers already do (they set `optimizer.overflow`); its plain
    fp32 optimizer at ZeRO stage 0 applies whatever it gets (gradient clipping turns an inf into NaN
    weights). For that one, wrap `step`: the gradient norm of every rank's parameters (TP slices,
    pipeline stages) is summed over the world; if it is not finite the step is skipped and
    `optimizer.overflow` set, which DeepSpeed's engine reads: no LR-schedule step, and
    `engine.was_step_applied()` is false (flat engine and pipeline engine alike)."""
    optimizer = engine.optimizer
    if optimizer is None or hasattr(optimizer, "overflow"):
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    apply_step = optimizer.step

    @functools.wraps(apply_step)  # keeps the LR scheduler's marker on the step (no "step overridden" warning)
    def checked_step(*args, **kwargs):
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=params[0].device)
        norm = norm.detach().to(torch.float64).reshape(1)
        dist.all_reduce(norm)  # one decision for every rank
        optimizer.overflow = not math.isfinite(norm.item())
        if optimizer.overflow:
            return None
        return apply_step(*args, **kwargs)

    optimizer.overflow = False
    optimizer.step = checked_step


def train(config: Config, resume_from=None) -> int:
    """Run (or continue) training. `resume_from`: a complete checkpoint folder or None.
    Returns the exit code. Works in a world of one or under torchrun."""
    from fluidlm.data.loader import ShardLoader

    dist_info = init_distributed(config)
    world, main = dist_info.world_size, dist_info.is_main
    t = config.train
    if main:  # what killed saves and deletions left (every rank has resolved its checkpoint by now)
        ckpt.clean_up(config.checkpoint_dir, spare=resume_from)
    dist.barrier()

    model, num_params = build_model(config, dist_info)  # same seed everywhere: identical weights
    engine = build_engine(config, model, dist_info)
    guard_optimizer_step(engine)
    # Dropout differs per data-parallel rank, reproducibly (TP ranks share their replicated activations).
    layout, dp_rank = dist_info.layout, dist_info.dp_rank
    pipeline = layout.pp > 1
    seed_everything(t.seed + 1000003 * dp_rank)
    objective = Objective(config, dp_rank)  # causal_lm or masked_lm (masks seeded by seed, step, dp rank, micro-batch)

    loader = ShardLoader(config.train_sources(), dp_rank=dp_rank, dp_size=layout.dp, micro_batch_size=t.micro_batch_size,
                         seed=t.seed, num_workers=config.data.num_workers, lanes=config.data.lanes,
                         window=config.data.window, vocab_size=config.model.vocab_size)
    val_batches = None
    if t.eval_every:  # the fixed validation slice, this rank's share (fluidlm/train/validation.py)
        from fluidlm.train.validation import validate, validation_batches

        val_batches = validation_batches(config.manifest_path(config.data.val_split), t.eval_tokens, t.micro_batch_size,
                                         dp_rank, layout.dp, group=t.grad_accum if pipeline else 1,
                                         vocab_limit=config.model.vocab_size)
    progress, rank_state = Progress(), None
    if resume_from is not None and is_universal(resume_from):  # a layout change (fluidlm checkpoint convert)
        meta = load_into_engine(engine, resume_from, config.to_dict()["model"], pipeline)
        progress = Progress(step=meta["step"], tokens=meta["tokens"], mlflow_run_id=meta.get("mlflow_run_id"))
        per_batch = layout.dp * t.micro_batch_size
        if meta["global_samples"] % per_batch:
            raise CheckpointError(f"{resume_from} stopped after {meta['global_samples']} samples, not a multiple of "
                                  f"this layout's dp × micro_batch_size = {per_batch}; choose a batch that divides it")
        loader.position = meta["global_samples"] // per_batch
        seed_everything(t.seed + 1000003 * dp_rank + 7919 * progress.step)  # RNG streams cannot carry across layouts
        if main:
            print(f"resuming from universal checkpoint {resume_from} (step {progress.step}, saved at world "
                  f"{meta['source']['world_size']} tp {meta['source']['tp']} pp {meta['source']['pp']})", flush=True)
    elif resume_from is not None:
        meta, rank_state = ckpt.load(engine, resume_from)
        progress = Progress(step=meta["step"], tokens=meta["tokens"], mlflow_run_id=meta.get("mlflow_run_id"))
        loader.load_state_dict(rank_state["loader"])
        changed = {k: v for k, v in config_diff(meta["config"], config.to_dict()).items()
                   if not k.startswith(("train.stop_at", "train.debug_nan_at_step", "logging.", "checkpoint."))}
        if main:
            print(f"resuming from {resume_from} (step {progress.step}, {progress.tokens:,} tokens)", flush=True)
            for key, (old, new) in changed.items():
                print(f"WARNING: {key} was {old!r} in the checkpoint, now {new!r}", file=sys.stderr, flush=True)

    batches = iter(loader)
    if rank_state is not None:
        ckpt.set_rng_state(rank_state["rng"])

    tracker = Tracker(config, enabled=main)
    tokens_per_step = t.micro_batch_size * t.grad_accum * layout.dp * config.data.seq_len
    progress.mlflow_run_id = tracker.start(
        progress.mlflow_run_id, progress.step if resume_from else None,
        {"run.world_size": world, "run.dp": layout.dp, "run.num_parameters": num_params, "run.tokens_per_step": tokens_per_step,
         "run.device": str(dist_info.device), "run.backend": dist_info.backend},
    ) if main else None
    if main:
        print(f"run folder {config.run_dir} | {num_params:,} parameters | world {world} = pp {layout.pp} × dp {layout.dp} × cp {layout.cp} × tp {layout.tp} ({dist_info.backend}, "
              f"{dist_info.device.type}) | {tokens_per_step:,} tokens/step | {tracker.destination()}", flush=True)

    flops_token = flops_per_token(config, num_params)
    last_step = t.stop_at or t.steps
    bar = None
    if main and config.logging.progress:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=progress.step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

    def save(step_progress: Progress, loader_state: dict, rng: dict, why: str) -> None:
        meta = {"step": step_progress.step, "tokens": step_progress.tokens,
                "mlflow_run_id": step_progress.mlflow_run_id, "zero_stage": config.parallel.zero_stage,
                "bf16": use_bf16(config),
                "tp": layout.tp, "pp": layout.pp, "cp": layout.cp,
                "config": config.to_dict()}
        try:
            ckpt.save(engine, config.checkpoint_dir, step_progress.step, meta, {"loader": loader_state, "rng": rng},
                      config.checkpoint.keep)
        except CheckpointSaveError as exc:
            raise CheckpointSaveError(f"{exc} [this was the save {why}; training stopped, the steps after the "
                                      f"newest checkpoint are not saved]") from None

    exit_code, status, last_saved = EXIT_OK, "FINISHED", progress.step if resume_from else None
    last_val = None
    engine.train()
    stop = StopRequest().install()
    try:
        while progress.step < last_step:
            # The state at this step boundary: a NaN in this step saves exactly this.
            boundary = (Progress(**vars(progress)), loader.state_dict(), ckpt.rng_state())
            step_start = time.perf_counter()
            loss_sum, stop_votes, nan, bad_grads = 0.0, 0.0, False, False
            micro_losses = []
            for micro in range(1 if pipeline else t.grad_accum):
                if pipeline:  # DeepSpeed runs the step: grad_accum micro-batches through the stages (1F1B)
                    loss = engine.train_batch(pipeline_batches(batches, dist_info.device, t.grad_accum, objective,
                                                               progress.step))
                else:
                    inputs, targets, cu_seqlens = batch_to_inputs(next(batches), dist_info.device, layout.cp,
                                                                  dist_info.cp_rank, objective, progress.step, micro)
                    loss = engine(inputs, targets, cu_seqlens)
                if t.debug_nan_at_step == progress.step + 1:
                    loss = loss * float("nan")
                micro_losses.append(loss.detach().double())
                if pipeline or micro == t.grad_accum - 1:
                    # Once per step, before the backward whose optimizer step applies: one small
                    # all-reduce of the summed loss and "did any rank get a stop signal", one host sync.
                    shared = torch.stack([torch.stack(micro_losses).sum(), torch.tensor(
                        1.0 if stop.signal else 0.0, dtype=torch.float64, device=loss.device)])
                    dist.all_reduce(shared)
                    total, stop_votes = shared.tolist()
                    if not math.isfinite(total):
                        nan = True
                        break
                    loss_sum = total / world * (t.grad_accum if pipeline else 1)
                if not pipeline:
                    engine.backward(loss)
                    engine.step()
            if not nan and not engine.was_step_applied():  # the optimizer skipped it: non-finite gradients
                nan = bad_grads = True
            if nan:
                good, loader_state, rng = boundary
                # The pipeline engine steps inside train_batch: unless that step was skipped (non-finite
                # gradients), its weights are already past `good`.
                applied = pipeline and engine.was_step_applied()
                if last_saved != good.step and good.step > 0 and not applied:
                    save(good, loader_state, rng, f"of the last good step {good.step}, before a non-finite step")
                    last_saved = good.step
                where = (f"the checkpoint of the last good step {good.step} is {config.checkpoint_dir / ckpt.tag_for(good.step)}"
                         if good.step > 0 else "no step completed, so there is no checkpoint")
                if main and bad_grads:
                    print(f"\nERROR: the gradient norm is not finite (NaN/inf) at step {good.step + 1} (the loss was "
                          f"finite, {loss_sum / t.grad_accum:.4g}); the optimizer step was not "
                          f"applied; {where}. Lower optim.lr, check optim.grad_clip and the data, then continue with "
                          "--resume auto.", file=sys.stderr, flush=True)
                elif main and applied:
                    print(f"\nERROR: the loss is not finite (NaN/inf) at step {good.step + 1}; with pipeline stages the "
                          f"step was already applied, so nothing was saved; resume from the newest checkpoint in "
                          f"{config.checkpoint_dir} with --resume auto after lowering optim.lr or checking the data.",
                          file=sys.stderr, flush=True)
                elif main:
                    print(f"\nERROR: the loss is not finite (NaN/inf) at step {good.step + 1}; training stopped before "
                          f"applying that step; {where}. Lower optim.lr or check the data, then continue with --resume auto.",
                          file=sys.stderr, flush=True)
                exit_code, status = EXIT_NAN, "FAILED"
                break

            progress.step += 1
            progress.tokens += tokens_per_step
            step_time = time.perf_counter() - step_start
            loss_value = loss_sum / t.grad_accum
            tokens_per_s = tokens_per_step / step_time
            val = {}
            if val_batches is not None and (progress.step % t.eval_every == 0 or progress.step == t.steps):
                val = validate(engine, val_batches, dist_info, Objective(config), t.grad_accum, t.eval_tasks)
            if progress.step % config.logging.every == 0 or progress.step == last_step or val:
                grad_norm = engine.get_global_grad_norm()
                metrics = {
                    "loss": loss_value,
                    "perplexity": math.exp(min(loss_value, 50.0)),
                    "lr": engine.get_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "tokens_per_s": tokens_per_s,
                    "mfu": flops_token * tokens_per_s / (t.peak_tflops * 1e12 * world),
                    "peak_mem_mib": peak_memory_mib(dist_info.device),
                    "tokens": progress.tokens,
                    "step_time_s": step_time,
                    **loader.mixture_metrics(),  # tokens drawn per data source (several sources only)
                    **val,  # val/loss, val/perplexity, val/tokens (+ val/<task>_acc) at validation steps
                }
                tracker.log(progress.step, metrics)
            if bar is not None:  # the postfix first: update() redraws, so the bar shows this step's loss
                if val:
                    last_val = {"val": f"{val['val/loss']:.4f}",
                                **{f"{task}_acc": f"{val[f'val/{task}_acc']:.3f}" for task in t.eval_tasks}}
                bar.set_postfix(loss=f"{loss_value:.4f}", **(last_val if val_batches is not None and last_val else {}),
                                tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                bar.update(1)

            stopping = stop_votes > 0
            if stopping or progress.step == last_step or (
                    config.checkpoint.every and progress.step % config.checkpoint.every == 0):
                save(progress, loader.state_dict(), ckpt.rng_state(),
                     f"that {stop.signal or 'a signal'} asked for after step {progress.step}" if stopping else f"at step {progress.step}")
                last_saved = progress.step
            if stopping:
                if main:
                    print(f"\nstopped by a signal after step {progress.step}; checkpoint saved in "
                          f"{config.checkpoint_dir / ckpt.tag_for(progress.step)}; continue with --resume auto",
                          file=sys.stderr, flush=True)
                status = "KILLED"
                break
        else:
            if progress.step < t.steps:
                status = "KILLED"  # train.stop_at: resumable
                if main:
                    print(f"\nstopped at train.stop_at={t.stop_at}; continue with --resume auto", file=sys.stderr, flush=True)
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if bar is not None:
            bar.close()
        stop.uninstall()
        tracker.finish(status)
    if main:
        print(f"done: step {progress.step}/{t.steps}, run folder {config.run_dir}", flush=True)
    return exit_code


def shutdown() -> None:
    """End every process together: barrier, then destroy the group (gloo may abort otherwise)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
