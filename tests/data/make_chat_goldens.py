# Usage: python3 tests/data/make_chat_goldens.py assets/qwen3-0.6b tests/data/chat_template_goldens.json
# Renders transformers' apply_chat_template goldens for tests/chat.rs.
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
cases = [
    {"name": "user", "messages": [{"role": "user", "content": "What is the capital of France?"}], "enable_thinking": None},
    {"name": "user_no_think", "messages": [{"role": "user", "content": "What is the capital of France?"}], "enable_thinking": False},
    {"name": "system_user", "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!\nHow are you?"}], "enable_thinking": None},
    {"name": "multi_turn", "messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nsimple\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"}], "enable_thinking": None},
]
out = []
for c in cases:
    kw = {} if c["enable_thinking"] is None else {"enable_thinking": c["enable_thinking"]}
    text = tok.apply_chat_template(c["messages"], tokenize=False, add_generation_prompt=True, **kw)
    ids = tok.apply_chat_template(c["messages"], tokenize=True, add_generation_prompt=True, **kw)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    out.append({**c, "text": text, "ids": list(ids)})
json.dump({"made_by": "transformers " + __import__("transformers").__version__ + " apply_chat_template(add_generation_prompt=True)", "cases": out}, open(sys.argv[2], "w"), indent=1, ensure_ascii=False)
print(json.dumps(out[1]["text"]), out[1]["ids"][:12])
