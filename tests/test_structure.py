"""The code's structure, as the design states it (docs/design.md, "Code layout"):

- packages depend one way: kernels ← model ← parallel ← train / eval / launch, eval ← export; data stands alone;
  no import cycle between packages (every import counted, also those inside functions);
- `fluidlm/parallel/parallelize.py` is the only place outside `parallel/` that parallelism is applied from;
- the pipeline's stages are the model's own modules (same parameter objects, the flat model's names).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fluidlm"
# What each package may import from fluidlm (itself always).
ALLOWED = {
    "kernels": set(),
    "model": {"kernels"},
    "parallel": {"kernels", "model"},
    "data": set(),
    "train": {"kernels", "model", "parallel", "data"},
    "eval": {"kernels", "model", "parallel", "data", "train"},
    "launch": {"kernels", "model", "parallel", "data", "train"},
    "export": {"kernels", "model", "parallel", "data", "train", "eval"},
}


def _imports(path: Path) -> set[str]:
    """Every fluidlm module `path` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fluidlm")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fluidlm"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (ROOT / parts[1]).is_dir() else None


def package_graph() -> dict[str, dict[str, set[str]]]:
    """{package: {imported package: the files that import it}}."""
    graph: dict[str, dict[str, set[str]]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if len(rel.parts) < 2:
            continue  # fluidlm/cli.py, info.py: the top, may import anything
        src = rel.parts[0]
        for module in _imports(path):
            dst = _package(module)
            if dst and dst != src:
                graph.setdefault(src, {}).setdefault(dst, set()).add(str(rel))
    return graph


def test_packages_depend_one_way():
    graph = package_graph()
    assert set(graph) <= set(ALLOWED), f"new package(s) {set(graph) - set(ALLOWED)}: give them a place in ALLOWED"
    wrong = {f"{src} → {dst}": sorted(files) for src, deps in graph.items() for dst, files in deps.items()
             if dst not in ALLOWED[src]}
    assert not wrong, f"imports against the direction kernels ← model ← parallel ← train/eval/launch: {wrong}"


def test_no_import_cycle_between_packages():
    graph = {src: set(deps) for src, deps in package_graph().items()}

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, (*seen, n))) for n in graph.get(a, ()))

    cycles = sorted(p for p in graph if reaches(p, p))
    assert not cycles, f"packages in an import cycle: {cycles}"


def test_the_walk_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from fluidlm.parallel.context import shard_range\n")
    assert "fluidlm.parallel.context" in _imports(f)


APPLIERS = ("TensorParallelLayers(", "apply_context_parallel(", "pipeline_module(", "shard_state_dict(")


def test_parallelism_is_applied_only_in_parallelize():
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "parallel":
            continue
        text = path.read_text()
        offenders += [f"{rel}: {name}" for name in APPLIERS if name in text]
    assert not offenders, f"apply parallelism through fluidlm/parallel/parallelize.py: {offenders}"


def test_pipeline_stages_are_the_models_own_modules():
    pytest.importorskip("deepspeed")
    from fluidlm.model import FluidLM, ModelConfig
    from fluidlm.parallel.pipeline import stage_specs
    from fluidlm.train.universal import dense_name

    config = ModelConfig(vocab_size=64, d_model=16, n_layers=3, n_heads=2, head_dim=8, max_seq_len=64)
    model = FluidLM(config)
    own = dict(model.named_parameters())
    seen = {}
    layers = [spec.build() for spec in stage_specs(model)]
    for index, layer in enumerate(layers):
        for name, p in layer.named_parameters():
            engine_name = f"tied_modules.embed.{name}" if index in (0, len(layers) - 1) else f"{index}.{name}"
            dense = dense_name(engine_name, config.model_dump(), pipeline=True)
            assert own[dense] is p, f"pipeline layer {index} holds {name} as a new tensor, not the model's {dense}"
            seen[dense] = p
    assert set(seen) == set(own)  # every parameter of the model is in exactly the stages it belongs to
    assert layers[0].embed is layers[-1].embed is model.embed  # the tied head is the embedding
