"""Annotation quality: agreement with human labels, review sampling, distillation.

Pure numpy/pandas cores; the commands that read and write files live in spark_jobs/
(evaluate.py, review_sample.py, distill.py).
"""
