"""Kill mmloom commands with SIGKILL at random moments and check that nothing is lost or looks
complete when it is not.

For each command (`data build` fresh and `--overwrite` over a finished build, `convert --to hf-llava`,
`merge-lora`, `train`), a reference run gives the complete result; then, round after round, the same
command starts from the same state and is killed (kill -9: no handler runs) at a random moment, and
the outcome must be one of:

- complete and identical to the reference (byte for byte; for `train`, the same losses and weights);
- the state before the command (an export's destination absent);
- refused at the next start: a data folder without data_params.json is refused by `mmloom train`, and
  rebuilt only with `--overwrite`; a killed `train` resumes and ends identical to the reference.

Usage (from the project root):

    .venv/bin/python tests/fault_injection.py                 # 3 rounds per command (a few minutes)
    .venv/bin/python tests/fault_injection.py --rounds 20 --commands train convert --seed 7
    .venv/bin/python tests/fault_injection.py --when writing  # kill once the output is being written

Prints one line per round and exits 1 when any outcome is neither. tests/test_fault_injection.py runs
one round of each command killed while it writes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
IGNORED = (".mmloom.lock",)  # a lock file a killed command leaves: the kernel released its lock


def mmloom(*args, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mmloom", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900, **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"mmloom {' '.join(map(str, args))} failed: {proc.stderr[-2000:]}")
    return proc


def snapshot(path: Path, root: Path) -> dict[str, str]:
    """{relative path: sha256 | "dir"} of a folder (lock files left out; `root` written as ROOT in
    JSON files, which record absolute paths); {} when absent."""
    def digest(p: Path) -> str:
        data = p.read_bytes()
        if p.suffix == ".json":
            data = data.replace(str(root).encode(), b"ROOT")
        return hashlib.sha256(data).hexdigest()

    if not path.exists():
        return {}
    return {str(p.relative_to(path)): "dir" if p.is_dir() else digest(p)
            for p in sorted(path.rglob("*")) if p.name not in IGNORED}


def weights_digest(folder: Path) -> str:
    from safetensors import safe_open

    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in sorted(f.keys()):
                digest.update(key.encode() + f.get_tensor(key).numpy().tobytes())
    return digest.hexdigest()


def run_outcome(run: Path) -> dict:
    """What a training run produced that must not depend on kills: losses per step, final weights."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    return {"steps": steps, "losses": {r["step"]: r["loss"] for r in records if "loss" in r},
            "final": weights_digest(run / "final_model")}


@dataclass
class Scenario:
    """A command with its starting state and how to judge a killed run of it."""

    name: str
    prepare: Callable[[Path], None]  # builds the starting state in a fresh folder
    args: Callable[[Path], list]  # the command line (after `mmloom`)
    output: Callable[[Path], Path]  # what it writes
    writing: Callable[[Path], bool]  # the output is being written (for --when writing)
    judge: Callable[[Path, dict], str]  # the outcome of a killed run: "complete", "old state", ... or raises


class Violation(Exception):
    pass


def scenarios(base: Path) -> dict[str, Scenario]:
    import yaml

    from test_train_loop import TINY, make_data, overrides

    data = make_data(base / "data", n=16)
    build_cfg = yaml.safe_load((data / "phase1_build.yaml").read_text())
    build_cfg["setup"]["samples_per_file"] = 2  # 8 files: a kill lands between them
    build_cfg["setup"]["processes"] = 2
    (base / "build.yaml").write_text(yaml.safe_dump(build_cfg))
    train = ["train", TINY / "phase1.yaml", "--set", "runconfig.max_steps=8", "--set", "runconfig.checkpoint_steps=2",
             "--set", "runconfig.keep_last=2", "--set", "runconfig.log_steps=1",
             *[x for s in overrides(data, 1) for x in ("--set", s)]]
    lora = ["train", TINY / "phase2.yaml", "--set", "runconfig.checkpoint_path=null", "--set", "runconfig.max_steps=2",
            "--set", "model.lora={r: 4, alpha: 8, dropout: 0.0}", *[x for s in overrides(data, 2) for x in ("--set", s)]]

    def lora_run(_root: Path) -> None:  # the LoRA run convert and merge-lora read (trained once, when needed)
        if not (base / "lora" / "final_model").is_dir():
            mmloom(*lora, "--model-dir", base / "lora")

    def build_cfg_at(root: Path) -> Path:
        cfg = dict(build_cfg, setup={**build_cfg["setup"], "output_dir": str(root / "h5")})
        (root / "build.yaml").write_text(yaml.safe_dump(cfg))
        return root / "build.yaml"

    def judge_build(root: Path, reference: dict) -> str:
        out = root / "h5"
        now = snapshot(out, root)
        if now == reference:
            return "complete"
        if "data_params.json" in now:
            raise Violation(f"data_params.json beside files that differ from the reference build: {sorted(now)}")
        proc = mmloom(*train, "--model-dir", root / "run", "--set", f"train_input.data_dir={out}", "--set",
                      f"eval_input.data_dir={out}", check=False)
        if proc.returncode == 0 or "Traceback" in proc.stderr:
            raise Violation(f"train on the unfinished build: rc={proc.returncode} {proc.stderr[-300:]}")
        if any(out.glob("*.h5")) and mmloom("data", "build", root / "build.yaml", "--quiet", check=False).returncode == 0:
            raise Violation("an unfinished build folder was built over without --overwrite")
        mmloom("data", "build", root / "build.yaml", "--quiet", "--overwrite")
        if snapshot(out, root) != reference:
            raise Violation("the rebuild with --overwrite differs from the reference")
        return "refused by train, rebuilt with --overwrite"

    def judge_export(root: Path, reference: dict, dst_name: str) -> str:
        now = snapshot(root / dst_name, root)
        if now == reference:
            return "complete"
        if not now:
            return "old state (no destination)"
        raise Violation(f"{dst_name} exists but differs from the reference ({len(now)} entries)")

    def judge_train(root: Path, reference: dict) -> str:
        run = root / "run"
        mmloom(*train, "--model-dir", run)  # resume (or start again) to the end
        got = run_outcome(run)
        if got != reference:
            raise Violation(f"resumed run differs: steps {got['steps']}, weights equal: {got['final'] == reference['final']}")
        return "resumed identical"

    def finished_build(root: Path) -> None:
        mmloom("data", "build", build_cfg_at(root), "--quiet")

    return {
        "build": Scenario(
            "data build", lambda root: build_cfg_at(root), lambda root: ["data", "build", root / "build.yaml", "--quiet"],
            lambda root: root / "h5", lambda root: any((root / "h5").glob("*data-*.h5*")), judge_build),
        "rebuild": Scenario(
            "data build --overwrite", finished_build,
            lambda root: ["data", "build", root / "build.yaml", "--quiet", "--overwrite"], lambda root: root / "h5",
            lambda root: not (root / "h5" / "data_params.json").exists(), judge_build),
        "convert": Scenario(
            "convert --to hf-llava", lora_run,
            lambda root: ["convert", "--from", "mmloom", "--to", "hf-llava", base / "lora" / "final_model", root / "export"],
            lambda root: root / "export", lambda root: any(root.glob(".export.tmp-*")),
            lambda root, ref: judge_export(root, ref, "export")),
        "merge": Scenario(
            "merge-lora", lora_run, lambda root: ["merge-lora", base / "lora", root / "merged"],
            lambda root: root / "merged", lambda root: any(root.glob(".merged.tmp-*")),
            lambda root, ref: judge_export(root, ref, "merged")),
        "train": Scenario(
            "train", lambda root: None, lambda root: [*train, "--model-dir", root / "run"], lambda root: root / "run",
            lambda root: any((root / "run").glob(".checkpoint-*.tmp-partial")) if (root / "run").is_dir() else False,
            judge_train),
    }


def reference_of(scenario: Scenario, root: Path) -> tuple[dict, float]:
    root.mkdir(parents=True)
    scenario.prepare(root)
    start = time.monotonic()
    mmloom(*scenario.args(root))
    took = time.monotonic() - start
    result = run_outcome(root / "run") if scenario.name == "train" else snapshot(scenario.output(root), root)
    return result, took


def killed_round(scenario: Scenario, root: Path, reference: dict, took: float, rng: random.Random,
                 when: str) -> str:
    scenario.prepare(root)
    proc = subprocess.Popen([sys.executable, "-m", "mmloom", *map(str, scenario.args(root))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    start = time.monotonic()
    if when == "writing":
        while proc.poll() is None and not scenario.writing(root) and time.monotonic() - start < 600:
            time.sleep(0.002)
        moment = "while writing" if proc.poll() is None else "after it ended"
    else:
        delay = rng.uniform(0.0, took * 1.1)
        while proc.poll() is None and time.monotonic() - start < delay:
            time.sleep(0.005)
        moment = f"at {delay:.1f} s of ~{took:.1f} s" if proc.poll() is None else "after it ended"
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return f"killed {moment}: {scenario.judge(root, reference)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="kills per command (default 3)")
    parser.add_argument("--commands", nargs="+", default=["build", "rebuild", "convert", "merge", "train"],
                        choices=["build", "rebuild", "convert", "merge", "train"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    parser.add_argument("--when", choices=["random", "writing"], default="random",
                        help="kill at a random moment of the run, or once the output is being written")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="mmloom-faults-") as tmp:
        base = args.workdir or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        all_scenarios = scenarios(base)
        for key in args.commands:
            scenario = all_scenarios[key]
            reference, took = reference_of(scenario, base / f"{key}-reference")
            for i in range(args.rounds):
                root = base / f"{key}-{i}"
                root.mkdir()
                try:
                    outcome = killed_round(scenario, root, reference, took, rng, args.when)
                    print(f"ok   {scenario.name} round {i + 1}: {outcome}", flush=True)
                except Violation as err:
                    failures += 1
                    print(f"FAIL {scenario.name} round {i + 1}: {err}", flush=True)
                shutil.rmtree(root, ignore_errors=True)
    print(f"{'FAIL' if failures else 'PASS'}: {failures} of {args.rounds * len(args.commands)} kills left a result "
          "that is neither complete and identical nor refused at the next start", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
