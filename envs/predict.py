"""``python -m envs.predict``: the simulator's predicted prefill and decode times for one instance.

Example::

    python -m envs.predict --model llama-2-70b --gpu h100 --tp 4 --batch 8 \
        --prompt-tokens 2048 --context-tokens 2048 --json

``prefill_ms``: one iteration prefilling the whole batch of prompts (batch x prompt tokens);
``decode_ms``: one decode iteration of the batch at that KV context. Both are whole-model
iterations of a ``tp``-GPU instance: the operator profiles summed over groups (TP all-reduce
included) plus the calibrated per-iteration overhead, exactly as the simulator times them.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from runtime.models import OPERATOR_GROUPS


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m envs.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-2-70b", help="model preset (runtime.models.MODELS)")
    p.add_argument("--gpu", default="h100", help="GPU name known to ProfileDB")
    p.add_argument("--tp", type=int, default=4, help="tensor-parallel degree (1, 2, 4, 8)")
    p.add_argument("--batch", type=int, default=1, help="sequences in the batch (>= 1)")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length of each sequence (tokens)")
    p.add_argument("--context-tokens", type=int, default=1024, help="KV length of each decoding sequence (tokens)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def predict(model: str, gpu: str, tp: int, batch: int, prompt_tokens: int, context_tokens: int) -> dict:
    """Predicted times (ms) and their per-group kernel breakdown; raises ValueError on bad input."""
    for name, v in (("batch", batch), ("prompt-tokens", prompt_tokens), ("context-tokens", context_tokens)):
        if v < 1:
            raise ValueError(f"--{name} must be >= 1, got {v}")
    if tp not in (1, 2, 4, 8):
        raise ValueError(f"--tp must be 1, 2, 4 or 8, got {tp}")
    from envs import predictor_for

    try:
        pred = predictor_for(model, gpu)
    except KeyError as e:
        raise ValueError(str(e.args[0]) if e.args else str(e)) from None
    prefill_tokens = batch * prompt_tokens
    dec_groups = {g: pred.group_ms(g, batch, context_tokens, batch, tp, "decode") if g == "attn"
                  else pred.group_ms(g, batch, tp=tp) for g in OPERATOR_GROUPS}
    pre_groups = {g: pred.group_ms(g, prefill_tokens, prompt_tokens, batch, tp, "prefill") if g == "attn"
                  else pred.group_ms(g, batch if g == "head" else prefill_tokens, tp=tp) for g in OPERATOR_GROUPS}
    return {
        "model": model, "gpu": gpu, "tp": tp, "batch": batch, "prompt_tokens": prompt_tokens,
        "context_tokens": context_tokens,
        "prefill_ms": pred.prefill_ms(tp, batch, prompt_tokens),
        "decode_ms": pred.decode_ms(tp, batch, context_tokens),
        "prefill_kernel_ms": pre_groups, "decode_kernel_ms": dec_groups,
        "weights_gb_per_gpu": pred.cfg.weight_bytes / tp / 1e9,
        "fits_memory": pred.cfg.weight_bytes / tp < pred.gpu.memory_bytes,
    }


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        out = predict(a.model, a.gpu, a.tp, a.batch, a.prompt_tokens, a.context_tokens)
    except Exception as e:  # noqa: BLE001 - CLI: report any input problem in one line
        print(f"envs.predict: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{a.model} on {a.gpu}, tp={a.tp}, batch={a.batch}")
        print(f"  prefill ({a.prompt_tokens} tokens each): {out['prefill_ms']:.2f} ms")
        print(f"  decode  (context {a.context_tokens}):    {out['decode_ms']:.2f} ms")
        if not out["fits_memory"]:
            print(f"  note: {out['weights_gb_per_gpu']:.1f} GB of weights per GPU do not fit {a.gpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
