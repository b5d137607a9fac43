"""transformers `.generate()` on an export, with and without the cache (FluidLMCache), after prompts
of 1k and 8k tokens, on the CPU with 1 torch thread; and whether its greedy tokens equal
`fluidlm generate`'s (fluidlm.generate.generate, which streams through FluidLM.forward_stream).

The model is configs/tiny-cpu.yaml's DA model (untrained, seed 0: speed does not depend on the
weights), written as an export folder and loaded with AutoModelForCausalLM(trust_remote_code=True).
Decode tokens/s: a logits processor stamps the time of each step; (N - 1) / (last stamp - first
stamp), so the prompt (the first step) is not counted.

    python bench/hf_generate.py        # writes bench/results/hf_generate_cpu.{md,json}
    python bench/hf_generate.py --lengths 256 --new-tokens 4 --uncached-new-tokens 2 --out /tmp/h
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def write_export(model, out: Path) -> None:
    """The files `fluidlm export` writes for the model (no tokenizer)."""
    from safetensors.torch import save_file

    from fluidlm.export import CONFIG, HF_DIR, MODEL_FILES, WEIGHTS, hf_config

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(hf_config(model.config.model_dump(mode="json"), dtype="fp32")))
    for name in MODEL_FILES:
        shutil.copyfile(HF_DIR / name, out / name)


class StepClock:
    """A logits processor that only records when each generation step reached it."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,8192")
    p.add_argument("--new-tokens", type=int, default=32, help="cached: new tokens per measurement")
    p.add_argument("--uncached-new-tokens", type=int, default=4, help="uncached: new tokens (each reruns the prompt)")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny-cpu.yaml"))
    p.add_argument("--out", default=str(RESULTS / "hf_generate_cpu"))
    args = p.parse_args()

    import torch
    import transformers
    import yaml
    from transformers import AutoModelForCausalLM

    from fluidlm.generate import generate
    from fluidlm.model import FluidLM, ModelConfig

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = FluidLM(ModelConfig.model_validate(yaml.safe_load(Path(args.config).read_text())["model"])).eval()
    folder = Path(tempfile.mkdtemp())
    write_export(model, folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        # ids from 3: no pad id (0) in the prompt, so generate() infers no padding
        prompt = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
        row = {"prompt": n}
        with torch.no_grad():
            for cached, new in ((True, args.new_tokens), (False, args.uncached_new_tokens)):
                clock = StepClock()
                start = time.perf_counter()
                tokens = hf.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=None, use_cache=cached,
                                     logits_processor=[clock])[0, n:]
                key = "cached" if cached else "uncached"
                row[f"{key}_tokens_per_s"] = (new - 1) / (clock.stamps[-1] - clock.stamps[0])
                row[f"{key}_first_token_s"] = clock.stamps[0] - start
                if cached:
                    cached_tokens = tokens
            ours = list(generate(model, prompt[0].tolist(), max_new_tokens=args.new_tokens, temperature=0))
        row["greedy_equal_to_fluidlm"] = cached_tokens.tolist() == ours
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "transformers": transformers.__version__, "threads": 1,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "new_tokens": args.new_tokens,
            "uncached_new_tokens": args.uncached_new_tokens}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# transformers .generate() on an export, CPU ({meta['machine']}, 1 thread), {meta['date']}", "",
             f"`python bench/{meta['command']}`; torch {meta['torch']}, transformers {meta['transformers']}; "
             "configs/tiny-cpu.yaml DA model, untrained; greedy.", "",
             "| prompt | cached tokens/s | uncached tokens/s | speed-up | cached first token s | greedy = fluidlm generate |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prompt']:,} | {r['cached_tokens_per_s']:.1f} | {r['uncached_tokens_per_s']:.2f} | "
                     f"{r['cached_tokens_per_s'] / r['uncached_tokens_per_s']:.0f}× | {r['cached_first_token_s']:.2f} | "
                     f"{'yes' if r['greedy_equal_to_fluidlm'] else 'NO'} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())
    return 0 if all(r["greedy_equal_to_fluidlm"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
