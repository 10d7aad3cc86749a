#!/usr/bin/env python3
"""Peer decode-speed harness: what qwen-mk's ms/token is compared against.

Greedy decoding, batch 1, bf16, CUDA, of a Qwen3 checkpoint directory
(Hugging Face layout), by:

  hf-eager        transformers, eager attention, dynamic KV cache, model.generate
  hf-static-graph transformers, StaticCache + torch.compile(mode="reduce-overhead")
                  (CUDA graphs), model.generate
  mini-graph      a small hand-written PyTorch Qwen3 decoder (fused QKV and
                  gate/up weights, static KV cache, SDPA), one token per step,
                  torch.compile(mode="reduce-overhead", fullgraph=True)
  mini-eager      the same decoder without compile (cheap; shows what the
                  CUDA graph buys)

Timing (decode only, prefill excluded), CUDA events, warm-up first, median of
--repeats runs:
  hf-*   : T(n) = one model.generate call making n tokens (the first comes from
           the prefill). ms/token = (median T(tokens) - median T(1)) / (tokens - 1).
  mini-* : after the prompt is in the cache, time `tokens` decode steps, each
           feeding back the previous argmax on the GPU. ms/token = median T / tokens.

The first --check greedy ids of the peers are compared and printed. bf16
kernels round differently, so on a flat (random-weight) distribution a late
divergence is not a bug; an early one deserves a look.

On an H100 (torch 2.11, transformers 5.17) a 0.6B run takes about 3 minutes,
most of it torch.compile. hf-eager is host-bound: its number moves by 30%
between runs and machines. A peer that fails prints its error in its row;
the others still run.

--prefill-lengths P1,P2,... runs ONLY a prefill (time-to-first-token)
measurement instead of the decode peers: transformers, attn_implementation=
"sdpa", bf16, CUDA. For each P, random prompt ids (fixed seed, [0, vocab)) of
shape [1, P] already on the GPU; one CUDA-event-timed
`model(ids, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)`, i.e.
prompt ids on the GPU to the first token id on the GPU. 2 warm-up runs, then
the median of max(--repeats, 5). Prints `hf-sdpa-prefill P=<P> median_ms=<x>
min_ms=<y>` per length; a length that runs out of memory prints so and the
others still run.

Usage: python3 benches/peers.py --model DIR [--tokens 128] [--prompt-len 16] [--json OUT]
       [--repeats 3] [--only hf-eager,hf-static-graph,mini-graph,mini-eager] [--check 8]
       python3 benches/peers.py --model DIR --prefill-lengths 1024,8192 [--repeats 5] [--json OUT]
"""

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

PROMPT_TEXT = (
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest "
    "to find its friends. Later that day, the old lighthouse keeper repaired the clock. "
)


def log(msg=""):
    print(msg, flush=True)


# --------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------

def prompt_ids(model_dir, n):
    """First n ids of a fixed English text (falls back to fixed ids if the
    tokenizer cannot be loaded)."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        text = PROMPT_TEXT
        while True:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= n:
                return list(ids[:n]), "tokenizer"
            text += PROMPT_TEXT
    except Exception as e:  # the ids only need to be valid, not meaningful
        log(f"note: tokenizer unavailable ({type(e).__name__}: {e}); using fixed ids")
        return [(i * 7919) % 10000 + 100 for i in range(n)], "fixed"


def cuda_time_ms(fn):
    import torch

    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end), out


def free_gpu():
    import torch

    gc.collect()
    try:
        torch._dynamo.reset()
    except Exception:
        pass
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def write_json(path, doc):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    log(f"wrote {path}")


def versions():
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def load_state_dict(model_dir, device):
    from safetensors.torch import load_file

    path = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(path):
        return load_file(path, device=device)
    idx = os.path.join(model_dir, "model.safetensors.index.json")
    with open(idx) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    sd = {}
    for s in shards:
        sd.update(load_file(os.path.join(model_dir, s), device=device))
    return sd


# --------------------------------------------------------------------------
# (a), (b): transformers
# --------------------------------------------------------------------------

def plain_greedy(model):
    """Replace the checkpoint's generation_config (Qwen's samples, and stops at
    EOS): generate() refills every unset field from model.generation_config, so
    overriding fields per call is not enough."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)


def greedy_config(model, n):
    """Exactly n greedy tokens (call plain_greedy(model) once first)."""
    gc_ = copy.deepcopy(model.generation_config)
    gc_.max_new_tokens = n
    gc_.min_new_tokens = n  # belt and braces: never stop early
    return gc_


def time_generate(gen, n_tokens, repeats):
    """gen(n) runs model.generate for n new tokens and returns the new ids."""
    t_n, t_1 = [], []
    ids = None
    for _ in range(repeats):
        ms, out = cuda_time_ms(lambda: gen(n_tokens))
        t_n.append(ms)
        ids = out
        ms, _ = cuda_time_ms(lambda: gen(1))
        t_1.append(ms)
    if len(ids) != n_tokens:
        raise RuntimeError(f"generate made {len(ids)} tokens, expected {n_tokens}")
    med_n, med_1 = statistics.median(t_n), statistics.median(t_1)
    return {
        "ms_per_token": (med_n - med_1) / (n_tokens - 1),
        "timings_ms": {f"generate_{n_tokens}": t_n, "generate_1": t_1},
        "ids": ids,
    }


def peer_hf_eager(args, pids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16, attn_implementation="eager"
    ).to("cuda").eval()
    plain_greedy(model)
    inp = torch.tensor([pids], device="cuda")

    def gen(n):
        with torch.inference_mode():
            out = model.generate(inp, generation_config=greedy_config(model, n))
        return out[0, len(pids):].tolist()

    gen(args.tokens)  # warm-up (cuBLAS handles, allocator)
    gen(1)
    r = time_generate(gen, args.tokens, args.repeats)
    r["notes"] = "model.generate, DynamicCache, attn_implementation=eager"
    del model
    return r


def make_static_cache(model, max_len):
    import inspect
    import torch
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kw = {"config": model.config, "max_cache_len": max_len}
    # Older transformers wanted these explicitly.
    if "max_batch_size" in params:
        kw["max_batch_size"] = 1
    if "device" in params:
        kw["device"] = "cuda"
    if "dtype" in params:
        kw["dtype"] = torch.bfloat16
    return StaticCache(**kw)


def cache_kwarg_name(model):
    """transformers renamed generate's `past_key_values` to `cache` in later 5.x."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def peer_hf_static(args, pids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to("cuda").eval()
    plain_greedy(model)
    inp = torch.tensor([pids], device="cuda")
    # One cache for all calls: fixed tensor addresses, so the CUDA graphs are
    # captured once and replayed by every later generate call.
    cache = make_static_cache(model, len(pids) + args.tokens + 16)
    ck = cache_kwarg_name(model)

    def variant_auto():
        # transformers >= 4.48 compiles the decode step itself when the cache is
        # static (generation_config.compile_config); ask for full-graph CUDA graphs.
        from transformers import CompileConfig

        def cfg(n):
            g = greedy_config(model, n)
            g.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")
            return g
        return cfg, "generate's built-in compile: CompileConfig(mode=reduce-overhead, fullgraph=True)"

    def variant_manual():
        # HF's older documented recipe: compile model.forward by hand.
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

        def cfg(n):
            g = greedy_config(model, n)
            g.disable_compile = True  # don't nest generate's own compile
            return g
        return cfg, "model.forward = torch.compile(mode=reduce-overhead, fullgraph=True)"

    def variant_nocompile():
        def cfg(n):
            g = greedy_config(model, n)
            g.disable_compile = True
            return g
        return cfg, "StaticCache WITHOUT compile (compile failed)"

    errors = []
    orig_forward = model.forward
    for variant in (variant_auto, variant_manual, variant_nocompile):
        try:
            free_gpu()
            model.forward = orig_forward
            cfg, note = variant()

            def gen(n):
                with torch.inference_mode():  # the cache tensors are inference tensors
                    cache.reset()
                    out = model.generate(inp, generation_config=cfg(n), **{ck: cache})
                return out[0, len(pids):].tolist()

            t0 = time.time()
            gen(args.tokens)  # compile + CUDA-graph capture
            gen(args.tokens)
            gen(1)
            warm = time.time() - t0
            log(f"  hf-static-graph: warm-up (compile) {warm:.1f} s [{note}]")
            r = time_generate(gen, args.tokens, args.repeats)
            r["notes"] = note + (f"; earlier variants failed: {errors}" if errors else "")
            r["warmup_s"] = warm
            del model, cache
            return r
        except Exception as e:
            traceback.print_exc()
            errors.append(f"{type(e).__name__}: {str(e)[:200]}")
            log(f"  hf-static-graph variant failed: {errors[-1]}")
    raise RuntimeError("; ".join(errors))


# --------------------------------------------------------------------------
# Prefill (time to first token): transformers, SDPA, bf16
# --------------------------------------------------------------------------

PREFILL_SEED = 1234


def run_prefill(args):
    """Time prompt ids on the GPU -> first token id on the GPU, per length."""
    import inspect
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16, attn_implementation="sdpa"
    ).to("cuda").eval()
    params = inspect.signature(model.forward).parameters
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else (
        {"num_logits_to_keep": 1} if "num_logits_to_keep" in params else {})
    vocab = model.config.vocab_size
    repeats = max(args.repeats, 5)
    log(f"prefill: attn_implementation={model.config._attn_implementation}, vocab {vocab}, "
        f"kwargs {keep or 'none (full logits)'}; 2 warm-up runs, median of {repeats}")

    def first_token(inp):
        return model(inp, use_cache=True, **keep).logits[:, -1].argmax(-1)

    rows = []
    for P in args.prefill_lengths:
        row = {"peer": "transformers-sdpa-bf16", "prompt_tokens": P}
        try:
            g = torch.Generator().manual_seed(PREFILL_SEED)
            inp = torch.randint(0, vocab, (1, P), generator=g, dtype=torch.long).to("cuda")
            with torch.inference_mode():
                for _ in range(2):
                    cuda_time_ms(lambda: first_token(inp))
                runs = []
                for _ in range(repeats):
                    ms, tok = cuda_time_ms(lambda: first_token(inp))
                    runs.append(ms)
            row.update({"median_ms": statistics.median(runs), "min_ms": min(runs), "runs_ms": runs,
                        "first_id": int(tok), "error": None})
            log(f"hf-sdpa-prefill P={P} median_ms={row['median_ms']:.3f} min_ms={row['min_ms']:.3f}")
        except torch.cuda.OutOfMemoryError as e:
            row.update({"median_ms": None, "min_ms": None, "runs_ms": [], "error": f"OOM: {str(e)[:300]}"})
            log(f"hf-sdpa-prefill P={P} out of GPU memory, skipped")
        except Exception as e:
            traceback.print_exc()
            row.update({"median_ms": None, "min_ms": None, "runs_ms": [],
                        "error": f"{type(e).__name__}: {e}"[:500]})
            log(f"hf-sdpa-prefill P={P} FAILED: {row['error']}")
        rows.append(row)
        inp = tok = None
        free_gpu()
    del model
    free_gpu()
    return rows, repeats


def prefill_main(a):
    import torch

    t_start = time.time()
    gpu = torch.cuda.get_device_name()
    v = versions()
    log(f"peers (prefill): {a.model} on {gpu}; torch {v['torch']}, transformers {v['transformers']}")
    rows, repeats = run_prefill(a)
    log(f"total {time.time() - t_start:.1f} s")
    if a.json:
        write_json(a.json, {
            "format": "qwen-mk-peers/1",
            "made_by": "benches/peers.py",
            "gpu": gpu,
            "versions": v,
            "model": a.model,
            "dtype": "bfloat16",
            "batch": 1,
            "repeats": repeats,
            "seed": PREFILL_SEED,
            "method": ("prefill (time to first token): random prompt ids [1, P] on the GPU -> "
                       "model(ids, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1); "
                       "CUDA events, 2 warm-up runs, median of repeats, torch.inference_mode"),
            "prefill": rows,
        })
    return 0 if any(r["error"] is None for r in rows) else 1


# --------------------------------------------------------------------------
# (c): a small hand-written Qwen3 decoder
# --------------------------------------------------------------------------

def build_mini(model_dir, max_len, device="cuda", dtype=None):
    """A Qwen3 decoder for batch 1, one token per step, mirroring transformers'
    bf16 numerics (fp32 RMSNorm statistics, fp32 RoPE angles) so the greedy ids
    should match it up to kernel rounding."""
    import torch
    import torch.nn.functional as F

    dtype = dtype or torch.bfloat16
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    H = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or H // nh
    nl = cfg["num_hidden_layers"]
    eps = cfg["rms_norm_eps"]
    rp = cfg.get("rope_parameters") or {}
    theta = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    grp = nh // nkv

    sd = load_state_dict(model_dir, device)
    g = lambda k: sd.pop(k).to(dtype)

    class Mini(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Buffer(g("model.embed_tokens.weight"))
            lm = sd.pop("lm_head.weight", None)
            self.lm_head = torch.nn.Buffer(self.embed if lm is None else lm.to(dtype))
            self.norm = torch.nn.Buffer(g("model.norm.weight"))
            L = lambda i, n: f"model.layers.{i}.{n}.weight"
            for i in range(nl):
                setattr(self, f"wqkv{i}", torch.nn.Buffer(torch.cat(
                    [g(L(i, "self_attn.q_proj")), g(L(i, "self_attn.k_proj")), g(L(i, "self_attn.v_proj"))])))
                setattr(self, f"wo{i}", torch.nn.Buffer(g(L(i, "self_attn.o_proj"))))
                setattr(self, f"qn{i}", torch.nn.Buffer(g(L(i, "self_attn.q_norm"))))
                setattr(self, f"kn{i}", torch.nn.Buffer(g(L(i, "self_attn.k_norm"))))
                setattr(self, f"ln1{i}", torch.nn.Buffer(g(L(i, "input_layernorm"))))
                setattr(self, f"ln2{i}", torch.nn.Buffer(g(L(i, "post_attention_layernorm"))))
                setattr(self, f"wgu{i}", torch.nn.Buffer(torch.cat([g(L(i, "mlp.gate_proj")), g(L(i, "mlp.up_proj"))])))
                setattr(self, f"wd{i}", torch.nn.Buffer(g(L(i, "mlp.down_proj"))))
            # Static KV cache [layer, k/v, kv_head, position, dim].
            self.kv = torch.nn.Buffer(torch.zeros(nl, 2, nkv, max_len, hd, dtype=dtype, device=device))
            inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
            self.inv_freq = torch.nn.Buffer(inv.to(device))
            self.positions = torch.nn.Buffer(torch.arange(max_len, device=device))
            # Decode state lives on the GPU so a step is one graph replay.
            self.tok = torch.nn.Buffer(torch.zeros(1, dtype=torch.long, device=device))
            self.pos = torch.nn.Buffer(torch.zeros(1, dtype=torch.long, device=device))
            self.out_ids = torch.nn.Buffer(torch.zeros(max_len, dtype=torch.long, device=device))

        @staticmethod
        def rms(x, w):
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            return w * xf.to(x.dtype)

        @staticmethod
        def rope(x, cos, sin):
            x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
            return x * cos + torch.cat((-x2, x1), dim=-1) * sin

        def logits(self, tok, pos):
            """Logits [1, vocab] for token `tok` at position `pos` (both shape [1])."""
            x = F.embedding(tok, self.embed)  # [1, H]
            ang = pos.float()[:, None] * self.inv_freq[None, :]
            ang = torch.cat((ang, ang), dim=-1)
            cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)  # [1, hd]
            mask = (self.positions <= pos).view(1, 1, 1, max_len)
            for i in range(nl):
                h = self.rms(x, getattr(self, f"ln1{i}"))
                qkv = F.linear(h, getattr(self, f"wqkv{i}"))[0]
                q = qkv[: nh * hd].view(nh, hd)
                k = qkv[nh * hd: (nh + nkv) * hd].view(nkv, hd)
                v = qkv[(nh + nkv) * hd:].view(nkv, hd)
                q = self.rope(self.rms(q, getattr(self, f"qn{i}")), cos, sin)
                k = self.rope(self.rms(k, getattr(self, f"kn{i}")), cos, sin)
                self.kv[i, 0].index_copy_(1, pos, k[:, None, :])
                self.kv[i, 1].index_copy_(1, pos, v[:, None, :])
                # GQA without copying K/V: the `grp` query heads that share a KV
                # head become `grp` query rows of that head.
                a = F.scaled_dot_product_attention(
                    q.view(1, nkv, grp, hd), self.kv[i, 0][None], self.kv[i, 1][None], attn_mask=mask)
                x = x + F.linear(a.reshape(1, nh * hd), getattr(self, f"wo{i}"))
                h = self.rms(x, getattr(self, f"ln2{i}"))
                gate, up = F.linear(h, getattr(self, f"wgu{i}")).chunk(2, dim=-1)
                x = x + F.linear(F.silu(gate) * up, getattr(self, f"wd{i}"))
            return F.linear(self.rms(x, self.norm), self.lm_head)

        def step(self):
            """Consume self.tok at self.pos, write the argmax to out_ids[pos] and
            self.tok, advance pos. No arguments, no outputs: graph-friendly."""
            nxt = self.logits(self.tok, self.pos).argmax(-1)
            self.out_ids.index_copy_(0, self.pos, nxt)
            self.tok.copy_(nxt)
            self.pos.add_(1)

    m = Mini().eval()
    if sd:
        unused = sorted(k for k in sd if not k.endswith("rotary_emb.inv_freq"))
        if unused:
            raise RuntimeError(f"unused checkpoint tensors: {unused[:5]}")
    return m


def run_mini(m, pids, n, repeats, step):
    """Prefill token by token, then time n decode steps per repeat."""
    import torch

    P = len(pids)
    prompt = torch.tensor(pids, device="cuda")
    with torch.inference_mode():
        m.pos.zero_()
        for i in range(P - 1):
            m.tok.copy_(prompt[i: i + 1])
            step()

        def decode():
            # Restart from the last prompt token: positions >= P-1 are rewritten
            # before they are read, so the cache needs no clearing.
            m.pos.fill_(P - 1)
            m.tok.copy_(prompt[P - 1:])
            for _ in range(n):
                step()

        decode()  # warm-up (and compile/capture, when compiled)
        decode()
        times = []
        for _ in range(repeats):
            ms, _ = cuda_time_ms(decode)
            times.append(ms)
        ids = m.out_ids[P - 1: P - 1 + n].tolist()
    return {"ms_per_token": statistics.median(times) / n, "timings_ms": {f"decode_{n}": times}, "ids": ids}


def mini_max_len(args):
    return ((args.prompt_len + args.tokens + 63) // 64) * 64


def peer_mini_graph(args, pids):
    import torch

    # Round at every bf16 cast like eager PyTorch does, so the compiled decoder's
    # numerics (and greedy ids) track the eager one instead of keeping fused
    # intermediates in fp32.
    try:
        import torch._inductor.config as icfg

        icfg.emulate_precision_casts = True
    except Exception:
        pass
    m = build_mini(args.model, mini_max_len(args))
    for b in m.buffers():
        torch._dynamo.mark_static_address(b)  # weights and cache stay put: no copies into the graph
    compiled = torch.compile(m.step, mode="reduce-overhead", fullgraph=True)

    def step():
        torch.compiler.cudagraph_mark_step_begin()
        compiled()

    t0 = time.time()
    r = run_mini(m, pids, args.tokens, args.repeats, step)
    r["warmup_s"] = time.time() - t0  # includes compile, capture and the timed runs
    notes = "torch.compile(mode=reduce-overhead, fullgraph=True), one graph per token"
    try:
        from torch._dynamo.utils import counters

        skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
        if skips:
            notes += f"; WARNING: {skips} cudagraph skip(s), ran without CUDA graphs"
    except Exception:
        pass
    r["notes"] = notes
    del m, compiled
    return r


def peer_mini_eager(args, pids):
    m = build_mini(args.model, mini_max_len(args))
    r = run_mini(m, pids, args.tokens, args.repeats, m.step)
    r["notes"] = "same decoder, no compile"
    del m
    return r


PEERS = [
    ("hf-eager", peer_hf_eager),
    ("hf-static-graph", peer_hf_static),
    ("mini-graph", peer_mini_graph),
    ("mini-eager", peer_mini_eager),
]


def agree_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv):
    ap = argparse.ArgumentParser(description="Peer decode speed (bf16, batch 1, CUDA) for a Qwen3 checkpoint")
    ap.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per timed run (default 128)")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats, median taken (default 3)")
    ap.add_argument("--only", help="comma-separated peer names to run (default: all)")
    ap.add_argument("--check", type=int, default=8, help="leading greedy ids compared across peers (default 8)")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--prefill-lengths", metavar="P1,P2,...",
                    help="run ONLY the transformers-sdpa prefill (time-to-first-token) measurement "
                         "at these prompt lengths, e.g. 1024,8192")
    a = ap.parse_args(argv)
    if a.prefill_lengths is not None:
        try:
            a.prefill_lengths = [int(s) for s in a.prefill_lengths.split(",") if s.strip()]
        except ValueError:
            ap.error(f"--prefill-lengths must be comma-separated integers, got {a.prefill_lengths!r}")
        if not a.prefill_lengths or min(a.prefill_lengths) < 1:
            ap.error("--prefill-lengths needs at least one length, each >= 1")
    if a.tokens < 2 or a.prompt_len < 1 or a.repeats < 1:
        ap.error("need --tokens >= 2, --prompt-len >= 1, --repeats >= 1")
    names = [n for n, _ in PEERS]
    wanted = names if not a.only else [s.strip() for s in a.only.split(",")]
    bad = [w for w in wanted if w not in names]
    if bad:
        ap.error(f"unknown peer(s) {bad}; known: {names}")
    if not os.path.isdir(a.model):
        ap.error(f"--model {a.model!r} is not a directory")

    import torch
    import transformers

    if not torch.cuda.is_available():
        print("peers: error: CUDA is not available", file=sys.stderr)
        return 1
    if a.prefill_lengths is not None:
        return prefill_main(a)
    t_start = time.time()
    pids, pid_src = prompt_ids(a.model, a.prompt_len)
    gpu = torch.cuda.get_device_name()
    log(f"peers: {a.model} on {gpu}; torch {torch.__version__}, transformers {transformers.__version__}")
    log(f"prompt {len(pids)} tokens ({pid_src}), {a.tokens} new tokens, median of {a.repeats}")

    rows = []
    for name, fn in PEERS:
        if name not in wanted:
            continue
        log(f"[{name}] ...")
        t0 = time.time()
        row = {"name": name}
        try:
            r = fn(a, pids)
            row.update(r)
            row["tok_per_s"] = 1000.0 / r["ms_per_token"]
            row["error"] = None
            log(f"[{name}] {r['ms_per_token']:.3f} ms/token ({time.time() - t0:.1f} s)")
        except Exception as e:
            traceback.print_exc()
            row.update({"ms_per_token": None, "tok_per_s": None, "error": f"{type(e).__name__}: {e}"[:500]})
            log(f"[{name}] FAILED: {row['error']}")
        row["wall_s"] = time.time() - t0
        rows.append(row)
        free_gpu()

    # Do the peers decode the same greedy ids? (bf16 kernels differ in rounding,
    # so late divergence is normal; the first few should agree.)
    by = {r["name"]: r.get("ids") for r in rows if r.get("ids")}
    agreement = {}
    for ref in ("hf-static-graph", "hf-eager"):
        for mine in ("mini-graph", "mini-eager"):
            if ref in by and mine in by:
                k = agree_prefix(by[mine][: a.check], by[ref][: a.check])
                agreement[f"{mine}_vs_{ref}"] = {"checked": min(a.check, len(by[mine])), "agree_prefix": k}
    if "mini-graph" in by and "mini-eager" in by:
        k = agree_prefix(by["mini-graph"][: a.check], by["mini-eager"][: a.check])
        agreement["mini-graph_vs_mini-eager"] = {"checked": a.check, "agree_prefix": k}
    if "hf-eager" in by and "hf-static-graph" in by:
        k = agree_prefix(by["hf-static-graph"][: a.check], by["hf-eager"][: a.check])
        agreement["hf-static-graph_vs_hf-eager"] = {"checked": a.check, "agree_prefix": k}

    log("")
    log(f"{'peer':<17}{'ms/token':>10}{'tok/s':>10}  notes")
    for r in rows:
        if r["error"]:
            log(f"{r['name']:<17}{'-':>10}{'-':>10}  ERROR {r['error'][:150]}")
        else:
            log(f"{r['name']:<17}{r['ms_per_token']:>10.3f}{r['tok_per_s']:>10.1f}  {r.get('notes', '')[:150]}")
    log("")
    for k, v in agreement.items():
        ok = "agree" if v["agree_prefix"] == v["checked"] else f"DIFFER from index {v['agree_prefix']}"
        log(f"greedy ids, first {v['checked']}: {k}: {ok}")
    for name, ids in by.items():
        log(f"first ids {name:<16} {ids[:a.check]}")
    log(f"total {time.time() - t_start:.1f} s")

    if a.json:
        for r in rows:
            if r.get("ids"):
                r["ids_head"] = r.pop("ids")[: max(a.check, 16)]
        doc = {
            "format": "qwen-mk-peers/1",
            "made_by": "benches/peers.py",
            "gpu": gpu,
            "versions": versions(),
            "model": a.model,
            "dtype": "bfloat16",
            "batch": 1,
            "prompt_len": len(pids),
            "prompt_ids": pids,
            "tokens": a.tokens,
            "repeats": a.repeats,
            "method": ("decode only; hf-*: (median T(generate tokens) - median T(generate 1)) / (tokens-1); "
                       "mini-*: median T(tokens decode steps) / tokens; CUDA events"),
            "peers": rows,
            "agreement": agreement,
        }
        write_json(a.json, doc)
    return 0 if any(r["error"] is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
