"""The production GPU engine: one in-process `vllm.LLM` per Python worker (vLLM >= 0.12).

classify: greedy generation constrained to the labels with
`SamplingParams(structured_outputs=StructuredOutputsParams(choice=...), logprobs=k)`; the
confidence is the probability of the generated label renormalised, token by token, over the
tokens the choice grammar allows (udfs.engines.prompts.constrained_probability).
caption: plain greedy generation.

The worker pins CUDA_VISIBLE_DEVICES to the task's GPU before this module imports vllm
(udfs.worker.pin_gpu), so each LLM sees exactly the one GPU Spark assigned. Everything that
needs no GPU (request building, output parsing) is a pure function tested without vLLM.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from udfs.engines.base import Engine, Labels
from udfs.engines.prompts import (MalformedOutput, caption_request, choices,
                                  classify_request, constrained_probability, label_of)
from udfs.spec import Attribute, Caption

INSTALL_HINT = ("the vllm engine needs vLLM, which runs on NVIDIA GPU nodes only: install the "
                "`vllm` extra there (pip install 'annofeat[vllm]'), or use the 'transformers' "
                "or 'openai' engine")


def completion_steps(completion: Any) -> tuple[list[str], list[dict[str, float]]]:
    """Generated tokens and per-step {token string: logprob} from a vLLM CompletionOutput.

    `completion.logprobs` holds, per generated token, {token_id: Logprob(logprob, rank,
    decoded_token)}; several ids can decode to the same string, so their mass is merged.
    """
    if not completion.logprobs:
        raise MalformedOutput("vLLM returned no logprobs; the request must set logprobs")
    tokens, steps = [], []
    for token_id, step in zip(completion.token_ids, completion.logprobs):
        merged: dict[str, float] = {}
        for lp in step.values():
            if lp.decoded_token is None:
                raise MalformedOutput("vLLM returned logprobs without decoded tokens "
                                      "(detokenize must stay on)")
            prev = merged.get(lp.decoded_token)
            merged[lp.decoded_token] = lp.logprob if prev is None else _logaddexp(prev, lp.logprob)
        if token_id not in step:
            raise MalformedOutput(f"vLLM returned no logprob for generated token {token_id}")
        tokens.append(step[token_id].decoded_token)
        steps.append(merged)
    return tokens, steps


def _logaddexp(a: float, b: float) -> float:
    top = max(a, b)
    return top + math.log(math.exp(a - top) + math.exp(b - top)) if top > -math.inf else top


def parse_choice(request_output: Any, attribute: Attribute) -> tuple[str, float]:
    """(label, confidence) from one vLLM RequestOutput of a constrained choice."""
    completion = request_output.outputs[0]
    label = label_of(completion.text, attribute)
    tokens, steps = completion_steps(completion)
    return label, constrained_probability(tokens, steps, completion.text, choices(attribute))


def sampling_params(request: dict, sampling_cls: type, structured_cls: type) -> Any:
    """vLLM SamplingParams from a request mapping (udfs.engines.prompts), classes injected
    so the mapping can be checked without vLLM."""
    request = dict(request)
    if "structured_outputs" in request:
        request["structured_outputs"] = structured_cls(**request["structured_outputs"])
    return sampling_cls(**request)


class VLLMEngine(Engine):
    def __init__(self, model: str, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, top_logprobs: int = 20, seed: int = 0,
                 engine_args: dict | None = None):
        try:
            from vllm import LLM, SamplingParams
            from vllm.sampling_params import StructuredOutputsParams
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        self._sampling = SamplingParams
        self._structured = StructuredOutputsParams
        self.llm = LLM(model=model, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, seed=seed, **(engine_args or {}))
        self.top_logprobs = top_logprobs
        self.model_name = f"vllm:{model.rstrip('/').rsplit('/', 1)[-1]}"

    def classify(self, texts: Sequence[str], attribute: Attribute) -> Labels:
        params = sampling_params(classify_request(attribute, self.top_logprobs),
                                 self._sampling, self._structured)
        outputs = self.llm.generate([attribute.render(t) for t in texts], params,
                                    use_tqdm=False)
        pairs = [parse_choice(o, attribute) for o in outputs]
        return Labels(labels=[p[0] for p in pairs], confidences=[p[1] for p in pairs])

    def caption(self, texts: Sequence[str], caption: Caption) -> list[str]:
        outputs = self.llm.generate([caption.render(t) for t in texts],
                                    sampling_params(caption_request(caption), self._sampling,
                                                    self._structured), use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]

    def close(self) -> None:
        # vLLM frees GPU memory when the engine is garbage-collected; dropping the only
        # reference lets the worker build a different engine on the same GPU.
        self.llm = None
