"""A stand-in for the `vllm` package, built from real components, for machines without a GPU.

`LLM` loads a real (tiny) causal LM and its tokenizer from a local directory with
transformers and answers `generate` with what vllm.LLM.generate returns: RequestOutput /
CompletionOutput / Logprob objects with vLLM's field names, filled the way vLLM fills them.
Nothing in it knows what the engine under test expects; it follows vLLM's source:

- logprobs (vllm/v1/sample/sampler.py, Sampler.forward, logprobs_mode "raw_logprobs"):
  computed from the logits before allowed_token_ids masks them; the structured-output
  grammar bitmask is applied to the logits before the sampler
  (vllm/v1/worker/gpu_model_runner.py, apply_grammar_bitmask), so under a choice grammar
  they are the masked distribution. Per position: the sampled (or prompt) token first, with
  its true rank, then the top-k (Sampler.gather_logprobs, vllm/logprobs.py
  append_logprobs_for_next_position); prompt_logprobs start with None.
- decoded_token (vllm/v1/engine/logprobs.py, LogprobsProcessor, which calls
  vllm/tokenizers/detokenizer_utils.py convert_ids_list_to_tokens): every id decoded on its
  own, tokenizer.decode([token_id]), which for a SentencePiece-style tokenizer drops the "▁"
  of a word-initial token; None when detokenize=False. (vLLM's extra correction of ids that
  decode to a partial UTF-8 character is not reproduced: the tests' labels are ASCII.)
- text: decoded incrementally after the prompt's last tokens (detokenize_incrementally,
  INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET = 5), special tokens skipped.
- choice grammar: the sampler may pick any token that keeps the generated text a prefix of a
  choice (xgrammar matches the tokens' text, so " d" + "ark" spells " dark" too) and ends
  with EOS once a choice is complete.

Like vLLM, the LLM starts an engine-core child process (here one that only sleeps) that only
`llm.llm_engine.engine_core.shutdown()` stops. Only greedy decoding is implemented.
`install(monkeypatch)` puts the double in sys.modules as `vllm` and `vllm.sampling_params`.
"""
from __future__ import annotations

import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INCREMENTAL_OFFSET = 5  # vllm/tokenizers/detokenizer_utils.py


@dataclass
class Logprob:  # vllm/logprobs.py
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:  # vllm/outputs.py
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:  # vllm/outputs.py
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclass
class StructuredOutputsParams:  # vllm/sampling_params.py
    json: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


@dataclass
class SamplingParams:  # the vllm.SamplingParams fields the double implements
    n: int = 1
    temperature: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    ignore_eos: bool = False
    allowed_token_ids: list[int] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self):
        if self.temperature != 0.0 or self.n != 1:
            raise NotImplementedError("the vllm double decodes greedily only")
        if self.max_tokens is None or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        for k in (self.logprobs, self.prompt_logprobs):
            if k is not None and k < 0:
                raise ValueError("logprobs must be non-negative")


class EngineCoreClient:
    """vLLM's engine core runs in a child process that holds the GPU until shut down."""

    shutdowns = 0
    started: list[subprocess.Popen] = []

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import time\nwhile True: time.sleep(60)"])
        EngineCoreClient.started.append(self.proc)

    @classmethod
    def kill_leftovers(cls) -> None:
        """Test teardown: no engine-core stand-in outlives the test, whatever the engine did."""
        for proc in cls.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cls.started.clear()

    def shutdown(self) -> None:
        EngineCoreClient.shutdowns += 1
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class LLM:
    instances: list["LLM"] = []

    def __init__(self, model: str, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, seed: int = 0,
                 logprobs_mode: str = "raw_logprobs", **engine_args):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if logprobs_mode != "raw_logprobs":
            raise NotImplementedError(logprobs_mode)
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(Path(model), local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(
            Path(model), local_files_only=True, dtype=torch.float32).eval()
        self.kwargs = {"gpu_memory_utilization": gpu_memory_utilization,
                       "max_model_len": max_model_len, "seed": seed, **engine_args}
        self.llm_engine = types.SimpleNamespace(engine_core=EngineCoreClient())
        self.requests: list[tuple[list[int], SamplingParams]] = []
        self._cache: dict[tuple[int, ...], Any] = {}
        self.generate_calls = 0
        LLM.instances.append(self)

    def get_tokenizer(self):
        return self.tokenizer

    # -- the model --------------------------------------------------------------------------
    def _logits(self, ids: list[int]):
        """Logits at every position of ids; each position's row is cached under its prefix
        (a causal model's logits at i depend on ids[:i + 1] only), like vLLM's prefix cache."""
        with self._torch.inference_mode():
            logits = self.model(input_ids=self._torch.tensor([ids])).logits[0].float()
        for i in range(len(ids)):
            self._cache[tuple(ids[:i + 1])] = logits[i]
        return logits

    def _next_logits(self, ids: list[int]):
        cached = self._cache.get(tuple(ids))
        return cached if cached is not None else self._logits(ids)[-1]

    def _decode_one(self, token_id: int) -> str:
        # vllm/tokenizers/detokenizer_utils.py convert_ids_list_to_tokens
        return self.tokenizer.decode([token_id]) or ""

    def _position(self, logprobs, token: int, k: int, detokenize: bool) -> dict[int, Logprob]:
        """vllm/logprobs.py append_logprobs_for_next_position: the token, then the top-k."""
        torch = self._torch
        rank = int((logprobs > logprobs[token]).sum()) + 1
        top = torch.topk(logprobs, k) if k else None
        ids = [token] + (top.indices.tolist() if top is not None else [])
        values = [float(logprobs[token])] + (top.values.tolist() if top is not None else [])
        ranks = [rank] + list(range(1, k + 1))
        return {i: Logprob(v, r, self._decode_one(i) if detokenize else None)
                for i, v, r in zip(ids, values, ranks)}

    def _text(self, prompt_ids: list[int], ids: list[int], skip_special: bool) -> str:
        tail = prompt_ids[-(INCREMENTAL_OFFSET + 2):]
        before = self.tokenizer.decode(tail, skip_special_tokens=skip_special)
        after = self.tokenizer.decode(tail + ids, skip_special_tokens=skip_special)
        return after[len(before):] if after.startswith(before) else after

    def _grammar_mask(self, prompt_ids: list[int], generated: list[int], choices: list[str]):
        """Tokens a choice grammar allows next: those keeping the text a prefix of a choice."""
        torch = self._torch
        vocab = self.model.config.vocab_size
        mask = torch.zeros(vocab, dtype=torch.bool)
        so_far = self._text(prompt_ids, generated, False)
        for token in range(vocab):
            if token in self.tokenizer.all_special_ids:
                continue
            text = self._text(prompt_ids, generated + [token], False)
            if len(text) > len(so_far) and any(c.startswith(text) for c in choices):
                mask[token] = True
        if so_far in choices:
            mask[self.tokenizer.eos_token_id] = True
        return mask

    def _run(self, prompt_ids: list[int], params: SamplingParams) -> tuple[list, CompletionOutput]:
        torch = self._torch
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            logits = self._logits(prompt_ids)
            lp = torch.log_softmax(logits[:-1], dim=-1)
            prompt_logprobs = [None] + [
                self._position(lp[i - 1], prompt_ids[i], params.prompt_logprobs,
                               params.detokenize) for i in range(1, len(prompt_ids))]
        choices = params.structured_outputs.choice if params.structured_outputs else None
        generated, steps, cumulative, finish = [], [], 0.0, "length"
        for _ in range(params.max_tokens):
            logits = self._next_logits(prompt_ids + generated)
            if choices:  # the grammar bitmask is applied before the sampler
                logits = logits.masked_fill(~self._grammar_mask(prompt_ids, generated, choices),
                                            float("-inf"))
            raw = torch.log_softmax(logits, dim=-1)  # raw_logprobs: before allowed_token_ids
            if params.allowed_token_ids is not None:
                allowed = torch.zeros_like(logits, dtype=torch.bool)
                allowed[params.allowed_token_ids] = True
                logits = logits.masked_fill(~allowed, float("-inf"))
            token = int(logits.argmax())
            generated.append(token)
            cumulative += float(raw[token])
            if params.logprobs is not None:
                steps.append(self._position(raw, token, params.logprobs, params.detokenize))
            if token == self.tokenizer.eos_token_id and not params.ignore_eos:
                finish = "stop"
                break
        text = (self._text(prompt_ids, generated, params.skip_special_tokens)
                if params.detokenize else "")
        return prompt_logprobs, CompletionOutput(
            0, text, generated, cumulative if params.logprobs is not None else None,
            steps if params.logprobs is not None else None, finish)

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        self.generate_calls += 1
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        requests = []
        for prompt, params in zip(prompts, sampling_params):
            if isinstance(prompt, dict):
                requests.append((list(prompt["prompt_token_ids"]), None, params))
            else:
                requests.append((self.tokenizer(prompt).input_ids, prompt, params))
        self.requests.extend((ids, params) for ids, _, params in requests)
        outputs: list[RequestOutput | None] = [None] * len(requests)
        # longest prompts first, so shorter prompts that prefix them hit the cache
        for i in sorted(range(len(requests)), key=lambda i: -len(requests[i][0])):
            ids, text, params = requests[i]
            prompt_logprobs, completion = self._run(ids, params)
            outputs[i] = RequestOutput(str(i), text, ids, prompt_logprobs, [completion])
        self._cache.clear()
        return outputs


def modules() -> dict[str, types.ModuleType]:
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.SamplingParams = SamplingParams
    sampling.StructuredOutputsParams = StructuredOutputsParams
    vllm.sampling_params = sampling
    return {"vllm": vllm, "vllm.sampling_params": sampling}


def install(monkeypatch) -> None:
    """Make `import vllm` find the double for the rest of the test."""
    for name, module in modules().items():
        monkeypatch.setitem(sys.modules, name, module)
