"""spark_jobs.compare_engines as a user runs it, on the embedded engine (the LLM variants run
the same code; their figures are in docs/QUALITY.md)."""
import json

from spark_jobs import compare_engines


def test_side_by_side_and_distillation_on_the_same_movies(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare_engines.main(["--limit", "60", "--variants", "minilm", "--distill-from",
                                 "minilm", "--distill-head", "40", "--out", str(out)]) == 0
    report = json.loads((out / "side_by_side.json").read_text())
    row, = report["rows"]
    assert row["variant"] == "minilm" and row["errors"] == 0 and row["hit_n"] == 60
    assert 0 <= row["strict_accuracy"] <= 1 and 0 < row["majority_baseline"] <= 1
    assert (out / "minilm" / "metrics.json").exists()
    d = report["distillation"]
    assert d["head_items"] == 40 and d["tail_items"] == 20
    assert 0 < d["trained_on"] <= 40  # a held-out share of the head measures the student
    assert set(d["against_human_on_tail"]) == {"teacher", "student"}
    assert (out / "student" / "genre.json").exists()
    printed = capsys.readouterr().out
    assert "| MiniLM embedding, zero-shot (the default) |" in printed
    assert "Distillation: the teacher labelled the 40 most popular movies" in printed


def test_bad_choices_are_refused_with_one_line(tmp_path, capsys):
    assert compare_engines.main(["--variants", "gpt5", "--out", str(tmp_path)]) == 2
    assert "unknown variants ['gpt5']" in capsys.readouterr().err
    assert compare_engines.main(["--variants", "minilm", "--out", str(tmp_path)]) == 2
    assert "--distill-from smollm2-vllm is not among the variants" in capsys.readouterr().err
