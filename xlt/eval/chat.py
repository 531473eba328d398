"""``xlt chat``: talk to an SFT model, one instruction per line, in the format it was trained with."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional, TextIO

from xlt.config import XltError
from xlt.data.sft_format import PROMPT_FORMATS, SFT_INFO_FILE, generation_prompt_ids
from xlt.models import generate_greedy


def chat(model_dir: str, max_new_tokens: int = 256, stdin: Optional[TextIO] = None,
         stdout: Optional[TextIO] = None) -> int:
    """A minimal interactive prompt: each input line is one instruction, formatted as in training
    (``xlt_sft.json``), answered greedily with tokens streamed to ``stdout``; generation stops at the
    model's stop tokens (its ``generation_config.json``). Ends at end of input or an empty line.
    Returns the number of instructions answered."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    info_path = os.path.join(model_dir, SFT_INFO_FILE)
    if not os.path.isfile(info_path):
        raise XltError(f"chat: {info_path} not found (not a model saved by xlt sft)")
    with open(info_path, encoding="utf-8") as f:
        info = json.load(f)
    if info.get("prompt_format") not in PROMPT_FORMATS:
        raise XltError(f"chat: {info_path}: prompt_format={info.get('prompt_format')!r}: expected "
                       f"{' or '.join(PROMPT_FORMATS)}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    eos = model.generation_config.eos_token_id
    stop_ids = [int(t) for t in (eos if isinstance(eos, list) else [eos]) if t is not None]
    if not stop_ids:
        raise XltError(f"chat: {model_dir}/generation_config.json has no eos_token_id")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]

    stops = torch.tensor(stop_ids)

    class _Out(TextStreamer):
        """TextStreamer writing to ``stdout``; the stop token is not shown (it need not be a special token)."""

        def put(self, value: Any) -> None:
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                value = value.reshape(-1)
                value = value[~torch.isin(value, stops.to(value.device))]
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stdout.write(text + ("\n" if stream_end else ""))
            stdout.flush()

    answered = 0
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line or not line.strip():
            stdout.write("\n")
            return answered
        ids = generation_prompt_ids([{"role": "user", "content": line.strip()}], info["prompt_format"], tokenizer)
        generate_greedy(model, ids, stop_ids, pad, max_new_tokens, streamer=_Out(tokenizer, skip_prompt=True,
                                                                           skip_special_tokens=True))
        answered += 1
