"""Decode speed and memory of `fluidlm generate`: DA (recurrent state through forward_stream) vs the
softmax baseline, after prompts of 1k, 8k and 32k tokens, on the CPU.

The model is configs/tiny-cpu.yaml's (untrained, seed 0: speed and memory do not depend on the
weights). Each point runs twice, each time in a fresh subprocess: the prompt (random ids) is consumed,
then greedy decoding measures the time of each new token after the first, and a thread samples the
resident memory every 2 ms during decoding. Times come from a run with glibc's default malloc; memory
from a run (at most 4 new tokens) with MALLOC_MMAP_THRESHOLD_=65536, so freed tensors go back to the
OS and RSS tracks live tensors (the default heap keeps the prefill's freed blocks). Reported: prefill seconds (prompt → first token), decode ms/token and
tokens/s, decode peak RSS above the loaded model (what decoding holds: DA's state, softmax's
activations of the whole sequence), the process's peak RSS, and DA's state size.

Both decode through FluidLM.forward_stream (what `fluidlm generate` runs), the prompt in --chunk
pieces: DA carries its recurrent state, the softmax baseline a KV cache (keys after RoPE and
values, per layer); "state KiB" is what each carries after the last token.

    python bench/generate.py                              # 1k, 8k, 32k; writes bench/results/generate_cpu.{md,json}
    python bench/generate.py --lengths 1024 --new-tokens 8 --out /tmp/g
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def tiny_model_config(config_path: Path) -> dict:
    import yaml

    return yaml.safe_load(Path(config_path).read_text())["model"]


def state_bytes(state) -> int:
    import torch

    total, stack = 0, [state]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif hasattr(x, "__dataclass_fields__"):  # StreamCache
            stack.extend(getattr(x, f) for f in x.__dataclass_fields__)
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total


def run_point(args) -> dict:
    import resource

    import torch

    from fluidlm.generate import _stream_step, sample_next
    from fluidlm.model import FluidLM, ModelConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig.model_validate({**tiny_model_config(args.config), "attention": args.attention})
    model = FluidLM(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    step = _stream_step
    with torch.no_grad():
        step(model, prompt[:, :8], None)  # warm-up
        baseline = rss_mib()
        t0 = time.perf_counter()
        state, chunk = None, args.chunk
        for s in range(0, args.prompt, chunk):
            logits, state = step(model, prompt[:, s:s + chunk], state)
        token = sample_next(logits[0, -1])
        prefill = time.perf_counter() - t0
        peak = [rss_mib()]
        done = threading.Event()

        def sample_rss():
            while not done.is_set():
                peak[0] = max(peak[0], rss_mib())
                time.sleep(0.002)

        watcher = threading.Thread(target=sample_rss, daemon=True)
        watcher.start()
        times = []
        for _ in range(args.new_tokens):
            t = time.perf_counter()
            logits, state = step(model, torch.tensor([[token]]), state)
            token = sample_next(logits[0, -1])
            times.append(time.perf_counter() - t)
        done.set()
        watcher.join()
    decode = sum(times)
    median = sorted(times)[len(times) // 2]
    return {"attention": args.attention, "prompt": args.prompt, "new_tokens": args.new_tokens, "prefill_s": prefill,
            "decode_ms_per_token": 1000 * decode / len(times), "decode_tokens_per_s": len(times) / decode,
            "decode_median_ms": 1000 * median,
            "first_ms": 1000 * times[0], "last_ms": 1000 * times[-1],
            "decode_peak_above_model_mib": peak[0] - baseline, "process_peak_rss_mib":
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "model_rss_mib": baseline,
            "state_bytes": state_bytes(state),
            "params": model.num_parameters()}


MEMORY_KEYS = ("decode_peak_above_model_mib", "process_peak_rss_mib", "model_rss_mib")


def measure(args, attention: str, prompt: int, new_tokens: int) -> dict:
    """Two fresh processes: time with glibc's default malloc, memory with MALLOC_MMAP_THRESHOLD_=65536
    (every allocation an mmap: RSS tracks live tensors, but large allocations get slower)."""
    timed = run_subprocess(args, attention, prompt, new_tokens, {})
    if "error" in timed:
        return timed
    mem = run_subprocess(args, attention, prompt, min(new_tokens, 4), {"MALLOC_MMAP_THRESHOLD_": "65536"})
    for key in MEMORY_KEYS:
        timed[key] = mem.get(key)
    return timed


def run_subprocess(args, attention: str, prompt: int, new_tokens: int, extra_env: dict) -> dict:
    cmd = [sys.executable, __file__, "--point", "--attention", attention, "--prompt", str(prompt), "--new-tokens",
           str(new_tokens), "--threads", str(args.threads), "--chunk", str(args.chunk), "--config", str(args.config)]
    env = {**os.environ, **extra_env, "PYTHONPATH": str(ROOT)}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"attention": attention, "prompt": prompt, "error": f"timeout > {args.timeout}s"}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        return {"attention": attention, "prompt": prompt, "error": tail[:100]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratio(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kib(r: dict) -> str:
    return f"{r['state_bytes'] / 2**10:,.0f}" if r.get("state_bytes") else r.get("error", "")


def fmt_k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,8192,32768", help="prompt lengths")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens measured after each prompt")
    p.add_argument("--chunk", type=int, default=1024, help="DA prompt tokens per forward_stream call")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared, loaded 2-core machine two "
                                                          "threads make single-token steps erratic)")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny-cpu.yaml"), help="YAML whose model: section is used")
    p.add_argument("--timeout", type=int, default=600, help="seconds per point")
    p.add_argument("--out", default=str(RESULTS / "generate_cpu"), help="prefix of the .md/.json outputs")
    p.add_argument("--point", action="store_true", help="(internal) one point, JSON on stdout")
    p.add_argument("--attention", default="da", choices=["da", "softmax"])
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--render", default=None, help="re-write the tables of an earlier run's JSON (no measuring)")
    args = p.parse_args()
    if args.point:
        print(json.dumps(run_point(args)))
        return
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        lengths = sorted({r["prompt"] for r in saved["points"]})
        return write_report(args, saved["title"], saved["command"], saved["model"], lengths, saved["points"])

    lengths = [int(x) for x in args.lengths.split(",")]
    load_before = os.getloadavg()
    points = []
    for n in lengths:
        for attention, new in (("da", args.new_tokens), ("softmax", args.new_tokens)):
            r = measure(args, attention, n, new)
            points.append(r)
            print(f"  {attention:>7} prompt={n:>6}: {r}", file=sys.stderr, flush=True)

    import torch
    model_cfg = tiny_model_config(args.config)
    cpu = f"{platform.machine()} {cpu_name()}"
    load_after = os.getloadavg()
    title = (f"Decoding after a prompt, CPU ({os.cpu_count()} cores, {cpu}, {args.threads} torch thread(s)), "
             f"configs/tiny-cpu.yaml model (untrained, {points[0].get('params', 0):,} parameters), torch {torch.__version__}, "
             f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}; machine shared with other jobs "
             f"(1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after)")
    command = f"python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}".rstrip()
    write_report(args, title, command, model_cfg, lengths, points)


def write_report(args, title, command, model_cfg, lengths, points):
    by = {(r["attention"], r["prompt"]): r for r in points}
    lines = [title, "", "Greedy decoding through FluidLM.forward_stream: DA carries its recurrent state, softmax a KV "
             "cache.", "",
             "| prompt | DA ms/token (median) | softmax ms/token (median) | DA tok/s | softmax tok/s | DA speed-up | DA decode MiB "
             "| softmax decode MiB | DA state KiB | softmax state KiB | DA peak RSS MiB | softmax peak RSS MiB "
             "| DA prefill s | softmax prefill s | tokens measured |", "|" + "---|" * 15]
    for n in lengths:
        d, s = by[("da", n)], by[("softmax", n)]
        def g(r, key, f="{:.1f}"):
            return f.format(r[key]) if key in r else r.get("error", "")
        speed = f"{ratio(d['decode_tokens_per_s'] / s['decode_tokens_per_s'])}×" if "error" not in d and "error" not in s else ""
        def ms(r):
            return f"{r['decode_ms_per_token']:.1f} ({r['decode_median_ms']:.1f})" if "error" not in r else r["error"]
        lines.append(f"| {fmt_k(n)} | {ms(d)} | {ms(s)} "
                     f"| {g(d, 'decode_tokens_per_s', '{:.3g}')} | {g(s, 'decode_tokens_per_s', '{:.3g}')} | {speed} "
                     f"| {g(d, 'decode_peak_above_model_mib')} | {g(s, 'decode_peak_above_model_mib')} "
                     f"| {kib(d)} | {kib(s)} "
                     f"| {g(d, 'process_peak_rss_mib', '{:.0f}')} | {g(s, 'process_peak_rss_mib', '{:.0f}')} "
                     f"| {g(d, 'prefill_s', '{:.2f}')} | {g(s, 'prefill_s', '{:.2f}')} "
                     f"| {d.get('new_tokens', '-')} |")
    lines += ["", "decode MiB = peak RSS while decoding minus the RSS of the loaded model (sampled every 2 ms); peak RSS "
              "= the whole process (model, prompt and prefill included).",
              "state KiB = the tensors forward_stream carries after the last token, all layers (DA: recurrent "
              "states, flow-conv and PDE neighbours; softmax: the KV cache and the PDE neighbours).",
              "", f"command: {command}"]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"title": title, "command": command, "model": model_cfg,
                                                    "points": points}, indent=2))


if __name__ == "__main__":
    main()
