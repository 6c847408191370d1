"""README's "Annotate your own catalogue", run as written: a catalogue that is not MovieLens
(string SKUs, one text column of its own, its own spec with a 2-label and a 5-label attribute
and a caption) through spark-submit -> validate -> feast apply -> feast materialize ->
get_online_features; then README's Spark Connect section, which continues from it. If the
README stops working when pasted, this test fails."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

from udfs.spec import load_spec
from udfs.table import read_latest

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Annotate your own catalogue"


def readme_script() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section should hold one bash block"
    return blocks[0]


def run_walkthrough(script: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT),
           "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_the_readme_walkthrough_works_when_pasted_then_on_spark_connect(tmp_path):
    check_walkthrough(run_walkthrough(readme_script(), tmp_path), tmp_path)
    check_connect_section(tmp_path)  # README's Spark Connect section continues from here


def check_walkthrough(proc: subprocess.CompletedProcess, tmp_path: Path) -> None:
    """What the walkthrough must have produced in ~/bookshop (HOME = tmp_path)."""
    shop = tmp_path / "bookshop"
    assert "book_annotations: PASSED" in proc.stdout

    served = json.loads(proc.stdout.strip().splitlines()[-1])
    spec = load_spec(shop / "books.yaml")
    table, key = read_latest(str(shop / "repo" / "data" / "book_annotations"), spec)
    assert key == "sku" and len(table) == 8 and table["error"].isna().all()
    expected = table.set_index("sku").loc[["BK-900378", "BK-900380"]]
    assert served["sku"] == ["BK-900378", "BK-900380"]
    assert served["fiction_label"] == expected["fiction_label"].tolist()
    assert served["reader_label"] == expected["reader_label"].tolist()
    assert served["caption"] == expected["caption"].tolist()
    assert set(table["fiction_label"]) <= {"yes", "no"}
    assert set(table["reader_label"]) <= set(spec.attributes["reader"].labels)
    # new items are valid from the catalogue's own dates
    assert str(table.set_index("sku").loc["BK-900385", "event_timestamp"]).startswith(
        "2024-03-04")


def connect_section_script() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Spark Connect / Databricks", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section should hold one bash block"
    return blocks[0]


def check_connect_section(tmp_path: Path) -> None:
    """README's Spark Connect block as written, after the walk-through: pyspark's own
    start-connect-server.sh, one book edited, the job through `spark-submit --remote`
    redoing that book only, `feast materialize` of what it wrote, the row served."""
    shop = tmp_path / "bookshop"
    spec = load_spec(shop / "books.yaml")
    before, _ = read_latest(str(shop / "repo" / "data" / "book_annotations"), spec)
    sbin = Path(__import__("pyspark").__file__).parent / "sbin"
    try:
        proc = run_walkthrough(connect_section_script(), tmp_path)
    finally:
        subprocess.run([str(sbin / "stop-connect-server.sh")], capture_output=True)
    report = json.loads(proc.stdout.split("[annotate] report ", 1)[1].splitlines()[0])
    assert report["rows_written"] == 1
    assert {p: v["reasons"] for p, v in report["parts"].items()} == \
        {p: {"content": 1} for p in [*spec.attributes, "caption"]}
    after, _ = read_latest(str(shop / "repo" / "data" / "book_annotations"), spec)
    edited = after.set_index("sku").loc["BK-900378"]
    assert edited["created_timestamp"] > before["created_timestamp"].max()
    assert edited["error"] is None or pd.isna(edited["error"])
    served = subprocess.run(
        [sys.executable, "-c", "import json; from feast import FeatureStore; print(json.dumps("
         "FeatureStore(repo_path='.').get_online_features(features=['book_annotations:"
         "reader_label'], entity_rows=[{'sku': 'BK-900378'}]).to_dict(True)))"],
        cwd=shop / "repo", capture_output=True, text=True, timeout=300)
    assert served.returncode == 0, served.stderr[-2000:]
    online = json.loads(served.stdout.strip().splitlines()[-1])
    assert online["reader_label"] == [edited["reader_label"]]
    # the row served is the one the Connect run wrote (stamped with its run time)
    assert online["reader_label__ts"] == [int(edited["event_timestamp"].timestamp())]
