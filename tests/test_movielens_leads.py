"""The demo catalogue's content: Wikipedia leads as item descriptions, and what bad lead
files and over-long texts do."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from spark_jobs import movielens
from spark_jobs.movielens import LeadsError, load_items, load_leads

MOVIES = pd.read_csv(movielens.DATA_DIR / "movies.csv")


@pytest.fixture(scope="module")
def items() -> pd.DataFrame:
    return load_items()


def test_every_movie_is_kept_and_the_leads_fill_the_description(items):
    shipped = pd.read_csv(movielens.LEADS)
    assert len(items) == len(MOVIES)  # a movie without a lead is never dropped
    assert items["has_lead"].sum() == len(shipped) == 6376
    with_lead = items.set_index("item_id").loc[shipped["movieId"]]
    assert (with_lead["description"].to_numpy() == shipped["lead"].str.strip().to_numpy()).all()
    without = items[~items["has_lead"]]
    assert without["description"].isna().all() and without["title"].notna().all()
    # the human genres never reach the text: they are the baseline the features must beat
    assert not items["description"].dropna().str.contains("Genres:").any()
    assert (items["title"] == MOVIES["title"]).all()


def test_the_licence_travels_with_the_text():
    readme = (movielens.LEADS.parent / "README.md").read_text()
    assert "CC BY-SA 4.0" in readme and "Wikipedia contributors" in readme
    assert set(pd.read_csv(movielens.LEADS, nrows=1).columns) >= {"movieId", "lead",
                                                                  "wikipedia_url"}


def write(tmp_path, rows: list[tuple]) -> str:
    path = tmp_path / "leads.csv"
    pd.DataFrame(rows, columns=["movieId", "lead"]).to_csv(path, index=False)
    return str(path)


def test_duplicate_ids_are_refused_naming_them(tmp_path):
    path = write(tmp_path, [(1, "A toy story."), (2, "A board game."), (1, "Another text.")])
    with pytest.raises(LeadsError, match=r"1 movieId\(s\) appear more than once \(e.g. 1\)"):
        load_leads(path, MOVIES["movieId"])


def test_empty_leads_and_unknown_ids_are_left_out_and_reported(tmp_path):
    path = write(tmp_path, [(1, "A toy story."), (2, "   "), (3, None), (999999999, "Nobody.")])
    notes: list[str] = []
    items = load_items(leads=path, notes=notes)
    assert len(items) == len(MOVIES)
    assert items["has_lead"].sum() == 1
    assert items.set_index("item_id").loc[1, "description"] == "A toy story."
    assert pd.isna(items.set_index("item_id").loc[2, "description"])
    assert any("2 empty lead(s)" in n and "2, 3" in n for n in notes)
    assert any("1 lead(s) for movieIds that are not in the catalogue" in n and "999999999" in n
               for n in notes)


def test_a_lead_file_without_its_columns_or_with_bad_ids_is_refused(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\n1,hello\n")
    with pytest.raises(LeadsError, match=r"missing columns \['lead', 'movieId'\]"):
        load_leads(bad, MOVIES["movieId"])
    with pytest.raises(LeadsError, match="must be integers"):
        load_leads(write(tmp_path, [("x1", "A text.")]), MOVIES["movieId"])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spark_jobs.movielens", *args],
                          capture_output=True, text=True, timeout=120)


def test_the_command_says_what_it_wrote_and_refuses_in_one_line(tmp_path):
    out = tmp_path / "items.parquet"
    done = run_cli("--out", str(out), "--limit", "20")
    assert done.returncode == 0, done.stderr
    written = pd.read_parquet(out)
    assert len(written) == 20 and written["has_lead"].dtype == bool
    assert f"wrote 20 items to {out} ({int(written['has_lead'].sum())} with a lead" in done.stdout
    titles = run_cli("--out", str(out), "--leads", "none", "--limit", "20")
    assert titles.returncode == 0 and pd.read_parquet(out)["description"].isna().all()
    dup = write(tmp_path, [(1, "a"), (1, "b")])
    refused = run_cli("--out", str(out), "--leads", dup)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "appear more than once" in refused.stderr


def test_the_embedding_engine_counts_the_texts_it_reads_only_the_start_of(embedding_engine,
                                                                          spec):
    """MiniLM reads 256 word pieces; a longer text is cut there, and the count says so (the
    annotate job's report gives it per part). Nothing is counted while nothing is cut."""
    vibe = spec.attributes["vibe"]
    short = ["Up (2009)", "Heat (1995) A 1995 crime film."]
    before = embedding_engine.usage().get("vibe", {}).get("truncated_texts", 0)
    embedding_engine.classify(short, vibe)
    assert embedding_engine.usage().get("vibe", {}).get("truncated_texts", 0) == before
    long = "Casablanca (1942) " + "a story of love and war in wartime morocco " * 60
    embedding_engine.classify([long, *short], vibe)
    assert embedding_engine.usage()["vibe"]["truncated_texts"] - before == 1
