"""Run several single-process training jobs in ONE process (DeepSpeed's import and the gloo
world of one are paid once): `python tests/train_runner.py jobs.json results.json`.

jobs.json: [{"name", "config": {...}, "resume": null | "auto" | PATH,
             "fail_publish_at": null | step}]   (fail_publish_at: raise between "checkpoint
             written" and "renamed + latest updated", as a save killed half-way)
results.json: {name: {"code", "error", "stderr", "seconds", "latest", "entries"}} (latest and
entries: the run's checkpoints/ folder right after the job)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path


def main() -> None:
    jobs_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    from fluidlm.train import checkpoint as ckpt
    from fluidlm.train.cli import prepare
    from fluidlm.train.config import ConfigError
    from fluidlm.train.loop import train

    import yaml

    original_hook = ckpt.before_publish
    results = {}
    for job in json.loads(jobs_path.read_text()):
        config_path = jobs_path.parent / f"{job['name']}.yaml"
        config_path.write_text(yaml.safe_dump(job["config"]))
        args = argparse.Namespace(config=str(config_path), overrides=[], resume=job.get("resume"), print_config=False)
        fail_at = job.get("fail_publish_at")

        def hook(tmp, final, fail_at=fail_at):
            if fail_at is not None and final.name == ckpt.tag_for(fail_at):
                raise KeyboardInterrupt(f"simulated kill while publishing {final.name}")

        ckpt.before_publish = hook if fail_at is not None else original_hook
        err = io.StringIO()
        start = time.perf_counter()
        code, error = None, None
        with contextlib.redirect_stderr(err):
            try:
                config, resume_from = prepare(args)
                code = train(config, resume_from)
            except (ConfigError, ValueError, KeyboardInterrupt) as exc:
                error = f"{type(exc).__name__}: {exc}"
        ck = Path(job["config"]["train"]["run_dir"]) / "checkpoints"
        results[job["name"]] = {
            "code": code, "error": error, "stderr": err.getvalue(), "seconds": time.perf_counter() - start,
            "latest": (ck / "latest").read_text().strip() if (ck / "latest").exists() else None,
            "entries": sorted(p.name for p in ck.iterdir()) if ck.is_dir() else [],
        }
        print(f"[runner] {job['name']}: code={code} error={error} {results[job['name']]['seconds']:.1f}s", flush=True)
    out_path.write_text(json.dumps(results, indent=2))
    from fluidlm.train.loop import shutdown

    shutdown()


if __name__ == "__main__":
    main()
