"""Golden sampling distributions from transformers' logits warpers, for the
tests of src/sampling.rs (`generate --sample`).

For each case: a logit vector made from an integer hash (so Rust rebuilds
the same f32 values exactly; `case_logits` below and in the Rust test), the
warpers transformers' generate applies for do_sample with temperature, top_k
and top_p (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, in
that order), and the resulting softmax: the ids it keeps and their
probabilities.

    python3 reference/make_sampling_reference.py reference/sampling.json
"""
import json
import sys

import torch
import transformers
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

MASK = (1 << 64) - 1


def splitmix64(z):
    z = (z + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def case_logits(seed, vocab, scale):
    """Uniform in [-scale, scale): 24 hashed bits a logit, exact in f32."""
    return [((splitmix64(seed * 1_000_003 + i) >> 40) / 16777216.0 * 2.0 - 1.0) * scale for i in range(vocab)]


CASES = [
    # seed, vocab, scale, temperature, top_k, top_p
    (1, 1000, 4.0, 0.6, 20, 0.95),  # Qwen3's generation_config
    (2, 1000, 8.0, 0.6, 20, 0.95),
    (3, 1000, 2.0, 1.0, 50, 1.0),  # transformers' defaults
    (4, 5000, 6.0, 0.8, 5, 0.5),
    (5, 5000, 3.0, 1.3, 64, 0.9),
    (6, 2000, 10.0, 0.3, 40, 0.8),
    (7, 2000, 1.0, 0.7, 1, 0.95),
]


def main(out):
    cases = []
    for seed, vocab, scale, temperature, top_k, top_p in CASES:
        logits = torch.tensor(case_logits(seed, vocab, scale), dtype=torch.float32)[None]
        warpers = LogitsProcessorList(
            [TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)]
        )
        scores = warpers(torch.zeros((1, 1), dtype=torch.long), logits.clone())
        probs = torch.softmax(scores, dim=-1)[0]
        kept = (probs > 0).nonzero().flatten().tolist()
        kept.sort(key=lambda i: -probs[i].item())
        cases.append(
            {
                "seed": seed,
                "vocab": vocab,
                "scale": scale,
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "kept_ids": kept,
                "probs": [probs[i].item() for i in kept],
            }
        )
    with open(out, "w") as f:
        json.dump(
            {
                "format": "qwen-mk-sampling/1",
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "cases": cases,
            },
            f,
            indent=1,
        )
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
