"""lm-evaluation-harness as a client of an export (issue 32): `lm_eval.simple_evaluate` with the `hf`
model (trust_remote_code, batched, prefix_token_id=2 so a document follows an end of document, as
in training) on a local loglikelihood_rolling task over held-out text scores each document exactly
as FluidLM does (relative 1e-6), and its nats/token agrees with `fluidlm eval` on the same file (the two
score one different target: lm-eval the first token after the prefix, fluidlm eval the final EOS).
Skipped without lm-eval (an optional dependency: `pip install 'fluidlm[lmeval]'`)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from export_helpers import tiny_model, train_test_tokenizer, write_checkpoint

TASK = """task: fluid_heldout
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def held_out_texts(root, count=8):
    """Short documents (each fits one window): paragraphs of this repository's docs."""
    text = (root / "docs" / "design.md").read_text()
    paragraphs = [p.strip() for p in text.split("\n\n") if 80 < len(p.strip()) < 300]
    return paragraphs[:count]


def test_lm_eval_scores_the_export_like_fluidlm(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pathlib import Path

    import lm_eval
    from lm_eval.tasks import TaskManager

    from fluidlm.cli import main
    from fluidlm.data.tokenizer import load_tokenizer

    root = Path(__file__).resolve().parents[1]
    tok_path = train_test_tokenizer(tmp_path / "tokenizer.model")
    sp = load_tokenizer(tok_path)
    model = tiny_model("da", seed=5, vocab_size=sp.get_piece_size(), max_seq_len=256)
    run = tmp_path / "run"
    write_checkpoint(model, run)
    export = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run), "--out", str(export), "--tokenizer", str(tok_path)]) == 0
    texts = held_out_texts(root)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "fluid_heldout.yaml").write_text(TASK.format(docs=docs))

    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={export},trust_remote_code=True,prefix_token_id=2,dtype=float32",
        tasks=["fluid_heldout"], task_manager=TaskManager(include_path=str(tasks)), batch_size=4, device="cpu",
        log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"]["fluid_heldout"], key=lambda s: s["doc_id"])
    got = [float(s["resps"][0][0]) if not isinstance(s["resps"][0][0], (list, tuple)) else float(s["resps"][0][0][0])
           for s in samples]

    # FluidLM's own log-likelihood of each document after an end-of-document token
    ids = [sp.encode(t) for t in texts]
    assert all(len(d) < 256 for d in ids)
    expected = []
    with torch.no_grad():
        for d in ids:
            logp = torch.log_softmax(model(torch.tensor([[2] + d[:-1]]))[0].double(), -1)
            expected.append(float(logp[torch.arange(len(d)), torch.tensor(d)].sum()))
    assert got == pytest.approx(expected, rel=1e-6)  # fp32 sums of ~200 token log-probabilities

    # `fluidlm eval` on the same file: nats/token within 2 % (one target of ~60 differs per document)
    report = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--data", str(docs), "--tokenizer", str(tok_path),
                 "--context-lengths", "256", "--out", str(report), "--no-mlflow", "--no-plot", "--no-progress"]) == 0
    fluid = json.loads(report.read_text())["results"][0]
    lm_eval_nats = -sum(got) / sum(len(d) for d in ids)
    assert fluid["tokens"] == sum(len(d) for d in ids)  # each document and its EOS, less the unscored first token
    assert math.isclose(lm_eval_nats, fluid["loss"], rel_tol=0.02), (lm_eval_nats, fluid["loss"])
    print(f"lm-eval {lm_eval_nats:.5f} vs fluidlm eval {fluid['loss']:.5f} nats/token")
