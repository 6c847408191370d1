"""Any local Hugging Face causal LM directory, on CPU or GPU, offline.

classify: every label is scored by the summed log-likelihood of " " + label after the
rendered prompt, its tokens taken in context (udfs.engines.prompts.label_continuations, the
scoring every generative engine shares); a softmax over the labels gives the confidence, so
the answer is always a declared label with a probability. Prompt x label sequences are
left-padded (with position ids from the attention mask, so padding changes nothing) and only
the last positions' logits are computed, which keeps memory at batch x longest-label x vocab.
caption: greedy generation of caption.max_tokens new tokens, batched with left padding.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from udfs.engines.prompts import (LabelScoringEngine, answer_separator, label_continuations,
                                  label_probabilities, truncate_left)
from udfs.spec import Attribute, Caption

__all__ = ["TransformersEngine", "label_probabilities"]


class TransformersEngine(LabelScoringEngine):
    @classmethod
    def name_for(cls, options: dict) -> str:
        from udfs.engines.models import is_known
        model = os.fspath(options["model"])
        if is_known(model) and not os.path.exists(model):
            return f"transformers:{model}"  # its converted directory has the same name
        return f"transformers:{Path(model).resolve().name}"

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 16,
                 max_prompt_tokens: int = 512, dtype: str = "auto", threads: int | None = None):
        from udfs.engines.models import resolve
        path = Path(resolve(model))  # a path as is; a packaged model's name -> its directory
        if not path.is_dir():
            raise FileNotFoundError(f"transformers model directory not found: {path}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=dtype).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.model_name = self.name_for({"model": model})
        self.model_dir = str(path)  # its card.json, if any, calibrates tag (calibration.py)

    def prompt_limit(self, part) -> int:
        return self.max_prompt_tokens

    def _encode(self, part, prompt: str) -> list[int]:
        """Prompt ids, cut from the left (the question sits at the end), keeping a BOS."""
        return truncate_left(self.encoder(part)(prompt), self.max_prompt_tokens,
                             self.tokenizer.bos_token_id)

    def _left_pad(self, rows: list[list[int]]):
        torch = self._torch
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                            device=self.device)
        return ids, mask

    def label_loglik(self, texts: Sequence[str], attribute: Attribute) -> np.ndarray:
        """Summed log-likelihood of each label after each text's prompt: [texts, labels].

        A prompt whose labels are one token each (a multi-label attribute's yes/no, short
        label sets) is one sequence, the context alone: every label is read from the
        next-token distribution at its end. Otherwise each label is a sequence of its own."""
        torch = self._torch
        rows = []  # (ids, label tokens at the end, or 0 with the next-token ids to read)
        for text in texts:
            context, continuations = label_continuations(
                self.encoder(attribute), self.prompt(attribute, text), attribute.labels,
                answer_separator(attribute))
            context = truncate_left(context, self.max_prompt_tokens, self.tokenizer.bos_token_id)
            if all(len(ids) == 1 for ids in continuations):
                rows.append((context, 0, [ids[0] for ids in continuations]))
            else:
                rows.extend((context + ids, len(ids), None) for ids in continuations)
        self.count_tokens(attribute.name, prompt=sum(len(r) for r, _, _ in rows))
        scores = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            ids, mask = self._left_pad([r for r, _, _ in chunk])
            # Left padding puts every label at the end, so the last n+1 positions suffice.
            n = max(k for _, k, _ in chunk)
            with torch.inference_mode():
                logits = self.model(
                    input_ids=ids, attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    logits_to_keep=n + 1).logits
            logp = logits.float().log_softmax(-1)
            lengths = torch.tensor([k for _, k, _ in chunk], device=self.device)
            summed = torch.zeros(len(chunk), device=self.device)
            if n:
                token_lp = logp[:, :-1].gather(-1, ids[:, -n:, None]).squeeze(-1)
                is_label = torch.arange(n, device=self.device) >= n - lengths[:, None]
                summed = (token_lp * is_label).sum(-1)
            summed, last = summed.cpu().numpy(), logp[:, -1]
            for i, (_, _, nexts) in enumerate(chunk):
                if nexts is None:
                    scores.append(summed[i:i + 1])
                else:
                    scores.append(last[i, torch.tensor(nexts, device=self.device)].cpu().numpy())
        return np.concatenate(scores).reshape(len(texts), len(attribute.labels))

    def caption(self, texts: Sequence[str], caption: Caption) -> list[str]:
        torch = self._torch
        out: list[str] = []
        prompts = [self._encode(caption, self.prompt(caption, t)) for t in texts]
        for start in range(0, len(prompts), self.batch_size):
            ids, mask = self._left_pad(prompts[start:start + self.batch_size])
            with torch.inference_mode():
                generated = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=caption.max_tokens,
                    do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            new = generated[:, ids.shape[1]:]
            self.count_tokens("caption", prompt=int(mask.sum()),
                              generated=int((new != self.tokenizer.pad_token_id).sum()))
            out.extend(s.strip() for s in
                       self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out

    def close(self) -> None:
        self.model = None
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()
