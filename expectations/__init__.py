"""The Great Expectations gate between the offline feature tables and the online store.

Suites come from the attribute spec (label sets, confidences, error share, caption length,
label drift against a stored reference) plus user-editable GE suite JSON files (`suites`);
`gate` validates a frame, and a refused batch gets a JSON + HTML report (`report`) and is
quarantined as Parquet. `feast_engine` plugs the gate into `feast materialize`;
`spark_jobs.validate` runs the same check in CI.

This package init stays import-free: Great Expectations takes seconds to import, and Feast
imports `expectations.feast_engine` for every `feast apply`.
"""
