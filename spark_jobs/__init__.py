"""Batch jobs, each runnable with spark-submit or `python -m spark_jobs.<job>`."""
