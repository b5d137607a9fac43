# Over 400 lines: every section's schema with its field docs, plus the loading and preflight that check it.
"""The training run's typed configuration: one YAML file, dotted overrides, strict validation.

    config = load_config("configs/tiny-cpu.yaml", ["train.steps=200", "model.n_layers=4"])

Sections: `model` (the model's own `ModelConfig`), `data`, `train`, `optim`, `checkpoint`,
`logging`, `parallel`. Unknown keys are rejected with the closest valid name; every field is
documented below, where it is defined. Loading imports no torch-distributed/DeepSpeed/MLflow
code, so a bad config fails in about a second, before any process group exists.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from fluidlm.model.config import ModelConfig, StrictModel


class ConfigError(ValueError):
    """A config that cannot run; the message names the field (`section.key`) and the fix."""


class DataSource(StrictModel):
    """One prepared folder of a weighted mixture."""

    dir: str = Field(..., description="folder made by `fluidlm data prepare` (train/, val/, tokenizer.model)")
    weight: float = Field(1.0, gt=0, description="relative share of the training samples drawn from this source")
    name: str | None = Field(None, description="name in the logs and MLflow (source_tokens/<name>); null = the folder's name")


class DataConfig(StrictModel):
    """Where the prepared data lives (`fluidlm data prepare --out DIR`) and how it is read."""

    dir: str | None = Field(
        None, description="folder made by `fluidlm data prepare` (holds train/, val/ and tokenizer.model); "
                          "relative paths are relative to the current directory. One source; use data.sources for "
                          "several (then data.dir is the first source's folder)")
    sources: list[DataSource] | None = Field(
        None, description="several prepared folders mixed by weight: [{dir: ..., weight: ...}, ...]; every sample slot "
                          "draws its source with probability ∝ weight (seeded, resumable); same tokenizer required")
    train_split: str = Field("train", description="sub-folder of data.dir with the training shards and manifest.json")
    val_split: str = Field("val", description="sub-folder of data.dir with the validation shards")
    seq_len: int = Field(
        ..., ge=1, description="training context in tokens; must equal the --seq-len the shards were built with "
                               "and be at most model.max_seq_len")
    num_workers: int = Field(0, ge=0, le=64, description="loader worker processes per rank (0 = read in the training process)")
    lanes: int = Field(8, ge=1, le=4096, description="shards are dealt to this many lanes (fewer if an epoch would skip "
                                                     "over 10% of the samples); micro-batch g reads lane g mod lanes, so a "
                                                     "data-parallel size dividing it gives each rank its own shards")
    window: int = Field(2, ge=1, le=1024, description="shards of a lane read (and their samples shuffled) together")

    @model_validator(mode="after")
    def _one_source_kind(self):
        if self.sources is None:
            if self.dir is None:
                raise ValueError("data.dir (one prepared folder) or data.sources (several, with weights) is required")
        elif not self.sources:
            raise ValueError("data.sources is empty; list at least one {dir: ..., weight: ...}")
        elif self.dir is None:
            self.dir = self.sources[0].dir
        elif self.dir != self.sources[0].dir:
            raise ValueError(f"data.dir={self.dir!r} and data.sources are both set; give only data.sources")
        return self

    def source_list(self) -> list[tuple[str, str, float]]:
        """[(name, folder, weight)]: data.sources, or data.dir as the only source."""
        if self.sources is None:
            return [(Path(self.dir).name or "data", self.dir, 1.0)]
        names = [s.name or Path(s.dir).name or f"source{i}" for i, s in enumerate(self.sources)]
        return [(n if names.count(n) == 1 else f"{n}{i}", s.dir, s.weight)
                for i, (n, s) in enumerate(zip(names, self.sources))]


class MaskedLMConfig(StrictModel):
    """BERT's masking for train.objective=masked_lm (fluidlm/model/objective.py). The ids are
    filled in from the tokenizer when training starts (`preflight`); set them by hand only for
    data made without a FluidLM tokenizer."""

    rate: float = Field(0.15, gt=0, le=1, description="fraction of the (non-special) tokens selected for prediction; "
                                                      "the loss is computed on these positions only")
    mask_fraction: float = Field(0.8, ge=0, le=1, description="of the selected tokens, the fraction replaced by the "
                                                             "mask token")
    random_fraction: float = Field(0.1, ge=0, le=1, description="of the selected tokens, the fraction replaced by a "
                                                               "random real token (the rest are kept as they are)")
    mask_id: int | None = Field(None, ge=0, description="id of the mask token; null = the tokenizer's '<mask>' piece "
                                                        "(`fluidlm data tokenizer` adds it), resolved at start-up")
    special_ids: list[int] | None = Field(
        None, description="ids never selected nor drawn as random replacements; null = the tokenizer's control and "
                          "unknown ids (EOS, BOS, UNK, mask), resolved at start-up")
    tokenizer_vocab_size: int | None = Field(
        None, ge=2, description="random replacements are drawn below this id; null = the tokenizer's size, resolved "
                                "at start-up")

    @model_validator(mode="after")
    def _fractions(self):
        if self.mask_fraction + self.random_fraction > 1 + 1e-12:
            raise ValueError(f"train.mlm.mask_fraction + random_fraction = {self.mask_fraction + self.random_fraction} "
                             "is above 1")
        return self


class TrainConfig(StrictModel):
    """The run: where it writes, how long it is, batch shape, precision, seeds."""

    objective: Literal["causal_lm", "masked_lm"] | None = Field(
        None, description="causal_lm = next-token loss (causal models only); masked_lm = BERT's masked-token loss "
                          "(train.mlm); null = causal_lm for model.direction=causal, masked_lm for bidirectional")
    mlm: MaskedLMConfig = Field(default_factory=MaskedLMConfig, description="masking of train.objective=masked_lm")

    run_dir: str = Field(
        "runs/run", description="the run folder: config.yaml, metrics.jsonl and checkpoints/ go here; its parent "
                                "holds the default MLflow store (mlflow.db)")
    steps: int = Field(..., ge=1, description="optimizer steps of the whole run (the LR schedule spans these)")
    stop_at: int | None = Field(
        None, ge=1, description="stop after this step with a checkpoint, although train.steps is larger "
                                "(staged runs: the LR schedule still follows train.steps); null = run to the end")
    micro_batch_size: int = Field(8, ge=1, description="sequences per rank per forward/backward")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step; global batch = "
                                                 "micro_batch_size × grad_accum × data-parallel size")
    seed: int = Field(0, description="seed of the model init, dropout and the data order")
    activation_checkpointing: bool = Field(
        False, description="recompute each block in backward instead of storing its activations (long contexts)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 on CUDA (fp32 master weights and grad accumulation), fp32 on CPU")
    loss_chunk_tokens: int = Field(8192, ge=1, description="tokens per chunk of the LM head + cross-entropy "
                                                           "(bounds the logits held in memory)")
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads per process; null = CPU cores / processes on this node")
    peak_tflops: float = Field(
        989.0, gt=0, description="peak dense TFLOP/s of ONE device, the denominator of the MFU estimate "
                                 "(H100 SXM bf16: 989; H200: 989; a 2-core CPU: ~0.1)")
    eval_every: int = Field(
        0, ge=0, description="validation every this many steps (and after the last): loss and perplexity on a fixed "
                             "slice of data.val_split, logged as val/loss and val/perplexity; 0 = off")
    eval_tokens: int = Field(
        65536, ge=1, description="tokens in the validation slice: the first samples of the split in manifest order "
                                 "(the same every time, so the curve is comparable), shared out over data-parallel ranks")
    eval_tasks: list[Literal["mqar"]] = Field(
        default_factory=list, description="synthetic tasks scored at every validation (train.eval_every) on the "
                                          "validation slice, which must then be that task's split (`fluidlm data "
                                          "synthetic mqar`): the share of scored targets whose greedy (argmax) "
                                          "prediction is right, logged as val/<task>_acc; needs parallel.tp = pp = cp = 1")
    debug_nan_at_step: int | None = Field(
        None, ge=1, description="debug switch: make the loss NaN at this step (tests the NaN stop); null = off")


class OptimConfig(StrictModel):
    """AdamW with linear warm-up then cosine decay; gradient clipping."""

    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of optim.lr (cosine floor)")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps from lr/warmup_steps to lr")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay; never applied to biases, norm "
                                                       "weights, DA's rho, the flow-encoder bias or the PDE theta")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW β1")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW β2")
    eps: float = Field(1e-8, gt=0, description="AdamW ε")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient 2-norm to this (0 = off)")
    rho_lr_mult: float = Field(10.0, gt=0, description="learning-rate multiplier of DA's per-head ρ (λ = softplus(ρ)), "
                                                       "so the relaxation rates adapt within a short run")
    torch_adam: bool = Field(
        True, description="use torch.optim.AdamW inside DeepSpeed (no compiled ops, works everywhere); false = "
                          "DeepSpeed's FusedAdam on CUDA, which JIT-compiles a CUDA op (needs nvcc and ninja)")


class CheckpointConfig(StrictModel):
    """Training checkpoints (docs/design.md §5): DeepSpeed state + client state, written atomically."""

    every: int = Field(1000, ge=0, description="save every this many steps (0 = only at the end, at train.stop_at "
                                               "and on SIGTERM/SIGINT)")
    keep: int = Field(3, ge=1, description="keep the newest this many checkpoints, delete older ones")


class LoggingConfig(StrictModel):
    """metrics.jsonl, the progress bar and MLflow (rank 0 only)."""

    every: int = Field(1, ge=1, description="log metrics every this many steps (metrics.jsonl and MLflow)")
    progress: bool = Field(True, description="show a tqdm progress bar with loss and tokens/s on rank 0")
    mlflow: bool = Field(True, description="log params, metrics and artifacts to MLflow")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; null = $MLFLOW_TRACKING_URI, else sqlite:///<run_dir parent>/mlflow.db")
    experiment: str = Field("fluidlm", description="MLflow experiment name")
    run_name: str | None = Field(None, description="MLflow run name; null = the run folder's name")


class ParallelConfig(StrictModel):
    """world = PP × DP × CP × TP (docs/design.md §4); DP is what is left of the world after TP, CP and PP."""

    tp: int = Field(1, ge=1, description="tensor-parallel size: DA heads (with their λ and Δ rows), the FFN hidden size and "
                                         "the vocabulary are split across this many ranks (megatron-core layers); "
                                         "must divide model.n_heads, the FFN size and model.vocab_size")
    pp: int = Field(1, ge=1, description="pipeline-parallel stages (DeepSpeed PipelineModule, 1F1B); blocks are spread "
                                         "evenly, the embedding + PDE layer on the first stage, the tied LM head on the "
                                         "last; needs parallel.zero_stage ≤ 1 and pp ≤ model.n_layers")
    cp: int = Field(1, ge=1, description="context-parallel size: every sequence of a micro-batch is split into this many "
                                         "contiguous shards, one per rank, DA passing its recurrence state between them "
                                         "(DA only, pp = 1; micro_batch_size × seq_len must divide by cp)")
    zero_stage: int = Field(1, ge=0, le=3, description="DeepSpeed ZeRO stage for data parallelism (2 and 3 need pp = 1)")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="process-group backend; auto = nccl on CUDA, gloo on CPU")


class Config(StrictModel):
    """A whole training run."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="the model (fluidlm/model/config.py)")
    data: DataConfig = Field(..., description="prepared data")
    train: TrainConfig = Field(..., description="run length, batch, precision, seed")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimizer and LR schedule")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="training checkpoints")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="metrics, progress bar, MLflow")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="parallel layout")

    @model_validator(mode="after")
    def _cross_checks(self):
        from fluidlm.model.objective import check_objective

        objective = check_objective(self.model.direction, self.train.objective)  # refuses the future leak
        if self.train.objective != objective:
            self.train.objective = objective
        mask_id = self.train.mlm.mask_id
        if objective == "masked_lm" and mask_id is not None and mask_id >= self.model.vocab_size:
            raise ValueError(f"train.mlm.mask_id={mask_id} is outside model.vocab_size={self.model.vocab_size}")
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} is above model.max_seq_len={self.model.max_seq_len} "
                             "(the longest context the model is built for); lower data.seq_len or raise model.max_seq_len")
        self.model.check_tensor_parallel(self.parallel.tp)
        if self.parallel.zero_stage > 1 and self.parallel.pp > 1:
            raise ValueError(f"parallel.zero_stage={self.parallel.zero_stage} needs parallel.pp=1 (DeepSpeed's pipeline "
                             "engine supports ZeRO stage 0 or 1 only)")
        cp = self.parallel.cp
        if cp > 1:
            if self.model.attention != "da" or self.parallel.pp != 1:
                raise ValueError(f"parallel.cp={cp} needs model.attention='da' and parallel.pp=1 (got "
                                 f"{self.model.attention!r}, pp={self.parallel.pp})")
            row = self.train.micro_batch_size * self.data.seq_len
            # PDE halo max(S)·K; 3 = the flow encoder's conv halo (FLOW_CONV_WIDTH - 1 in fluidlm/model/attention.py)
            halo = max(max(self.model.pde.scales) * self.model.pde.steps if self.model.pde.enabled else 0, 3)
            if row % cp or row // cp < halo:
                raise ValueError(f"parallel.cp={cp}: each micro-batch row of train.micro_batch_size × data.seq_len = {row} "
                                 f"tokens must split into {cp} equal shards of at least {halo} tokens (the PDE/flow halo)")
        if self.parallel.pp > self.model.n_layers:
            raise ValueError(f"parallel.pp={self.parallel.pp} stages but model.n_layers={self.model.n_layers}: every stage "
                             f"needs at least one block; use parallel.pp ≤ {self.model.n_layers}")
        if self.train.stop_at is not None and self.train.stop_at > self.train.steps:
            raise ValueError(f"train.stop_at={self.train.stop_at} is after train.steps={self.train.steps}")
        if self.train.eval_tasks:
            if not self.train.eval_every:
                raise ValueError(f"train.eval_tasks={self.train.eval_tasks} are scored at each validation; set "
                                 "train.eval_every (e.g. 100) or remove train.eval_tasks")
            if (self.parallel.tp, self.parallel.pp, self.parallel.cp) != (1, 1, 1):
                raise ValueError(f"train.eval_tasks needs parallel.tp = pp = cp = 1 (it reads the full logits of one "
                                 f"process; data parallelism is fine), got tp={self.parallel.tp} pp={self.parallel.pp} "
                                 f"cp={self.parallel.cp}; score the checkpoints with `fluidlm eval --task` instead")
        if self.train.debug_nan_at_step is not None and self.train.debug_nan_at_step > self.train.steps:
            raise ValueError(f"train.debug_nan_at_step={self.train.debug_nan_at_step} is after train.steps={self.train.steps}")
        return self

    # --- derived paths -------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def manifest_path(self, split: str | None = None) -> Path:
        return Path(self.data.dir) / (split or self.data.train_split) / "manifest.json"

    def train_sources(self) -> list[tuple[str, Path, float]]:
        """[(name, training manifest, weight)] of every data source (data.dir alone is one)."""
        return [(name, Path(d) / self.data.train_split / "manifest.json", w) for name, d, w in self.data.source_list()]

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


# --- loading -------------------------------------------------------------------------------------

def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """["train.steps=200", "model.pde.scales=[1, 4]"] → [(["train", "steps"], 200), ...]; values are YAML scalars."""
    import yaml

    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.steps=200)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc.__class__.__name__})") from None
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for path, value in parse_overrides(overrides):
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[:i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field as `section.key`."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] != "value_error" and not isinstance(err.get("input"), dict):
            msg += f" (got {err.get('input')!r})"
        unknown = re.match(r"unknown key '(.+?)' in \w+(.*)", msg)
        if unknown:  # "optim.lr2: unknown key; did you mean 'lr'?"
            key = f"{loc}.{unknown.group(1)}" if loc else unknown.group(1)
            lines.append(f"{key}: unknown key{unknown.group(2)}")
        else:
            lines.append(f"{loc}: {msg}" if loc else msg)  # root-level checks name their fields themselves
    return "invalid config:\n  " + "\n  ".join(lines)


def build_config(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply dotted overrides, validate. Raises ConfigError naming the field."""
    import yaml

    path = Path(path)
    if not path.is_file():
        close = difflib.get_close_matches(path.name, [p.name for p in Path("configs").glob("*.yaml")], n=1)
        hint = f"; did you mean configs/{close[0]}?" if close else ""
        raise ConfigError(f"config file {str(path)!r} not found{hint}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections (model:, data:, train:, ...)")
    return build_config(apply_overrides(data, overrides or []))


def dump_yaml(config: Config) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"d_model": 8}} → {"model.d_model": 8} (lists stay values)."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_diff(old: dict, new: dict) -> dict[str, tuple]:
    """Flattened keys whose values differ: {key: (old, new)}."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)}


def preflight(config: Config) -> dict:
    """Checks that need the file system, still before any process group: the data is there and
    matches the config (seq_len, vocabulary, largest token id, one tokenizer for all sources).
    Returns the training manifest (of the first source). Raises ConfigError naming the field."""
    manifests = []
    for name, folder, _ in config.data.source_list():
        field = "data.dir" if config.data.sources is None else f"data.sources[{name}].dir"
        manifests.append(_check_source(config, field, folder))
    for (name, folder, _), m in zip(config.data.source_list()[1:], manifests[1:]):
        if m.get("tokenizer_sha256") != manifests[0].get("tokenizer_sha256"):
            raise ConfigError(f"data.sources: {folder!r} was made with another tokenizer (sha256 "
                              f"{str(m.get('tokenizer_sha256'))[:12]}…) than {config.data.dir!r} "
                              f"({str(manifests[0].get('tokenizer_sha256'))[:12]}…); rebuild it with "
                              f"`fluidlm data shards --tokenizer {config.data.dir}/tokenizer.model`")
    return manifests[0]


def _check_source(config: Config, field: str, folder: str) -> dict:
    data_dir = Path(folder)
    if not data_dir.is_dir():
        raise ConfigError(f"{field}={folder!r} does not exist; build it with "
                          f"`fluidlm data prepare --out {folder}` or point {field} at a prepared folder")
    manifest_path = data_dir / config.data.train_split / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError(f"{field}={folder!r} has no {config.data.train_split}/manifest.json "
                          f"(data.train_split={config.data.train_split!r}); run `fluidlm data prepare --out {folder}`")
    try:
        manifest = json.loads(manifest_path.read_text())
        shard_seq_len = int(manifest["seq_len"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{field}: {str(manifest_path)!r} is not a shard manifest ({exc}); rebuild the data") from None
    if shard_seq_len != config.data.seq_len:
        raise ConfigError(f"data.seq_len={config.data.seq_len} but the shards in {str(manifest_path.parent)!r} hold "
                          f"sequences of {shard_seq_len} tokens; set data.seq_len={shard_seq_len} or rebuild the data "
                          f"with --seq-len {config.data.seq_len}")
    vocab = manifest.get("vocab_size")
    if vocab is not None and int(vocab) > config.model.vocab_size:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({vocab}, from {str(manifest_path)!r}); set model.vocab_size={vocab}")
    # The largest token id each shard holds (recorded by the writer since manifest format 2).
    top, where = None, None
    for entry in manifest.get("shards", []):
        m = entry.get("max_token_id") if isinstance(entry, dict) else None
        if m is not None and (top is None or m > top):
            top, where = int(m), entry.get("file")
    for limit, what in ((config.model.vocab_size, f"model.vocab_size={config.model.vocab_size}"),
                        (int(vocab) if vocab is not None else None, f"the manifest's vocab_size={vocab}")):
        if top is not None and limit is not None and top >= limit:
            raise ConfigError(f"{field}: shard {where!r} in {str(manifest_path.parent)!r} holds token id {top}, outside "
                              f"{what} (shards made with another tokenizer?); rebuild the shards with the tokenizer of "
                              f"{folder}/tokenizer.model, or set model.vocab_size above {top} if the vocabulary is larger")
    if config.train.objective == "masked_lm":
        if manifest.get("loss_mask"):
            raise ConfigError(f"train.objective=masked_lm: the shards in {str(manifest_path.parent)!r} carry loss masks "
                              "(next-token targets to score), which the masked-token loss would ignore; train them "
                              "with train.objective=causal_lm and a causal model")
        resolve_masked_lm(config, manifest, manifest_path)
    if config.train.eval_every and field in ("data.dir", f"data.sources[{config.data.source_list()[0][0]}].dir") \
            and folder == config.data.dir:
        val = data_dir / config.data.val_split / "manifest.json"
        if not val.is_file():
            raise ConfigError(f"train.eval_every={config.train.eval_every} validates on {str(val)!r}, which does not exist "
                              f"(data.val_split={config.data.val_split!r}); run `fluidlm data prepare --out {folder}` "
                              f"or set train.eval_every=0")
        task = (json.loads(val.read_text()).get("task") or {}).get("name")
        for wanted in config.train.eval_tasks:
            if task != wanted:
                raise ConfigError(f"train.eval_tasks: {wanted!r} is scored on the validation split {str(val)!r}, which "
                                  f"holds {'task ' + repr(task) if task else 'text'}; make it with `fluidlm data "
                                  f"synthetic {wanted} --out {folder}` or remove {wanted!r} from train.eval_tasks")
    return manifest


def resolve_masked_lm(config: Config, manifest: dict, manifest_path: Path) -> None:
    """Fill in train.mlm.mask_id / special_ids / tokenizer_vocab_size from the data's tokenizer
    (the manifest's `tokenizer`, else data.dir/tokenizer.model). Raises ConfigError when the
    tokenizer has no mask token or none is found and the ids are not given."""
    from fluidlm.data import DataError
    from fluidlm.data.tokenizer import BOS, EOS, UNK, special_ids

    mlm = config.train.mlm
    candidates = [Path(manifest["tokenizer"])] if manifest.get("tokenizer") else []
    candidates.append(Path(config.data.dir) / "tokenizer.model")
    tokenizer = next((p for p in candidates if p.is_file()), None)
    if tokenizer is not None:
        try:
            found = special_ids(tokenizer)
        except DataError as exc:
            raise ConfigError(f"train.objective=masked_lm: {exc}") from None
        if mlm.mask_id is not None and mlm.mask_id != found["mask_id"]:
            raise ConfigError(f"train.mlm.mask_id={mlm.mask_id} but the tokenizer {str(tokenizer)!r} has its mask token "
                              f"at id {found['mask_id']}; remove train.mlm.mask_id")
        resolved = {"mask_id": found["mask_id"], "special_ids": mlm.special_ids or found["special_ids"],
                    "tokenizer_vocab_size": mlm.tokenizer_vocab_size or found["vocab_size"]}
    elif mlm.mask_id is None:
        raise ConfigError(f"train.objective=masked_lm needs a mask token and the data's tokenizer was not found "
                          f"(tried {', '.join(repr(str(p)) for p in candidates)}, from {str(manifest_path)!r}); rebuild the "
                          "data with `fluidlm data prepare`, or, for data made without a FluidLM tokenizer, set "
                          "train.mlm.mask_id (and train.mlm.special_ids)")
    else:
        resolved = {"mask_id": mlm.mask_id, "special_ids": mlm.special_ids or sorted({UNK, BOS, EOS, mlm.mask_id}),
                    "tokenizer_vocab_size": mlm.tokenizer_vocab_size or int(manifest.get("vocab_size") or
                                                                             config.model.vocab_size)}
    if resolved["mask_id"] >= config.model.vocab_size or resolved["tokenizer_vocab_size"] > config.model.vocab_size:
        raise ConfigError(f"train.mlm: the mask id {resolved['mask_id']} / tokenizer size "
                          f"{resolved['tokenizer_vocab_size']} do not fit model.vocab_size={config.model.vocab_size}")
    if resolved["mask_id"] not in resolved["special_ids"]:
        resolved["special_ids"] = sorted({*resolved["special_ids"], resolved["mask_id"]})
    for key, value in resolved.items():
        setattr(mlm, key, value)
