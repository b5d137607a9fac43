"""What `fluidlm train` and `fluidlm launch` check before any process group exists: the parallel
layout fits the world, and a checkpoint to resume fits this config (same model, same layout or a
universal checkpoint, steps left). Both CLIs import this module; neither imports the other. No torch
import at module level (the CLIs' --help stays light).
"""

from __future__ import annotations


def check_layout(config, world: int) -> None:
    """The parallel layout fits `world` ranks (ConfigError otherwise)."""
    from fluidlm.parallel.topology import Layout
    from fluidlm.train.config import ConfigError

    try:
        Layout.from_world(world, config.parallel.tp, config.parallel.pp, config.parallel.cp)
    except ValueError as exc:
        raise ConfigError(f"parallel: {exc}") from None


# What a resume may change. The checkpoint holds the weights of ITS model: a field that changes a
# parameter's shape or what the weights compute cannot be changed on resume (exit 2, naming every
# differing field). These model fields can: they change how the same function is computed, or only
# matter at initialisation. Everything outside `model:` may change too (train.steps, optim.lr,
# logging, checkpoint, ...); what breaks an exact continuation is printed as a WARNING at start-up.
RESUME_MODEL_ALLOWED = ("model.da_backend", "model.chunk_size", "model.dropout", "model.max_seq_len",
                        "model.init_std", "model.pde.theta_init")


def model_changes(saved_model: dict, model: dict) -> dict[str, tuple]:
    """{`model.<field>`: (checkpoint's value, this config's value)} for every model field that differs
    and may not change on resume (`ffn_hidden` compared as the resolved FFN size)."""
    from fluidlm.model.config import ModelConfig
    from fluidlm.train.config import config_diff

    def resolved(m: dict) -> dict:
        try:
            return {**m, "ffn_hidden": ModelConfig.model_validate(m).ffn_size}
        except ValueError:  # a checkpoint from an older schema: compare as written
            return m

    diff = config_diff({"model": resolved(saved_model)}, {"model": resolved(model)})
    return {k: v for k, v in diff.items() if k not in RESUME_MODEL_ALLOWED}


def check_model(resume_from, saved_model: dict, config) -> None:
    from fluidlm.train.checkpoint_read import CheckpointError

    changed = model_changes(saved_model, config.to_dict()["model"])
    if changed:
        fields = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in changed.items())
        raise CheckpointError(
            f"{resume_from} holds a different model than this config: {fields}. These fields cannot change on "
            f"resume (the saved weights are of the checkpoint's model); set them back (e.g. "
            f"{' '.join(f'{k}={old!r}' for k, (old, _) in changed.items())}), or start a new run in another "
            f"train.run_dir. A resume may change train.steps, train.stop_at, optim.* (LR, schedule), logging.*, "
            f"checkpoint.*, data.num_workers and {', '.join(RESUME_MODEL_ALLOWED)}")


def check_resume(resume_from, config, world: int) -> None:
    """Checkpoint `resume_from` can continue this config on `world` ranks (CheckpointError
    otherwise): the same model (see RESUME_MODEL_ALLOWED), the same layout (or a universal checkpoint),
    steps left to train."""
    from fluidlm.train.checkpoint_read import CheckpointError, is_universal, read_info, read_meta
    from fluidlm.train.deepspeed_setup import use_bf16

    if is_universal(resume_from):
        info = read_info(resume_from)
        check_model(resume_from, info["config"]["model"], config)
        step = info["step"]
    else:
        meta = read_meta(resume_from)
        check_model(resume_from, meta["config"]["model"], config)
        saved = (meta["world_size"], meta.get("tp", 1), meta.get("pp", 1), meta.get("cp", 1))
        now = (world, config.parallel.tp, config.parallel.pp, config.parallel.cp)
        if saved != now:
            raise CheckpointError(f"{resume_from} was saved with world {saved[0]} (tp {saved[1]}, pp {saved[2]}, cp "
                                  f"{saved[3]}), this run has world {now[0]} (tp {now[1]}, pp {now[2]}, cp {now[3]}): "
                                  "exact resume needs the same layout; to change it, convert the checkpoint first "
                                  "(`fluidlm checkpoint convert`, see README)")
        # DeepSpeed's files differ with the ZeRO stage (0: no optimizer partitions, 3: sharded weights)
        # and the precision (bf16_ optimizer files): it cannot load across those.
        stage, bf16 = meta.get("zero_stage", 0), bool(meta.get("bf16", False))
        kind = lambda s: {0: 0, 3: 3}.get(s, 1)  # noqa: E731  (ZeRO 1 and 2 write the same files)
        if kind(stage) != kind(config.parallel.zero_stage) or bf16 != use_bf16(config):
            raise CheckpointError(
                f"{resume_from} was saved with parallel.zero_stage={stage} and {'bf16' if bf16 else 'fp32'}, this run "
                f"has parallel.zero_stage={config.parallel.zero_stage} and {'bf16' if use_bf16(config) else 'fp32'}: "
                f"DeepSpeed cannot load that checkpoint; set parallel.zero_stage={stage} and train.precision="
                f"{'bf16' if bf16 else 'fp32'} (ZeRO 1 and 2 may be swapped; `fluidlm checkpoint convert` changes "
                "the stage between 1 and 2 and the layout)")
        step = meta["step"]
    if step >= config.train.steps:
        raise CheckpointError(f"{resume_from} is at step {step}, already at train.steps={config.train.steps}; "
                              "raise train.steps to train further")


def check_writable(folder, what: str) -> None:
    """`folder` exists or can be made, and a file can be written in it (OSError → ConfigError naming
    `what`, e.g. "train.run_dir='runs/x'"). Folders it had to make for the test are removed again."""
    import os
    import socket
    import uuid
    from pathlib import Path

    from fluidlm.train.config import ConfigError

    folder = Path(folder).absolute()
    first_missing = next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)
    probe = folder / f".write-test-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
        if first_missing is not None:  # only folders still empty: a concurrent run may be filling them now
            for made in [folder, *folder.parents]:
                try:
                    made.rmdir()
                except OSError:
                    break
                if made == first_missing:
                    break
    except OSError as exc:
        raise ConfigError(f"{what} is not writable ({exc.strerror or exc}: {exc.filename or folder}); choose a "
                          "folder you can write to") from None


def check_validation(config, world: int) -> None:
    """With train.eval_every, the validation split holds a micro-batch for every data-parallel rank
    (ConfigError otherwise), as fluidlm/train/validation.py needs."""
    from fluidlm.data import DataError
    from fluidlm.data.shards import load_manifest
    from fluidlm.parallel.topology import Layout
    from fluidlm.train.config import ConfigError

    t = config.train
    if not t.eval_every:
        return
    layout = Layout.from_world(world, config.parallel.tp, config.parallel.pp, config.parallel.cp)
    per_round = t.micro_batch_size * layout.dp * (t.grad_accum if layout.pp > 1 else 1)
    path = config.manifest_path(config.data.val_split)
    try:
        samples = sum(int(s["samples"]) for s in load_manifest(path)["shards"])
    except DataError as exc:
        raise ConfigError(f"train.eval_every={t.eval_every} needs the validation split (data.val_split="
                          f"{config.data.val_split!r}): {exc}") from None
    if samples < per_round:
        raise ConfigError(f"train.eval_every={t.eval_every}: {path} holds {samples} validation samples, fewer than one "
                          f"micro-batch per data-parallel rank (train.micro_batch_size {t.micro_batch_size} × dp "
                          f"{layout.dp}{' × grad_accum' if layout.pp > 1 else ''} = {per_round}); lower "
                          "train.micro_batch_size, use a larger validation split or set train.eval_every=0")
