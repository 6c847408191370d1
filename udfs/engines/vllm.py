"""The production GPU engine: one `vllm.LLM` per Python worker (vLLM >= 0.12).

classify: the labels are scored exactly as the transformers engine scores them, by token id.
Each label's continuation is tokenised in context with the model's own tokenizer
(udfs.engines.prompts.label_continuations); for every label token, one request asks vLLM to
generate exactly that token after the prompt and the label's tokens before it
(`allowed_token_ids=[id]`, `max_tokens=1`, `logprobs=0`). vLLM computes logprobs from the
raw logits, before the allowed-token mask (vllm/v1/sample/sampler.py, Sampler.forward with
logprobs_mode "raw_logprobs", the default, which the engine sets explicitly; likewise
vllm/v1/worker/gpu/sample/sampler.py), and always returns the sampled token's logprob
(Sampler.gather_logprobs), so each request yields the model's log-probability of that id:
read by id, never by decoded string, and never missing. Label scores are their sums; a
softmax over labels gives the confidence. Requests share the prompt as a prefix, so vLLM's
prefix cache computes each prompt about once.
caption: plain greedy generation.

Process lifecycle. vLLM runs its engine core in a child process (VLLM_ENABLE_V1_MULTIPROCESSING,
on by default), which survives a parent that dies without shutting it down and keeps its GPU
memory (vllm-project/vllm#19849, #55510). PySpark ends Python workers with os._exit (after
any task error, and at the end of a non-reused worker) or SIGKILL (a killed task), so
neither atexit nor a finaliser can be relied on. close() shuts the engine core down
explicitly; and every process the LLM started is also watched by a small reaper process
that terminates them as soon as this worker's end of a pipe closes, which the kernel does
however the worker dies.

The worker pins CUDA_VISIBLE_DEVICES to the task's GPU before this module imports vllm
(udfs.worker.pin_gpu). Everything that needs no GPU (request building, output parsing) is a
pure function tested without vLLM.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import subprocess
import sys
from typing import Any, Callable, Sequence

import numpy as np

from udfs.engines.base import Engine, Labels
from udfs.engines.prompts import (MalformedOutput, caption_request, label_continuations,
                                  label_probabilities)
from udfs.spec import Attribute, Caption

log = logging.getLogger(__name__)

INSTALL_HINT = ("the vllm engine needs vLLM, which runs on NVIDIA GPU nodes only: install the "
                "`vllm` extra there (pip install 'annofeat[vllm]'), or use the 'transformers' "
                "or 'openai' engine")

#: (ids so far, the id whose log-probability comes next): one vLLM request
Step = tuple[tuple[int, ...], int]


def label_steps(context: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[list[Step]]:
    """Per label, the steps its log-likelihood sums over: each of its tokens after the
    context and the label's earlier tokens."""
    context = tuple(context)
    return [[(context + tuple(ids[:i]), token) for i, token in enumerate(ids)]
            for ids in continuations]


def forced_token_params(token_id: int) -> dict:
    """SamplingParams kwargs for one step: generate exactly `token_id`, report its logprob.

    The mask of allowed_token_ids applies after vLLM takes the raw logprobs, so the reported
    logprob is the model's, not 0 (see the module docstring); no detokenisation is needed.
    """
    return {"temperature": 0.0, "max_tokens": 1, "logprobs": 0,
            "allowed_token_ids": [token_id], "detokenize": False}


def forced_logprob(request_output: Any, token_id: int) -> float:
    """The log-probability of `token_id` from the RequestOutput of a forced step."""
    completion = request_output.outputs[0]
    if list(completion.token_ids) != [token_id]:
        raise MalformedOutput(f"vLLM generated {list(completion.token_ids)} where only token "
                              f"{token_id} was allowed")
    if not completion.logprobs:
        raise MalformedOutput("vLLM returned no logprobs; the request must set logprobs")
    entry = completion.logprobs[0].get(token_id)  # {token_id: Logprob}, by id
    if entry is None or not math.isfinite(entry.logprob):
        raise MalformedOutput(f"vLLM returned no finite logprob for token {token_id} "
                              f"({entry!r}); logprobs_mode must be raw_logprobs")
    return float(entry.logprob)


def score_labels(encode: Callable[[str], Sequence[int]], prompts: Sequence[str],
                 labels: Sequence[str],
                 run: Callable[[list[Step]], list[float]]) -> np.ndarray:
    """Summed log-likelihood of each label after each prompt: [prompts, labels].

    run: log-probabilities of distinct steps, in order (one vLLM generate call).
    """
    per_prompt = [label_steps(*label_continuations(encode, p, labels)) for p in prompts]
    unique = list(dict.fromkeys(s for steps in per_prompt for label in steps for s in label))
    logprob = dict(zip(unique, run(unique)))
    return np.array([[sum(logprob[s] for s in label) for label in steps]
                     for steps in per_prompt], dtype=np.float64).reshape(len(prompts), len(labels))


def shutdown_llm(llm: Any) -> None:
    """Shut a vllm.LLM's engine core down now, not whenever it is garbage-collected."""
    for owner, name in ((llm, "shutdown"), (getattr(llm, "llm_engine", None), "shutdown")):
        method = getattr(owner, name, None)
        if callable(method):  # LLM.shutdown() / LLMEngine.shutdown() where vLLM has them
            method()
            return
    # vllm/v1/engine/llm_engine.py: LLMEngine.engine_core is the EngineCoreClient; its
    # shutdown() stops the engine-core process (or the in-process core) and its workers.
    llm.llm_engine.engine_core.shutdown()


def child_pids() -> set[int]:
    """Pids of this process's children."""
    try:
        import psutil  # a vLLM dependency
        return {p.pid for p in psutil.Process().children()}
    except ImportError:
        pids: set[int] = set()
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        return pids


# Runs in its own session (so a SIGHUP to the worker's process group does not stop it): waits
# for EOF on stdin, i.e. the engine closed or its process died however it died, then
# terminates the watched processes that are still the same processes (same start time).
_REAPER = r"""
import os, signal, sys, time
def started(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
watched = {int(p): started(int(p)) for p in sys.argv[1:]}
sys.stdin.buffer.read()
def alive():
    return [p for p, t in watched.items() if t is not None and started(p) == t]
for sig, grace in ((signal.SIGTERM, float(os.environ.get("ANNOFEAT_REAP_GRACE", "10"))),
                   (signal.SIGKILL, 0.0)):
    for pid in alive():
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
"""


class Reaper:
    """Terminates `pids` when this process closes the reaper or dies (even by SIGKILL)."""

    def __init__(self, pids: set[int]):
        self.pids = sorted(pids)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _REAPER, *map(str, self.pids)], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, start_new_session=True)

    def release(self, timeout: float = 15) -> None:
        """The engine is shut down: let the reaper end any survivor, and wait for it."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # pragma: no cover - the reaper's grace is 10 s
            log.warning("engine reaper %d still running after %.0f s", self.proc.pid, timeout)


class VLLMEngine(Engine):
    def __init__(self, model: str, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, top_logprobs: int = 20, seed: int = 0,
                 engine_args: dict | None = None):
        # top_logprobs is accepted for older configs: scoring no longer reads top-k lists.
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        engine_args = dict(engine_args or {})
        mode = engine_args.pop("logprobs_mode", "raw_logprobs")
        if mode != "raw_logprobs":
            raise ValueError(f"the vllm engine reads the model's raw log-probabilities; "
                             f"engine_args.logprobs_mode={mode!r} would change them")
        self._sampling = SamplingParams
        before = child_pids()
        self.llm = LLM(model=model, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, seed=seed, logprobs_mode="raw_logprobs",
                       **engine_args)
        started = child_pids() - before
        self._reaper = Reaper(started) if started else None
        self.tokenizer = self.llm.get_tokenizer()
        self.model_name = f"vllm:{model.rstrip('/').rsplit('/', 1)[-1]}"

    def _forced_logprobs(self, steps: list[Step]) -> list[float]:
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(prefix)} for prefix, _ in steps],
            [self._sampling(**forced_token_params(token)) for _, token in steps],
            use_tqdm=False)
        return [forced_logprob(out, token) for out, (_, token) in zip(outputs, steps)]

    def label_loglik(self, texts: Sequence[str], attribute: Attribute) -> np.ndarray:
        """Summed log-likelihood of each label after each text's prompt: [texts, labels]."""
        return score_labels(self.tokenizer.encode, [attribute.render(t) for t in texts],
                            attribute.labels, self._forced_logprobs)

    def classify(self, texts: Sequence[str], attribute: Attribute) -> Labels:
        probs = label_probabilities(self.label_loglik(texts, attribute))
        best = probs.argmax(axis=1)
        return Labels(labels=[attribute.labels[i] for i in best],
                      confidences=probs[np.arange(len(best)), best].astype(float).tolist())

    def caption(self, texts: Sequence[str], caption: Caption) -> list[str]:
        params = self._sampling(**caption_request(caption))
        outputs = self.llm.generate([caption.render(t) for t in texts], params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is None:
            return
        try:
            shutdown_llm(llm)
        finally:
            del llm
            gc.collect()
            if self._reaper is not None:
                self._reaper.release()
