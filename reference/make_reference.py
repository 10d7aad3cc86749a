#!/usr/bin/env python3
"""Make a parity reference file for qwen-mk from a Qwen3 checkpoint directory.

TRUTH: Hugging Face transformers, eager attention, float32 math on the
checkpoint's bf16 weights (TF32 off), greedy decoding with a KV cache.
PEER:  the same checkpoint run by transformers in plain bf16 (its default
attention), teacher-forced on the truth's tokens. The peer's error against
the truth is the yardstick qwen-mk (also a bf16 engine) must meet.

See reference/README.md for the JSON format and the pass rule.

Usage:
  python3 reference/make_reference.py --model DIR --out FILE.json
      [--prompt TEXT | --prompt-ids-len N] [--steps 128] [--device cuda|cpu] [--no-peer]
"""

import argparse
import inspect
import json
import math
import os
import platform
import sys
import time
import traceback

FORMAT = "qwen-mk-parity/1"
TOP_K = 20
SIG_DIGITS = 8  # significant digits of the floats written
DEFAULT_PROMPT = (
    "The quick brown fox jumps over the lazy dog, and then it runs into the "
    "forest to find its friends."
)
MIN_DEFAULT_PROMPT_TOKENS = 16


class RefError(Exception):
    """A failure with a message meant for the user (no traceback needed)."""


def log(msg):
    print(msg, flush=True)


# --------------------------------------------------------------------------
# Long-context prompt text
# --------------------------------------------------------------------------

_SUBJECTS = [
    "The old lighthouse keeper", "A young engineer from the valley", "My grandmother",
    "The city council", "A small group of students", "The travelling musician",
    "Our neighbour across the street", "The research team", "A curious child",
    "The ship's captain", "The village baker", "An experienced mountain guide",
    "The librarian", "A retired schoolteacher", "The farmer's daughter",
    "The new manager", "A quiet painter", "The museum director", "Two old friends",
    "The night nurse", "A stray cat", "The river ferryman", "The visiting professor",
]
_VERBS = [
    "carefully repaired", "wrote a long letter about", "spent the whole morning studying",
    "argued for hours about", "quietly photographed", "drew a detailed map of",
    "told a funny story about", "collected old records of", "walked slowly past",
    "made a careful list of", "sang a cheerful song about", "measured the size of",
    "kept a secret diary about", "painted a bright picture of", "asked many questions about",
    "forgot everything about", "cleaned and polished", "read three books about",
    "planted flowers beside", "built a wooden model of", "gave a short speech about",
]
_OBJECTS = [
    "the broken clock in the tower", "the northern railway bridge", "a forgotten garden",
    "the harbour at low tide", "the price of bread", "an ancient stone wall",
    "the weather in early spring", "a box of letters found in the attic",
    "the history of the town", "the small wooden boat", "the winter festival",
    "a strange noise in the cellar", "the new public library", "the orchard behind the school",
    "the migration of the geese", "a recipe for plum cake", "the old copper mine",
    "the rules of an unusual card game", "the stars above the desert", "a lost umbrella",
    "the road to the next village", "the market square",
]
_CLAUSES = [
    "before the sun went down", "while the rain kept falling", "because nobody else would",
    "although it was already very late", "during the long summer holidays",
    "as the church bells were ringing", "after a very difficult week",
    "without telling anyone at all", "just as the train was leaving",
    "on the first Monday of the month", "when the snow finally melted",
    "even though the doctor had advised against it", "until the lamps were lit",
    "so that the children could learn from it", "in spite of the cold wind",
    "since the old road had been closed",
]
_CONNECTIVES = [
    "", "Later that day, ", "In the end, ", "Meanwhile, ", "Surprisingly, ",
    "According to the local newspaper, ", "For many years, ", "Some people say that ",
    "Once again, ", "On the other hand, ",
]


def long_text(num_sentences):
    """Deterministic, varied English: numbered paragraphs of 6 sentences each.

    Uses index arithmetic with coprime strides (no RNG), so the text is the same
    on every Python version and machine.
    """
    paras = []
    sents = []
    for i in range(num_sentences):
        c = _CONNECTIVES[(i * 3) % len(_CONNECTIVES)]
        s = _SUBJECTS[(i * 7 + i // 23) % len(_SUBJECTS)]
        v = _VERBS[(i * 11 + i // 21) % len(_VERBS)]
        o = _OBJECTS[(i * 13 + i // 22) % len(_OBJECTS)]
        k = _CLAUSES[(i * 5 + i // 16) % len(_CLAUSES)]
        if c:  # every subject starts with a determiner, safe to lower-case
            s = s[0].lower() + s[1:]
        sents.append(f"{c}{s} {v} {o} {k}.")
        if len(sents) == 6:
            paras.append(f"{len(paras) + 1}. " + " ".join(sents))
            sents = []
    if sents:
        paras.append(f"{len(paras) + 1}. " + " ".join(sents))
    return "\n\n".join(paras) + "\n"


def long_prompt_ids(tok, n):
    """Return (text, ids): exactly the first n tokens of the long text."""
    num = max(8, n // 10)  # a sentence is roughly 15-20 tokens
    while True:
        text = long_text(num)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            ids = list(ids[:n])
            return tok.decode(ids), ids
        num *= 2


# --------------------------------------------------------------------------
# JSON writing: compact, but one step per line
# --------------------------------------------------------------------------

def _num(x):
    if isinstance(x, bool) or x is None:
        return json.dumps(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            raise RefError(f"non-finite number {x!r} in output")
        return repr(float(f"{x:.{SIG_DIGITS}g}"))
    return json.dumps(x, ensure_ascii=False)


def _enc(o, ind):
    nxt = ind + " "
    if isinstance(o, dict):
        if not o:
            return "{}"
        items = [f"{nxt}{json.dumps(str(k), ensure_ascii=False)}: {_enc(v, nxt)}" for k, v in o.items()]
        return "{\n" + ",\n".join(items) + "\n" + ind + "}"
    if isinstance(o, (list, tuple)):
        if any(isinstance(e, (list, tuple, dict)) for e in o):
            return "[\n" + ",\n".join(nxt + _enc(e, nxt) for e in o) + "\n" + ind + "]"
        return "[" + ",".join(_num(e) for e in o) + "]"
    return _num(o)


def write_json(path, obj):
    text = _enc(obj, "") + "\n"
    json.loads(text)  # self-check: what we write must parse
    tmp = path + ".tmp"
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------

def safetensors_metadata(model_dir):
    from safetensors import safe_open

    path = os.path.join(model_dir, "model.safetensors")
    if not os.path.exists(path):
        # Sharded checkpoints: take the first shard's header.
        idx = os.path.join(model_dir, "model.safetensors.index.json")
        if not os.path.exists(idx):
            raise RefError(f"no model.safetensors (or index) in {model_dir}")
        with open(idx) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        path = os.path.join(model_dir, shards[0])
    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def cache_kwarg_name(model):
    """transformers renamed `past_key_values` to `cache` in later 5.x releases."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def make_dynamic_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def check_rope_fp32(model, torch):
    """The truth needs float32 inverse frequencies, computed as transformers does.

    `.float()` cannot restore precision if the buffer was ever rounded to bf16,
    so recompute it from the config when it differs.
    """
    cfg = model.config
    rp = getattr(cfg, "rope_parameters", None) or {}
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", None))
    rtype = rp.get("rope_type", "default")
    if theta is None or rtype != "default":
        return
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    want = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    for m in model.modules():
        if hasattr(m, "inv_freq") and isinstance(m.inv_freq, torch.Tensor):
            have = m.inv_freq
            if have.dtype != torch.float32 or not torch.equal(have.cpu(), want):
                log(f"note: recomputing rotary inv_freq in float32 (was {have.dtype})")
                m.inv_freq = want.to(have.device)
                if hasattr(m, "original_inv_freq"):
                    m.original_inv_freq = want.clone().to(have.device)


def topk_stable(lp, k, torch):
    """Top-k of a 1-D tensor, ties broken towards the lowest id (like argmax)."""
    vals, idx = torch.sort(lp, descending=True, stable=True)
    return idx[:k].tolist(), rounded(vals[:k].tolist())


def rounded(xs):
    """Round to the precision written to the file, so that the summary computed
    here and one recomputed from the file agree exactly."""
    return [float(f"{x:.{SIG_DIGITS}g}") for x in xs]


def free(device, torch):
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------
# Truth and peer
# --------------------------------------------------------------------------

def run_truth(model_dir, prompt_ids, steps, device, torch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="eager"
    )
    model = model.float().to(device).eval()
    check_rope_fp32(model, torch)
    ck = cache_kwarg_name(model)

    ids, top_ids, top_lps = [], [], []
    with torch.inference_mode():
        cache = make_dynamic_cache(model)
        inp = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        for t in range(steps):
            # Step 0 sees the whole prompt; step t>0 feeds the id chosen at t-1.
            out = model(input_ids=inp, use_cache=True, logits_to_keep=1, **{ck: cache})
            logits = out.logits[0, -1]
            if logits.dtype != torch.float32:
                raise RefError(f"truth logits are {logits.dtype}, expected float32")
            if not torch.isfinite(logits).all():
                raise RefError(f"truth logits not finite at step {t}")
            nxt = int(torch.argmax(logits))
            lp = torch.log_softmax(logits.double(), dim=-1)
            ti, tl = topk_stable(lp, TOP_K, torch)
            if ti[0] != nxt:
                raise RefError(f"step {t}: argmax {nxt} != top-1 of log_softmax {ti[0]}")
            ids.append(nxt)
            top_ids.append(ti)
            top_lps.append(tl)
            inp = torch.tensor([[nxt]], dtype=torch.long, device=device)
            if t == 0 or (t + 1) % 32 == 0:
                log(f"  truth step {t + 1}/{steps}")
        expect_len = len(prompt_ids) + steps - 1
        if cache.get_seq_length() != expect_len:
            raise RefError(f"KV cache length {cache.get_seq_length()} != {expect_len}")
    del model, cache, out
    free(device, torch)
    return {"dtype": "float32", "ids": ids, "top_ids": top_ids, "top_logprobs": top_lps}


def run_peer(model_dir, prompt_ids, truth, steps, device, torch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = model.to(device).eval()
    # Teacher forcing: the logits at the last `steps` positions of
    # prompt + truth[:-1] predict truth ids 0..steps-1.
    seq = list(prompt_ids) + truth["ids"][:-1]
    with torch.inference_mode():
        inp = torch.tensor([seq], dtype=torch.long, device=device)
        out = model(input_ids=inp, use_cache=False, logits_to_keep=steps)
        logits = out.logits[0]
        if logits.shape[0] != steps:
            raise RefError(f"peer returned {logits.shape[0]} positions, expected {steps}")
        if not torch.isfinite(logits).all():
            raise RefError("peer logits not finite")
        top1, top_ids, top_lps, at_truth = [], [], [], []
        for t in range(steps):
            lg = logits[t]
            lp = torch.log_softmax(lg.double(), dim=-1)
            ti, tl = topk_stable(lp, TOP_K, torch)
            top1.append(int(torch.argmax(lg)))
            top_ids.append(ti)
            top_lps.append(tl)
            at = torch.tensor(truth["top_ids"][t], dtype=torch.long, device=lp.device)
            at_truth.append(rounded(lp[at].tolist()))
    del model, out, logits
    free(device, torch)
    return {
        "dtype": "bfloat16",
        "top1": top1,
        "top_ids": top_ids,
        "top_logprobs": top_lps,
        "logprobs_at_truth_top": at_truth,
    }


def summarize(truth, peer):
    if peer is None:
        return {"peer_mean_abs_err": None, "peer_max_abs_err": None,
                "near_ties": None, "peer_top1_mismatches": None}
    errs = [abs(p - t)
            for prow, trow in zip(peer["logprobs_at_truth_top"], truth["top_logprobs"])
            for p, t in zip(prow, trow)]
    mean_err = sum(errs) / len(errs)
    max_err = max(errs)
    near = [t for t, row in enumerate(truth["top_logprobs"]) if row[0] - row[1] < max_err]
    mism = [t for t, (a, b) in enumerate(zip(peer["top1"], truth["ids"])) if a != b]
    return {"peer_mean_abs_err": mean_err, "peer_max_abs_err": max_err,
            "near_ties": near, "peer_top1_mismatches": mism}


# --------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    ap.add_argument("--out", required=True, help="output JSON file")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="prompt text (default: a fixed English sentence)")
    g.add_argument("--prompt-ids-len", type=int, metavar="N",
                   help="long-context mode: the first N tokens of a fixed long text")
    ap.add_argument("--steps", type=int, default=128, help="greedy tokens to generate (default 128)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--no-peer", action="store_true", help="skip the bf16 transformers peer")
    a = ap.parse_args(argv)
    if a.steps < 1:
        ap.error("--steps must be >= 1")
    if a.prompt_ids_len is not None and a.prompt_ids_len < 1:
        ap.error("--prompt-ids-len must be >= 1")
    if a.prompt is not None and not a.prompt:
        ap.error("--prompt must not be empty")
    return a


def main(argv):
    a = parse_args(argv)
    t0 = time.time()
    if not os.path.isdir(a.model):
        raise RefError(f"--model {a.model!r} is not a directory")
    cfg_path = os.path.join(a.model, "config.json")
    if not os.path.exists(cfg_path):
        raise RefError(f"no config.json in {a.model}")
    with open(cfg_path) as f:
        config = json.load(f)
    metadata = safetensors_metadata(a.model)

    import torch
    import transformers
    from transformers import AutoTokenizer

    if a.device == "cuda" and not torch.cuda.is_available():
        raise RefError("CUDA is not available (use --device cpu to run on the CPU)")
    # The truth must be true float32: no TF32 anywhere.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    tok = AutoTokenizer.from_pretrained(a.model)
    if a.prompt_ids_len is not None:
        prompt, prompt_ids = long_prompt_ids(tok, a.prompt_ids_len)
        if len(prompt_ids) != a.prompt_ids_len:
            raise RefError(f"long prompt has {len(prompt_ids)} tokens, expected {a.prompt_ids_len}")
    else:
        prompt = a.prompt if a.prompt is not None else DEFAULT_PROMPT
        prompt_ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
        if a.prompt is None and len(prompt_ids) < MIN_DEFAULT_PROMPT_TOKENS:
            raise RefError(f"default prompt has only {len(prompt_ids)} tokens")
        if not prompt_ids:
            raise RefError("the prompt encodes to no tokens")
    vocab = config.get("vocab_size")
    if vocab is not None and max(prompt_ids) >= vocab:
        raise RefError(f"prompt id {max(prompt_ids)} >= vocab_size {vocab}")
    log(f"model {a.model}: {config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}, "
        f"tied={config.get('tie_word_embeddings')}, seed={metadata.get('qwen_mk_seed')}")
    log(f"prompt: {len(prompt_ids)} tokens; steps {a.steps}; device {a.device}")

    log("truth: transformers eager, float32 math on bf16 weights")
    truth = run_truth(a.model, prompt_ids, a.steps, a.device, torch)
    peer = None
    if not a.no_peer:
        log("peer: transformers bf16, teacher-forced")
        peer = run_peer(a.model, prompt_ids, truth, a.steps, a.device, torch)
    summary = summarize(truth, peer)

    doc = {
        "format": FORMAT,
        "made_by": "reference/make_reference.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
        "model": {"dir": a.model, "metadata": metadata, "config": config},
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "steps": a.steps,
        "truth": truth,
    }
    if peer is not None:
        doc["peer"] = peer
    doc["summary"] = summary
    write_json(a.out, doc)

    log(f"wrote {a.out}")
    log(f"  prompt tokens:       {len(prompt_ids)}")
    log(f"  first 16 truth ids:  {truth['ids'][:16]}")
    if peer is not None:
        log(f"  peer mean abs err:   {summary['peer_mean_abs_err']:.6g}")
        log(f"  peer max abs err:    {summary['peer_max_abs_err']:.6g}")
        log(f"  near ties:           {len(summary['near_ties'])} {summary['near_ties'][:20]}")
        log(f"  peer top-1 misses:   {len(summary['peer_top1_mismatches'])} "
            f"{summary['peer_top1_mismatches'][:20]}")
    margins = [row[0] - row[1] for row in truth["top_logprobs"]]
    log(f"  min truth top-2 gap: {min(margins):.6g} (step {margins.index(min(margins))})")
    log(f"  elapsed:             {time.time() - t0:.1f} s")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except RefError as e:
        print(f"make_reference: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception:
        traceback.print_exc()
        print("make_reference: failed (see traceback above)", file=sys.stderr, flush=True)
        sys.exit(1)
