"""The masked-LM objective (issue 21): bidirectional + causal_lm refused; the mask token in the
tokenizer; BERT's masking; a masked position cannot see its own token (and the next-token
objective on a bidirectional model demonstrably can); exact resume; TP = 2, CP = 2 and PP = 2
reproduce the single-process MLM losses; masked-token perplexity of `fluidlm eval` equals a direct
computation.

The training runs use the synthetic shards of tests/train_helpers.py (vocab 256, ids 3…255 and EOS
= 2; id 1 is free and serves as the mask token, set through train.mlm.mask_id because these
shards have no sentencepiece tokenizer). The single-process jobs run in ONE subprocess
(tests/train_runner.py)."""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train_helpers import losses, make_dataset, read_metrics, tiny_config, write_config

ROOT = Path(__file__).resolve().parents[1]
MASK_ID = 1
MLM = {"direction": "bidirectional"}
TP_TOLERANCE = 2e-5  # as tests/test_train_model_parallel.py


def mlm_config(data_dir, run, sections=None, **more):
    sections = {**(sections or {}), **more}
    model = {**MLM, **sections.pop("model", {})}
    train = {"objective": "masked_lm", **sections.pop("train", {})}
    cfg = tiny_config(data_dir, run, model=model, train=train, **sections)
    cfg["train"]["mlm"] = {"mask_id": MASK_ID}
    return cfg


# --- the objective in the config -----------------------------------------------------------------

def test_bidirectional_causal_lm_is_refused_and_the_defaults_follow_the_direction(tmp_path, capsys):
    from fluidlm.model.objective import ObjectiveError, check_checkpoint_objective
    from fluidlm.train.cli import main
    from fluidlm.train.config import ConfigError, build_config

    data = tmp_path / "data"
    base = tiny_config(data, tmp_path / "run")
    assert build_config(copy.deepcopy(base)).train.objective == "causal_lm"
    bidir = tiny_config(data, tmp_path / "run", model=MLM)
    assert build_config(bidir).train.objective == "masked_lm"
    leak = tiny_config(data, tmp_path / "run", model=MLM, train={"objective": "causal_lm"})
    with pytest.raises(ConfigError, match="train.objective=causal_lm with model.direction=bidirectional.*"
                                          "set train.objective=masked_lm"):
        build_config(leak)
    path = write_config(tmp_path / "leak.yaml", leak)
    assert main(["--config", str(path)]) == 2  # before any data or process group is touched
    assert "reads the token it is asked to predict" in capsys.readouterr().err
    # A causal model may still train on masked tokens (no leak either way).
    assert build_config(tiny_config(data, tmp_path / "r", train={"objective": "masked_lm"})).train.objective == "masked_lm"

    # The one check for checkpoints (eval / export / generation): a bidirectional checkpoint from
    # before train.objective existed was trained on the next token.
    old = {"model": {"direction": "bidirectional"}, "train": {}}
    for purpose in ("eval", "export", "generate"):
        with pytest.raises(ObjectiveError, match="bidirectional model trained with the next-token objective"):
            check_checkpoint_objective(old, purpose)
    mlm = {"model": {"direction": "bidirectional"}, "train": {"objective": "masked_lm"}}
    assert check_checkpoint_objective(mlm, "eval") == check_checkpoint_objective(mlm, "export") == "masked_lm"
    with pytest.raises(ObjectiveError, match="generation needs a causal model"):
        check_checkpoint_objective(mlm, "generate")
    assert check_checkpoint_objective({"model": {"direction": "causal"}, "train": {}}, "generate") == "causal_lm"


# --- the mask token in the tokenizer ---------------------------------------------------------------

def _documents():
    return [p.read_text() for p in sorted((ROOT / "fluidlm").rglob("*.py"))]


def test_tokenizer_has_a_mask_token_that_text_never_produces_and_old_tokenizers_are_refused(tmp_path):
    import sentencepiece as spm

    from fluidlm.data.tokenizer import MASK_PIECE, load_tokenizer, mask_id, special_ids, train_tokenizer
    from fluidlm.model.objective import MASK_PIECE as OBJECTIVE_MASK_PIECE
    from fluidlm.train.config import ConfigError, build_config, preflight

    assert MASK_PIECE == OBJECTIVE_MASK_PIECE
    docs = _documents()
    report = train_tokenizer(docs, 400, tmp_path / "tok.model")
    tok = load_tokenizer(tmp_path / "tok.model")
    mid = report["mask_id"]
    assert mid == mask_id(tok) and tok.id_to_piece(mid) == MASK_PIECE and tok.is_control(mid)
    text = "x = '<mask>'  # a literal <mask> in the text\n\tstays text: ü\n"
    ids = tok.encode(text)
    assert mid not in ids and tok.decode(ids) == text  # the round trip still holds
    info = special_ids(tmp_path / "tok.model")
    assert info["mask_id"] == mid and {0, 1, 2, mid} == set(info["special_ids"]) and info["vocab_size"] == 400

    # preflight fills in the ids from the data's tokenizer
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    manifest = {"seq_len": 64, "vocab_size": 400, "tokenizer": str(tmp_path / "tok.model")}
    (data / "train" / "manifest.json").write_text(json.dumps(manifest))
    cfg = tiny_config(data, tmp_path / "run", model={**MLM, "vocab_size": 400})
    config = build_config(copy.deepcopy(cfg))
    preflight(config)
    assert (config.train.mlm.mask_id, config.train.mlm.tokenizer_vocab_size) == (mid, 400)
    assert set(config.train.mlm.special_ids) == {0, 1, 2, mid}

    # a tokenizer made before the mask token existed: a clear error naming the fix
    model = io.BytesIO()
    lines = [line for d in docs for line in d.split("\n") if line]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=400, model_type="bpe",
                                   byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (tmp_path / "old.model").write_bytes(model.getvalue())
    (data / "train" / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": str(tmp_path / "old.model")}))
    with pytest.raises(ConfigError, match="has no mask token '<mask>'.*fluidlm data prepare"):
        preflight(build_config(copy.deepcopy(cfg)))
    # no tokenizer at all (e.g. synthetic shards): the mask id must be given
    (data / "train" / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": "synthetic"}))
    with pytest.raises(ConfigError, match="set train.mlm.mask_id"):
        preflight(build_config(copy.deepcopy(cfg)))


# --- masking -------------------------------------------------------------------------------------------

def _spec(**kw):
    from fluidlm.model.objective import MaskingSpec

    return MaskingSpec(**{"mask_id": 5, "special_ids": (0, 1, 2, 5), "vocab_size": 50, **kw})


def test_bert_masking_recipe_specials_and_seeding():
    from fluidlm.model.objective import IGNORE, mask_tokens, masking_generator

    spec = _spec()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(6, 60, (1, 200_000), generator=g)  # ids 50…59: in the model's vocabulary, not the tokenizer's
    tokens[0, ::50] = 2  # EOS
    inputs, targets = mask_tokens(tokens, spec, masking_generator(0, 0, 0, 0))
    selected = targets != IGNORE
    assert not selected[tokens == 2].any()                          # special tokens are never selected
    assert torch.equal(targets[selected], tokens[selected])         # targets: the original tokens
    assert torch.equal(inputs[~selected], tokens[~selected])        # nothing else changes
    rate = selected.float().mean().item() / (1 - 1 / 50)
    assert rate == pytest.approx(0.15, abs=0.005)
    masked = selected & (inputs == 5)
    changed = selected & (inputs != tokens) & (inputs != 5)
    n = selected.sum().item()
    assert masked.sum().item() / n == pytest.approx(0.8, abs=0.01)
    assert changed.sum().item() / n == pytest.approx(0.1 * (1 - 1 / 44), abs=0.01)  # a random draw can hit the same id
    replacements = inputs[changed]
    assert replacements.max() < 50 and not torch.isin(replacements, torch.tensor(spec.special_ids)).any()
    assert len(replacements.unique()) == 50 - 4                     # every real id is drawn
    # the rate is configurable; the masks are a function of (seed, step, rank, micro-batch)
    _, t2 = mask_tokens(tokens, _spec(rate=0.4), masking_generator(0, 0, 0, 0))
    assert (t2 != IGNORE).float().mean().item() == pytest.approx(0.4 * 0.98, abs=0.01)
    again = mask_tokens(tokens, spec, masking_generator(0, 0, 0, 0))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], targets)
    for key in ((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)):
        assert not torch.equal(mask_tokens(tokens, spec, masking_generator(*key))[1], targets), key


def test_masked_lm_loss_is_the_cross_entropy_of_the_selected_positions_only():
    from fluidlm.model import FluidLM
    from fluidlm.model.config import ModelConfig

    torch.manual_seed(0)
    model = FluidLM(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, head_dim=16, chunk_size=8,
                                max_seq_len=64, direction="bidirectional")).double()
    tokens = torch.randint(3, 64, (1, 40))
    targets = torch.full_like(tokens, -100)
    sel = torch.tensor([3, 4, 17, 30, 39])
    targets[0, sel] = torch.randint(3, 64, (5,))
    cu = torch.tensor([0, 20, 40])
    want = F.cross_entropy(model(tokens, cu)[0, sel], targets[0, sel])
    for chunk in (2, 64):  # chunks of the scored rows, as for the next-token loss
        assert model.loss(tokens, targets, cu, chunk_tokens=chunk).item() == pytest.approx(want.item(), rel=1e-6)  # fp32 sum
    none = torch.full_like(tokens, -100)  # a row (or CP shard) without a selected position still backpropagates
    loss = model.loss(tokens, none, cu, chunk_tokens=8)
    loss.backward()
    assert loss.item() == 0.0 and all(p.grad is not None and not p.grad.any() for p in model.parameters())


# --- the model cannot see what it predicts ------------------------------------------------------------

def _objective(direction: str, objective: str):
    from fluidlm.train.config import build_config
    from fluidlm.train.engine import Objective

    cfg = tiny_config(Path("unused"), Path("unused"), model={"direction": direction, "vocab_size": 64},
                      train={"objective": objective})
    cfg["train"]["mlm"] = {"mask_id": MASK_ID, "tokenizer_vocab_size": 64}
    config = build_config(cfg)
    config.train.mlm.special_ids = [0, 1, 2]  # (what preflight resolves)
    return Objective(config)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 64, (2, 49), generator=g)
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    for b, s in ((0, 17), (0, 30), (1, 25)):  # packed documents, each ending in EOS
        starts[b, s] = True
        tokens[b, s - 1] = 2
    return {"tokens": tokens, "doc_starts": starts}


def target_visibility(model, objective, batch, max_positions: int = 12) -> tuple[float, int]:
    """Build (inputs, targets) from the raw batch exactly as training does; for scored positions p
    whose input does not already hold the answer, change the token the target was taken from in
    the RAW batch, rebuild the inputs the same way (same step, same micro-batch: same masks) and
    measure how much the logits at p move. Returns (largest change, positions checked)."""
    from fluidlm.train.engine import batch_to_inputs

    cpu = torch.device("cpu")
    inputs, targets, cu = batch_to_inputs(batch, cpu, objective=objective, step=3, micro=1)
    length = batch["tokens"].shape[1] - 1
    masked_lm = objective.spec is not None
    with torch.no_grad():
        logits = model(inputs, cu).flatten(0, 1)
        worst, checked = 0.0, 0
        for p in (targets.flatten() != -100).nonzero().flatten().tolist():
            b, i = divmod(p, length)
            src = i if masked_lm else i + 1  # where the target token sits in the raw row
            if masked_lm and inputs.flatten()[p] == batch["tokens"][b, i]:
                continue  # BERT's "kept" 10 %: the input is the token itself, by design
            if src >= length or (not masked_lm and batch["doc_starts"][b, src]):
                continue  # next-token target outside the input row, or in the next document
            changed = copy.deepcopy(batch)
            changed["tokens"][b, src] = 3 + (int(changed["tokens"][b, src]) - 3 + 17) % 61
            again, retargets, _ = batch_to_inputs(changed, cpu, objective=objective, step=3, micro=1)
            assert retargets.flatten()[p] != targets.flatten()[p]  # the answer did change
            worst = max(worst, (model(again, cu).flatten(0, 1)[p] - logits[p]).abs().max().item())
            checked += 1
            if checked == max_positions:
                break
    return worst, checked


@pytest.mark.parametrize("attention", ["da", "softmax"])
def test_a_masked_position_cannot_see_its_token_and_the_next_token_objective_on_a_bidirectional_model_can(attention):
    from fluidlm.model import FluidLM
    from fluidlm.model.config import ModelConfig

    def model(direction):
        torch.manual_seed(0)
        return FluidLM(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, head_dim=16, chunk_size=8,
                                   max_seq_len=128, attention=attention, direction=direction)).double().eval()

    bidirectional, causal = model("bidirectional"), model("causal")
    batch = _batch()
    worst, checked = target_visibility(bidirectional, _objective("bidirectional", "masked_lm"), batch)
    assert checked >= 8 and worst == 0.0
    # The same check on the next-token objective: a causal model passes it...
    worst, checked = target_visibility(causal, _objective("causal", "causal_lm"), batch)
    assert checked >= 8 and worst < 1e-12
    # ...and a bidirectional model fails it: it reads the token it is asked to predict (the leak
    # that train.objective refuses).
    worst, checked = target_visibility(bidirectional, _objective("causal", "causal_lm"), batch)
    assert checked >= 8 and worst > 1e-4


# --- training ----------------------------------------------------------------------------------------

STEPS = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlm")
    data = make_dataset(tmp / "data", samples=64)
    r = tmp / "runs"
    resume = {"data": {"num_workers": 2}}  # exact resume with loader workers and dropout on (tiny_config: 0.1)
    jobs = [
        {"name": "straight", "config": mlm_config(data, r / "straight", sections=copy.deepcopy(resume))},
        {"name": "staged_a", "config": mlm_config(data, r / "staged", train={"stop_at": 4}, sections=copy.deepcopy(resume))},
        {"name": "staged_b", "config": mlm_config(data, r / "staged", sections=copy.deepcopy(resume)), "resume": "auto"},
        # the reference of the model-parallel runs (as tests/test_train_model_parallel.py's)
        {"name": "single", "config": mlm_config(data, r / "single", model={"dropout": 0.0},
                                                train={"steps": STEPS, "grad_accum": 2})},
    ]
    jobs_path, out = tmp / "jobs.json", tmp / "results.json"
    jobs_path.write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "train_runner.py"), str(jobs_path), str(out)],
                          cwd=tmp, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(out.read_text())
    for name, res in results.items():
        assert res["code"] == 0, (name, res["error"], res["stderr"][-3000:])
    return {"tmp": tmp, "data": data, "runs": r}


def test_masked_lm_trains_and_resumes_exactly(runs):
    straight, staged = losses(runs["runs"] / "straight"), losses(runs["runs"] / "staged")
    assert list(straight) == list(staged) == list(range(1, 9))
    assert straight == staged  # bit for bit: the masks of steps 5-8 are redrawn identically
    first = straight[1]
    assert 4.5 < first < 6.5  # ≈ ln(256): the masked-token loss of an untrained model
    config = json.loads((runs["runs"] / "straight" / "checkpoints" / "step_00000008" / "client_state.json").read_text())
    assert config["config"]["train"]["objective"] == "masked_lm"
    assert config["config"]["train"]["mlm"] == {"rate": 0.15, "mask_fraction": 0.8, "random_fraction": 0.1,
                                                "mask_id": MASK_ID, "special_ids": [0, 1, 2], "tokenizer_vocab_size": 256}


def _torchrun(args, nproc: int, cwd: Path, timeout: int = 400):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("layout", [{"tp": 2}, {"cp": 2}, {"pp": 2}], ids=["tp2", "cp2", "pp2"])
def test_model_parallel_layouts_reproduce_the_single_process_masked_lm_losses(runs, layout):
    tmp, name = runs["tmp"], "_".join(f"{k}{v}" for k, v in layout.items())
    cfg = mlm_config(runs["data"], runs["runs"] / name, model={"dropout": 0.0}, parallel=layout,
                     train={"steps": STEPS, "grad_accum": 2})
    proc = _torchrun(["-m", "fluidlm.train", "--config", str(write_config(tmp / f"{name}.yaml", cfg))], 2, tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    want = f"pp {layout.get('pp', 1)} × dp 1 × cp {layout.get('cp', 1)} × tp {layout.get('tp', 1)}"
    assert want in proc.stdout
    single, got = losses(runs["runs"] / "single"), losses(runs["runs"] / name)
    assert list(single) == list(got) == list(range(1, STEPS + 1))
    assert max(abs(single[k] - got[k]) for k in single) <= TP_TOLERANCE, (single, got)
    m1, m2 = read_metrics(runs["runs"] / "single"), read_metrics(runs["runs"] / name)
    assert max(abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"] for a, b in zip(m1, m2)) < 1e-4


@pytest.mark.slow
def test_data_parallel_masked_lm_resumes_exactly(runs):
    tmp = runs["tmp"]

    def launch(name, run, resume=False, **train):
        cfg = mlm_config(runs["data"], runs["runs"] / run, train={"steps": 6, **train})
        args = ["-m", "fluidlm.train", "--config", str(write_config(tmp / f"{name}.yaml", cfg))]
        proc = _torchrun(args + (["--resume", "auto"] if resume else []), 2, tmp)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert "pp 1 × dp 2 × cp 1 × tp 1" in proc.stdout

    launch("dp2", "dp2")
    launch("dp2_a", "dp2_staged", stop_at=3)
    launch("dp2_b", "dp2_staged", resume=True)
    assert losses(runs["runs"] / "dp2") == losses(runs["runs"] / "dp2_staged")  # bit for bit, dropout on
    assert list(losses(runs["runs"] / "dp2")) == list(range(1, 7))


# --- evaluation -------------------------------------------------------------------------------------------

def _val_documents(manifest_path: Path) -> list[np.ndarray]:
    """Whole documents of the val split, read straight from the tars (no fluidlm code)."""
    manifest = json.loads(manifest_path.read_text())
    stream, starts = [], []
    for shard in manifest["shards"]:
        with tarfile.open(manifest_path.parent / shard["file"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for key in sorted({n.split(".")[0] for n in members}):
            starts += (np.load(io.BytesIO(members[f"{key}.starts.npy"])) + len(stream)).tolist()
            stream += np.load(io.BytesIO(members[f"{key}.tokens.npy"])).astype(np.int64).tolist()
    bounds = starts + [len(stream)]
    docs = [np.asarray(stream[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return [d for d in docs if d[-1] == 2]


def _eval(argv):
    from fluidlm.eval.cli import main

    return main(["--no-progress", "--no-plot", "--no-mlflow", *argv])


def test_eval_masked_token_perplexity_equals_a_direct_computation(runs, tmp_path, capsys):
    from fluidlm.model import FluidLM
    from fluidlm.model.config import ModelConfig
    from fluidlm.model.objective import MaskingSpec, evaluation_mask

    run, val = runs["runs"] / "single", runs["data"] / "val" / "manifest.json"
    out = tmp_path / "mlm.json"
    lengths = [8, 32, 128]
    assert _eval(["--checkpoint", str(run), "--data", str(val), "--context-lengths", ",".join(map(str, lengths)),
                  "--out", str(out), "--mask-seed", "3"]) == 0
    report = json.loads(out.read_text())
    assert "masked-token perplexity" in capsys.readouterr().out
    assert report["objective"] == "masked_lm" and report["masking"]["seed"] == 3 and report["mode"] == "disjoint"

    meta = json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / "client_state.json").read_text())
    state = torch.load(run / "checkpoints" / f"step_{STEPS:08d}" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)["module"]
    model = FluidLM(ModelConfig.model_validate(meta["config"]["model"]))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    model.eval()
    spec = MaskingSpec.from_config(meta["config"]["train"])
    docs = _val_documents(val)
    masks = [evaluation_mask(d, spec, 3, i) for i, d in enumerate(docs)]
    assert report["data"]["documents"] == len(docs) >= 3
    n_masked = sum(int(m.sum()) for m in masks)
    assert n_masked / sum(len(d) - 1 for d in docs) == pytest.approx(0.15, abs=0.05)
    assert not any(m[d == 2].any() for m, d in zip(masks, docs))  # EOS is never masked
    with torch.no_grad():
        for r, c in zip(report["results"], lengths):
            nll, by_bucket = [], {}
            for doc, m in zip(docs, masks):
                for s in range(0, len(doc), c):  # disjoint windows over the document's tokens, each on its own
                    x, sel = doc[s:s + c], m[s:s + c]
                    logits = model(torch.from_numpy(np.where(sel, MASK_ID, x))[None])[0]
                    v = F.cross_entropy(logits, torch.from_numpy(x), reduction="none")[torch.from_numpy(sel)].double()
                    nll.append(v)
                    for pos, value in zip(np.nonzero(sel)[0] + 1, v.tolist()):
                        by_bucket.setdefault(int(pos).bit_length() - 1, []).append(value)
            allnll = torch.cat(nll)
            assert r["tokens"] == len(allnll) == n_masked  # the same positions at every length
            assert r["loss"] == pytest.approx(float(allnll.mean()), rel=1e-5)
            assert r["perplexity"] == pytest.approx(float(allnll.mean().exp()), rel=1e-5)
            assert r["short_documents"] == sum(1 for d in docs if len(d) < c)
            for k, bucket in enumerate(r["loss_by_position"]):
                assert bucket["tokens"] == len(by_bucket.get(k, []))
                if bucket["tokens"]:
                    assert bucket["loss"] == pytest.approx(float(np.mean(by_bucket[k])), rel=1e-5)
    assert report["results"][0]["loss"] != report["results"][-1]["loss"]  # the context matters


def test_eval_refuses_stream_sliding_and_leaked_checkpoints(runs, tmp_path, capsys):
    run, val = runs["runs"] / "single", str(runs["data"] / "val" / "manifest.json")
    assert _eval(["--checkpoint", str(run), "--data", val, "--context-lengths", "32", "--stream"]) == 2
    assert "bidirectional model needs every token of the window at once" in capsys.readouterr().err
    assert _eval(["--checkpoint", str(run), "--data", val, "--context-lengths", "32", "--mode", "sliding"]) == 2
    assert "masked-LM checkpoints are scored with --mode disjoint" in capsys.readouterr().err
    # A bidirectional checkpoint from before train.objective existed (trained on the next token).
    old = tmp_path / "old" / "checkpoints" / f"step_{STEPS:08d}"
    shutil.copytree(run / "checkpoints" / f"step_{STEPS:08d}", old)
    meta_path = old / "client_state.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["train"]["objective"], meta["config"]["train"]["mlm"]
    meta_path.write_text(json.dumps(meta))
    assert _eval(["--checkpoint", str(old), "--data", val, "--context-lengths", "32"]) == 2
    assert "trained with the next-token objective" in capsys.readouterr().err
