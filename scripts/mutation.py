"""Mutation testing of the core modules with mutmut 3 (`make mutation`; slow, not part of CI).

Each module is mutated in its own copy of the working tree (runs/mutation/<name>), where mutmut runs only the
test files listed for it (and of those, only the tests that reach the mutated function). Mutants that
docs/testing.md lists as equivalent (a table row starting with the mutant's name in backquotes) leave the
count; a timeout counts as killed (the tests noticed). The last line is `mutation score: N.NN`, killed over
non-equivalent mutants of all modules run.

    python scripts/mutation.py [--modules metrics vlm ...] [--max_children 1] [--survivors_only | --report_only]
"""

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "testing.md"

# name -> (files to mutate, test files that exercise them); SCOPE narrows a module to some functions' mutants
MODULES = {
    "conversation": (["sparsevl/data/conversation.py"],
                     ["tests/test_conversation.py", "tests/test_conversation_oracle.py", "tests/test_dataset.py"]),
    "metrics": (["sparsevl/eval/metrics.py"], ["tests/test_metrics.py", "tests/test_eval_benchmarks.py"]),
    "trainer": (["sparsevl/train/trainer.py", "sparsevl/train/checkpointing.py"],
                ["tests/test_resume.py", "tests/test_train.py", "tests/test_nan_guard.py",
                 "tests/test_trainer_units.py", "tests/test_trainer_sharded.py"]),
    "vlm": (["sparsevl/model/vlm.py"], ["tests/test_vlm.py", "tests/test_oracles.py", "tests/test_serve.py",
                                        "tests/test_pruning.py", "tests/test_vlm_units.py"]),
    "moe": (["sparsevl/model/moe.py"], ["tests/test_moe.py", "tests/test_moe_reference.py", "tests/test_moe_tuning.py"]),
    "pruning": (["sparsevl/model/pruning.py"], ["tests/test_pruning.py", "tests/test_pruning_reference.py",
                                                "tests/test_pruning_cli.py"]),
}
SCOPE = {  # vlm.py: merging images into the text and generation (adaptive layers and pruning have their own modules)
    "vlm": [f"sparsevl.model.vlm.{name}__mutmut_*" for name in (
        "xǁSparseVLMǁprepare_inputs", "xǁSparseVLMǁmerge_inputs", "xǁSparseVLMǁ_merge_row", "xǁSparseVLMǁgenerate",
        "xǁSparseVLMǁ_pruned_step", "xǁSparseVLMǁlm_logits", "x__pad_rows", "x__next_token", "x__until_eos",
        "x_causal_lm_loss", "x_pop_module_losses")],
}
KILLED = {"killed", "timeout"}
RESULT_LINE = re.compile(r"^\s*(\S+__mutmut_\d+): (.+)$")
EQUIVALENT_ROW = re.compile(r"^\|\s*`(\S+__mutmut_\d+)`\s*\|")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modules", nargs="+", choices=list(MODULES), default=list(MODULES), help="modules to mutate")
    p.add_argument("--max_children", type=int, default=1, help="mutants tested in parallel (mutmut --max-children)")
    p.add_argument("--survivors_only", action="store_true",
                   help="refresh the copy in runs/mutation/<name> and re-test only the mutants its last run left alive "
                        "(those listed as equivalent excepted)")
    p.add_argument("--report_only", action="store_true", help="run nothing: summarize the last run of each module")
    p.add_argument("--out", default=str(ROOT / "runs" / "mutation"), help="folder of the per-module copies")
    return p.parse_args(argv)


def equivalent_mutants(doc: Path = DOC) -> set[str]:
    """Mutant names that docs/testing.md lists as equivalent."""
    if not doc.is_file():
        return set()
    return {m.group(1) for line in doc.read_text().splitlines() if (m := EQUIVALENT_ROW.match(line))}


def prepare_copy(name: str, out: Path, keep: bool) -> Path:
    """A copy of the tracked and untracked (not ignored) files with a setup.cfg naming what mutmut does."""
    mutated, tests = MODULES[name]
    work = out / name
    if work.exists() and not keep:
        shutil.rmtree(work)
    # mutmut maps each function to the tests that reach it in a clean run; tests added since must be mapped too
    (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for file in files:
        if (ROOT / file).is_file():
            (work / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / file, work / file)
    tests = [t for t in tests if (ROOT / t).is_file()]
    lines = ["[mutmut]", "source_paths = sparsevl", "only_mutate =", *(f"    {m}" for m in mutated),
             "pytest_add_cli_args_test_selection =", *(f"    {t}" for t in tests),
             "pytest_add_cli_args =", "    -p", "    no:cacheprovider", "    -m", "    not slow"]
    (work / "setup.cfg").write_text("\n".join(lines) + "\n")
    return work


def run_module(name: str, work: Path, max_children: int, survivors_only: bool, report_only: bool = False,
               equivalent: frozenset[str] = frozenset()) -> dict[str, str]:
    """mutmut run in `work` (the module's mutants in scope, or those its last run left alive and docs/testing.md
    does not list as equivalent); returns {mutant: status} of the mutants in scope."""
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "SPARSEVL_TEST_CACHE": str(work / "fixture_cache")}  # session fixtures built once, not per mutant
    env.pop("PYTHONPATH", None)  # mutmut puts its mutated copy first on the path itself
    if report_only:
        return statuses(name, work, mutmut, env)
    if not survivors_only:
        _mutmut_run(work, mutmut, env, max_children, SCOPE.get(name, []))
        return statuses(name, work, mutmut, env)
    tried: set[str] = set()
    while True:  # survivors first; a function changed since the last run gets new, unchecked mutants on the way
        found = statuses(name, work, mutmut, env)
        names = sorted(m for m, status in found.items()
                       if status not in KILLED and m not in tried and m not in equivalent)
        if not tried and not names and found:  # mutmut regenerates changed functions' mutants only when it runs
            names = [min(found)]
        if not names:
            return statuses(name, work, mutmut, env)
        _mutmut_run(work, mutmut, env, max_children, names)
        tried.update(names)


def _mutmut_run(work: Path, mutmut: str, env: dict, max_children: int, names: list[str]) -> None:
    with open(work / "mutmut_run.log", "a") as log:
        subprocess.run(["nice", mutmut, "run", "--max-children", str(max_children), *names], cwd=work, env=env,
                       stdout=log, stderr=subprocess.STDOUT)


def statuses(name: str, work: Path, mutmut: str, env: dict) -> dict[str, str]:
    listing = subprocess.run([mutmut, "results", "--all", "true"], cwd=work, env=env, capture_output=True,
                             text=True).stdout
    found = {m.group(1): m.group(2).strip() for line in listing.splitlines() if (m := RESULT_LINE.match(line))}
    scope = SCOPE.get(name)
    return {m: s for m, s in found.items() if not scope or any(fnmatch.fnmatch(m, p) for p in scope)}


def summarize(name: str, statuses: dict[str, str], equivalent: set[str]) -> tuple[int, int]:
    """Print the module's counts and its survivors; returns (killed, non-equivalent mutants)."""
    not_run = sorted(m for m, s in statuses.items() if s == "not checked")  # an interrupted run's remainder
    counted = {m: s for m, s in statuses.items() if m not in equivalent and s != "not checked"}
    killed = sum(s in KILLED for s in counted.values())
    survivors = sorted(m for m, s in counted.items() if s not in KILLED)
    prefixes = tuple(path.removesuffix(".py").replace("/", ".") + "." for path in MODULES[name][0])
    stale = sorted(m for m in equivalent if m.startswith(prefixes) and statuses.get(m, "killed") in KILLED)
    score = killed / len(counted) if counted else 0.0
    equivalents = len(statuses) - len(counted) - len(not_run)
    print(f"{name}: {killed} killed of {len(counted)} ({equivalents} equivalent) = {score:.2f}"
          + (f"; {len(not_run)} mutants not run yet (interrupted run)" if not_run else ""))
    for mutant in survivors:
        print(f"  not killed: {mutant} ({counted[mutant]})")
    for mutant in stale:
        print(f"  listed as equivalent but killed or gone: {mutant}")
    return killed, len(counted)


def main(argv=None) -> int:
    args = parse_args(argv)
    equivalent = equivalent_mutants()
    total_killed = total = 0
    for name in args.modules:
        work = Path(args.out) / name if args.report_only else prepare_copy(name, Path(args.out),
                                                                           keep=args.survivors_only)
        results = run_module(name, work, args.max_children, args.survivors_only, args.report_only,
                             frozenset(equivalent))
        killed, counted = summarize(name, results, equivalent)
        total_killed, total = total_killed + killed, total + counted
    print(f"mutation score: {total_killed / total if total else 0.0:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
