"""scripts/mutation.py's bookkeeping (the mutmut runs themselves are `make mutation`, outside the suite)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mutation_script", ROOT / "scripts" / "mutation.py")
mutation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation)


def test_equivalent_mutants_are_the_backquoted_names_at_the_start_of_table_rows(tmp_path):
    doc = tmp_path / "testing.md"
    doc.write_text("| mutant | why |\n| --- | --- |\n| `a.x_f__mutmut_3` | reason, naming `a.x_g__mutmut_9` |\n"
                   "text with `a.x_h__mutmut_1` outside a row\n|`a.x_k__mutmut_12`| as above |\n")
    assert mutation.equivalent_mutants(doc) == {"a.x_f__mutmut_3", "a.x_k__mutmut_12"}
    assert mutation.equivalent_mutants(tmp_path / "missing.md") == set()


def test_summary_counts_killed_over_non_equivalent_and_flags_stale_entries(capsys):
    prefix = "sparsevl.eval.metrics."
    statuses = {prefix + "x_a__mutmut_1": "killed", prefix + "x_a__mutmut_2": "timeout",
                prefix + "x_a__mutmut_3": "survived", prefix + "x_a__mutmut_4": "survived",
                prefix + "x_a__mutmut_5": "not checked", prefix + "x_a__mutmut_6": "killed"}
    equivalent = {prefix + "x_a__mutmut_4", prefix + "x_a__mutmut_6"}  # the second one is killed: stale
    assert mutation.summarize("metrics", statuses, equivalent) == (2, 3)  # a timeout counts as killed
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "metrics: 2 killed of 3 (2 equivalent) = 0.67; 1 mutants not run yet (interrupted run)"
    assert out[1:] == [f"  not killed: {prefix}x_a__mutmut_3 (survived)",
                       f"  listed as equivalent but killed or gone: {prefix}x_a__mutmut_6"]


def test_survivors_only_reruns_survivors_and_new_mutants_but_not_listed_equivalents(monkeypatch, tmp_path):
    """First pass: the survivor and the unchecked mutant, not the equivalent one; the run then regenerates a
    changed function's mutants ("not checked"), which a second pass runs; then nothing is left to run."""
    rounds = [{"m.x_a__mutmut_1": "killed", "m.x_a__mutmut_2": "survived", "m.x_a__mutmut_3": "survived",
               "m.x_b__mutmut_1": "not checked"},
              {"m.x_a__mutmut_1": "killed", "m.x_a__mutmut_2": "killed", "m.x_a__mutmut_3": "survived",
               "m.x_b__mutmut_1": "survived", "m.x_c__mutmut_1": "not checked"},
              {"m.x_a__mutmut_1": "killed", "m.x_a__mutmut_2": "killed", "m.x_a__mutmut_3": "survived",
               "m.x_b__mutmut_1": "survived", "m.x_c__mutmut_1": "killed"}]
    runs = []
    monkeypatch.setattr(mutation, "statuses", lambda name, work, mutmut, env: rounds[len(runs)])
    monkeypatch.setattr(mutation, "_mutmut_run", lambda work, mutmut, env, children, names: runs.append(names))
    final = mutation.run_module("metrics", tmp_path, 2, survivors_only=True,
                                equivalent=frozenset({"m.x_a__mutmut_3"}))
    assert runs == [["m.x_a__mutmut_2", "m.x_b__mutmut_1"], ["m.x_c__mutmut_1"]]  # a tried survivor is not retried
    assert final == rounds[2]


def test_survivors_only_without_survivors_still_runs_once_to_find_changed_functions(monkeypatch, tmp_path):
    """mutmut regenerates the mutants of changed functions only when it runs: with every mutant killed, one killed
    mutant runs, after which the regenerated ones ("not checked") run."""
    rounds = [{"m.x_a__mutmut_1": "killed", "m.x_b__mutmut_1": "killed"},
              {"m.x_a__mutmut_1": "killed", "m.x_b__mutmut_1": "not checked"},
              {"m.x_a__mutmut_1": "killed", "m.x_b__mutmut_1": "killed"}]
    runs = []
    monkeypatch.setattr(mutation, "statuses", lambda name, work, mutmut, env: rounds[len(runs)])
    monkeypatch.setattr(mutation, "_mutmut_run", lambda work, mutmut, env, children, names: runs.append(names))
    assert mutation.run_module("metrics", tmp_path, 2, survivors_only=True) == rounds[2]
    assert runs == [["m.x_a__mutmut_1"], ["m.x_b__mutmut_1"]]
