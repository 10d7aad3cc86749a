"""Checks `qwen-mk generate --json` output (on the device, which has no cargo,
or by a user with the real weights).

  check_generate.py truth REF.json GEN.json   greedy ids equal the float32 truth's up to its first near-tie
  check_generate.py eos GEN.json              exactly one generated id, an end-of-sequence id, stop_reason eos
  check_generate.py zeros GEN.json            every generated id is 0 (torch.argmax's tie rule)
  check_generate.py golden GOLDEN.json GEN.json
                                              the real checkpoint's greedy ids (assets/qwen3-0.6b/
                                              real-model-golden.json) as far as its published runs agree
  check_generate.py chat CHAT.jsonl GEN.json  `chat --json --temperature 0` given a message, another, /clear and
                                              the first again: turn 1 is `generate --chat --json` of that message;
                                              turn 2's prompt holds turn 1 and its answer, and turn 1's prompt comes
                                              from the cache; turn 3 repeats turn 1 with all of its prompt but the
                                              last position from the cache
Exit 0 when the check holds, 1 otherwise.
"""
import json
import sys

EOS_IDS = {151643, 151645}


def main(argv):
    kind = argv[1]
    if kind == "truth":
        ref, gen = json.load(open(argv[2])), json.load(open(argv[3]))
        truth = ref["truth"]["ids"]
        near = ref["summary"]["near_ties"]
        first_near_tie = min(near) if near else len(truth)
        ours = gen["generated_ids"]
        ok = gen["prompt_ids"] == ref["prompt_ids"] and ours[:first_near_tie] == truth[:first_near_tie]
        agree = next((i for i, (a, b) in enumerate(zip(ours, truth)) if a != b), min(len(ours), len(truth)))
        print(f"generate vs truth: first near-tie at step {first_near_tie}, sequences agree for {agree} steps: "
              f"{'PASS' if ok else 'FAIL'}")
    elif kind == "eos":
        gen = json.load(open(argv[2]))
        ids = gen["generated_ids"]
        ok = len(ids) == 1 and ids[0] in EOS_IDS and gen["stop_reason"] == "eos"
        print(f"eos-wins head: generated {ids}, stop_reason {gen['stop_reason']}: {'PASS' if ok else 'FAIL'}")
    elif kind == "zeros":
        ids = json.load(open(argv[2]))["generated_ids"]
        ok = len(ids) > 0 and all(i == 0 for i in ids)
        print(f"all-ties head: generated {ids}: {'PASS' if ok else 'FAIL'}")
    elif kind == "golden":
        golden, gen = json.load(open(argv[2])), json.load(open(argv[3]))
        runs = [r["generated_ids"] for r in golden["runs"]]
        agreed = next((i for i in range(min(map(len, runs))) if len({r[i] for r in runs}) > 1), min(map(len, runs)))
        ours = gen["generated_ids"]
        ok = gen["prompt_ids"] == golden["prompt_ids"] and ours[:agreed] == runs[0][:agreed]
        print(f"real checkpoint: the published runs agree on {agreed} ids {runs[0][:agreed]}, qwen-mk gave "
              f"{ours[:agreed]}: {'PASS' if ok else 'FAIL'}")
    elif kind == "chat":
        turns = [json.loads(line) for line in open(argv[2])]
        gen = json.load(open(argv[3]))
        first_prompt = len(gen["prompt_ids"])
        ok = (len(turns) == 3
              and turns[0]["generated_ids"] == gen["generated_ids"]
              and turns[0]["prompt_tokens"] == first_prompt
              and turns[0]["reused_tokens"] == 0
              and turns[1]["prompt_tokens"] >= first_prompt + len(turns[0]["generated_ids"])
              # (at least: its last token, a newline, may merge with the answer's first when re-tokenized)
              and turns[1]["reused_tokens"] >= first_prompt - 1
              and turns[2]["reused_tokens"] == first_prompt - 1
              and turns[2]["generated_ids"] == turns[0]["generated_ids"])
        firsts = ", ".join(f"{t['timings']['first_token_ms']:.1f}" for t in turns)
        print(f"chat: {len(turns)} turns, prompts {[t['prompt_tokens'] for t in turns]} tokens, "
              f"{[t['reused_tokens'] for t in turns]} of them from the cache, first tokens after "
              f"{firsts} ms: {'PASS' if ok else 'FAIL'}")
    else:
        raise SystemExit(f"unknown check {kind}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
